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


# --- export / runtime ------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_moe():
    """A small DualLevelMoE trained for a few epochs on digits: (model, x_train, y_train, x_test, y_test).

    Trained, not random, so int8 agreement and accuracy are measured on a real decision surface.
    """
    import numpy as np

    from fedcoe_edge.config import ModelConfig, TrainConfig
    from fedcoe_edge.data.datasets import load_dataset
    from fedcoe_edge.training import build_model, run_epochs

    x, y = load_dataset("digits", 0)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    cfg = ModelConfig(expert_kind="mlp", expert_hidden=32, num_global_experts=4, top_k=2,
                      num_local_experts=1)
    model = build_model(cfg, 0)

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model(xb)
        nll = torch.nn.functional.nll_loss
        return nll(out.log_probs, yb) + 0.5 * nll(out.global_log_probs, yb)

    run_epochs(model, list(model.parameters()), x[:1300], y[:1300], TrainConfig(lr=0.05), 6,
               np.random.default_rng(0), loss)
    model.eval()
    return model, x[:1300], y[:1300], x[1300:], y[1300:]


@pytest.fixture(scope="session")
def digits_bundle(digits_moe, tmp_path_factory):
    """An int8 (auto) bundle of ``digits_moe`` holding all K experts, with fp32 copies and fused graph."""
    from export.bundle import build_bundle, calibration_sample

    model, x_train = digits_moe[0], digits_moe[1]
    out = tmp_path_factory.mktemp("bundle") / "digits"
    build_bundle(model, out, calibration=calibration_sample(x_train, 128))
    return out
