"""Coordinator daemon: config + env overrides, the SQLite round log, equivalence with the
in-process simulator, deadline failures, and resume after a crash mid-round.

The daemons are the real ones; the transport is the in-memory broker (the MQTT broker is
exercised in test_federation_mqtt.py).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import load_config
from coordinator.daemon import Coordinator
from coordinator.harness import EmbeddedFederation, small
from coordinator.store import Store
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.messages import Eval, Fetch
from fedcoe_edge.protocol import TransportFactory
from fedcoe_edge.registry import RegistryError
from fedcoe_edge.simulation import SimulationConfig, run_one
from fedcoe_edge.transport import MemoryBroker, Transport, Will

SECRET = "00112233445566778899aabbccddeeff"


def memory_factory() -> tuple[MemoryBroker, TransportFactory]:
    broker = MemoryBroker()

    def make(cid: str, will: Will | None, birth: Will | None) -> Transport:
        return broker.client(cid, will=will, birth=birth)
    return broker, make


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- configuration ----------------------------------------------------------------------
def test_config_file_env_overrides_and_relative_paths(tmp_path: Path) -> None:
    cfg_path = write(tmp_path / "coordinator.toml", f"""
[federation]
id = "fleet"
rounds = 4
min_devices = 3
quorum = 2
state_dir = "st"
[broker]
port = 1884
[security]
secret = "{SECRET}"
[model]
num_global_experts = 6
[train]
experts_per_client = 3
""")
    env = {"FEDCOE_BROKER_PORT": "2883", "FEDCOE_FEDERATION_DEADLINE_S": "7.5",
           "FEDCOE_FEDERATION_EXIT_WHEN_DONE": "yes", "FEDCOE_UNRELATED": "x"}
    cfg = load_config(cfg_path, env)
    assert cfg.federation.id == "fleet" and cfg.federation.rounds == 4
    assert cfg.broker.port == 2883 and cfg.federation.deadline_s == 7.5
    assert cfg.federation.exit_when_done is True
    assert cfg.state_dir == tmp_path / "st"
    assert cfg.model.num_global_experts == 6 and cfg.train.experts_per_client == 3
    assert cfg.secret == bytes.fromhex(SECRET)


@pytest.mark.parametrize(("text", "env", "match"), [
    ("[federation]\nrounds = 0\n", {}, r"\[federation\] rounds must be >= 1"),
    ("[federation]\nquorum = 5\nmin_devices = 2\n", {}, "quorum 5 exceeds min_devices 2"),
    ("[federation]\nalgorithm = 'nope'\n", {}, "algorithm 'nope' unknown"),
    ("[federation]\ncolour = 1\n", {}, r"unknown option\(s\) in \[federation\]: colour"),
    ("[fedration]\n", {}, r"unknown section\(s\) fedration"),
    ("", {"FEDCOE_BROKER_PORT": "abc"}, "FEDCOE_BROKER_PORT: expected an integer"),
    ("", {"FEDCOE_BROKER_PORT": "70000"}, r"\[broker\].port must be in 1..65535"),
    ("[model]\ntop_k = 9\n", {}, "model.top_k"),
    ("[federation]\nchunk_size = 1023\n", {}, r"\[federation\] chunk_size must be in 1 KiB..16 MiB, got 1023"),
    ("", {"FEDCOE_FEDERATION_CHUNK_SIZE": str(16 * 1024 * 1024 + 1)}, "got 16777217"),
])
def test_bad_config_names_what_and_where(tmp_path: Path, text: str, env: dict[str, str], match: str) -> None:
    path = write(tmp_path / "c.toml", text + f"\n[security]\nsecret = \"{SECRET}\"\n")
    with pytest.raises(ConfigError, match=match):
        load_config(path, env)


def test_missing_secret_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="secret: missing"):
        load_config(write(tmp_path / "a.toml", "[federation]\nid = 'x'\n"), {})
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path / "b.toml", "[federation\n"), {})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml", {})
    cfg = load_config(write(tmp_path / "c.toml", "[federation]\nid = 'x'\n"),
                      {"FEDCOE_SECURITY_SECRET": SECRET})
    assert cfg.secret == bytes.fromhex(SECRET)


def test_a_model_that_cannot_be_built_leaves_no_state_folder(tmp_path: Path) -> None:
    """The import path resolves (config validation passes) but the factory builds no module:
    the coordinator refuses before it creates its state folder or database."""
    cfg = load_config(write(tmp_path / "c.toml", f"""
[federation]
state_dir = "st"
[security]
secret = "{SECRET}"
[model]
trunk = "json:dumps"
"""), {})
    _, factory = memory_factory()
    with pytest.raises(RegistryError, match="returned a str, not a torch.nn.Module"):
        Coordinator(cfg, factory)
    assert not (tmp_path / "st").exists()


# --- the daemon over the in-memory transport ------------------------------------------
def test_daemons_reproduce_the_simulator_exactly(tmp_path: Path) -> None:
    """Same strategy code path: uncompressed uploads make the deployed federation equal the
    in-process simulator, round by round, to the last bit of accuracy."""
    _, factory = memory_factory()
    # batch aggregation: every update kept and folded as the simulator does, bit for bit
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=3, compress=False,
                             aggregation="batch", **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        store = fed.coordinator.store  # type: ignore[union-attr]
        rows = [store.round_summary(r) for r in range(1, 4)]
        final_state = dict(fed.coordinator.strategy.global_state)  # type: ignore[union-attr]
        uploads = {d: a.last_result for d, a in fed.agents.items()}
    finally:
        fed.stop()
    sim_fed = make_federation("digits", "dirichlet", 3, 1, 0, 0.5, 20)
    cfg = SimulationConfig(clients=3, new_clients=1, rounds=3, model=ModelConfig(expert_hidden=16),
                           train=TrainConfig(local_epochs=1))
    run = run_one("fedcoe", sim_fed, cfg, 0)
    assert [r["global_acc"] for r in rows] == [p["global_acc"] for p in run.curve]
    assert [r["personalized_acc"] for r in rows] == [p["personalized_acc"] for p in run.curve]
    for name, value in run.strategy.global_state.items():
        np.testing.assert_array_equal(final_state[name], value, err_msg=name)
    # the private level never travels: uploads hold global names only
    for _dev, (_rnd, result, _base) in uploads.items():  # type: ignore[misc]
        assert result.params and all(n.startswith("global.") for n in result.params)
    assert all(r["accepted"] == 3 and r["failed"] == 0 and r["rejected"] == 0 for r in rows)


def test_partial_exchange_and_compression_cut_bytes(tmp_path: Path) -> None:
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=3, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        store = fed.coordinator.store  # type: ignore[union-attr]
        rows = [store.round_summary(r) for r in range(1, 4)]
        experts = [fed.agents[d].held_ids for d in sorted(fed.agents)]
    finally:
        fed.stop()
    m = TrainConfig().experts_per_client
    assert all(len(e) == m for e in experts)  # after round 1 each device holds its top-m only
    for r in rows[1:]:
        assert r["bytes_down"] < 0.75 * r["bytes_full"]  # gate + m of K experts
        assert r["bytes_up"] < 0.3 * r["bytes_full"]  # ... and int8 deltas on the way up


def test_silent_device_is_a_failure_at_the_deadline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device that never uploads does not hang the round: at the deadline it is a Failure
    handed to the strategy, counted in the round log; the other updates are aggregated."""
    _, factory = memory_factory()
    hooks = {"2": AgentHooks(before_upload=lambda agent, rnd: False)}
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=1, deadline_s=10.0, hooks=hooks, **small())
    fed.start()
    try:
        fed.wait(lambda: fed.coordinator.finished, 60, "round 1")  # type: ignore[union-attr]
        store = fed.coordinator.store  # type: ignore[union-attr]
        s = store.round_summary(1)
        failures = store.events(1, "failure")
        version = fed.coordinator.strategy.version  # type: ignore[union-attr]
    finally:
        fed.stop()
    assert s["accepted"] == 2 and s["failed"] == 1 and s["applied"]
    assert [(f["device"], f["reason"]) for f in failures] == [("2", "deadline passed with no accepted update")]
    assert version == 1
    assert "failure device=2 round=1 reason=deadline passed" in caplog.text
    log = json.loads((tmp_path / "coordinator" / "rounds" / "1" / "round.json").read_text())
    assert (log["accepted"], log["failed"], log["state"]) == (2, 1, "closed")


def test_quorum_not_met_keeps_the_global_state(tmp_path: Path) -> None:
    _, factory = memory_factory()
    def poison(rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = sorted(params)[0]
        params[name] = np.full_like(params[name], np.inf)
        return params

    def blow_up(rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = sorted(params)[0]
        params[name] = params[name] + np.float32(1e6)
        return params

    # two of three updates are refused (non-finite; change over the norm bound), so the
    # round closes with 1 accepted < quorum 2
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=1, quorum=2, compress=False,
                             hooks={"1": AgentHooks(tamper=poison), "2": AgentHooks(tamper=blow_up)}, **small())
    fed.start()
    try:
        fed.wait(lambda: fed.coordinator.finished, 60, "round 1")  # type: ignore[union-attr]
        r = fed.coordinator.store.round(1)  # type: ignore[union-attr]
        version = fed.coordinator.strategy.version  # type: ignore[union-attr]
        reasons = {e["device"]: e["reason"] for e in fed.coordinator.store.events(1, "rejected")}  # type: ignore[union-attr]
    finally:
        fed.stop()
    assert r is not None and r["applied"] == 0 and "quorum not met (1 < 2)" in r["note"]
    assert "non-finite value" in reasons["1"]
    assert reasons["2"].startswith("update delta: L2 norm") and "exceeds bound 1e+04" in reasons["2"]
    assert version == 0


@pytest.mark.parametrize("aggregation", ["batch", "stream"])
def test_resume_after_crash_mid_round_matches_an_uninterrupted_run(tmp_path: Path,
                                                                    aggregation: str) -> None:
    """Kill the coordinator while round 2 is open with 2 of 3 updates persisted; a new
    coordinator on the same state folder reloads the tasks and accepted updates (streamed:
    the durable partial sums), the third device re-sends its update, and the result equals
    a run that never crashed (streamed: up to float rounding)."""
    _, factory = memory_factory()
    want = EmbeddedFederation(tmp_path / "ref", factory, devices=3, rounds=3, aggregation=aggregation, **small()).final_state(90)

    _, factory2 = memory_factory()
    held = threading.Event()

    def hold_round2(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 2 and not held.is_set():
            held.set()
            return False  # trained, but the upload is held back until the coordinator restarts
        return True

    fed = EmbeddedFederation(tmp_path / "crash", factory2, devices=3, rounds=3,
                             hooks={"1": AgentHooks(before_upload=hold_round2)},
                             aggregation=aggregation, **small())
    fed.start()
    try:
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: c.round == 2 and len(c.results) == 2 and held.is_set(), 60, "round 2 half done")
        c.stop()  # the run loop exits without closing the round: the database says "open"
        for t in fed.threads:
            t.join(timeout=10)
        db = Store(tmp_path / "crash" / "coordinator" / "coordinator.sqlite")
        assert db.last_round()["state"] == "open" and len(db.updates(2)) == 2  # type: ignore[index]
        db.close()
        fed.threads.clear()
        fed.coordinator = None
        coordinator = fed.start_coordinator()
        fed.wait_rounds(90)
        got = dict(coordinator.strategy.global_state)
        rows = [coordinator.store.round_summary(r) for r in (1, 2, 3)]
    finally:
        fed.stop()
    assert [r["accepted"] for r in rows] == [3, 3, 3]
    for name, value in want.items():
        if aggregation == "batch":
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    if aggregation == "stream":  # the round was resumed from a partial-sum snapshot
        snaps = list((tmp_path / "crash" / "coordinator" / "rounds" / "2").glob("acc-*.safetensors"))
        assert len(snaps) == 1 and not list(snaps[0].parent.glob("update_*"))


def test_store_round_log_roundtrip(tmp_path: Path) -> None:
    s = Store(tmp_path / "db.sqlite")
    s.register("pi", "train", {"tier": "small", "memory_mb": 512.0, "num_samples": 10, "label_hist": [1, 2]})
    s.open_round(1, ["pi"], {"pi": [0, 2]}, 0.0, 0, 1000)
    s.add_traffic(1, "pi", "down", "train", 600)
    s.add_traffic(1, "pi", "up", "train", 100)
    s.add_event(1, "pi", "rejected", "bad HMAC")
    s.add_eval(1, "pi", "personal", 8, 10)
    s.close_round(1, 1, True, "ok")
    row = s.round_summary(1)
    assert (row["bytes_down"], row["bytes_up"], row["bytes_full"], row["rejected"]) == (600, 100, 1000, 1)
    assert row["personalized_acc"] == 0.8 and row["state"] == "closed"
    assert s.devices()[0]["label_hist"] == "[1, 2]"
    s.close()
    ro = Store(tmp_path / "db.sqlite", readonly=True)
    assert ro.round(1)["note"] == "ok"  # type: ignore[index]
    ro.close()


def test_deploy_example_config_parses() -> None:
    path = Path(__file__).resolve().parents[1] / "deploy" / "coordinator.toml"
    cfg = load_config(path, {"FEDCOE_SECURITY_SECRET_FILE": "", "FEDCOE_SECURITY_SECRET": SECRET})
    assert cfg.federation.id == "fleet1" and cfg.broker.tls and cfg.federation.quorum == 3


def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedcoe_edge.cli import main

    assert main(["coordinator", "--config", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedcoe coordinator: error: config file not found: {tmp_path / 'missing.toml'}"]
    (tmp_path / "agent.toml").write_text("[device]\nid = 'x'\n")
    assert main(["agent", "--config", str(tmp_path / "agent.toml")]) == 2
    assert "needs key, key_file, secret or secret_file" in capsys.readouterr().err


def _snapshot_clients(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return json.loads((f.metadata() or {}).get("clients", "[]"))
    except (OSError, ValueError, Exception):  # replaced meanwhile by a newer snapshot
        return []


@pytest.mark.parametrize("aggregation", ["batch", "stream"])
def test_an_update_is_durable_before_its_accept(tmp_path: Path, aggregation: str) -> None:
    """Persistence runs in batches on its own thread, yet every `accept` a device receives
    names an update whose row is already committed (read from a second connection) and
    whose weights (update file or partial-sum snapshot) are on disk."""
    broker, factory = memory_factory()
    seen: list[tuple[str, int, bool]] = []
    db_path = tmp_path / "coordinator" / "coordinator.sqlite"

    def spy(msg: object) -> None:
        env = json.loads(msg.payload)  # type: ignore[attr-defined]
        if env["type"] != "accept":
            return
        dev = msg.topic.split("/")[4]  # type: ignore[attr-defined]
        ro = Store(db_path, readonly=True)
        try:
            rows = {u["device"]: u for u in ro.updates(env["round"])}
        finally:
            ro.close()
        ok = dev in rows and (aggregation == "stream" or Path(rows[dev]["path"]).is_file())
        if aggregation == "stream":  # a later batch may have replaced the row's snapshot
            ok = ok and any(dev in _snapshot_clients(p) for p in
                            (db_path.parent / "rounds" / str(env["round"])).glob("acc-*"))
        seen.append((dev, env["round"], ok))

    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, aggregation=aggregation, **small())
    probe = broker.client("probe")
    probe.subscribe(f"fl/v1/{fed.federation}/dn/+/ctl", spy)
    probe.connect()
    fed.start()
    try:
        fed.wait_rounds(90)
        fed.wait(lambda: len(seen) >= 6, 30, "six accepts")
    finally:
        fed.stop()
        probe.close()
    assert sorted((d, r) for d, r, _ in seen) == [(d, r) for d in "012" for r in (1, 2)]
    assert all(ok for _, _, ok in seen), seen


def test_caches_are_pruned_and_a_full_reassembly_budget_defers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Accepted transfer ids of older rounds are forgotten at each close; an upload announced
    while the reassembly budget is full is deferred (its device re-announces), not refused:
    once the budget has room every update is accepted and nothing is rejected.

    The budget is filled deterministically by a real hold of another sender (not by racing
    three devices, which depends on thread scheduling), and that hold is released right
    after the first deferral, as a finished upload would release it."""
    import logging

    from fedcoe_edge.wire.transfer import Admission

    caplog.set_level(logging.DEBUG, logger="fedcoe.coordinator")
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, **small())
    c = fed.start_coordinator()
    budget = c._budget
    budget.total_bytes = 20_000  # one upload (9-14 KB here) at a time
    ghost = ("elsewhere", "xfer")
    assert budget.admit(ghost, "elsewhere", 15_000).admitted  # fresh, so never evicted
    deferred: list[Any] = []
    real_admit = budget.admit

    def admit(key: Any, owner: str, nbytes: int) -> Admission:
        got = real_admit(key, owner, nbytes)
        if not got.admitted and not deferred:
            deferred.append(key)
            budget.release(ghost)  # the other upload finishes: the next announce gets in
        return got

    budget.admit = admit  # type: ignore[method-assign]
    for i in range(3):
        fed.add_agent(str(i), str(i))
    try:
        fed.wait_rounds(120)
        rows = [c.store.round_summary(r) for r in (1, 2)]
        refused = c.store.events(kind="rejected")
        xfers = dict(c._accepted_xfers)
    finally:
        fed.stop()
    assert len(deferred) == 1
    assert any("deferred: reassembly budget" in r.getMessage() for r in caplog.records)
    assert [r["accepted"] for r in rows] == [3, 3]
    assert [r["rejected"] for r in rows] == [0, 0] and refused == []
    assert sorted(xfers.values()) == [2, 2, 2]  # round 1's ids are gone
    assert c._task_xfer == {} and budget.used == 0 and c._uploads == {}


def test_a_batch_that_fails_to_persist_is_not_acknowledged_and_counts_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Streamed: the first partial-sum snapshot cannot be written (a directory sits at its
    path). Nothing is acknowledged, the sums go back to the last durable state, the devices'
    chunks become unknown so they announce their updates again, and once the disk takes
    writes the round ends with every update counted once: the global state of an undisturbed
    run (up to float rounding)."""
    import logging

    caplog.set_level(logging.INFO, logger="fedcoe.coordinator")
    _, f1 = memory_factory()
    want = EmbeddedFederation(tmp_path / "ref", f1, devices=3, rounds=1, aggregation="stream", **small()).final_state(90)

    obstacle = tmp_path / "bad" / "coordinator" / "rounds" / "1" / "acc-000001.safetensors"
    obstacle.mkdir(parents=True)
    _, f2 = memory_factory()
    fed = EmbeddedFederation(tmp_path / "bad", f2, devices=3, rounds=1, aggregation="stream", **small())
    fed.start()
    try:
        fed.wait(lambda: any("none acknowledged" in r.getMessage() for r in caplog.records), 60,
                 "a batch that fails to persist")
        obstacle.rmdir()
        fed.wait_rounds(120)
        c = fed.coordinator
        assert c is not None
        row = c.store.round_summary(1)
        refused = {e["reason"] for e in c.store.events(kind="rejected")}
        got = dict(c.strategy.global_state)
    finally:
        fed.stop()
    assert row["accepted"] == 3 and row["failed"] == 0
    # the only refusals: late chunks of the forgotten transfer, which told the device to re-announce
    assert all("chunk for unknown transfer" in r for r in refused), refused
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@contextlib.contextmanager
def _after_one_round(tmp_path: Path) -> Iterator[tuple[EmbeddedFederation, Coordinator]]:
    """A two-device in-memory federation whose one round is done, and its coordinator, still
    running, for a test to call handlers on directly."""
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=2, rounds=1, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        assert fed.coordinator is not None
        yield fed, fed.coordinator
    finally:
        fed.stop()


def test_a_resent_evaluation_is_answered_but_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A device re-sends an EVAL whose ack was late: it is stored (idempotently) and acked
    again, but the log gets one line per evaluation, not one per copy."""
    import logging

    caplog.set_level(logging.INFO, logger="fedcoe.coordinator")
    with _after_one_round(tmp_path) as (fed, c):
        for _ in range(3):
            c._on_eval("0", 1, Eval("cold", 3, 4))
        c._on_eval("1", 1, Eval("cold", 1, 4))
        fed.wait(lambda: len([e for e in c.store.evals("cold") if e["round"] == 1]) == 2, 30,
                 "the evaluations stored")
    lines = [r.getMessage() for r in caplog.records if "round=1 kind=cold" in r.getMessage()]
    assert len(lines) == 2 and any("device=0" in m for m in lines), lines


def test_a_resent_fetch_reuses_the_download_it_already_started(tmp_path: Path) -> None:
    """A device re-sends a FETCH whose answer was slow: the coordinator announces the download
    already running for it again instead of preparing a second one (at 5,000 devices the
    copies were most of the work)."""
    with _after_one_round(tmp_path) as (_, c):

        def downloads() -> set[str]:
            with c._lock:
                return {x for x, o in c._senders.items() if o.device == "ghost" and o.purpose == "cold"}

        before = downloads()  # "ghost" never answers: its downloads stay open
        c._on_fetch("ghost", 1, Fetch("cold", (0, 1)))
        first = downloads() - before
        c._on_fetch("ghost", 1, Fetch("cold", (0, 1)))
        again = downloads() - before
        c._on_fetch("ghost", 1, Fetch("cold", (2, 3)))  # other experts: new
        other = downloads() - before
    assert len(first) == 1 and again == first
    assert len(other) == 2


def test_the_pump_drives_only_downloads_in_flight(tmp_path: Path) -> None:
    """The pump loop's pass visits ``_pumping``, not every download of the round: after a
    round every confirmed download has left it, one still waiting for its device stays
    (and its announce is repeated), and one dropped from ``_senders`` (as a closing round
    drops its task downloads) leaves it and is never announced again."""
    with _after_one_round(tmp_path) as (fed, c):
        c._on_fetch("ghost", 1, Fetch("cold", (0, 1)))  # never answers: stays announced
        with c._lock:
            ghost = next(x for x, o in c._senders.items() if o.device == "ghost")
            out = c._senders[ghost]
        fed.wait(lambda: set(c._pumping) == {ghost}, 30, "only the ghost's download in the pump")
        fed.wait(lambda: out.announces >= 2, 30, "the ghost's announce repeated")
        with c._lock:
            del c._senders[ghost]
            announces = out.announces
        fed.wait(lambda: not c._pumping, 30, "a dropped download leaves the pump's set")
        assert out.announces == announces


def test_close_stops_the_pump_before_the_store_closes(tmp_path: Path) -> None:
    """A run that ends on its own (``exit_when_done``) closes without :meth:`stop`; the pump,
    which flushes refusals into the store on every pass, must be joined before the store
    closes, or its next pass fails with "Cannot operate on a closed database"."""
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=2, rounds=1, **small())
    c = fed.start_coordinator()
    try:
        fed.wait(lambda: getattr(c, "_pump_thread", None) is not None, 30, "the pump started")
        pump = c._pump_thread
        assert pump.is_alive()
        c.close()  # as run()'s finally does after the last round, with no stop() first
        assert not pump.is_alive()
    finally:
        fed.stop()
