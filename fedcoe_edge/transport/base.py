"""The transport interface the daemons program against (docs/design.md, section 8).

FedCoE (arXiv 2605.21264) moves expert subsets between a coordinator and devices; the
algorithm never knows how. A :class:`Transport` is a small publish/subscribe contract
modelled on MQTT v5 so that the in-memory implementation (tests, simulator) and the
paho-mqtt implementation behave alike:

* handlers run on one worker thread per transport, never on the network thread, so a
  handler may publish, subscribe or wait without deadlocking the client;
* a subscription may be marked ``bulk`` (chunk streams): its messages wait while any
  other message is queued, so a backlog of chunks never delays a control message (a
  transfer's progress report, an ACK) behind it -- the lag a sender reads as loss;
* delivery is at-least-once for QoS 1: handlers must be idempotent;
* a will message (set before connect) is published by the broker if the client vanishes,
  and an optional birth message is published on every (re)connect;
* publishes larger than the broker's MaximumPacketSize are refused locally.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedcoe_edge.errors import WireError

__all__ = [
    "MQTT_MAX_PACKET_SIZE",
    "Message",
    "Handler",
    "Will",
    "Transport",
    "topic_matches",
    "check_topic",
    "check_filter",
    "publish_packet_size",
]

log = logging.getLogger("fedcoe_edge.transport")

MQTT_MAX_PACKET_SIZE = 268_435_455 + 5  # largest remaining length + fixed header


@dataclass(frozen=True)
class Message:
    """A received (or retained) application message."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


Handler = Callable[[Message], None]


@dataclass(frozen=True)
class Will:
    """A message the broker publishes for us: on an unclean disconnect (will) or that the
    transport publishes itself on every connect (birth). Presence topics use both."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def check_topic(topic: str) -> None:
    """Raise :class:`WireError` unless ``topic`` is a valid publish topic (no wildcards)."""
    if not isinstance(topic, str) or not topic:
        raise WireError(f"topic must be a non-empty string, got {topic!r}")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise WireError(f"topic {topic!r}: wildcards and NUL are not allowed when publishing")
    if len(topic.encode("utf-8")) > 65535:
        raise WireError(f"topic {topic[:40]!r}...: longer than 65535 bytes")


def check_filter(topic_filter: str) -> None:
    """Raise :class:`WireError` unless ``topic_filter`` follows MQTT wildcard rules."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise WireError(f"topic filter must be a non-empty string, got {topic_filter!r}")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise WireError(f"topic filter {topic_filter!r}: '#' must be a whole, last level")
        if "+" in level and level != "+":
            raise WireError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: ``+`` one level, ``#`` the rest (including the parent level);
    wildcards at the first level never match topics starting with ``$``."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload_len: int, qos: int, expiry: bool = False) -> int:
    """Exact size of an MQTT v5 PUBLISH packet as this package sends it."""
    props = 5 if expiry else 0  # MessageExpiryInterval: 1 id byte + 4-byte integer
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0)
    remaining += _varint_len(props) + props + payload_len
    return 1 + _varint_len(remaining) + remaining


class Dispatcher:
    """Routes received messages to handlers on one worker thread (or on demand).

    Network callbacks only call :meth:`put`, which never blocks. With ``threaded=False``
    nothing runs until :meth:`drain` is called: the deterministic mode the simulator uses.
    Two lanes, one thread: messages on ``bulk`` filters are handled only when no other
    message waits; order within each lane is kept.
    """

    def __init__(self, name: str, threaded: bool = True) -> None:
        self._subs: dict[str, list[Handler]] = {}
        self._bulk: set[str] = set()
        self._listeners: list[Callable[[bool], None]] = []
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._bulk_queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._items = threading.Semaphore(0)  # items in both lanes, for the worker to wait on
        self._thread: threading.Thread | None = None
        self._name = name
        if threaded:
            self._thread = threading.Thread(target=self._run, name=f"fedcoe-{name}", daemon=True)
            self._thread.start()

    def add(self, topic_filter: str, handler: Handler, bulk: bool = False) -> None:
        with self._lock:
            self._subs.setdefault(topic_filter, []).append(handler)
            if bulk:
                self._bulk.add(topic_filter)

    def remove(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
            self._bulk.discard(topic_filter)

    def filters(self) -> list[str]:
        with self._lock:
            return list(self._subs)

    def add_listener(self, fn: Callable[[bool], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def put(self, msg: Message) -> None:
        with self._lock:
            bulk = any(topic_matches(f, msg.topic) for f in self._bulk)
        (self._bulk_queue if bulk else self._queue).put(("msg", msg))
        self._items.release()

    def put_connection(self, connected: bool) -> None:
        self._queue.put(("conn", connected))
        self._items.release()

    def _next(self) -> tuple[str, Any] | None:
        """The oldest control item, else the oldest bulk item, else None."""
        for q in (self._queue, self._bulk_queue):
            try:
                return q.get_nowait()
            except queue.Empty:
                continue
        return None

    def is_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def drain(self) -> int:
        """Handle everything queued now on the calling thread; returns items handled."""
        n = 0
        while True:
            item = self._next()
            if item is None:
                return n
            self._items.acquire(blocking=False)
            if item[0] == "stop":
                self._queue.put(item)
                self._items.release()
                return n
            self._handle(item)
            n += 1

    def stop(self) -> None:
        """Stop the worker after what is already queued has been handled (both lanes)."""
        self._queue.put(("stop", None))
        self._items.release()
        if self._thread is not None and not self.is_worker():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            self._items.acquire()
            item = self._next()
            if item is None:
                continue
            if item[0] == "stop":
                while (rest := self._next()) is not None:  # bulk items queued before it
                    if rest[0] != "stop":
                        self._handle(rest)
                return
            self._handle(item)

    def _handle(self, item: tuple[str, Any]) -> None:
        kind, value = item
        with self._lock:
            if kind == "conn":
                targets: list[Callable[..., None]] = list(self._listeners)
            else:
                targets = [
                    h for f, hs in self._subs.items() if topic_matches(f, value.topic) for h in hs
                ]
        for fn in targets:
            try:
                fn(value)
            except Exception:  # a bad message must not kill the daemon
                what = f"message on {value.topic!r}" if kind == "msg" else "connection event"
                log.exception("%s: handler %r failed on %s", self._name, fn, what)


class Transport(ABC):
    """Publish/subscribe to a broker. Use as a context manager or call connect/close.

    Handlers for overlapping filters each see a matching message once per delivery.
    """

    client_id: str

    @abstractmethod
    def connect(self, timeout: float = 10.0) -> None:
        """Open the session; returns once the broker accepted it (or raises)."""

    @abstractmethod
    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, bulk: bool = False
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler``; survives reconnects.
        ``bulk`` (chunk streams): handled only while no other message waits."""

    @abstractmethod
    def unsubscribe(self, topic_filter: str) -> None:
        """Stop receiving ``topic_filter`` and drop its handlers."""

    @abstractmethod
    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        expiry_s: int | None = None,
    ) -> None:
        """Queue a message; never blocks on the network. QoS 1 survives reconnects."""

    @abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (the will is NOT published) and stop the worker."""

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Whether the session is up right now."""

    @property
    @abstractmethod
    def max_packet_size(self) -> int:
        """Largest packet the broker accepts (its CONNACK MaximumPacketSize)."""

    @abstractmethod
    def add_connection_listener(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(True)`` after each (re)connect and ``fn(False)`` on each loss,
        on the handler thread (so it may publish)."""

    @abstractmethod
    def is_handler_thread(self) -> bool:
        """True on the thread that runs handlers: blocking there stalls all delivery."""

    @property
    def unacked(self) -> int:
        """QoS 1 publishes the broker has not acknowledged yet (the outgoing backlog);
        0 where publishing never queues."""
        return 0

    def max_payload(self, topic: str, qos: int = 1) -> int:
        """Largest payload that fits in one publish on ``topic`` (with an expiry)."""
        room = self.max_packet_size - publish_packet_size(topic, 0, qos, expiry=True)
        while (
            room > 0 and publish_packet_size(topic, room, qos, expiry=True) > self.max_packet_size
        ):
            room -= 1  # the remaining-length varint grew by a byte or more
        return room

    def check_size(self, topic: str, payload_len: int, qos: int, expiry: bool) -> None:
        """Refuse locally what the broker would refuse (an oversize QoS 1 publish makes
        paho reconnect and resend forever)."""
        size = publish_packet_size(topic, payload_len, qos, expiry)
        if size > self.max_packet_size:
            raise WireError(
                f"publish to {topic!r}: packet of {size} bytes exceeds the broker's maximum "
                f"packet size {self.max_packet_size}; send it as a chunked transfer"
            )

    def __enter__(self) -> Transport:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
