"""Daemons that keep trying (docs/daemons.md, "Reconnects" and "One coordinator per state
folder"): a broker that is not up yet is retried forever with capped, jittered backoff (exit
2 stays for config errors), and a second coordinator on one state folder exits at once,
code 2, naming the one that holds it. Real Mosquitto, the daemons as processes."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.demo import toml_text
from coordinator.statelock import StateLock
from coordinator.status import read_status
from fedcoe_edge import protocol as P
from fedcoe_edge.broker import MosquittoBroker, find_mosquitto
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.transport.mqtt import MqttTransport, jittered

FED = "retry"
SECRET = bytes(range(32))
WAIT_S = 120.0  # any one wait; a loaded two-core machine starts torch slowly


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")


def write_configs(root: Path, port: int) -> None:
    broker = {"host": "127.0.0.1", "port": port}
    coord: dict[str, dict[str, Any]] = {"federation": {"id": FED, "rounds": 1, "min_devices": 2, "quorum": 1,
                            "state_dir": "coordinator"},
             "broker": broker, "security": {"secret": SECRET.hex()}}
    (root / "coordinator.toml").write_text(toml_text(coord))
    agent: dict[str, dict[str, Any]] = {"device": {"id": "0", "federation": FED, "state_dir": "device0", "bundle": "off"},
             "broker": broker, "security": {"key": P.device_key(SECRET, "0").hex()},
             "data": {"dataset": "digits", "client": "0", "num_clients": 2, "seed": 0}}
    (root / "agent.toml").write_text(toml_text(agent))


class Procs:
    """``fedcoe`` processes in ``root``, each logging to ``root/NAME.log``; SIGKILLed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with (self.root / f"{name}.log").open("ab") as f:
            p = subprocess.Popen([sys.executable, "-m", "fedcoe_edge.cli", *argv], stdout=f,
                                 stderr=subprocess.STDOUT, cwd=self.root, env=env,
                                 start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.close()


def test_backoff_is_jittered_within_half_to_the_full_step() -> None:
    rng = random.Random(0)
    waits = [jittered(8.0, rng) for _ in range(200)]
    assert all(4.0 <= w <= 8.0 for w in waits)
    assert max(waits) - min(waits) > 2.0  # spread, so a fleet does not reconnect in step


def test_a_transport_that_keeps_trying_connects_once_the_broker_comes_up() -> None:
    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))
    port = free_port()
    ups: list[bool] = []
    t = MqttTransport("late-1", port=port, keep_trying=True, reconnect_max_s=2)
    t.add_connection_listener(ups.append)
    broker = MosquittoBroker(port=port)
    try:
        t.connect(timeout=1.0)  # nothing listens there yet: no error, retried in the background
        assert not t.connected
        broker.start()
        wait_for(lambda: t.connected and ups == [True], 30, "connected after the broker started")
    finally:
        t.close()
        broker.close()
    # without keep_trying (tools, tests) an absent broker is still one error line
    plain = MqttTransport("late-2", port=free_port())
    with pytest.raises(ConfigError, match="no answer from broker"):
        plain.connect(timeout=1.0)


# slow: waits out the daemon's own 10 s first-connect wait and its 1-2-4-8-16 s backoff
# (docs/daemons.md, "Reconnects"), tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
@pytest.mark.integration
def test_an_agent_started_before_its_broker_keeps_trying_and_joins(tmp_path: Path,
                                                                   procs: Procs) -> None:
    """The agent (and the coordinator) start with no broker on their port; the agent
    must still be running once its first connect timed out (it used to exit 2 there,
    which systemd's RestartPreventExitStatus=2 never restarts); the broker starts 3 s
    later and the agent registers with the coordinator."""
    find_mosquitto()
    port = free_port()
    write_configs(tmp_path, port)
    coord = procs.spawn("coordinator", "coordinator", "--config", "coordinator.toml")
    agent = procs.spawn("agent", "agent", "--config", "agent.toml")

    def gave_up_or_waiting() -> str | None:
        if agent.poll() is not None:
            return f"exited {agent.returncode}"
        return "waiting" if "still trying in the background" in procs.log("agent") else None

    got = wait_for(gave_up_or_waiting, WAIT_S, "the agent's first connect timing out")
    assert got == "waiting", f"the agent {got} without a broker:\n{procs.log('agent')}"
    time.sleep(3.0)
    broker = MosquittoBroker(port=port, workdir=tmp_path / "mosquitto")
    broker.start()
    try:
        def joined() -> bool:
            if not (tmp_path / "coordinator" / "coordinator.sqlite").is_file():
                return False
            devs = read_status(tmp_path / "coordinator")["devices"]
            return any(d["id"] == "0" and d["online"] for d in devs)

        wait_for(joined, WAIT_S, f"the agent registered\n{procs.log('agent')}")
        assert agent.poll() is None and coord.poll() is None
        assert "not reachable (attempt 1); next try in" in procs.log("agent")
    finally:
        procs.close()
        broker.close()


@pytest.mark.integration
def test_a_second_coordinator_on_one_state_folder_exits_2_naming_the_first(
        tmp_path: Path, procs: Procs, mosquitto_broker: Any) -> None:
    write_configs(tmp_path, mosquitto_broker.port)
    first = procs.spawn("coordinator", "coordinator", "--config", "coordinator.toml")
    state = tmp_path / "coordinator"
    wait_for(lambda: (state / "coordinator.lock").is_file()
             and f'"pid": {first.pid}' in (state / "coordinator.lock").read_text(),
             WAIT_S, "the first coordinator's lock")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    second = subprocess.run([sys.executable, "-m", "fedcoe_edge.cli", "coordinator", "--config",
                             "coordinator.toml"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2, (second.returncode, second.stderr)
    assert len(err) == 1, err
    assert re.search(rf"state folder .*coordinator is in use by another coordinator \(pid "
                     rf"{first.pid} on host {re.escape(socket.gethostname())} since \d{{4}}-", err[0]), err
    assert first.poll() is None  # the holder is untouched
    assert read_status(state)["coordinator"]["running"] is True
    # the kernel drops the lock with the process, however it dies: a restart is not blocked
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert read_status(state)["coordinator"]["running"] is False
    with StateLock(state):
        pass


def test_the_lock_is_exclusive_within_one_process_too(tmp_path: Path) -> None:
    with StateLock(tmp_path) as lock:
        with pytest.raises(ConfigError, match=f"pid {os.getpid()} on host"):
            StateLock(tmp_path).acquire()
        assert lock.path.is_file()
    with StateLock(tmp_path):  # released above: free again
        pass
