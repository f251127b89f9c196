"""Federated algorithms behind one interface (see ``base.Strategy``); none imports a transport.

``STRATEGIES`` holds FedCoE, the baselines a reviewer asks for (FedAvg, FedProx, Local-only,
FedAvg + fine-tuning, Ditto, FedRep, a global/local mixture, FedAvg + label prior, FedALA,
FedDBE) and FedCoE's ablations.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.base import ClientData, ClientResult, ClientTask, Failure, Strategy
from fedcoe_edge.streaming import Partial

if TYPE_CHECKING:  # precise types for mypy; at run time they load lazily (below)
    from fedcoe_edge.strategies.ablations import ABLATIONS
    from fedcoe_edge.strategies.ditto import Ditto
    from fedcoe_edge.strategies.fedala import FedALA
    from fedcoe_edge.strategies.fedavg import FedAvg
    from fedcoe_edge.strategies.fedavg_ft import FedAvgFT
    from fedcoe_edge.strategies.fedcoe import FedCoE
    from fedcoe_edge.strategies.feddbe import FedDBE
    from fedcoe_edge.strategies.fedprox import FedProx
    from fedcoe_edge.strategies.fedrep import FedRep
    from fedcoe_edge.strategies.labelprior import FedAvgPrior
    from fedcoe_edge.strategies.local import Local
    from fedcoe_edge.strategies.mixture import Mixture

    BASELINES: tuple[type[Strategy], ...]
    STRATEGIES: dict[str, type[Strategy]]

# The algorithms build torch models: they are imported on first use (PEP 562), so the
# types above (numpy only) serve a device with the runtime install profile, no torch.
_LAZY: dict[str, str] = {
    "ABLATIONS": "fedcoe_edge.strategies.ablations",
    "Ditto": "fedcoe_edge.strategies.ditto",
    "FedALA": "fedcoe_edge.strategies.fedala",
    "FedAvg": "fedcoe_edge.strategies.fedavg",
    "FedAvgFT": "fedcoe_edge.strategies.fedavg_ft",
    "FedAvgPrior": "fedcoe_edge.strategies.labelprior",
    "FedCoE": "fedcoe_edge.strategies.fedcoe",
    "FedDBE": "fedcoe_edge.strategies.feddbe",
    "FedProx": "fedcoe_edge.strategies.fedprox",
    "FedRep": "fedcoe_edge.strategies.fedrep",
    "Local": "fedcoe_edge.strategies.local",
    "Mixture": "fedcoe_edge.strategies.mixture",
}


def __getattr__(name: str) -> Any:
    if name in globals():  # built once: STRATEGIES is the one dict register_strategy extends
        return globals()[name]
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name == "BASELINES":
        value = tuple(__getattr__(n) for n in ("FedAvg", "FedProx", "Local", "FedAvgFT", "Ditto",
                                                "FedRep", "Mixture", "FedAvgPrior", "FedALA",
                                                "FedDBE"))
    elif name == "STRATEGIES":
        value = {cls.name: cls for cls in (__getattr__("FedCoE"), *__getattr__("BASELINES"),
                                           *__getattr__("ABLATIONS"))}
    else:
        raise AttributeError(f"module 'fedcoe_edge.strategies' has no attribute {name!r}")
    globals()[name] = value
    return value


def make_strategy(name: str, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> Strategy:
    """Build a registered strategy by name; unknown names raise ConfigError listing the known ones."""
    strategies = __getattr__("STRATEGIES")
    try:
        cls = strategies[name]
    except KeyError:
        raise ConfigError(f"unknown algorithm {name!r}; known: {', '.join(sorted(strategies))}") from None
    if ((model_cfg.trunk_mode != "federated" or model_cfg.trunk_weights)
            and not issubclass(cls, __getattr__("FedCoE"))):
        raise ConfigError(f"model.trunk_mode / model.trunk_weights are implemented for fedcoe and "
                          f"its ablations, not {name!r}")
    return cls(model_cfg, train_cfg, seed)


def register_strategy(name: str, cls: type[Strategy], *, replace: bool = False) -> None:
    """Make ``name`` an algorithm (``make_strategy``, ``SimulationConfig.algorithms``, a
    coordinator's ``[federation] algorithm`` in this process): ``cls`` must be a concrete
    :class:`Strategy`, its aggregation (``new_partial``, ``accumulate``, ``finalize``) included,
    because the simulator, a streaming coordinator and a sharded leader all run that one rule.
    RegistryError, in one line naming what is missing, otherwise."""
    from fedcoe_edge.registry import NAME_PATTERN, RegistryError

    strategies = __getattr__("STRATEGIES")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RegistryError(f"strategy name must be letters, digits, '_', '.', '+' or '-', got {name!r}")
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise RegistryError(f"strategy {name!r}: {cls!r:.80} is not a subclass of fedcoe_edge.Strategy")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise RegistryError(f"strategy {name!r}: {cls.__name__} does not implement "
                            f"{', '.join(missing)} (docs/api.md, \"Your own algorithm\")")
    if name in strategies and not replace:
        raise RegistryError(f"strategy {name!r} is already registered (pass replace=True to override it)")
    if name in _BUILTIN_NAMES():
        raise RegistryError(f"strategy {name!r} is built in and cannot be replaced")
    strategies[name] = cls


def unregister_strategy(name: str) -> None:
    """Remove a user's strategy (tests, notebooks re-running a cell); built-ins stay."""
    from fedcoe_edge.registry import RegistryError

    if name in _BUILTIN_NAMES():
        raise RegistryError(f"strategy {name!r} is built in and cannot be removed")
    __getattr__("STRATEGIES").pop(name, None)


def _BUILTIN_NAMES() -> set[str]:  # noqa: N802 - reads as the constant it stands for
    return {cls.name for cls in (__getattr__("FedCoE"), *__getattr__("BASELINES"),
                                 *__getattr__("ABLATIONS"))}


def shares_model(name: str) -> bool:
    """False for algorithms with no shared model (Local): their global/cold-start is chance."""
    return bool(getattr(__getattr__("STRATEGIES")[name], "shares_model", True))


__all__ = ["ABLATIONS", "BASELINES", "STRATEGIES", "ClientData", "ClientResult", "ClientTask",
           "Ditto", "Failure", "FedALA", "FedAvg", "FedAvgFT", "FedAvgPrior", "FedCoE", "FedDBE",
           "FedProx", "FedRep", "Local", "Mixture", "Partial", "Strategy", "make_strategy", "register_strategy", "shares_model",
           "unregister_strategy"]
