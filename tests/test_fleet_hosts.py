"""benchmarks.fleet_hosts: the generated bridge config and ACL (fast), a real Mosquitto bridge
carrying only the leader channel (fast, loopback), and the namespace topology end to end
(slow, needs root for `ip netns`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import fleet_hosts as fh

ROOT = Path(__file__).resolve().parent.parent


def test_bridge_conf_is_the_deploy_template_for_this_shard() -> None:
    text = fh.bridge_conf(3, "10.231.0.2:1883", "s3cret", fed="edge")
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    keys = dict(x.split(None, 1) for x in lines)
    assert keys["connection"] == "fedcoe-shard-3"
    assert keys["address"] == "10.231.0.2:1883"
    assert keys["remote_password"] == "s3cret"
    assert keys["remote_username"] == keys["remote_clientid"] == fh.bridge_user(3, "edge") \
        == "bridge.edge.shard-3"
    assert keys["cleansession"] == "false" and keys["bridge_protocol_version"] == "mqttv50"
    assert keys["notifications"] == "false"
    # only this shard's side of the leader channel, QoS 1
    assert [x for x in lines if x.startswith("topic ")] == [
        "topic fl/v1/edge/agg/up/shard-3/# out 1", "topic fl/v1/edge/agg/dn/shard-3/# in 1",
        "topic fl/v1/edge/agg/leader/status in 1"]
    # the TLS lines are kept as comments only (the benchmark's LAN is plain MQTT)
    assert not any(x.split()[0].startswith("bridge_ca") for x in lines)
    assert "# (plain LAN run) bridge_cafile" in text
    assert "fleet1" not in text and "shard-0" not in text and "CHANGE-ME" not in text


def test_bridge_acl_grants_exactly_what_the_bridge_topics_use() -> None:
    acl = fh.bridge_acl(1, "edge").splitlines()
    assert acl == ["user bridge.edge.shard-1", "topic write fl/v1/edge/agg/up/shard-1/#",
                   "topic read fl/v1/edge/agg/dn/shard-1/#",
                   "topic read fl/v1/edge/agg/leader/status"]
    grants = {(x.split()[1], x.split()[2]) for x in acl[1:]}
    for line in fh.bridge_topics(1, "edge"):
        _, pattern, direction, qos = line.split()
        assert qos == "1"
        assert ({"out": "write", "in": "read"}[direction], pattern) in grants


def test_a_template_whose_topics_drifted_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bridge.conf"
    bad.write_text(fh.DEPLOY_BRIDGE.read_text().replace("agg/up/shard-0/# out 1", "# out 1"))
    with pytest.raises(RuntimeError, match="not the leader channel"):
        fh.bridge_conf(0, "10.0.0.1:1883", "pw", template=bad)


def test_the_plan_gives_every_host_its_own_address_in_the_subnet() -> None:
    plan = fh.Plan("fch", "10.231.7", 4)
    addrs = plan.hosts()
    assert len(set(addrs.values())) == len(addrs) == 6  # leader, devices, 4 shards
    assert all(a.startswith("10.231.7.") for a in addrs.values())
    assert plan.namespaces()[0] == "fch-lan" and all(n.startswith("fch-") for n in plan.namespaces())


def test_without_root_it_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert fh.main(["--devices", "5", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "root" in err[0] and "ip netns" in err[0]


def test_a_real_bridge_carries_only_this_shards_leader_channel(make_mosquitto: object) -> None:
    """Two loopback Mosquittos, the shard's with the generated bridge section: the shard's
    `agg` messages cross both ways; device traffic and another shard's do not."""
    from benchmarks.mqtt_async import AsyncMqttClient

    leader = make_mosquitto()  # type: ignore[operator]
    bridge = fh.bridge_conf(0, f"127.0.0.1:{leader.port}", "pw", fed="edge").splitlines()
    shard = make_mosquitto(extra_config=bridge)  # type: ignore[operator]
    p = "fl/v1/edge/agg"

    async def go() -> tuple[list[str], list[str]]:
        at_leader: list[str] = []
        at_shard: list[str] = []
        lc = AsyncMqttClient("watch-l", "127.0.0.1", leader.port)
        lc.subscribe("#", lambda m: at_leader.append(m.topic))
        sc = AsyncMqttClient("watch-s", "127.0.0.1", shard.port)
        sc.subscribe("#", lambda m: at_shard.append(m.topic))
        await lc.connect_async()
        await sc.connect_async()
        end = time.monotonic() + 20
        while f"{p}/up/shard-0/ctl" not in at_leader and time.monotonic() < end:
            # the bridge connects on its own time: resend until the marker crosses
            sc.publish("fl/v1/edge.s0of4/up/dev1/ctl", b"device", qos=1)
            sc.publish(f"{p}/up/shard-1/ctl", b"other shard", qos=1)
            sc.publish(f"{p}/up/shard-0/ctl", b"marker", qos=1)
            await asyncio.sleep(0.3)
        end = time.monotonic() + 20
        while f"{p}/dn/shard-0/ctl" not in at_shard and time.monotonic() < end:
            lc.publish(f"{p}/dn/shard-1/ctl", b"other shard", qos=1)
            lc.publish("fl/v1/edge.s0of4/dn/dev1/ctl", b"device", qos=1)
            lc.publish(f"{p}/dn/shard-0/ctl", b"marker", qos=1)
            await asyncio.sleep(0.3)
        lc.close()
        sc.close()
        return at_leader, at_shard

    at_leader, at_shard = asyncio.run(go())
    assert f"{p}/up/shard-0/ctl" in at_leader and f"{p}/dn/shard-0/ctl" in at_shard
    # what was published before each marker on the same bridge and was not carried
    assert "fl/v1/edge.s0of4/up/dev1/ctl" not in at_leader
    assert f"{p}/up/shard-1/ctl" not in at_leader
    assert f"{p}/dn/shard-1/ctl" not in at_shard
    assert "fl/v1/edge.s0of4/dn/dev1/ctl" not in at_shard


# ----------------------------------------------------------------------------- root, slow
def _netns_problem() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for `ip netns` (network namespaces)"
    return fh.root_problem()


def _ours(prefix: str) -> list[str]:
    return fh.namespaces_with(prefix)


def _procs_under(path: Path) -> list[str]:
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(path) in cmd and p.info["pid"] != os.getpid():
            out.append(f"{p.info['pid']}: {cmd[:120]}")
    return out


@pytest.mark.slow
def test_twenty_devices_two_rounds_over_namespaces_then_nothing_left(tmp_path: Path) -> None:
    """The whole topology with 20 devices over 2 shard hosts: every round closes, every
    device gets its final model, and teardown leaves no namespace, process or temp folder.
    A stale namespace of a killed run (with a process in it) is removed first."""
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    prefix, tmp = "fcht", tmp_path / "tmp"
    tmp.mkdir()
    subprocess.run(["ip", "netns", "add", f"{prefix}-leader"], check=True)
    stale = subprocess.Popen(["ip", "netns", "exec", f"{prefix}-leader", "sleep", "600"])
    out = tmp_path / "r.json"
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.fleet_hosts", "--devices", "20", "--shards", "2",
             "--rounds", "2", "--train-s", "0.2", "--jitter-s", "0.2", "--prefix", prefix,
             "--subnet", "10.231.201", "--json", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert stale.wait(timeout=10) != 0  # the stale run's process was killed
        run = json.loads(out.read_text())["runs"][0]
        assert run["rounds_completed"] == 2
        assert [r["accepted"] for r in run["round_rows"]] == [20, 20]
        assert run["final_models"] == 20 and run["final_evals_acked"] == 20
        assert run["broker_drops_total"] == 0 and run["device_rejects_total"] == 0
        assert run["exits"] == {"leader": 0, "shard-0": 0, "shard-1": 0}
        # every device on its shard's broker: both shards served devices
        assert all(rows[0]["accepted"] > 0 for rows in run["per_shard_rounds"])
        assert _ours(prefix) == []
        assert list(tmp.iterdir()) == []
        assert _procs_under(tmp) == []
    finally:
        if stale.poll() is None:
            stale.kill()
        fh.remove_topology(prefix)


@pytest.mark.slow
def test_a_terminated_run_removes_its_topology(tmp_path: Path) -> None:
    """SIGTERM (as Ctrl-C) mid-run: the namespaces, processes and work folder go."""
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    prefix, tmp = "fchk", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.fleet_hosts", "--devices", "20", "--shards", "2",
         "--rounds", "50", "--prefix", prefix, "--subnet", "10.231.202",
         "--json", str(tmp_path / "r.json")], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        end = time.monotonic() + 120
        while not _procs_under(tmp) and time.monotonic() < end:
            time.sleep(0.5)  # until its brokers run
        assert _procs_under(tmp), "the run never started its processes"
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        assert rc == 130, proc.stdout.read()[-2000:] if proc.stdout else ""
        assert _ours(prefix) == []
        assert _procs_under(tmp) == []
        assert list(tmp.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        fh.remove_topology(prefix)
