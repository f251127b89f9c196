"""Federated algorithms behind one interface (see ``base.Strategy``); none imports a transport."""

from __future__ import annotations

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.base import ClientData, ClientResult, ClientTask, Failure, Strategy
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.fedcoe import FedCoE

STRATEGIES: dict[str, type[Strategy]] = {
    FedCoE.name: FedCoE,
    FedAvg.name: FedAvg,
}


def make_strategy(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> Strategy:
    """Build a registered strategy by name; unknown names raise ConfigError listing the known ones."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    return cls(model_cfg, train_cfg, seed)


__all__ = ["STRATEGIES", "ClientData", "ClientResult", "ClientTask", "Failure", "Strategy",
           "make_strategy", "FedAvg", "FedCoE"]
