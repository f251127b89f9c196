"""The coordinator daemon: rounds of FedCoE over MQTT with partial expert exchange.

FedCoE (arXiv 2605.21264) aggregates each global expert from the devices that hold it,
weighted by their routing affinity, and sends each device only its top-m experts plus the
gate. This daemon drives the SAME :class:`~fedcoe_edge.strategies.Strategy` objects as the
in-process simulator (docs/design.md, section 2): ``select_clients`` -> ``configure_round`` ->
tasks out, updates in -> ``aggregate_round(results, failures)``. Failures (deadline passed,
update rejected) are data handed to the strategy, never exceptions or hangs.

The rounds themselves (open, accept, close, checkpoint, resume) are
:class:`~coordinator.engine.RoundEngine`, which holds no MQTT (docs/design.md, "The daemons");
this class is the handlers around it: each message parsed into its typed body
(fedcoe_edge/messages.py) and bounded per device, then an engine call; plus the transfers,
the pump loop and the persister thread.

Receive path for an update (docs/design.md, section 8): signed ``result`` envelope with a transfer
manifest -> chunks reassembled and sha256-checked -> int8 delta decompressed against the
exact parameters this device was sent -> ``validate_update`` (keys, shapes, dtypes, finite,
norm bound) -> persisted (safetensors + SQLite) -> only then ``accept``. Anything refused is
logged as ``rejected device=.. round=.. reason=..`` and counted in the round log.

Persistence: ``STATE/coordinator.sqlite`` (registry, round log, traffic, evaluations),
``STATE/rounds/<r>/`` (tasks and accepted updates), ``STATE/checkpoint/`` (global state and
strategy state, written atomically). A restarted coordinator resumes the round it was in.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import DEVICES_RELOAD_S, CoordinatorConfig
from coordinator.dashboard import HttpEndpoints
from coordinator.engine import (
    Accepted,
    EvalReport,
    RoundEngine,
    write_checkpoint,
)
from coordinator.limits import RateLimiter, RefusalLog
from coordinator.store import Store
from coordinator.workers import READY_S, Job, PoolHandler, WorkerBatch, WorkerPool
from fedcoe_edge import protocol as P
from fedcoe_edge.errors import ConfigError, FedCoEError, ValidationError, WireError
from fedcoe_edge.messages import (
    Decline,
    Eval,
    Fetch,
    Heartbeat,
    Hello,
    MessageError,
    Result,
    SharedRef,
    XferDone,
    XferProgress,
)
from fedcoe_edge.protocol import retry_delay
from fedcoe_edge.simulation import serialized_nbytes
from fedcoe_edge.strategies import ClientResult, ClientTask, Failure, Strategy, make_strategy
from fedcoe_edge.streaming import Partial
from fedcoe_edge.transport import Message, Topics, Transport, Will
from fedcoe_edge.transport.blob import (
    XFER_DONE,
    XFER_PROGRESS,
    BlobReceiver,
    BlobSender,
    open_blob,
)
from fedcoe_edge.transport.shared import SHARED_EXPIRY_S, clear_shared, publish_shared, shared_id
from fedcoe_edge.wire import (
    ReassemblyBudget,
    ReplayCache,
    TransferManifest,
    UnauthenticatedError,
    decode_envelope,
    encode_tensors,
)

log = logging.getLogger("fedcoe.coordinator")

REANNOUNCE_S = 5.0  # repeat a transfer's manifest envelope until the receiver answers
EVALS_LOGGED_MAX = 100_000  # (device, round, kind) remembered to log each evaluation once
FETCH_OUT_MAX = 100_000  # FETCHes remembered so that a re-sent one reuses its download
# Download chunks the broker has not acknowledged yet, over all devices: the MQTT client's
# queue (memory) stays bounded at thousands of devices, and a control message (an upload's
# progress report or ACK) waits behind at most this many chunks (docs/daemons.md, "Scale").
OUT_BACKLOG = 256
# Per-device bounds (docs/protocol.md, "Bounds"): what one device can make the single
# handler thread do, whatever it sends.
CTL_RATE, CTL_BURST = 50.0, 200  # control envelopes per second (all types)
HELLO_RATE, HELLO_BURST = 0.2, 3  # hellos: each may re-announce a task
FETCH_RATE, FETCH_BURST = 0.5, 5  # fetches: each prepares a download
NOTICE_RATE, NOTICE_BURST = 0.5, 2  # xfer_unknown / re-accept answers to stray chunks
HB_RATE, HB_BURST = 1.0, 10  # heartbeats (an agent beats every heartbeat_s, 30 s by default)
EVAL_RATE, EVAL_BURST = 0.5, 10  # evals: two per round at most, plus re-sends
DECLINE_RATE, DECLINE_BURST = 1 / 60, 2  # declines: an agent sends one and stops
# evaluations are stored for rounds that closed, at most this many rounds back (a device
# reports its personal accuracy when the next task or its refresh arrives)
EVAL_ROUNDS_BACK = 10
EVENT_RETENTION = 10_000  # newest event rows kept per kind (refusals, failures, declines)
PRUNE_EVERY_S = 60.0  # how often the pump prunes event rows and old trunk-fetch rows
SENDER_MAX_AGE_S = 600.0  # a download nobody finished in this long is forgotten
SENDER_SWEEP_S = 5.0  # how often the pump looks for those (and for dropped downloads)
# trunk downloads per device (each a few MB): an honest device needs one per install, one
# more if its copy was damaged; past this, a device re-fetching in a loop is refused
TRUNK_FETCH_MAX, TRUNK_FETCH_WINDOW_S = 3, 24 * 3600.0
UPLOAD_SLACK = 65536  # an upload may exceed the plain encoding of its task by this much
# Open uploads share the reassembly budget (docs/protocol.md, "Bounds"): one with no new
# chunk for UPLOAD_IDLE_S is dropped; one with none for UPLOAD_STALL_S makes room for an
# announce that does not fit otherwise. An honest upload's chunks follow each progress
# report within a round trip, but wait in the handler's queue while this coordinator is
# behind (rounds of 60-70 s at 5,000 devices, docs/benchmarks.md "Fleet"), hence the
# margins; a dropped upload is announced again (xfer_unknown). Slowloris uploads need no
# timer: an upload within its device's share evicts them at once.
UPLOAD_IDLE_S = 120.0
UPLOAD_STALL_S = 30.0
# Persistence (docs/daemons.md, "Scale"): accepted updates are written by one thread in
# batches (one sync per batch), each ACKed only once its batch is durable.
PERSIST_BATCH_S = 0.02  # gather a batch for at most this long after its first update
PERSIST_BATCH_MAX = 256
REPLAY_PER_SENDER = 2048  # replay window per device (an honest one sends far fewer in a ttl)
LINGER_QUIET_S = 8.0  # exit_when_done: leave once no fetch/eval came for this long (past the
# agents' first re-send of an unanswered request, 5 s) ...
LINGER_MAX_S = 120.0  # ... and no refresh download is running, or after this long anyway


@dataclass
class _Outgoing:
    device: str
    round: int
    purpose: str
    sender: BlobSender
    started: bool = False
    created: float = 0.0
    announce: tuple[str, dict[str, Any], int] | None = None  # (type, body, round) of the manifest
    announced_at: float = 0.0
    announces: int = 0  # sends of the manifest so far: repeats back off (retry_delay)
    shared: dict[str, Any] | None = None  # where the same bytes are published once (SharedRef)


@dataclass
class _Upload:
    device: str
    round: int
    body: Result
    manifest: TransferManifest
    received: int = 0  # new chunks so far (progress for the reassembly budget)


__all__ = ["Coordinator", "write_checkpoint"]


class Coordinator:
    """One federation's coordinator. ``run()`` blocks until the rounds are done (or stop())."""

    def __init__(self, cfg: CoordinatorConfig, factory: P.TransportFactory | None = None) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.topics = Topics(self.fed.id)
        self.me = self.fed.coordinator_id
        self.state_dir = cfg.state_dir
        # the model first: a config whose model cannot be built leaves no state folder behind
        strategy: Strategy = make_strategy(self.fed.algorithm, cfg.model, cfg.train, self.fed.seed)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # the rounds themselves (no MQTT): this class parses messages, moves bytes, calls it
        self.engine = RoundEngine(cfg, strategy, Store(self.state_dir / "coordinator.sqlite"))
        self.bc_key = P.broadcast_key(cfg.secret, self.fed.id)
        self._factory = factory if factory is not None else P.mqtt_factory(cfg.broker)
        self._lock = self.engine.lock  # one lock: handlers and engine see one round state
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.online: dict[str, str] = {}  # device -> role, for devices that said hello
        self._senders: dict[str, _Outgoing] = {}
        # the downloads the pump loop still drives: a transfer leaves once it started and
        # the device confirmed it (nothing more to send or announce), so a pass costs the
        # transfers in flight, not every one the round made (see _pump_loop)
        self._pumping: dict[str, _Outgoing] = {}
        self._swept_at = 0.0  # the pump's last sweep for downloads past SENDER_MAX_AGE_S
        self._receivers: dict[str, BlobReceiver] = {}
        self._uploads: dict[tuple[str, str], _Upload] = {}  # (device, transfer id)
        self._upload_of: dict[str, str] = {}  # device -> its one open upload
        # announced sizes of the open uploads: per-device shares, stalled ones evicted first
        self._budget = ReassemblyBudget(int(self.fed.reassembly_budget_mb * 2**20),
                                        idle_s=UPLOAD_IDLE_S, stall_s=UPLOAD_STALL_S)
        self._task_xfer: dict[str, str] = {}  # device -> this round's task transfer
        self._accepted_xfers: dict[tuple[str, str], int] = {}  # -> round; pruned at close
        self._persist_q: queue.Queue[Accepted | EvalReport | WorkerBatch | None] = queue.Queue()
        # aggregation worker processes ([federation] workers; docs/daemons.md, "Scale"):
        # None = uploads are checked and folded in this process
        self._workers: WorkerPool | None = None
        self._evals_logged: set[tuple[str, int, str]] = set()  # one log line per evaluation
        # (device, purpose, round, version, experts) -> the download answering that FETCH
        self._fetch_out: dict[tuple[str, str, int, int, tuple[int, ...]], str] = {}
        # id(task params) -> (those params, their plain encoding's size): devices holding the
        # same experts share one params dict, so each round encodes a few, not one per update
        self._nbytes_of: dict[int, tuple[dict[str, np.ndarray], int]] = {}
        self._prepared: dict[tuple[int, tuple[int, ...], tuple[str, ...]],
                             tuple[bytes, TransferManifest]] = {}
        self._last_request = 0.0  # monotonic time of the last fetch or eval
        self._trunk: tuple[bytes, TransferManifest] | None = None  # the file devices fetch
        # shared downloads published (docs/protocol.md, "Shared downloads"): (id, the version
        # it belongs to or None for the trunk) -> (ref, monotonic time published)
        self._shared: dict[tuple[str, int | None], tuple[SharedRef, float]] = {}
        self._shared_lock = threading.Lock()  # one publisher of a payload at a time
        self._hb_replay = ReplayCache(per_sender=64)
        self.refusals = RefusalLog(self.store, log, retention=EVENT_RETENTION)
        # declines are grouped like refusals: a device declining in a loop costs one row
        # and one line per interval, not one synced row each
        self.declines = RefusalLog(self.store, log, kind="decline", label="declined",
                                   retention=EVENT_RETENTION)
        self._ctl_limit = RateLimiter(CTL_RATE, CTL_BURST)
        self._hello_limit = RateLimiter(HELLO_RATE, HELLO_BURST)
        self._fetch_limit = RateLimiter(FETCH_RATE, FETCH_BURST)
        self._notice_limit = RateLimiter(NOTICE_RATE, NOTICE_BURST)
        self._hb_limit = RateLimiter(HB_RATE, HB_BURST)
        self._eval_limit = RateLimiter(EVAL_RATE, EVAL_BURST)
        self._decline_limit = RateLimiter(DECLINE_RATE, DECLINE_BURST)
        self._pruned_at = time.monotonic()
        self._devices_seen_at = time.monotonic()
        self._config_stamp = self._config_file_stamp()
        self._reload_lock = threading.Lock()  # the pump and the handler both re-read it
        self.transport: Transport | None = None
        self.messenger: P.Messenger | None = None
        self.http: HttpEndpoints | None = None  # /metrics and the dashboard (start())
        self.finished = False
        self._closed_summaries: list[dict[str, Any]] = []  # this run's rounds, for its last line
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ the engine's state
    # Read (and, for a shard aggregator or a test, set) through the daemon as before; the
    # engine owns them.
    @property
    def strategy(self) -> Strategy:
        return self.engine.strategy

    @property
    def store(self) -> Store:
        return self.engine.store

    @property
    def round(self) -> int:
        return self.engine.round

    @round.setter
    def round(self, value: int) -> None:
        self.engine.round = value

    @property
    def round_open(self) -> bool:
        return self.engine.round_open

    @round_open.setter
    def round_open(self, value: bool) -> None:
        self.engine.round_open = value

    @property
    def deadline(self) -> float:
        return self.engine.deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self.engine.deadline = value

    @property
    def tasks(self) -> dict[str, ClientTask]:
        return self.engine.tasks

    @property
    def results(self) -> dict[str, ClientResult]:
        return self.engine.results

    @property
    def failed(self) -> dict[str, str]:
        return self.engine.failed

    @property
    def streaming(self) -> bool:
        return self.engine.streaming

    @property
    def _partial(self) -> Partial | None:
        return self.engine.partial

    # ------------------------------------------------------------------ keys and sending
    def key_for(self, device: str) -> bytes | None:
        """HMAC key of a device; None when the device is not allowed (message is refused)."""
        if not self.allowed(device):
            return None
        return P.device_key(self.cfg.secret, device)

    def allowed(self, device: str) -> bool:
        """Whether ``device`` may take part: in ``allowed_devices`` (empty: any device with
        a valid key). The list is re-read live (:meth:`_reload_devices`)."""
        allowed = self.fed.allowed_devices
        return device != self.me and (not allowed or device in allowed)

    def _tell_refused(self, device: str, payload: bytes | None, reason: str) -> bool:
        """A message from a device that is not allowed: when it is signed with that
        device's own key (derived from the federation secret: a device this federation
        provisioned, then removed or not yet added) it gets a ``refused`` reply with the
        reason, at most one per device per refusal interval; anything else is an
        unauthenticated message. True when the sender was authenticated. ``payload`` None:
        the device is known to be genuine (it was online when it was removed)."""
        assert self.messenger is not None
        key = P.device_key(self.cfg.secret, device)
        if payload is not None:
            try:
                self.messenger.open(payload, expect_sender=device, key_override=key)
            except WireError as exc:
                self._refuse_wire(device, "envelope", exc)
                return False
        if self.refusals.refuse(self.round, device, reason, cls="not allowed", per_interval=1):
            with contextlib.suppress(FedCoEError):
                self.messenger.send(self.topics.dn_ctl(device), P.REFUSED, device,
                                    {"reason": reason[:500]}, key, round=self.round)
        return True

    def _not_allowed_reason(self, device: str) -> str:
        return (f"device {device!r} is not in the federation's allowed_devices (never added, "
                f"or removed with `fedcoe devices remove`); ask the operator to add it")

    def _config_file_stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of the config file, None when there is none (built in code)."""
        if not self.cfg.path:
            return None
        try:
            st = Path(self.cfg.path).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload_devices(self) -> None:
        """Re-read ``allowed_devices`` when the config file changed (``fedcoe devices
        add|remove`` rewrites it atomically): an added device is welcome from its first
        hello, a removed one is dropped from the open round (so the round does not wait for
        it) and refused from its next message on. A file that no longer parses is one
        warning line; the list in force stays (docs/daemons.md, "Adding and removing
        devices")."""
        with self._reload_lock:
            self._reload_devices_locked()

    def _reload_devices_locked(self) -> None:
        stamp = self._config_file_stamp()
        if stamp is None or stamp == self._config_stamp:
            return
        self._config_stamp = stamp
        from coordinator.config import load_config

        try:
            new = list(load_config(Path(self.cfg.path)).federation.allowed_devices)
        except FedCoEError as exc:
            log.warning("allowed_devices not reloaded, the old list stays: %s", exc)
            return
        old = list(self.fed.allowed_devices)
        if new == old:
            return
        self.fed.allowed_devices = new
        added = sorted(set(new) - set(old))
        gone = sorted(d for d in self.online if not self.allowed(d))
        log.info("allowed_devices reloaded from %s: %d device(s)%s%s", self.cfg.path, len(new),
                 f", added {','.join(added)}" if added else "",
                 f", removed {','.join(gone)}" if gone else "")
        for dev in gone:
            self._drop_device(dev)

    def _drop_device(self, dev: str) -> None:
        """A removed device: out of the online set, its open-round task settled as a
        failure, its open upload dropped, and told why."""
        reason = self._not_allowed_reason(dev)
        with self._lock:
            if self.online.pop(dev, None) is not None:
                self.store.later("set_online", dev, False)  # its offline presence is not news then
            if self.engine.owes(dev):
                self.engine.fail(dev, self.round, "device removed from the federation")
            xid = self._upload_of.get(dev)
            if xid is not None:
                self._drop_upload(dev, xid)
                rcv = self._receivers.get(dev)
                if rcv is not None:
                    rcv.discard(xid)
        self._tell_refused(dev, None, reason)
        self._wake.set()

    def _send(self, device: str, type: str, body: dict[str, Any], rnd: int | None = None) -> None:
        key = self.key_for(device)
        if key is None or self.messenger is None:
            return
        self.messenger.send(self.topics.dn_ctl(device), type, device, body, key,
                            round=self.round if rnd is None else rnd)

    def _broadcast(self, state: str, **extra: Any) -> None:
        assert self.messenger is not None
        body = {"state": state, "round": self.round, "version": self.strategy.version,
                "rounds": self.fed.rounds, **extra}
        self.messenger.send(self.topics.bc_ctl(), P.STATUS, "*", body, self.bc_key, round=self.round,
                            ttl_s=3600, retain=True, expiry_s=3600)

    def reject(self, device: str, rnd: int, reason: str, notify: bool = True,
               xfer: str | None = None, per_interval: int | None = None) -> None:
        """Refuse an input: a log line naming device, round and reason, and a round-log row;
        repeats of one reason from one device are aggregated (:class:`RefusalLog`), and
        only refusals written individually are also told to the device."""
        if self.refusals.refuse(rnd, device, reason, per_interval=per_interval) and notify:
            with contextlib.suppress(FedCoEError):
                self._send(device, P.REJECT, {"reason": reason[:500], "xfer": xfer}, rnd)

    def _refuse_wire(self, device: str, what: str, exc: WireError) -> None:
        """Refuse a message that did not decode. One whose HMAC did not verify was never
        parsed; it costs one counted row and at most one line per sender per interval,
        whatever its defect (docs/protocol.md, "Bounds")."""
        if isinstance(exc, UnauthenticatedError):
            self.refusals.refuse(self.round, device, f"{what}: {exc}", cls="unauthenticated",
                                 per_interval=1)
        else:
            self.reject(device, self.round, f"{what}: {exc}", notify=False)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Serve /metrics and the dashboard if configured (a busy port is a ConfigError
        here, before the broker is joined), resume from the state folder, connect,
        subscribe, announce."""
        self.http = HttpEndpoints(self.cfg, self.state_dir)
        self.http.start()
        self.engine.load_eval()
        self.engine.resume()
        if self.fed.workers:
            self._workers = WorkerPool(self.cfg, self.fed.workers, PoolHandler(
                self._worker_batch, self._worker_refused, self._worker_lost))
            self._workers.start()
            if not self._workers.wait_ready():
                log.warning("aggregation workers not ready after %.0fs; going on (uploads wait "
                            "for them)", READY_S)
            if self.round_open:
                self._open_workers()
        will = Will(self.topics.coord_status(), P.presence_payload("offline"), 1, True)
        birth = Will(self.topics.coord_status(), P.presence_payload("online"), 1, True)
        self.transport = self._factory(self.me, will, birth)
        self.messenger = P.Messenger(self.transport, self.topics, self.me, self.key_for,
                                     ReplayCache(per_sender=REPLAY_PER_SENDER))
        self.transport.subscribe(self.topics.up_ctl_filter(), self._on_ctl)
        self.transport.subscribe(self.topics.up_blob_filter(), self._on_blob, bulk=True)
        self.transport.subscribe(f"{self.topics.prefix}/presence/+", self._on_presence)
        self.transport.subscribe(f"{self.topics.prefix}/up/+/hb", self._on_heartbeat, qos=0)
        self.transport.connect()
        self._pump_thread = threading.Thread(target=self._pump_loop, name="coord-pump", daemon=True)
        self._pump_thread.start()
        self._persist_thread = threading.Thread(target=self._persist_loop, name="coord-persist",
                                                daemon=True)
        self._persist_thread.start()
        if self.round_open:
            log.info("resuming round %d: %d of %d updates already accepted", self.round,
                     len(self.results), len(self.tasks))
            # devices re-register when they see the coordinator come online; their hello
            # re-sends the task to those that still owe an update
            self._broadcast("open")
        else:
            self._broadcast("finished" if self.round >= self.fed.rounds else "idle")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        """Disconnect cleanly (publishes coordinator offline) and close the database.

        The pump thread flushes refusals and prunes the store on every pass, so it is stopped
        and joined first: a run that ends on its own (``exit_when_done``) never called
        :meth:`stop`, and a pump still running after the store closed failed its next pass
        with "Cannot operate on a closed database"."""
        self._stop.set()
        pump = getattr(self, "_pump_thread", None)
        if pump is not None and pump.is_alive() and pump is not threading.current_thread():
            pump.join(timeout=30)
        if self._workers is not None:
            self._workers.close()
        thread = getattr(self, "_persist_thread", None)
        if thread is not None and thread.is_alive():
            self._persist_q.put(None)
            thread.join(timeout=30)
        t = self.transport
        if t is not None:
            with contextlib.suppress(FedCoEError):
                self._clear_shared(keep_version=None)
                t.publish(self.topics.coord_status(), P.presence_payload("offline"),
                          qos=1, retain=True)
            time.sleep(0.2)
            t.close()  # (a second close() meanwhile, e.g. run()'s own: closing twice is fine)
            self.transport = None
        self.refusals.flush(force=True)
        if self.http is not None:
            self.http.stop()
        self.store.close()

    def run(self) -> int:
        """Run every round, then serve cold-start fetches until stopped (or exit when told)."""
        self.start()
        waiting_since: float | None = None
        try:
            while not self._stop.is_set():
                if self.round_open:
                    self._wait_round()
                    if not self._stop.is_set():
                        self._close_round()
                elif self.round < self.fed.rounds:
                    if self._enough_devices():
                        self._open_round()
                        waiting_since = None
                    else:
                        now = time.monotonic()
                        if waiting_since is None:
                            waiting_since = now
                        elif now - waiting_since >= self.fed.wait_log_s:
                            need = self.fed.min_devices if self.round == 0 else self.fed.quorum
                            log.warning("round %d waits for devices: %d online of %d needed (%s)",
                                        self.round + 1, len(self.available()), need,
                                        ",".join(self.available()) or "none")
                            waiting_since = now
                        self._wake.wait(0.2)
                        self._wake.clear()
                else:
                    if not self.finished:
                        self.finished = True
                        self._broadcast("finished")
                        log.info("all %d rounds done; version %d", self.fed.rounds, self.strategy.version)
                        if self.fed.exit_when_done:
                            self._linger()  # let final refreshes and evaluations land
                            break
                    self._wake.wait(0.5)
                    self._wake.clear()
        finally:
            with contextlib.suppress(Exception):  # a summary never hides why the run ended
                self._log_run_summary()
            self.close()
        return 0

    # ------------------------------------------------------------------ rounds
    def available(self) -> list[str]:
        with self._lock:
            return sorted(d for d, role in self.online.items() if role == "train")

    def _enough_devices(self) -> bool:
        need = self.fed.min_devices if self.round == 0 else self.fed.quorum
        return len(self.available()) >= need

    def _open_round(self) -> None:
        with self._lock:
            rnd = self.round + 1
            tasks = self.engine.open_round(rnd, self._plan_round(rnd))
            self._open_workers()
        shown = ",".join(sorted(self.tasks)[:20]) + (",..." if len(tasks) > 20 else "")
        log.info("round %d open: %d device(s) selected %s, deadline %.0fs", rnd, len(tasks),
                 shown, self.fed.deadline_s)
        t0 = time.monotonic()
        for t in tasks:
            self._send_task(t)
        log.info("round %d: %d task(s) sent in %.2fs (%d distinct payloads)", rnd, len(tasks),
                 time.monotonic() - t0, len({id(t.params) for t in tasks}))
        self._broadcast("open")

    def _plan_round(self, rnd: int) -> list[ClientTask]:
        """This round's tasks: the strategy selects and configures. A shard aggregator
        (coordinator/shard.py) takes them from its leader instead."""
        return self.engine.plan(rnd, self.available())

    def _send_task(self, task: ClientTask) -> None:
        xfer = self._send_params(task.client_id, task.params, task.expert_ids, "train", task.round)
        with self._lock:
            self._task_xfer[task.client_id] = xfer.transfer_id
        self._announce(xfer.transfer_id, P.TASK, {
            "manifest": xfer.to_dict(), "expert_ids": list(task.expert_ids),
            "version": self.strategy.version, "deadline_s": max(1.0, self.deadline - time.monotonic()),
            "config": {k: v for k, v in task.config.items() if isinstance(v, int | float | str)}},
            task.round)

    def _announce(self, xid: str, type: str, body: dict[str, Any], rnd: int) -> None:
        """Send the envelope carrying a download's manifest; the pump loop repeats it until
        the device reports progress (a broker restart can lose a QoS 1 message)."""
        with self._lock:
            out = self._senders.get(xid)
            if out is not None:
                if out.shared is not None:  # the bytes are also on the shared topics
                    body = {**body, "shared": out.shared}
                out.announce, out.announced_at = (type, body, rnd), time.monotonic()
                out.announces += 1
        if out is not None:
            self._send(out.device, type, body, rnd)

    def _prepare(self, params: dict[str, np.ndarray], expert_ids: list[int]
                 ) -> tuple[bytes, TransferManifest]:
        """Encode and hash a parameter set once per (version, expert set): every device that
        gets the same experts gets the same bytes (only the transfer id differs). The
        values are a function of (version, tensor names): the global state changes only
        with the version."""
        version = self.strategy.version
        key = (version, tuple(expert_ids), tuple(sorted(params)))
        with self._lock:
            got = self._prepared.get(key)
            if got is not None:
                return got
        data = encode_tensors(params)
        manifest = TransferManifest.for_payload(data, expert_ids=expert_ids, base_version=version,
                                                chunk_size=self.fed.chunk_size,
                                                window=self.fed.window)
        with self._lock:
            if any(k[0] != version for k in self._prepared):
                self._prepared = {k: v for k, v in self._prepared.items() if k[0] == version}
            self._prepared[key] = (data, manifest)
        return data, manifest

    def _send_params(self, device: str, params: dict[str, np.ndarray], expert_ids: list[int],
                     purpose: str, rnd: int) -> TransferManifest:
        """Prepare a chunked download; chunks flow once the device reports it is listening."""
        data, base = self._prepare(params, expert_ids)
        return self._send_bytes(device, data, base, purpose, rnd)

    def _send_bytes(self, device: str, data: bytes, base: TransferManifest, purpose: str,
                    rnd: int) -> TransferManifest:
        """A download of ``data`` (``base``: its hashed manifest) under a new transfer id:
        bounded like every download (the shared chunk backlog, the pump's 10-minute limit)
        and counted in the traffic."""
        assert self.transport is not None
        sender = open_blob(self.transport, lambda xid: self.topics.dn_blob(device, xid), data,
                           chunk_size=self.fed.chunk_size, window=self.fed.window, base=base,
                           verify=False, budget=self._out_budget)
        manifest = sender.manifest
        xid = manifest.transfer_id
        shared = self._share(data, base, purpose)
        with self._lock:
            out = _Outgoing(device, rnd, purpose, sender, created=time.monotonic(), shared=shared)
            self._senders[xid] = self._pumping[xid] = out
        self.store.later("add_traffic", rnd, device, "down", purpose, len(data))
        return manifest

    def _share(self, data: bytes, base: TransferManifest, purpose: str) -> dict[str, Any] | None:
        """Publish ``data`` once on the federation's shared topics (retained chunks, first
        time a payload is sent, again when half its expiry passed) and return the reference
        every device's envelope for it carries; None with ``shared_downloads = false``
        (docs/protocol.md, "Shared downloads"). The per-device sender stays: its chunks flow
        only if the device asks for them (its fallback, and what older agents use)."""
        if not self.fed.shared_downloads or self.transport is None:
            return None
        sid = shared_id(base.sha256)
        version = None if purpose == "trunk" else base.base_version
        now = time.monotonic()
        with self._shared_lock:
            got = self._shared.get((sid, version))
            if got is not None and now - got[1] < SHARED_EXPIRY_S / 2:
                return got[0].to_wire()
            try:
                ref = publish_shared(self.transport, self.topics, data, base.sha256,
                                     self.fed.chunk_size)
            except FedCoEError as exc:  # devices get the per-device transfer instead
                log.warning("shared download %s not published: %s", sid, exc)
                return None
            self._shared[(sid, version)] = (ref, now)
        log.info("shared download %s published: %d bytes in %d retained chunk(s), version %s",
                 sid, len(data), ref.chunk_count, "trunk" if version is None else version)
        return ref.to_wire()

    def _clear_shared(self, keep_version: int | None) -> None:
        """Remove from the broker the shared downloads of versions other than
        ``keep_version`` (the trunk file stays while the coordinator runs); None: all of
        them, as the coordinator leaves. Devices still assembling one fall back to their
        per-device transfer."""
        if self.transport is None:
            return
        with self._shared_lock:
            gone = [k for k in self._shared
                    if keep_version is None or (k[1] is not None and k[1] != keep_version)]
            popped = [(k[0], self._shared.pop(k)[0]) for k in gone]
            # the same bytes may be a current payload too (a version that changed nothing of
            # them, the trunk): their retained copy stays
            live = {sid for sid, _ in self._shared}
            refs = [ref for sid, ref in popped if sid not in live]
        for ref in refs:
            with contextlib.suppress(FedCoEError):
                clear_shared(self.transport, self.topics, ref)
        if refs:
            log.info("cleared %d shared download(s) of superseded versions", len(refs))

    def _wait_round(self) -> None:
        while not self._stop.is_set():
            if self.engine.pending() <= 0:
                return
            left = self.deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(min(left, 0.5))
            self._wake.clear()

    def _close_round(self) -> None:
        with self._lock:
            self.engine.closing = True  # no more updates are queued for persistence ...
        if self._workers is not None:  # ... every upload handed to a worker is answered ...
            self._workers.drain(self._stop)
        self._persist_q.join()  # ... and the queued ones are durable and ACKed
        if self._workers is not None:  # the workers' committed partial sums join the round
            self.engine.merge_partials(self._workers.committed_paths())
        self.store.flush_later()
        self._before_aggregate()
        with self._lock:
            self.engine.closing = False
            closed = self.engine.close_round(self._aggregate, self._checkpoint)
            rnd = closed.round
            for xid, out in list(self._senders.items()):
                if out.round <= rnd and out.purpose == "train":
                    del self._senders[xid]
            for key, up in list(self._uploads.items()):
                if up.round == rnd:
                    self._receivers[up.device].discard(key[1])
                    self._drop_upload(*key)
            self._task_xfer = {}
            # accepted transfers of this round stay (a late re-announce is answered with
            # ACCEPT), older ones go: the set is bounded by two rounds of devices
            self._accepted_xfers = {k: r for k, r in self._accepted_xfers.items() if r >= rnd}
        acc = closed.accuracy
        log.info("round %d closed: %s; version %d -> %d%s", rnd, closed.note, closed.version_before,
                 closed.version_after, f"; global acc {acc:.4f}" if acc is not None else "")
        self._log_round_summary(closed.summary)
        self._broadcast("closed")

    def _log_round_summary(self, summary: dict[str, Any]) -> None:
        """One summary line per closed round, with its fields for JSON logs
        (docs/daemons.md, "Logs"); kept for the end-of-run line."""
        from coordinator.status import round_line

        self._closed_summaries.append(summary)
        msg, fields = round_line(summary)
        log.info("%s", msg, extra=fields)

    def _log_run_summary(self) -> None:
        """The end-of-run line: what this process closed, however the run ends."""
        from coordinator.status import run_line

        msg, fields = run_line(self._closed_summaries, time.monotonic() - self._started_at,
                               self.strategy.version)
        log.info("%s", msg, extra=fields)

    def _before_aggregate(self) -> None:
        """Called at a round's close once every accepted update is durable, without the
        lock held. Nothing here; a shard aggregator sends its partial to the leader and
        waits for the next version (coordinator/shard.py)."""

    def _aggregate(self, rnd: int, results: list[ClientResult], failures: list[Failure]
                   ) -> tuple[bool, str]:
        """Apply the round (lock held): the engine's rule; a shard aggregator's round is
        applied by its leader instead (coordinator/shard.py)."""
        return self.engine.aggregate(rnd, results, failures)

    def _checkpoint(self, rnd: int) -> None:
        self.engine.checkpoint(rnd)

    # ------------------------------------------------------------------ handlers
    def _on_presence(self, msg: Message) -> None:
        dev = self.topics.parse(msg.topic).device or "?"
        state = P.presence_state(msg.payload)
        if state is None:
            self.refusals.refuse(self.round, dev, "presence: unreadable payload ignored",
                                 per_interval=1)
            return
        if state == "offline":
            with self._lock:
                was = self.online.pop(dev, None)
            if was is not None:
                log.info("device %s went offline", dev)
                self.store.later("set_online", dev, False)

    def _on_heartbeat(self, msg: Message) -> None:
        """Telemetry: refresh last_seen. Rate-limited per device before any work; a bad
        heartbeat is refused and counted like any input (grouped: QoS 0 noise costs a row
        and a line per interval at most)."""
        try:
            dev = self.topics.parse(msg.topic).device or "?"
        except WireError as exc:
            self.refusals.refuse(self.round, "?", f"heartbeat: {exc}", cls="bad topic",
                                 per_interval=1)
            return
        if not self._hb_limit.allow(dev):
            self.refusals.refuse(self.round, dev, "rate limit: heartbeats more often than "
                                 f"{HB_BURST} per {HB_BURST / HB_RATE:g}s", per_interval=1)
            return
        if dev != self.me and not self.allowed(dev) and self.messenger is not None:
            # verified with its own key and its own replay window, like any heartbeat
            try:
                env = decode_envelope(msg.payload, lambda _s: P.device_key(self.cfg.secret, dev),
                                      replay_cache=self._hb_replay, expect_sender=dev)
            except WireError as exc:
                self._refuse_wire(dev, "heartbeat", exc)
                return
            if env.federation == self.fed.id:
                self._tell_refused(dev, None, self._not_allowed_reason(dev))
            return
        try:
            # a replay window of its own: heartbeats (ttl 120 s) never compete with control
            # messages (ttl 600 s) for room, however many devices beat
            env = decode_envelope(msg.payload, self.key_for, replay_cache=self._hb_replay,
                                  expect_sender=dev)
            if env.federation != self.fed.id or env.recipient not in (self.me, "*"):
                raise WireError(f"heartbeat of {dev!r} for another federation or recipient")
            hb = Heartbeat.from_wire(env.body)
        except WireError as exc:
            self._refuse_wire(dev, "heartbeat", exc)
            return
        self.store.later("heartbeat", dev, hb.to_wire())

    def _on_ctl(self, msg: Message) -> None:
        try:
            dev = self.topics.parse(msg.topic).device or "?"
        except WireError as exc:
            self.refusals.refuse(self.round, "?", f"topic: {exc}", cls="bad topic",
                                 per_interval=1)
            return
        assert self.messenger is not None
        if not self._ctl_limit.allow(dev):
            self.reject(dev, self.round, f"rate limit: more than {CTL_RATE:g} control messages/s",
                        notify=False, per_interval=1)
            return
        if dev != self.me and not self.allowed(dev):
            self._reload_devices()  # added a moment ago, before the pump's next look?
        if dev != self.me and not self.allowed(dev):
            self._tell_refused(dev, msg.payload, self._not_allowed_reason(dev))
            return
        try:
            env = self.messenger.open(msg.payload, expect_sender=dev)
        except WireError as exc:
            self._refuse_wire(dev, "envelope", exc)
            return
        body = env.body
        try:  # each body is typed (fedcoe_edge/messages.py) before a handler reads it
            if env.type == P.HELLO:
                if not self._hello_limit.allow(dev):
                    self.reject(dev, env.round, "rate limit: hello more often than "
                                f"{HELLO_BURST} per {HELLO_BURST / HELLO_RATE:g}s", notify=False)
                    return
                self._on_hello(dev, Hello.from_wire(body))
            elif env.type == P.RESULT:
                self._on_result(dev, env.round, Result.from_wire(body))
            elif env.type == P.FETCH:
                if not self._fetch_limit.allow(dev):
                    self.reject(dev, env.round, "rate limit: fetch more often than "
                                f"{FETCH_BURST} per {FETCH_BURST / FETCH_RATE:g}s", notify=False)
                    return
                self._on_fetch(dev, env.round, Fetch.from_wire(body))
            elif env.type == P.EVAL:
                if not self._eval_limit.allow(dev):
                    self.reject(dev, env.round, "rate limit: eval more often than "
                                f"{EVAL_BURST} per {EVAL_BURST / EVAL_RATE:g}s", notify=False,
                                per_interval=1)
                    return
                self._on_eval(dev, env.round, Eval.from_wire(body))
            elif env.type == P.DECLINE:
                if not self._decline_limit.allow(dev):
                    self.reject(dev, env.round, "rate limit: decline more often than "
                                f"{DECLINE_BURST} per {DECLINE_BURST / DECLINE_RATE:g}s",
                                notify=False, per_interval=1)
                    return
                self._on_decline(dev, env.round, Decline.from_wire(body))
            elif env.type == XFER_PROGRESS:
                self._on_xfer_report(dev, env.type, XferProgress.from_wire(body).xfer, body)
            elif env.type == XFER_DONE:
                self._on_xfer_report(dev, env.type, XferDone.from_wire(body).xfer, body)
            else:
                self.reject(dev, env.round, f"unknown message type {env.type!r}")
        except (FedCoEError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
            # a body that fails its type: one line per device and reason per interval
            self.reject(dev, env.round, f"{env.type}: {exc}",
                        per_interval=1 if isinstance(exc, MessageError) else None)

    def _on_hello(self, dev: str, hello: Hello) -> None:
        role = hello.role
        caps = hello.capabilities()
        self.store.later("register", dev, role, caps)
        with self._lock:
            first = dev not in self.online
            self.online[dev] = role
            resend = self.engine.owes(dev)
        if first:
            log.info("device %s registered: role=%s tier=%s samples=%s", dev, role, caps["tier"],
                     caps["num_samples"])
        s = self.strategy
        self._send(dev, P.WELCOME, {
            "algorithm": self.fed.algorithm, "seed": self.fed.seed, "model": self.cfg.model.to_dict(),
            "train": self.cfg.train.to_dict(), "bc_key": self.bc_key.hex(), "version": s.version,
            "round": self.round, "rounds": self.fed.rounds, "round_open": self.round_open,
            "classes": list(self.fed.classes)})
        if resend:
            self._resend_task(dev)
        self._wake.set()

    def _resend_task(self, dev: str) -> None:
        """Re-announce the task transfer prepared for ``dev`` this round (its manifest, not
        new bytes): a device that holds it answers with ``xfer_done`` and nothing moves; one
        that lost it reports nothing received and the same transfer starts over. Only a
        restarted coordinator, which kept no transfers, prepares the task again."""
        with self._lock:
            xid = self._task_xfer.get(dev, "")
            out = self._senders.get(xid)
            found = (out is not None and out.round == self.round and out.announce is not None)
        if not found:
            self._send_task(self.tasks[dev])
            return
        assert out is not None
        assert out.announce is not None
        type_, body, rnd = out.announce
        body = {**body, "deadline_s": max(1.0, self.deadline - time.monotonic())}
        self._announce(xid, type_, body, rnd)

    def _on_result(self, dev: str, rnd: int, body: Result) -> None:
        manifest = body.manifest
        xid = manifest.transfer_id
        with self._lock:
            if (dev, xid) in self._accepted_xfers:  # a re-announce of an update already accepted
                self._send(dev, P.ACCEPT, {"xfer": xid}, rnd)
                return
            if not self.round_open or rnd != self.round:
                self.reject(dev, rnd, f"update for closed round {rnd} (current round {self.round}, "
                                      f"{'open' if self.round_open else 'closed'})", xfer=xid)
                return
            if dev not in self.tasks:
                self.reject(dev, rnd, f"device not selected for round {rnd}", xfer=xid)
                return
            if dev in self.results:
                self.reject(dev, rnd, f"duplicate update for round {rnd} (one already accepted)", xfer=xid)
                return
            if dev in self.engine.persisting:
                return  # its update is being written; the ACCEPT follows
            if dev in self.failed:
                self.reject(dev, rnd, f"update after this round's failure ({self.failed[dev][:80]})", xfer=xid)
                return
            if manifest.encoding not in (P.ENCODING_PLAIN, P.ENCODING_DELTA):
                self.reject(dev, rnd, f"unknown encoding {manifest.encoding!r}", xfer=xid)
                return
            limit = self._task_nbytes(self.tasks[dev].params) + UPLOAD_SLACK
            if manifest.total_bytes > limit:
                self.reject(dev, rnd, f"upload of {manifest.total_bytes} bytes exceeds {limit}", xfer=xid)
                return
            rcv = self._receiver(dev)
            open_up = self._uploads.get((dev, xid))
            if open_up is not None and open_up.manifest != manifest:
                # The same update (same bytes, so the same id) announced again with another
                # manifest: after a restart a device re-sends it under the version of the
                # newer welcome while its earlier announce is still open here. The newest
                # announce wins and the transfer starts over from it (docs/protocol.md,
                # "6. Idempotency"), instead of every re-announce being refused until the
                # deadline.
                log.info("upload %s of %s announced again with another manifest; restarting it",
                         xid, dev)
                rcv.discard(xid)
                self._drop_upload(dev, xid)
            if (dev, xid) not in self._uploads:
                # one open upload per device: a new announce replaces the previous one
                previous = self._upload_of.get(dev)
                if previous is not None:
                    rcv.discard(previous)
                    self._drop_upload(dev, previous)
                # each selected device is guaranteed its share of the budget; an upload within
                # it evicts those borrowing beyond theirs, any upload evicts stalled ones
                self._budget.owners = max(1, len(self.tasks))
                admission = self._budget.admit((dev, xid), dev, manifest.total_bytes)
                for other, other_xid in admission.evicted:
                    self._evict_upload(other, other_xid, "the reassembly budget was full and it "
                                       "held more than its share or had stalled")
                if not admission.admitted:
                    # back-pressure, not a refusal: the device re-announces every few seconds
                    # until its deadline, and gets in once other uploads have finished
                    log.debug("upload of %s deferred: reassembly budget %d of %d in use "
                              "(share %d)", dev, self._budget.used, self._budget.total_bytes,
                              self._budget.share)
                    return
                self._uploads[(dev, xid)] = _Upload(dev, rnd, body, manifest)
                self._upload_of[dev] = xid
            rcv.expect(manifest)
        rcv.nudge(manifest.transfer_id)

    def _task_nbytes(self, params: dict[str, np.ndarray]) -> int:
        """Size of a task's plain safetensors encoding, the base of its upload limit; memoised
        per params dict (held by reference, so its id cannot be reused while cached)."""
        got = self._nbytes_of.get(id(params))
        if got is not None and got[0] is params:
            return got[1]
        n = serialized_nbytes(params)
        if len(self._nbytes_of) >= 1024:  # distinct expert sets of a round are far fewer
            self._nbytes_of.clear()
        self._nbytes_of[id(params)] = (params, n)
        return n

    def _drop_upload(self, dev: str, xid: str) -> _Upload | None:
        """Forget an open upload (finished, replaced or expired); call with the lock held."""
        up = self._uploads.pop((dev, xid), None)
        if up is not None:
            self._budget.release((dev, xid))
            if self._upload_of.get(dev) == xid:
                del self._upload_of[dev]
        return up

    def _evict_upload(self, dev: str, xid: str, why: str) -> None:
        """Drop an open upload to free its bytes, with one counted refusal; the device is not
        told: its next chunk is unknown here, and the answer (``xfer_unknown``) makes an
        honest device announce the upload again. Call with the lock held."""
        up = self._drop_upload(dev, xid)
        rcv = self._receivers.get(dev)
        if rcv is not None:
            rcv.discard(xid)
        if up is not None:
            self.reject(dev, up.round, f"upload dropped: {why}", notify=False, xfer=xid)

    def _expire_uploads(self) -> None:
        """Drop the uploads with no new chunk for ``UPLOAD_IDLE_S`` (the pump loop's timer)."""
        with self._lock:
            for dev, xid in self._budget.expire():
                self._evict_upload(dev, xid, f"no new chunk for {self._budget.idle_s:g}s")

    def _receiver(self, dev: str) -> BlobReceiver:
        with self._lock:
            rcv = self._receivers.get(dev)
            if rcv is None:
                def report(type: str, body: dict[str, Any], dev: str = dev) -> None:
                    self._send(dev, type, body)
                rcv = self._receivers[dev] = BlobReceiver(report)
            return rcv

    def _on_blob(self, msg: Message) -> None:
        try:
            info = self.topics.parse(msg.topic)
        except WireError as exc:
            log.warning("rejected device=? round=%d reason=%s", self.round, exc)
            return
        dev = info.device or "?"
        if self.key_for(dev) is None:
            self.reject(dev, self.round, "chunk from a device that is not allowed", notify=False)
            return
        xid = info.transfer_id or ""
        try:
            with self._lock:
                up = self._uploads.get((dev, xid))
                rcv = self._receivers.get(dev)
                accepted = (dev, xid) in self._accepted_xfers
            if up is None and rcv is not None and rcv.completed(xid):
                # a re-sent chunk of a finished upload: the device missed our final ACK
                if self._notice_limit.allow(f"{dev}/{xid}"):
                    rcv.on_chunk(msg.payload)
                    if accepted:
                        self._send(dev, P.ACCEPT, {"xfer": xid}, self.round)
                return
            if up is None:
                self._unknown_upload(dev, xid)
                raise WireError(f"chunk for unknown transfer {info.transfer_id!r}")
            assert rcv is not None
            done = rcv.on_chunk(msg.payload)
            if done is None:
                self._upload_progress(dev, xid, up, rcv.received(xid))
        except WireError as exc:
            self.reject(dev, self.round, f"blob: {exc}", notify=False)
            return
        if done is not None:
            manifest, data = done
            queued = False
            try:
                queued = self._finish_upload(dev, manifest, data)
            finally:  # refused for good: the sender may stop (a queued one is ACKed once durable)
                if not queued:
                    self._receiver(dev).ack(manifest.transfer_id)

    def _upload_progress(self, dev: str, xid: str, up: _Upload, received: int) -> None:
        """A chunk of an open upload was handled: a new one (``received`` grew) keeps the
        upload from counting as idle or stalled; a duplicate does not."""
        if received > up.received:
            with self._lock:
                up.received = received
                self._budget.progress((dev, xid))

    def _unknown_upload(self, dev: str, xid: str) -> None:
        """Chunks of an upload this coordinator does not know (it restarted, or the
        announce was lost) from a device that still owes this round's update: tell it, so
        it re-announces at once instead of waiting for its upload timeout."""
        if self.engine.owes(dev) and self._notice_limit.allow(f"{dev}/{xid}"):
            self._send(dev, P.XFER_UNKNOWN, {"xfer": xid}, self.round)

    def _finish_upload(self, dev: str, manifest: TransferManifest, data: bytes) -> bool:
        """Check a complete upload and queue it for the persister; True when queued (it is
        ACKed once durable), False when refused (the caller ACKs the transfer at once)."""
        xid = manifest.transfer_id
        with self._lock:
            up = self._drop_upload(dev, xid)
            if up is None:
                return False
            rnd = up.round
            task, why = self.engine.claim(dev, rnd)
            if task is None:
                self.reject(dev, rnd, why or "update refused", xfer=xid)
                return False
            job = (None if self._workers is None else
                   self._workers.reserve(dev, rnd, xid, up.body, len(data), list(task.expert_ids)))
        if job is not None and self._workers is not None:
            # checked and folded in a worker process; answered by _worker_batch (ACKed once
            # durable), _worker_refused or _worker_lost (coordinator/workers.py)
            self._workers.submit(job, data)
            return True
        try:  # the expensive part runs without the lock: other handlers and the pump go on
            result = self.engine.check_update(dev, rnd, task, up.body, manifest, data)
        except (FedCoEError, ArithmeticError, ValueError, KeyError, TypeError) as exc:
            reason = str(exc)
            if not self.engine.fail(dev, rnd, f"update rejected: {reason}"):
                return False
            self.reject(dev, rnd, reason, xfer=xid)
            self._wake.set()
            return False
        with self._lock:
            if self.engine.closing or not self.engine.is_current(rnd):
                self.engine.release(dev)
                self.reject(dev, rnd, f"update for closed round {rnd} (current round {self.round})",
                            xfer=xid)
                return False
            self._persist_q.put(Accepted(dev, rnd, result, len(data), xid, manifest.encoding))
        return True

    # ------------------------------------------------------------------ persistence thread
    def _persist_loop(self) -> None:
        """Write accepted updates in batches off the handler thread; each is ACKed only
        after its batch is durable (docs/design.md section 8: persist, then acknowledge)."""
        while True:
            try:
                first = self._persist_q.get(timeout=0.5)
            except queue.Empty:
                self.store.flush_later()
                continue
            if first is None:
                self._persist_q.task_done()
                self.store.flush_later()
                return
            batch = [first]
            # a worker's batch is one already (coordinator/workers.py): committed at once,
            # with whatever else is queued, since its worker waits for the verdict
            end = time.monotonic() + (0.0 if isinstance(first, WorkerBatch) else PERSIST_BATCH_S)
            stop = False
            while len(batch) < PERSIST_BATCH_MAX:
                try:
                    item = self._persist_q.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                self._persist_each(batch)
            finally:
                for _ in batch:
                    self._persist_q.task_done()
            if stop:
                self._persist_q.task_done()
                self.store.flush_later()
                return

    def _persist_each(self, items: list[Accepted | EvalReport | WorkerBatch]) -> None:
        """Persist a batch; if it fails, each member alone, so one member that cannot be
        written (a value the checks let through, a file that fails) never costs the others
        their update: only what fails on its own is dropped (and its device re-sends). A
        worker's batch is one snapshot, committed or dropped as a whole."""
        batch: list[Accepted | EvalReport] = []
        for item in items:
            if isinstance(item, WorkerBatch):
                self._persist_worker(item)
            else:
                batch.append(item)
        if not batch:
            return
        try:
            self._persist(batch)
            return
        except Exception as exc:  # disk full, I/O error, a bad value: retried one by one
            self._persist_failed(batch, exc, alone=len(batch) == 1)
        if len(batch) == 1:
            return
        for item in batch:
            try:
                self._persist([item])
            except Exception as exc:
                self._persist_failed([item], exc, alone=True)

    def _persist_failed(self, items: list[Accepted | EvalReport], exc: Exception, alone: bool) -> None:
        """Undo what a failed write left behind: the partial sums go back to the last
        durable snapshot, the uploads are forgotten (the devices re-announce them)."""
        accepted = [a for a in items if isinstance(a, Accepted)]
        if alone:
            what = (f"update of {accepted[0].device} round {accepted[0].round}" if accepted
                    else f"{len(items)} evaluation(s)")
            log.error("persisting the %s failed (%s: %s); none acknowledged", what,
                      type(exc).__name__, str(exc)[:200])
        else:
            log.warning("persisting a batch of %d failed (%s: %s); each is retried alone",
                        len(items), type(exc).__name__, str(exc)[:200])
        if accepted:
            try:
                self.engine.rollback(accepted[0].round)
            except (FedCoEError, OSError, ValueError, KeyError):
                log.exception("round %d: the last durable partial sums could not be "
                              "reloaded; updates re-sent now may count twice",
                              accepted[0].round)
        if not alone:
            return  # retried one by one next: the members are still this coordinator's
        with self._lock:
            for a in accepted:
                self.engine.release(a.device)
                self._drop_upload(a.device, a.xfer)
        for a in accepted:  # its chunks are now unknown: the device re-announces
            self._receiver(a.device).forget(a.xfer)

    def _prune(self) -> None:
        """Retention on a schedule (docs/protocol.md, "Bounds"): the newest EVENT_RETENTION
        event rows of each kind, and trunk downloads older than their window."""
        try:
            self.store.prune_all_events(EVENT_RETENTION)
            self.store.prune_trunk_fetches(time.time() - TRUNK_FETCH_WINDOW_S)
        except Exception as exc:  # sqlite3.Error (a busy or full disk): next time
            log.warning("pruning event rows failed: %s", exc)

    def _persist(self, items: list[Accepted | EvalReport]) -> None:
        """One batch made durable and counted by the engine (:meth:`RoundEngine.record`),
        then the ACKs: an update is acknowledged only once it is durable."""
        evals = [e for e in items if isinstance(e, EvalReport)]
        batch = [a for a in items if isinstance(a, Accepted)]
        self.engine.record(items, counted=self._count_accepted)
        self._ack_accepted(batch)
        self._ack_evals(evals)

    def _ack_accepted(self, batch: list[Accepted]) -> None:
        """An update's ACCEPT and its transfer's final ACK, once it is durable."""
        if not batch:
            return
        for a in batch:
            log.info("accepted device=%s round=%d bytes=%d (%s)", a.device, a.round, a.nbytes,
                     a.encoding)
            with contextlib.suppress(FedCoEError):
                self._send(a.device, P.ACCEPT, {"xfer": a.xfer}, a.round)
            with contextlib.suppress(FedCoEError):
                self._receiver(a.device).ack(a.xfer)
        self._wake.set()

    # ------------------------------------------------------------------ aggregation workers
    def _open_workers(self) -> None:
        """The workers start the open round from the server state before it."""
        if self._workers is not None:
            s = self.strategy
            self._workers.open(self.round, s.global_state, s.version, s.checkpoint_extra())

    def _persist_worker(self, wb: WorkerBatch) -> None:
        """A worker's folded batch: its rows (each naming the worker's snapshot) in one
        SQLite transaction, then the worker is told it is committed, then the ACKs. A batch
        that cannot be written is dropped whole: the worker goes back to its last committed
        snapshot and the devices announce their updates again."""
        items = [Accepted(j.device, j.round,
                          ClientResult(j.device, j.round, j.body.num_samples, {},
                                       None if j.body.affinity is None else list(j.body.affinity),
                                       j.body.metrics_dict()),
                          j.nbytes, j.xfer, j.body.manifest.encoding, snapshot=wb.path)
                 for j in wb.jobs]
        assert self._workers is not None
        try:
            self.engine.record(items, counted=self._count_accepted)
        except Exception as exc:  # disk full, I/O error: none of the batch counts
            log.error("persisting a worker batch of %d failed (%s: %s); none acknowledged",
                      len(items), type(exc).__name__, str(exc)[:200])
            self._workers.commit(wb, ok=False)
            self._worker_lost(wb.jobs, "its batch could not be persisted")
            return
        self._workers.commit(wb, ok=True)
        self._ack_accepted(items)

    def _worker_batch(self, wb: WorkerBatch) -> None:
        self._persist_q.put(wb)

    def _worker_refused(self, job: Job, reason: str) -> None:
        """A worker refused an upload (the checks of :meth:`RoundEngine.check_update`): the
        same refusal, failure and ACK as in-process."""
        if self.engine.fail(job.device, job.round, f"update rejected: {reason}"):
            self.reject(job.device, job.round, reason, xfer=job.xfer)
            self._wake.set()
        with contextlib.suppress(FedCoEError):
            self._receiver(job.device).ack(job.xfer)

    def _worker_lost(self, jobs: list[Job], reason: str) -> None:
        """Uploads a worker gave up (it died, or their batch was not persisted): the claims
        are released and the transfers forgotten, so each device's next chunk or re-sent
        announce starts its update over (docs/protocol.md, "6. Idempotency")."""
        with self._lock:
            for j in jobs:
                self.engine.release(j.device)
                self._drop_upload(j.device, j.xfer)
        for j in jobs:
            log.warning("update of %s round %d given up (%s); the device sends it again",
                        j.device, j.round, reason)
            with contextlib.suppress(FedCoEError):
                self._receiver(j.device).forget(j.xfer)

    def _count_accepted(self, batch: list[Accepted]) -> None:
        """With the results (engine lock held): a late re-announce of one of these
        transfers is answered with ACCEPT from now on."""
        for a in batch:
            self._accepted_xfers[(a.device, a.xfer)] = a.round

    def _ack_evals(self, evals: list[EvalReport]) -> None:
        for e in evals:
            with contextlib.suppress(FedCoEError):
                self._send(e.device, P.EVAL_ACK, {"kind": e.kind}, e.round)

    def _linger(self) -> None:
        """After the last round: serve the final refreshes and evaluations before exiting,
        until none came for LINGER_QUIET_S and no refresh download is running (at most
        LINGER_MAX_S), instead of a fixed pause that leaves late devices unserved."""
        start = time.monotonic()
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._lock:
                busy = any(not o.sender.done for o in self._senders.values() if o.purpose != "train")
            quiet = now - max(self._last_request, start) >= LINGER_QUIET_S
            if (not busy and quiet) or now - start >= LINGER_MAX_S:
                return

    def _on_fetch(self, dev: str, rnd: int, body: Fetch) -> None:
        """Send a device the gate plus the experts it asks for (cold start) or, with
        ``expert_ids: null``, the ones the strategy assigns it (refresh after a round)."""
        self._last_request = time.monotonic()
        purpose = body.purpose
        if purpose == "trunk":
            self._send_trunk(dev)
            return
        ids = None if body.expert_ids is None else list(body.expert_ids)
        k = self.cfg.model.num_global_experts
        with self._lock:
            s = self.strategy
            if ids is not None and not all(i < k for i in ids):
                raise ValidationError(f"expert_ids must be integers in 0..{k - 1}")
            ids, params = s.device_payload(dev, ids)
            version = s.version
            # a refresh belongs to the round whose result it fetches (the evaluation follows it)
            label = rnd if purpose == "refresh" and 0 < rnd <= self.round else self.round
            # a re-sent FETCH (its answer was slow, not lost) gets the download already
            # running for it announced again, not a second download of the same bytes
            same = (dev, purpose, label, version, tuple(ids))
        if self._reannounce_fetch(same):
            return
        manifest = self._send_params(dev, params, list(ids), purpose, label)
        self._remember_fetch(same, manifest.transfer_id)
        self._announce(manifest.transfer_id, P.MODEL, {
            "manifest": manifest.to_dict(), "expert_ids": list(ids), "version": version,
            "purpose": purpose}, label)

    def _reannounce_fetch(self, same: tuple[str, str, int, int, tuple[int, ...]]) -> bool:
        """A re-sent FETCH (its answer was slow, not lost) gets the download already running
        for it announced again, not a second download of the same bytes: True when so."""
        with self._lock:
            xid = self._fetch_out.get(same)
            out = self._senders.get(xid) if xid is not None else None
            again = out.announce if out is not None and not out.sender.done else None
        if again is None or xid is None:
            return False
        self._announce(xid, *again)
        return True

    def _remember_fetch(self, same: tuple[str, str, int, int, tuple[int, ...]], xid: str) -> None:
        """The download ``xid`` answers the FETCH ``same`` (see :meth:`_reannounce_fetch`)."""
        with self._lock:
            if len(self._fetch_out) >= FETCH_OUT_MAX:
                self._fetch_out.clear()  # a bound; at worst one more duplicate download
            self._fetch_out[same] = xid

    def _trunk_payload(self) -> tuple[bytes, TransferManifest]:
        """The federation's pretrained trunk file as it is on disk, read once and checked
        against ``model.trunk_sha256`` (a file replaced after start is never served)."""
        m = self.cfg.model
        if not m.trunk_weights:
            raise ValidationError("this federation's model names no pretrained trunk to fetch")
        with self._lock:
            if self._trunk is None:
                try:
                    data = Path(m.trunk_weights).read_bytes()
                except OSError as exc:
                    log.error("model.trunk_weights %s unreadable: %s", m.trunk_weights, exc)
                    raise ConfigError("the coordinator cannot read its trunk file") from None
                digest = hashlib.sha256(data).hexdigest()
                if digest != m.trunk_sha256:
                    log.error("model.trunk_weights %s: sha256 %s... is not model.trunk_sha256 "
                              "%s... (replaced after start?); not served", m.trunk_weights,
                              digest[:12], m.trunk_sha256[:12])
                    raise ConfigError("the coordinator's trunk file is not the federation's")
                self._trunk = (data, TransferManifest.for_payload(
                    data, expert_ids=[], base_version=0, chunk_size=self.fed.chunk_size,
                    window=self.fed.window))
            return self._trunk

    def _send_trunk(self, dev: str) -> None:
        """Ship the pretrained trunk file to a device that lacks it (docs/daemons.md,
        "Pretrained trunk"): the file's bytes, so the manifest's sha256 is ``trunk_sha256``.
        A fetch like any other: rate-limited, and a re-sent one re-announces the running
        download instead of starting a second."""
        data, base = self._trunk_payload()
        same = (dev, "trunk", 0, 0, ())
        if self._reannounce_fetch(same):
            return
        self._count_trunk_fetch(dev)
        manifest = self._send_bytes(dev, data, base, "trunk", self.round)
        xid = manifest.transfer_id
        self._remember_fetch(same, xid)
        log.info("trunk download to %s: %d bytes (sha256 %s...)", dev, len(data), base.sha256[:12])
        self._announce(xid, P.MODEL, {"manifest": manifest.to_dict(), "expert_ids": [],
                                      "version": self.strategy.version, "purpose": "trunk"},
                       self.round)

    def _count_trunk_fetch(self, dev: str) -> None:
        """Allow ``dev`` a new trunk download, at most TRUNK_FETCH_MAX per
        TRUNK_FETCH_WINDOW_S (ValidationError past it: refused with a reason, nothing sent).
        The general fetch rate alone would let one device pull the file every 10 s. The
        downloads are counted in the store (wall clock), so a restart does not reset them."""
        now = time.time()
        with self._lock:
            recent = self.store.trunk_fetches(dev, now - TRUNK_FETCH_WINDOW_S)
            if len(recent) >= TRUNK_FETCH_MAX:
                raise ValidationError(
                    f"trunk downloaded {len(recent)} times in {TRUNK_FETCH_WINDOW_S / 3600:g} h "
                    f"(at most {TRUNK_FETCH_MAX}); refused until the oldest is that old")
            self.store.add_trunk_fetch(dev, now)

    def _on_decline(self, dev: str, rnd: int, body: Decline) -> None:
        """A device that cannot train the federation's task (labels outside the class list,
        data shape != model input) says so: its task this round becomes a failure now, not at
        the deadline, and it is not selected again until it says hello anew (fixed data)."""
        reason = f"device declined: {body.reason[:300]}"
        with self._lock:
            self.online.pop(dev, None)
            owes = (self.round_open and dev in self.tasks and dev not in self.results
                    and dev not in self.engine.persisting)
            if owes:
                self.engine.fail(dev, self.round, reason)
        # one row and line per device and reason per interval (grouped like refusals)
        self.declines.refuse(self.round, dev, reason, per_interval=1)
        self._wake.set()

    def _on_eval(self, dev: str, rnd: int, body: Eval) -> None:
        self._last_request = time.monotonic()
        kind, correct, total = body.kind, body.correct, body.total
        with self._lock:
            closed = self.engine.newest_closed()
            newest = closed if kind == "personal" else self.round
        # a personal accuracy follows a closed round; a cold start is labelled with the round
        # current when it fetched (0 before the first); neither from far in the past
        oldest = max(1 if kind == "personal" else 0, newest - EVAL_ROUNDS_BACK)
        if not oldest <= rnd <= newest:
            raise ValidationError(f"{kind} eval for round {rnd}: only rounds {oldest}..{newest} "
                                  "are taken now (closed, at most "
                                  f"{EVAL_ROUNDS_BACK} back)")
        # stored in the persister's next batch, then answered with the eval_ack the device
        # waits for (it re-sends an unanswered eval); storing is idempotent, so a re-sent
        # eval only repeats this answer
        self._persist_q.put(EvalReport(dev, rnd, kind, correct, total))
        seen = (dev, rnd, kind)
        if seen in self._evals_logged:
            return  # a re-send (its ack was late): answered again, not logged again
        if len(self._evals_logged) >= EVALS_LOGGED_MAX:
            self._evals_logged.clear()  # a bound on memory; at worst a re-send logs twice
        self._evals_logged.add(seen)
        log.info("eval device=%s round=%d kind=%s acc=%.4f (%d/%d)", dev, rnd, kind,
                 correct / total if total else float("nan"), correct, total)

    def _on_xfer_report(self, dev: str, type: str, xid: str, body: dict[str, Any]) -> None:
        """A device's report on one of our downloads (its body checked by XferProgress /
        XferDone; the transfer window checks the ranges against its manifest)."""
        with self._lock:
            out = self._senders.get(xid)
        if out is None or out.device != dev:
            return  # a late report for a finished or dropped transfer: harmless
        if type == XFER_PROGRESS:
            out.started = True
            out.sender.on_progress(body)
        elif out.sender.on_done(body) and not (out.purpose == "train" and out.round == self.round):
            # this round's task transfers stay (a repeated hello re-announces them, not new bytes)
            with self._lock:
                self._senders.pop(xid, None)

    def _sweep_senders(self, finished: list[tuple[str, _Outgoing]], now: float) -> None:
        """The pump's bookkeeping: ``finished`` downloads (started and confirmed, or dropped
        from ``_senders``) leave ``_pumping``; every SENDER_SWEEP_S, downloads past SENDER_MAX_AGE_S are forgotten
        and ``_pumping`` loses the ones no longer in ``_senders`` (dropped when a round
        closed or a device confirmed)."""
        with self._lock:
            for xid, out in finished:
                if self._pumping.get(xid) is out:
                    del self._pumping[xid]
            if now - self._swept_at < SENDER_SWEEP_S:
                return
            self._swept_at = now
            for xid in [x for x, o in self._senders.items() if now - o.created > SENDER_MAX_AGE_S]:
                del self._senders[xid]
            for xid in [x for x, o in self._pumping.items() if self._senders.get(x) is not o]:
                del self._pumping[xid]

    def _out_budget(self) -> int:
        """How many download chunks may be handed to the MQTT client now (``OUT_BACKLOG``)."""
        t = self.transport
        return OUT_BACKLOG - (t.unacked if t is not None else 0)

    def _pump_loop(self) -> None:
        """Drive retransmits of downloads and the chunks the backlog bound held back (in
        turn, starting one further each pass, so no device waits behind the same ones);
        forget transfers nobody finished in 10 minutes. A pass visits only the downloads
        in ``_pumping``: one that started and was confirmed leaves it (its sender is done
        for good, and only a device's report, handled elsewhere, touches it again), and one
        dropped from ``_senders`` leaves it too. Visiting every download of the round 4-20
        times a second made the pump's own CPU grow with the fleet while the work did not
        (docs/benchmarks.md, "Coordinator CPU profile")."""
        turn, tick = 0, 0.25
        while not self._stop.wait(tick):
            with self._lock:
                outs = list(self._pumping.items())
            now = time.monotonic()
            if outs:
                turn = (turn + 1) % len(outs)
                outs = outs[turn:] + outs[:turn]
            room = self._out_budget()
            finished: list[tuple[str, _Outgoing]] = []
            senders = self._senders
            for xid, out in outs:
                try:
                    if senders.get(xid) is not out:  # dropped since the snapshot: never again
                        finished.append((xid, out))
                    elif out.started and not out.sender.done:
                        if room > 0:
                            room -= out.sender.pump()
                    elif out.started or out.sender.done:  # done: e.g. over the shared copy
                        finished.append((xid, out))
                    elif (out.announce is not None
                          and now - out.announced_at > retry_delay(out.announces)):
                        self._announce(xid, *out.announce)
                except FedCoEError as exc:
                    log.warning("download %s to %s: %s", xid, out.device, exc)
            if finished or now - self._swept_at >= SENDER_SWEEP_S:
                self._sweep_senders(finished, now)
            tick = 0.05 if room <= 0 else 0.25  # chunks held back: look again sooner
            version = self.strategy.version
            with self._shared_lock:
                stale = any(v is not None and v != version for _, v in self._shared)
            if stale:  # a round closed (or a new version came): its payloads are superseded
                self._clear_shared(keep_version=version)
            self._expire_uploads()
            if now - self._devices_seen_at >= DEVICES_RELOAD_S:
                self._devices_seen_at = now
                try:
                    self._reload_devices()
                except Exception:  # never let a config re-read end the pump
                    log.exception("reloading allowed_devices failed")
            self.refusals.flush()
            self.declines.flush()
            if now - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = now
                self._prune()
