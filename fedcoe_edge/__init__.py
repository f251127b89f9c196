"""fedcoe-edge: federated learning with a coordinated dual-level Mixture-of-Experts (FedCoE,
arXiv 2605.21264) for fleets of edge devices. How it works: docs/design.md.

    import fedcoe_edge as fe

    cfg = fe.SimulationConfig(dataset="fmnist", data_fraction=0.1, alpha=0.1, rounds=40,
                              algorithms=["fedcoe", "fedavg"])
    doc, runs = fe.simulate(cfg)            # the dict `fedcoe simulate` writes to results.json
    print(doc["algorithms"]["fedcoe"]["personalized_acc"], doc["diagnostics"]["fedcoe"])

    session = fe.MoESession("bundle/")      # onnxruntime + numpy only, no torch
    probs = session.predict(x)              # x: float32 (B, C, H, W) in [0, 1]

    fe.register_trunk("resnet8", lambda input_shape: MyResNet8())  # your own torch trunk
    model = fe.DualLevelMoE(fe.ModelConfig(input_shape=(3, 32, 32), trunk="resnet8",
                                           expert_kind="mlp"))

Every public name is listed, with an example, in docs/api.md.

Names resolve lazily, so ``import fedcoe_edge`` stays cheap and a device that only predicts
never imports torch. The exporter and the daemons live in the packages above this library
(``export``, ``device_agent``, ``coordinator``) and are imported from there: the library
never names a layer above it (docs/design.md, "Layers"), so these are not re-exported here
(:data:`ABOVE` says where each went).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> "module:attribute"
_EXPORTS: dict[str, str] = {
    # configuration
    "ModelConfig": "fedcoe_edge.config:ModelConfig",
    "TrainConfig": "fedcoe_edge.config:TrainConfig",
    "SimulationConfig": "fedcoe_edge.simulation:SimulationConfig",
    # model
    "DualLevelMoE": "fedcoe_edge.model:DualLevelMoE",
    # algorithms
    "Strategy": "fedcoe_edge.strategies:Strategy",
    "FedCoE": "fedcoe_edge.strategies:FedCoE",
    "FedAvg": "fedcoe_edge.strategies:FedAvg",
    "FedProx": "fedcoe_edge.strategies:FedProx",
    "Ditto": "fedcoe_edge.strategies:Ditto",
    "FedRep": "fedcoe_edge.strategies:FedRep",
    "STRATEGIES": "fedcoe_edge.strategies:STRATEGIES",
    "make_strategy": "fedcoe_edge.strategies:make_strategy",
    "register_strategy": "fedcoe_edge.strategies:register_strategy",
    "Partial": "fedcoe_edge.streaming:Partial",
    # your own model and data (registries; built-ins are registered the same way)
    "register_trunk": "fedcoe_edge.registry:register_trunk",
    "register_expert": "fedcoe_edge.registry:register_expert",
    "register_dataset": "fedcoe_edge.registry:register_dataset",
    "TRUNKS": "fedcoe_edge.registry:TRUNKS",
    "EXPERTS": "fedcoe_edge.registry:EXPERTS",
    # errors (every one a FedCoEError; the CLI prints one line and exits 2)
    "FedCoEError": "fedcoe_edge.errors:FedCoEError",
    "ConfigError": "fedcoe_edge.errors:ConfigError",
    "DataError": "fedcoe_edge.errors:DataError",
    "BundleError": "fedcoe_edge.errors:BundleError",
    "RegistryError": "fedcoe_edge.registry:RegistryError",
    # data
    "DATASETS": "fedcoe_edge.data:DATASETS",
    "make_federation": "fedcoe_edge.data:make_federation",
    "load_dataset": "fedcoe_edge.data:load_dataset",
    "folder_classes": "fedcoe_edge.data.loaders:folder_classes",
    # a pretrained trunk (the coordinator's, on a public dataset)
    "PretrainOptions": "fedcoe_edge.pretrain:PretrainOptions",
    "pretrain_trunk_file": "fedcoe_edge.pretrain:pretrain_trunk_file",
    # simulation
    "simulate": "fedcoe_edge.simulation:simulate",
    "run_one": "fedcoe_edge.simulation:run_one",
    "write_outputs": "fedcoe_edge.simulation:write_outputs",
    "client_model": "fedcoe_edge.simulation:client_model",
    "RunResult": "fedcoe_edge.simulation:RunResult",
    # on-device inference (no torch)
    "MoESession": "fedcoe_edge.runtime:MoESession",
    # what the daemons share (the wire and transport layer)
    "BrokerSettings": "fedcoe_edge.protocol:BrokerSettings",
    "device_key": "fedcoe_edge.protocol:device_key",
    "MosquittoBroker": "fedcoe_edge.broker:MosquittoBroker",
}

__all__ = sorted([*_EXPORTS, "__version__"])

# Names once re-exported here that live in the layers above the library: how to import them
# (text for the error message only; nothing here is ever imported).
ABOVE: dict[str, str] = {
    "export_bundle": "from export.bundle import build_bundle",
    "Coordinator": "from coordinator.daemon import Coordinator",
    "CoordinatorConfig": "from coordinator.config import CoordinatorConfig",
    "FederationSettings": "from coordinator.config import FederationSettings",
    "DeviceAgent": "from device_agent.daemon import DeviceAgent",
    "AgentConfig": "from device_agent.config import AgentConfig",
    "DeviceSettings": "from device_agent.config import DeviceSettings",
    "DataSettings": "from device_agent.config import DataSettings",
}


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    target = _EXPORTS.get(name)
    if target is None:
        if name in ABOVE:
            raise AttributeError(f"fedcoe_edge.{name} is not part of the library: the exporter "
                                 f"and the daemons sit above it ({ABOVE[name]}; docs/api.md)")
        raise AttributeError(f"module 'fedcoe_edge' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
