"""The deployments the docs describe, end to end, as a user runs them.

Every test provisions with ``fedcoe init`` and runs the files it writes: Mosquitto from
``broker/mosquitto.conf`` (password file, ACL, ``use_username_as_clientid``, persistence
in the temporary folder, a free loopback port; ``MosquittoBroker.from_config_file`` adds
only a log file and, as root, ``user root``), and every daemon as a subprocess of the
documented command (``fedcoe coordinator --config ...``, ``fedcoe agent --config ...``)
with its own defaults. Each asserts the rounds applied, the updates accepted and no
ERROR or traceback in any log:

* the sharded federation (docs/daemons.md, "Past one machine"): a leader and two shard
  aggregators, each logging in with the identity ``fedcoe init --shards 2`` gave it, three
  rounds, and not one disconnect or session takeover in the broker's log;
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
import tomllib

from fedcoe_edge.broker import MosquittoBroker, _free_port
from fedcoe_edge.sharding import shard_federation, shard_of

pytestmark = pytest.mark.integration

FEDCOE = [sys.executable, "-m", "fedcoe_edge.cli"]
# what a broker logs when a client goes away or is pushed out by another login of its id
DISCONNECT = re.compile(r"disconnect|already connected|session taken over|closing old connection",
                        re.IGNORECASE)


class Deployment:
    """What a user starts by hand: the broker from init's files and one subprocess per
    documented command, each logging to ``logs/<name>.log``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._files: list[IO[bytes]] = []
        self.broker: MosquittoBroker | None = None
        # one thread per process: the machine running the tests has two cores
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def init(self, *argv: str) -> tuple[Path, int]:
        """``fedcoe init ROOT/fed --host 127.0.0.1 --port FREE ...``; the folder and port."""
        port = _free_port("127.0.0.1")
        fed = self.root / "fed"
        done = subprocess.run([*FEDCOE, "init", str(fed), "--host", "127.0.0.1", "--port", str(port),
                               *argv], capture_output=True, text=True, env=self.env, check=False)
        assert done.returncode == 0, done.stderr
        assert (fed / "broker" / "passwd").read_text().count("$7$") == \
            len((fed / "broker" / "passwd").read_text().splitlines()), "passwords not hashed"
        return fed, port

    def start_broker(self, fed: Path, port: int) -> MosquittoBroker:
        self.broker = MosquittoBroker.from_config_file(fed / "broker" / "mosquitto.conf", port,
                                                       workdir=self.root / "mosquitto")
        self.broker.start()
        return self.broker

    def spawn(self, name: str, *argv: str, cwd: Path | None = None) -> None:
        log = (self.logs / f"{name}.log").open("wb")
        self._files.append(log)
        self.procs[name] = subprocess.Popen([*FEDCOE, *argv], cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env)

    def wait(self, cond: Callable[[], bool], what: str, timeout: float) -> None:
        """Until ``cond()``; fails at once, with its log, when a daemon exits meanwhile."""
        end = time.monotonic() + timeout
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited with {p.returncode} while waiting for "
                                         f"{what}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > end:
                tails = "\n".join(f"--- {n}\n{self.log(n)[-1500:]}" for n in self.procs)
                raise AssertionError(f"{what} not reached in {timeout:.0f} s\n{tails}")
            time.sleep(0.25)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self) -> dict[str, int]:
        """SIGTERM every daemon (a clean stop, as systemd does) and their exit codes."""
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {}
        for name, p in self.procs.items():
            try:
                codes[name] = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                codes[name] = p.wait()
        return codes

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self._files:
            f.close()
        if self.broker is not None:
            self.broker.stop()

    def assert_clean_logs(self) -> None:
        """No daemon logged an ERROR line or a traceback."""
        for name in self.procs:
            bad = [ln for ln in self.log(name).splitlines() if "ERROR" in ln or "Traceback" in ln]
            assert not bad, f"{name}: {bad[:5]}\n{self.log(name)[-3000:]}"


def rounds_json(state: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads((state / "rounds.json").read_text()))
    except (OSError, ValueError):
        return []


def bundled(fed: Path, devices: list[str]) -> Callable[[], bool]:
    """Every device rebuilt its int8 bundle after the last round (the agent's default
    ``bundle = "final"``): the last thing a device does in a federation."""
    return lambda: all((fed / "devices" / d / "state" / "bundle" / "manifest.json").is_file()
                       for d in devices)


# --- (b) the sharded federation -------------------------------------------------------------
def test_sharded_federation_each_aggregator_logs_in_as_itself(tmp_path: Path, init_broker_tools: None,
                                                              digits_npz: Any) -> None:
    """``fedcoe init --shards 2`` then the leader and two shards as docs/daemons.md starts
    them, four devices, three rounds: every round merges both shards' partials with every
    update accepted, and the broker never closes a connection (one login per process:
    under ``use_username_as_clientid`` a shared login would push the others out)."""
    names = ["dev1", "dev2", "dev3", "dev4"]
    assert {shard_of(d, 2) for d in names} == {0, 1}  # both shards serve devices
    dep = Deployment(tmp_path)
    # the one setting off the defaults: the int8 bundle after the last round (a minute on
    # two cores for four devices) is the camera and quickstart tests' business, not this one's
    dep.env["FEDCOE_DEVICE_BUNDLE"] = "off"
    fed, port = dep.init("--names", ",".join(names), "--shards", "2", "--rounds", "3",
                         "--data", "local.npz")
    cdir = fed / "coordinator"
    users = {}
    for stem in ("leader", "shard-0", "shard-1"):
        users[stem] = tomllib.loads((cdir / f"{stem}.toml").read_text())["broker"]["username"]
    assert len(set(users.values())) == 3 and "coordinator" not in users.values()
    acl = (fed / "broker" / "acl").read_text()
    for user in users.values():
        assert f"user {user}\n" in acl
    for i, dev in enumerate(names):
        agent = tomllib.loads((fed / "devices" / dev / "agent.toml").read_text())
        assert agent["device"]["federation"] == shard_federation("fleet1", shard_of(dev, 2), 2)
        digits_npz(fed / "devices" / dev / "local.npz", i, len(names))
    dep.start_broker(fed, port)
    try:
        dep.spawn("leader", "coordinator", "--config", str(cdir / "leader.toml"), "--role", "leader")
        for i in (0, 1):
            dep.spawn(f"shard{i}", "coordinator", "--config", str(cdir / f"shard-{i}.toml"),
                      "--role", "shard", "--shard-index", str(i))
        for dev in names:
            dep.spawn(dev, "agent", "--config", "agent.toml", cwd=fed / "devices" / dev)
        leader_state = cdir / "state" / "leader"
        dep.wait(lambda: len(rounds_json(leader_state)) >= 3, "3 leader rounds", 300)
        dep.wait(lambda: all("personal accuracy after round 3" in dep.log(d) for d in names),
                 "every device's round-3 evaluation", 120)
        broker_log = dep.broker.log_path.read_text() if dep.broker else ""
        codes = dep.stop()
    finally:
        dep.close()
    dropped = [ln for ln in broker_log.splitlines() if DISCONNECT.search(ln)]
    assert not dropped, "\n".join(dropped[:10])
    for user in users.values():  # each aggregator connected once, under its own identity
        assert len(re.findall(rf"New client connected .* as {re.escape(user)} ", broker_log)) == 1, user
    rounds = rounds_json(leader_state)
    assert [(r["round"], r["accepted"], r["failed"], r["shards_merged"]) for r in rounds] == \
        [(1, 4, 0, 2), (2, 4, 0, 2), (3, 4, 0, 2)], rounds
    assert all(r["applied"] for r in rounds), rounds
    assert codes == {name: 0 for name in codes}, codes
    dep.assert_clean_logs()
