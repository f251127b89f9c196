"""The deployments the docs describe, end to end, as a user runs them.

Every test provisions with ``fedcoe init`` and runs the files it writes: Mosquitto from
``broker/mosquitto.conf`` (password file, ACL, ``use_username_as_clientid``, persistence
in the temporary folder, a free loopback port; ``MosquittoBroker.from_config_file`` adds
only a log file and, as root, ``user root``), and every daemon as a subprocess of the
documented command (``fedcoe coordinator --config ...``, ``fedcoe agent --config ...``)
with its own defaults. Each asserts the rounds applied, the updates accepted and no
ERROR or traceback in any log:

* the camera federation (docs/daemons.md, "Pretrained trunk"): ``fedcoe pretrain-trunk``
  makes a MobileNetV3-Small trunk, the coordinator runs it frozen with its default config
  (streamed aggregation), two devices fetch it and train three rounds, then a cold device
  fetches it and starts from the final experts;
* the sharded federation (docs/daemons.md, "Past one machine"): a leader and two shard
  aggregators, each logging in with the identity ``fedcoe init --shards 2`` gave it, three
  rounds, and not one disconnect or session takeover in the broker's log;
* the quickstart federation (docs/quickstart.md, step 4): the quickstart's own trunk module
  and image folders with a class list, three rounds, then ``fedcoe predict`` on the int8
  bundle each device rebuilt.

All three are ``slow`` (the camera one a pretrained trunk and four daemons on
MobileNetV3-Small, the sharded one seven daemon processes, the quickstart a broker, a
coordinator and three agents for three rounds): tens of seconds to minutes of wall time on
two cores each, so ``make test-all`` runs them (README, "Tests"). ``make test`` keeps the
``fedcoe init --shards`` ACL check here and the trunk fetch over the wire
(tests/test_trunk_fetch.py).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import tomllib

from fedcoe_edge.broker import MosquittoBroker, _free_port
from fedcoe_edge.errors import ConfigError
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


def round_rows(sqlite: Path, rounds: int) -> tuple[list[dict[str, Any]], dict[tuple[str, str], int]]:
    """A stopped coordinator's per-round table and traffic totals, from its SQLite."""
    from coordinator.store import Store

    store = Store(sqlite)
    try:
        return [store.round_summary(r) for r in range(1, rounds + 1)], store.traffic()
    finally:
        store.close()


def set_keys(path: Path, section: str, **values: Any) -> None:
    """Set keys in one section of a TOML file written by ``fedcoe init``, as a user edits it:
    an existing ``key = ...`` line is replaced, a new key goes right under the header."""
    lines = path.read_text().splitlines()
    start = lines.index(f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for key, value in values.items():
        text = f"{key} = {json.dumps(value)}"
        hit = [i for i in range(start + 1, end) if re.match(rf"{key}\s*=", lines[i])]
        if hit:
            lines[hit[0]] = text
        else:
            lines.insert(start + 1, text)
            end += 1
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())  # still valid TOML


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
@pytest.mark.slow
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


def test_init_shards_acl_confines_each_aggregator_to_its_topics(tmp_path: Path,
                                                                 init_broker_tools: None) -> None:
    """The broker ``fedcoe init --shards 2`` configures: each aggregator logs in with its own
    password and may use only its topics. Shard 0 reaches the leader on its own channel but
    cannot write shard 1's, nor read shard 1's devices; a device cannot read the leader's
    channel; the coordinator's old shared login does not exist."""
    import threading

    from coordinator.config import load_config
    from fedcoe_edge.transport.mqtt import MqttTransport

    dep = Deployment(tmp_path)
    fed, port = dep.init("--names", "dev1,dev2", "--shards", "2")
    cdir = fed / "coordinator"
    login = {stem: load_config(cdir / f"{stem}.toml").broker for stem in ("leader", "shard-0", "shard-1")}
    dev1 = tomllib.loads((fed / "devices" / "dev1" / "agent.toml").read_text())["broker"]
    dep.start_broker(fed, port)
    got: dict[str, list[str]] = {"leader": [], "shard-0": [], "dev1": []}
    cv = threading.Condition()

    def into(box: str) -> Callable[[Any], None]:
        def handler(msg: Any) -> None:
            with cv:
                got[box].append(msg.topic)
                cv.notify_all()
        return handler

    def client(user: str, password: str) -> MqttTransport:
        t = MqttTransport(user, "127.0.0.1", port, username=user, password=password)
        t.connect(timeout=10)
        return t

    clients = []
    try:
        with pytest.raises(ConfigError, match="refused"):
            client("coordinator", login["leader"].password).connect(timeout=10)
        leader = client(login["leader"].username, login["leader"].password)
        shard0 = client(login["shard-0"].username, login["shard-0"].password)
        dev = client("dev1", dev1["password"])
        clients += [leader, shard0, dev]
        lt = "fl/v1/fleet1/agg"
        leader.subscribe(f"{lt}/up/+/ctl", into("leader"))
        shard0.subscribe("fl/v1/fleet1.s1of2/up/+/ctl", into("shard-0"))  # shard 1's devices
        dev.subscribe(f"{lt}/#", into("dev1"))
        shard0.publish(f"{lt}/up/shard-1/ctl", b"as shard 1", qos=1)  # denied
        dev.publish("fl/v1/fleet1.s1of2/up/dev1/ctl", b"a device's own uplink", qos=1)
        leader.publish(f"{lt}/dn/shard-0/ctl", b"to shard 0", qos=1)
        shard0.publish(f"{lt}/up/shard-0/ctl", b"as itself", qos=1)  # allowed, and sent last
        with cv:
            assert cv.wait_for(lambda: got["leader"], timeout=10), got
        time.sleep(1.0)  # anything denied would have arrived by now
        assert got == {"leader": [f"{lt}/up/shard-0/ctl"], "shard-0": [], "dev1": []}, got
    finally:
        for c in clients:
            c.close()
        dep.close()


# --- (a) the camera federation ------------------------------------------------------------
CAMERA_SIZE = 32


def camera_npz(path: Path, part: int, parts: int, per_device: int = 90) -> None:
    """Digits resized to 32x32 RGB (what a camera feeds), a disjoint slice per device."""
    from fedcoe_edge.data.datasets import load_digits
    from fedcoe_edge.pretrain import to_camera

    x, y = load_digits()
    idx = np.random.default_rng(0).permutation(len(y))[part::parts][:per_device]
    cam, lab = to_camera(x[idx], CAMERA_SIZE), y[idx].astype(np.int64)
    cut = per_device * 2 // 3
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=cam[:cut], y_train=lab[:cut], x_test=cam[cut:], y_test=lab[cut:])


@pytest.mark.slow
def test_camera_federation_frozen_pretrained_trunk_fetched_by_devices(
        tmp_path: Path, init_broker_tools: None) -> None:
    """docs/daemons.md, "Pretrained trunk", as written: ``fedcoe pretrain-trunk`` (one epoch
    on a public digits slice at 32x32), its two printed lines pasted into the coordinator's
    ``[model]`` next to ``trunk = "mobilenet_v3_small"`` and ``trunk_mode = "frozen"``, every
    other coordinator setting its default (streamed aggregation). Two devices with no trunk
    file fetch it and train three rounds, each update accepted and applied; then a cold
    device fetches it too and starts from the final experts."""
    dep = Deployment(tmp_path)
    dep.env["FEDCOE_DEVICE_BUNDLE"] = "off"  # a V3-Small int8 export per device: not this test's
    train, cold = ["cam1", "cam2"], "cold1"  # `fedcoe init --cold 1` names its cold device cold1
    fed, port = dep.init("--names", ",".join(train), "--cold", "1",
                         "--image-shape", f"3,{CAMERA_SIZE},{CAMERA_SIZE}",
                         "--rounds", "3", "--data", "local.npz")
    cfg = fed / "coordinator" / "coordinator.toml"
    done = subprocess.run([*FEDCOE, "pretrain-trunk", "--dataset", "digits", "--size", str(CAMERA_SIZE),
                           "--epochs", "1", "--public-fraction", "0.2", "--batch-size", "32",
                           "--threads", "1", "--no-progress",
                           "--out", str(fed / "coordinator" / "trunk.safetensors")],
                          capture_output=True, text=True, env=dep.env, check=False)
    assert done.returncode == 0, done.stderr
    pasted = dict(re.findall(r'^(trunk_weights|trunk_sha256) = "(.*)"$', done.stdout, re.MULTILINE))
    assert set(pasted) == {"trunk_weights", "trunk_sha256"}, done.stdout
    set_keys(cfg, "model", trunk="mobilenet_v3_small", trunk_mode="frozen", expert_kind="mlp", **pasted)
    for i, dev in enumerate([*train, cold]):
        camera_npz(fed / "devices" / dev / "local.npz", i, 3)
    trunk_bytes = (fed / "coordinator" / "trunk.safetensors").stat().st_size
    dep.start_broker(fed, port)
    try:
        dep.spawn("coordinator", "coordinator", "--config", str(cfg))
        for dev in train:
            dep.spawn(dev, "agent", "--config", "agent.toml", cwd=fed / "devices" / dev)
        dep.wait(lambda: "all 3 rounds done" in dep.log("coordinator"), "3 rounds", 300)
        dep.spawn(cold, "agent", "--config", "agent.toml", cwd=fed / "devices" / cold)
        dep.wait(lambda: "cold start ready" in dep.log(cold), "the cold device's start", 120)
        codes = dep.stop()
    finally:
        dep.close()
    rows, traffic = round_rows(fed / "coordinator" / "state" / "coordinator.sqlite", 3)
    tail = dep.log("coordinator")[-3000:]
    assert [(r["accepted"], r["failed"], r["rejected"], r["applied"]) for r in rows] == \
        [(2, 0, 0, True)] * 3, f"{rows}\n{tail}"
    # every device, the cold one included, downloaded the trunk file once; rounds carry none of it
    assert traffic.get(("down", "trunk")) == 3 * trunk_bytes, traffic
    for dev in [*train, cold]:
        assert (fed / "devices" / dev / "state" / "trunk.safetensors").stat().st_size == trunk_bytes
    # a round's task per device is smaller than the trunk alone: no trunk tensor travels
    assert all(0 < r["bytes_down"] / len(train) < trunk_bytes for r in rows), \
        [(r["bytes_down"], r["bytes_up"]) for r in rows]
    assert codes == {name: 0 for name in codes}, codes
    dep.assert_clean_logs()


# --- (c) the quickstart federation from image folders --------------------------------------
QUICKSTART = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
# a colour per class: each device's photos of a class are noisy shades of it
COLOUR = {"cat": (200, 60, 40), "dog": (40, 180, 60), "bird": (50, 70, 210)}


def quickstart_blocks() -> tuple[str, dict[str, Any], list[str]]:
    """What docs/quickstart.md tells the user to write and run: the trunk module
    (``mymodels/nets.py``), the ``[model]`` of ``model.toml`` and the ``fedcoe init`` line."""
    text = QUICKSTART.read_text()
    blocks = re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL)
    module = next(b for lang, b in blocks if lang == "python" and b.startswith("# mymodels/nets.py"))
    model = next(tomllib.loads(b)["model"] for lang, b in blocks if lang == "toml" and "[model]" in b)
    init = next(ln for lang, b in blocks for ln in b.splitlines() if ln.startswith("fedcoe init "))
    return module, model, shlex.split(init)


def write_photos(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = np.clip(np.array(COLOUR[c]) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / c / f"{i}.png")


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_quickstart_federation_from_image_folders(tmp_path: Path, init_broker_tools: None) -> None:
    """docs/quickstart.md step 4 as written: its ``fedcoe init`` line (host and port made
    local), the trunk module of step 3 importable by every process, its ``[model]`` fields in
    the coordinator's config, each device's photos in ``data/<class>/`` (the devices hold
    different class sets), the broker, the coordinator and two agents; three rounds, every
    update accepted, then each device predicts with the int8 bundle it rebuilt."""
    module, model, init = quickstart_blocks()
    assert init[:3] == ["fedcoe", "init", "myfed"]
    argv = init[3:]
    if "--host" in argv:  # the docs' LAN address; the test's broker is on loopback
        i = argv.index("--host")
        del argv[i:i + 2]
    pkg = tmp_path / "userpkg" / "mymodels"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(module)
    dep = Deployment(tmp_path)
    dep.env["PYTHONPATH"] = os.pathsep.join([str(pkg.parent), dep.env.get("PYTHONPATH", "")])
    fed, port = dep.init(*argv, "--rounds", "3")
    cfg = fed / "coordinator" / "coordinator.toml"
    classes = tomllib.loads(cfg.read_text())["federation"]["classes"]
    assert classes == ["cat", "dog", "bird"] and model["trunk"] == "mymodels.nets:resnet8"
    set_keys(cfg, "model", **model)
    devices = sorted(p.name for p in (fed / "devices").iterdir())
    assert devices == ["pi-a", "pi-b"]
    write_photos(fed / "devices" / "pi-a" / "data", ["cat", "dog", "bird"], 10, 0)
    write_photos(fed / "devices" / "pi-b" / "data", ["dog", "bird"], 12, 1)
    dep.start_broker(fed, port)
    try:
        dep.spawn("coordinator", "coordinator", "--config", str(cfg))
        for dev in devices:
            dep.spawn(dev, "agent", "--config", "agent.toml", cwd=fed / "devices" / dev)
        dep.wait(lambda: "all 3 rounds done" in dep.log("coordinator"), "3 rounds", 300)
        dep.wait(bundled(fed, devices), "every device's int8 bundle", 240)
        codes = dep.stop()
    finally:
        dep.close()
    rows, _ = round_rows(fed / "coordinator" / "state" / "coordinator.sqlite", 3)
    assert [(r["accepted"], r["failed"], r["rejected"], r["applied"]) for r in rows] == \
        [(2, 0, 0, True)] * 3, f"{rows}\n{dep.log('coordinator')[-3000:]}"
    assert codes == {name: 0 for name in codes}, codes
    dep.assert_clean_logs()
    # the quickstart's last step, on a device: predict by class name with its own bundle
    from PIL import Image

    photo = np.asarray(Image.open(fed / "devices" / "pi-a" / "data" / "cat" / "0.png")
                       .convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    np.save(tmp_path / "x.npy", photo.transpose(2, 0, 1)[None] / 255)
    out = subprocess.run([*FEDCOE, "predict", "--bundle", "state/bundle", "--input", str(tmp_path / "x.npy")],
                         cwd=fed / "devices" / "pi-a", capture_output=True, text=True, env=dep.env,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert any(c in out.stdout for c in classes), out.stdout
