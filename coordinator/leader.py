"""The leader of sharded aggregation: selection, the strategy's server state and the version.

A fleet past one machine runs shard aggregators (coordinator/shard.py) that serve devices,
and this one small process that speaks to shards only (docs/daemons.md, "Past one machine:
leader and shard aggregators"). Per round it:

1. selects clients from the devices the shards report online (``select_clients``) and
   configures their tasks (``configure_round``), as a single coordinator does;
2. sends each shard a ``shard_open`` with its devices' tasks (expert ids and the names of
   the tensors each expert set carries; the shard takes the values from the global state
   it holds, which is the version the round was configured from);
3. collects one signed partial per shard (``partial``: the weighted sums and weights of its
   accepted updates plus its failures), each checked (:func:`fedcoe_edge.sharding.check_partial`)
   or refused with a log line ``rejected shard=.. round=.. reason=..`` and an event row;
4. at the deadline (plus a grace for the shards' own closes) or once every shard answered,
   merges the partials with the strategy's merge step (``Strategy.merge``), passes the
   clients of missing or refused shards to the strategy as failures, aggregates
   (``Strategy.finalize``) and checkpoints;
5. publishes the new version (``shard_model``: global state plus ``checkpoint_extra``) to
   every shard, which installs it and tells its devices the round closed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig, Role, mqtt_identity
from coordinator.daemon import EVENT_RETENTION, write_checkpoint
from coordinator.limits import RefusalLog
from coordinator.peerlink import PeerLink
from coordinator.store import Store
from fedcoe_edge import protocol as P
from fedcoe_edge.checkpoint import load_arrays_file
from fedcoe_edge.errors import ConfigError, DataError, FedCoEError, ValidationError, WireError
from fedcoe_edge.io import atomic_write_text
from fedcoe_edge.messages import PartialAnnounce, ShardHello, XferDone, XferProgress
from fedcoe_edge.sharding import (
    LEADER_ID,
    MODEL_EXTRA,
    PARTIAL,
    SHARD_HELLO,
    SHARD_MODEL,
    SHARD_OPEN,
    LeaderTopics,
    PartialInbox,
    check_partial,
    partial_from_wire,
    shard_index,
    shard_key,
    shard_name,
    shard_of,
)
from fedcoe_edge.strategies import Failure, Strategy, make_strategy
from fedcoe_edge.transport import Message, Topics, Transport, Will
from fedcoe_edge.transport.blob import XFER_DONE, XFER_PROGRESS
from fedcoe_edge.wire import ReplayCache, UnauthenticatedError, encode_tensors

log = logging.getLogger("fedcoe.leader")

CLOSE_GRACE_S = 30.0  # past the round deadline: the shards' own closes and partial uploads
TICK_S = 0.25


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (reported per round)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class _ShardView:
    online: list[str] = field(default_factory=list)
    version: int = -1
    session: str = ""  # the shard process's id: a new one means it restarted
    model_sent: int = -1  # version last sent to it


class Leader:
    """The leader for ``shards`` shard aggregators of the federation in ``cfg``."""

    def __init__(self, cfg: CoordinatorConfig, shards: int,
                 factory: P.TransportFactory | None = None) -> None:
        self.cfg, self.fed, self.shards = cfg, cfg.federation, shards
        self.strategy: Strategy = make_strategy(self.fed.algorithm, cfg.model, cfg.train, self.fed.seed)
        self.state_dir = Path(self.fed.state_dir) / LEADER_ID
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.state_dir / "coordinator.sqlite")
        # refusals grouped per shard and reason (a forged or broken peer costs a row and a
        # line per interval, docs/protocol.md "Bounds")
        self.refusals = RefusalLog(self.store, log, retention=EVENT_RETENTION, who="shard")
        self.topics = LeaderTopics(self.fed.id)
        self._factory = factory if factory is not None else P.mqtt_factory(cfg.broker)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.views: dict[str, _ShardView] = {}
        self.round = 0
        self.inbox: PartialInbox | None = None
        self._partial_meta: dict[tuple[str, str], tuple[int, PartialAnnounce]] = {}
        self._model_xfers: dict[str, str] = {}  # shard -> its newest model transfer
        self._opens: dict[str, dict[str, Any]] = {}  # shard -> the open round's shard_open body
        self.transport: Transport | None = None
        self.link: PeerLink | None = None
        self.finished = False
        self.rounds_log: list[dict[str, Any]] = []
        self.close_grace_s = CLOSE_GRACE_S

    # ------------------------------------------------------------------ keys, lifecycle
    def key_for(self, sender: str) -> bytes | None:
        """The shard's key; None for a name that is no shard of this layout."""
        return shard_key(self.cfg.secret, sender) if shard_index(sender, self.shards) is not None else None

    def start(self) -> None:
        self._resume()
        will = Will(self.topics.leader_status(), P.presence_payload("offline"), 1, True)
        birth = Will(self.topics.leader_status(), P.presence_payload("online"), 1, True)
        self.transport = self._factory(mqtt_identity(self.fed, Role.LEADER), will, birth)
        messenger = P.Messenger(self.transport, Topics(self.fed.id), LEADER_ID, self.key_for,
                                ReplayCache(per_sender=4096))
        self.link = PeerLink(self.transport, messenger, self.topics.dn_ctl, self.topics.dn_blob,
                             self.key_for, self.fed.chunk_size, self.fed.window)
        self.transport.subscribe(f"{self.topics.prefix}/up/+/ctl", self._on_ctl)
        self.transport.subscribe(f"{self.topics.prefix}/up/+/blob/+", self._on_blob, bulk=True)
        self.transport.connect()
        log.info("leader of %d shard(s) for federation %s: round %d, version %d", self.shards,
                 self.fed.id, self.round, self.strategy.version)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(FedCoEError):
                self.transport.publish(self.topics.leader_status(), P.presence_payload("offline"),
                                       qos=1, retain=True)
            self.transport.close()
            self.transport = None
        self.refusals.flush(force=True)
        self.store.close()

    def _sleep(self, s: float) -> None:
        if self.link is not None:
            self.link.pump()
        self.refusals.flush()
        self._wake.wait(s)
        self._wake.clear()

    def run(self) -> int:
        """Every round, then (``exit_when_done``) exit once every shard has the last version."""
        self.start()
        try:
            said = time.monotonic()
            while not self._stop.is_set() and self.round < self.fed.rounds:
                if self._enough_devices():
                    self._run_round()
                    said = time.monotonic()
                else:
                    if time.monotonic() - said >= self.fed.wait_log_s:
                        said = time.monotonic()
                        log.warning("round %d waits for devices: %d online at %d of %d shard(s)",
                                    self.round + 1, len(self.available()), len(self.views), self.shards)
                    self._sleep(TICK_S)
            self.finished = self.round >= self.fed.rounds
            if self.finished:
                log.info("all %d rounds done; version %d", self.fed.rounds, self.strategy.version)
            while not self._stop.is_set():
                if self.fed.exit_when_done and self._models_delivered():
                    break
                self._sleep(TICK_S)
        finally:
            self.close()
        return 0

    # ------------------------------------------------------------------ shards
    def available(self) -> list[str]:
        """Devices online at the shards, each counted at the shard that owns it."""
        with self._lock:
            return sorted({d for name, v in self.views.items() for d in v.online
                           if shard_name(shard_of(d, self.shards)) == name})

    def _enough_devices(self) -> bool:
        need = self.fed.min_devices if self.round == 0 else self.fed.quorum
        return len(self.available()) >= need

    def _models_delivered(self) -> bool:
        assert self.link is not None
        with self._lock:
            xids = list(self._model_xfers.values())
        return all(self.link.done(x) for x in xids)

    def refuse(self, shard: str, rnd: int, reason: str) -> None:
        """One line naming shard, round and reason, and a ``rejected`` event row, counted in
        the leader's round log as a device's refusal is in a coordinator's."""
        self.refusals.refuse(rnd, shard, reason[:500])

    def _on_ctl(self, msg: Message) -> None:
        assert self.link is not None
        try:
            _, shard, _ = self.topics.parse(msg.topic)
            env = self.link.messenger.open(msg.payload, expect_sender=shard)
        except WireError as exc:
            shard = msg.topic.split("/")[-2] if msg.topic.count("/") >= 2 else "?"
            if isinstance(exc, UnauthenticatedError):  # never parsed: one line per interval
                self.refusals.refuse(self.round, shard[:40], f"envelope: {exc}",
                                     cls="unauthenticated", per_interval=1)
            else:
                self.refuse(shard[:40], self.round, f"envelope: {exc}")
            return
        try:  # each body typed (fedcoe_edge/messages.py) before it is read
            if env.type == SHARD_HELLO:
                self._on_hello(shard, ShardHello.from_wire(env.body))
            elif env.type == PARTIAL:
                self._on_partial_announce(shard, env.round, PartialAnnounce.from_wire(env.body))
            elif env.type in (XFER_PROGRESS, XFER_DONE):
                (XferProgress if env.type == XFER_PROGRESS else XferDone).from_wire(env.body)
                self.link.on_report(shard, env.type, env.body)
            else:
                self.refuse(shard, env.round, f"unknown message type {env.type!r:.40}")
        except (FedCoEError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
            self.refuse(shard, env.round, f"{env.type}: {exc}")

    def _on_hello(self, shard: str, body: ShardHello) -> None:
        online = body.online
        if body.shards != self.shards:
            raise ValidationError(f"shard runs with shards={body.shards!r}, the leader with {self.shards}")
        with self._lock:
            v = self.views.setdefault(shard, _ShardView())
            session = body.session
            first = v.session != session  # a shard (re)started: it gets the current version
            v.online, v.version, v.session = list(online), body.version, session
            stale = v.version != self.strategy.version and v.model_sent != self.strategy.version
        if first:
            log.info("shard %s up: %d device(s) online, version %d", shard, len(online), v.version)
        if first or stale:
            self._send_model(shard, self.round)
        self._resend_open(shard, body.round)
        self._wake.set()

    def _resend_open(self, shard: str, shard_round: int) -> None:
        """A shard behind the open round, with no partial in yet, lost its ``shard_open``
        (a broker restart can lose a QoS 1 message) or restarted: send it again."""
        with self._lock:
            inbox = self.inbox
            body = self._opens.get(shard)
            behind = (inbox is not None and body is not None and shard_round < inbox.round
                      and shard not in inbox.received)
        if behind and inbox is not None and body is not None and self.link is not None:
            self.link.send(shard, SHARD_OPEN, body, inbox.round)

    def _send_model(self, shard: str, rnd: int) -> None:
        """The global state and the strategy's server extras, as one chunked transfer. The
        extras (FedCoE's affinity matrix: one row per client, so it grows with the fleet)
        travel inside the transfer, as its ``extra`` metadata string, not in the signed
        envelope, whose 1 MiB limit they passed at about 10,000 devices; the transfer's bytes
        are bound to the envelope by its manifest's sha256 (docs/daemons.md, "Past one
        machine: leader and shard aggregators")."""
        assert self.link is not None
        with self._lock:
            s = self.strategy
            data = encode_tensors(s.global_state,
                                  metadata={MODEL_EXTRA: json.dumps(s.checkpoint_extra(),
                                                                    separators=(",", ":"))})
            body = {"version": s.version, "extra": {}}
            v = self.views.setdefault(shard, _ShardView())
            v.model_sent = s.version
        xid = self.link.send_blob(shard, SHARD_MODEL, body, data, rnd)
        with self._lock:
            self._model_xfers[shard] = xid

    def _on_partial_announce(self, shard: str, rnd: int, body: PartialAnnounce) -> None:
        manifest = body.manifest
        with self._lock:
            inbox = self.inbox
            reason = (inbox.refusal(shard, rnd) if inbox is not None
                      else f"partial for round {rnd} while no round is open (late)")
            if reason is None and manifest.total_bytes > self._partial_limit():
                reason = f"partial of {manifest.total_bytes} bytes exceeds {self._partial_limit()}"
            if reason is None:
                self._partial_meta[(shard, manifest.transfer_id)] = (rnd, body)
        if reason is not None:
            self.refuse(shard, rnd, reason)
            return
        assert self.link is not None
        self.link.expect(shard, manifest)

    def _partial_limit(self) -> int:
        """At most three float64 copies of the model (dense + two expert sums) plus room."""
        n = sum(int(v.size) for v in self.strategy.global_state.values())
        return 3 * 8 * n + 8 * 2**20

    def _on_blob(self, msg: Message) -> None:
        assert self.link is not None
        try:
            _, shard, xid = self.topics.parse(msg.topic)
            if self.key_for(shard) is None:
                raise WireError(f"chunk from unknown shard {shard!r:.40}")
            with self._lock:
                meta = self._partial_meta.get((shard, xid or ""))
            if meta is None:
                return  # a late chunk of a finished or refused transfer
            done = self.link.on_chunk(shard, msg.payload)
        except WireError as exc:
            self.refuse(msg.topic.split("/")[-3][:40], self.round, f"blob: {exc}")
            return
        if done is None:
            return
        rnd, body = meta
        with self._lock:
            self._partial_meta.pop((shard, xid or ""), None)
        self._take_partial(shard, rnd, body, done[1])

    def _take_partial(self, shard: str, rnd: int, body: PartialAnnounce, data: bytes) -> None:
        """Check a complete partial and file it in the round's inbox, or refuse it."""
        with self._lock:
            inbox = self.inbox
            reason = inbox.refusal(shard, rnd) if inbox is not None else "no round is open (late)"
        if inbox is None or reason is not None:
            self.refuse(shard, rnd, reason or "late")
            return
        try:
            failures = body.failures
            partial = partial_from_wire(data, body.meta)
            template = self.strategy.new_partial(rnd)
            check_partial(partial, rnd=rnd, allowed=inbox.expected[shard], template=template,
                          state=self.strategy.global_state)
        except ValidationError as exc:
            self.refuse(shard, rnd, str(exc))
            return
        with self._lock:
            if inbox.refusal(shard, rnd) is not None:  # a duplicate raced in
                self.refuse(shard, rnd, inbox.refusal(shard, rnd) or "duplicate")
                return
            inbox.accept(shard, partial, {str(k): str(v) for k, v in failures.items()})
        log.info("partial shard=%s round=%d: %d update(s), %d failure(s)", shard, rnd,
                 len(partial.clients), len(failures))
        self._wake.set()

    # ------------------------------------------------------------------ rounds
    def _run_round(self) -> None:
        rnd = self.round + 1
        cpu0, t0 = cpu_seconds(), time.monotonic()
        s = self.strategy
        with self._lock:
            ids = s.select_clients(rnd, self.available())
            tasks = s.configure_round(rnd, ids)
            version = s.version
            keysets: list[list[str]] = []
            index: dict[tuple[str, ...], int] = {}
            per_shard: dict[str, list[dict[str, Any]]] = {shard_name(i): [] for i in range(self.shards)}
            for t in tasks:
                for k, v in t.params.items():
                    if k not in s.global_state or v is not s.global_state[k] and not (
                            v.shape == s.global_state[k].shape and (v == s.global_state[k]).all()):
                        raise ConfigError(f"{self.fed.algorithm}: a task carries tensor {k!r} that is not "
                                          "the global state's; it cannot run with shards")
                names = tuple(sorted(t.params))
                if names not in index:
                    index[names] = len(keysets)
                    keysets.append(list(names))
                conf = {k: v for k, v in t.config.items() if isinstance(v, int | float | str)}
                per_shard[shard_name(shard_of(t.client_id, self.shards))].append(
                    {"d": t.client_id, "e": [int(i) for i in t.expert_ids], "k": index[names], "c": conf})
            self.inbox = PartialInbox(rnd, {n: [t["d"] for t in ts] for n, ts in per_shard.items()})
            self.round = rnd
            self.store.open_round(rnd, sorted(ids), {t.client_id: list(t.expert_ids) for t in tasks},
                                  time.time() + self.fed.deadline_s, version, 0)
        log.info("round %d open: %d device(s) selected over %d shard(s)", rnd, len(ids), self.shards)
        assert self.link is not None
        for name, ts in per_shard.items():
            body = {"version": version, "deadline_s": self.fed.deadline_s, "tasks": ts,
                    "keysets": keysets}
            with self._lock:
                self._opens[name] = body
            try:
                self.link.send(name, SHARD_OPEN, body, rnd)
            except FedCoEError as exc:
                log.error("round %d: shard_open to %s failed: %s", rnd, name, exc)
        end = time.monotonic() + self.fed.deadline_s + self.close_grace_s
        while not self._stop.is_set() and time.monotonic() < end:
            with self._lock:
                if self.inbox.complete:
                    break
            self._sleep(TICK_S)
        if self._stop.is_set():
            return
        self._close_round(rnd, cpu0, t0)

    def _close_round(self, rnd: int, cpu0: float, t0: float) -> None:
        s = self.strategy
        with self._lock:
            inbox = self.inbox
            assert inbox is not None
            self.inbox = None  # from here on, a partial for rnd is late
            self._opens = {}
            self._partial_meta = {k: v for k, v in self._partial_meta.items() if v[0] > rnd}
            for shard in inbox.missing():
                self.refuse(shard, rnd, "no valid partial by the deadline; its devices count as failures")
            merged = s.merge(rnd, [inbox.received[n] for n in sorted(inbox.received)])
            failures = [Failure(c, rnd, r) for c, r in sorted(inbox.round_failures(merged.clients).items())]
            before = s.version
            applied = len(merged.clients) >= self.fed.quorum
            agg_cpu0 = cpu_seconds()
            if applied:
                s.finalize(rnd, merged, failures)
                note = (f"merged {len(inbox.received)} of {self.shards} shard partial(s): "
                        f"{len(merged.clients)} update(s), {len(failures)} failure(s)")
            else:
                s.finalize(rnd, s.new_partial(rnd), failures)
                note = f"quorum not met ({len(merged.clients)} < {self.fed.quorum}); global state kept"
            agg_cpu = cpu_seconds() - agg_cpu0
            self._checkpoint(rnd)
            self.store.close_round(rnd, s.version, applied, note)
            for f in failures:
                self.store.add_event(rnd, f.client_id, "failure", f.reason)
        row = {"round": rnd, "selected": sum(len(v) for v in inbox.expected.values()),
               "accepted": len(merged.clients), "failed": len(failures),
               "shards_merged": len(inbox.received), "version": s.version, "applied": applied,
               "merge_aggregate_cpu_s": round(agg_cpu, 4)}
        for name in sorted(self.views):
            self._send_model(name, rnd)
        row["leader_cpu_s"] = round(cpu_seconds() - cpu0, 4)
        row["wall_s"] = round(time.monotonic() - t0, 3)
        self.rounds_log.append(row)
        atomic_write_text(self.state_dir / "rounds.json", json.dumps(self.rounds_log, indent=1) + "\n")
        log.info("round %d closed: %s; version %d -> %d", rnd, note, before, s.version)

    # ------------------------------------------------------------------ persistence
    def _checkpoint(self, rnd: int) -> None:
        write_checkpoint(self.state_dir / "checkpoint", self.strategy, self.fed, rnd,
                         shards=self.shards)

    def _resume(self) -> None:
        """A restarted leader continues after its last closed round (an open one is rerun:
        the shards' partials of it are gone with the old process)."""
        s = self.strategy
        meta_path = self.state_dir / "checkpoint" / "model.json"
        if not meta_path.is_file():
            s.initialize()
            return
        try:
            meta = json.loads(meta_path.read_text())
            path = meta_path.parent / meta["global_file"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != meta["global_sha256"]:
                raise DataError(f"{path}: sha256 does not match model.json")
            s.global_state = load_arrays_file(path)
            s.version, self.round = int(meta["version"]), int(meta["round"])
            s.rng.bit_generator.state = meta["rng"]
            s.restore_extra(meta)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise DataError(f"corrupt leader checkpoint {meta_path}: {exc}") from None
        log.info("leader resumed: round %d, version %d", self.round, s.version)
