"""FedCoE on Flower (docs/engines.md, "Flower"): the Flower strategy drives a registered fedcoe
strategy over Flower messages and gives the simulator's per-round global state.

The fast tests run the real ServerApp main and ClientApp through :class:`LoopbackGrid`:
a Flower Grid that delivers each message to the ClientApp in this process through Flower's own
protobuf encoding both ways (what a SuperLink carries), so a run is checked against the
simulator in seconds, without starting Ray. tests/test_flower_engines.py runs ``flwr run`` of
examples/flower_app on the Simulation Engine and the Deployment Engine (slow).
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, MessageType, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common.serde import message_from_proto, message_to_proto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

import fedcoe_edge.simulation as simulation  # noqa: E402
from fedcoe_edge.errors import ConfigError  # noqa: E402
from fedcoe_edge.flower import FLWR_RANGE, client_app, flower_run, require_flwr, run_server  # noqa: E402
from fedcoe_edge.flower.apps import federation_of, state_digest  # noqa: E402
from fedcoe_edge.flower.records import PARAMS, TASK  # noqa: E402
from fedcoe_edge.strategies import FedAvg, register_strategy, unregister_strategy  # noqa: E402
from fedcoe_edge.strategies.base import Arrays, ClientTask, Strategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower_app"
# small and quick: 4 experts, each client holds 2 of them from round 2 on (partial exchange)
KNOBS: dict[str, Any] = {"clients": 4, "new-clients": 0, "num-server-rounds": 3, "seed": 0,
                         "model.expert_hidden": 16, "model.num_global_experts": 4, "model.top_k": 2,
                         "train.local_epochs": 1, "train.experts_per_client": 2}


class LoopbackGrid(Grid):
    """Nodes ``1..n`` with ``partition-id`` ``0..n-1``; ``drop(node, msg)`` may return True
    to lose a message on the way (a node that never answers)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any],
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        self.app = client_app
        # who this process is, as a ServerApp process learns it from its SuperLink
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.drop = drop
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for n in range(1, num_nodes + 1)}
        self.replies: dict[str, Message] = {}
        self.bytes_down = self.bytes_up = 0
        self.delivered: list[Message] = []  # every message a node received, as it received it

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_created_at"] = time.time()
            wire = message_to_proto(msg).SerializeToString()
            self.bytes_down += len(wire)
            node = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(node, msg):
                ids.append(msg.metadata.message_id)
                continue
            received = message_from_proto(type(message_to_proto(msg)).FromString(wire))
            self.delivered.append(received)
            try:
                reply = self.app(received, self.contexts[node])
            except Exception as exc:  # what a SuperNode turns an exception into
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            back = message_to_proto(reply).SerializeToString()
            self.bytes_up += len(back)
            self.replies[msg.metadata.message_id] = message_from_proto(type(message_to_proto(reply)).FromString(back))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def flower_states(run_config: dict[str, Any], grid: LoopbackGrid | None = None) -> tuple[list[Arrays], Any]:
    """Per-round global states (copies) and the Result of the ServerApp main on a loopback grid."""
    grid = grid or LoopbackGrid(client_app(), int(run_config["clients"]), run_config)
    states: list[Arrays] = []
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    result = run_server(grid, ctx, lambda rnd, s: states.append({k: v.copy() for k, v in s.global_state.items()}))
    return states, result


def simulated_states(run_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[list[Arrays], Any]:
    """Per-round global states of ``fedcoe_edge.simulation.run_one`` (what ``fedcoe simulate``
    runs) for the same run config: the strategy it builds is caught on its way in."""
    run = flower_run(run_config)
    fed = federation_of(run)
    built: list[Strategy] = []
    real = simulation.make_strategy

    def catch(*args: Any, **kw: Any) -> Strategy:
        built.append(real(*args, **kw))
        return built[-1]

    monkeypatch.setattr(simulation, "make_strategy", catch)
    states: list[Arrays] = []
    res = simulation.run_one(run.algorithm, fed, run.sim, run.seed,
                             on_round=lambda rnd, p: states.append({k: v.copy() for k, v in built[0].global_state.items()}))
    return states, res


def assert_same_states(a: list[Arrays], b: list[Arrays]) -> None:
    assert len(a) == len(b) > 0
    for rnd, (x, y) in enumerate(zip(a, b, strict=True), start=1):
        assert set(x) == set(y), rnd
        for name in x:
            np.testing.assert_allclose(x[name], y[name], rtol=1e-5, atol=1e-6, err_msg=f"round {rnd} {name}")


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
def test_every_round_equals_the_simulator(algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {**KNOBS, "algorithm": algorithm}
    if algorithm == "fedavg":
        cfg["num-server-rounds"] = 2
    flower, result = flower_states(cfg)
    sim, run = simulated_states(cfg, monkeypatch)
    assert_same_states(flower, sim)
    # the server-side score of each round is the simulator's global_acc
    got = [result.evaluate_metrics_serverapp[p["round"]]["global_acc"] for p in run.curve]
    assert got == pytest.approx([p["global_acc"] for p in run.curve])


def test_each_client_gets_and_returns_only_its_experts() -> None:
    """Round 1 is a full exchange; from round 2 a task names 2 of the 4 experts and its
    ArrayRecord holds exactly those experts' tensors beside the gate and shared expert."""
    grid = LoopbackGrid(client_app(), 4, KNOBS)
    flower_states(KNOBS, grid)
    tasks = [m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN]
    assert len(tasks) == 4 * 3
    for msg in tasks:
        names = set(msg.content.array_records[PARAMS])
        ids = list(msg.content.config_records[TASK]["expert-ids"])  # type: ignore[arg-type]
        held = {int(n.split(".")[2]) for n in names if n.startswith("global.experts.")}
        assert held == set(ids)
        assert any(n.startswith("global.gate.") for n in names)
        rnd = int(msg.metadata.group_id)
        assert len(ids) == (4 if rnd == 1 else 2), (rnd, ids)


def test_a_node_that_never_answers_is_a_failure_and_the_round_goes_on() -> None:
    lost = LoopbackGrid(client_app(), 4, KNOBS,
                        drop=lambda node, msg: node == 2 and msg.metadata.group_id == "2")
    _, result = flower_states(KNOBS, lost)
    metrics = result.train_metrics_clientapp
    assert [(m["clients"], m["failures"]) for m in metrics.values()] == [(4, 0), (3, 1), (4, 0)]


class Unsendable(FedAvg):
    """A strategy whose task config is a dict: Flower's ConfigRecord holds scalars only."""

    name = "unsendable"

    def configure_round(self, rnd: int, client_ids: Any) -> list[ClientTask]:
        tasks = super().configure_round(rnd, client_ids)
        for t in tasks:
            t.config["schedule"] = {"lr": 0.1}
        return tasks


@pytest.fixture
def unsendable() -> Iterator[str]:
    register_strategy("unsendable", Unsendable)
    yield "unsendable"
    unregister_strategy("unsendable")


def test_a_strategy_flower_cannot_carry_starts_nothing(unsendable: str) -> None:
    cfg = {**KNOBS, "algorithm": unsendable}
    grid = LoopbackGrid(client_app(), 4, cfg)
    with pytest.raises(ConfigError, match=r"strategy 'unsendable': task config 'schedule' holds dict") as err:
        flower_states(cfg, grid)
    assert "\n" not in str(err.value)
    assert grid.delivered == []


def test_flower_outside_the_tested_range_is_one_line() -> None:
    require_flwr("1.42.0")
    for version in ("1.41.2", "1.43.0", "2.0.0", "nightly"):
        with pytest.raises(ConfigError, match=rf"flwr {version} is outside the tested range flwr{FLWR_RANGE}"):
            require_flwr(version)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("clinets", 4, "unknown run config key 'clinets'"),
    ("clients", "4", "run config 'clients': expected int"),
    ("clients", True, "run config 'clients': expected int"),
    ("algorithm", "fedavgg", "unknown algorithm"),
    ("train.lrr", 0.1, "unknown train option"),
    ("round-timeout", 0, "round-timeout and node-timeout must be > 0"),
    ("out-dir", str(ROOT / "pyproject.toml"), "out-dir .*pyproject.toml exists and is not a folder"),
])
def test_bad_run_config_is_one_line(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        flower_run({**KNOBS, key: value})
    assert "\n" not in str(err.value)


def test_a_node_outside_the_federation_is_left_out_and_named() -> None:
    """Node 4 says partition-id 7 (of 4): it is left out, and when client 3 has no node by
    node-timeout the run stops before round 1, naming both."""
    cfg = {**KNOBS, "node-timeout": 0.5}
    grid = LoopbackGrid(client_app(), 4, cfg)
    grid.contexts[4].node_config["partition-id"] = 7
    with pytest.raises(ConfigError, match=r"no SuperNode answered for client\(s\) 3 within node-timeout "
                                          r"0.5 s \(3 of 4 connected; left out: SuperNode 4: refused to "
                                          r"join: .*partition-id 7 is not a client") as err:
        flower_states(cfg, grid)
    assert "\n" not in str(err.value)
    assert not [m for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN]


def test_a_node_claiming_a_taken_client_is_left_out() -> None:
    """Nodes 1..5, node 5 also says partition-id 0: the run goes on with nodes 1..4."""
    cfg = {**KNOBS, "num-server-rounds": 1}
    grid = LoopbackGrid(client_app(), 5, cfg)
    for n in range(1, 6):
        grid.contexts[n].node_config["num-partitions"] = 4
    grid.contexts[5].node_config["partition-id"] = 0
    states, _ = flower_states(cfg, grid)
    assert len(states) == 1
    trained = {m.metadata.dst_node_id for m in grid.delivered if m.metadata.message_type == MessageType.TRAIN}
    assert trained == {1, 2, 3, 4}


def test_state_digest_names_every_byte() -> None:
    a = {"w": np.zeros(3, np.float32)}
    assert state_digest(a) == state_digest({"w": np.zeros(3, np.float32)})
    assert state_digest(a) != state_digest({"w": np.array([0, 0, 1e-30], np.float32)})
    assert state_digest(a) != state_digest({"v": np.zeros(3, np.float32)})


def test_extras_keep_flower_off_the_base_runtime_and_train_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in reqs}

    for profile in (project["dependencies"], extras["runtime"], extras["train"]):
        assert not names(profile) & {"flwr", "ray"}
    assert any(r.startswith(f"flwr[simulation]{FLWR_RANGE}") for r in extras["flower"])


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m fedcoe_edge.flower check`` as docs/engines.md prints it, in the example."""
    return subprocess.run([sys.executable, "-m", "fedcoe_edge.flower", "check", *args], cwd=EXAMPLE,
                          capture_output=True, text=True, timeout=300)


def test_check_passes_the_example_as_it_ships() -> None:
    proc = run_check()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok: fedcoe on flwr 1.42") and "4 clients" in proc.stdout


def test_check_bad_run_config_is_one_line_exit_2() -> None:
    proc = run_check(".", "--run-config", "clients=x")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --run-config 'clients=x': The provided configuration string "
                                  "is in an invalid format") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("overrides", "message"), [
    ("algorithm='fedcoee'", "unknown algorithm(s) fedcoee"),
    ("clinets=4", "unknown run config key 'clinets'"),
])
def test_check_names_the_bad_key(overrides: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcoe_edge.flower.__main__ import main

    assert main(["check", str(EXAMPLE), "--run-config", overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_check_refuses_a_strategy_flower_cannot_carry(unsendable: str, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcoe_edge.flower.__main__ import main

    monkeypatch.chdir(EXAMPLE)
    assert main(["check", "--run-config", f"algorithm='{unsendable}'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: strategy 'unsendable': task config 'schedule' holds dict") and err.count("\n") == 1


def test_check_refuses_flower_outside_the_tested_range(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from fedcoe_edge.flower.__main__ import main

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.44.0" if name == "flwr" else real(name))
    assert main(["check", str(EXAMPLE)]) == 2
    assert capsys.readouterr().err == f"error: flwr 1.44.0 is outside the tested range flwr{FLWR_RANGE}: pip install 'fedcoe-edge[flower]'\n"
