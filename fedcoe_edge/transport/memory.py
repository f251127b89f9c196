"""In-memory broker and transport: the MQTT semantics the daemons rely on, in one process.

Used by tests and by the in-process simulator (docs/design.md section 2: what is measured in
simulation is what is deployed). It reproduces the parts of MQTT v5 that shape the
FedCoE edge protocol (arXiv 2605.21264 exchanges expert subsets over MQTT):
topic filters with ``+`` and ``#``, retained messages with expiry, persistent sessions
that queue QoS 1 messages while a client is away (and drop beyond ``max_queued``, like
Mosquitto), wills on unclean disconnects, a MaximumPacketSize, and a fault hook that can
drop or duplicate messages so flow control and idempotency can be tested.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fedcoe_edge.errors import ConfigError, WireError
from fedcoe_edge.transport.base import (
    MQTT_MAX_PACKET_SIZE,
    Dispatcher,
    Handler,
    Message,
    Transport,
    Will,
    check_filter,
    check_topic,
    topic_matches,
)

__all__ = ["MemoryBroker", "MemoryTransport"]

FaultHook = Callable[[str, Message], int]
"""``fault(client_id, message) -> copies``: 0 drops the delivery, 2 duplicates it."""


@dataclass
class _Session:
    subs: dict[str, int] = field(default_factory=dict)
    transport: MemoryTransport | None = None
    offline: deque[tuple[Message, float | None]] = field(default_factory=deque)


@dataclass
class BrokerStats:
    """Counters for tests and the simulator's byte accounting."""

    published: int = 0
    delivered: int = 0
    dropped: int = 0
    bytes_published: int = 0


class MemoryBroker:
    """A broker living in this process. Thread-safe; create transports with :meth:`client`.

    ``threaded=True`` gives each transport a worker thread (like paho); with ``False``
    nothing is delivered until :meth:`pump` runs, which makes simulations deterministic.
    """

    def __init__(
        self,
        *,
        max_packet_size: int = MQTT_MAX_PACKET_SIZE,
        max_queued: int = 1000,
        threaded: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_packet_size = max_packet_size
        self.max_queued = max_queued
        self.threaded = threaded
        self.stats = BrokerStats()
        self.fault: FaultHook | None = None
        self._clock = clock
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._retained: dict[str, tuple[Message, float | None]] = {}
        self._transports: list[MemoryTransport] = []

    def client(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        birth: Will | None = None,
        clean_start: bool = False,
    ) -> MemoryTransport:
        """A new (unconnected) transport for ``client_id``."""
        t = MemoryTransport(self, client_id, will=will, birth=birth, clean_start=clean_start)
        with self._lock:
            self._transports.append(t)
        return t

    def pump(self, max_rounds: int = 1_000_000) -> int:
        """Non-threaded mode: deliver until every queue is empty; returns messages handled."""
        total = 0
        for _ in range(max_rounds):
            with self._lock:
                transports = list(self._transports)
            n = sum(t._dispatcher.drain() for t in transports)
            total += n
            if n == 0:
                return total
        raise RuntimeError(f"MemoryBroker.pump: still busy after {max_rounds} rounds (a loop?)")

    def retained(self, topic: str) -> bytes | None:
        """The retained payload on ``topic`` (None when absent or expired)."""
        with self._lock:
            item = self._retained.get(topic)
            if item is None or self._expired(item[1]):
                return None
            return item[0].payload

    def session_exists(self, client_id: str) -> bool:
        """Whether the broker holds a session (connected or persisted) for ``client_id``."""
        with self._lock:
            return client_id in self._sessions

    # --- internals called by MemoryTransport ---

    def _expired(self, deadline: float | None) -> bool:
        return deadline is not None and self._clock() > deadline

    def _connect(self, t: MemoryTransport, clean_start: bool) -> bool:
        with self._lock:
            old = self._sessions.get(t.client_id)
            if old is not None and old.transport is not None and old.transport is not t:
                old.transport._taken_over()  # MQTT: a second connection kicks the first
            present = old is not None and not clean_start
            sess = old if present and old is not None else _Session()
            sess.transport = t
            self._sessions[t.client_id] = sess
            backlog = list(sess.offline)
            sess.offline.clear()
        for msg, deadline in backlog:
            if not self._expired(deadline):
                self._deliver(t, msg)
        return present

    def _subscribe(self, t: MemoryTransport, topic_filter: str, qos: int) -> None:
        with self._lock:
            sess = self._sessions[t.client_id]
            sess.subs[topic_filter] = qos
            retained = [
                m
                for topic, (m, deadline) in self._retained.items()
                if topic_matches(topic_filter, topic) and not self._expired(deadline)
            ]
        for m in retained:
            self._deliver(t, Message(m.topic, m.payload, min(m.qos, qos), retain=True))

    def _unsubscribe(self, t: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            sess = self._sessions.get(t.client_id)
            if sess is not None:
                sess.subs.pop(topic_filter, None)

    def _publish(self, msg: Message, expiry_s: int | None) -> None:
        deadline = None if expiry_s is None else self._clock() + expiry_s
        targets: list[tuple[MemoryTransport | None, _Session, Message]] = []
        with self._lock:
            self.stats.published += 1
            self.stats.bytes_published += len(msg.payload)
            if msg.retain:
                if msg.payload:
                    self._retained[msg.topic] = (msg, deadline)
                else:
                    self._retained.pop(msg.topic, None)
            for sess in self._sessions.values():
                qos = [q for f, q in sess.subs.items() if topic_matches(f, msg.topic)]
                if not qos:
                    continue
                out = Message(msg.topic, msg.payload, min(msg.qos, max(qos)), retain=False)
                targets.append((sess.transport, sess, out))
            for transport, sess, out in targets:
                if transport is None:
                    if out.qos == 0:
                        continue
                    if len(sess.offline) >= self.max_queued:
                        self.stats.dropped += 1  # Mosquitto drops silently too
                        continue
                    sess.offline.append((out, deadline))
        for transport, _, out in targets:
            if transport is not None:
                self._deliver(transport, out)

    def _deliver(self, t: MemoryTransport, msg: Message) -> None:
        copies = 1 if self.fault is None else self.fault(t.client_id, msg)
        with self._lock:
            if copies <= 0:
                self.stats.dropped += 1
            self.stats.delivered += max(copies, 0)
        for _ in range(max(copies, 0)):
            t._dispatcher.put(msg)

    def _disconnect(self, t: MemoryTransport, clean: bool) -> None:
        with self._lock:
            sess = self._sessions.get(t.client_id)
            if sess is None or sess.transport is not t:
                return
            sess.transport = None
            if t._clean_start:
                del self._sessions[t.client_id]
        if not clean and t.will is not None:
            w = t.will
            self._publish(Message(w.topic, w.payload, w.qos, w.retain), None)

    def _forget(self, t: MemoryTransport) -> None:
        with self._lock:
            if t in self._transports:
                self._transports.remove(t)


class MemoryTransport(Transport):
    """A client of :class:`MemoryBroker` with the same contract as the MQTT transport."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        will: Will | None = None,
        birth: Will | None = None,
        clean_start: bool = False,
    ) -> None:
        if not client_id or "/" in client_id:
            raise ConfigError(f"memory transport: bad client id {client_id!r}")
        self.client_id = client_id
        self.will = will
        self.birth = birth
        self._broker = broker
        self._clean_start = clean_start
        self._connected = False
        self._dispatcher = Dispatcher(f"memory-{client_id}", threaded=broker.threaded)
        self._sub_qos: dict[str, int] = {}
        self._outbox: list[tuple[Message, int | None]] = []
        self._state_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_packet_size(self) -> int:
        return self._broker.max_packet_size

    def connect(self, timeout: float = 10.0) -> None:
        if self._connected:
            return
        self._broker._connect(self, self._clean_start)
        for f, q in self._sub_qos.items():
            self._broker._subscribe(self, f, q)
        with self._state_lock:
            self._connected = True
            outbox, self._outbox = self._outbox, []
        if self.birth is not None:
            b = self.birth
            self.publish(b.topic, b.payload, b.qos, b.retain)
        for msg, expiry_s in outbox:
            self._broker._publish(msg, expiry_s)
        self._dispatcher.put_connection(True)

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, bulk: bool = False
    ) -> None:
        check_filter(topic_filter)
        self._dispatcher.add(topic_filter, handler, bulk=bulk)
        self._sub_qos[topic_filter] = qos
        if self._connected:
            self._broker._subscribe(self, topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self._dispatcher.remove(topic_filter)
        self._sub_qos.pop(topic_filter, None)
        if self._connected:
            self._broker._unsubscribe(self, topic_filter)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        check_topic(topic)
        if qos not in (0, 1, 2):
            raise WireError(f"publish to {topic!r}: qos must be 0, 1 or 2, got {qos}")
        self.check_size(topic, len(payload), qos, expiry_s is not None)
        msg = Message(topic, bytes(payload), qos, retain)
        with self._state_lock:
            if not self._connected:
                if qos > 0:  # like paho: QoS 1 waits for the next connection, QoS 0 is lost
                    self._outbox.append((msg, expiry_s))
                return
        self._broker._publish(msg, expiry_s)

    def close(self) -> None:
        """Clean disconnect: no will."""
        if self._connected:
            self._connected = False
            self._broker._disconnect(self, clean=True)
        self._broker._forget(self)
        self._dispatcher.stop()

    def kill(self) -> None:
        """Vanish without DISCONNECT (power loss): the broker publishes the will and keeps
        the session, queueing QoS 1 messages until the client connects again."""
        if self._connected:
            self._connected = False
            self._broker._disconnect(self, clean=False)
            self._dispatcher.put_connection(False)

    def _taken_over(self) -> None:
        self._connected = False
        self._dispatcher.put_connection(False)

    def add_connection_listener(self, fn: Callable[[bool], None]) -> None:
        self._dispatcher.add_listener(fn)

    def is_handler_thread(self) -> bool:
        return self._dispatcher.is_worker()

    def drain(self) -> int:
        """Non-threaded mode: handle this transport's queue now."""
        return self._dispatcher.drain()
