"""The operator's day, end to end (docs/daemons.md, "Adding and removing devices"): a
federation from ``fedcoe init`` over a real Mosquitto running init's own broker files, the
coordinator and agents as the documented commands start them, and while it runs:

* ``fedcoe devices add dev4`` while round 2 is open: the broker reloads its logins
  (SIGHUP), the running coordinator re-reads ``allowed_devices``, dev4's agent joins with
  no restart of anything and trains in round 3;
* ``fedcoe devices remove dev2``: the coordinator refuses it and tells it why; its agent
  prints the reason and exits 3;
* ``fedcoe status --json --config`` shows all of it, and ``/metrics`` and the dashboard's
  ``/api/status`` agree with the coordinator's store;
* ``kill -9`` of the coordinator in round 3, as the first update of it is uploaded (the
  others still training), and a restart with the same command: round 3 resumes and
  accepts every update of it (a kill at the first chunk of an upload, seen by a spy
  client, is tests/test_hostile.py's kill -9 test);
* a second ``fedcoe coordinator`` on the same folder exits 2, naming the first.

Round 2 is held open while dev4 joins by stopping dev3's agent (SIGSTOP) until dev4 is
registered: a round closes once every selected device settled, in a second or two here,
or at its deadline. ``fedcoe init --deadline 300`` (the deploy template's value) gives the
operator's two commands and dev4's agent start the time they take on a loaded CI machine
(over init's 60 s default there once: the round closed before dev4 registered).
The other settings off the defaults: the coordinator's ``[metrics]`` and ``[dashboard]``
ports (off by default; the user uncomments them, as init's comment says) and no int8
bundle after the last round (``FEDCOE_DEVICE_BUNDLE=off``, as the sharded deployment test).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_deploy_e2e import FEDCOE, Deployment

from coordinator.status import read_status
from fedcoe_edge.broker import _free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(dep: Deployment, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FEDCOE, *argv], capture_output=True, text=True, env=dep.env,
                          check=False, timeout=120)


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def steady(doc: dict[str, Any]) -> dict[str, Any]:
    """Without what moves while nothing happens (heartbeats refresh ``last_seen``)."""
    return {**doc, "devices": [{**d, "last_seen": None} for d in doc["devices"]]}


def test_operator_adds_and_removes_devices_of_a_live_federation(
        tmp_path: Path, init_broker_tools: None, digits_npz: Any) -> None:
    dep = Deployment(tmp_path)
    dep.env["FEDCOE_DEVICE_BUNDLE"] = "off"
    fed, port = dep.init("--rounds", "3", "--deadline", "300", "--data", "local.npz")
    cfg = fed / "coordinator" / "coordinator.toml"
    state = fed / "coordinator" / "state"
    mport, dport = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    with cfg.open("a") as fh:  # init's commented [metrics] / [dashboard], switched on
        fh.write(f"\n[metrics]\nport = {mport}\n\n[dashboard]\nport = {dport}\n")
    for i, dev in enumerate(["dev1", "dev2", "dev3"]):
        digits_npz(fed / "devices" / dev / "local.npz", i, 4)
    dep.start_broker(fed, port)
    stopped: list[int] = []
    try:
        dep.wait(lambda: (fed / "broker" / "mosquitto.pid").is_file(), "the broker's pid file", 30)
        dep.spawn("coordinator", "coordinator", "--config", str(cfg))
        for dev in ("dev1", "dev2", "dev3"):
            dep.spawn(dev, "agent", "--config", "agent.toml", cwd=fed / "devices" / dev)
        dep.wait(lambda: "round 1 summary" in dep.log("coordinator"), "round 1 closed", 300)
        dep.procs["dev3"].send_signal(signal.SIGSTOP)  # round 2 now waits for dev3
        stopped.append(dep.procs["dev3"].pid)

        def status() -> dict[str, Any]:
            return read_status(state)

        dep.wait(lambda: status()["state"] == "open" and status()["round"] == 2, "round 2 open", 60)
        # a 4th device while round 2 runs: the documented command, then its agent
        added = run(dep, "devices", "add", "dev4", "--dir", str(fed), "--data", "local.npz")
        assert added.returncode == 0, added.stderr
        digits_npz(fed / "devices" / "dev4" / "local.npz", 3, 4)
        dep.spawn("dev4", "agent", "--config", "agent.toml", cwd=fed / "devices" / "dev4")
        dep.wait(lambda: "device dev4 registered" in dep.log("coordinator"), "dev4 registered", 120)
        assert (status()["round"], status()["state"]) == (2, "open"), dep.log("coordinator")[-2000:]
        # revoke dev2: refused from its next message on, told why, its agent exits 3
        removed = run(dep, "devices", "remove", "dev2", "--dir", str(fed))
        assert removed.returncode == 0, removed.stderr
        dev2 = dep.procs.pop("dev2")
        assert dev2.wait(timeout=60) == 3, dep.log("dev2")[-2000:]
        assert "refused by the coordinator: device 'dev2' is not in the federation's " \
               "allowed_devices" in dep.log("dev2")
        listed = run(dep, "devices", "list", "--json", "--dir", str(fed))
        assert listed.returncode == 0, listed.stderr
        assert [(d["name"], d["allowed"], d["broker_login"]) for d in
                json.loads(listed.stdout)["devices"]] == [
            ("dev1", True, True), ("dev3", True, True), ("dev4", True, True)]
        dep.procs["dev3"].send_signal(signal.SIGCONT)
        stopped.clear()
        # kill -9 the coordinator once round 3's first update is trained (its upload follows
        # at once), start it again with the same command: round 3 resumes, every update of it
        # is accepted, and the restarted coordinator reads the list `devices` left
        dep.wait(lambda: "round 3 open" in dep.log("coordinator"), "round 3 open", 120)
        dep.wait(lambda: any("round 3 trained" in dep.log(d) for d in ("dev1", "dev3", "dev4")),
                 "a round-3 update trained", 120)
        killed = dep.procs.pop("coordinator")
        killed.send_signal(signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
        dep.spawn("coordinator-restarted", "coordinator", "--config", str(cfg))
        dep.wait(lambda: "all 3 rounds done" in dep.log("coordinator-restarted"), "3 rounds", 300)
        resumed = re.search(r"resuming round 3: (\d) of 3 updates already accepted",
                            dep.log("coordinator-restarted"))
        assert resumed is not None and int(resumed.group(1)) < 3  # the kill landed mid-round

        # fedcoe status --json (the documented command) shows all of it
        out = run(dep, "status", "--json", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        devices = {d["id"]: d for d in doc["devices"]}
        assert doc["state"] == "finished" and doc["round"] == 3
        assert doc["allowed_devices"] == ["dev1", "dev3", "dev4"]
        assert devices["dev4"]["allowed"] and devices["dev4"]["last_round"] == 3
        assert not devices["dev2"]["allowed"] and not devices["dev2"]["online"]
        rounds = {r["round"]: r for r in doc["round_log"]}
        assert rounds[3]["accepted"] == 3 and rounds[3]["selected"] == 3, doc["round_log"]
        assert all(r["applied"] for r in doc["round_log"])
        assert devices["dev2"]["last_round"] in (1, 2)

        # /metrics and the dashboard agree with the store
        m = scrape(f"http://127.0.0.1:{mport}/metrics")
        assert m[("fedcoe_rounds_closed_total", ())] == 3
        assert m[("fedcoe_updates_accepted_total", ())] == sum(r["accepted"] for r in doc["round_log"])
        assert m[("fedcoe_devices_registered", (("role", "train"),))] == len(doc["devices"]) == 4
        assert m[("fedcoe_devices_online", (("role", "train"),))] == doc["devices_online"] == 3
        assert m[("fedcoe_refusals_total", (("kind", "rejected"), ("reason", "not_allowed")))] >= 1
        end = time.monotonic() + 30  # the dashboard rebuilds its document every few seconds
        while steady(api := get_json(f"http://127.0.0.1:{dport}/api/status")) != steady(doc):
            assert time.monotonic() < end, (api, doc)
            time.sleep(1)

        # a second coordinator on the same state folder refuses at once
        second = run(dep, "coordinator", "--config", str(cfg))
        assert second.returncode == 2
        assert "is in use by another coordinator" in second.stderr, second.stderr
        codes = dep.stop()
    finally:
        if stopped:  # never leave a stopped process behind
            dep.procs["dev3"].send_signal(signal.SIGCONT)
        dep.close()
    assert codes == {name: 0 for name in codes}, codes
    dep.assert_clean_logs()  # dev2 (refused: an ERROR line) is no longer among the daemons
