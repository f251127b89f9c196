"""``fedcoe init`` / ``fedcoe keygen`` and a federation run from what ``init`` wrote.

The end-to-end test provisions a federation with a class list, starts the broker from the
generated Mosquitto config (passwords + ACL), a coordinator and two agents whose image
folders hold DIFFERENT class sets, and checks that each class gets the same label on both
devices; a third device with a class folder outside the list declines in one line and the
round closes without waiting out its deadline.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

from fedcoe_edge.cli import main
from fedcoe_edge.protocol import device_key

# every class gets its own grey level, so a label can be checked against the pixels
LEVEL = {"one": 40, "two": 120, "three": 220}


def write_images(root: Path, classes: list[str], per_class: int = 10) -> None:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), LEVEL.get(c, 0) + i % 3, np.uint8)).save(root / c / f"{i}.png")


def wait_for(cond: Any, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_per_device_keys_only_and_private_secrets(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert main(["init", str(out), "--names", "pi-a,pi-b", "--classes", "cat,dog",
                 "--image-shape", "3,16,16", "--port", "8883", "--tls"]) == 0
    printed = capsys.readouterr().out
    assert "fedcoe coordinator --config" in printed and "fedcoe agent --config agent.toml" in printed
    secret = bytes.fromhex((out / "coordinator" / "federation.secret").read_text().strip())
    coord = tomllib.loads((out / "coordinator" / "coordinator.toml").read_text())
    assert coord["federation"]["classes"] == ["cat", "dog"] and coord["model"]["num_classes"] == 2
    assert coord["model"]["input_shape"] == [3, 16, 16] and coord["broker"]["tls"] is True
    for dev in ("pi-a", "pi-b"):
        folder = out / "devices" / dev
        key = (folder / "device.key").read_text().strip()
        assert bytes.fromhex(key) == device_key(secret, dev)
        text = (folder / "agent.toml").read_text()
        agent = tomllib.loads(text)
        assert secret.hex() not in text and "secret" not in agent["security"]
        assert agent["security"] == {"key_file": "device.key"}
        assert agent["data"]["classes"] == ["cat", "dog"] and agent["broker"]["username"] == dev
        assert mode(folder / "device.key") == 0o600 and mode(folder / "agent.toml") == 0o600
    assert mode(out / "coordinator" / "federation.secret") == 0o600
    assert mode(out / "broker" / "passwd") == 0o600
    acl = (out / "broker" / "acl").read_text()
    assert "pattern write fl/v1/+/up/%u/#" in acl


def test_init_refuses_a_used_folder_and_bad_options_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep")
    cases = [
        (["init", str(tmp_path / "used")], "is not an empty folder; pick a new one, or give --force"),
        (["init", str(tmp_path / "a"), "--classes", "cat,cat"], "names cat more than once"),
        (["init", str(tmp_path / "b"), "--image-shape", "2,8,8"], "C 1 or 3"),
        (["init", str(tmp_path / "c"), "--names", "coordinator"], "coordinator's id"),
    ]
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "used" / "x").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # nothing half-written


def test_keygen_new_secret_and_derived_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sec = tmp_path / "fed.secret"
    assert main(["keygen", "--new-secret", "--out", str(sec)]) == 0
    assert mode(sec) == 0o600
    assert main(["keygen", "--new-secret", "--out", str(sec)]) == 2  # never overwritten
    capsys.readouterr()
    assert main(["keygen", "--secret-file", str(sec), "--device", "pi-3"]) == 0
    key = capsys.readouterr().out.strip()
    assert bytes.fromhex(key) == device_key(bytes.fromhex(sec.read_text().strip()), "pi-3")
    assert main(["keygen", "--secret-file", str(sec), "--device", "pi-3", "--out", str(tmp_path / "k")]) == 0
    assert (tmp_path / "k").read_text().strip() == key and mode(tmp_path / "k") == 0o600


def test_init_then_coordinator_and_agents_agree_on_labels(tmp_path: Path) -> None:
    from coordinator.config import load_config as load_coordinator
    from coordinator.daemon import Coordinator
    from device_agent.config import load_config as load_agent
    from device_agent.daemon import DeviceAgent
    from device_agent.data import load_local
    from fedcoe_edge.broker import MosquittoBroker, _free_port, find_mosquitto
    from fedcoe_edge.errors import ConfigError, DataError

    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))
    port = _free_port("127.0.0.1")
    out = tmp_path / "fed"
    assert main(["init", str(out), "--names", "dev1,dev2,dev3", "--classes", "one,two,three",
                 "--port", str(port), "--rounds", "1", "--deadline", "600"]) == 0
    write_images(out / "devices" / "dev1" / "data", ["three", "one"])
    write_images(out / "devices" / "dev2" / "data", ["two", "three"])
    write_images(out / "devices" / "dev3" / "data", ["one", "four"])
    conf = (out / "broker" / "mosquitto.conf").read_text()
    hashed = (out / "broker" / "passwd").read_text().count("$7$") >= 4
    if not hashed or shutil.which("mosquitto_passwd") is None:  # plain passwords: open broker
        conf = f"listener {port} 127.0.0.1\nallow_anonymous true\n"
    if os.geteuid() == 0:  # as root, mosquitto drops to user mosquitto, who cannot read 0600
        conf += "user root\n"
    env = {"FEDCOE_FEDERATION_MIN_DEVICES": "2", "FEDCOE_FEDERATION_EXIT_WHEN_DONE": "true",
           "FEDCOE_FEDERATION_QUORUM": "1"}
    # with the class list in its own agent.toml, dev3 refuses at start, before connecting
    with pytest.raises(DataError, match="class folder.s. four not in the federation's class list"):
        load_local(load_agent(out / "devices" / "dev3" / "agent.toml").data)
    # dev2 and dev3 do not list the classes themselves: the coordinator's welcome does
    no_list = {"FEDCOE_DATA_CLASSES": "[]", "FEDCOE_DEVICE_BUNDLE": "off", "FEDCOE_DEVICE_HEARTBEAT_S": "0"}
    with MosquittoBroker(port=port, config_text=conf, workdir=tmp_path / "mq"):
        ccfg = load_coordinator(out / "coordinator" / "coordinator.toml", env)
        coord = Coordinator(ccfg)
        t = threading.Thread(target=coord.run, daemon=True)
        t.start()
        agents: dict[str, DeviceAgent] = {}
        try:
            for dev in ("dev1", "dev2", "dev3"):
                if dev == "dev3":  # joins once round 1 runs with the two honest devices
                    wait_for(lambda: coord.round_open or coord.finished, "round 1 open")
                acfg = load_agent(out / "devices" / dev / "agent.toml",
                                  no_list if dev != "dev1" else {"FEDCOE_DEVICE_BUNDLE": "off",
                                                                 "FEDCOE_DEVICE_HEARTBEAT_S": "0"})
                agents[dev] = DeviceAgent(acfg)
                agents[dev].start()
            wait_for(lambda: agents["dev3"].refused is not None, "dev3 declining")
            t.join(timeout=300)
            assert not t.is_alive(), "the round did not close"
        finally:
            for a in agents.values():
                a.close()
            coord.stop()
            t.join(timeout=10)
    # dev3 declined with one line naming the folder outside the list, and was never trained
    assert agents["dev3"].refused and "four" in agents["dev3"].refused
    assert "\n" not in agents["dev3"].refused and agents["dev3"].rounds_done == []
    # the honest devices trained round 1 with labels that agree with the class list
    for dev in ("dev1", "dev2"):
        a = agents[dev]
        assert a.rounds_done == [1] and a.classes == ["one", "two", "three"]
        d = a.data
        x = np.concatenate([d.x_train, d.x_test]).reshape(len(d.y_train) + len(d.y_test), -1)[:, 0]
        y = np.concatenate([d.y_train, d.y_test])
        for label, name in enumerate(["one", "two", "three"]):
            got = x[y == label] * 255
            if len(got):
                assert np.all(np.abs(got - LEVEL[name]) < 3), (dev, name)
    assert set(np.concatenate([agents["dev1"].data.y_train, agents["dev1"].data.y_test])) == {0, 2}
    assert set(np.concatenate([agents["dev2"].data.y_train, agents["dev2"].data.y_test])) == {1, 2}
    model = tomllib.loads((out / "coordinator" / "coordinator.toml").read_text())
    assert model["federation"]["classes"] == ["one", "two", "three"]
    import json

    ck = json.loads((out / "coordinator" / "state" / "checkpoint" / "model.json").read_text())
    assert ck["classes"] == ["one", "two", "three"]
    assert os.path.isfile(out / "coordinator" / "state" / "coordinator.sqlite")


def test_init_shards_writes_one_identity_per_aggregator(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``--shards 2``: a leader and two shard configs, each with its own broker login (its
    role's MQTT identity) and an ACL entry of its own; devices get their shard's federation
    id; a config started in another role, or on a shared login, is refused in one line."""
    from coordinator.config import Role, load_config, mqtt_identity
    from fedcoe_edge.errors import ConfigError
    from fedcoe_edge.sharding import shard_federation, shard_of

    out = tmp_path / "fed"
    names = ["a1", "b2", "c3", "d4"]
    assert main(["init", str(out), "--names", ",".join(names), "--shards", "2"]) == 0
    printed = capsys.readouterr().out
    cdir = out / "coordinator"
    assert sorted(p.name for p in cdir.iterdir()) == ["federation.secret", "leader.toml",
                                                       "shard-0.toml", "shard-1.toml"]
    roles: dict[str, tuple[Role, int | None]] = {"leader": (Role.LEADER, None), "shard-0": (Role.SHARD, 0),
                                                 "shard-1": (Role.SHARD, 1)}
    users = {}
    for stem, (role, index) in roles.items():
        assert f"--config {cdir / (stem + '.toml')} --role {role.value}" in printed
        cfg = load_config(cdir / f"{stem}.toml")
        assert cfg.federation.shards == 2 and cfg.federation.aggregation == "stream"
        assert mode(cdir / f"{stem}.toml") == 0o600
        cfg.check_role(role, index)  # its own role passes
        users[stem] = cfg.broker.username
        assert users[stem] == mqtt_identity(cfg.federation, role, index)
        other = (Role.SHARD, 1 - index) if index is not None else (Role.SHARD, 0)
        with pytest.raises(ConfigError, match="is not shard .'s own MQTT identity"):
            cfg.check_role(*other)  # another process's config: refused
    assert users == {"leader": "coordinator.leader.fleet1", "shard-0": "coordinator.fleet1.s0of2",
                     "shard-1": "coordinator.fleet1.s1of2"}
    passwords = {load_config(cdir / f"{s}.toml").broker.password for s in roles}
    assert len(passwords) == 3  # one password each
    plain = (out / "broker" / "passwd").read_text()
    assert sorted(line.split(":")[0] for line in plain.splitlines()) == sorted([*users.values(), *names])
    acl = (out / "broker" / "acl").read_text()
    assert "user coordinator\n" not in acl
    entries = {block.splitlines()[0].removeprefix("user "): block.splitlines()[1:]
               for block in ("\n" + acl).split("\nuser ")[1:]}
    lt = "fl/v1/fleet1/agg"
    # what every client reads, granted per user (a pattern without %u/%c makes Mosquitto warn)
    reads = ["topic read fl/v1/+/bc/#", "topic read fl/v1/+/coord/status"]
    for dev in names:
        # plus the shared downloads of the device's own shard's federation id, no other
        home = shard_federation("fleet1", shard_of(dev, 2), 2)
        assert [ln for ln in entries[dev] if ln.startswith("topic")] == [
            *reads, f"topic read fl/v1/{home}/shared/#"]
    assert [ln for ln in entries[users["leader"]] if ln.startswith("topic")] == [
        f"topic read {lt}/up/#", f"topic write {lt}/dn/#", f"topic write {lt}/leader/status", *reads]
    for i in (0, 1):
        assert [ln for ln in entries[users[f"shard-{i}"]] if ln.startswith("topic")] == [
            f"topic readwrite fl/v1/fleet1.s{i}of2/#", f"topic read {lt}/dn/shard-{i}/#",
            f"topic read {lt}/leader/status", f"topic write {lt}/up/shard-{i}/#", *reads]
    for dev in names:
        agent = tomllib.loads((out / "devices" / dev / "agent.toml").read_text())
        assert agent["device"]["federation"] == shard_federation("fleet1", shard_of(dev, 2), 2)
    # the old way, one config with the coordinator's login for every process: refused
    shared = (cdir / "leader.toml").read_text().replace(users["leader"], "coordinator")
    (tmp_path / "shared.toml").write_text(shared.replace('secret_file = "federation.secret"',
                                                         f'secret_file = "{cdir / "federation.secret"}"'))
    cfg = load_config(tmp_path / "shared.toml")
    for role, index in roles.values():
        with pytest.raises(ConfigError, match="username 'coordinator' is not"):
            cfg.check_role(role, index)
    # bad input: one line, nothing written
    assert main(["init", str(tmp_path / "x"), "--shards", "0"]) == 2
    assert main(["init", str(tmp_path / "y"), "--shards", "2", "--names",
                 "coordinator.leader.fleet1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--shards must be in 1..1024" in err[0] and "MQTT identity" in err[1], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def init_files(tmp_path: Path, *argv: str) -> tuple[Path, int]:
    """``fedcoe init`` on a free loopback port; the folder and the port."""
    from fedcoe_edge.broker import _free_port

    port = _free_port("127.0.0.1")
    out = tmp_path / "fed"
    assert main(["init", str(out), "--port", str(port), *argv]) == 0
    return out, port


def test_init_broker_starts_without_acl_warnings_and_confines_devices(
        tmp_path: Path, init_broker_tools: None) -> None:
    """Mosquitto started on init's files logs no ACL warning (a ``pattern`` without %u/%c
    draws one per line at every start), and the ACL still gives each device, cold ones
    included, the broadcasts, the coordinator's status and only its OWN up/downlink."""
    import re
    import threading

    from fedcoe_edge.broker import MosquittoBroker
    from fedcoe_edge.transport.mqtt import MqttTransport

    out, port = init_files(tmp_path, "--names", "dev1,dev2", "--cold", "1")
    login = {d: tomllib.loads((out / "devices" / d / "agent.toml").read_text())["broker"]["password"]
             for d in ("dev1", "dev2", "cold1")}
    login["coordinator"] = tomllib.loads((out / "coordinator" / "coordinator.toml").read_text())[
        "broker"]["password"]
    broker = MosquittoBroker.from_config_file(out / "broker" / "mosquitto.conf", port,
                                              workdir=tmp_path / "mq")
    got: dict[str, list[str]] = {"dev1": [], "cold1": [], "coordinator": []}
    cv = threading.Condition()

    def into(box: str) -> Any:
        def handler(msg: Any) -> None:
            with cv:
                got[box].append(msg.topic)
                cv.notify_all()
        return handler

    clients: list[MqttTransport] = []
    with broker:
        try:
            for user in ("coordinator", "dev1", "cold1"):
                t = MqttTransport(user, "127.0.0.1", port, username=user, password=login[user])
                t.connect(timeout=10)
                clients.append(t)
            coord, dev1, cold1 = clients
            for f in ("fl/v1/fleet1/bc/#", "fl/v1/fleet1/coord/status", "fl/v1/fleet1/dn/dev1/#",
                      "fl/v1/fleet1/dn/dev2/#"):
                dev1.subscribe(f, into("dev1"))
            cold1.subscribe("fl/v1/fleet1/bc/#", into("cold1"))
            coord.subscribe("fl/v1/fleet1/up/#", into("coordinator"))
            dev1.publish("fl/v1/fleet1/up/dev2/ctl", b"as dev2", qos=1)  # denied
            for topic in ("fl/v1/fleet1/dn/dev2/ctl", "fl/v1/fleet1/coord/status",
                          "fl/v1/fleet1/dn/dev1/ctl", "fl/v1/fleet1/bc/ctl"):
                coord.publish(topic, b"x", qos=1)
            dev1.publish("fl/v1/fleet1/up/dev1/ctl", b"as itself", qos=1)
            with cv:
                assert cv.wait_for(lambda: len(got["dev1"]) >= 3 and got["cold1"]
                                   and got["coordinator"], timeout=10), got
            time.sleep(1.0)  # anything denied would have arrived by now
        finally:
            for c in clients:
                c.close()
    assert sorted(got["dev1"]) == ["fl/v1/fleet1/bc/ctl", "fl/v1/fleet1/coord/status",
                                   "fl/v1/fleet1/dn/dev1/ctl"], got
    assert got["cold1"] == ["fl/v1/fleet1/bc/ctl"] and got["coordinator"] == ["fl/v1/fleet1/up/dev1/ctl"]
    log = (tmp_path / "mq" / "mosquitto.log").read_text()
    assert "running" in log
    warned = [ln for ln in log.splitlines() if re.search(r"warning|acl|pattern", ln, re.IGNORECASE)]
    assert warned == [], warned


def test_init_force_overwrites_its_own_files_and_leaves_others(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --force a used folder is refused in one line naming --force; with it, every
    file init writes is replaced (atomically, by rename: no temporary file is left) and any
    other file stays as it was. A folder where init writes a file refuses before replacing."""
    used = tmp_path / "used"
    (used / "coordinator").mkdir(parents=True)
    (used / "coordinator" / "coordinator.toml").write_text("old = 1\n")
    (used / "notes.txt").write_text("keep")
    (used / "devices" / "dev9").mkdir(parents=True)
    (used / "devices" / "dev9" / "agent.toml").write_text("mine")
    assert main(["init", str(used), "--names", "dev1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1, err
    assert (used / "coordinator" / "coordinator.toml").read_text() == "old = 1\n"

    (used / "broker" / "acl").mkdir(parents=True)  # a folder where init writes a file
    assert main(["init", str(used), "--names", "dev1", "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder where init writes a file" in err and len(err.splitlines()) == 1, err
    assert (used / "coordinator" / "coordinator.toml").read_text() == "old = 1\n"  # nothing replaced
    (used / "broker" / "acl").rmdir()

    assert main(["init", str(used), "--names", "dev1", "--force"]) == 0
    coord = tomllib.loads((used / "coordinator" / "coordinator.toml").read_text())
    assert coord["federation"]["allowed_devices"] == ["dev1"]
    secret = bytes.fromhex((used / "coordinator" / "federation.secret").read_text().strip())
    assert bytes.fromhex((used / "devices" / "dev1" / "device.key").read_text()) == device_key(secret, "dev1")
    assert mode(used / "devices" / "dev1" / "device.key") == 0o600
    assert mode(used / "coordinator" / "coordinator.toml") == 0o600
    assert (used / "notes.txt").read_text() == "keep"
    assert (used / "devices" / "dev9" / "agent.toml").read_text() == "mine"
    assert "user dev1" in (used / "broker" / "acl").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["used"]  # no temporary folder left


def test_init_warns_about_a_busy_broker_port_and_the_broker_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A port something already listens on (e.g. the system's mosquitto on 1883): init
    still writes the federation but warns in one line naming ``--port N``; a broker started
    from those files refuses in one line instead of taking the other broker for itself."""
    import socket

    from fedcoe_edge.broker import MosquittoBroker, find_mosquitto
    from fedcoe_edge.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = tmp_path / "fed"
        assert main(["init", str(out), "--port", str(port)]) == 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("warning:"), err
        assert f"127.0.0.1:{port} is already in use" in err and "--port N" in err
        assert "mosquitto" in err
        try:
            find_mosquitto()
        except ConfigError:
            pass  # no broker to start here: the init half still ran
        else:
            broker = MosquittoBroker.from_config_file(out / "broker" / "mosquitto.conf", port,
                                                      workdir=tmp_path / "mq")
            with pytest.raises(ConfigError, match=f"{port} is already in use.*--port N"):
                broker.start()
            assert not broker.running
            broker.close()
    # a free port: no warning at all
    assert main(["init", str(tmp_path / "free"), "--port", str(port)]) == 0
    assert capsys.readouterr().err == ""


def test_init_coordinator_config_carries_a_commented_eval_section(tmp_path: Path) -> None:
    """``[eval]`` is in the generated coordinator config, commented, saying what it does and
    that the accuracy column stays empty without it; uncommented, it loads as written."""
    from coordinator.config import load_config

    out = tmp_path / "fed"
    assert main(["init", str(out), "--names", "dev1"]) == 0
    path = out / "coordinator" / "coordinator.toml"
    text = path.read_text()
    assert "# [eval]" in text and "[eval]\n" not in text.replace("# [eval]\n", "")
    assert "accuracy" in text and "stays\n# empty" in text
    assert load_config(path).eval.dataset == ""  # commented: no evaluation
    on = "\n".join(ln[2:] if ln.startswith(("# [eval]", "# dataset", "# partition")) else ln
                   for ln in text.splitlines())
    path.write_text(on)
    cfg = load_config(path)
    assert cfg.eval.dataset == "digits" and cfg.eval.partition == "dirichlet"


def test_init_cold_writes_cold_device_templates(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """``--cold 2``: cold1 and cold2 get an agent.toml with ``role = "cold"``, their own
    derived key, a broker password and an ACL entry like every device; the coordinator
    allows them but does not wait for them before round 1."""
    from coordinator.config import load_config as load_coordinator
    from device_agent.config import load_config as load_agent

    out = tmp_path / "fed"
    assert main(["init", str(out), "--names", "dev1,dev2", "--cold", "2"]) == 0
    assert "cold1, cold2" in capsys.readouterr().out
    secret = bytes.fromhex((out / "coordinator" / "federation.secret").read_text().strip())
    plain = (out / "broker" / "passwd").read_text()
    acl = (out / "broker" / "acl").read_text()
    for dev, role in (("dev1", "train"), ("cold1", "cold"), ("cold2", "cold")):
        cfg = load_agent(out / "devices" / dev / "agent.toml")
        assert cfg.device.role == role and cfg.device.id == dev and cfg.broker.username == dev
        assert cfg.key == device_key(secret, dev)
        assert mode(out / "devices" / dev / "agent.toml") == 0o600
        assert f"\nuser {dev}\n" in acl
        assert plain.count(f"{dev}:") == 1
    coord = load_coordinator(out / "coordinator" / "coordinator.toml")
    assert coord.federation.allowed_devices == ["dev1", "dev2", "cold1", "cold2"]
    assert coord.federation.min_devices == 2
    assert main(["init", str(tmp_path / "x"), "--names", "cold1", "--cold", "1"]) == 2
    assert main(["init", str(tmp_path / "y"), "--cold", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "cold1 is a --cold device's id" in err[0] and "--cold must be" in err[1], err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_the_acl_templates_sharded_example_is_what_init_writes() -> None:
    """deploy/mosquitto/acl shows, commented out, the aggregator entries of federation fleet1
    with 2 shards; they must grant exactly what `fedcoe init --shards 2` grants, or an operator
    copying the example gets aggregators that cannot read the broadcasts."""
    import argparse

    from fedcoe_edge.commands.init import acl_text

    def grants(text: str) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        user = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("user "):
                user = line.split()[1]
            elif line.startswith("topic ") and user.startswith("coordinator."):
                out.append((user, *line.split()[1:]))
        return sorted(out)

    template = (Path(__file__).resolve().parents[1] / "deploy" / "mosquitto" / "acl").read_text()
    example = "\n".join(line[2:] if line.startswith("# user ") or line.startswith("# topic ")
                        else line for line in template.splitlines())
    written = acl_text(argparse.Namespace(federation="fleet1", shards=2))
    assert grants(example) == grants(written) and len(grants(written)) == 17
