"""FedCoE as a Flower app: any registered strategy behind Flower's Message API.

The Flower user's view (docs/engines.md, "Flower"): :func:`server_app` and :func:`client_app`
are the ServerApp and ClientApp a ``[tool.flwr.app.components]`` table names, and
:class:`FlowerStrategy` is the Flower strategy that drives a fedcoe strategy through its
public configure / aggregate contract, so the Simulation Engine, the Deployment Engine and
``fedcoe simulate`` run the same rule on the same numbers.

Nothing here imports Flower at import time: the package installs without the ``[flower]``
extra, and :func:`require_flwr` turns a missing Flower, or one outside the tested range, into
one ConfigError line before anything starts.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, Any

from fedcoe_edge.extras import require_extra, version_range

if TYPE_CHECKING:
    from fedcoe_edge.flower.apps import client_app, run_server, server_app
    from fedcoe_edge.flower.config import FlowerRun, flower_run
    from fedcoe_edge.flower.strategy import FlowerStrategy

# The Flower releases the tests ran against: >= FLWR_MIN and < FLWR_BELOW (pyproject.toml's
# [flower] extra pins the same range). Flower's Message API still moves between minor releases.
FLWR_MIN = (1, 42)
FLWR_BELOW = (1, 43)
FLWR_RANGE = version_range(FLWR_MIN, FLWR_BELOW)


def require_flwr(version: str | None = None) -> str:
    """The installed Flower version, or ConfigError in one line when Flower is missing or
    outside the tested range (``version`` overrides the installed one: tests, error paths)."""
    return require_extra("flwr", "Flower", "flower", FLWR_MIN, FLWR_BELOW, version)


_LAZY = {
    "FlowerRun": "fedcoe_edge.flower.config",
    "flower_run": "fedcoe_edge.flower.config",
    "FlowerStrategy": "fedcoe_edge.flower.strategy",
    "client_app": "fedcoe_edge.flower.apps",
    "server_app": "fedcoe_edge.flower.apps",
    "run_server": "fedcoe_edge.flower.apps",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fedcoe_edge.flower' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = ["FLWR_RANGE", "FlowerRun", "FlowerStrategy", "client_app", "flower_run",
           "require_flwr", "run_server", "server_app"]
