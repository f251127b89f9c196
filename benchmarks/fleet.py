"""Fleet load generator: N simulated devices against the real coordinator and Mosquitto.

``python -m benchmarks.fleet --devices 100 500 --rounds 2 --json PATH [--md PATH --png PATH]``

For every N: a private Mosquitto on a free loopback port, by default the deploy template's
broker (``deploy/mosquitto/mosquitto.conf`` generated into the run's folder: per-client
passwords, the template's ACL with an entry per device, ``use_username_as_clientid``, persistence and
the limits), the real coordinator process (``fedcoe coordinator --exit-when-done``), and N
devices that speak the real protocol (docs/design.md, section 8; docs/protocol.md) with the
project's own code and the device agent's habits: signed envelopes with per-device keys,
the agent's keepalive, session and heartbeats (their values imported from the agent's
config), chunked transfers with the blob window, int8-delta uploads of the size the chosen
model config gives, the final refresh fetch and the eval report, requests retried on the
agent's schedule, each device on its own MQTT connection. Training is a configurable sleep;
each device's update is the task's weights plus noise seeded by the device and round, so
the coordinator decompresses, validates and aggregates distinct real payloads. Each of
these has a flag that restores the first generator's shortcut (``--lenient``: all of them).

The devices run on an asyncio MQTT client (``benchmarks.mqtt_async``), many per process,
so the generator stays light; its own CPU is reported beside the coordinator's and the
broker's. Per round: wall time, time until the last device got its task, coordinator
CPU-s and peak RSS, broker RSS, bytes, accepted / failed / rejected, broker drops (the
``$SYS/broker/publish/messages/dropped`` counter). See docs/benchmarks.md, "Fleet".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import numpy as np

from benchmarks import fleet_profile
from coordinator.config import FederationSettings
from device_agent.config import DeviceSettings
from device_agent.daemon import REANNOUNCE_S, RETRY_ATTEMPTS, PendingRequest, retry_delay
from fedcoe_edge.protocol import DEFAULT_WINDOW, BrokerSettings
from fedcoe_edge.wire import DEFAULT_CHUNK_SIZE

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_COORDINATOR = ROOT / "deploy" / "coordinator.toml"
DEPLOY_MOSQUITTO = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
DEPLOY_ACL = ROOT / "deploy" / "mosquitto" / "acl"
PROFILE_JSON = ROOT / "benchmarks" / "results" / "fleet_profile.json"
FEDERATION = "fleet"
SECRET = bytes(range(100, 132))
BROKER_LIMITS = ("max_packet_size", "max_queued_messages", "max_inflight_messages",
                 "max_queued_bytes")
TICK_S = 0.25
VARIANTS = 4  # --shared-updates: distinct fake updates per task payload
# The device agent's own defaults, never copies (device_agent/config.py, BrokerSettings):
AGENT_HEARTBEAT_S = DeviceSettings.heartbeat_s
AGENT_KEEPALIVE_S = BrokerSettings.keepalive_s
AGENT_SESSION_EXPIRY_S = BrokerSettings.session_expiry_s
LENIENT_KEEPALIVE_S = 300  # the first generator's keepalive (--lenient only)
MONITOR = "fleet-monitor"  # the generator's $SYS reader: a broker user of its own
# The deploy template's TLS listener lines: the private broker listens on loopback only
TLS_KEYS = ("protocol", "cafile", "certfile", "keyfile", "tls_version", "require_certificate",
            "use_identity_as_username", "capath", "ciphers")

log = logging.getLogger("fedcoe.fleet")


# ----------------------------------------------------------------------------- config
def model_preset(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``[model]`` and ``[train]`` tables: the deploy template's, or the camera benchmark's."""
    if name == "deploy":
        doc = tomllib.loads(DEPLOY_COORDINATOR.read_text())
        return dict(doc["model"]), dict(doc["train"])
    if name in ("camera", "smoke"):
        from benchmarks.fedcoe import camera_config, smoke_config

        cfg = camera_config() if name == "camera" else smoke_config()
        d = cfg.to_dict()
        d["input_shape"] = list(d["input_shape"])
        return d, {"experts_per_client": 2}
    raise SystemExit(f"fleet: unknown --model {name!r} (deploy|camera|smoke)")


def broker_limits(path: Path = DEPLOY_MOSQUITTO) -> list[str]:
    """The limit lines of the deploy template, verbatim (so the benchmark follows it)."""
    out = []
    for line in path.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[0] in BROKER_LIMITS:
            out.append(f"{words[0]} {words[1]}")
    return out


def aggregator_logins(shards: int) -> dict[str, str]:
    """Config stem -> MQTT identity (= broker username) of each coordinator process
    (``coordinator.config.mqtt_identity``): ``coordinator``, or ``leader`` and ``shard-<i>``."""
    from coordinator.config import Role, mqtt_identity

    fed = FederationSettings(id=FEDERATION, shards=max(1, shards))
    if not shards:
        return {"coordinator": mqtt_identity(fed, Role.SINGLE)}
    out = {"leader": mqtt_identity(fed, Role.LEADER, shards=shards)}
    for i in range(shards):
        out[f"shard-{i}"] = mqtt_identity(fed, Role.SHARD, i, shards=shards)
    return out


def _acl_blocks(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """The template ACL's ``user`` blocks (its rules), its commented-out example blocks (the
    sharded layout) and its ``pattern`` lines."""
    active: dict[str, list[str]] = {}
    example: dict[str, list[str]] = {}
    patterns: list[str] = []
    cur: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        commented = line.startswith("#")
        words = line.lstrip("#").split()
        if not words or words[0] not in ("user", "topic", "pattern"):
            cur = None  # a blank line or prose ends a block
            continue
        if words[0] == "pattern" and not commented:
            patterns.append(" ".join(words))
        elif words[0] == "user" and len(words) == 2:
            cur = (example if commented else active).setdefault(words[1], [])
        elif words[0] == "topic" and cur is not None:
            cur.append(" ".join(words))
    return active, example, patterns


def acl_from_template(ids: list[str], shards: int, template: Path = DEPLOY_ACL) -> str:
    """This fleet's ACL from ``deploy/mosquitto/acl``: the template's ``coordinator`` entry
    (or, sharded, its commented example entries for the leader and a shard, renamed for
    this federation and each shard), its ``pattern`` lines, and its per-device entry once
    for every device id."""
    import re

    from fedcoe_edge.sharding import shard_federation, shard_name

    active, example, patterns = _acl_blocks(template.read_text())
    logins = aggregator_logins(shards)
    coord = logins.get("coordinator", "")
    device_user = next(u for u in active if u != "coordinator")  # the template's dev0
    out = [f"# generated by benchmarks.fleet from {template.relative_to(ROOT)}"]
    if not shards:
        out += [f"user {coord}", *active["coordinator"]]
    else:
        leader = next(u for u in example if ".leader." in u)
        shard = next(u for u in example if re.fullmatch(r"[\w-]+\.[\w-]+\.s0of\d+", u))
        _, ex_fed, ex_part = shard.split(".")
        ex_shards = int(ex_part.split("of")[1])
        out += [f"user {logins['leader']}",
                *(t.replace(ex_fed, FEDERATION) for t in example[leader])]
        for i in range(shards):
            rename = [(shard_federation(ex_fed, 0, ex_shards), shard_federation(FEDERATION, i, shards)),
                      ("/" + shard_name(0) + "/", "/" + shard_name(i) + "/"), (ex_fed, FEDERATION)]
            rules = []
            for t in example[shard]:
                for a, b in rename:
                    t = t.replace(a, b)
                rules.append(t)
            out += ["", f"user {logins[f'shard-{i}']}", *rules]
    out += ["", *patterns, ""]
    from fedcoe_edge.sharding import shard_of

    for dev in ids:
        # the template's device entry names federation fleet1 for its shared downloads:
        # each device reads its own federation's (its shard's) only
        home = (FEDERATION if not shards
                else shard_federation(FEDERATION, shard_of(dev, shards), shards))
        out += [f"user {dev}", *(t.replace(device_user, dev).replace("fl/v1/fleet1/",
                                                                      f"fl/v1/{home}/")
                                 for t in active[device_user])]
    return "\n".join(out) + "\n"


def deploy_broker_files(folder: Path, port: int, ids: list[str], shards: int,
                        template: Path = DEPLOY_MOSQUITTO) -> Path:
    """The deploy template's broker for this run, written into ``folder``: every line of
    ``deploy/mosquitto/mosquitto.conf`` kept (``allow_anonymous false``,
    ``use_username_as_clientid``, the limits, ``persistent_client_expiration``,
    ``persistence`` with its ``autosave_interval``) except what names the host: one loopback
    listener on ``port`` instead of the TLS listeners, and the password file, ACL and
    persistence folder in ``folder``. The ACL is ``deploy/mosquitto/acl``'s rules with an
    entry per device (:func:`acl_from_template`), the passwords one per client, hashed with
    ``mosquitto_passwd -U`` as ``fedcoe init`` does. Returns the config file. Plus a user
    for the generator's ``$SYS`` reader."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise RuntimeError("fleet: --broker deploy needs mosquitto_passwd (the mosquitto "
                           "package) to hash the per-device passwords; or give --broker open")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    passwd, acl_file = folder / "passwd", folder / "acl"
    paths = {"password_file": str(passwd), "acl_file": str(acl_file),
             "persistence_location": f"{folder / 'data'}/"}
    out, listened = [f"# generated by benchmarks.fleet from {template.relative_to(ROOT)}"], False
    for line in template.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            out.append(line)
        elif words[0] == "listener":
            if not listened:
                out.append(f"listener {port} 127.0.0.1")
                listened = True
        elif words[0] in TLS_KEYS or words[0] == "log_dest":
            out.append(f"# (fleet: loopback run) {line}")
        elif words[0] in paths:
            out.append(f"{words[0]} {paths[words[0]]}")
        else:
            out.append(line)
    users = [*aggregator_logins(shards).values(), *ids, MONITOR]
    acl = acl_from_template(ids, shards) + (
        f"\n# the fleet generator's $SYS reader\nuser {MONITOR}\ntopic read $SYS/#\n"
        "topic read fl/v1/+/coord/status\n")
    acl_file.write_text(acl)
    passwd.write_text("".join(f"{u}:{password_of(u)}\n" for u in users))
    passwd.chmod(0o600)
    done = subprocess.run([tool, "-U", str(passwd)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fleet: mosquitto_passwd -U {passwd} failed: {done.stderr.strip()}")
    conf = folder / "fedcoe.conf"
    conf.write_text("\n".join(out) + "\n")
    return conf


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FleetSpec:
    devices: int
    rounds: int
    model: str = "deploy"
    train_s: float = 1.0
    jitter_s: float = 0.5
    procs: int = 1
    timeout_s: float = 900.0
    deadline_s: float = 0.0  # 0: 60 s + 60 ms per device
    connect_batch: int = 200
    chunk_size: int = DEFAULT_CHUNK_SIZE
    workdir: str = ""
    broker_options: list[str] = field(default_factory=list)  # extra mosquitto.conf lines
    coordinator_args: list[str] = field(default_factory=list)
    # 0: one coordinator; S >= 1: a leader and S shard aggregators, each device on the shard
    # its id hashes to (docs/daemons.md, "Past one machine")
    shards: int = 0
    # how to start `fedcoe` (e.g. under a profiler); default: this interpreter
    fedcoe_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "fedcoe_edge.cli"])
    # sample the coordinator with py-spy into the work folder (benchmarks/fleet_profile.py)
    profile: bool = False
    # "deploy": the deploy template's broker (passwords, ACL, client id = username,
    # persistence and its limits), generated into the work folder; "open": anonymous, no
    # ACL, no persistence (the first generator's, for comparison)
    broker: str = "deploy"
    heartbeat_s: float = AGENT_HEARTBEAT_S  # each device's telemetry interval; 0: none
    keepalive_s: int = AGENT_KEEPALIVE_S
    # the agent's MQTT session: clean_start false and a session expiry (else clean sessions)
    agent_session: bool = True
    # each device its own update bytes (own seeded noise); False: one of VARIANTS shared
    # updates per task payload, built once
    distinct_updates: bool = True
    # [federation] workers of the coordinator: aggregation worker processes (0: in-process;
    # docs/daemons.md, "Scale"); their CPU and RSS are sampled as its children
    workers: int = 0
    # the coordinator's [federation] shared_downloads: True / False written into its config;
    # None leaves the daemon's default (docs/protocol.md, "Shared downloads")
    shared_downloads: bool | None = None


def password_of(dev: str) -> str:
    """A client's broker password: derived from the run's secret, so the generator's worker
    processes need no list of them (the broker holds only the hashes)."""
    return hashlib.sha256(b"fleet-broker\0" + SECRET + dev.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------- devices
@dataclass
class _Upload:
    round: int
    body: dict[str, Any]
    sender: Any
    started: bool = False
    next_announce: float = 0.0
    done: bool = False


class SimDevice:
    """One device: the agent's protocol without torch (docs/protocol.md)."""

    def __init__(self, fleet: DeviceFleet, dev: str) -> None:
        from fedcoe_edge import protocol as P
        from fedcoe_edge.transport.blob import BlobReceiver

        self.P = P
        self.fleet, self.dev = fleet, dev
        self.key = P.device_key(SECRET, dev)
        rng = random.Random(dev)
        self.num_samples = rng.randint(50, 150)
        self.variant = rng.randrange(VARIANTS)
        self.client = self.reconnectable()
        self.receiver = BlobReceiver(self._report, auto_ack=True)
        self.bc_key: bytes | None = None
        self.welcomed_at = 0.0
        self.hello_at = 0.0
        self.version = 0
        self.rounds = fleet.spec.rounds
        self.pending: dict[str, dict[str, Any]] = {}
        self.upload: _Upload | None = None
        self.requests: dict[tuple[str, str, int], PendingRequest] = {}
        self.task_at: dict[int, float] = {}
        self.accepted_at: dict[int, float] = {}
        self.rejects: list[str] = []
        self.refused_msgs = 0
        self.final_model = False
        self.eval_acked = False
        self.gave_up: list[str] = []
        self.refresh_asked = False
        self.update_sha: dict[int, str] = {}
        self.heartbeats = 0
        self.task_chunks = 0
        self.update_chunks = 0
        # shared downloads, as the agent assembles them (device_agent/daemon.py,
        # DeviceAgent._shared_start): transfer id -> reassembly, shared id -> transfer ids
        self.shared_dl: dict[str, Any] = {}
        self.shared_sub: dict[str, set[str]] = {}
        self.shared_failed: set[str] = set()
        self.shared_done = 0
        self.shared_fallbacks: list[str] = []

    def reconnectable(self) -> Any:
        """A fresh client with this device's will, birth and subscriptions (and messenger)."""
        from benchmarks.mqtt_async import AsyncMqttClient
        from fedcoe_edge.transport import Will

        P, t, dev = self.P, self.fleet.topics_for(self.dev), self.dev
        self.topics = t
        spec = self.fleet.spec
        auth = spec.broker == "deploy"
        client = AsyncMqttClient(
            dev, *self.fleet.address_for(dev), keepalive_s=spec.keepalive_s,
            will=Will(t.presence(dev), P.presence_payload("offline"), 1, True),
            birth=Will(t.presence(dev), P.presence_payload("online"), 1, True),
            session_expiry_s=AGENT_SESSION_EXPIRY_S if spec.agent_session else 0,
            clean_start=not spec.agent_session,
            username=dev if auth else "", password=password_of(dev) if auth else "")
        client.subscribe(f"{t.prefix}/dn/{dev}/#", self._on_dn)
        client.subscribe(t.bc_ctl(), self._on_broadcast)
        client.subscribe(t.coord_status(), self._on_coord_status)
        self.messenger = P.Messenger(client, t, dev, self._keys)
        return client

    def _keys(self, sender: str) -> bytes | None:
        return self.key if sender == self.fleet.coordinator else None

    def _send(self, type: str, body: dict[str, Any], rnd: int = 0) -> None:
        self.messenger.send(self.topics.up_ctl(self.dev), type, self.fleet.coordinator,
                            body, self.key, round=rnd)

    def _report(self, type: str, body: dict[str, Any]) -> None:
        self._send(type, body)

    @property
    def finished(self) -> bool:
        return self.eval_acked or bool(self.gave_up)

    def hello(self) -> None:
        self.hello_at = time.monotonic()
        self._send(self.P.HELLO, {"role": "train", "tier": "medium", "memory_mb": 1024.0,
                                  "num_samples": self.num_samples, "runtime": "fleet-sim"})

    def beat(self) -> None:
        """One heartbeat as the agent sends it (device_agent/daemon.py, ``DeviceAgent._beat``):
        signed telemetry on ``up/<id>/hb`` at QoS 0, skipped while disconnected, then the
        next one ``heartbeat_s`` later until the device closes."""
        from fedcoe_edge.wire import Envelope, encode_envelope

        if self.client.connected:
            body = {"rss_mb": 200.0, "load": 0.5, "rounds_done": len(self.accepted_at)}
            env = Envelope.new(self.P.HEARTBEAT, federation=self.topics.federation,
                               sender=self.dev, recipient=self.fleet.coordinator, body=body,
                               ttl_s=120)  # the agent's heartbeat ttl
            self.client.publish(self.topics.up_hb(self.dev), encode_envelope(env, self.key), qos=0)
            self.heartbeats += 1
        if not self.fleet.closing:
            asyncio.get_running_loop().call_later(self.fleet.spec.heartbeat_s, self.beat)

    def _request(self, type: str, sub: str, rnd: int, body: dict[str, Any]) -> None:
        key = (type, sub, rnd)
        req = self.requests.setdefault(key, PendingRequest(type, body, rnd))
        req.sent += 1
        req.due = time.monotonic() + retry_delay(req.sent)
        self.fleet.active.add(self)
        self._send(type, body, rnd)

    # --- handlers (event loop) ---
    def _on_dn(self, msg: Any) -> None:
        if "/blob/" in msg.topic:
            self._on_blob(msg)
        else:
            self._on_ctl(msg)

    def _on_ctl(self, msg: Any) -> None:
        from fedcoe_edge.errors import FedCoEError
        from fedcoe_edge.transport.blob import XFER_DONE, XFER_PROGRESS
        from fedcoe_edge.wire import TransferManifest

        P = self.P
        try:
            env = self.messenger.open(msg.payload, expect_sender=self.fleet.coordinator)
        except FedCoEError:
            self.refused_msgs += 1
            return
        b = env.body
        if env.type == P.WELCOME:
            self.bc_key = bytes.fromhex(b["bc_key"])
            self.version = int(b["version"])
            self.rounds = int(b["rounds"])
            self.welcomed_at = time.monotonic()
        elif env.type in (P.TASK, P.MODEL):
            manifest = TransferManifest.from_dict(b["manifest"])
            if env.type == P.TASK:
                self.task_at.setdefault(env.round, time.time())
                self.task_chunks = max(self.task_chunks, manifest.chunk_count)
                self.version = int(b.get("version", self.version))
            else:
                req = self.requests.get((P.FETCH, "refresh", env.round))
                if req is not None:
                    req.due = time.monotonic() + 60.0  # the download is under way
            self.pending[manifest.transfer_id] = {"kind": env.type, "round": env.round,
                                                  "expert_ids": b.get("expert_ids", [])}
            if b.get("shared") is not None and self._shared_start(manifest, b["shared"]):
                return
            self.receiver.expect(manifest)
            self.receiver.nudge(manifest.transfer_id)
        elif env.type in (XFER_PROGRESS, XFER_DONE):
            up = self.upload
            if up is not None and up.sender.manifest.transfer_id == b.get("xfer"):
                up.started = True
                if env.type == XFER_PROGRESS:
                    up.sender.on_progress(b)
                else:
                    up.sender.on_done(b)
        elif env.type == P.ACCEPT:
            self.accepted_at.setdefault(env.round, time.time())
            if self.upload is not None and self.upload.round == env.round:
                self.upload.done = True
        elif env.type == P.REJECT:
            reason = str(b.get("reason"))
            self.rejects.append(f"round {env.round}: {reason}")
            if self.upload is not None and self.upload.round == env.round:
                self.upload.done = True
        elif env.type == P.XFER_UNKNOWN:
            if self.upload is not None and not self.upload.done:
                self.upload.next_announce = 0.0
        elif env.type == P.EVAL_ACK:
            self.requests.pop((P.EVAL, str(b.get("kind")), env.round), None)
            if env.round >= self.rounds:
                self.eval_acked = True

    # --- shared downloads (the agent's, device_agent/daemon.py) ---
    def _shared_start(self, manifest: Any, shared: Any) -> bool:
        """Assemble from the federation's shared copy: subscribe, reassemble, check the
        sha256 of the signed manifest; False: the per-device transfer."""
        from fedcoe_edge.errors import FedCoEError
        from fedcoe_edge.messages import SharedRef
        from fedcoe_edge.transport.shared import SharedDownload

        xid = manifest.transfer_id
        if self.receiver.completed(xid) or self.receiver.is_open(xid) or xid in self.shared_failed:
            return False
        if xid in self.shared_dl:
            return True
        try:
            dl = SharedDownload(SharedRef.from_wire(shared), manifest)
        except FedCoEError as exc:
            self.shared_failed.add(xid)
            self.shared_fallbacks.append(str(exc)[:200])
            return False
        self.shared_dl[xid] = dl
        self.fleet.active.add(self)
        users = self.shared_sub.setdefault(dl.ref.id, set())
        if not users:
            self.client.subscribe(self.topics.shared_filter(dl.ref.id), self._on_shared)
        users.add(xid)
        return True

    def _shared_end(self, xid: str) -> Any:
        dl = self.shared_dl.pop(xid, None)
        if dl is None:
            return None
        users = self.shared_sub.get(dl.ref.id, set())
        users.discard(xid)
        if not users:
            self.shared_sub.pop(dl.ref.id, None)
            self.client.unsubscribe(self.topics.shared_filter(dl.ref.id))
        return dl

    def _shared_fallback(self, xid: str, reason: str) -> None:
        dl = self._shared_end(xid)
        if dl is None:
            return
        self.shared_failed.add(xid)
        self.shared_fallbacks.append(reason[:200])
        self.receiver.expect(dl.manifest)
        self.receiver.nudge(xid)

    def _on_shared(self, msg: Any) -> None:
        from fedcoe_edge.errors import FedCoEError

        if not msg.payload:
            return  # a cleared copy
        sid = msg.topic.rsplit("/", 2)[1]
        for xid in list(self.shared_sub.get(sid, ())):
            dl = self.shared_dl[xid]
            try:
                data = dl.add(msg.payload)
            except FedCoEError as exc:
                self._shared_fallback(xid, str(exc))
                continue
            if data is not None:
                self._shared_end(xid)
                self.shared_done += 1
                self.receiver.adopt(dl.manifest)
                self._downloaded(dl.manifest, data)

    def _on_blob(self, msg: Any) -> None:
        from fedcoe_edge.errors import FedCoEError

        try:
            done = self.receiver.on_chunk(msg.payload)
        except FedCoEError:
            return
        if done is None:
            return
        self._downloaded(*done)

    def _downloaded(self, manifest: Any, data: bytes) -> None:
        ctx = self.pending.pop(manifest.transfer_id, None)
        if ctx is None:
            return
        if ctx["kind"] == self.P.TASK:
            delay = self.fleet.spec.train_s + random.random() * self.fleet.spec.jitter_s
            rnd = int(ctx["round"])
            if self.fleet.spec.distinct_updates:
                # the task decoded once per payload and shared (read-only), so the task's
                # own bytes are not held through the training delay by thousands of
                # devices; this device's update is built when its training ends
                base = self.fleet.base_for(manifest.sha256, data)
                make = lambda: self.fleet.own_update(self.dev, rnd, base)  # noqa: E731
            else:  # --shared-updates: identical bytes across devices, built once
                upload = self.fleet.update_for(manifest.sha256, data, self.variant)
                make = lambda: upload  # noqa: E731
            asyncio.get_running_loop().call_later(delay, self._trained, ctx, make)
        else:
            self.requests.pop((self.P.FETCH, "refresh", ctx["round"]), None)
            self.final_model = True
            self._request(self.P.EVAL, "personal", ctx["round"],
                          {"kind": "personal", "correct": 70, "total": 100})

    def _trained(self, ctx: dict[str, Any], make: Callable[[], bytes]) -> None:
        from fedcoe_edge.transport.blob import open_blob

        rnd = int(ctx["round"])
        upload = make()
        self.update_sha[rnd] = hashlib.sha256(upload).hexdigest()[:16]
        digest = hashlib.sha256(f"{self.dev}\0{rnd}\0".encode() + upload).hexdigest()
        xid = f"r{rnd}-{digest[:32]}"
        sender = open_blob(self.client, lambda x: self.topics.up_blob(self.dev, x), upload,
                           chunk_size=self.fleet.spec.chunk_size, window=DEFAULT_WINDOW,
                           transfer_id=xid, expert_ids=ctx["expert_ids"],
                           base_version=self.version, encoding=self.P.ENCODING_DELTA)
        m = sender.manifest
        self.update_chunks = max(self.update_chunks, m.chunk_count)
        k = self.fleet.num_experts
        rng = random.Random(f"{self.dev}/{rnd}")
        aff = [rng.random() + 0.05 for _ in range(k)]
        total = sum(aff)
        body = {"manifest": m.to_dict(), "num_samples": self.num_samples,
                "affinity": [a / total for a in aff], "metrics": {"train_loss": 1.0}}
        self.upload = _Upload(rnd, body, sender)
        self.upload.next_announce = time.monotonic() + REANNOUNCE_S
        self.fleet.active.add(self)
        self._send(self.P.RESULT, body, rnd)

    def _on_coord_status(self, msg: Any) -> None:
        """As the agent does: a coordinator coming online (not a retained status) means
        it may not know this device: say hello."""
        try:
            state = json.loads(msg.payload.decode())["state"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return
        if state == "online" and (not msg.retain or self.bc_key is None) and self.hello_at:
            self.hello()

    def _on_broadcast(self, msg: Any) -> None:
        from fedcoe_edge.errors import FedCoEError

        if self.bc_key is None:
            return
        try:
            env = self.messenger.open(msg.payload, expect_sender=self.fleet.coordinator,
                                      key_override=self.bc_key)
        except FedCoEError:
            return
        state, rnd = env.body.get("state"), int(env.body.get("round", 0))
        if (state in ("closed", "finished") and rnd >= self.rounds and not self.refresh_asked
                and rnd in self.task_at):
            self.refresh_asked = True
            self._request(self.P.FETCH, "refresh", rnd, {"expert_ids": None, "purpose": "refresh"})

    # --- timers ---
    def tick(self, now: float) -> bool:
        """Drive re-announces, blob retransmits and request retries; False when idle."""
        busy = False
        if self.shared_dl:
            from fedcoe_edge.transport.shared import SHARED_IDLE_S

            busy = True
            for xid, dl in list(self.shared_dl.items()):
                if dl.idle_s(now) > SHARED_IDLE_S:
                    self._shared_fallback(xid, f"no new chunk for {SHARED_IDLE_S:g} s")
        up = self.upload
        if up is not None and not up.done:
            busy = True
            if up.sender.done:
                up.done = True
            elif not up.started and now >= up.next_announce:
                up.next_announce = now + REANNOUNCE_S
                self._send(self.P.RESULT, up.body, up.round)
            elif up.started:
                up.sender.pump()
        for key, req in list(self.requests.items()):
            busy = True
            if req.due > now:
                continue
            if req.sent >= RETRY_ATTEMPTS:
                del self.requests[key]
                self.gave_up.append(f"{req.type} {key[1]} round {req.round}")
                continue
            req.sent += 1
            req.due = now + retry_delay(req.sent)
            self._send(req.type, req.body, req.round)
        if self.bc_key is None:
            busy = True
            if now - self.hello_at > 30.0:
                self.hello()  # no welcome yet: say hello again
        return busy

    def stats(self) -> dict[str, Any]:
        return {"task_at": self.task_at, "accepted_at": self.accepted_at, "rejects": self.rejects,
                "refused_msgs": self.refused_msgs, "final_model": self.final_model,
                "eval_acked": self.eval_acked, "gave_up": self.gave_up,
                "resends": 0 if self.upload is None else self.upload.sender.resends,
                "bytes_in": self.client.bytes_in, "bytes_out": self.client.bytes_out,
                "closed": self.client.closed_reason, "update_sha": self.update_sha,
                "heartbeats": self.heartbeats, "pings": self.client.pings,
                "task_chunks": self.task_chunks, "update_chunks": self.update_chunks,
                "shared_done": self.shared_done, "shared_fallbacks": self.shared_fallbacks[:3],
                "shared_fallback_count": len(self.shared_fallbacks)}


class DeviceFleet:
    """Many SimDevices on one event loop."""

    def __init__(self, spec: FleetSpec, port: int, ids: list[str],
                 brokers: list[tuple[str, int]] | None = None) -> None:
        from fedcoe_edge.transport import Topics

        self.spec, self.port, self.ids = spec, port, ids
        # sharded over several brokers (benchmarks/fleet_hosts.py): shard i's devices talk to
        # brokers[i]; None: every device to 127.0.0.1:port
        self.brokers = brokers
        self.topics = Topics(FEDERATION)
        self._shard_topics = [Topics(f) for f in federation_ids(spec.shards)]
        self.coordinator = "coordinator"
        model, _ = model_preset(spec.model)
        self.num_experts = int(model.get("num_global_experts", 4))
        self.devices: list[SimDevice] = []
        self.active: set[SimDevice] = set()
        self._updates: dict[tuple[str, int], bytes] = {}
        self._bases: dict[str, dict[str, np.ndarray]] = {}
        self.build_cpu_s = 0.0  # CPU this process spent building updates (process_time)
        self.closing = False

    def address_for(self, dev: str) -> tuple[str, int]:
        """The broker ``dev`` connects to: its shard's when each shard has its own broker."""
        if not self.brokers:
            return "127.0.0.1", self.port
        from fedcoe_edge.sharding import shard_of

        return self.brokers[shard_of(dev, len(self.brokers))]

    def topics_for(self, dev: str) -> Any:
        """The topics of the coordinator that serves ``dev``: its shard's when sharded."""
        if not self._shard_topics:
            return self.topics
        from fedcoe_edge.sharding import shard_of

        return self._shard_topics[shard_of(dev, len(self._shard_topics))]

    def base_for(self, task_sha: str, data: bytes) -> dict[str, np.ndarray]:
        """A task payload's tensors, decoded once per payload and shared by the devices
        that got it (they only read it)."""
        got = self._bases.get(task_sha)
        if got is None:
            from fedcoe_edge.wire import decode_tensors

            t0 = time.process_time()
            got = decode_tensors(data)
            self.build_cpu_s += time.process_time() - t0
            if len(self._bases) > 64:
                self._bases.clear()  # devices keep their own reference
            self._bases[task_sha] = got
        return got

    def own_update(self, dev: str, rnd: int, base: dict[str, np.ndarray]) -> bytes:
        """This device's int8-delta upload: the task's weights plus noise seeded by the device
        and round, so no two devices send the same bytes (the coordinator's decompression,
        validation and aggregation see distinct payloads, as from real devices)."""
        from fedcoe_edge.wire import compress_delta, compressed_delta_metadata, encode_tensors

        t0 = time.process_time()
        seed = int.from_bytes(hashlib.sha256(f"{dev}/{rnd}".encode()).digest()[:8], "big")
        rng = np.random.default_rng(seed)
        new = {k: (v + rng.normal(0.0, 1e-3, v.shape).astype(v.dtype)
                   if np.issubdtype(v.dtype, np.floating) else v) for k, v in base.items()}
        out = encode_tensors(compress_delta(new, base), compressed_delta_metadata())
        self.build_cpu_s += time.process_time() - t0
        return out

    def update_for(self, task_sha: str, data: bytes, variant: int) -> bytes:
        """``--shared-updates``: an int8-delta upload for a task payload, its weights plus
        seeded noise, built once per (payload, variant): identical bytes across devices."""
        key = (task_sha, variant)
        got = self._updates.get(key)
        if got is None:
            t0 = time.process_time()
            from fedcoe_edge.wire import (
                compress_delta,
                compressed_delta_metadata,
                decode_tensors,
                encode_tensors,
            )

            base = decode_tensors(data)
            rng = np.random.default_rng([variant, int(task_sha[:8], 16)])
            new = {k: (v + rng.normal(0.0, 1e-3, v.shape).astype(v.dtype)
                       if np.issubdtype(v.dtype, np.floating) else v) for k, v in base.items()}
            got = encode_tensors(compress_delta(new, base), compressed_delta_metadata())
            self.build_cpu_s += time.process_time() - t0
            if len(self._updates) > 64:
                self._updates.clear()
            self._updates[key] = got
        return got

    async def run(self, stop_at: float, stop_event: Any) -> dict[str, Any]:
        sem = asyncio.Semaphore(self.spec.connect_batch)
        connect_failed: list[str] = []

        async def start(dev: SimDevice) -> None:
            for attempt in range(4):  # a refused or timed-out connect is tried again
                async with sem:
                    try:
                        await dev.client.connect_async(60.0)
                        break
                    except (OSError, asyncio.TimeoutError, Exception) as exc:  # noqa: BLE001
                        if attempt == 3:
                            connect_failed.append(f"{dev.dev}: {exc}")
                            return
                        dev.client = dev.reconnectable()
                await asyncio.sleep(1.0 + attempt)
            dev.hello()
            self.active.add(dev)
            hb = self.spec.heartbeat_s
            if hb > 0:  # each device its own phase, as devices that did not start together
                loop.call_later(hb * random.Random(f"hb/{dev.dev}").uniform(0.05, 1.0), dev.beat)

        loop = asyncio.get_running_loop()
        self.devices = [SimDevice(self, d) for d in self.ids]
        t0 = time.monotonic()
        await asyncio.gather(*(start(d) for d in self.devices))
        connected_s = time.monotonic() - t0
        last_keepalive = loop.time()
        while time.monotonic() < stop_at and not stop_event.is_set():
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            for dev in list(self.active):
                if not dev.tick(now):
                    self.active.discard(dev)
            if loop.time() - last_keepalive >= 1.0:  # PINGREQ by paho's rule, per device
                last_keepalive = lt = loop.time()
                for dev in self.devices:
                    if dev.client.keepalive_due(lt):
                        dev.client.ping()
            if all(d.finished for d in self.devices):
                break
        self.closing = True
        await asyncio.sleep(0.5)  # let the last acks leave
        for d in self.devices:
            d.client.close()
        return {"connected_s": connected_s, "connect_failed": connect_failed,
                "build_cpu_s": self.build_cpu_s,
                "devices": {d.dev: d.stats() for d in self.devices}}


def _worker(spec: FleetSpec, port: int, ids: list[str], stop_at: float, stop_event: Any,
            out: Any) -> None:
    """Child process: run a share of the fleet, send its stats back."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fleet = DeviceFleet(spec, port, ids)
    stats = asyncio.run(fleet.run(stop_at, stop_event))
    out.send(stats)
    out.close()


# ----------------------------------------------------------------------------- orchestration
def federation_ids(shards: int) -> list[str]:
    """The federation id each shard's devices use (none without shards)."""
    from fedcoe_edge.sharding import shard_federation

    return [shard_federation(FEDERATION, i, shards) for i in range(shards)]


def _coordinator_toml(spec: FleetSpec, port: int, state: Path, user: str = "") -> str:
    model, train = model_preset(spec.model)
    deadline = spec.deadline_s or 60.0 + 0.06 * spec.devices

    def table(name: str, d: dict[str, Any]) -> str:
        return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())

    fed = {"id": FEDERATION, "algorithm": "fedcoe", "seed": 0, "rounds": spec.rounds,
           "min_devices": spec.devices, "quorum": 1, "deadline_s": deadline,
           "state_dir": str(state), "exit_when_done": True, "chunk_size": spec.chunk_size,
           "window": 16, **({"shards": spec.shards} if spec.shards else {}),
           **({"workers": spec.workers} if spec.workers else {}),
           **({} if spec.shared_downloads is None else {"shared_downloads": spec.shared_downloads})}
    return "\n".join([table("federation", fed),
                      table("broker", {"host": "127.0.0.1", "port": port,
                                       **({"username": user, "password": password_of(user)}
                                          if user else {})}),
                      table("security", {"secret": SECRET.hex()}),
                      table("model", model), table("train", train)])


@dataclass
class _Sample:
    t: float
    coord_cpu: float
    coord_rss: int
    broker_cpu: float
    broker_rss: int
    gen_cpu: float
    shard_cpu: tuple[float, ...] = ()
    shard_rss: tuple[int, ...] = ()
    workers_cpu: float = 0.0  # the coordinator's aggregation worker processes, together
    workers_rss: int = 0


def _children(p: Any) -> tuple[float, int]:
    """CPU-s and RSS of a process's live children (a coordinator's aggregation workers)."""
    try:
        kids = p.children(recursive=True)
    except Exception:  # noqa: BLE001 - gone
        return 0.0, 0
    return sum(c for c in (_cpu(k) for k in kids) if not math.isnan(c)), sum(_rss(k) for k in kids)


def _cpu(p: Any) -> float:
    try:
        c = p.cpu_times()
        return float(c.user + c.system)
    except Exception:  # noqa: BLE001 - gone
        return math.nan


def _rss(p: Any) -> int:
    try:
        return int(p.memory_info().rss)
    except Exception:  # noqa: BLE001
        return 0


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def _sys_monitor(port: int, into: list[tuple[float, str, float]], stop: asyncio.Event,
                       coord_online: Any, shards: int = 0, auth: bool = False) -> None:
    """Broker counters from $SYS (published every second with sys_interval 1), and the
    coordinator's retained status (devices start once it is online)."""
    from benchmarks.mqtt_async import AsyncMqttClient
    from fedcoe_edge.transport import Topics

    c = AsyncMqttClient(MONITOR, "127.0.0.1", port, username=MONITOR if auth else "",
                        password=password_of(MONITOR) if auth else "")

    def on(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            into.append((time.time(), msg.topic, float(msg.payload.decode())))

    waiting = {Topics(f).coord_status() for f in (federation_ids(shards) or [FEDERATION])}

    def status(msg: Any) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(msg.payload.decode())["state"] == "online":
                waiting.discard(msg.topic)
                if not waiting:  # every coordinator (each shard) is up
                    coord_online.set()

    for t in ("$SYS/broker/publish/messages/dropped", "$SYS/broker/bytes/received",
              "$SYS/broker/bytes/sent", "$SYS/broker/clients/connected"):
        c.subscribe(t, on)
    for topic in list(waiting):
        c.subscribe(topic, status)
    await c.connect_async()
    await stop.wait()
    c.close()


def run_fleet(spec: FleetSpec) -> dict[str, Any]:
    """One fleet size end to end; returns the per-round measurements."""
    import psutil

    from fedcoe_edge.broker import MosquittoBroker

    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    own = not spec.workdir  # a temporary folder is removed afterwards; a named one is kept
    work = Path(spec.workdir) if spec.workdir else Path(tempfile.mkdtemp(prefix="fedcoe-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    limits = broker_limits()
    ids = [f"dev{i:05d}" for i in range(spec.devices)]
    auth = spec.broker == "deploy"
    logins = aggregator_logins(spec.shards) if auth else {}
    if auth:
        port = _free_port()
        conf = deploy_broker_files(work / "broker", port, ids, spec.shards)
        with conf.open("a") as f:  # the generator's needs: $SYS every second, no cap
            f.write("\n".join(["# added by benchmarks.fleet", "sys_interval 1",
                               "max_connections -1", *spec.broker_options]) + "\n")
        broker = MosquittoBroker.from_config_file(conf, port, workdir=work / "broker")
    else:
        broker = MosquittoBroker(workdir=work / "broker",
                                 extra_config=[*limits, "sys_interval 1", "max_connections -1",
                                               *spec.broker_options])
    broker.start()
    coord_log = work / "coordinator.log"
    result: dict[str, Any] = {"devices": spec.devices, "rounds": spec.rounds, "model": spec.model,
                              "train_s": spec.train_s, "jitter_s": spec.jitter_s,
                              "procs": spec.procs, "broker_limits": limits + spec.broker_options,
                              "broker": spec.broker, "heartbeat_s": spec.heartbeat_s,
                              "keepalive_s": spec.keepalive_s, "agent_session": spec.agent_session,
                              "distinct_updates": spec.distinct_updates,
                              "workdir": str(work) if not own else None,
                              "loadavg_1m_start": os.getloadavg()[0]}
    coord = None
    spy: subprocess.Popen[bytes] | None = None
    shard_procs: list[subprocess.Popen[bytes]] = []
    workers: list[tuple[Any, Any]] = []
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}

        def cmd(stem: str) -> list[str]:
            """Each aggregator its own config when the broker asks for logins (one each)."""
            cfg = work / f"{stem}.toml"
            cfg.write_text(_coordinator_toml(spec, broker.port, work / "state", logins.get(stem, "")))
            return [*spec.fedcoe_cmd, "coordinator", "--config", str(cfg), *spec.coordinator_args]

        with coord_log.open("wb") as logf:  # the leader's log when sharded
            coord = subprocess.Popen(
                [*cmd("leader" if spec.shards else "coordinator"),
                 *(["--role", "leader"] if spec.shards else [])],
                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        for i in range(spec.shards):
            with (work / f"shard-{i}.log").open("wb") as logf:
                shard_procs.append(subprocess.Popen(
                    [*cmd(f"shard-{i}"), "--role", "shard", "--shard-index", str(i)],
                    stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT))
        cp = psutil.Process(coord.pid)
        sps = [psutil.Process(p.pid) for p in shard_procs]

        def snap(gen: float) -> _Sample:
            return _Sample(time.time(), _cpu(cp), _rss(cp), _cpu(bp), _rss(bp), gen,
                           tuple(_cpu(x) for x in sps), tuple(_rss(x) for x in sps),
                           *_children(cp))
        bp = psutil.Process(broker._proc.pid)  # type: ignore[union-attr]
        ctx = mp.get_context("spawn")
        stop_event = ctx.Event()
        started = time.time()
        stop_at = time.monotonic() + spec.timeout_s
        wps: list[Any] = []
        samples: list[_Sample] = []
        sys_vals: list[tuple[float, str, float]] = []
        hwm = 0
        broker_hwm = 0  # the broker's VmHWM: its true peak, not only the 0.2 s samples
        stats: list[dict[str, Any]] = []

        async def sample() -> None:
            nonlocal hwm, spy, broker_hwm
            stop = asyncio.Event()
            online = asyncio.Event()
            mon = asyncio.create_task(_sys_monitor(broker.port, sys_vals, stop, online,
                                                   spec.shards, auth))
            # the devices start once the coordinator is up: rounds are measured, not its start
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(online.wait(), 120)
            if not online.is_set() or coord.poll() is not None:
                stop.set()
                raise RuntimeError("coordinator did not come online: "
                                   + " | ".join(coord_log.read_text(errors="replace").splitlines()[-3:]))
            # the idle coordinator (imports, model, strategy), before any device connects
            samples.append(snap(0.0))
            if spec.profile:
                spy = fleet_profile.attach(coord.pid, work / "coordinator.pyspy.txt")
            for k in range(spec.procs):
                rx, tx = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(spec, broker.port, ids[k::spec.procs],
                                                      stop_at, stop_event, tx), daemon=True)
                p.start()
                workers.append((p, rx))
                wps.append(psutil.Process(p.pid))
            coord_gone_at: float | None = None
            pending = list(workers)
            while pending:
                await asyncio.sleep(0.2)
                gen = sum(_cpu(w) for w in wps if w.is_running())
                samples.append(snap(gen))
                hwm = max(hwm, _hwm(coord.pid))
                broker_hwm = max(broker_hwm, _hwm(bp.pid))
                for item in list(pending):
                    if item[1].poll():
                        stats.append(item[1].recv())
                        pending.remove(item)
                if coord.poll() is not None:
                    if coord_gone_at is None:
                        coord_gone_at = time.monotonic()
                    elif time.monotonic() - coord_gone_at > 10.0:
                        stop_event.set()  # the coordinator is gone: nothing more will come
                if time.monotonic() > stop_at + 30:
                    break
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(mon, 5)

        asyncio.run(sample())
        for p, _ in workers:
            p.join(timeout=10)
        for child in [coord, *shard_procs]:  # each left until the run's end, then stopped
            try:
                child.wait(timeout=max(5.0, stop_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.terminate()
                child.wait(timeout=30)
        result["coordinator_exit"] = coord.returncode
        if spy is not None:
            result["coordinator_profile"] = _profile_of(spy, work / "coordinator.pyspy.txt")
        result["shards"] = spec.shards
        result["shard_exits"] = [p.returncode for p in shard_procs]
        result["wall_s"] = time.time() - started
        result["coordinator_peak_rss_mb"] = hwm / 2**20
        result["broker_hwm_mb"] = broker_hwm / 2**20
        result["shared_downloads_on"] = (FederationSettings.shared_downloads
                                         if spec.shared_downloads is None else spec.shared_downloads)
        rows, opened, evals = _round_rows(work / "state", spec.shards)
        result.update(_summarise(spec, rows, opened, samples, sys_vals, stats))
        result["evals_stored"] = evals
        result["heartbeats_seen"] = _heartbeats_seen(work / "state", spec.shards)
        result["broker_log_tail"] = broker.log_tail(5).splitlines()
        result["coordinator_log_tail"] = coord_log.read_text(errors="replace").splitlines()[-5:]
        return result
    finally:
        for p, _ in workers:
            if p.is_alive():
                p.terminate()
        for proc in [coord, *shard_procs, spy]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        broker.close()
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _profile_of(spy: subprocess.Popen[bytes], raw: Path) -> dict[str, Any] | None:
    """The py-spy summary once the coordinator has exited (py-spy then writes its file)."""
    try:
        spy.wait(timeout=60)
    except subprocess.TimeoutExpired:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has on an interrupt
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=30)
    if not raw.is_file():
        log.warning("py-spy wrote no samples (%s)", raw)
        return None
    return fleet_profile.summarise(raw.read_text(errors="replace"))


def _heartbeats_seen(state: Path, shards: int) -> int:
    """Devices whose heartbeat the coordinator (each shard) stored as telemetry."""
    from coordinator.store import Store

    paths = ([state / f"shard-{i}" / "coordinator.sqlite" for i in range(shards)] if shards
             else [state / "coordinator.sqlite"])
    seen = 0
    for path in paths:
        store = Store(path, readonly=True)
        try:
            seen += sum(1 for d in store.devices() if d.get("telemetry"))
        finally:
            store.close()
    return seen


def _round_rows(state: Path, shards: int) -> tuple[list[dict[str, Any]], dict[int, tuple[float, float]], int]:
    """Per-round rows, open/close times and stored evaluations. Sharded: the round times
    are the leader's, the counts and bytes the sum over the shards' round logs."""
    from coordinator.store import Store

    def read(path: Path) -> tuple[list[dict[str, Any]], dict[int, tuple[float, float]], int]:
        store = Store(path, readonly=True)
        try:
            rows = [store.round_summary(r["round"]) for r in store.rounds()]
            opened = {r["round"]: (r["opened_at"], r["closed_at"]) for r in store.rounds()}
            return rows, opened, len(store.evals("personal"))
        finally:
            store.close()

    if not shards:
        return read(state / "coordinator.sqlite")
    lead, opened, _ = read(state / "leader" / "coordinator.sqlite")
    per_shard = [read(state / f"shard-{i}" / "coordinator.sqlite") for i in range(shards)]
    summed = ("selected", "accepted", "failed", "rejected", "bytes_up", "bytes_down")
    rows = []
    for r in lead:
        row = dict(r)
        got = [x for rs, _, _ in per_shard for x in rs if x["round"] == r["round"]]
        for k in summed:
            row[k] = sum(int(x.get(k) or 0) for x in got)
        rows.append(row)
    return rows, opened, sum(e for _, _, e in per_shard)


def _window(samples: list[_Sample], t0: float, t1: float) -> list[_Sample]:
    """Samples covering [t0, t1]: the last one before t0 through the first one after t1."""
    before = [s for s in samples if s.t <= t0][-1:]
    inside = [s for s in samples if t0 < s.t < t1]
    after = [s for s in samples if s.t >= t1][:1]
    return before + inside + after


def _delta(ws: list[_Sample], attr: str) -> float:
    vals = [getattr(s, attr) for s in ws if not math.isnan(getattr(s, attr))]
    return (vals[-1] - vals[0]) if len(vals) >= 2 else math.nan


def _delta_at(ws: list[_Sample], i: int) -> float:
    """CPU-s of shard ``i`` over the window."""
    vals = [s.shard_cpu[i] for s in ws if not math.isnan(s.shard_cpu[i])]
    return (vals[-1] - vals[0]) if len(vals) >= 2 else math.nan


def _counter(sys_vals: list[tuple[float, str, float]], topic: str, t: float) -> float:
    """The counter's value at wall time ``t`` (first report at or after it, else the last)."""
    vals = [(ts, v) for ts, tp, v in sys_vals if tp == topic]
    if not vals:
        return math.nan
    after = [v for ts, v in vals if ts >= t]
    return after[0] if after else vals[-1][1]


def merge_generator_stats(stats: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Every generator process's per-device figures as one map, and the devices that could
    not connect (fleet_hosts.py reads its processes' stats the same way)."""
    devices: dict[str, Any] = {}
    connect_failed: list[str] = []
    for s in stats:
        devices.update(s["devices"])
        connect_failed += s["connect_failed"]
    return devices, connect_failed


def _summarise(spec: FleetSpec, rows: list[dict[str, Any]], opened: dict[int, tuple[float, float]],
               samples: list[_Sample], sys_vals: list[tuple[float, str, float]],
               stats: list[dict[str, Any]]) -> dict[str, Any]:
    devices, connect_failed = merge_generator_stats(stats)
    drops_topic = "$SYS/broker/publish/messages/dropped"
    shas = [h for d in devices.values() for h in d.get("update_sha", {}).values()]
    out_rows = []
    for r in rows:
        rnd = r["round"]
        t0, t1 = opened.get(rnd, (math.nan, math.nan))
        t1 = t1 if t1 is not None else time.time()
        ws = _window(samples, t0, t1)
        task_times = [d["task_at"][str(rnd)] if str(rnd) in d["task_at"] else d["task_at"].get(rnd)
                      for d in devices.values()]
        task_times = [t for t in task_times if t is not None]
        rejects = sum(1 for d in devices.values() for x in d["rejects"] if x.startswith(f"round {rnd}:"))
        out_rows.append({
            "round": rnd, "selected": r["selected"], "accepted": r["accepted"],
            "failed": r["failed"], "rejected": r["rejected"], "device_rejects": rejects,
            "wall_s": r["wall_s"],
            "last_task_s": (max(task_times) - t0) if task_times else None,
            "tasks_received": len(task_times),
            "coord_cpu_s": _delta(ws, "coord_cpu"),
            "coord_peak_rss_mb": max((s.coord_rss for s in ws), default=0) / 2**20,
            "workers_cpu_s": _delta(ws, "workers_cpu"),
            "coord_workers_peak_rss_mb": max((s.coord_rss + s.workers_rss for s in ws), default=0) / 2**20,
            "broker_cpu_s": _delta(ws, "broker_cpu"),
            "broker_peak_rss_mb": max((s.broker_rss for s in ws), default=0) / 2**20,
            "generator_cpu_s": _delta(ws, "gen_cpu"),
            # sharded: coord_cpu_s is the leader's; each shard aggregator's here
            "shard_cpu_s": [_delta_at(ws, i) for i in range(len(ws[0].shard_cpu) if ws else 0)],
            "shard_peak_rss_mb": [max((x.shard_rss[i] for x in ws), default=0) / 2**20
                                  for i in range(len(ws[0].shard_rss) if ws else 0)],
            "bytes_up": r["bytes_up"], "bytes_down": r["bytes_down"],
            "broker_drops": _counter(sys_vals, drops_topic, t1) - _counter(sys_vals, drops_topic, t0),
        })
    total_drops = (max((v for _, tp, v in sys_vals if tp == drops_topic), default=math.nan))
    return {
        "rounds_completed": sum(1 for r in rows if r["state"] == "closed"),
        "round_rows": out_rows,
        "connect_failed": connect_failed[:20], "connect_failed_count": len(connect_failed),
        "final_models": sum(1 for d in devices.values() if d["final_model"]),
        "final_evals_acked": sum(1 for d in devices.values() if d["eval_acked"]),
        "device_rejects_total": sum(len(d["rejects"]) for d in devices.values()),
        "reject_examples": sorted({x for d in devices.values() for x in d["rejects"]})[:10],
        "requests_given_up": sum(len(d["gave_up"]) for d in devices.values()),
        "refused_msgs": sum(d["refused_msgs"] for d in devices.values()),
        "upload_resends": sum(d["resends"] for d in devices.values()),
        "updates_sent": len(shas), "distinct_updates_sent": len(set(shas)),
        "heartbeats_sent": sum(d.get("heartbeats", 0) for d in devices.values()),
        "keepalive_pings": sum(d.get("pings", 0) for d in devices.values()),
        "task_chunks_max": max((d.get("task_chunks", 0) for d in devices.values()), default=0),
        "shared_downloads": sum(d.get("shared_done", 0) for d in devices.values()),
        "shared_fallbacks": sum(d.get("shared_fallback_count", 0) for d in devices.values()),
        "shared_fallback_reasons": sorted({r for d in devices.values()
                                           for r in d.get("shared_fallbacks", [])})[:5],
        "update_chunks_max": max((d.get("update_chunks", 0) for d in devices.values()), default=0),
        # the generator's CPU spent decoding tasks and building updates (inside gen CPU)
        "update_build_cpu_s_total": sum(s.get("build_cpu_s", 0.0) for s in stats),
        "broker_drops_total": total_drops,
        "broker_bytes_received": max((v for _, tp, v in sys_vals if tp == "$SYS/broker/bytes/received"), default=math.nan),
        "broker_bytes_sent": max((v for _, tp, v in sys_vals if tp == "$SYS/broker/bytes/sent"), default=math.nan),
        "coordinator_cpu_s_total": _delta(samples, "coord_cpu"),
        "generator_cpu_s_total": _delta(samples, "gen_cpu"),
        "broker_cpu_s_total": _delta(samples, "broker_cpu"),
        "broker_peak_rss_mb": max((s.broker_rss for s in samples), default=0) / 2**20,
        # the coordinator before any device connected (imports, model, strategy): growth
        # above it is what the fleet costs
        "coordinator_idle_rss_mb": (samples[0].coord_rss / 2**20) if samples else math.nan,
    }


# ----------------------------------------------------------------------------- report
def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """One table row per fleet size: means over rounds, maxima where a peak is meant."""
    rows = run.get("round_rows", [])
    n = run["devices"]
    ok = (run.get("rounds_completed") == run["rounds"]
          and all(r["accepted"] == n for r in rows))
    return {
        "devices": n, "rounds": f"{run.get('rounds_completed', 0)}/{run['rounds']}",
        "round_s": _mean([r["wall_s"] for r in rows]),
        "round_s_max": max((r["wall_s"] or math.nan for r in rows), default=math.nan),
        "last_task_s": _mean([r["last_task_s"] for r in rows]),
        "coord_cpu_s": _mean([r["coord_cpu_s"] for r in rows]),
        "workers_cpu_s": _mean([r.get("workers_cpu_s", 0.0) for r in rows]),
        "coord_workers_peak_rss_mb": max((r.get("coord_workers_peak_rss_mb", 0.0) for r in rows),
                                         default=math.nan),
        "coord_peak_rss_mb": run.get("coordinator_peak_rss_mb", math.nan),
        "coord_growth_mb": run.get("coordinator_peak_rss_mb", math.nan)
        - run.get("coordinator_idle_rss_mb", math.nan),
        "broker_peak_rss_mb": run.get("broker_peak_rss_mb", math.nan),
        "gen_cpu_s": _mean([r["generator_cpu_s"] for r in rows]),
        "broker_cpu_s": _mean([r["broker_cpu_s"] for r in rows]),
        "mb_per_round": _mean([(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in rows]),
        "accepted": sum(r["accepted"] for r in rows), "failed": sum(r["failed"] for r in rows),
        "rejected": sum(r["rejected"] for r in rows) + run.get("device_rejects_total", 0),
        "drops": run.get("broker_drops_total", math.nan),
        "final": f"{run.get('final_models', 0)}/{n}",
        "ok": (ok and run.get("broker_drops_total", 1) == 0 and run.get("final_models") == n
               and sum(r["rejected"] for r in rows) + run.get("device_rejects_total", 0) == 0),
    }


def _fit_slope(xs: list[float], ys: list[float], log: bool) -> float:
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y and not math.isnan(y) and y > 0]
    if len(pts) < 2:
        return math.nan
    a = np.array([math.log(x) if log else x for x, _ in pts])
    b = np.array([math.log(y) if log else y for _, y in pts])
    return float(np.polyfit(a, b, 1)[0])


def sharded_summary(run: dict[str, Any]) -> dict[str, Any]:
    """A sharded run's row: the leader's CPU-s per round and each shard aggregator's."""
    rows = run.get("round_rows", [])
    k = int(run.get("shards") or 0)
    return {**run_summary(run), "shards": k, "leader_cpu_s": _mean([r["coord_cpu_s"] for r in rows]),
            "shard_cpu_s": [_mean([r["shard_cpu_s"][i] for r in rows if len(r.get("shard_cpu_s", [])) > i])
                            for i in range(k)],
            "shard_peak_rss_mb": [max((r["shard_peak_rss_mb"][i] for r in rows
                                       if len(r.get("shard_peak_rss_mb", [])) > i), default=math.nan)
                                  for i in range(k)],
            "ok": run_summary(run)["ok"] and all(c == 0 for c in run.get("shard_exits", []))}


def _sharded_lines(runs: list[dict[str, Any]], single: list[dict[str, Any]]) -> list[str]:
    """The leader + shard aggregators table, beside the single coordinator of the same N."""
    one = {r["devices"]: run_summary(r) for r in single if "round_rows" in r}
    lines = ["", "## Leader and shard aggregators", "",
             "`--shards S`: one leader and S shard aggregator processes on the same broker, each "
             "device on the shard its id hashes to (docs/daemons.md, \"Past one machine\"). The "
             "leader's CPU covers selection, merging the shards' partial sums and aggregation; "
             "each shard's covers its devices' transfers, validation and persistence.", "",
             "| devices | shards | rounds | round s | leader CPU-s/round | shard CPU-s/round (each) | "
             "shard peak RSS MB (each) | single coordinator CPU-s/round | final models | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "round_rows" not in r:
            continue
        s = sharded_summary(r)
        base = one.get(r["devices"], {}).get("coord_cpu_s", math.nan)
        lines.append(
            f"| {s['devices']} | {s['shards']} | {s['rounds']} | {s['round_s']:.1f} | "
            f"{s['leader_cpu_s']:.2f} | {' / '.join(f'{c:.1f}' for c in s['shard_cpu_s'])} | "
            f"{' / '.join(f'{m:.0f}' for m in s['shard_peak_rss_mb'])} | {base:.1f} | "
            f"{s['final']} | {'yes' if s['ok'] else 'NO'} |")
    goal = []
    for r in runs:
        if "round_rows" not in r or r["devices"] not in one:
            continue
        s, base = sharded_summary(r), one[r["devices"]]
        lower = s["leader_cpu_s"] < base["coord_cpu_s"]
        goal.append(f"{s['devices']} devices, {s['shards']} shards: leader {s['leader_cpu_s']:.2f} "
                    f"vs single coordinator {base['coord_cpu_s']:.1f} CPU-s/round "
                    f"({s['leader_cpu_s'] / base['coord_cpu_s']:.1%}), round "
                    f"{s['round_s']:.1f} s vs {base['round_s']:.1f} s: "
                    f"{'met' if lower and s['ok'] else 'NOT met'}")
    if goal:
        lines += ["", "Goal (leader CPU below a single coordinator's at the same N, every round "
                  "complete, every device with its final model): " + "; ".join(goal) + "."]
    return lines


def _profile_doc(path: Path) -> dict[str, Any] | None:
    """The --profile figures kept in ``path``, or None when there are none."""
    return json.loads(path.read_text()) if path.is_file() else None


def _markdown_only(json_path: Path, md: Path | None, profile_json: Path) -> int:
    """Render ``md`` again from the runs kept in ``json_path`` (and the profile figures)."""
    if md is None:
        print("fleet: --markdown-only needs --md", file=sys.stderr)
        return 2
    try:
        doc = json.loads(json_path.read_text())
        runs, command = doc["runs"], doc["command"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"fleet: --json {json_path}: no fleet runs to render ({exc})", file=sys.stderr)
        return 2
    write_markdown(runs, md, command, _profile_doc(profile_json))
    return 0


def _generator_line(run: dict[str, Any]) -> str:
    """How the run's devices behaved (docs/benchmarks.md, "Fleet: one coordinator, thousands
    of devices"); runs kept from before these options were the first generator's."""
    if "broker" not in run:
        return ("the first generator (open broker, no heartbeats, keepalive 300 s, "
                "identical update bytes across devices)")
    hb = run.get("heartbeat_s", 0)
    build = run.get("update_build_cpu_s_total")
    return (f"broker `{run['broker']}`, heartbeats "
            + (f"every {hb:g} s" if hb else "off")
            + f", keepalive {run.get('keepalive_s')} s, "
            + ("agent sessions" if run.get("agent_session") else "clean sessions") + ", "
            + ("each device its own update bytes" if run.get("distinct_updates")
               else "shared update bytes")
            + (f" (building them: {build:.1f} CPU-s of the generator's, whole run)"
               if build is not None else ""))


def write_markdown(runs: list[dict[str, Any]], path: Path, command: str,
                   profile: dict[str, Any] | None = None) -> None:
    sharded = [r for r in runs if r.get("shards")]
    runs = [r for r in runs if not r.get("shards")]
    sums = [run_summary(r) for r in runs if "round_rows" in r]
    lines = ["# Fleet benchmark: simulated devices against one coordinator", "",
             f"Command: `{command}`", "",
             "Each device is a separate MQTT connection speaking the real protocol (signed "
             "envelopes, per-device keys, chunked int8-delta uploads, final refresh and eval); "
             "training is a sleep. Broker: private Mosquitto with the deploy template's limits "
             f"({', '.join(runs[0].get('broker_limits', [])) if runs else ''}). Model: "
             f"`{runs[0]['model'] if runs else '?'}`. CPU and RSS are sampled every 0.2 s; "
             "per-round figures are means over the rounds; peak RSS is the coordinator's "
             "VmHWM over the whole run. Machine: "
             f"{os.cpu_count()} CPU cores. Devices: {_generator_line(runs[0] if runs else {})}.", "",
             "| devices | rounds | round s (mean / max) | last task s | coord CPU-s/round | "
             "coord peak RSS MB | broker peak RSS MB | broker CPU-s/round | generator CPU-s/round | "
             "MB moved/round | accepted | failed | rejected | broker drops | final models | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sums:
        lines.append(
            f"| {s['devices']} | {s['rounds']} | {s['round_s']:.1f} / {s['round_s_max']:.1f} | "
            f"{s['last_task_s']:.2f} | {s['coord_cpu_s']:.1f} | {s['coord_peak_rss_mb']:.0f} | "
            f"{s['broker_peak_rss_mb']:.0f} | {s['broker_cpu_s']:.1f} | {s['gen_cpu_s']:.1f} | "
            f"{s['mb_per_round']:.0f} | {s['accepted']} | {s['failed']} | {s['rejected']} | "
            f"{s['drops']:.0f} | {s['final']} | {'yes' if s['ok'] else 'NO'} |")
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['devices']} | error: {r['error']} |")
    lines += ["", "Traffic: what the broker received from all clients over the whole run, against "
              "the payload the rounds needed (tasks, updates; final refreshes not counted), and "
              "the upload chunks devices sent more than once. A sender that reads a busy "
              "coordinator as loss shows here as amplification (docs/design.md, \"Transfers\").",
              "", "| devices | broker GB received | payload GB (rounds) | ratio | upload chunks resent |",
              "|---|---|---|---|---|"]
    for r in runs:
        if "round_rows" not in r:
            continue
        got = float(r.get("broker_bytes_received", math.nan)) / 1e9
        need = sum(x.get("bytes_up", 0) + x.get("bytes_down", 0) for x in r["round_rows"]) / 1e9
        ratio = got / need if need else math.nan
        lines.append(f"| {r['devices']} | {got:.2f} | {need:.2f} | {ratio:.1f}x | "
                     f"{r.get('upload_resends', 0)} |")
    ns = [float(s["devices"]) for s in sums]
    rss_slope = _fit_slope(ns, [s["coord_peak_rss_mb"] for s in sums], log=True)
    growth_slope = _fit_slope(ns, [s["coord_growth_mb"] for s in sums], log=True)
    growth = ", ".join(f"{s['devices']}: +{s['coord_growth_mb']:.0f} MB" for s in sums)
    idle = _mean([r.get("coordinator_idle_rss_mb", math.nan) for r in runs])
    wall_slope = _fit_slope(ns, [s["round_s"] for s in sums], log=True)
    mb_per_dev = _fit_slope(ns, [s["coord_peak_rss_mb"] for s in sums], log=False)
    drops = ", ".join(f"{s['devices']}: {s['drops']:.0f}" for s in sums)
    rejected = ", ".join(f"{s['devices']}: {s['rejected']}" for s in sums)
    loads = ", ".join(f"{r['devices']}: {r['loadavg_1m_start']:.2f}" for r in runs
                      if "loadavg_1m_start" in r)
    lines += ["", f"1-minute load average when each size started (other work on the machine "
                  f"shows here): {loads or 'n/a'}."]
    lines += ["", "## Goals", "",
              f"* Largest fleet measured: {int(max(ns)) if ns else 0} devices "
              f"(goal: 5,000 on one coordinator).",
              f"* Every round completed, all updates accepted, every device got its final model: "
              f"{'yes' if sums and all(s['ok'] for s in sums) else 'NO'}.",
              f"* Broker drops: {drops} (goal: 0).",
              f"* Honest updates rejected: {rejected} (goal: 0).",
              f"* Coordinator peak RSS vs N: log-log slope {rss_slope:.2f} "
              f"({mb_per_dev:.3f} MB per extra device; goal: sub-linear, slope < 1). The "
              f"growth above the idle coordinator (imports, model: "
              f"{idle:.0f} MB) "
              f"has log-log slope {growth_slope:.2f}: "
              f"{growth}.",
              f"* Round wall time vs N: log-log slope {wall_slope:.2f} (goal: at most linear, <= 1).",
              ""]
    if sharded:
        lines += _sharded_lines(sharded, runs) + [""]
    if profile:
        lines += fleet_profile.markdown(profile) + [""]
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Round time, memory and CPU against N: one coordinator's curves, and where the run
    had shards, the leader's and the busiest shard's beside them (same axes)."""
    sharded = [sharded_summary(r) for r in runs if r.get("shards") and "round_rows" in r]
    runs = [r for r in runs if not r.get("shards")]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = [run_summary(r) for r in runs if "round_rows" in r]
    if not sums:
        return
    ns = [s["devices"] for s in sums]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(ns, [s["round_s"] for s in sums], "o-", label="round wall")
    axes[0].plot(ns, [s["last_task_s"] for s in sums], "s--", label="last task sent")
    axes[0].set_ylabel("seconds")
    axes[1].plot(ns, [s["coord_peak_rss_mb"] for s in sums], "o-", label="coordinator peak RSS")
    axes[1].plot(ns, [s["broker_peak_rss_mb"] for s in sums], "s--", label="broker peak RSS")
    axes[1].set_ylabel("MB")
    axes[2].plot(ns, [s["coord_cpu_s"] for s in sums], "o-", label="coordinator")
    axes[2].plot(ns, [s["broker_cpu_s"] for s in sums], "s--", label="broker")
    axes[2].plot(ns, [s["gen_cpu_s"] for s in sums], "^:", label="generator (all devices)")
    axes[2].set_ylabel("CPU-s per round")
    if sharded:
        sn = [x["devices"] for x in sharded]
        k = sharded[0]["shards"]
        axes[0].plot(sn, [x["round_s"] for x in sharded], "D-", label=f"round wall, {k} shards")
        axes[1].plot(sn, [max(x["shard_peak_rss_mb"]) for x in sharded], "D-",
                     label=f"busiest of {k} shards' peak RSS")
        axes[2].plot(sn, [x["leader_cpu_s"] for x in sharded], "D-", label=f"leader ({k} shards)")
        axes[2].plot(sn, [max(x["shard_cpu_s"]) for x in sharded], "v-.", label="busiest shard")
    for ax, title in zip(axes, ("round time", "memory", "CPU"), strict=True):
        if max(ns) >= 10 * min(ns):
            ax.set_xscale("log")
        ax.set_xlabel("devices")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=None,
                   help="fleet sizes to run, in order (required unless --markdown-only)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="deploy", choices=["deploy", "camera", "smoke"],
                   help="model config whose update sizes the devices send (default: deploy template)")
    p.add_argument("--train-s", type=float, default=1.0, help="fake training time per round")
    p.add_argument("--jitter-s", type=float, default=0.5, help="plus up to this much, uniform")
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per fleet size")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="the coordinator's round deadline (default 0: 60 s + 60 ms per device); "
                        "longer on a machine busy with other work, so that every round "
                        "completes and runs compare like for like")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="keep logs and state here")
    p.add_argument("--shards", type=int, nargs="+", default=[0], metavar="S",
                   help="0: one coordinator; S >= 1: a leader and S shard aggregator processes "
                        "(devices routed by the shard hash); several values run each per size, "
                        "e.g. --shards 0 2 for the single coordinator beside 2 shards")
    p.add_argument("--broker-option", action="append", default=[], metavar="LINE",
                   help="extra mosquitto.conf line after the template's limits (repeatable)")
    p.add_argument("--profile", metavar="LABEL", default="",
                   help="sample the coordinator with py-spy and keep its CPU-s/round and top "
                        "entries under LABEL (e.g. before, after) in --profile-json")
    p.add_argument("--profile-json", type=Path, default=PROFILE_JSON,
                   help="where --profile keeps its figures, and what fleet.md's \"Coordinator "
                        "CPU profile\" section is rendered from")
    p.add_argument("--workers", type=int, default=0,
                   help="the coordinator's [federation] workers: aggregation worker processes "
                        "(0: in-process)")
    p.add_argument("--broker", choices=["deploy", "open"], default="deploy",
                   help="deploy (default): the deploy template's broker (per-client passwords, "
                        "ACL, use_username_as_clientid, persistence); open: anonymous, no ACL, "
                        "no persistence")
    p.add_argument("--heartbeat-s", type=float, default=AGENT_HEARTBEAT_S,
                   help="each device's heartbeat interval (default: the agent's, "
                        f"{AGENT_HEARTBEAT_S:g} s); 0: none")
    p.add_argument("--keepalive-s", type=int, default=AGENT_KEEPALIVE_S,
                   help=f"MQTT keepalive of each device (default: the agent's, {AGENT_KEEPALIVE_S} s)")
    p.add_argument("--clean-sessions", action="store_true",
                   help="clean MQTT sessions instead of the agent's (clean_start false, session "
                        f"expiry {AGENT_SESSION_EXPIRY_S} s)")
    p.add_argument("--downloads", choices=("shared", "per-device"), default=None,
                   help="the coordinator's [federation] shared_downloads: shared (true) or "
                        "per-device (false); default: the daemon's own "
                        f"({'shared' if FederationSettings.shared_downloads else 'per-device'}; "
                        "docs/protocol.md, \"Shared downloads\")")
    p.add_argument("--shared-updates", action="store_true",
                   help=f"identical update bytes across devices ({VARIANTS} variants per task, "
                        "built once) instead of each device its own")
    p.add_argument("--lenient", action="store_true",
                   help="the first generator, for comparison: --broker open --heartbeat-s 0 "
                        f"--keepalive-s {LENIENT_KEEPALIVE_S} --clean-sessions --shared-updates")
    p.add_argument("--markdown-only", action="store_true",
                   help="run nothing: render --md from the runs in --json (and --profile-json)")
    args = p.parse_args(argv)
    if args.markdown_only:
        return _markdown_only(args.json, args.md, args.profile_json)
    if not args.devices:
        print("fleet: --devices is required (unless --markdown-only)", file=sys.stderr)
        return 2
    if args.profile and fleet_profile.py_spy() is None:
        print("fleet: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    if args.deadline_s < 0:
        print("fleet: --deadline-s must be >= 0", file=sys.stderr)
        return 2
    if args.lenient:
        args.broker, args.heartbeat_s, args.keepalive_s = "open", 0.0, LENIENT_KEEPALIVE_S
        args.clean_sessions = args.shared_updates = True
    if args.heartbeat_s < 0 or not 0 < args.keepalive_s < 65536:
        print("fleet: --heartbeat-s must be >= 0 and --keepalive-s in 1..65535", file=sys.stderr)
        return 2
    if any(n < 1 for n in args.devices) or args.rounds < 1 or args.procs < 1:
        print("fleet: --devices, --rounds and --procs must be >= 1", file=sys.stderr)
        return 2
    from fedcoe_edge.sharding import MAX_SHARDS

    if any(not 0 <= k <= MAX_SHARDS for k in args.shards):
        print(f"fleet: --shards must be in 0..{MAX_SHARDS}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = "python -m benchmarks.fleet " + " ".join(sys.argv[1:] if argv is None else argv)
    runs: list[dict[str, Any]] = []
    for n, shards in [(n, k) for n in args.devices for k in args.shards]:
        name = f"n{n}" + (f"-s{shards}" if shards else "")
        spec = FleetSpec(devices=n, rounds=args.rounds, model=args.model, train_s=args.train_s,
                         jitter_s=args.jitter_s, procs=args.procs, timeout_s=args.timeout_s,
                         broker_options=list(args.broker_option), shards=shards,
                         profile=bool(args.profile), deadline_s=args.deadline_s,
                         broker=args.broker, heartbeat_s=args.heartbeat_s,
                         keepalive_s=args.keepalive_s, agent_session=not args.clean_sessions,
                         distinct_updates=not args.shared_updates, workers=args.workers,
                         shared_downloads=(None if args.downloads is None
                                           else args.downloads == "shared"),
                         workdir=str(args.workdir / name) if args.workdir else "")
        log.info("fleet: %d devices, %d rounds, model %s, %s", n, args.rounds, args.model,
                 f"leader + {shards} shard(s)" if shards else "one coordinator")
        t0 = time.time()
        try:
            run = run_fleet(spec)
        except Exception as exc:  # noqa: BLE001 - one size failing must not lose the others
            log.exception("fleet of %d failed", n)
            run = {"devices": n, "rounds": args.rounds, "model": args.model, "shards": shards,
                   "error": str(exc)[:300]}
        run["run_s"] = time.time() - t0
        runs.append(run)
        if "round_rows" in run:
            s = run_summary(run)
            log.info("fleet %d: rounds %s, round %.1fs, coord CPU %.1fs/round, peak RSS %.0f MB, "
                     "drops %s, final %s", n, s["rounds"], s["round_s"], s["coord_cpu_s"],
                     s["coord_peak_rss_mb"], s["drops"], s["final"])
            if args.workers:
                log.info("fleet %d: %d aggregation worker(s) CPU %.1fs/round; coordinator + "
                         "workers peak RSS %.0f MB", n, args.workers, s["workers_cpu_s"],
                         s["coord_workers_peak_rss_mb"])
            if shards:
                sh = sharded_summary(run)
                log.info("fleet %d, %d shards: leader CPU %.2fs/round, shards %s CPU-s/round", n,
                         shards, sh["leader_cpu_s"], [round(c, 2) for c in sh["shard_cpu_s"]])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "runs": runs}, indent=1, default=str) + "\n")
        if args.profile:
            fleet_profile.record(args.profile_json, args.profile, command, runs,
                                 {r["devices"]: run_summary(r)["coord_cpu_s"] for r in runs
                                  if "round_rows" in r})
        if args.md:
            write_markdown(runs, args.md, command, _profile_doc(args.profile_json))
        if args.png:
            write_plot(runs, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
