"""Fleet past one host: a leader host and S shard hosts as Linux network namespaces.

``python -m benchmarks.fleet_hosts --devices 100 1000 --shards 4 --links direct wan --json PATH``

One command builds, runs and tears down a multi-host topology on this machine
(docs/benchmarks.md, "Fleet past one host"; docs/daemons.md, "Past one host"):

* a LAN: a Linux bridge inside its own namespace (``PREFIX-lan``) and one veth pair per host,
  on a private /24 this command picks (default ``10.231.0.0/24``); every host has loopback;
* the leader host (``PREFIX-leader``, .2): its Mosquitto, the deploy template's broker
  (``benchmarks.fleet.deploy_broker_files``: passwords, ACL, ``use_username_as_clientid``,
  persistence, limits), plus one login and ACL entry per shard bridge, and the leader;
* S shard hosts (``PREFIX-s<i>``, .10+i): each its own template broker with only its
  shard's devices, one shard aggregator, and a Mosquitto bridge to the leader's broker
  generated from ``deploy/mosquitto/bridge.conf`` that carries only that shard's
  ``fl/v1/FED/agg/`` topics;
* a devices host (``PREFIX-dev``, .100): the fleet generator's simulated devices
  (``benchmarks.fleet.DeviceFleet``), each connected to its shard's broker by the shard hash.

``--links`` picks how the bridges travel: ``direct`` (the LAN), ``wan`` (through a userspace
TCP relay in the shard host adding a fixed one-way delay, random stalls and connection drops:
``tc netem`` is not available on every kernel, and TCP turns packet loss into exactly what
the relay makes: late bytes and, past the keepalive, a broken connection), ``outage`` (the
relay of one shard cuts its bridge for ``--outage-s`` seconds mid-run). Needs root only for
``ip netns`` (namespaces, veths, the bridge); without it exits 2 with one line. Everything
it creates (namespaces, veths, processes, the work folder) is removed on exit, on Ctrl-C and
on failure, and a stale topology of a killed run (namespaces named PREFIX-*) is removed by
the next run before it starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import fleet

ROOT = fleet.ROOT
DEPLOY_BRIDGE = ROOT / "deploy" / "mosquitto" / "bridge.conf"
FEDERATION = fleet.FEDERATION
BROKER_PORT = 1883
RELAY_PORT = 1884
DEV_HOST = 100  # the devices host's last octet
LEADER_HOST = 2
SHARD_HOST0 = 10  # shard i: .10 + i
CLONE_NEWNET = 0x40000000
# the template bridge's example names, replaced per shard (deploy/mosquitto/bridge.conf)
TEMPLATE_FED, TEMPLATE_SHARD = "fleet1", "shard-0"
# bridge lines that only make sense over TLS: the benchmark's LAN is plain MQTT
BRIDGE_TLS_KEYS = ("bridge_cafile", "bridge_capath", "bridge_certfile", "bridge_keyfile",
                   "bridge_tls_version", "bridge_insecure", "bridge_alpn")

log = logging.getLogger("fedcoe.fleet_hosts")


# ----------------------------------------------------------------------------- config text
def bridge_user(shard: int, fed: str = FEDERATION) -> str:
    """The login a shard broker's bridge uses on the leader's broker (its own, so the
    leader broker's ``use_username_as_clientid`` gives every bridge its own session)."""
    return f"bridge.{fed}.shard-{shard}"


def bridge_topics(shard: int, fed: str = FEDERATION) -> list[str]:
    """The bridge's ``topic`` lines: only this shard's side of the leader's channel
    (``fedcoe_edge.sharding.LeaderTopics``), QoS 1."""
    from fedcoe_edge.sharding import LeaderTopics, shard_name

    lt, name = LeaderTopics(fed), shard_name(shard)
    return [f"topic {lt.prefix}/up/{name}/# out 1", f"topic {lt.prefix}/dn/{name}/# in 1",
            f"topic {lt.leader_status()} in 1"]


def bridge_acl(shard: int, fed: str = FEDERATION) -> str:
    """The leader broker's ACL entry for shard ``shard``'s bridge: write its ``up`` side, read
    its ``dn`` side and the leader's presence, nothing else."""
    from fedcoe_edge.sharding import LeaderTopics, shard_name

    lt, name = LeaderTopics(fed), shard_name(shard)
    return "\n".join([f"user {bridge_user(shard, fed)}", f"topic write {lt.prefix}/up/{name}/#",
                      f"topic read {lt.prefix}/dn/{name}/#",
                      f"topic read {lt.leader_status()}"]) + "\n"


def bridge_conf(shard: int, address: str, password: str, fed: str = FEDERATION,
                template: Path = DEPLOY_BRIDGE) -> str:
    """Shard ``shard``'s bridge section from ``deploy/mosquitto/bridge.conf``: every line
    kept, the example's federation and shard renamed, ``address`` and ``remote_password``
    set, and the TLS lines commented out (the benchmark's LAN is plain MQTT). The result's
    topic lines must be :func:`bridge_topics` (checked: a template that drifted from the
    leader's channel is refused in one line)."""
    from fedcoe_edge.sharding import shard_name

    shown = template.relative_to(ROOT) if template.is_relative_to(ROOT) else template
    out = [f"# generated by benchmarks.fleet_hosts from {shown}"]
    for line in template.read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue  # the template's prose stays in the template
        if words[0] in BRIDGE_TLS_KEYS:
            out.append(f"# (plain LAN run) {line}")
            continue
        if words[0] == "address":
            out.append(f"address {address}")
            continue
        if words[0] == "remote_password":
            out.append(f"remote_password {password}")
            continue
        line = line.replace(TEMPLATE_SHARD, shard_name(shard))
        line = line.replace(f"/{TEMPLATE_FED}/", f"/{fed}/").replace(f".{TEMPLATE_FED}.", f".{fed}.")
        out.append(line)
    topics = [x for x in out if x.startswith("topic ")]
    if topics != bridge_topics(shard, fed):
        raise RuntimeError(f"fleet_hosts: {template}: topic lines {topics} are not the leader "
                           f"channel's {bridge_topics(shard, fed)}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one topology: namespaces ``PREFIX-*`` on ``SUBNET.0/24``."""

    prefix: str
    subnet: str  # first three octets, e.g. "10.231.0"
    shards: int

    @property
    def lan(self) -> str:
        return f"{self.prefix}-lan"

    @property
    def leader(self) -> str:
        return f"{self.prefix}-leader"

    @property
    def devices(self) -> str:
        return f"{self.prefix}-dev"

    def shard(self, i: int) -> str:
        return f"{self.prefix}-s{i}"

    def hosts(self) -> dict[str, str]:
        """Host namespace -> its LAN address."""
        out = {self.leader: f"{self.subnet}.{LEADER_HOST}", self.devices: f"{self.subnet}.{DEV_HOST}"}
        for i in range(self.shards):
            out[self.shard(i)] = f"{self.subnet}.{SHARD_HOST0 + i}"
        return out

    def namespaces(self) -> list[str]:
        return [self.lan, *self.hosts()]

    def addr(self, ns: str) -> str:
        return self.hosts()[ns]


# ----------------------------------------------------------------------------- namespaces
def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"fleet_hosts: ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def namespaces_with(prefix: str) -> list[str]:
    """Namespaces of a topology with this prefix (``ip netns list``)."""
    done = _ip("netns", "list", check=False)
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix + "-")]


def remove_topology(prefix: str) -> list[str]:
    """Kill what runs in each ``PREFIX-*`` namespace (started by a run of this command) and
    delete the namespaces (their veths go with them). Returns the names removed."""
    gone = []
    for ns in namespaces_with(prefix):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        for pid in pids:
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
        gone.append(ns)
    return gone


def build_topology(plan: Plan) -> None:
    """The namespaces, the LAN bridge and a veth pair per host, addresses and loopback up."""
    for ns in plan.namespaces():
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", plan.lan, "link", "add", "br0", "type", "bridge")
    _ip("-n", plan.lan, "link", "set", "br0", "up")
    for k, (ns, addr) in enumerate(plan.hosts().items()):
        peer = f"v{k}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer,
            "netns", plan.lan)
        _ip("-n", plan.lan, "link", "set", peer, "master", "br0")
        _ip("-n", plan.lan, "link", "set", peer, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")


def _setns(ns: str) -> None:
    """Move this thread (the main one: processes and threads it starts follow) into ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    path = f"/run/netns/{ns}" if not ns.startswith("/") else ns
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def root_problem() -> str | None:
    """Why this command cannot build namespaces here (one line), or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "fleet_hosts: needs root for `ip netns` (network namespaces and veth pairs); run it as root"
    if shutil.which("ip") is None:
        return "fleet_hosts: needs the `ip` command (iproute2) for network namespaces"
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        return "fleet_hosts: needs mosquitto (apt-get install mosquitto)"
    probe = "fchprobe-" + str(os.getpid())
    done = _ip("netns", "add", probe, check=False)
    if done.returncode != 0:
        return f"fleet_hosts: `ip netns add` failed: {done.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


# ----------------------------------------------------------------------------- relay
@dataclass
class RelaySpec:
    listen: str  # host:port
    to: str
    delay_ms: float = 0.0
    stall_per_min: float = 0.0  # random stalls per connection and minute
    stall_s: float = 0.0
    drop_per_min: float = 0.0  # random connection drops per connection and minute
    outage_s: float = 0.0  # on SIGUSR1: cut every connection and refuse this long
    seed: int = 0


async def _relay(spec: RelaySpec) -> None:
    """A TCP relay with a fixed one-way delay, stalls and drops: what an application sees of
    a lossy WAN once TCP has hidden the lost packets (late bytes, now and then a broken
    connection). Order within a direction is kept. Counters go to stdout on SIGTERM."""
    loop = asyncio.get_running_loop()
    rng = random.Random(spec.seed)
    conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
    stats = {"connections": 0, "stalls": 0, "drops": 0, "refused": 0, "outages": 0,
             "bytes": 0}
    down_until = 0.0

    def outage() -> None:
        nonlocal down_until
        down_until = loop.time() + spec.outage_s
        stats["outages"] += 1
        for a, b in list(conns):
            a.close()
            b.close()

    loop.add_signal_handler(signal.SIGUSR1, outage)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   state: dict[str, float]) -> None:
        q: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def rd() -> None:
            try:
                while data := await reader.read(65536):
                    q.put_nowait((loop.time() + spec.delay_ms / 1000.0, data))
            except (OSError, asyncio.IncompleteReadError):
                pass
            q.put_nowait((loop.time() + spec.delay_ms / 1000.0, b""))

        task = asyncio.create_task(rd())
        try:
            while True:
                due, data = await q.get()
                wait = max(due, state["stalled_until"]) - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    break
                writer.write(data)
                stats["bytes"] += len(data)
                await writer.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            task.cancel()
            writer.close()

    async def chaos(a: asyncio.StreamWriter, b: asyncio.StreamWriter,
                    state: dict[str, float]) -> None:
        while not a.is_closing():
            await asyncio.sleep(1.0)
            if spec.stall_per_min and rng.random() < spec.stall_per_min / 60.0:
                state["stalled_until"] = loop.time() + spec.stall_s
                stats["stalls"] += 1
            if spec.drop_per_min and rng.random() < spec.drop_per_min / 60.0:
                stats["drops"] += 1
                a.close()
                b.close()
                return

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if loop.time() < down_until:
            stats["refused"] += 1
            writer.close()
            return
        host, port = spec.to.rsplit(":", 1)
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        stats["connections"] += 1
        state = {"stalled_until": 0.0}
        pair = (writer, uw)
        conns.add(pair)
        try:
            await asyncio.gather(pipe(reader, uw, state), pipe(ur, writer, state),
                                 chaos(writer, uw, state))
        finally:
            conns.discard(pair)

    host, port = spec.listen.rsplit(":", 1)
    server = await asyncio.start_server(serve, host, int(port))
    print("relay ready", flush=True)
    async with server:
        await done.wait()
    print("relay stats " + json.dumps(stats), flush=True)


def relay_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet_hosts relay")
    p.add_argument("--listen", required=True)
    p.add_argument("--to", required=True)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--stall-per-min", type=float, default=0.0)
    p.add_argument("--stall-s", type=float, default=0.0)
    p.add_argument("--drop-per-min", type=float, default=0.0)
    p.add_argument("--outage-s", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    asyncio.run(_relay(RelaySpec(a.listen, a.to, a.delay_ms, a.stall_per_min, a.stall_s,
                                 a.drop_per_min, a.outage_s, a.seed)))
    return 0


# ----------------------------------------------------------------------------- run
@dataclass
class HostsSpec:
    devices: int
    shards: int = 4
    rounds: int = 2
    links: str = "direct"  # direct | wan | outage
    procs: int = 2
    train_s: float = 1.0
    jitter_s: float = 0.5
    deadline_s: float = 0.0
    timeout_s: float = 900.0
    prefix: str = "fch"
    subnet: str = "10.231.0"
    delay_ms: float = 40.0
    stall_per_min: float = 2.0
    stall_s: float = 1.5
    drop_per_min: float = 0.5
    outage_shard: int = 0
    outage_at_s: float = 1.0  # after the leader opens round 1
    outage_s: float = 8.0
    workdir: str = ""
    model: str = "deploy"
    extra: dict[str, Any] = field(default_factory=dict)


def _gen_worker(spec: fleet.FleetSpec, brokers: list[tuple[str, int]], ids: list[str],
                stop_at: float, stop_event: Any, out: Any) -> None:
    """A generator process (in the devices host's namespace, inherited from the parent):
    its share of the devices, each on its shard's broker."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    devs = fleet.DeviceFleet(spec, 0, ids, brokers=brokers)
    out.send(asyncio.run(devs.run(stop_at, stop_event)))
    out.close()


def _broker_files(folder: Path, ids: list[str], shards: int, listen: str,
                  bridges: int = 0, bridge: str = "") -> Path:
    """One host's broker: the deploy template's (``fleet.deploy_broker_files``) listening on
    loopback and on the host's LAN address; the leader's with ``bridges`` bridge logins, a
    shard's with its ``bridge`` section."""
    conf = fleet.deploy_broker_files(folder, BROKER_PORT, ids, shards)
    if bridges:
        with (folder / "acl").open("a") as f:
            f.write("\n# the shard brokers' bridges (benchmarks.fleet_hosts.bridge_acl)\n")
            for i in range(bridges):
                f.write(bridge_acl(i) + "\n")
        for i in range(bridges):
            u = bridge_user(i)
            subprocess.run(["mosquitto_passwd", "-b", str(folder / "passwd"), u,
                            fleet.password_of(u)], check=True, capture_output=True)
    extra = ["# added by benchmarks.fleet_hosts", f"listener {BROKER_PORT} {listen}",
             "sys_interval 1", "max_connections -1", f"log_dest file {folder / 'mosquitto.log'}",
             "log_type error", "log_type warning", "log_type notice", "log_timestamp true",
             "connection_messages true", "user root"]
    with conf.open("a") as f:
        f.write("\n".join(extra) + "\n" + (bridge and "\n" + bridge))
    return conf


class Topology:
    """The running hosts: processes by name, started in their namespaces."""

    def __init__(self, spec: HostsSpec, work: Path) -> None:
        self.spec, self.work = spec, work
        self.plan = Plan(spec.prefix, spec.subnet, spec.shards)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.relay_out: dict[str, Path] = {}

    def start(self, name: str, ns: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        logf = (self.work / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=logf,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        logf.close()
        self.procs[name] = p
        return p

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        t = time.monotonic() + 10
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, t - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str,
               timeout: float = 20.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"fleet_hosts: {what} exited ({proc.returncode}) before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"fleet_hosts: {what} not listening on {host}:{port} after {timeout} s")


async def _monitor(addr: str, into: list[tuple[float, str, str, float]], stop: asyncio.Event,
                   online: asyncio.Event | None, fed: str, label: str) -> None:
    """One broker's $SYS counters (and, on a shard's broker, its coordinator's status)."""
    from benchmarks.mqtt_async import AsyncMqttClient
    from fedcoe_edge.transport import Topics

    c = AsyncMqttClient(fleet.MONITOR, addr, BROKER_PORT, username=fleet.MONITOR,
                        password=fleet.password_of(fleet.MONITOR))

    def on(msg: Any) -> None:
        with contextlib.suppress(ValueError):
            into.append((time.time(), label, msg.topic, float(msg.payload.decode())))

    def status(msg: Any) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(msg.payload.decode())["state"] == "online" and online is not None:
                online.set()

    for t in ("$SYS/broker/publish/messages/dropped", "$SYS/broker/bytes/received",
              "$SYS/broker/clients/connected"):
        c.subscribe(t, on)
    if online is not None:
        c.subscribe(Topics(fed).coord_status(), status)
    await c.connect_async(30.0)
    await stop.wait()
    c.close()


def _cpu_rss(p: Any) -> tuple[float, int]:
    try:
        c = p.cpu_times()
        return float(c.user + c.system), int(p.memory_info().rss)
    except Exception:  # noqa: BLE001 - gone
        return math.nan, 0


def _relay_cmd(spec: HostsSpec, i: int, leader_addr: str, impaired: bool) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.fleet_hosts", "relay",
           "--listen", f"127.0.0.1:{RELAY_PORT}", "--to", f"{leader_addr}:{BROKER_PORT}",
           "--outage-s", str(spec.outage_s), "--seed", str(i)]
    if impaired:
        cmd += ["--delay-ms", str(spec.delay_ms), "--stall-per-min", str(spec.stall_per_min),
                "--stall-s", str(spec.stall_s), "--drop-per-min", str(spec.drop_per_min)]
    return cmd


def run_hosts(spec: HostsSpec) -> dict[str, Any]:
    """One topology, one fleet size, end to end; everything removed afterwards."""
    import psutil

    from fedcoe_edge.sharding import shard_of

    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    own = not spec.workdir
    work = Path(spec.workdir) if spec.workdir else Path(tempfile.mkdtemp(prefix="fedcoe-hosts-"))
    work.mkdir(parents=True, exist_ok=True)
    stale = remove_topology(spec.prefix)
    if stale:
        log.warning("fleet_hosts: removed a stale topology: %s", " ".join(stale))
    topo = Topology(spec, work)
    plan = topo.plan
    S = spec.shards
    ids = [f"dev{i:05d}" for i in range(spec.devices)]
    by_shard: list[list[str]] = [[] for _ in range(S)]
    for d in ids:
        by_shard[shard_of(d, S)].append(d)
    fspec = fleet.FleetSpec(devices=spec.devices, rounds=spec.rounds, model=spec.model,
                            train_s=spec.train_s, jitter_s=spec.jitter_s, procs=spec.procs,
                            timeout_s=spec.timeout_s, deadline_s=spec.deadline_s, shards=S)
    result: dict[str, Any] = {"devices": spec.devices, "shards": S, "rounds": spec.rounds,
                              "links": spec.links, "model": spec.model, "procs": spec.procs,
                              "train_s": spec.train_s, "subnet": f"{spec.subnet}.0/24",
                              "devices_per_shard": [len(x) for x in by_shard],
                              "loadavg_1m_start": os.getloadavg()[0]}
    if spec.links == "wan":
        result["wan"] = {"delay_ms": spec.delay_ms, "stall_per_min": spec.stall_per_min,
                         "stall_s": spec.stall_s, "drop_per_min": spec.drop_per_min}
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    workers: list[tuple[Any, Any]] = []
    try:
        build_topology(plan)
        leader_addr = plan.addr(plan.leader)
        state = work / "state"
        logins = fleet.aggregator_logins(S)
        # leader host: broker (with the bridges' logins), then the leader
        conf = _broker_files(work / "leader-broker", [], S, leader_addr, bridges=S)
        topo.start("broker-leader", plan.leader, ["mosquitto", "-c", str(conf)])
        for i in range(S):
            via_relay = spec.links == "wan" or (spec.links == "outage" and i == spec.outage_shard)
            addr = f"127.0.0.1:{RELAY_PORT}" if via_relay else f"{leader_addr}:{BROKER_PORT}"
            bridge = bridge_conf(i, addr, fleet.password_of(bridge_user(i)))
            conf = _broker_files(work / f"shard-{i}-broker", by_shard[i], S,
                                 plan.addr(plan.shard(i)), bridge=bridge)
            topo.start(f"broker-shard-{i}", plan.shard(i), ["mosquitto", "-c", str(conf)])
            if via_relay:
                topo.start(f"relay-shard-{i}", plan.shard(i),
                           _relay_cmd(spec, i, leader_addr, spec.links == "wan"))
        _setns(plan.devices)  # this process now sees the LAN as the devices host does
        _wait_port(leader_addr, BROKER_PORT, topo.procs["broker-leader"], "leader broker")
        for i in range(S):
            _wait_port(plan.addr(plan.shard(i)), BROKER_PORT, topo.procs[f"broker-shard-{i}"],
                       f"shard {i}'s broker")

        def cmd(stem: str) -> list[str]:
            cfg = work / f"{stem}.toml"
            cfg.write_text(fleet._coordinator_toml(fspec, BROKER_PORT, state, logins[stem]))
            return [*fspec.fedcoe_cmd, "coordinator", "--config", str(cfg)]

        topo.start("leader", plan.leader, [*cmd("leader"), "--role", "leader"])
        for i in range(S):
            topo.start(f"shard-{i}", plan.shard(i),
                       [*cmd(f"shard-{i}"), "--role", "shard", "--shard-index", str(i)])
        ps = {n: psutil.Process(p.pid) for n, p in topo.procs.items()}
        shard_addrs = [(plan.addr(plan.shard(i)), BROKER_PORT) for i in range(S)]
        ctx = mp.get_context("spawn")
        stop_event = ctx.Event()
        stop_at = time.monotonic() + spec.timeout_s
        samples: list[tuple[float, dict[str, tuple[float, int]]]] = []
        sys_vals: list[tuple[float, str, str, float]] = []
        stats: list[dict[str, Any]] = []
        outage: dict[str, Any] = {}
        started = time.time()

        def snap(gen: list[Any]) -> None:
            row = {n: _cpu_rss(p) for n, p in ps.items()}
            g = [_cpu_rss(w) for w in gen]
            row["generator"] = (sum(c for c, _ in g), sum(r for _, r in g))
            samples.append((time.time(), row))

        async def drive() -> None:
            stop = asyncio.Event()
            onl = [asyncio.Event() for _ in range(S)]
            from fedcoe_edge.sharding import shard_federation

            mons = [asyncio.create_task(_monitor(leader_addr, sys_vals, stop, None, FEDERATION,
                                                 "broker-leader"))]
            for i in range(S):
                mons.append(asyncio.create_task(_monitor(
                    shard_addrs[i][0], sys_vals, stop, onl[i], shard_federation(FEDERATION, i, S),
                    f"broker-shard-{i}")))
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in onl)), 300)
            except asyncio.TimeoutError:
                stop.set()
                dead = [n for n, p in topo.procs.items() if p.poll() is not None]
                raise RuntimeError(f"fleet_hosts: shard aggregators not online after 300 s "
                                   f"(exited: {dead or 'none'})") from None
            snap([])
            wps = []
            for k in range(spec.procs):
                rx, tx = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_gen_worker, args=(fspec, shard_addrs, ids[k::spec.procs],
                                                          stop_at, stop_event, tx), daemon=True)
                p.start()
                workers.append((p, rx))
                wps.append(psutil.Process(p.pid))
            r1_open: float | None = None  # when the leader logged round 1 open
            pending = list(workers)
            leader = topo.procs["leader"]
            gone_at: float | None = None
            while pending:
                await asyncio.sleep(0.5)
                snap([w for w in wps if w.is_running()])
                if spec.links == "outage" and not outage and r1_open is None and \
                        "round 1 open" in (work / "leader.log").read_text(errors="replace"):
                    r1_open = time.monotonic()
                if (spec.links == "outage" and not outage and r1_open is not None
                        and time.monotonic() - r1_open >= spec.outage_at_s):
                    topo.procs[f"relay-shard-{spec.outage_shard}"].send_signal(signal.SIGUSR1)
                    outage.update({"shard": spec.outage_shard, "start": time.time(),
                                   "end": time.time() + spec.outage_s})
                    log.info("fleet_hosts: shard %d's bridge cut for %.0f s", spec.outage_shard,
                             spec.outage_s)
                for item in list(pending):
                    if item[1].poll():
                        stats.append(item[1].recv())
                        pending.remove(item)
                if leader.poll() is not None:
                    gone_at = gone_at or time.monotonic()
                    if time.monotonic() - gone_at > 20.0:
                        stop_event.set()
                if time.monotonic() > stop_at + 30:
                    break
            stop.set()
            for m in mons:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(m, 5)

        asyncio.run(drive())
        for p, _ in workers:
            p.join(timeout=10)
        for name in ["leader", *(f"shard-{i}" for i in range(S))]:
            try:
                topo.procs[name].wait(timeout=max(5.0, stop_at - time.monotonic()))
            except subprocess.TimeoutExpired:
                topo.procs[name].terminate()
        result["wall_s"] = time.time() - started
        result["exits"] = {n: topo.procs[n].returncode
                           for n in ["leader", *(f"shard-{i}" for i in range(S))]}
        result["outage"] = outage
        result.update(_summarise(spec, state, samples, sys_vals, stats))
        topo.stop_all()
        for name in topo.procs:
            if name.startswith("relay-"):
                tail = (work / f"{name}.log").read_text(errors="replace").splitlines()
                got = [x for x in tail if x.startswith("relay stats ")]
                if got:
                    result.setdefault("relays", {})[name] = json.loads(got[-1][len("relay stats "):])
        result["bridge_log"] = {
            f"shard-{i}": [x for x in (work / f"shard-{i}-broker" / "mosquitto.log")
                           .read_text(errors="replace").splitlines() if "ridge" in x][-6:]
            for i in range(S)}
        result["leader_log_tail"] = (work / "leader.log").read_text(errors="replace").splitlines()[-4:]
        return result
    finally:
        for p, _ in workers:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        topo.stop_all()
        with contextlib.suppress(OSError):
            if ctypes.CDLL(None, use_errno=True).setns(home, CLONE_NEWNET) != 0:
                log.warning("fleet_hosts: could not return to the original network namespace")
        os.close(home)
        remove_topology(spec.prefix)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def _per_shard_rounds(state: Path, shards: int) -> list[list[dict[str, Any]]]:
    from coordinator.store import Store

    out: list[list[dict[str, Any]]] = []
    for i in range(shards):
        path = state / f"shard-{i}" / "coordinator.sqlite"
        if not path.is_file():
            out.append([])
            continue
        store = Store(path, readonly=True)
        try:
            out.append([{k: v for k, v in store.round_summary(r["round"]).items()
                         if k in ("round", "state", "selected", "accepted", "failed", "rejected")}
                        for r in store.rounds()])
        finally:
            store.close()
    return out


def _summarise(spec: HostsSpec, state: Path, samples: list[tuple[float, dict[str, tuple[float, int]]]],
               sys_vals: list[tuple[float, str, str, float]],
               stats: list[dict[str, Any]]) -> dict[str, Any]:
    devices, connect_failed = fleet.merge_generator_stats(stats)
    rows, opened, evals = fleet._round_rows(state, spec.shards)
    names = sorted(samples[0][1]) if samples else []

    def window(t0: float, t1: float) -> list[dict[str, tuple[float, int]]]:
        before = [r for t, r in samples if t <= t0][-1:]
        return before + [r for t, r in samples if t0 < t < t1] + [r for t, r in samples if t >= t1][:1]

    def delta(ws: list[dict[str, tuple[float, int]]], n: str) -> float:
        vals = [w[n][0] for w in ws if n in w and not math.isnan(w[n][0])]
        return vals[-1] - vals[0] if len(vals) >= 2 else math.nan

    drop = "$SYS/broker/publish/messages/dropped"
    out_rows = []
    for r in rows:
        t0, t1 = opened.get(r["round"], (math.nan, math.nan))
        t1 = t1 if t1 is not None else time.time()
        ws = window(t0, t1)
        out_rows.append({"round": r["round"], "state": r["state"], "selected": r["selected"],
                         "accepted": r["accepted"], "failed": r["failed"],
                         "rejected": r["rejected"], "wall_s": r["wall_s"], "opened_at": t0,
                         "closed_at": t1, "cpu_s": {n: delta(ws, n) for n in names},
                         "peak_rss_mb": {n: max((w[n][1] for w in ws if n in w), default=0) / 2**20
                                         for n in names}})
    drops = {}
    for label in {lb for _, lb, _, _ in sys_vals}:
        drops[label] = max((v for _, lb, tp, v in sys_vals if lb == label and tp == drop),
                           default=math.nan)
    return {
        "rounds_completed": sum(1 for r in rows if r["state"] == "closed"),
        "round_rows": out_rows, "per_shard_rounds": _per_shard_rounds(state, spec.shards),
        "connect_failed_count": len(connect_failed), "connect_failed": connect_failed[:10],
        "final_models": sum(1 for d in devices.values() if d["final_model"]),
        "final_evals_acked": sum(1 for d in devices.values() if d["eval_acked"]),
        "evals_stored": evals,
        "device_rejects_total": sum(len(d["rejects"]) for d in devices.values()),
        "reject_examples": sorted({x for d in devices.values() for x in d["rejects"]})[:5],
        "requests_given_up": sum(len(d["gave_up"]) for d in devices.values()),
        "devices_reported": len(devices),
        "broker_drops": drops, "broker_drops_total": sum(v for v in drops.values() if not math.isnan(v)),
        "cpu_s_total": {n: (samples[-1][1][n][0] - samples[0][1][n][0]) if samples else math.nan
                        for n in names},
        "peak_rss_mb": {n: max((r[n][1] for _, r in samples if n in r), default=0) / 2**20
                        for n in names},
    }


# ----------------------------------------------------------------------------- report
def summary(run: dict[str, Any]) -> dict[str, Any]:
    """One table row: means over rounds of round time and each process's CPU-s."""
    rows = run.get("round_rows", [])
    n = run["devices"]
    names = sorted(rows[0]["cpu_s"]) if rows else []
    cpu = {k: fleet._mean([r["cpu_s"][k] for r in rows]) for k in names}
    groups = {"leader": ["leader"], "shards (max)": [k for k in names if k.startswith("shard-")],
              "leader broker": ["broker-leader"],
              "shard brokers (max)": [k for k in names if k.startswith("broker-shard-")],
              "relays (max)": [k for k in names if k.startswith("relay-")],
              "generator": ["generator"]}
    rss = run.get("peak_rss_mb", {})
    ok = (run.get("rounds_completed") == run["rounds"] and all(r["accepted"] == n for r in rows)
          and run.get("final_models") == n and run.get("broker_drops_total", 1) == 0
          and run.get("device_rejects_total", 1) == 0)
    return {"devices": n, "links": run["links"], "shards": run["shards"],
            "rounds": f"{run.get('rounds_completed', 0)}/{run['rounds']}",
            "round_s": fleet._mean([r["wall_s"] for r in rows]),
            "accepted": sum(r["accepted"] for r in rows), "failed": sum(r["failed"] for r in rows),
            "drops": run.get("broker_drops_total", math.nan),
            "final": f"{run.get('final_models', 0)}/{n}", "ok": ok,
            "cpu": {g: max((cpu[k] for k in ks if k in cpu), default=math.nan)
                    for g, ks in groups.items()},
            "rss": {g: max((rss[k] for k in ks if k in rss), default=math.nan)
                    for g, ks in groups.items()},
            "cpu_each": cpu}


def write_markdown(runs: list[dict[str, Any]], path: Path, command: str) -> None:
    lines = ["# Fleet past one host: leader host + shard hosts in network namespaces", "",
             f"Command: `{command}`", "",
             "Each host is a Linux network namespace on a private /24 LAN (a bridge and one veth "
             "pair per host): the leader host (its Mosquitto from the deploy template, the "
             "leader), S shard hosts (each its own template Mosquitto with only its devices, one "
             "shard aggregator, and a Mosquitto bridge to the leader's broker from "
             "`deploy/mosquitto/bridge.conf` carrying only that shard's `agg` topics), and a "
             "devices host running the fleet generator (each device on its shard's broker). "
             "`direct`: bridges over the LAN; `wan`: each bridge through a TCP relay with a "
             "fixed one-way delay, random stalls and connection drops; `outage`: one shard's "
             "bridge cut for a few seconds mid-run. CPU-s are per round (mean over rounds), "
             "sampled every 0.5 s; RSS is the peak over the run. All processes share this "
             f"machine's {os.cpu_count()} cores with other work.", "",
             "| devices | links | shards | rounds | round s | leader CPU-s | busiest shard CPU-s | "
             "leader broker CPU-s | busiest shard broker CPU-s | relay CPU-s | generator CPU-s | "
             "leader / shard / broker peak RSS MB | accepted | failed | drops | final models | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x: float, d: int = 2) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"

    for r in runs:
        if "round_rows" not in r:
            lines.append(f"| {r['devices']} | {r.get('links')} | error: {r.get('error', '?')} |")
            continue
        s = summary(r)
        c, m = s["cpu"], s["rss"]
        lines.append(
            f"| {s['devices']} | {s['links']} | {s['shards']} | {s['rounds']} | {f(s['round_s'], 1)} | "
            f"{f(c['leader'])} | {f(c['shards (max)'])} | {f(c['leader broker'])} | "
            f"{f(c['shard brokers (max)'])} | {f(c['relays (max)'])} | {f(c['generator'])} | "
            f"{f(m['leader'], 0)} / {f(m['shards (max)'], 0)} / "
            f"{f(max(m['leader broker'], m['shard brokers (max)']), 0)} | {s['accepted']} | "
            f"{s['failed']} | {f(s['drops'], 0)} | {s['final']} | {'yes' if s['ok'] else 'NO'} |")
    lines += ["", "Per round and shard (accepted / failed of the shard's selected devices):", ""]
    for r in runs:
        if "per_shard_rounds" not in r:
            continue
        per = "; ".join(
            f"shard {i}: " + ", ".join(f"r{x['round']} {x['accepted']}/{x['failed']}" for x in rows)
            for i, rows in enumerate(r["per_shard_rounds"]))
        extra = ""
        if r.get("outage"):
            o = r["outage"]
            rr = [(x["round"], x["opened_at"], x["closed_at"]) for x in r["round_rows"]]
            hit = [k for k, a, b in rr if a < o["end"] and o["start"] < b]
            extra = (f" Outage: shard {o['shard']}'s bridge cut for {o['end'] - o['start']:.0f} s, "
                     f"{'during round(s) ' + ', '.join(map(str, hit)) if hit else 'between rounds'}.")
        if r.get("relays"):
            extra += " Relays: " + "; ".join(f"{k}: {v}" for k, v in sorted(r["relays"].items())) + "."
        walls = ", ".join(f"r{x['round']} {x['wall_s']:.1f} s" for x in r["round_rows"])
        load = r.get("loadavg_1m_start", math.nan)
        lines.append(f"* {r['devices']} devices, {r['links']} (load average {load:.1f} at the "
                     f"start): round wall {walls}; {per}.{extra}")
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs: list[dict[str, Any]], path: Path) -> None:
    """CPU-s per round per process and round time against N, one line style per link kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if "round_rows" in r]
    if not done:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    styles = {"direct": "-", "wan": "--", "outage": ":"}
    for links in sorted({r["links"] for r in done}):
        sums = sorted((summary(r) for r in done if r["links"] == links), key=lambda s: s["devices"])
        ns = [s["devices"] for s in sums]
        st = styles.get(links, "-")
        axes[0].plot(ns, [s["round_s"] for s in sums], "o" + st, color="k", label=f"round ({links})")
        for g, mk, col in (("leader", "o", "C0"), ("shards (max)", "s", "C1"),
                           ("shard brokers (max)", "^", "C2"), ("generator", "v", "C3")):
            axes[1].plot(ns, [s["cpu"][g] for s in sums], mk + st, color=col, label=f"{g} ({links})")
            if g != "generator":
                axes[2].plot(ns, [s["rss"][g] for s in sums], mk + st, color=col,
                             label=f"{g} ({links})")
    for ax, title, unit in zip(axes, ("round time", "CPU per round", "peak RSS"),
                               ("seconds", "CPU-s per round", "MB"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("devices")
        ax.set_ylabel(unit)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _render(sources: list[Path], out: Path, md: Path | None, png: Path | None) -> int:
    """One report from the runs of several ``--json`` files, their commands kept."""
    runs: list[dict[str, Any]] = []
    commands: list[str] = []
    for src in sources:
        try:
            doc = json.loads(src.read_text())
            runs += list(doc["runs"])
            commands.append(str(doc["command"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"fleet_hosts: --from-json {src}: no runs to gather ({exc})", file=sys.stderr)
            return 2
    command = "; ".join(commands)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "runs": runs}, indent=1, default=str) + "\n")
    if md:
        write_markdown(runs, md, command)
    if png:
        write_plot(runs, png)
    return 0


# ----------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"]:
        return relay_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.fleet_hosts", description=__doc__.split("\n\n")[0],
        epilog="Needs root only for `ip netns` (network namespaces, veth pairs, a bridge); "
               "without it exits 2 with one line. Traffic stays on the /24 it creates; "
               "everything is removed on exit, Ctrl-C or failure, and a stale topology with "
               "the same --prefix is removed first. See docs/benchmarks.md, \"Fleet past one host\".")
    p.add_argument("--devices", type=int, nargs="+", default=[100])
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--links", nargs="+", default=["direct"], choices=["direct", "wan", "outage"],
                   help="how the bridges travel, each run per size: direct (the LAN), wan (a "
                        "relay with delay, stalls, drops), outage (one shard's bridge cut mid-run)")
    p.add_argument("--procs", type=int, default=2, help="generator processes")
    p.add_argument("--train-s", type=float, default=1.0)
    p.add_argument("--jitter-s", type=float, default=0.5)
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="round deadline (0: the fleet benchmark's 60 s + 60 ms per device)")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--delay-ms", type=float, default=40.0, help="wan: one-way delay")
    p.add_argument("--stall-per-min", type=float, default=2.0, help="wan: stalls per connection-minute")
    p.add_argument("--stall-s", type=float, default=1.5, help="wan: length of a stall")
    p.add_argument("--drop-per-min", type=float, default=0.5,
                   help="wan: connection drops per connection-minute")
    p.add_argument("--outage-shard", type=int, default=0)
    p.add_argument("--outage-at-s", type=float, default=1.0,
                   help="outage: seconds after the leader opens round 1 (the shard's devices "
                        "train, then its partial must cross the cut bridge)")
    p.add_argument("--outage-s", type=float, default=8.0)
    p.add_argument("--prefix", default="fch", help="namespace names PREFIX-leader, PREFIX-s0, ...")
    p.add_argument("--subnet", default="10.231.0", help="first three octets of the private /24")
    p.add_argument("--model", default="deploy", choices=["deploy", "camera", "smoke"])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="keep configs, logs and state here")
    p.add_argument("--from-json", type=Path, nargs="+", default=None, metavar="PATH",
                   help="run nothing: gather the runs of earlier --json files into --json, "
                        "--md and --png (sizes measured by separate commands, one report)")
    a = p.parse_args(argv)
    if a.from_json:
        return _render(a.from_json, a.json, a.md, a.png)
    problem = root_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    from fedcoe_edge.sharding import MAX_SHARDS

    octets = a.subnet.split(".")
    if (not 1 <= a.shards <= min(MAX_SHARDS, 80) or any(n < 1 for n in a.devices) or a.rounds < 1
            or len(octets) != 3 or not all(o.isdigit() and int(o) < 256 for o in octets)
            or not a.prefix.replace("-", "").isalnum() or len(a.prefix) > 8):
        print("fleet_hosts: --shards 1..80, --devices/--rounds >= 1, --subnet A.B.C, "
              "--prefix alphanumeric up to 8 characters", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the finally blocks tear the topology down

    signal.signal(signal.SIGTERM, on_term)
    command = "python -m benchmarks.fleet_hosts " + " ".join(argv)
    runs: list[dict[str, Any]] = []
    for n in a.devices:
        for links in a.links:
            spec = HostsSpec(devices=n, shards=a.shards, rounds=a.rounds, links=links,
                             procs=a.procs, train_s=a.train_s, jitter_s=a.jitter_s,
                             deadline_s=a.deadline_s, timeout_s=a.timeout_s, prefix=a.prefix,
                             subnet=a.subnet, delay_ms=a.delay_ms, stall_per_min=a.stall_per_min,
                             stall_s=a.stall_s, drop_per_min=a.drop_per_min,
                             outage_shard=a.outage_shard, outage_at_s=a.outage_at_s,
                             outage_s=a.outage_s, model=a.model,
                             workdir=str(a.workdir / f"n{n}-{links}") if a.workdir else "")
            log.info("fleet_hosts: %d devices, leader + %d shard hosts, links %s", n, a.shards, links)
            t0 = time.time()
            try:
                run = run_hosts(spec)
            except KeyboardInterrupt:
                print("fleet_hosts: interrupted; topology removed", file=sys.stderr)
                return 130
            except Exception as exc:  # noqa: BLE001 - one size failing must not lose the others
                log.exception("fleet_hosts %d %s failed", n, links)
                run = {"devices": n, "links": links, "shards": a.shards, "rounds": a.rounds,
                       "error": str(exc)[:300]}
            run["run_s"] = time.time() - t0
            runs.append(run)
            if "round_rows" in run:
                s = summary(run)
                log.info("fleet_hosts %d %s: rounds %s, round %.1f s, final %s, drops %s, cpu %s",
                         n, links, s["rounds"], s["round_s"], s["final"], s["drops"],
                         {k: round(v, 2) for k, v in s["cpu"].items()})
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"command": command, "runs": runs}, indent=1,
                                         default=str) + "\n")
            if a.md:
                write_markdown(runs, a.md, command)
            if a.png:
                write_plot(runs, a.png)
    return 0 if all("round_rows" in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
