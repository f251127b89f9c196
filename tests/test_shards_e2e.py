"""A leader and shard aggregators end to end, with the real daemons and device agents:

* in memory: 1 shard and 3 shards reach the single streaming coordinator's global state for
  the same seed (up to float rounding);
* in memory: a shard whose partial never comes makes its devices failures of the round, the
  round closes with the other shard's updates, and forged partials are refused with a line
  naming shard, round and reason;
* over a real Mosquitto configured by ``fedcoe init --shards 2``: the leader and two shards as
  separate ``fedcoe coordinator`` processes on the configs it wrote (each its own broker login),
  four device agents, two rounds; every device ends holding the final version.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.harness import DEMO_SECRET, EmbeddedFederation, ShardedFederation, small
from device_agent.daemon import DeviceAgent
from fedcoe_edge.checkpoint import load_arrays_file
from fedcoe_edge.sharding import PARTIAL, LeaderTopics, shard_federation, shard_key, shard_of
from fedcoe_edge.transport import MemoryBroker
from fedcoe_edge.wire import Envelope, encode_envelope

pytestmark = pytest.mark.integration


def memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def test_one_and_three_shards_match_the_single_coordinator(tmp_path: Path) -> None:
    kw: dict[str, Any] = {"devices": 6, "rounds": 2, "aggregation": "stream"}
    single = EmbeddedFederation(tmp_path / "single", memory_factory(), **kw, **small()).final_state()
    states = {}
    for shards in (1, 3):
        fed = ShardedFederation(tmp_path / f"s{shards}", memory_factory(), shards=shards, **kw, **small())
        fed.start()
        try:
            fed.wait_rounds(180)
            assert fed.leader is not None
            assert [r["accepted"] for r in fed.leader.rounds_log] == [6, 6]
            assert [r["shards_merged"] for r in fed.leader.rounds_log] == [shards, shards]
            states[shards] = dict(fed.leader.strategy.global_state)
            # every shard holds the leader's final version
            for sh in fed.shard_daemons:
                assert sh.strategy.version == 2
                for name, value in states[shards].items():
                    np.testing.assert_array_equal(sh.strategy.global_state[name], value)
            if shards == 3:  # a new device starts cold at its shard, from the final version
                own = shard_of("new0", 3)
                fed.device_overrides["new0"] = {"federation": shard_federation(fed.federation, own, 3)}
                cold = fed.add_agent("new0", "new0", role="cold")
                fed.wait(cold.cold_ready.is_set, 60, "cold start")
                server = fed.shard_daemons[own]

                def cold_eval(server: Any = server) -> bool:
                    return bool(server.store.evals("cold"))
                fed.wait(cold_eval, 30, "cold eval")
                assert cold.held
                for name, value in cold.held.items():
                    np.testing.assert_array_equal(value, states[3][name], err_msg=name)
        finally:
            fed.stop()
    assert len({shard_of(str(i), 3) for i in range(6)}) == 3  # three shards really served
    for shards, state in states.items():
        for name, value in single.items():
            np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{shards} shard(s): {name}")


def _forged_partial(topics: LeaderTopics, shard: str, key: bytes, rnd: int) -> bytes:
    env = Envelope.new(PARTIAL, federation=topics.federation, sender=shard, recipient="leader",
                       round=rnd, body={"meta": {}, "failures": {}, "manifest": {}}, ttl_s=600)
    return encode_envelope(env, key)


# slow: the leader waits out the round's 30 s deadline for the silent shard by design;
# `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_a_missing_shard_makes_failures_and_forged_partials_are_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fedcoe.leader")
    broker = MemoryBroker()
    factory = lambda cid, will, birth: broker.client(cid, will=will, birth=birth)  # noqa: E731
    fed = ShardedFederation(tmp_path, factory, devices=4, rounds=1, shards=2, deadline_s=30.0, **small())
    fed.start_coordinator()
    assert fed.leader is not None
    fed.leader.close_grace_s = 0.5
    silent = fed.shard_daemons[1]
    sent = threading.Event()

    def swallow(rnd: int, partial: Any, failures: Any) -> None:
        sent.set()  # shard 1 closes its round but its partial never reaches the leader
    silent._send_partial = swallow  # type: ignore[method-assign]
    for i in range(4):
        dev = str(i)
        fed.device_overrides[dev] = {"federation": shard_federation(fed.federation, shard_of(dev, 2), 2)}
        fed.add_agent(dev, dev)
    # a device given the wrong shard's federation id: refused by that shard, with the right one
    assert shard_of("x", 2) == 0
    fed.device_overrides["x"] = {"federation": shard_federation(fed.federation, 1, 2)}
    fed.add_agent("x", "0")
    try:
        fed.wait(lambda: sent.is_set(), 120, "shard 1's close")
        # forged: shard-0's name with a wrong key, and a shard that does not exist
        topics = LeaderTopics(fed.federation)
        intruder = factory("intruder", None, None)
        intruder.connect()
        intruder.publish(topics.up_ctl("shard-0"), _forged_partial(topics, "shard-0", b"k" * 32, 1), qos=1)
        intruder.publish(topics.up_ctl("shard-7"),
                         _forged_partial(topics, "shard-7", shard_key(DEMO_SECRET, "shard-7"), 1), qos=1)
        fed.wait_rounds(120)
        log = fed.leader.rounds_log
        own1 = [str(i) for i in range(4) if shard_of(str(i), 2) == 1]
        assert log[0]["shards_merged"] == 1 and log[0]["accepted"] == 4 - len(own1)
        assert log[0]["failed"] == len(own1) and log[0]["applied"]
        events = fed.leader.store.events(1)
        fails = {e["device"]: e["reason"] for e in events if e["kind"] == "failure"}
        assert set(fails) == set(own1) and all("no partial from shard-1" in r for r in fails.values())
        refused = {(e["device"], e["reason"].split(":")[0]) for e in events if e["kind"] == "rejected"}
        assert ("shard-1", "no valid partial by the deadline; its devices count as failures") in refused
        assert any(d == "shard-0" and r == "envelope" for d, r in refused), refused
        assert any(d == "shard-7" and r == "envelope" for d, r in refused), refused
        assert fed.leader.store.round_summary(1)["rejected"] >= 3  # counted like device refusals
        wrong = [e for e in silent.store.events() if e["device"] == "x"]
        assert wrong and f"device belongs to shard 0: set its federation id to {fed.federation}.s0of2" in wrong[0]["reason"]
        assert "x" not in fed.shard_daemons[0].online and "x" not in silent.online
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected shard=")]
        assert any(m.startswith("rejected shard=shard-0 round=1 reason=envelope") for m in lines), lines
        assert any(m.startswith("rejected shard=shard-7 round=1 reason=envelope") for m in lines), lines
    finally:
        fed.stop()


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_leader_and_two_shard_processes_over_mosquitto(tmp_path: Path, init_broker_tools: None,
                                                        digits_npz: Any) -> None:
    """The files ``fedcoe init --shards 2`` writes, as they are: its broker (passwords, ACL,
    client id = username), the leader and both shards as ``fedcoe coordinator`` processes on
    their own configs (each its own broker login), four device agents on their own
    ``agent.toml`` (federation id = their shard's, checked against ``fedcoe shard-of``)."""
    from device_agent.config import load_config as load_agent
    from fedcoe_edge.broker import MosquittoBroker, _free_port
    port = _free_port("127.0.0.1")
    out = tmp_path / "fed"
    names = [str(i) for i in range(4)]
    cmd = [sys.executable, "-m", "fedcoe_edge.cli"]
    subprocess.run([*cmd, "init", str(out), "--names", ",".join(names), "--shards", "2",
                    "--rounds", "2", "--host", "127.0.0.1", "--port", str(port), "--data", "local.npz"],
                   check=True, capture_output=True)
    cdir = out / "coordinator"
    env = {**os.environ, "FEDCOE_FEDERATION_EXIT_WHEN_DONE": "true",
           "FEDCOE_MODEL_EXPERT_HIDDEN": "16", "FEDCOE_TRAIN_LOCAL_EPOCHS": "1"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("leader", "shard0", "shard1")}
    agents: list[DeviceAgent] = []
    broker = MosquittoBroker.from_config_file(out / "broker" / "mosquitto.conf", port,
                                              workdir=tmp_path / "mq")
    broker.start()
    try:
        procs["leader"] = subprocess.Popen([*cmd, "coordinator", "--config", str(cdir / "leader.toml"),
                                            "--role", "leader"], stdout=logs["leader"],
                                           stderr=subprocess.STDOUT, env=env)
        for i in (0, 1):
            procs[f"shard{i}"] = subprocess.Popen(
                [*cmd, "coordinator", "--config", str(cdir / f"shard-{i}.toml"), "--role", "shard",
                 "--shard-index", str(i)], stdout=logs[f"shard{i}"], stderr=subprocess.STDOUT, env=env)
        for dev in names:
            got = subprocess.run([*cmd, "shard-of", dev, "--config", str(cdir / "leader.toml")], check=True,
                                 capture_output=True, text=True).stdout.split()
            assert got[0] == dev and int(got[1]) == shard_of(dev, 2)
            folder = out / "devices" / dev
            digits_npz(folder / "local.npz", int(dev), len(names))
            acfg = load_agent(folder / "agent.toml", {"FEDCOE_DEVICE_BUNDLE": "off",
                                                      "FEDCOE_DEVICE_HEARTBEAT_S": "0"})
            assert acfg.device.federation == got[2]  # init wrote the shard's federation id
            agents.append(DeviceAgent(acfg))
            agents[-1].start()
        for name, p in procs.items():
            assert p.wait(timeout=240) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        for a in agents:
            a.close()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs.values():
            f.close()
        broker_log = broker.log_path.read_text() if broker.log_path.is_file() else ""
        broker.close()
    rounds = json.loads((cdir / "state" / "leader" / "rounds.json").read_text())
    assert [(r["round"], r["accepted"], r["failed"], r["shards_merged"]) for r in rounds] == \
        [(1, 4, 0, 2), (2, 4, 0, 2)]
    final = load_arrays_file(cdir / "state" / "leader" / "checkpoint" / "global.safetensors")
    for a in agents:  # every device holds the final version's values of what it holds
        assert 2 in a.rounds_done and a.held, a.dev
        for name, value in a.held.items():
            np.testing.assert_array_equal(value, final[name], err_msg=f"{a.dev}: {name}")
    text = (tmp_path / "leader.log").read_text()
    assert "round 2 closed: merged 2 of 2 shard partial(s)" in text
    assert "already connected" not in broker_log, broker_log[-2000:]  # nobody took over a session
