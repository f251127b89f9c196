"""A shard aggregator: the coordinator's device-facing side, with rounds driven by a leader.

A fleet past one machine runs one leader (coordinator/leader.py) and several shard
aggregators (docs/daemons.md, "Past one machine: leader and shard aggregators"). A shard IS a
:class:`~coordinator.daemon.Coordinator` towards its devices: hellos, tasks as chunked signed
transfers, uploads checked and persisted before their ACK, refusals, cold-start and refresh
fetches, evaluations, its own state folder and restart. Only three steps differ, through the
coordinator's hooks:

* which devices train (``_plan_round``): the tasks the leader sent, not the shard's own
  selection (the leader owns selection and the affinity matrix);
* when a round opens (``_enough_devices``): when the leader's ``shard_open`` for it is here
  and the shard holds the global version that round was configured from;
* how a round is applied (``_before_aggregate`` / ``_aggregate``): the shard sends its
  partial sums to the leader and installs the version the leader publishes, instead of
  aggregating itself.

The shard's devices use the federation id ``{federation}.s{i}of{S}`` (``fedcoe shard-of``
prints it), so each shard has its own topic prefix on the broker.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig, Role, mqtt_identity
from coordinator.daemon import Coordinator
from coordinator.peerlink import PeerLink
from fedcoe_edge import protocol as P
from fedcoe_edge.errors import FedCoEError, ValidationError, WireError
from fedcoe_edge.messages import Hello, ShardModel, ShardOpen, XferDone, XferProgress
from fedcoe_edge.sharding import (
    LEADER_ID,
    PARTIAL,
    SHARD_HELLO,
    SHARD_MODEL,
    SHARD_OPEN,
    LeaderTopics,
    model_extra,
    partial_to_wire,
    shard_federation,
    shard_key,
    shard_name,
    shard_of,
)
from fedcoe_edge.strategies import ClientResult, ClientTask, Failure
from fedcoe_edge.streaming import Partial
from fedcoe_edge.transport import Message, Topics
from fedcoe_edge.transport.blob import XFER_DONE, XFER_PROGRESS
from fedcoe_edge.wire import ReplayCache, decode_tensors, new_msg_id

log = logging.getLogger("fedcoe.shard")

HELLO_EVERY_S = 10.0  # a shard repeats its hello this often (sooner when its devices change,
HELLO_MIN_S = 1.0  # but at most once a second: thousands of devices registering are one hello)
LINK_TICK_S = 0.25
MODEL_WAIT_EXTRA_S = 120.0  # after sending its partial, a shard waits this long past the
# deadline for the leader's next version before closing the round with the state kept


def shard_config(cfg: CoordinatorConfig, index: int, shards: int) -> CoordinatorConfig:
    """The coordinator config of shard ``index``: its devices' federation id and its own
    state folder (``STATE/shard-<i>``), so one config file serves the leader and every shard."""
    out = copy.deepcopy(cfg)
    out.federation.id = shard_federation(cfg.federation.id, index, shards)
    out.federation.state_dir = str(Path(cfg.federation.state_dir) / shard_name(index))
    out.federation.wait_log_s = 1e9  # waiting for devices is the leader's to log
    # the HTTP endpoints serve a single coordinator (docs/daemons.md, "Metrics and
    # dashboard"): S shards on one config would all ask for the same ports
    out.metrics.port = out.dashboard.port = 0
    return out


class ShardAggregator(Coordinator):
    """Shard ``index`` of ``shards``; ``cfg`` is the federation's config (the leader's)."""

    def __init__(self, cfg: CoordinatorConfig, index: int, shards: int,
                 factory: P.TransportFactory | None = None) -> None:
        base = factory if factory is not None else P.mqtt_factory(cfg.broker)
        self.index, self.shards, self.name = index, shards, shard_name(index)

        def own_client_id(cid: str, will: Any, birth: Any) -> Any:
            # every shard's devices address "coordinator"; each shard logs in as itself
            return base(mqtt_identity(cfg.federation, Role.SHARD, index, shards), will, birth)

        super().__init__(shard_config(cfg, index, shards), own_client_id)
        self._leader_refused = P.LogLimiter()  # refused leader messages: a line per minute
        self.leader_topics = LeaderTopics(cfg.federation.id)
        self.link_key = shard_key(cfg.secret, self.name)
        self.link: PeerLink | None = None
        self._open_msg: tuple[int, ShardOpen] | None = None  # (round, the leader's shard_open) not yet used
        self._model_meta: tuple[int, ShardModel] | None = None  # the announced model
        self._model_event = threading.Event()
        self._model_round = -1  # newest round whose settled version is installed
        self._hello_sent: tuple[float, tuple[str, ...], int] = (0.0, (), -1)
        self._session = new_msg_id()  # a new one per process: the leader re-sends its version

    # ------------------------------------------------------------------ link
    def start(self) -> None:
        super().start()
        assert self.transport is not None
        lt = self.leader_topics
        messenger = P.Messenger(self.transport, Topics(self.leader_topics.federation), self.name,
                                lambda s: self.link_key if s == LEADER_ID else None,
                                ReplayCache(per_sender=4096))
        self.link = PeerLink(self.transport, messenger, lambda _p: lt.up_ctl(self.name),
                             lambda _p, x: lt.up_blob(self.name, x),
                             lambda p: self.link_key if p == LEADER_ID else None,
                             self.fed.chunk_size, self.fed.window)
        self.transport.subscribe(lt.dn_ctl(self.name), self._on_leader_ctl)
        self.transport.subscribe(f"{lt.prefix}/dn/{self.name}/blob/+", self._on_leader_blob, bulk=True)
        self.transport.subscribe(lt.leader_status(), self._on_leader_status)
        self._link_thread = threading.Thread(target=self._link_loop, name="shard-link", daemon=True)
        self._link_thread.start()
        log.info("shard %s of %d: devices use federation id %s", self.name, self.shards, self.fed.id)

    def _hello(self, force: bool = False) -> None:
        """Tell the leader who is online here and which version this shard holds."""
        if self.link is None:
            return
        online = tuple(self.available())
        last, seen, version = self._hello_sent
        now = time.monotonic()
        changed = online != seen or version != self.strategy.version
        if not force and now - last < (HELLO_MIN_S if changed else HELLO_EVERY_S):
            return
        self._hello_sent = (now, online, self.strategy.version)
        try:
            self.link.send(LEADER_ID, SHARD_HELLO, {
                "index": self.index, "shards": self.shards, "online": list(online),
                "session": self._session,
                "version": self.strategy.version, "round": self.round,
                "round_open": self.round_open}, self.round)
        except FedCoEError as exc:
            log.warning("hello to the leader: %s", exc)

    def _link_loop(self) -> None:
        while not self._stop.wait(LINK_TICK_S):
            self._hello()
            if self.link is not None:
                self.link.pump()

    def _on_leader_status(self, msg: Message) -> None:
        """The leader's retained presence: say hello at once when it (re)starts."""
        if P.presence_state(msg.payload) == "online":
            self._hello(force=True)

    def _on_leader_ctl(self, msg: Message) -> None:
        assert self.link is not None
        try:
            env = self.link.messenger.open(msg.payload, expect_sender=LEADER_ID)
        except WireError as exc:  # one line per kind of refusal per minute
            self._leader_refused.warning(log, LEADER_ID, P.reason_class(str(exc)),
                                         f"refused leader message on {msg.topic}: {exc}")
            return
        try:
            if env.type == SHARD_OPEN:  # each body typed (fedcoe_edge/messages.py) first
                self._on_open(env.round, ShardOpen.from_wire(env.body))
            elif env.type == SHARD_MODEL:
                model = ShardModel.from_wire(env.body)
                self.link.expect(LEADER_ID, model.manifest)
                with self._lock:
                    self._model_meta = (env.round, model)
            elif env.type in (XFER_PROGRESS, XFER_DONE):
                (XferProgress if env.type == XFER_PROGRESS else XferDone).from_wire(env.body)
                self.link.on_report(LEADER_ID, env.type, env.body)
            else:
                log.warning("leader message of unknown type %r ignored", env.type)
        except (FedCoEError, KeyError, TypeError, ValueError, ArithmeticError) as exc:
            self._leader_refused.warning(log, LEADER_ID, P.reason_class(f"{env.type}: {exc}"),
                                         f"refused leader {env.type} round={env.round}: {exc}")

    def _on_open(self, rnd: int, body: ShardOpen) -> None:
        for t in body.tasks:
            if shard_of(t.d, self.shards) != self.index:
                raise ValidationError(f"task for device {t.d!r:.40} of another shard")
        with self._lock:
            if rnd <= self.round:
                return  # a repeat of a round this shard already ran
            self._open_msg = (rnd, body)
        self._wake.set()

    def _on_leader_blob(self, msg: Message) -> None:
        assert self.link is not None
        try:
            done = self.link.on_chunk(LEADER_ID, msg.payload)
        except WireError as exc:
            self._leader_refused.warning(log, LEADER_ID, P.reason_class(str(exc)),
                                         f"leader blob refused: {exc}")
            return
        if done is None:
            return
        _, data = done
        with self._lock:
            meta = self._model_meta
        if meta is None:
            return
        rnd, body = meta
        try:
            arrays = decode_tensors(data)
            self._install(rnd, body.version, arrays, model_extra(data, body.extra))
        except (FedCoEError, KeyError, TypeError, ValueError) as exc:
            log.error("model from the leader refused (round %d): %s", rnd, exc)

    def _install(self, rnd: int, version: int, arrays: dict[str, Any], extra: dict[str, Any]) -> None:
        """Take the leader's version: state, version and the strategy's server extras
        (the affinity matrix that assigns experts on a refresh fetch)."""
        s = self.strategy
        with self._lock:
            if set(arrays) != set(s.global_state):
                raise ValidationError("model tensor names differ from this shard's model")
            s.global_state = arrays
            s.version = version
            s.restore_extra(extra)
            self._model_round = max(self._model_round, rnd)
            if not self.round_open and rnd >= self.round:
                self._checkpoint(self.round)  # idle shard: durable at once
        log.info("shard %s: version %d from the leader (round %d)", self.name, version, rnd)
        self._model_event.set()
        self._wake.set()

    # ------------------------------------------------------------------ coordinator hooks
    def _enough_devices(self) -> bool:
        with self._lock:
            m = self._open_msg
            if m is None:
                return False
            if m[1].version != self.strategy.version:
                return False  # the leader's model for this round is still on its way
            self.round = m[0] - 1  # a round this shard missed is skipped, not run
            return True

    def _plan_round(self, rnd: int) -> list[ClientTask]:
        """The leader's tasks; each expert set's parameters are the named tensors of the
        global state this shard holds (the same version the leader configured from)."""
        m = self._open_msg
        assert m is not None and m[0] == rnd
        self._open_msg = None
        s = self.strategy
        missing = sorted({k for keys in m[1].keysets for k in keys} - set(s.global_state))
        if missing:  # a leader of another model: no round here (one line, not a traceback)
            log.error("round %d: the leader's tasks name tensor %r this shard's model lacks; "
                      "no task sent", rnd, missing[0])
            return []
        shared = [{k: s.global_state[k] for k in keys} for keys in m[1].keysets]
        return [ClientTask(t.d, rnd, shared[t.k], list(t.e), dict(t.c)) for t in m[1].tasks]

    def _before_aggregate(self) -> None:
        """Send this round's partial to the leader, then wait for the version it publishes."""
        with self._lock:
            rnd = self.round
            partial = self._partial if self._partial is not None else self.strategy.new_partial(rnd)
            failures = {d: self.failed.get(d, "deadline passed with no accepted update")
                        for d in self.tasks if d not in self.results}
            self._model_event.clear()
            settled = self._model_round >= rnd
        if not settled:
            self._send_partial(rnd, partial, failures)
        end = time.monotonic() + self.fed.deadline_s + MODEL_WAIT_EXTRA_S
        while not self._stop.is_set() and time.monotonic() < end:
            with self._lock:
                if self._model_round >= rnd:
                    return
            self._model_event.wait(0.5)
            self._model_event.clear()

    def _send_partial(self, rnd: int, partial: Partial, failures: dict[str, str]) -> None:
        """The round's partial sums (a chunked transfer) and the failures of its devices."""
        data, meta = partial_to_wire(partial)
        assert self.link is not None
        try:
            self.link.send_blob(LEADER_ID, PARTIAL, {"meta": meta, "failures": failures}, data, rnd)
            log.info("round %d: partial of %d update(s) sent to the leader (%d bytes)", rnd,
                     len(partial.clients), len(data))
        except FedCoEError as exc:
            log.error("round %d: partial not sent: %s", rnd, exc)

    def _aggregate(self, rnd: int, results: list[ClientResult], failures: list[Failure]
                   ) -> tuple[bool, str]:
        if self._model_round >= rnd:
            return True, (f"partial of {len(results)} update(s), {len(failures)} failure(s) sent; "
                          f"leader published version {self.strategy.version}")
        return False, "no version from the leader before the wait ran out; state kept"

    def _on_hello(self, dev: str, body: Hello) -> None:
        """A device of another shard is refused with the shard it belongs to (it was given
        the wrong federation id), instead of being served by two shards."""
        owner = shard_of(dev, self.shards)
        if owner != self.index:
            raise ValidationError(
                f"device belongs to shard {owner}: set its federation id to "
                f"{shard_federation(self.leader_topics.federation, owner, self.shards)}")
        super()._on_hello(dev, body)  # the link loop tells the leader within HELLO_MIN_S
