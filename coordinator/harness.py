"""An embedded federation: the coordinator and device agents as threads of one process.

Used by the integration tests and handy for notebooks: the daemons are the real ones,
only the transport factory differs (an in-memory broker or a real MQTT broker), so the
same seed must give the same FedCoE (arXiv 2605.21264) result over either.

The harness has no defaults of its own: every knob left unset is the daemons' default (the
dataclasses of coordinator/config.py, device_agent/config.py and fedcoe_edge/config.py),
so what a test runs is what a deployment runs, streamed aggregation included. A test that
needs another value passes it; :func:`small` names the knobs most tests shrink (model
width, local epochs, no int8 bundle), for the test to pass as ``**small()``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.config import (
    CoordinatorConfig,
    DashboardSettings,
    EvalSettings,
    FederationSettings,
    MetricsSettings,
)
from coordinator.daemon import Coordinator
from coordinator.leader import Leader
from coordinator.shard import ShardAggregator
from device_agent.config import AgentConfig, DataSettings, DeviceSettings
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.protocol import TransportFactory, device_key
from fedcoe_edge.sharding import shard_federation, shard_of

DEMO_SECRET = bytes(range(32))


def small() -> dict[str, Any]:
    """Test-sized knobs, for a test to pass explicitly (``EmbeddedFederation(..., **small())``):
    16-wide experts and one local epoch (what the simulator comparisons use) and no int8
    bundle rebuild after the last round (seconds of ONNX export per device)."""
    return {"model": ModelConfig(expert_hidden=16), "train": TrainConfig(local_epochs=1),
            "bundle": "off"}


@dataclass
class EmbeddedFederation:
    """Coordinator + agents on the digits demo federation, wired to ``factory``."""

    root: Path
    factory: TransportFactory
    devices: int = FederationSettings.min_devices  # digits clients 0..devices-1, all awaited
    rounds: int = FederationSettings.rounds
    seed: int = FederationSettings.seed
    alpha: float = EvalSettings.alpha  # Dirichlet label skew of the digits clients
    deadline_s: float = FederationSettings.deadline_s
    quorum: int = FederationSettings.quorum
    federation: str = FederationSettings.id
    algorithm: str = FederationSettings.algorithm
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hooks: dict[str, AgentHooks] = field(default_factory=dict)
    compress: bool = DeviceSettings.compress_uploads
    chunk_size: int = FederationSettings.chunk_size  # both sides'
    heartbeat_s: float = DeviceSettings.heartbeat_s
    bundle: str = DeviceSettings.bundle
    # "stream" (the daemon's default) equals `fedcoe simulate` up to float rounding; a test
    # that compares with the simulator bit for bit passes aggregation="batch"
    aggregation: str = FederationSettings.aggregation
    workers: int = FederationSettings.workers  # aggregation worker processes (0: in-process)
    shared_downloads: bool = FederationSettings.shared_downloads  # one retained copy per payload
    device_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> [device] fields
    metrics: MetricsSettings = field(default_factory=MetricsSettings)  # off by default
    dashboard: DashboardSettings = field(default_factory=DashboardSettings)  # off by default
    coordinator: Coordinator | None = None
    agents: dict[str, DeviceAgent] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    def coordinator_config(self) -> CoordinatorConfig:
        fed = FederationSettings(id=self.federation, algorithm=self.algorithm, seed=self.seed,
                                 rounds=self.rounds,
                                 min_devices=self.devices, quorum=self.quorum,
                                 deadline_s=self.deadline_s, state_dir=str(self.root / "coordinator"),
                                 chunk_size=self.chunk_size, aggregation=self.aggregation,
                                 workers=self.workers, shared_downloads=self.shared_downloads)
        return CoordinatorConfig(federation=fed, secret=DEMO_SECRET, model=self.model, train=self.train,
                                 eval=EvalSettings(dataset="digits", num_clients=self.devices,
                                                   new_clients=EvalSettings.new_clients,
                                                   alpha=self.alpha, seed=self.seed),
                                 metrics=self.metrics, dashboard=self.dashboard)

    def agent_config(self, dev: str, client: str, role: str = "train") -> AgentConfig:
        d = DeviceSettings(id=dev, federation=self.federation, role=role,
                           state_dir=str(self.root / dev), compress_uploads=self.compress,
                           chunk_size=self.chunk_size, heartbeat_s=self.heartbeat_s,
                           bundle=self.bundle)
        for name, value in self.device_overrides.get(dev, {}).items():
            setattr(d, name, value)
        data = DataSettings(dataset="digits", client=client, num_clients=self.devices,
                            new_clients=EvalSettings.new_clients, alpha=self.alpha, seed=self.seed)
        return AgentConfig(device=d, key=device_key(DEMO_SECRET, dev), data=data)

    def start(self) -> None:
        self.start_coordinator()
        for i in range(self.devices):
            self.add_agent(str(i), str(i))  # same ids as the simulator: same seeds per client

    def start_coordinator(self) -> Coordinator:
        """(Re)start the coordinator on the state folder (a restart resumes from it)."""
        self.coordinator = Coordinator(self.coordinator_config(), self.factory)
        self._spawn(self.coordinator.run, "coordinator")
        return self.coordinator

    def add_agent(self, dev: str, client: str, role: str = "train") -> DeviceAgent:
        agent = DeviceAgent(self.agent_config(dev, client, role), self.factory,
                            hooks=self.hooks.get(dev))
        self.agents[dev] = agent
        agent.start()
        return agent

    def _spawn(self, fn: Callable[[], Any], name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(f"embedded federation: {what} not reached in {timeout:.0f}s")
            time.sleep(0.05)

    def wait_rounds(self, timeout: float = 120.0) -> None:
        """Until the last round is closed and every device has reported its evaluation."""
        c = self.coordinator
        assert c is not None
        self.wait(lambda: c.finished, timeout, f"{self.rounds} rounds")

        def evals_in() -> bool:
            rows = c.store.evals("personal")
            got = {r["device"] for r in rows if r["round"] == self.rounds}
            want = {d for d, a in self.agents.items() if self.rounds in a.rounds_done}
            return want <= got
        self.wait(evals_in, timeout, "final evaluations")

    def final_state(self, timeout: float = 120.0) -> dict[str, Any]:
        """Start, run every round, stop; the final global state (a copy). The reference a
        test compares an interrupted federation with."""
        self.start()
        try:
            self.wait_rounds(timeout)
            assert self.coordinator is not None
            return dict(self.coordinator.strategy.global_state)
        finally:
            self.stop()

    def stop(self) -> None:
        for a in self.agents.values():
            a.close()
        if self.coordinator is not None:
            self.coordinator.stop()
        for t in self.threads:
            t.join(timeout=10)


@dataclass
class ShardedFederation(EmbeddedFederation):
    """A leader, ``shards`` shard aggregators and the agents, as threads of one process;
    each agent is given its shard's federation id (docs/daemons.md, "Past one machine")."""

    shards: int = 2  # sharding merges partial sums: aggregation must stay "stream"
    leader: Leader | None = None
    shard_daemons: list[ShardAggregator] = field(default_factory=list)

    def start(self) -> None:
        self.start_coordinator()
        for i in range(self.devices):
            dev = str(i)
            self.device_overrides.setdefault(dev, {})["federation"] = shard_federation(
                self.federation, shard_of(dev, self.shards), self.shards)
            self.add_agent(dev, dev)

    def start_coordinator(self) -> Coordinator:
        """The leader and every shard; returns shard 0 (the harness's ``coordinator``)."""
        cfg = self.coordinator_config()
        self.leader = Leader(cfg, self.shards, self.factory)
        self._spawn(self.leader.run, "leader")
        self.shard_daemons = [ShardAggregator(cfg, i, self.shards, self.factory)
                              for i in range(self.shards)]
        for i, sh in enumerate(self.shard_daemons):
            self._spawn(sh.run, f"shard-{i}")
        self.coordinator = self.shard_daemons[0]
        return self.coordinator

    def wait_rounds(self, timeout: float = 120.0) -> None:
        """Until the leader closed the last round, every shard finished, and every device
        reported its final evaluation to its shard."""
        self.wait(lambda: self.leader is not None and self.leader.finished, timeout,
                  f"{self.rounds} leader rounds")
        self.wait(lambda: all(s.finished for s in self.shard_daemons), timeout, "shards finished")

        def evals_in() -> bool:
            got = {r["device"] for s in self.shard_daemons for r in s.store.evals("personal")
                   if r["round"] == self.rounds}
            want = {d for d, a in self.agents.items() if self.rounds in a.rounds_done}
            return want <= got
        self.wait(evals_in, timeout, "final evaluations")

    def stop(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        for sh in self.shard_daemons:
            sh.stop()
        super().stop()
