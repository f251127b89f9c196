"""Shared pytest fixtures. Tests keep torch to one thread: the machine has two cores."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


# --- Mosquitto fixtures (wire/transport engineer) ---

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


def _require_mosquitto() -> None:
    from fedcoe_edge.broker import find_mosquitto
    from fedcoe_edge.errors import ConfigError

    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def mosquitto_broker() -> Iterator[Any]:
    """A private Mosquitto on a free 127.0.0.1 port, default limits, no persistence."""
    from fedcoe_edge.broker import MosquittoBroker

    _require_mosquitto()
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
def make_mosquitto() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_mosquitto(max_packet_size=65536, ...)`` -> started MosquittoBroker,
    closed at teardown."""
    from fedcoe_edge.broker import MosquittoBroker

    _require_mosquitto()
    brokers: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(**kwargs)
        brokers.append(b)
        b.start()
        return b

    yield make
    for b in brokers:
        b.close()
