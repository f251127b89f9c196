"""``fedcoe devices add|remove|list`` on a folder ``fedcoe init`` wrote (docs/daemons.md,
"Adding and removing devices"): the files each command changes, bad input as one line and
exit 2 with nothing changed, and a real Mosquitto that reloads its logins on SIGHUP; then
a running coordinator (in-memory transport) that picks up an added device and refuses a
removed one, whose agent stops with exit code 3."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomllib

from coordinator.config import CoordinatorConfig, FederationSettings, load_config
from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from device_agent.daemon import EXIT_NOT_ALLOWED, AgentHooks, DeviceAgent
from fedcoe_edge import protocol as P
from fedcoe_edge.broker import MosquittoBroker, _free_port
from fedcoe_edge.cli import main
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import device_key, read_secret
from fedcoe_edge.transport import MemoryBroker, Topics, Transport, Will
from fedcoe_edge.transport.mqtt import MqttTransport
from fedcoe_edge.wire import Envelope, encode_envelope


def init(tmp_path: Path, *argv: str) -> Path:
    fed = tmp_path / "fed"
    assert main(["init", str(fed), "--port", str(_free_port("127.0.0.1")), *argv]) == 0
    return fed


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden temporaries included) -> sha256 and mode."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def devices(fed: Path, *argv: str) -> int:
    return main(["devices", *argv, "--dir", str(fed)])


def test_add_list_remove_write_what_init_writes(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    fed = init(tmp_path, "--devices", "2")
    capsys.readouterr()
    assert devices(fed, "add", "pi-new", "--no-reload") == 0
    assert devices(fed, "add", "cam", "--cold", "--no-reload", "--data", "{device}.npz") == 0
    out = capsys.readouterr().out
    assert "fedcoe agent --config agent.toml" in out and "(cold)" in out
    # the device folder: its own derived key and an agent.toml the agent loads, both 0600
    secret = read_secret("", str(fed / "coordinator" / "federation.secret"), "secret", fed)
    for name, role in (("pi-new", "train"), ("cam", "cold")):
        d = fed / "devices" / name
        assert (d / "device.key").read_text().strip() == device_key(secret, name).hex()
        assert oct((d / "device.key").stat().st_mode & 0o777) == "0o600"
        assert oct((d / "agent.toml").stat().st_mode & 0o777) == "0o600"
        doc = tomllib.loads((d / "agent.toml").read_text())
        assert doc["device"]["id"] == name and doc["device"]["role"] == role
        assert doc["broker"]["username"] == name
    assert tomllib.loads((fed / "devices" / "cam" / "agent.toml").read_text())["data"]["npz"] == "cam.npz"
    # the coordinator's config still loads, with both allowed; the broker files name them
    cfg = load_config(fed / "coordinator" / "coordinator.toml")
    assert cfg.federation.allowed_devices == ["dev1", "dev2", "pi-new", "cam"]
    assert cfg.federation.min_devices == 2  # a device added later is not awaited by round 1
    acl = (fed / "broker" / "acl").read_text()
    assert "user pi-new\ntopic read fl/v1/+/bc/#" in acl
    assert acl.index("user cam") < acl.index("pattern write")
    users = [ln.split(":")[0] for ln in (fed / "broker" / "passwd").read_text().splitlines()]
    assert users[-2:] == ["pi-new", "cam"]
    assert oct((fed / "broker" / "passwd").stat().st_mode & 0o777) == "0o600"
    assert not list(fed.rglob(".*.tmp")) and not list((fed / "devices").glob(".*"))

    assert devices(fed, "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)["devices"]
    assert [(r["name"], r["role"], r["allowed"], r["broker_login"]) for r in rows] == [
        ("dev1", "train", True, True), ("dev2", "train", True, True),
        ("pi-new", "train", True, True), ("cam", "cold", True, True)]

    assert devices(fed, "remove", "dev2", "--no-reload") == 0
    assert load_config(fed / "coordinator" / "coordinator.toml").federation.allowed_devices == [
        "dev1", "pi-new", "cam"]
    assert "user dev2" not in (fed / "broker" / "acl").read_text()
    assert "dev2:" not in (fed / "broker" / "passwd").read_text()
    assert not (fed / "devices" / "dev2").exists()
    assert [p.name.split("-")[0] for p in (fed / "removed").iterdir()] == ["dev2"]
    capsys.readouterr()
    assert devices(fed, "list") == 0
    table = capsys.readouterr().out
    assert "dev2" not in table and table.splitlines()[0].split()[:3] == ["device", "role", "allowed"]
    # a removed name can be added again (a fresh folder and password)
    assert devices(fed, "add", "dev2", "--no-reload") == 0


@pytest.mark.parametrize("argv, match", [
    (["add", "dev1"], "already in allowed_devices"),
    (["add", "coordinator"], "coordinator's id"),
    (["add", "bad/id"], "device id"),
    (["remove", "ghost"], "is not in allowed_devices"),
    (["add", "dev9"], "broker cannot be signalled: pid file"),  # no broker running
    (["remove", "dev1"], "broker cannot be signalled"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    fed = init(tmp_path)
    before = tree(fed)
    capsys.readouterr()
    assert devices(fed, *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err, err
    assert err.startswith("fedcoe devices: error: ")
    assert tree(fed) == before


def test_a_folder_that_is_not_a_federation(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert devices(tmp_path, "list") == 2
    assert "not a federation folder written by `fedcoe init`" in capsys.readouterr().err
    sharded = init(tmp_path, "--shards", "2")
    assert devices(sharded, "add", "x", "--no-reload") == 2
    assert "sharded" in capsys.readouterr().err


def test_a_stale_pid_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A pid file naming a process that is not Mosquitto (here: this test) is never signalled."""
    import os

    fed = init(tmp_path)
    (fed / "broker" / "mosquitto.pid").write_text(f"{os.getpid()}\n")
    before = tree(fed)
    assert devices(fed, "add", "dev9") == 2
    assert "is not a running mosquitto" in capsys.readouterr().err
    assert tree(fed) == before


def login(port: int, user: str, password: str) -> bool:
    t = MqttTransport(f"{user}", port=port, username=user, password=password)
    try:
        t.connect()
        return True
    except ConfigError:
        return False
    finally:
        t.close()


def wait_for(cond: Any, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"{what} not reached in {timeout:.0f} s"
        time.sleep(0.2)


def test_the_broker_reloads_logins_on_sighup(tmp_path: Path, init_broker_tools: None) -> None:
    """Mosquitto runs init's own mosquitto.conf (it writes the pid file `devices` signals):
    an added device logs in with the password of its new agent.toml, without a broker
    restart; once removed, its login is refused."""
    fed = init(tmp_path)
    port = int(tomllib.loads((fed / "coordinator" / "coordinator.toml").read_text())["broker"]["port"])
    broker = MosquittoBroker.from_config_file(fed / "broker" / "mosquitto.conf", port,
                                              workdir=tmp_path / "mosquitto")
    with broker:
        wait_for(lambda: (fed / "broker" / "mosquitto.pid").is_file(), "the broker's pid file")
        assert devices(fed, "add", "dev4") == 0
        password = tomllib.loads((fed / "devices" / "dev4" / "agent.toml").read_text())["broker"]["password"]
        wait_for(lambda: login(port, "dev4", password), "dev4's login after the reload")
        assert broker.running
        assert devices(fed, "remove", "dev4") == 0
        wait_for(lambda: not login(port, "dev4", password), "dev4's login refused after removal")
        assert broker.running
        dev1 = tomllib.loads((fed / "devices" / "dev1" / "agent.toml").read_text())["broker"]["password"]
        assert login(port, "dev1", dev1)  # the others are untouched


# --- a running coordinator re-reads allowed_devices -----------------------------------------
class WatchedFederation(EmbeddedFederation):
    """The embedded federation with its coordinator config read from a file, as
    `fedcoe coordinator --config` reads it, so that the file can be rewritten under it."""

    config_file: Path | None = None

    def coordinator_config(self) -> CoordinatorConfig:
        cfg = super().coordinator_config()
        assert self.config_file is not None
        cfg.federation.allowed_devices = load_config(self.config_file).federation.allowed_devices
        cfg.path = str(self.config_file)
        return cfg


def allow(path: Path, names: list[str]) -> None:
    from fedcoe_edge.io import atomic_write_text

    atomic_write_text(path, f'[federation]\nallowed_devices = {json.dumps(names)}\n'
                            f'[security]\nsecret = "{DEMO_SECRET.hex()}"\n')


def beat(t: Transport, dev: str, key: bytes, times: int = 3) -> None:
    """``times`` heartbeats claiming to come from ``dev``, signed with ``key``."""
    topics = Topics(FederationSettings.id)
    for _ in range(times):
        env = Envelope.new(P.HEARTBEAT, federation=FederationSettings.id, sender=dev,
                           recipient=P.COORDINATOR_ID, body={"rounds_done": 0}, ttl_s=120)
        t.publish(topics.up_hb(dev), encode_envelope(env, key), qos=0)


def heard_on(broker: MemoryBroker, dev: str, send: Any) -> list[str]:
    """The envelope types the coordinator sends to ``dev`` within 3 s after ``send(t)``."""
    got: list[str] = []
    t = broker.client(f"spy-{dev}")
    t.subscribe(Topics(FederationSettings.id).dn_ctl(dev),
                lambda m: got.append(json.loads(m.payload)["type"]))
    t.connect()
    send(t)
    time.sleep(3)  # a reply comes within milliseconds on the in-memory broker
    t.close()
    return got


def test_running_coordinator_admits_an_added_device_and_refuses_a_removed_one(
        tmp_path: Path) -> None:
    """Round 2 is held open (both devices' uploads wait); meanwhile the config file gains
    device 2 and loses device 1: a device not allowed yet is refused and its agent exits 3,
    the same id once added registers with no coordinator restart and is selected in round
    3, and device 1 is dropped from round 2 (settled, not awaited) and told why."""
    broker = MemoryBroker()

    def factory(cid: str, will: Will | None, birth: Will | None) -> Transport:
        return broker.client(cid, will=will, birth=birth)

    toml = tmp_path / "coordinator.toml"
    allow(toml, ["0", "1"])
    gate = threading.Event()
    hold = AgentHooks(before_upload=lambda agent, rnd: rnd != 2 or gate.wait(60) or True)
    fed = WatchedFederation(tmp_path, factory, devices=2, rounds=3, quorum=1, deadline_s=120.0,
                            hooks={"0": hold, "1": hold}, **small())
    fed.config_file = toml
    fed.start()
    try:
        coord = fed.coordinator
        assert coord is not None
        fed.wait(lambda: coord.round == 2 and coord.round_open, 60, "round 2 open")
        # not allowed yet: told why, and `fedcoe agent` would exit 3
        stranger = DeviceAgent(fed.agent_config("2", "0"), factory)
        code: list[int] = []
        runner = threading.Thread(target=lambda: code.append(stranger.run()), daemon=True)
        runner.start()
        runner.join(30)
        assert code == [EXIT_NOT_ALLOWED]
        assert "not in the federation's allowed_devices" in str(stranger.not_allowed)
        # added and removed while round 2 runs
        allow(toml, ["0", "2"])
        fed.wait(lambda: fed.agents["1"].not_allowed is not None, 30, "device 1 refused")
        newcomer = fed.add_agent("2", "1")
        fed.wait(lambda: "2" in coord.available(), 30, "device 2 registered")
        assert "1" not in coord.available()
        gate.set()
        fed.wait(lambda: coord.finished, 120, "the last round")
        # a heartbeat (QoS 0 telemetry) of a device that is not allowed is answered too, once
        # per interval, and only when signed with that device's own key
        told = heard_on(broker, "9", lambda t: beat(t, "9", device_key(DEMO_SECRET, "9")))
        forged = heard_on(broker, "8", lambda t: beat(t, "8", device_key(DEMO_SECRET, "9")))
        rows = [coord.store.round_summary(r) for r in (1, 2, 3)]
        accepted = {r: sorted(u["device"] for u in coord.store.updates(r)) for r in (1, 2, 3)}
        failures = coord.store.events(2, "failure")
    finally:
        gate.set()
        fed.stop()
    assert told == [P.REFUSED] and forged == []
    assert newcomer.not_allowed is None
    assert all(r["applied"] for r in rows)
    assert accepted == {1: ["0", "1"], 2: ["0"], 3: ["0", "2"]}
    assert [(f["device"], f["reason"]) for f in failures] == [("1", "device removed from the federation")]
