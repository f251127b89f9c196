"""The device agent: one device's side of FedCoE over MQTT.

FedCoE (arXiv 2605.21264): a device fine-tunes its private level (local experts + local
gate) together with the few global experts the coordinator assigned it, reports its
routing affinity, and uploads only those experts plus the gate. Its private level never
leaves the device (it lives in ``STATE/local.safetensors``). A device joining late takes
the cold-start path: gate first, routing prior on its own unlabeled data, then only its
top experts, and it predicts at once without a gradient step.

Install profiles (docs/daemons.md): with torch (the wheel's ``[train]``) the agent trains and
predicts with the torch model; without it (the runtime profile) a cold device runs its
signed bundle through :class:`~fedcoe_edge.runtime.MoESession` and swaps the gate and the
experts it downloads into that bundle (``engine = "onnx"``); asked to train, it declines.

Threads: transport handlers only authenticate, reassemble chunks and enqueue (design
section 8: never block in a callback); one worker thread trains, uploads, evaluates.
Training calls the same ``Strategy.client_update`` the simulator calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.config import AgentConfig
from device_agent.data import LocalData, check_labels, load_local, relabel
from fedcoe_edge import protocol as P
from fedcoe_edge.checkpoint import load_arrays_file, save_arrays
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError, DataError, FedCoEError, WireError
from fedcoe_edge.health import chance_warning, loss_warning, update_warning
from fedcoe_edge.io import atomic_write_bytes
from fedcoe_edge.messages import (
    Accept,
    EvalAck,
    Model,
    Refused,
    Reject,
    SharedRef,
    Status,
    Task,
    Welcome,
    XferDone,
    XferProgress,
    XferUnknown,
)
from fedcoe_edge.protocol import RETRY_ATTEMPTS, reason_class, retry_delay
from fedcoe_edge.strategies import ClientData, ClientResult, ClientTask, Strategy, make_strategy
from fedcoe_edge.strategies.bundle_rules import BUNDLE_COLD_RULES, bundle_cold_rule
from fedcoe_edge.transport import Message, Topics, Transport, Will
from fedcoe_edge.transport.blob import (
    XFER_DONE,
    XFER_PROGRESS,
    BlobReceiver,
    BlobSender,
    open_blob,
)
from fedcoe_edge.transport.shared import SHARED_IDLE_S, SharedDownload
from fedcoe_edge.wire import (
    Envelope,
    TransferManifest,
    compress_delta,
    compressed_delta_metadata,
    decode_tensors,
    encode_envelope,
    encode_tensors,
)

log = logging.getLogger("fedcoe.agent")

# torch's global RNG is touched when models are built: agents sharing one process (tests)
# take turns so every run is reproducible.
TORCH_LOCK = threading.Lock()
REANNOUNCE_S = 5.0  # repeat an upload's result envelope until the coordinator answers
STATUS_HELLO_S = 30.0  # a repeated "coordinator online" says hello again at most this often
# exit code when the coordinator refuses this device (not, or no longer, in its
# allowed_devices): the systemd unit's RestartPreventExitStatus names it, like 2
EXIT_NOT_ALLOWED = 3
DEADLINE_GRACE_S = 2.0  # an upload is waited for this long past the round deadline
# FETCH and EVAL are re-sent until answered (fedcoe_edge.protocol.retry_delay): a QoS 1
# message can be lost in a broker or coordinator restart, and neither has a manifest the
# pump loop would repeat; at most RETRY_ATTEMPTS sends per request (per purpose or kind,
# per round), so an unanswering coordinator costs a bounded number of messages.
RETRY_TICK_S = 0.25
FETCH_TRANSFER_S = 60.0  # once a fetch's `model` manifest arrived: time to finish the download
TRUNK_FILE = "trunk.safetensors"  # the federation's pretrained trunk, fetched once (STATE/)
# the highest bundle version this device accepted (docs/bundle.md, "Versions and rollback")
BUNDLE_FLOOR_FILE = "bundle_version.json"
SHARED_MAX = 4  # shared downloads assembled at once (each bounded by its signed manifest)
SHARED_FAILED_MAX = 256  # transfers remembered as fallen back to the per-device path


@dataclass
class PendingRequest:
    """A FETCH or EVAL this device sent and has no answer for yet (re-sent when ``due``)."""

    type: str
    body: dict[str, Any]
    round: int
    sent: int = 0
    due: float = 0.0


def torch_installed() -> bool:
    """Whether this install has torch (the train profile); checked without importing it."""
    return importlib.util.find_spec("torch") is not None


NO_TORCH = ("this device has the runtime install profile (no torch) and cannot train; run it "
            "as a cold device ([device] role = \"cold\") or install torch and the wheel with [train] "
            "(docs/deploy.md, \"Which install a device needs\")")

RequestKey = tuple[str, str, int]  # (type, purpose or kind, round; 0 for gate/cold fetches)


def fetch_key(purpose: str, rnd: int) -> RequestKey:
    """A refresh belongs to the round it follows; gate and cold fetches to none (the
    coordinator labels their answer with its current round, which the device cannot know)."""
    return (P.FETCH, purpose, rnd if purpose == "refresh" else 0)


@dataclass
class AgentHooks:
    """Test and fault-injection points (a real device passes none)."""

    tamper: Any = None  # (round, params) -> params, applied before encoding an upload
    before_upload: Any = None  # (agent, round) -> bool; False: skip the upload (device vanishes)


class DeviceAgent:
    """One device. ``run()`` blocks until stop(); ``start()`` + ``stop()`` for embedding."""

    def __init__(self, cfg: AgentConfig, factory: P.TransportFactory | None = None,
                 data: ClientData | None = None, hooks: AgentHooks | None = None) -> None:
        self.cfg = cfg
        self.dev = cfg.device.id
        self.topics = Topics(cfg.device.federation)
        self.coord = cfg.device.coordinator_id
        self.state_dir = cfg.state_dir
        self.hooks = hooks or AgentHooks()
        self._factory = factory if factory is not None else P.mqtt_factory(cfg.broker)
        self._data = data
        self._local = LocalData(data) if data is not None else None  # as loaded, before relabelling
        self.classes: list[str] | None = None  # class names of the labels, once welcomed
        self.refused: str | None = None  # why this device declined the federation's task
        self.not_allowed: str | None = None  # why the coordinator refuses this device (exit 3)
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.strategy: Strategy | None = None
        self.welcome: dict[str, Any] = {}
        self.bc_key: bytes | None = None
        self.local_state: dict[str, np.ndarray] | None = None
        self.local_after: dict[int, dict[str, np.ndarray] | None] = {}
        self.held: dict[str, np.ndarray] = {}  # global parameters this device holds
        self.held_ids: list[int] = []
        self.last_result: tuple[int, ClientResult, dict[str, np.ndarray]] | None = None
        self.pending: dict[str, dict[str, Any]] = {}  # download xfer id -> context
        self.uploads: dict[str, tuple[BlobSender, threading.Event]] = {}
        self._reannounce: dict[str, threading.Event] = {}  # upload xfer id -> coordinator lost it
        self.aborted: set[str] = set()  # uploads the coordinator refused up front
        self.confirmed: set[str] = set()  # uploads the coordinator had already accepted
        self.rounds_done: list[int] = []
        self.evals: list[dict[str, Any]] = []
        self.evaluated: set[int] = set()  # rounds whose personal accuracy was reported
        self._refreshing: set[int] = set()
        self.cold_ready = threading.Event()
        self.accepted: dict[int, bool] = {}
        self.transport: Transport | None = None
        self.messenger: P.Messenger | None = None
        self.receiver = BlobReceiver(self._report, auto_ack=True)  # nothing to persist first
        self._status_seen: set[tuple[str, int]] = set()
        self._refused = P.LogLimiter()  # one line per kind of refused message per minute
        self._coord_state = ""  # last coord/status seen: "online" / "offline"
        self._status_hello_at: float | None = None
        self._bundle_note = False
        self.bundle_error: str | None = None  # why the last bundle rebuild failed
        # the last rebuild, reported in heartbeats (docs/protocol.md, section 3, "Heartbeat"):
        # {"round", "ok", "error"}; None until one was tried
        self.bundle_status: dict[str, Any] | None = None
        self._requests: dict[RequestKey, PendingRequest] = {}  # FETCH / EVAL awaiting an answer
        # a welcome whose model names a pretrained trunk this device does not hold yet: it
        # is joined once the trunk has been fetched; tasks that come meanwhile wait here
        self._trunk_wait: tuple[dict[str, Any], ModelConfig] | None = None
        self._waiting_tasks: list[tuple[dict[str, Any], TransferManifest, bytes]] = []
        # shared downloads (docs/protocol.md, "Shared downloads"): transfer id -> its
        # reassembly, shared id -> the transfer ids assembled from it, and the transfers
        # that fell back to the per-device path (their re-announces use that path)
        self._shared_dl: dict[str, SharedDownload] = {}
        self._shared_sub: dict[str, set[str]] = {}
        self._shared_failed: deque[str] = deque(maxlen=SHARED_FAILED_MAX)
        self.shared_downloads = 0  # completed from the shared copy (tests, operators)
        self.shared_fallbacks: deque[str] = deque(maxlen=100)  # newest reasons
        self.requests_given_up: deque[RequestKey] = deque(maxlen=100)  # newest, for operators
        engine = cfg.device.engine
        self.engine = ("torch" if torch_installed() else "onnx") if engine == "auto" else engine
        self.session: Any = None  # the onnx engine's MoESession on its bundle
        self.bundle_dir = (Path(cfg.device.bundle_path) if cfg.device.bundle_path
                           else self.state_dir / "bundle")
        from fedcoe_edge.bundle_io import VersionFloor

        self.bundle_floor = VersionFloor(self.state_dir / BUNDLE_FLOOR_FILE)

    # ------------------------------------------------------------------ plumbing
    def _keys(self, sender: str) -> bytes | None:
        return self.cfg.key if sender == self.coord else None

    def _send(self, type: str, body: dict[str, Any], rnd: int = 0) -> None:
        if self.messenger is not None:
            self.messenger.send(self.topics.up_ctl(self.dev), type, self.coord, body, self.cfg.key,
                                round=rnd)

    def _report(self, type: str, body: dict[str, Any]) -> None:
        self._send(type, body)

    def _request(self, key: RequestKey, body: dict[str, Any], rnd: int) -> None:
        """Send a FETCH or EVAL and keep it until answered (see :meth:`_retry_loop`).
        Sending the same request again (a repeated welcome) counts as an attempt."""
        type_ = key[0]
        with self._lock:
            req = self._requests.get(key)
            if req is None:
                req = self._requests[key] = PendingRequest(type_, dict(body), rnd)
            req.body, req.round = dict(body), rnd
            req.sent += 1
            req.due = time.monotonic() + retry_delay(req.sent)
        self._send(type_, body, rnd)

    def _answered(self, key: RequestKey) -> None:
        with self._lock:
            self._requests.pop(key, None)

    def _postpone(self, key: RequestKey, seconds: float) -> None:
        """The coordinator answered a fetch with its manifest: give the download time."""
        with self._lock:
            req = self._requests.get(key)
            if req is not None:
                req.due = time.monotonic() + seconds

    def _retry_loop(self) -> None:
        """Re-send unanswered FETCH / EVAL with backoff; give up after RETRY_ATTEMPTS sends
        (one WARNING line), so a coordinator that never answers costs a bounded amount."""
        while not self._stop.wait(RETRY_TICK_S):
            t = self.transport
            if t is None or not t.connected:
                continue  # a send now would be lost too; the timers wait for the connection
            now = time.monotonic()
            self._shared_tick(now)
            resend: list[PendingRequest] = []
            dropped: list[PendingRequest] = []
            with self._lock:
                for k, r in list(self._requests.items()):
                    if r.due > now:
                        continue
                    if r.sent >= RETRY_ATTEMPTS:
                        del self._requests[k]
                        self.requests_given_up.append(k)
                        dropped.append(r)
                    else:
                        r.sent += 1
                        r.due = now + retry_delay(r.sent)
                        resend.append(r)
            for r in dropped:
                log.warning("%s: %s for round %d unanswered after %d sends; giving up", self.dev,
                            r.type, r.round, r.sent)
            for r in resend:
                log.info("%s: %s for round %d unanswered; sending it again (%d of %d)", self.dev,
                         r.type, r.round, r.sent, RETRY_ATTEMPTS)
                with contextlib.suppress(FedCoEError):
                    self._send(r.type, r.body, r.round)

    @property
    def data(self) -> ClientData:
        assert self._data is not None
        return self._data

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Load data and private state, connect with presence + last-will, say hello."""
        if self._data is None:
            self._local = load_local(self.cfg.data)
            self._data = self._local.data
        self.state_dir.mkdir(parents=True, exist_ok=True)
        local = self.state_dir / "local.safetensors"
        if local.is_file():
            self.local_state = load_arrays_file(local)
            log.info("%s: private state loaded from %s", self.dev, local)
        self._load_round()
        will = Will(self.topics.presence(self.dev), P.presence_payload("offline"), 1, True)
        birth = Will(self.topics.presence(self.dev), P.presence_payload("online"), 1, True)
        self.transport = self._factory(self.dev, will, birth)
        self.messenger = P.Messenger(self.transport, self.topics, self.dev, self._keys)
        self.transport.subscribe(f"{self.topics.prefix}/dn/{self.dev}/ctl", self._on_ctl)
        self.transport.subscribe(self.topics.dn_blob_filter(self.dev), self._on_blob, bulk=True)
        self.transport.subscribe(self.topics.bc_ctl(), self._on_broadcast)
        self.transport.subscribe(self.topics.coord_status(), self._on_coord_status)
        self.transport.add_connection_listener(self._on_connection)
        self.transport.connect()
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.dev}", daemon=True)
        self._worker.start()
        if self.cfg.device.heartbeat_s > 0:
            threading.Thread(target=self._heartbeat, name=f"hb-{self.dev}", daemon=True).start()
        threading.Thread(target=self._retry_loop, name=f"retry-{self.dev}", daemon=True).start()

    def _heartbeat(self) -> None:
        """QoS 0 telemetry: lost while offline, which is what a heartbeat should do."""
        while not self._stop.wait(self.cfg.device.heartbeat_s):
            self._beat()

    def _beat(self) -> None:
        """One heartbeat now: memory, load, rounds done and the last bundle rebuild's status
        (so an operator or `fedcoe demo` reads it from the coordinator, not from our logs)."""
        t, m = self.transport, self.messenger
        if t is None or m is None or not t.connected:
            return
        body: dict[str, Any] = {"rss_mb": _rss_mb(), "load": _load(),
                                "rounds_done": len(self.rounds_done)}
        if self.bundle_status is not None:
            body["bundle"] = self.bundle_status
        env = Envelope.new(P.HEARTBEAT, federation=self.topics.federation, sender=self.dev,
                           recipient=self.coord, body=body, ttl_s=120)
        try:
            t.publish(self.topics.up_hb(self.dev), encode_envelope(env, self.cfg.key), qos=0)
        except FedCoEError as exc:
            log.debug("%s: heartbeat not sent: %s", self.dev, exc)

    def hello(self) -> None:
        d = self.data
        caps: dict[str, Any] = {"role": self.cfg.device.role, "tier": self.cfg.device.tier,
                                "memory_mb": self.cfg.device.memory_mb or _memory_mb(),
                                "num_samples": d.num_train, "runtime": "python"}
        if self.cfg.device.share_label_histogram and d.num_train:
            caps["label_hist"] = np.bincount(d.y_train).tolist()
        self._send(P.HELLO, caps)

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(("stop", None))

    def close(self, join_s: float = 30.0) -> None:
        """Finish the job in hand (a training step, an upload, a bundle build: never leave
        half a file or a torch thread behind), then disconnect cleanly: presence goes
        offline (published here, not by the will)."""
        self.stop()
        worker = getattr(self, "_worker", None)
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=join_s)
            if worker.is_alive():
                log.warning("%s: worker still busy after %.0fs; leaving it", self.dev, join_s)
        if self.transport is not None:
            with contextlib.suppress(FedCoEError):
                self.transport.publish(self.topics.presence(self.dev), P.presence_payload("offline"),
                                       qos=1, retain=True)
            time.sleep(0.1)
            self.transport.close()

    def run(self) -> int:
        """Block until stopped; 2 when the device declined the federation's task (a data or
        label mismatch no restart fixes), :data:`EXIT_NOT_ALLOWED` when the coordinator
        refused this device (not or no longer in its allowed_devices): the systemd unit
        restarts on neither (docs/daemons.md, "Adding and removing devices")."""
        self.start()
        try:
            self._stop.wait()
        finally:
            self.close()
        if self.not_allowed:
            return EXIT_NOT_ALLOWED
        return 2 if self.refused else 0

    def _on_refused(self, reason: str) -> None:
        """The coordinator says this device is not allowed in the federation: nothing it
        sends will count, and retrying cannot change that (only the operator's
        ``fedcoe devices add`` can), so print the reason and stop."""
        if self.not_allowed is not None:
            return
        self.not_allowed = reason or "no reason given"
        log.error("%s: refused by the coordinator: %s; stopping with exit code %d "
                  "(docs/daemons.md, \"Adding and removing devices\")", self.dev,
                  self.not_allowed, EXIT_NOT_ALLOWED)
        self.stop()

    def decline(self, reason: str) -> None:
        """Tell the coordinator this device cannot train its task, log one line, and stop:
        the coordinator drops it from the round at once instead of waiting out the deadline,
        and honest devices carry on."""
        self.refused = reason
        log.error("%s: declining the federation's task: %s", self.dev, reason)
        with contextlib.suppress(FedCoEError):
            self._send(P.DECLINE, {"reason": reason[:500]})
        self.stop()

    # ------------------------------------------------------------------ handlers (enqueue only)
    def _on_connection(self, up: bool) -> None:
        if up:
            self.hello()

    def _on_coord_status(self, msg: Message) -> None:
        state = P.presence_state(msg.payload)
        if state is None:
            return
        previous, self._coord_state = self._coord_state, str(state)
        if state != "online" or msg.retain:
            return  # a retained status is old news: it never triggers a hello
        now = time.monotonic()
        if previous == "online" and self._status_hello_at is not None and (
                now - self._status_hello_at < STATUS_HELLO_S):
            return  # "online" again without "offline" in between: a replay or a takeover loop
        self._status_hello_at = now
        self.hello()  # the coordinator (re)started: register again, resume the round

    def _on_broadcast(self, msg: Message) -> None:
        if self.bc_key is None or self.messenger is None:
            return  # not welcomed yet; the retained status will be re-read on hello
        try:
            env = self.messenger.open(msg.payload, expect_sender=self.coord, key_override=self.bc_key)
            status = Status.from_wire(env.body)
        except WireError as exc:
            if "replayed" not in str(exc):
                self._refused.warning(log, "broadcast", reason_class(str(exc)),
                                      f"{self.dev}: broadcast refused: {exc}")
            return
        key = (status.state, status.round)
        if key not in self._status_seen:
            self._status_seen.add(key)
            self._jobs.put(("status", status.to_wire()))

    def _on_ctl(self, msg: Message) -> None:
        assert self.messenger is not None
        try:
            env = self.messenger.open(msg.payload, expect_sender=self.coord)
        except WireError as exc:
            self._refused.warning(log, "ctl", reason_class(str(exc)),
                                  f"{self.dev}: message refused: {exc}")
            return
        b = env.body
        try:  # each body is typed (fedcoe_edge/messages.py) before it is acted on
            if env.type == P.WELCOME:
                Welcome.from_wire(b)
                self._jobs.put(("welcome", b))
            elif env.type in (P.TASK, P.MODEL):
                typed: Task | Model = (Task if env.type == P.TASK else Model).from_wire(b)
                manifest = typed.manifest
                ctx = {"kind": env.type, "round": env.round,
                       **{k: v for k, v in typed.to_wire().items() if k != "manifest"}}
                if isinstance(typed, Task):  # the round deadline, locally
                    ctx["deadline_at"] = time.monotonic() + typed.deadline_s
                with self._lock:
                    self.pending[manifest.transfer_id] = ctx
                if isinstance(typed, Model):
                    self._postpone(fetch_key(typed.purpose, env.round), FETCH_TRANSFER_S)
                if typed.shared is not None and self._shared_start(manifest, typed.shared):
                    return  # assembled from the shared copy; the per-device one is the fallback
                self.receiver.expect(manifest)
                self.receiver.nudge(manifest.transfer_id)
            elif env.type in (XFER_PROGRESS, XFER_DONE):
                report = (XferProgress if env.type == XFER_PROGRESS else XferDone).from_wire(b)
                with self._lock:
                    up = self.uploads.get(report.xfer)
                if up is not None:
                    sender, started = up
                    started.set()
                    if env.type == XFER_PROGRESS:
                        sender.on_progress(b)
                    else:
                        sender.on_done(b)
            elif env.type == P.XFER_UNKNOWN:
                unknown = XferUnknown.from_wire(b)
                with self._lock:
                    ev = self._reannounce.get(unknown.xfer)
                if ev is not None:  # the coordinator restarted mid-upload: announce it again now
                    log.info("%s: coordinator does not know upload %s; re-announcing", self.dev,
                             unknown.xfer)
                    ev.set()
            elif env.type == P.ACCEPT:
                accept = Accept.from_wire(b)
                self.accepted[env.round] = True
                log.info("%s: update for round %d accepted", self.dev, env.round)
                with self._lock:
                    up = self.uploads.get(str(accept.xfer))
                if up is not None:  # accepted earlier (same bytes re-sent after a restart)
                    self.confirmed.add(str(accept.xfer))
                    up[1].set()
            elif env.type == P.EVAL_ACK:
                self._answered((P.EVAL, EvalAck.from_wire(b).kind, env.round))
            elif env.type == P.REFUSED:
                self._on_refused(Refused.from_wire(b).reason)
            elif env.type == P.REJECT:
                rej = Reject.from_wire(b)
                b = rej.to_wire()
                reason = rej.reason
                log.warning("%s: round %d: coordinator rejected: %s", self.dev, env.round, reason)
                refused = reason.split(":", 1)[0]
                if refused in (P.FETCH, P.EVAL):  # refused for good: re-sending cannot help
                    with self._lock:
                        for key in [k for k in self._requests if k[0] == refused
                                    and self._requests[k].round == env.round]:
                            del self._requests[key]
                    return
                self.accepted[env.round] = False
                with self._lock:
                    up = self.uploads.get(str(b.get("xfer")))
                if up is not None:  # refused before any chunk: stop waiting for the transfer
                    self.aborted.add(str(b.get("xfer")))
                    up[1].set()
            else:
                self._refused.warning(log, "ctl", f"type {env.type}",
                                      f"{self.dev}: unknown message type {env.type!r} ignored")
        except (FedCoEError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
            self._refused.warning(log, "ctl", reason_class(f"{env.type}: {exc}"),
                                  f"{self.dev}: bad {env.type} message: {exc}")

    def _on_blob(self, msg: Message) -> None:
        try:
            done = self.receiver.on_chunk(msg.payload)
        except WireError as exc:
            log.debug("%s: chunk refused: %s", self.dev, exc)
            return
        if done is not None:
            manifest, data = done
            with self._lock:
                ctx = self.pending.pop(manifest.transfer_id, None)
            if ctx is not None:
                self._jobs.put(("download", (ctx, manifest, data)))

    # ------------------------------------------------------------------ shared downloads
    def _shared_start(self, manifest: TransferManifest, ref: SharedRef) -> bool:
        """Assemble ``manifest``'s bytes from the federation's shared copy ``ref`` instead of
        asking for the per-device transfer (docs/protocol.md, "Shared downloads"). True while
        it is (or already was) under way; False: use the per-device transfer (a re-announce
        of a transfer that completed or fell back, too many at once, a reference that does
        not name the signed manifest's bytes)."""
        xid = manifest.transfer_id
        if self.receiver.completed(xid) or self.receiver.is_open(xid):
            return False
        with self._lock:
            if xid in self._shared_dl:
                return True  # a repeated announce while it is being assembled
            if xid in self._shared_failed:
                return False
            budget = self.receiver.reassembler.max_total_bytes
            used = sum(d.manifest.total_bytes for d in self._shared_dl.values())
            why = None
            if len(self._shared_dl) >= SHARED_MAX:
                why = f"{SHARED_MAX} shared downloads already open"
            elif used + manifest.total_bytes > budget:
                why = f"{manifest.total_bytes} bytes would exceed the reassembly budget {budget}"
            else:
                try:
                    dl = SharedDownload(ref, manifest)
                except WireError as exc:
                    why = str(exc)
            if why is not None:
                self._shared_failed.append(xid)
            else:
                self._shared_dl[xid] = dl
                first = ref.id not in self._shared_sub
                self._shared_sub.setdefault(ref.id, set()).add(xid)
        if why is not None:
            self._shared_note(xid, f"not taken from the shared copy: {why}")
            return False
        if first and self.transport is not None:
            # the retained chunks follow the SUBACK on the bulk lane (after this handler)
            self.transport.subscribe(self.topics.shared_filter(ref.id), self._on_shared,
                                     bulk=True)
        return True

    def _shared_note(self, xid: str, reason: str) -> None:
        self.shared_fallbacks.append(reason)
        log.warning("%s: download %s %s; using the per-device transfer", self.dev, xid, reason)

    def _shared_end(self, xid: str) -> SharedDownload | None:
        """Stop assembling ``xid`` from the shared copy (unsubscribing when no other
        transfer uses that copy)."""
        with self._lock:
            dl = self._shared_dl.pop(xid, None)
            if dl is None:
                return None
            users = self._shared_sub.get(dl.ref.id, set())
            users.discard(xid)
            last = not users
            if last:
                self._shared_sub.pop(dl.ref.id, None)
        if last and self.transport is not None:
            with contextlib.suppress(FedCoEError):
                self.transport.unsubscribe(self.topics.shared_filter(dl.ref.id))
        return dl

    def _shared_fallback(self, xid: str, reason: str) -> None:
        """The shared copy failed ``xid`` (``reason`` logged): ask for the per-device
        transfer of the same signed manifest, as an agent without shared downloads does."""
        dl = self._shared_end(xid)
        if dl is None:
            return
        with self._lock:
            self._shared_failed.append(xid)
        self._shared_note(xid, f"from shared copy {dl.ref.id} failed ({reason})")
        with contextlib.suppress(FedCoEError):
            self.receiver.expect(dl.manifest)
            self.receiver.nudge(xid)

    def _on_shared(self, msg: Message) -> None:
        """A chunk of a shared copy (retained, or live while subscribed): added to every
        transfer assembled from it; a complete, verified payload is handed on like a
        per-device download's and confirmed with the per-device transfer's final ACK."""
        if not msg.payload:
            return  # the coordinator cleared a superseded copy
        try:
            sid = self.topics.parse(msg.topic).transfer_id or ""
        except WireError:
            return
        with self._lock:
            dls = [(x, self._shared_dl[x]) for x in self._shared_sub.get(sid, ())
                   if x in self._shared_dl]
        for xid, dl in dls:
            try:
                data = dl.add(msg.payload)
            except WireError as exc:
                self._shared_fallback(xid, str(exc))
                continue
            if data is None:
                continue
            self._shared_end(xid)
            self.shared_downloads += 1
            self.receiver.adopt(dl.manifest)  # xfer_done: the coordinator stops offering it
            with self._lock:
                ctx = self.pending.pop(xid, None)
            log.info("%s: download %s: %d bytes from shared copy %s", self.dev, xid, len(data),
                     dl.ref.id)
            if ctx is not None:
                self._jobs.put(("download", (ctx, dl.manifest, data)))

    def _shared_tick(self, now: float) -> None:
        """Fall back for shared downloads with no new chunk for SHARED_IDLE_S (a copy
        cleared or expired, a broker or ACL that serves none)."""
        with self._lock:
            late = [(x, d) for x, d in self._shared_dl.items() if d.idle_s(now) > SHARED_IDLE_S]
        for xid, dl in late:
            self._shared_fallback(xid, f"no new chunk for {SHARED_IDLE_S:g} s, "
                                       f"{dl.received} of {dl.ref.chunk_count} received")

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while not self._stop.is_set():
            kind, item = self._jobs.get()
            if kind == "stop":
                return
            try:
                if kind == "welcome":
                    self._handle_welcome(item)
                elif kind == "download":
                    ctx, manifest, data = item
                    if ctx["kind"] == P.TASK:
                        self._train(ctx, manifest, data)
                    else:
                        self._handle_model(ctx, manifest, data)
                elif kind == "status":
                    self._handle_status(item)
            except FedCoEError as exc:
                log.error("%s: %s", self.dev, exc)
            except Exception:
                log.exception("%s: %s failed", self.dev, kind)

    def _check_task_fits(self, b: dict[str, Any], model_cfg: ModelConfig) -> bool:
        """Labels and input shape must fit the federation's model before any training: a
        mismatch declines the task (one line here, a typed failure at the coordinator)."""
        assert self._local is not None
        fed = [str(c) for c in b.get("classes") or []]
        mine = list(self.cfg.data.classes)
        try:
            if fed and mine and fed != mine:
                raise DataError(f"[data] classes {mine} differ from the federation's {fed}")
            where = self.cfg.data.image_folder or f"{self.dev} data"
            data = relabel(self._local, fed, where) if fed else self._local.data
            check_labels(data, model_cfg.num_classes, where)
            shape = tuple(data.x_test.shape[1:] or data.x_train.shape[1:])
            if shape != tuple(model_cfg.input_shape):
                raise DataError(f"device data has sample shape {list(shape)}, the federation's "
                                f"model expects {list(model_cfg.input_shape)} (set [data] image_shape "
                                f"or reshape the npz)")
        except DataError as exc:
            self.decline(str(exc))
            return False
        self._data = data
        self.classes = fed or self._local.classes
        return True

    def _handle_welcome(self, b: dict[str, Any]) -> None:
        if self.refused:
            return
        try:  # a trunk or expert named by an import path this device cannot resolve
            model_cfg = ModelConfig.from_dict(b["model"])
        except ConfigError as exc:
            self.decline(f"the federation's model cannot be built here: {exc}")
            return
        if not self._check_task_fits(b, model_cfg):
            return
        if self.engine == "onnx":
            self._welcome_onnx(b, model_cfg)
            return
        if model_cfg.tier != self.cfg.device.tier:  # local experts sized by this device's tier
            model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "tier": self.cfg.device.tier})
        if model_cfg.trunk_weights:  # the path names the coordinator's file, not ours
            path = self._trunk_file(model_cfg)
            if path is None:
                self._fetch_trunk(b, model_cfg)
                return
            model_cfg = ModelConfig.from_dict({**model_cfg.to_dict(), "trunk_weights": str(path)})
        self._join(b, model_cfg)

    def _trunk_file(self, model_cfg: ModelConfig) -> Path | None:
        """This device's copy of the federation's pretrained trunk: ``[device] trunk_weights``
        if set (checked against ``trunk_sha256`` when the model is built: a wrong file
        declines), else ``STATE/trunk.safetensors`` if its sha256 is the federation's; None:
        fetch it from the coordinator."""
        if self.cfg.device.trunk_weights:
            return Path(self.cfg.device.trunk_weights)
        path = self.state_dir / TRUNK_FILE
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() == model_cfg.trunk_sha256:
                return path
        except OSError:
            return None
        log.info("%s: %s is not this federation's trunk (sha256 differs); fetching it again",
                 self.dev, path)
        return None

    def _fetch_trunk(self, b: dict[str, Any], model_cfg: ModelConfig) -> None:
        """Ask the coordinator for the pretrained trunk file (once; a repeated welcome only
        re-sends the same request, a bounded number of times like every fetch)."""
        if self._trunk_wait is None:
            log.info("%s: fetching the federation's pretrained trunk (sha256 %s...) from the "
                     "coordinator", self.dev, model_cfg.trunk_sha256[:12])
        self._trunk_wait = (b, model_cfg)
        self.bc_key = bytes.fromhex(b["bc_key"])
        self._request(fetch_key("trunk", 0), {"expert_ids": [], "purpose": "trunk"}, 0)

    def _handle_trunk(self, data: bytes) -> None:
        """The trunk file arrived (chunks reassembled, the transfer's sha256 checked): it must
        also be the federation's (``model.trunk_sha256``) before it is saved or used; a
        different file is refused and the device declines rather than train on it."""
        self._answered(fetch_key("trunk", 0))
        wait, self._trunk_wait = self._trunk_wait, None
        if wait is None or self.refused:
            return  # not asked for (a late duplicate): nothing to do
        b, model_cfg = wait
        digest = hashlib.sha256(data).hexdigest()
        if digest != model_cfg.trunk_sha256:
            self.decline(f"the trunk file the coordinator sent has sha256 {digest[:12]}..., not "
                         f"the federation's model.trunk_sha256 {model_cfg.trunk_sha256[:12]}...; "
                         f"refused, not trained on")
            return
        path = self.state_dir / TRUNK_FILE
        atomic_write_bytes(path, data)
        log.info("%s: pretrained trunk saved to %s (%d bytes, sha256 %s... as the federation's)",
                 self.dev, path, len(data), digest[:12])
        self._join(b, ModelConfig.from_dict({**model_cfg.to_dict(), "trunk_weights": str(path)}))
        waiting, self._waiting_tasks = self._waiting_tasks, []
        for ctx, manifest, payload in waiting:
            if not self.refused:
                self._train(ctx, manifest, payload)

    def _join(self, b: dict[str, Any], model_cfg: ModelConfig) -> None:
        """Build the federation's model from the welcome (the trunk file, if any, local)."""
        fresh = self.welcome.get("model") != b["model"] or self.welcome.get("algorithm") != b["algorithm"]
        self.welcome = b
        self.bc_key = bytes.fromhex(b["bc_key"])
        if fresh or self.strategy is None:
            try:
                with TORCH_LOCK:
                    self.strategy = make_strategy(b["algorithm"], model_cfg,
                                                  TrainConfig.from_dict(b["train"]), int(b["seed"]))
            except ConfigError as exc:  # e.g. a pretrained trunk file missing or not the federation's
                self.decline(str(exc))
                return
            log.info("%s: joined federation %s (%s, version %d, round %d)", self.dev,
                     self.topics.federation, b["algorithm"], b["version"], b["round"])
        if self.cfg.device.role == "cold" and not self.cold_ready.is_set():
            self._request(fetch_key("gate", 0), {"expert_ids": [], "purpose": "gate"}, 0)

    def _train(self, ctx: dict[str, Any], manifest: TransferManifest, data: bytes) -> None:
        rnd = int(ctx["round"])
        if self.refused:
            return
        if self.engine == "onnx":
            self.decline(NO_TORCH)
            return
        s = self.strategy
        if s is None and self._trunk_wait is not None:
            log.info("%s: round %d task waits for the pretrained trunk", self.dev, rnd)
            self._waiting_tasks = [*self._waiting_tasks[-3:], (ctx, manifest, data)]
            return
        if s is None:
            raise DataError(f"task for round {rnd} before the welcome")
        if self.last_result is not None and self.last_result[0] == rnd:
            if self.accepted.get(rnd):
                log.info("%s: round %d task repeated; update already accepted", self.dev, rnd)
                return
            log.info("%s: round %d task repeated; re-sending the same update", self.dev, rnd)
            _, result, base = self.last_result
            self._upload(rnd, result, base, ctx.get("deadline_at"))
            return
        params = decode_tensors(data)
        task = ClientTask(self.dev, rnd, params, [int(i) for i in ctx.get("expert_ids", [])],
                          dict(ctx.get("config", {})))
        prev = rnd - 1
        if prev in self.local_after and prev not in self.evaluated:
            # A task carries exactly what a refresh would (the aggregated gate and this device's
            # experts): score the personal model of the previous round with it, no extra bytes.
            self._eval("personal", self._predict(params, task.expert_ids, self.local_after[prev], True), prev)
            if self.cfg.device.bundle == "every":
                self._rebuild_bundle(params, task.expert_ids, prev, int(ctx.get("version", prev)))
        t0 = time.perf_counter()
        with TORCH_LOCK:
            result, local = s.client_update(task, self.local_state, self.data)
        self.local_state = local
        self.local_after[rnd] = local
        self._save_round(rnd, result, params, local or {}, task.expert_ids)
        if local:
            save_arrays(self.state_dir / "local.safetensors", local)
        self.held, self.held_ids = params, list(task.expert_ids)
        self.last_result = (rnd, result, params)
        log.info("%s: round %d trained experts %s on %d samples in %.2fs (loss %.4f)", self.dev, rnd,
                 task.expert_ids, result.num_samples, time.perf_counter() - t0,
                 result.metrics.get("train_loss", float("nan")))
        unhealthy = loss_warning(rnd, self.dev, result.metrics) or update_warning(rnd, self.dev, result.params)
        if unhealthy:  # still uploaded: the coordinator's validation refuses non-finite weights
            log.warning("%s", unhealthy)
        if self.hooks.before_upload is not None and not self.hooks.before_upload(self, rnd):
            return
        self._upload(rnd, result, params, ctx.get("deadline_at"))
        self.rounds_done.append(rnd)

    def _save_round(self, rnd: int, result: ClientResult, base: dict[str, np.ndarray],
                    local: dict[str, np.ndarray], expert_ids: list[int]) -> None:
        """One atomic file with the round's update, what it was trained from, and the new
        private level: a device restarted before its upload was accepted re-sends this
        update instead of training its private level twice."""
        arrays = {**{f"up/{k}": v for k, v in result.params.items()},
                  **{f"base/{k}": v for k, v in base.items()},
                  **{f"local/{k}": v for k, v in local.items()}}
        meta = {"round": str(rnd), "num_samples": str(result.num_samples),
                "affinity": json.dumps(result.affinity), "metrics": json.dumps(result.metrics),
                "expert_ids": json.dumps(list(expert_ids))}
        save_arrays(self.state_dir / "round_result.safetensors", arrays, meta)

    def _load_round(self) -> None:
        path = self.state_dir / "round_result.safetensors"
        if not path.is_file():
            return
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
            arrays = load_arrays_file(path)
            rnd = int(meta["round"])
            part = {p: {k[len(p) + 1:]: v for k, v in arrays.items() if k.startswith(p + "/")}
                    for p in ("up", "base", "local")}
            result = ClientResult(self.dev, rnd, int(meta["num_samples"]), part["up"],
                                  json.loads(meta["affinity"]), json.loads(meta["metrics"]))
        except (KeyError, ValueError, OSError, DataError) as exc:
            log.warning("%s: ignoring unreadable %s: %s", self.dev, path, exc)
            return
        self.last_result = (rnd, result, part["base"])
        self.local_after[rnd] = part["local"] or None
        self.local_state = part["local"] or self.local_state
        self.held, self.held_ids = part["base"], json.loads(meta.get("expert_ids", "[]"))
        log.info("%s: round %d update restored from %s", self.dev, rnd, path)

    def _upload(self, rnd: int, result: ClientResult, base: dict[str, np.ndarray],
                deadline_at: float | None = None) -> bool:
        """Send the update (int8 delta against what this device was sent, by default) and
        wait for the coordinator to confirm the hash, at most until the round deadline
        (``deadline_at``, monotonic) plus a little grace, or ``upload_timeout_s``."""
        assert self.transport is not None
        # return exactly what was sent (partial exchange); a strategy's extra tensors stay here
        params = {k: v for k, v in result.params.items() if k in base}
        if len(params) != len(result.params):
            log.debug("%s: %d tensor(s) the coordinator did not send are not uploaded", self.dev,
                      len(result.params) - len(params))
        if self.hooks.tamper is not None:
            params = self.hooks.tamper(rnd, dict(params))
        if self.cfg.device.compress_uploads:
            data = encode_tensors(compress_delta(params, base), compressed_delta_metadata())
            encoding = P.ENCODING_DELTA
        else:
            data = encode_tensors(params)
            encoding = P.ENCODING_PLAIN
        # the id names this device's content: re-sending the same update (after a restart) is
        # recognised as a retransmission, and no two devices can share an id
        digest = hashlib.sha256(f"{self.dev}\0{rnd}\0".encode() + data).hexdigest()
        xid = f"r{rnd}-{digest[:32]}"
        experts = sorted({int(n.split(".")[2]) for n in params if n.startswith("global.experts.")})
        sender = open_blob(self.transport, lambda x: self.topics.up_blob(self.dev, x), data,
                           chunk_size=self.cfg.device.chunk_size, window=self.cfg.device.window,
                           transfer_id=xid, expert_ids=experts,
                           base_version=int(self.welcome.get("version", 0)), encoding=encoding)
        manifest = sender.manifest
        started, again = threading.Event(), threading.Event()
        with self._lock:
            self.uploads[xid] = (sender, started)
            self._reannounce[xid] = again
        body = {"manifest": manifest.to_dict(), "num_samples": result.num_samples,
                "affinity": result.affinity, "metrics": result.metrics}
        timeout = self.cfg.device.upload_timeout_s
        if deadline_at is not None:
            timeout = max(1.0, min(timeout, deadline_at - time.monotonic() + DEADLINE_GRACE_S))
        end = time.monotonic() + timeout
        next_announce = 0.0
        # Announce until the coordinator answers (a broker restart loses QoS 1), and again
        # whenever it says it does not know the transfer (it restarted mid-upload).
        while not self._stop.is_set():
            now = time.monotonic()
            if xid in self.confirmed or xid in self.aborted or sender.done or now >= end:
                break
            if again.is_set() or (not started.is_set() and now >= next_announce):
                again.clear()
                self._send(P.RESULT, body, rnd)
                next_announce = now + REANNOUNCE_S
            if started.is_set():
                sender.wait(min(0.2, max(0.01, end - now)))  # pumps the retransmit timer
            else:
                started.wait(min(0.2, max(0.01, end - now)))
        ok = (xid in self.confirmed or sender.done) and xid not in self.aborted
        with self._lock:
            self.uploads.pop(xid, None)
            self._reannounce.pop(xid, None)
        if ok:
            log.info("%s: round %d uploaded %d bytes (%s)", self.dev, rnd, len(data), encoding)
        elif xid in self.aborted:
            log.warning("%s: round %d upload refused by the coordinator", self.dev, rnd)
        else:
            log.warning("%s: round %d upload not confirmed within %.0fs", self.dev, rnd, timeout)
        return ok

    def _handle_status(self, b: dict[str, Any]) -> None:
        """After the last round no task follows, so fetch the final experts explicitly."""
        state, rnd = b.get("state"), int(b.get("round", 0))
        last = rnd >= int(b.get("rounds", rnd))
        if (state in ("closed", "finished") and last and self.cfg.device.role == "train"
                and self.cfg.device.refresh_on_close and rnd in self.local_after
                and rnd not in self.evaluated and rnd not in self._refreshing):
            self._refreshing.add(rnd)
            self._request(fetch_key("refresh", rnd), {"expert_ids": None, "purpose": "refresh"}, rnd)

    def _handle_model(self, ctx: dict[str, Any], manifest: TransferManifest, data: bytes) -> None:
        if ctx.get("purpose") == "trunk":  # a file, not tensors to decode into the model
            self._handle_trunk(data)
            return
        params = decode_tensors(data)
        if self.engine == "onnx":
            self._model_onnx(ctx, params)
            return
        s = self.strategy
        if s is None:
            raise DataError("model received before the welcome")
        purpose, rnd = ctx.get("purpose"), int(ctx["round"])
        self._answered(fetch_key(str(purpose), rnd))
        ids = [int(i) for i in ctx.get("expert_ids", [])]
        if purpose == "gate":
            self._cold_choose(params)
            return
        self.held, self.held_ids = params, ids
        save_arrays(self.state_dir / "global.safetensors", params, {"version": str(ctx.get("version", 0))})
        if purpose == "cold":
            probs = self._predict(params, ids, None, use_local=False)
            self.cold_ready.set()
            log.info("%s: cold start ready with experts %s (version %s)", self.dev, ids, ctx.get("version"))
            self._eval("cold", probs, rnd)
        else:
            if rnd in self.evaluated:
                return
            local = self.local_after.get(rnd, self.local_state)
            if rnd == self.local_after_last():  # after the last round: the strategy's final
                local = self._personalize(params, local)  # hook (e.g. FedAvg-FT fine-tuning)
            self._eval("personal", self._predict(params, ids, local, use_local=True), rnd)
        if self.cfg.device.bundle != "off":
            self._rebuild_bundle(params, ids, rnd, int(ctx.get("version", rnd)))

    def local_after_last(self) -> int:
        return max(self.local_after, default=-1)

    def _personalize(self, params: dict[str, np.ndarray],
                     local: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """``strategy.personalize`` on this device's data, as the simulator runs it once the
        rounds are over; its result becomes the private level on disk."""
        s = self.strategy
        assert s is not None
        with TORCH_LOCK:
            s.hold(params)
            tuned = s.personalize(local, self.data)
        if tuned is not local and tuned:
            self.local_state = tuned
            save_arrays(self.state_dir / "local.safetensors", tuned)
        return tuned

    def _cold_choose(self, gate_params: dict[str, np.ndarray]) -> None:
        """Ask for the experts the strategy picks from the downloaded gate and this device's
        unlabeled data (FedCoE: those carrying most of its routing prior)."""
        s = self.strategy
        assert s is not None
        x = self.prior_inputs()
        with TORCH_LOCK:
            ids = s.choose_cold_experts(gate_params, x)
        log.info("%s: cold start asks for experts %s", self.dev, ids)
        self._request(fetch_key("cold", 0), {"expert_ids": ids, "purpose": "cold"}, 0)

    def prior_inputs(self) -> np.ndarray:
        """What a cold device routes to choose its experts: its unlabelled pool, its training
        inputs and any test input without a label, never a labelled test input (those score
        it: choosing from them would grade the choice on what it was fitted to). A device
        with nothing else falls back to its test inputs and says so, since its cold accuracy
        is then optimistic (docs/design.md, "Cold start")."""
        d = self.data
        parts = [p for p in (d.x_pool, d.x_train, d.x_test[d.y_test < 0]) if len(p)]
        if parts:
            return np.concatenate(parts).astype(np.float32, copy=False)
        log.warning("%s: no unlabelled pool or training inputs: cold start chooses its experts "
                    "from the test inputs it is scored on, so its cold accuracy is optimistic", self.dev)
        return d.x_test

    def _predict(self, params: dict[str, np.ndarray], ids: list[int],
                 local: dict[str, np.ndarray] | None, use_local: bool) -> np.ndarray:
        """Class probabilities on the local test split with exactly what the device holds."""
        s = self.strategy
        assert s is not None
        with TORCH_LOCK:
            return s.predict_held(self.dev, params, ids, local, self.data.x_test, use_local)

    # ------------------------------------------------------------------ onnx engine (no torch)
    def _welcome_onnx(self, b: dict[str, Any], model_cfg: ModelConfig) -> None:
        """A runtime-profile device: open its signed bundle, check it is this federation's
        model, and start the cold path. Anything it cannot do is declined in one line."""
        if self.cfg.device.role != "cold":
            self.decline(NO_TORCH)
            return
        if bundle_cold_rule(str(b.get("algorithm"))) is None:
            self.decline(f"this device runs its bundle without torch, which serves the "
                         f"{', '.join(sorted(BUNDLE_COLD_RULES))} algorithm only; the "
                         f"federation runs {b.get('algorithm')!r}")
            return
        self.welcome = b
        self.bc_key = bytes.fromhex(b["bc_key"])
        if self.session is None:
            try:
                session = self.open_bundle()
            except FedCoEError as exc:
                self.decline(f"cannot run its bundle without torch: {exc}")
                return
            mine = {k: v for k, v in session.cfg.to_dict().items() if k != "tier"}
            fed = {k: v for k, v in model_cfg.to_dict().items() if k != "tier"}
            differ = sorted(k for k in fed if mine.get(k) != fed[k])
            if differ:
                self.decline(f"bundle {self.bundle_dir} was exported for another model "
                             f"(differs in {', '.join(differ)}); export this federation's model")
                return
            self.session = session
            log.info("%s: joined federation %s without torch (bundle %s, version %d, round %d)",
                     self.dev, self.topics.federation, self.bundle_dir, b["version"], b["round"])
        if not self.cold_ready.is_set():
            self._request(fetch_key("gate", 0), {"expert_ids": [], "purpose": "gate"}, 0)

    def open_bundle(self) -> Any:
        """The bundle at ``bundle_dir`` as a MoESession, accepted only if it is signed with
        this device's key, names this device's federation and is not older than the highest
        version this device accepted before (``STATE/bundle_version.json``, which survives
        restarts; docs/bundle.md, "Versions and rollback"); that floor is then raised to it.
        Raises one FedCoEError (a RollbackError for an old or foreign bundle)."""
        from fedcoe_edge.bundle_sig import BundleKeys
        from fedcoe_edge.runtime import MoESession

        session = MoESession(self.bundle_dir, keys=BundleKeys(hmac_key=self.cfg.key),
                             release=self.bundle_floor.check(self.topics.federation))
        self.bundle_floor.record(session.manifest)
        return session

    def _swap_into_bundle(self, params: dict[str, np.ndarray], version: int | None = None) -> list[str]:
        """The gate and experts just received, written as ONNX graphs and swapped into the
        bundle (each swap verified, atomic and re-signed, the manifest's version raised to
        the model version they come from). The trunk is the bundle's own."""
        from fedcoe_edge.onnx_heads import global_part_graphs

        sess = self.session
        graphs = global_part_graphs(sess.cfg, sess.feat_shape, params)
        for name, graph in graphs.items():
            sess.swap_part(name, graph, quantization="fp32", version=version)
        self.bundle_floor.record(sess.manifest)
        return sorted(graphs)

    def _model_onnx(self, ctx: dict[str, Any], params: dict[str, np.ndarray]) -> None:
        purpose, rnd = ctx.get("purpose"), int(ctx["round"])
        self._answered(fetch_key(str(purpose), rnd))
        if self.session is None:
            raise DataError("model received before the welcome")
        ids = [int(i) for i in ctx.get("expert_ids", [])]
        version = ctx.get("version")
        swapped = self._swap_into_bundle(params, int(version) if version is not None else None)
        if purpose == "gate":
            rule = bundle_cold_rule(str(self.welcome.get("algorithm")))
            if rule is None:  # the welcome was checked; a gate never comes before it
                raise DataError("gate received for an algorithm no bundle serves")
            prior = self.session.routing_prior(self.prior_inputs())
            # the strategy's own rule (the one its torch side applies), with the welcome's
            # train config
            train = TrainConfig.from_dict(self.welcome.get("train") or {})
            chosen = rule(prior, self.session.cfg, train)
            log.info("%s: routing prior %s -> experts %s (bundle)", self.dev,
                     np.round(prior, 3).tolist(), chosen)
            self._request(fetch_key("cold", 0), {"expert_ids": chosen, "purpose": "cold"}, 0)
            return
        if purpose != "cold":
            return  # refreshes follow training rounds, which this device does not join
        self.held_ids = ids
        probs = self.session.predict(self.data.x_test, expert_mask=ids, use_local=False)
        self.cold_ready.set()
        log.info("%s: cold start ready with experts %s (version %s); bundle %s updated (%s)",
                 self.dev, ids, ctx.get("version"), self.bundle_dir, ", ".join(swapped))
        self._eval("cold", probs, rnd)

    def _eval(self, kind: str, probs: np.ndarray, rnd: int) -> None:
        y = self.data.y_test
        labeled = y >= 0
        total = int(labeled.sum())
        correct = int((probs.argmax(1)[labeled] == y[labeled]).sum())
        self.evals.append({"kind": kind, "round": rnd, "correct": correct, "total": total})
        if kind == "personal":
            self.evaluated.add(rnd)
            if total:
                stuck = chance_warning(rnd, f"client {self.dev}", correct / total,
                                       int(self.strategy.model_cfg.num_classes) if self.strategy else 2)
                if stuck:
                    log.warning("%s", stuck)
        if total:
            self._request((P.EVAL, kind, rnd), {"kind": kind, "correct": correct, "total": total}, rnd)
            log.info("%s: %s accuracy after round %d: %.4f (%d/%d)", self.dev, kind, rnd,
                     correct / total, correct, total)

    def _rebuild_bundle(self, params: dict[str, np.ndarray], ids: list[int], rnd: int,
                        version: int) -> None:
        """Rebuild the int8 ONNX bundle (``STATE/bundle``, served by ``fedcoe predict``) from the
        global parameters just received (global model ``version``) and the private level, if
        ``export`` is installed. Signed with the federation id and ``version``; never older
        than the highest version this device accepted (its floor is raised to it)."""
        try:
            from export.bundle import build_bundle
        except ImportError:
            if not self._bundle_note:
                log.info("%s: export package not installed; bundle not rebuilt", self.dev)
                self._bundle_note = True
            self._bundle_done(rnd, False, "export package not installed")
            return
        s = self.strategy
        model = getattr(s, "model", None)
        if model is None:
            return
        x = self.data.x_train if len(self.data.x_train) else self.prior_inputs()  # never scored inputs
        calib = x[np.random.default_rng(0).permutation(len(x))[:64]]
        t0 = time.perf_counter()
        try:
            from fedcoe_edge.bundle_format import check_release
            from fedcoe_edge.bundle_sig import BundleKeys
            from fedcoe_edge.training import load_arrays

            floor = self.bundle_floor.check(self.topics.federation)
            check_release({"federation": self.topics.federation, "version": version},
                          f"bundle for round {rnd}", min_version=floor.min_version,
                          federation=floor.federation, floor_from=floor.floor_from)
            with TORCH_LOCK:
                load_arrays(model, params)
                if self.local_state is not None and self.cfg.device.role == "train":
                    load_arrays(model, self.local_state)
                # signed with this device's federation key: `fedcoe predict --key-file`
                # (and this agent) refuse a bundle edited behind its back
                build_bundle(model, self.state_dir / "bundle", calibration=calib,
                             keys=BundleKeys(hmac_key=self.cfg.key), held=ids or None, include_fused=False, include_fp32=False,
                             meta={"device": self.dev, "round": rnd,
                                   "federation": self.topics.federation,
                                   **({"classes": list(self.classes)} if self.classes else {})},
                             federation=self.topics.federation, version=version)
            self.bundle_floor.record({"federation": self.topics.federation, "version": version})
        except Exception as exc:  # the bundle is a convenience; the federation goes on without it
            self.bundle_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("%s: bundle rebuild failed: %s", self.dev, self.bundle_error)
            self._bundle_done(rnd, False, self.bundle_error)
            return
        self.bundle_error = None
        log.info("%s: int8 bundle for round %d rebuilt in %s (%.1fs)", self.dev, rnd,
                 self.state_dir / "bundle", time.perf_counter() - t0)
        self._bundle_done(rnd, True, None)

    def _bundle_done(self, rnd: int, ok: bool, error: str | None) -> None:
        """Record a rebuild's outcome and report it in a heartbeat at once."""
        self.bundle_status = {"round": rnd, "ok": ok, "error": None if error is None else error[:200]}
        self._beat()


def _memory_mb() -> float:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**20, 1)
    except Exception:
        return 0.0


def _rss_mb() -> float:
    try:
        import psutil

        return round(psutil.Process().memory_info().rss / 2**20, 1)
    except Exception:
        return 0.0


def _load() -> float:
    try:
        import os

        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return 0.0
