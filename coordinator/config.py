"""Coordinator configuration: ``coordinator.toml`` plus ``FEDCOE_<SECTION>_<KEY>`` overrides.

Sections: ``[federation]`` (ids, algorithm, rounds, selection, deadline, quorum, state
folder), ``[broker]`` (MQTT), ``[security]`` (federation secret from which per-device HMAC
keys derive), ``[model]`` and ``[train]`` (the FedCoE network and client objective of
arXiv 2605.21264, design sections 3-4), an optional ``[eval]`` naming a shipped
dataset whose held-out global test set the coordinator scores after every round, and
``[metrics]`` / ``[dashboard]``: the Prometheus endpoint and the read-only web dashboard,
both off by default (docs/daemons.md, "Metrics and dashboard").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import (
    COORDINATOR_ID,
    BrokerSettings,
    apply_env,
    build_section,
    check_classes,
    check_types,
    check_username,
    load_toml,
    read_secret,
    section_defaults,
)
from fedcoe_edge.sharding import LEADER_ID, MAX_SHARDS, shard_federation
from fedcoe_edge.strategies import SIMULATION_ONLY
from fedcoe_edge.transport.topics import check_id
from fedcoe_edge.wire import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_NORM_BOUND,
    DEFAULT_WINDOW,
    check_chunk_size,
    check_window,
)

# How often a running coordinator looks at its config file's allowed_devices (`fedcoe
# devices add|remove` rewrites it; docs/daemons.md, "Adding and removing devices").
DEVICES_RELOAD_S = 1.0
MAX_WORKERS = 64  # [federation] workers: aggregation worker processes (docs/daemons.md, "Scale")


@dataclass
class FederationSettings:
    """What the rounds look like."""

    id: str = "demo"
    coordinator_id: str = COORDINATOR_ID
    algorithm: str = "fedcoe"
    seed: int = 0
    rounds: int = 10
    min_devices: int = 2  # registered training devices before round 1 starts
    quorum: int = 1  # accepted updates needed to apply an aggregation
    deadline_s: float = 60.0  # per round, from the task being sent
    wait_log_s: float = 60.0  # while too few devices are online, say so this often
    state_dir: str = "state/coordinator"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    window: int = DEFAULT_WINDOW
    norm_bound: float = DEFAULT_NORM_BOUND  # L2 bound on an update's change (new - sent), whole payload
    reassembly_budget_mb: float = 256.0  # all devices' open uploads together (one each)
    # "stream": running per-expert sums as updates are accepted (memory O(model)); "batch":
    # every update kept until the round closes (bit-identical to `fedcoe simulate`)
    aggregation: str = "stream"
    exit_when_done: bool = False  # False: keep serving cold-start fetches after the last round
    # true: each distinct download published once on the federation's shared topics, devices
    # assembling it from there (docs/protocol.md, "Shared downloads"); opt-in until it
    # delivers every final model at 5,000 devices (docs/daemons.md, "Scale"); false: one
    # chunked transfer per device
    shared_downloads: bool = False
    allowed_devices: list[str] = field(default_factory=list)  # empty: any device with a valid key
    # class names in label order (len == model.num_classes), sent in every welcome: devices
    # map their image folders through it, so label i means the same class on every device.
    # Empty: devices use their own labels (npz, shipped datasets) or sorted folder names.
    classes: list[str] = field(default_factory=list)
    # aggregation past one machine (docs/daemons.md, "Past one machine"): 1 = one coordinator;
    # S > 1 = one leader (`--role leader`) and S shard aggregators (`--role shard --shard-index i`)
    shards: int = 1
    # aggregation worker processes (docs/daemons.md, "Scale"): 0 = uploads are checked and
    # folded in the coordinator's own process; N >= 1 = in N worker processes
    # (coordinator/workers.py), the main process routing messages and owning the rounds
    workers: int = 0


class Role(str, Enum):
    """What one coordinator process is: the whole federation, its leader, or one shard."""

    SINGLE = "single"
    LEADER = "leader"
    SHARD = "shard"


@dataclass
class SecuritySettings:
    secret: str = ""  # hex; per-device keys derive from it
    secret_file: str = ""


@dataclass
class EvalSettings:
    """A shipped dataset and federation layout whose global test set the coordinator scores."""

    dataset: str = ""  # empty: no evaluation on the coordinator
    partition: str = "dirichlet"
    num_clients: int = 6
    new_clients: int = 1
    alpha: float = 0.5
    seed: int = 0
    min_samples: int = 20


@dataclass
class MetricsSettings:
    """The Prometheus endpoint (``GET /metrics``): off unless ``port`` is set; loopback
    unless ``host`` says otherwise, since the figures name the federation's devices' traffic
    and failures (docs/daemons.md, "Metrics and dashboard")."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: off


@dataclass
class DashboardSettings:
    """The read-only web dashboard (rounds, curves, devices, refusals): off unless ``port``
    is set; loopback unless ``host`` says otherwise (it has no login)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: off


def check_http(metrics: MetricsSettings, dashboard: DashboardSettings, source: str) -> None:
    """The range checks of both HTTP endpoints (one place: ``validate`` calls it)."""
    for name, s in (("metrics", metrics), ("dashboard", dashboard)):
        if isinstance(s.port, bool) or not 0 <= s.port <= 65535:
            raise ConfigError(f"{source}: [{name}] port must be in 0..65535 (0: off), got {s.port}")
        if not s.host.strip():
            raise ConfigError(f"{source}: [{name}] host must not be empty")
    if metrics.port and metrics.port == dashboard.port and metrics.host == dashboard.host:
        raise ConfigError(f"{source}: [metrics] and [dashboard] both ask for {metrics.host}:"
                          f"{metrics.port}; give them different ports")


@dataclass
class CoordinatorConfig:
    federation: FederationSettings = field(default_factory=FederationSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    secret: bytes = b""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)
    source: str = "<defaults>"
    # the file this config was read from (absolute; empty when built in code): a running
    # coordinator re-reads its allowed_devices from it (docs/daemons.md, "Adding and removing
    # devices")
    path: str = ""

    @property
    def state_dir(self) -> Path:
        return Path(self.federation.state_dir)

    def validate(self) -> None:
        # imported here, not at the top: the strategies pull in torch, and `fedcoe init` reads
        # this module's defaults at every command line parse
        from fedcoe_edge.strategies import STRATEGIES

        f, w = self.federation, f"{self.source}: [federation]"
        try:
            check_id(f.id, "id")
            check_id(f.coordinator_id, "coordinator_id")
            for d in f.allowed_devices:
                check_id(d, "allowed_devices entry")
        except Exception as exc:
            raise ConfigError(f"{w} {exc}") from None
        if f.algorithm not in STRATEGIES:
            raise ConfigError(f"{w} algorithm {f.algorithm!r} unknown; known: {', '.join(sorted(STRATEGIES))}")
        if f.algorithm in SIMULATION_ONLY:
            raise ConfigError(f"{w} algorithm {f.algorithm!r} runs in `fedcoe simulate` only: "
                              f"{SIMULATION_ONLY[f.algorithm]}")
        if f.rounds < 1:
            raise ConfigError(f"{w} rounds must be >= 1, got {f.rounds}")
        if f.min_devices < 1 or f.quorum < 1:
            raise ConfigError(f"{w} min_devices and quorum must be >= 1, got {f.min_devices}, {f.quorum}")
        if f.quorum > f.min_devices:
            raise ConfigError(f"{w} quorum {f.quorum} exceeds min_devices {f.min_devices}")
        if not f.deadline_s > 0 or not f.wait_log_s > 0:
            raise ConfigError(f"{w} deadline_s and wait_log_s must be > 0")
        check_chunk_size(f.chunk_size, w)
        check_window(f.window, w)
        if not f.norm_bound > 0:
            raise ConfigError(f"{w} norm_bound must be > 0")
        if f.aggregation not in ("stream", "batch"):
            raise ConfigError(f"{w} aggregation must be stream|batch, got {f.aggregation!r}")
        if not isinstance(f.shared_downloads, bool):
            raise ConfigError(f"{w} shared_downloads must be true or false")
        if not f.reassembly_budget_mb > 0:
            raise ConfigError(f"{w} reassembly_budget_mb must be > 0")
        if isinstance(f.shards, bool) or not 1 <= f.shards <= MAX_SHARDS:
            raise ConfigError(f"{w} shards must be in 1..{MAX_SHARDS}, got {f.shards}")
        if f.shards > 1 and f.aggregation != "stream":
            raise ConfigError(f"{w} shards = {f.shards} needs aggregation = \"stream\" (shards send "
                              "partial sums to the leader), got {f.aggregation!r}")
        if isinstance(f.workers, bool) or not 0 <= f.workers <= MAX_WORKERS:
            raise ConfigError(f"{w} workers must be in 0..{MAX_WORKERS} (0: in-process), got {f.workers}")
        if f.workers and f.aggregation != "stream":
            raise ConfigError(f"{w} workers = {f.workers} needs aggregation = \"stream\" (workers "
                              f"hold partial sums), got {f.aggregation!r}")
        self.broker.validate(f"{self.source}: [broker]")
        check_http(self.metrics, self.dashboard, self.source)
        if f.shards == 1:  # a sharded config's identity depends on the role: check_role checks it
            check_username(self.broker.username, f.coordinator_id, f"{self.source}: [broker]")
        if len(self.secret) < 16:
            raise ConfigError(f"{self.source}: [security] secret must be at least 16 bytes")
        if f.classes:
            check_classes(f.classes, f"{w} classes")
            if len(f.classes) != self.model.num_classes:
                raise ConfigError(f"{w} classes names {len(f.classes)} classes but [model] "
                                  f"num_classes is {self.model.num_classes}")


    def check_role(self, role: Role, index: int | None) -> None:
        """The one place a process's role is checked against the config: a leader or a
        shard needs ``shards`` >= 1 and streamed aggregation, a shard an index in
        0..shards-1, and a single coordinator no shard index."""
        f, w = self.federation, f"{self.source}: [federation]"
        if role is Role.SINGLE:
            if index is not None:
                raise ConfigError("--shard-index applies to --role shard only")
            if f.shards > 1:
                raise ConfigError(f"{w} shards = {f.shards}: start a --role leader and {f.shards} "
                                  "--role shard processes, or set shards = 1")
            return
        if f.aggregation != "stream":
            raise ConfigError(f"{w} --role {role.value} needs aggregation = \"stream\"")
        if role is Role.LEADER and index is not None:
            raise ConfigError("--shard-index applies to --role shard only")
        if role is Role.SHARD and (index is None or not 0 <= index < f.shards):
            raise ConfigError(f"--role shard needs --shard-index in 0..{f.shards - 1}, got {index}")
        who = mqtt_identity(f, role, index)
        if self.broker.username and self.broker.username != who:
            what = "the leader" if role is Role.LEADER else f"shard {index}"
            raise ConfigError(f"{self.source}: [broker] username {self.broker.username!r} is not "
                              f"{what}'s own MQTT identity {who!r}: every aggregator logs in as "
                              "itself (`fedcoe init --shards S` writes one config per aggregator; "
                              "docs/daemons.md, \"Past one machine\")")


def mqtt_identity(fed: FederationSettings, role: Role, index: int | None = None,
                  shards: int | None = None) -> str:
    """The MQTT client id, and the broker username, of one coordinator process.

    A single coordinator is ``coordinator_id``; the leader ``<coordinator_id>.leader.<FED>``
    and shard i ``<coordinator_id>.<FED>.s<i>of<S>`` (the coordinator of its devices'
    federation id). Under the broker template's ``use_username_as_clientid`` the username IS
    the client id, so processes sharing one username would take over each other's session
    every reconnect: each aggregator has its own username, password and ACL entry
    (docs/daemons.md, "Past one machine: leader and shard aggregators"). ``shards``
    defaults to ``fed.shards``."""
    if role is Role.SINGLE:
        return fed.coordinator_id
    if role is Role.LEADER:
        return f"{fed.coordinator_id}.{LEADER_ID}.{fed.id}"
    if index is None:
        raise ConfigError("a shard's MQTT identity needs its shard index")
    return f"{fed.coordinator_id}.{shard_federation(fed.id, index, shards or fed.shards)}"


SECTIONS: dict[str, type] = {"federation": FederationSettings, "broker": BrokerSettings,
                             "security": SecuritySettings, "eval": EvalSettings,
                             "model": ModelConfig, "train": TrainConfig,
                             "metrics": MetricsSettings, "dashboard": DashboardSettings}


def env_defaults() -> dict[str, dict[str, Any]]:
    """Every overridable key, e.g. FEDCOE_BROKER_PORT, FEDCOE_SECURITY_SECRET."""
    return {name: section_defaults(cls) for name, cls in SECTIONS.items()}


def config_from_doc(doc: dict[str, Any], source: str, base: Path,
                    env: dict[str, str] | None = None) -> CoordinatorConfig:
    """Build and validate a config from a parsed TOML document (env overrides applied)."""
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    doc = apply_env(doc, env_defaults(), env)
    fed = build_section(FederationSettings, doc, "federation", source)
    if not Path(fed.state_dir).is_absolute():
        fed.state_dir = str(base / fed.state_dir)
    sec = build_section(SecuritySettings, doc, "security", source)
    for name, cls in (("model", ModelConfig), ("train", TrainConfig)):
        if not isinstance(doc.get(name, {}), dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        check_types(cls, doc.get(name, {}), f"{source}: [{name}]")
    try:
        model = ModelConfig.from_dict(doc.get("model", {}))
        train = TrainConfig.from_dict(doc.get("train", {}))
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    broker = build_section(BrokerSettings, doc, "broker", source)
    broker.resolve(base)
    cfg = CoordinatorConfig(
        federation=fed, broker=broker,
        secret=read_secret(sec.secret, sec.secret_file, f"{source}: [security] secret", base),
        model=model, train=train, eval=build_section(EvalSettings, doc, "eval", source),
        metrics=build_section(MetricsSettings, doc, "metrics", source),
        dashboard=build_section(DashboardSettings, doc, "dashboard", source),
        source=source)
    cfg.validate()
    return cfg


def load_config(path: Path, env: dict[str, str] | None = None) -> CoordinatorConfig:
    """Read ``coordinator.toml``; relative paths inside are relative to the file's folder."""
    path = Path(path)
    cfg = config_from_doc(load_toml(path), str(path), path.resolve().parent, env)
    cfg.path = str(path.resolve())
    return cfg
