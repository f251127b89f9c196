"""Federated algorithms behind one interface (see ``base.Strategy``); none imports a transport.

``STRATEGIES`` holds FedCoE, the baselines a reviewer asks for (FedAvg, FedProx, Local-only,
FedAvg + fine-tuning, Ditto, FedRep, a global/local mixture) and FedCoE's ablations.
"""

from __future__ import annotations

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.ablations import ABLATIONS
from fedcoe_edge.strategies.base import ClientData, ClientResult, ClientTask, Failure, Strategy
from fedcoe_edge.strategies.ditto import Ditto
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.fedavg_ft import FedAvgFT
from fedcoe_edge.strategies.fedcoe import FedCoE
from fedcoe_edge.strategies.fedprox import FedProx
from fedcoe_edge.strategies.fedrep import FedRep
from fedcoe_edge.strategies.local import Local
from fedcoe_edge.strategies.mixture import Mixture

BASELINES: tuple[type[Strategy], ...] = (FedAvg, FedProx, Local, FedAvgFT, Ditto, FedRep, Mixture)

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedCoE, *BASELINES, *ABLATIONS)  # type: ignore[misc, attr-defined]
}


def make_strategy(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> Strategy:
    """Build a registered strategy by name; unknown names raise ConfigError listing the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    return cls(model_cfg, train_cfg, seed)


def shares_model(name: str) -> bool:
    """False for algorithms with no shared model (Local): their global/cold-start is chance."""
    return bool(getattr(STRATEGIES[name], "shares_model", True))


__all__ = ["ABLATIONS", "BASELINES", "STRATEGIES", "ClientData", "ClientResult", "ClientTask",
           "Ditto", "Failure", "FedAvg", "FedAvgFT", "FedCoE", "FedProx", "FedRep", "Local",
           "Mixture", "Strategy", "make_strategy", "shares_model"]
