"""A Flower run config as a fedcoe experiment: the keys, their defaults and checks.

Flower hands both apps the same flat ``run_config`` (``[tool.flwr.app.config]`` of the app's
pyproject.toml, overridden by ``flwr run --run-config``). Its keys name the knobs of ``fedcoe
simulate`` (docs/engines.md, "Flower run config"); ``model.*`` and ``train.*`` keys are the
[model] and [train] options of a ``--config`` file, flattened as Flower flattens nested tables.
A key left out keeps :class:`~fedcoe_edge.simulation.SimulationConfig`'s default, so the two
engines default alike and one place holds each default and its check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.simulation import SimulationConfig

# run-config key -> (SimulationConfig field, the Python types the value may have)
_SIM_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "dataset": ("dataset", (str,)),
    "partition": ("partition", (str,)),
    "alpha": ("alpha", (int, float)),
    "clients": ("clients", (int,)),
    "new-clients": ("new_clients", (int,)),
    "min-samples": ("min_samples", (int,)),
    "data-fraction": ("data_fraction", (int, float)),
    "data-dir": ("data_dir", (str,)),
    "num-server-rounds": ("rounds", (int,)),
    "split": ("split", (str,)),
}
_RUN_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "algorithm": ("algorithm", (str,)),
    "seed": ("seed", (int,)),
    "round-timeout": ("round_timeout", (int, float)),
    "node-timeout": ("node_timeout", (int, float)),
    "out-dir": ("out_dir", (str,)),
}


@dataclass
class FlowerRun:
    """One fedcoe run on Flower: the experiment ``fedcoe simulate`` would run with one algorithm
    and one seed, plus what only a networked engine needs."""

    sim: SimulationConfig = field(default_factory=SimulationConfig)
    algorithm: str = "fedcoe"
    seed: int = 0
    round_timeout: float = 600.0  # seconds a round waits for its replies; a late one is a failure
    node_timeout: float = 300.0  # seconds the ServerApp waits for every client's SuperNode
    out_dir: str = ""  # "" writes nothing; else flower_results.json goes there

    def validate(self) -> None:
        self.sim.algorithms, self.sim.seeds = [self.algorithm], [self.seed]
        self.sim.validate()
        if not self.round_timeout > 0 or not self.node_timeout > 0:
            raise ConfigError(f"round-timeout and node-timeout must be > 0, got "
                              f"{self.round_timeout}, {self.node_timeout}")
        if self.out_dir and Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise ConfigError(f"out-dir {self.out_dir} exists and is not a folder")


def _typed(key: str, value: Any, types: tuple[type, ...]) -> Any:
    if isinstance(value, bool) or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"run config {key!r}: expected {want}, got {value!r:.60}")
    return float(value) if float in types else value  # type: ignore[arg-type]  # int or float, checked above


def flower_run(run_config: Mapping[str, Any]) -> FlowerRun:
    """Parse and check Flower's ``run_config``; an unknown key or a wrong type is one
    ConfigError line naming the key."""
    run, sim = FlowerRun(), SimulationConfig()
    sections: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for key, value in run_config.items():
        head, _, rest = key.partition(".")
        if head in sections and rest:
            sections[head][rest] = value
        elif key in _SIM_KEYS:
            name, types = _SIM_KEYS[key]
            setattr(sim, name, _typed(key, value, types))
        elif key in _RUN_KEYS:
            name, types = _RUN_KEYS[key]
            setattr(run, name, _typed(key, value, types))
        else:
            known = sorted([*_SIM_KEYS, *_RUN_KEYS, "model.*", "train.*"])
            raise ConfigError(f"unknown run config key {key!r}; known: {', '.join(known)}")
    if sim.data_dir == "":
        sim.data_dir = None
    sim.model = ModelConfig.from_dict(sections["model"])
    sim.train = TrainConfig.from_dict(sections["train"])
    run.sim = sim
    run.validate()
    return run


def run_config_of(run: FlowerRun) -> dict[str, Any]:
    """The run config that :func:`flower_run` parses back to ``run`` for the scalar knobs it
    sets (what ``python -m fedcoe_edge.flower`` hands Flower)."""
    out: dict[str, Any] = {"algorithm": run.algorithm, "seed": run.seed,
                           "round-timeout": run.round_timeout, "node-timeout": run.node_timeout,
                           "out-dir": run.out_dir}
    for key, (name, _) in _SIM_KEYS.items():
        value = getattr(run.sim, name)
        if value is not None:
            out[key] = value
    defaults_m, defaults_t = ModelConfig(), TrainConfig()
    for prefix, cfg, default in (("model", run.sim.model, defaults_m), ("train", run.sim.train, defaults_t)):
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if value != getattr(default, f.name) and isinstance(value, (bool, int, float, str)):
                out[f"{prefix}.{f.name}"] = value  # Flower's run config holds scalars only
    return out
