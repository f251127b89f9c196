"""A minimal asyncio MQTT v5 client: many sessions on one event loop, one socket each.

The fleet load generator (``benchmarks.fleet``) simulates thousands of devices; paho
spends a network thread per client, which would make the generator, not the coordinator,
what gets measured. This client covers exactly what a FedCoE device uses (docs/design.md,
section 8): CONNECT with a will, a session expiry and a username / password, SUBSCRIBE, PUBLISH at QoS 0/1 with
an optional message expiry, PUBACK both ways, PINGREQ at the keepalive (paho's rule), DISCONNECT. It honours the broker's
Receive Maximum (QoS 1 publishes beyond it wait locally, as paho's inflight window does)
and its Maximum Packet Size (read from CONNACK, refused locally).

It implements the project's :class:`~fedcoe_edge.transport.Transport` contract, so the
project's own envelope, blob sender and receiver code runs on top of it unchanged. Handlers
run on the event loop thread, synchronously: they must not block.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fedcoe_edge.errors import WireError
from fedcoe_edge.transport.base import (
    MQTT_MAX_PACKET_SIZE,
    Handler,
    Message,
    Transport,
    Will,
    check_topic,
    topic_matches,
)

__all__ = ["AsyncMqttClient", "ConnectError"]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

# MQTT v5 property id -> value kind, for skipping properties we do not use
_PROP_KIND = {
    0x01: "b", 0x02: "i", 0x03: "s", 0x08: "s", 0x09: "d", 0x0B: "v", 0x11: "i", 0x12: "s",
    0x13: "h", 0x15: "s", 0x16: "d", 0x17: "b", 0x18: "i", 0x19: "b", 0x1A: "s", 0x1C: "s",
    0x1F: "s", 0x21: "h", 0x22: "h", 0x23: "h", 0x24: "b", 0x25: "b", 0x26: "p", 0x27: "i",
    0x28: "b", 0x29: "b", 0x2A: "b",
}


class ConnectError(WireError):
    """The broker refused or never answered the CONNECT."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack(">H", len(b)) + b


def _bin(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + _varint(len(body)) + body


def _read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    mult, value = 1, 0
    for _ in range(4):
        b = buf[pos]
        pos += 1
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos
        mult *= 128
    raise WireError("mqtt: malformed variable byte integer")


def _parse_props(buf: bytes | memoryview, pos: int) -> tuple[dict[int, object], int]:
    length, pos = _read_varint(buf, pos)
    end = pos + length
    props: dict[int, object] = {}
    while pos < end:
        pid = buf[pos]
        pos += 1
        kind = _PROP_KIND.get(pid)
        if kind == "b":
            props[pid], pos = buf[pos], pos + 1
        elif kind == "h":
            props[pid], pos = struct.unpack_from(">H", buf, pos)[0], pos + 2
        elif kind == "i":
            props[pid], pos = struct.unpack_from(">I", buf, pos)[0], pos + 4
        elif kind == "v":
            props[pid], pos = _read_varint(buf, pos)
        elif kind in ("s", "d"):
            n = struct.unpack_from(">H", buf, pos)[0]
            props[pid], pos = bytes(buf[pos + 2 : pos + 2 + n]), pos + 2 + n
        elif kind == "p":
            for _ in range(2):
                n = struct.unpack_from(">H", buf, pos)[0]
                pos += 2 + n
        else:
            raise WireError(f"mqtt: unknown property id {pid:#x}")
    return props, end


@dataclass
class _Pending:
    topic: str
    payload: bytes
    retain: bool
    expiry_s: int | None


class AsyncMqttClient(asyncio.Protocol, Transport):
    """One MQTT v5 session on the running event loop. ``await connect_async()`` first."""

    def __init__(self, client_id: str, host: str, port: int, *, will: Will | None = None,
                 birth: Will | None = None, keepalive_s: int = 300,
                 session_expiry_s: int = 0, clean_start: bool = True,
                 username: str = "", password: str = "") -> None:
        self.client_id = client_id
        self.username, self.password = username, password
        self.host, self.port = host, port
        self.will, self.birth = will, birth
        self.keepalive_s = keepalive_s
        self.session_expiry_s = session_expiry_s
        self.clean_start = clean_start
        self._tr: asyncio.Transport | None = None
        self._buf = bytearray()
        self._subs: list[tuple[str, Handler]] = []
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = False
        self._connack: asyncio.Future[None] | None = None
        self._suback: dict[int, asyncio.Future[None]] = {}
        self._next_pid = 0
        self._inflight: set[int] = set()
        self._receive_max = 65535
        self._waiting: deque[_Pending] = deque()
        self._max_packet = MQTT_MAX_PACKET_SIZE
        self.bytes_out = 0
        self.bytes_in = 0
        self.closed_reason: str | None = None
        self.last_send = 0.0
        self.last_recv = 0.0
        self.pings = 0

    # --- asyncio.Protocol ---
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tr = transport

    def connection_lost(self, exc: Exception | None) -> None:
        was = self._connected
        self._connected = False
        self._tr = None
        if self.closed_reason is None:
            self.closed_reason = f"connection lost ({exc})" if exc else "connection closed"
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectError(f"{self.client_id}: {self.closed_reason}"))
        if was:
            for fn in self._listeners:
                fn(False)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_recv = asyncio.get_running_loop().time()
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            try:
                length, body = _read_varint(buf, pos + 1)
            except IndexError:
                break  # remaining length not complete yet
            if body + length > n:
                break
            self._dispatch(buf[pos] >> 4, buf[pos] & 0x0F, memoryview(buf)[body : body + length])
            pos = body + length
        if pos:
            try:
                del buf[:pos]
            except BufferError:  # a handler still holds a view of the buffer: leave it to it
                self._buf = bytearray(buf[pos:])

    # --- packets in ---
    def _dispatch(self, kind: int, flags: int, body: memoryview) -> None:
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            tlen = struct.unpack_from(">H", body, 0)[0]
            topic = bytes(body[2 : 2 + tlen]).decode("utf-8")
            pos = 2 + tlen
            pid = 0
            if qos:
                pid = struct.unpack_from(">H", body, pos)[0]
                pos += 2
            _, pos = _parse_props(body, pos)
            msg = Message(topic, bytes(body[pos:]), qos, bool(flags & 1))
            if qos == 1:
                self._write(_packet(PUBACK, 0, struct.pack(">H", pid)))
            for f, h in self._subs:
                if topic_matches(f, topic):
                    h(msg)
        elif kind == PUBACK:
            pid = struct.unpack_from(">H", body, 0)[0]
            self._inflight.discard(pid)
            while self._waiting and len(self._inflight) < self._receive_max:
                p = self._waiting.popleft()
                self._send_publish(p.topic, p.payload, 1, p.retain, p.expiry_s)
        elif kind == CONNACK:
            code = body[1]
            if code != 0:
                self.closed_reason = f"broker refused connect (reason {code:#x})"
                if self._connack is not None and not self._connack.done():
                    self._connack.set_exception(ConnectError(f"{self.client_id}: {self.closed_reason}"))
                return
            props, _ = _parse_props(body, 2)
            self._max_packet = int(props.get(0x27, MQTT_MAX_PACKET_SIZE))  # type: ignore[call-overload]
            self._receive_max = int(props.get(0x21, 65535))  # type: ignore[call-overload]
            self._connected = True
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(None)
        elif kind == SUBACK:
            pid = struct.unpack_from(">H", body, 0)[0]
            fut = self._suback.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == DISCONNECT:
            self.closed_reason = f"broker sent DISCONNECT (reason {body[0] if len(body) else 0:#x})"

    # --- packets out ---
    def _write(self, data: bytes) -> None:
        if self._tr is None:
            return
        self.bytes_out += len(data)
        self.last_send = asyncio.get_running_loop().time()
        self._tr.write(data)

    def _pid(self) -> int:
        self._next_pid = self._next_pid % 65535 + 1
        return self._next_pid

    async def connect_async(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, self.host, self.port)
        flags = 0x02 if self.clean_start else 0
        payload = _str(self.client_id)
        if self.will is not None:
            flags |= 0x04 | (self.will.qos << 3) | (0x20 if self.will.retain else 0)
            payload += _varint(0) + _str(self.will.topic) + _bin(self.will.payload)
        if self.username:
            flags |= 0x80
            payload += _str(self.username)
        if self.password:
            flags |= 0x40
            payload += _bin(self.password.encode("utf-8"))
        props = b"\x11" + struct.pack(">I", self.session_expiry_s)
        body = _str("MQTT") + bytes([5, flags]) + struct.pack(">H", self.keepalive_s)
        body += _varint(len(props)) + props + payload
        self._connack = loop.create_future()
        self._write(_packet(CONNECT, 0, body))
        await asyncio.wait_for(self._connack, timeout)
        filters = [f for f, _ in self._subs]
        if filters:
            await self._subscribe_many(filters, timeout)
        if self.birth is not None:
            b = self.birth
            self.publish(b.topic, b.payload, qos=b.qos, retain=b.retain)
        for fn in self._listeners:
            fn(True)

    async def _subscribe_many(self, filters: list[str], timeout: float) -> None:
        pid = self._pid()
        body = struct.pack(">H", pid) + _varint(0)
        for f in dict.fromkeys(filters):
            body += _str(f) + bytes([1])
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._suback[pid] = fut
        self._write(_packet(SUBSCRIBE, 0x02, body))
        await asyncio.wait_for(fut, timeout)

    def ping(self) -> None:
        self.pings += 1
        self._write(_packet(PINGREQ, 0, b""))
        self.last_recv = self.last_send  # as paho: one PINGREQ per keepalive, not per tick

    def keepalive_due(self, now: float) -> bool:
        """paho's rule: a PINGREQ when nothing went out, or nothing came in, for a whole
        keepalive interval (``now`` on the event loop's clock)."""
        if not self._connected or not self.keepalive_s:
            return False
        k = self.keepalive_s
        return now - self.last_send >= k or now - self.last_recv >= k

    # --- Transport API ---
    def connect(self, timeout: float = 10.0) -> None:
        raise RuntimeError("AsyncMqttClient: use `await connect_async()` on the event loop")

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, *, bulk: bool = False
    ) -> None:
        """Register before :meth:`connect_async` (which subscribes everything at once).
        ``bulk`` changes nothing here: handlers run as messages arrive, with no queue."""
        self._subs.append((topic_filter, handler))
        if self._connected:
            asyncio.get_running_loop().create_task(self._subscribe_many([topic_filter], 30.0))

    def unsubscribe(self, topic_filter: str) -> None:
        self._subs = [(f, h) for f, h in self._subs if f != topic_filter]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None) -> None:
        check_topic(topic)
        self.check_size(topic, len(payload), qos, expiry_s is not None)
        if qos and len(self._inflight) >= self._receive_max:
            self._waiting.append(_Pending(topic, payload, retain, expiry_s))
            return
        self._send_publish(topic, payload, qos, retain, expiry_s)

    def _send_publish(self, topic: str, payload: bytes, qos: int, retain: bool,
                      expiry_s: int | None) -> None:
        head = _str(topic)
        if qos:
            pid = self._pid()
            self._inflight.add(pid)
            head += struct.pack(">H", pid)
        props = b"" if expiry_s is None else b"\x02" + struct.pack(">I", int(expiry_s))
        head += _varint(len(props)) + props
        flags = (min(qos, 1) << 1) | (1 if retain else 0)
        self._write(bytes([(PUBLISH << 4) | flags]) + _varint(len(head) + len(payload)) + head)
        if self._tr is not None:
            self.bytes_out += len(payload)
            self._tr.write(payload)

    def close(self) -> None:
        if self._tr is not None:
            self._write(_packet(DISCONNECT, 0, b""))
            self._tr.close()
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def max_packet_size(self) -> int:
        return self._max_packet

    @property
    def unacked(self) -> int:
        return len(self._inflight) + len(self._waiting)

    def add_connection_listener(self, fn: Callable[[bool], None]) -> None:
        self._listeners.append(fn)

    def is_handler_thread(self) -> bool:
        return False  # handlers run on the loop; BlobSender.wait is never used here
