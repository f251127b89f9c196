"""Signed control messages: a versioned JSON envelope, HMAC-SHA256 per device, replay window.

Part of :mod:`fedcoe_edge.wire` (docs/protocol.md, section 3): every control message is one
:class:`Envelope`, sent as its canonical JSON and signed over those bytes with the sender's
key. A receiver checks the HMAC on the raw bytes before it parses anything, then parses
with limits (:func:`parse_json`), and refuses what is expired, too large, malformed or
already seen (:class:`ReplayCache`).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac as _hmac
import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fedcoe_edge.errors import WireError
from fedcoe_edge.wire.common import ID_RE, TYPE_RE, is_int, new_msg_id, wall_ms

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = 1024 * 1024
MAX_TTL_S = 24 * 3600
DEFAULT_MAX_SKEW_MS = 5 * 60 * 1000


@dataclass(frozen=True)
class Envelope:
    """One control message. ``hmac`` is filled by :func:`encode_envelope`.

    ``round`` is the federation round the message belongs to (0 when none applies);
    ``recipient`` is a device id, the coordinator id, or ``"*"`` for broadcasts.
    """

    v: int
    type: str
    msg_id: str
    federation: str
    round: int
    sender: str
    recipient: str
    ts_ms: int
    ttl_s: int
    body: dict[str, Any]
    hmac: str = ""

    @classmethod
    def new(
        cls,
        type: str,
        *,
        federation: str,
        sender: str,
        recipient: str,
        round: int = 0,
        body: Mapping[str, Any] | None = None,
        ttl_s: int = 300,
        ts_ms: int | None = None,
        msg_id: str | None = None,
    ) -> Envelope:
        """Build an unsigned envelope with a fresh msg_id and the current time."""
        return cls(
            v=PROTOCOL_VERSION,
            type=type,
            msg_id=msg_id if msg_id is not None else new_msg_id(),
            federation=federation,
            round=round,
            sender=sender,
            recipient=recipient,
            ts_ms=ts_ms if ts_ms is not None else wall_ms(),
            ttl_s=ttl_s,
            body=dict(body) if body is not None else {},
        )

    @property
    def expires_ms(self) -> int:
        """Absolute expiry; after it the message is refused (and leaves the replay window)."""
        return self.ts_ms + self.ttl_s * 1000


_ENVELOPE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Envelope))


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, no spaces, ASCII, no NaN): the bytes the HMAC covers."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _check_fields(d: Mapping[str, Any], where: str) -> None:
    """Field-by-field schema check; one reason per failure so logs stay one line."""
    missing = [k for k in _ENVELOPE_FIELDS if k not in d]
    if missing:
        raise WireError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(k for k in d if k not in _ENVELOPE_FIELDS)
    if extra:
        raise WireError(f"{where}: unexpected field(s) {', '.join(extra)}")
    if not is_int(d["v"]):
        raise WireError(f"{where}: field 'v' must be an integer")
    if d["v"] != PROTOCOL_VERSION:
        raise WireError(
            f"{where}: unsupported protocol version {d['v']} (expected {PROTOCOL_VERSION})"
        )
    for name in ("msg_id", "federation", "sender", "recipient"):
        val = d[name]
        if not isinstance(val, str) or not (
            ID_RE.match(val) or (name == "recipient" and val == "*")
        ):
            raise WireError(f"{where}: field '{name}' must match {ID_RE.pattern}, got {val!r:.80}")
    if not isinstance(d["type"], str) or not TYPE_RE.match(d["type"]):
        raise WireError(
            f"{where}: field 'type' must match {TYPE_RE.pattern}, got {d['type']!r:.80}"
        )
    if not is_int(d["round"]) or d["round"] < 0:
        raise WireError(f"{where}: field 'round' must be a non-negative integer")
    if not is_int(d["ts_ms"]) or d["ts_ms"] < 0:
        raise WireError(f"{where}: field 'ts_ms' must be a non-negative integer")
    if not is_int(d["ttl_s"]) or not 0 < d["ttl_s"] <= MAX_TTL_S:
        raise WireError(f"{where}: field 'ttl_s' must be an integer in 1..{MAX_TTL_S}")
    if not isinstance(d["body"], dict):
        raise WireError(f"{where}: field 'body' must be a JSON object")
    if not isinstance(d["hmac"], str):
        raise WireError(f"{where}: field 'hmac' must be a string")


def _signing_bytes(d: Mapping[str, Any]) -> bytes:
    return canonical_json({k: d[k] for k in _ENVELOPE_FIELDS if k != "hmac"})


def _check_key(key: bytes, where: str) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) < 16:
        raise WireError(f"{where}: HMAC key must be at least 16 bytes")


def encode_envelope(env: Envelope, key: bytes) -> bytes:
    """Sign ``env`` with ``key`` and return canonical JSON bytes ready to publish.

    The envelope is checked against the same schema the receiver applies, so a message
    this side would send is never one the other side must reject.
    """
    where = f"encode envelope type={env.type!r} msg_id={env.msg_id!r}"
    # a shallow copy: asdict() would deep-copy the body, which is never modified here
    d = {name: getattr(env, name) for name in _ENVELOPE_FIELDS}
    d["hmac"] = ""
    _check_fields(d, where)
    _check_key(key, where)
    try:
        signed = _signing_bytes(d)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{where}: body is not plain JSON ({exc})") from None
    d["hmac"] = _hmac.new(bytes(key), signed, hashlib.sha256).hexdigest()
    data = canonical_json(d)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise WireError(
            f"{where}: {len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte envelope limit; send tensors as a chunked transfer"
        )
    return data


class UnauthenticatedError(WireError):
    """A message whose sender is unknown or whose HMAC does not verify: nothing in it was
    parsed, so its reason names only the sender it claims (docs/protocol.md, section 3)."""


# JSON limits applied to authenticated bytes only (docs/protocol.md, "Bounds"): nesting,
# integer magnitude (SQLite's 64-bit INTEGER; a larger one raised OverflowError on save)
# and finiteness (a float literal such as 1e999 parses to inf).
MAX_JSON_DEPTH = 32
MAX_JSON_INT = 2**63 - 1

_HMAC_MARK = b',"hmac":"'
_SENDER_MARK = b',"sender":"'
_TAIL = b',"v":' + str(PROTOCOL_VERSION).encode() + b"}"
_HMAC_LEN = 64
_STRING_RE = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_DEPTH_TABLE = bytes(2 if c in b"[{" else 0 if c in b"]}" else 1 for c in range(256))


def _split_signed(data: bytes, where: str) -> tuple[bytes, bytes]:
    """``(signed bytes, hmac hex)`` of canonical envelope bytes, without parsing them.

    The canonical form sorts keys, so the top-level ``hmac`` member is the last one of its
    spelling: only constrained fields (ids, integers, the type) follow it, and none of
    them can hold a quote. The signed bytes are the envelope without that member, which is
    exactly what :func:`encode_envelope` signed."""
    i = data.rfind(_HMAC_MARK)
    j = i + len(_HMAC_MARK) + _HMAC_LEN
    if i < 0 or data[j : j + 1] != b'"':
        raise UnauthenticatedError(f"{where}: no HMAC member (not a canonical signed envelope)")
    return data[:i] + data[j + 1 :], data[i + len(_HMAC_MARK) : j]


def _claimed_sender(data: bytes) -> str:
    """The ``sender`` the bytes claim (read without parsing, like the HMAC); only used to
    look up the key that must verify them."""
    i = data.rfind(_SENDER_MARK)
    if i < 0:
        raise UnauthenticatedError("envelope: no sender member")
    i += len(_SENDER_MARK)
    j = data.find(b'"', i, i + 130)
    raw = data[i:j] if j > 0 else b""
    try:
        sender = raw.decode("ascii")
    except UnicodeDecodeError:
        sender = ""
    if not ID_RE.match(sender):
        raise UnauthenticatedError(f"envelope: sender {raw[:80]!r} is not a valid id")
    return sender


def json_depth(data: bytes) -> int:
    """Deepest nesting of arrays/objects in JSON bytes, counted in C (regex + numpy), so a
    40,000-deep document costs a scan, not a recursion of the parser."""
    bare = _STRING_RE.sub(b"", data).translate(_DEPTH_TABLE)
    if not bare:
        return 0
    steps = np.frombuffer(bare, dtype=np.uint8).astype(np.int32) - 1
    return int(np.cumsum(steps).max(initial=0))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:40]} is not finite")
    return x


def _bounded_int(text: str) -> int:
    if len(text) > 20:  # the digits of 2**63 and a sign; int() is never asked for more
        raise ValueError(f"integer of {len(text)} digits exceeds +-{MAX_JSON_INT}")
    x = int(text)
    if abs(x) > MAX_JSON_INT:
        raise ValueError(f"integer {text} exceeds +-{MAX_JSON_INT}")
    return x


def parse_json(data: bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON for peer input: UTF-8, no duplicate keys, nesting at most ``max_depth``
    (the document itself is level 1: an envelope's body is level 2),
    finite floats, integers within +-MAX_JSON_INT. Every failure is one WireError line.
    The nesting can be no deeper than the count of ``[`` and ``{`` bytes (those inside
    strings only raise it), so a document with at most ``max_depth`` of them skips the
    exact scan: most envelopes, which the scan cost a few percent of the coordinator's CPU
    (docs/benchmarks.md, "Coordinator CPU profile")."""
    if data.count(b"[") + data.count(b"{") > max_depth:
        depth = json_depth(data)
        if depth > max_depth:
            raise WireError(f"{where}: JSON nested {depth} deep (at most {max_depth})")
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"{where}: not valid JSON ({str(exc)[:200]})") from None


class ReplayCache:
    """Bounded memory of (sender, msg_id) pairs seen inside their ttl.

    An entry is forgotten once its message expires (the ttl check rejects it from then
    on). When more than ``capacity`` live entries exist, the one expiring first is
    evicted and becomes the *floor*: any message expiring at or before the floor is
    refused, because the cache can no longer prove it is not a replay. Memory is thus
    bounded and no replay slips through; under overload, old-but-valid messages are the
    ones refused. Thread-safe.

    With ``per_sender`` the bound (and the floor) is kept per sender instead: one sender
    sending fast raises only its own floor, so a fleet's honest traffic (thousands of
    devices, heartbeats with a shorter ttl than control messages) is never refused because
    of the others' volume. Senders are authenticated before the cache (HMAC first), so the
    memory is at most ``per_sender`` entries per enrolled device.
    """

    def __init__(self, capacity: int = 100_000, per_sender: int | None = None) -> None:
        if capacity < 1 or (per_sender is not None and per_sender < 1):
            raise ValueError("ReplayCache capacity and per_sender must be >= 1")
        self.capacity = capacity
        self.per_sender = per_sender
        self._seen: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[int, str, str]] = []
        self._floor_ms = -1
        self._slots: dict[str, tuple[dict[str, int], list[tuple[int, str]], list[int]]] = {}
        self._calls = 0
        self._swept_ms = -1
        self._lock = threading.Lock()

    def __len__(self) -> int:
        if self.per_sender is not None:
            return sum(len(s[0]) for s in self._slots.values())
        return len(self._seen)

    def check_and_add(self, sender: str, msg_id: str, expires_ms: int, now: int) -> None:
        """Record a message; raise :class:`WireError` if it was seen or is below the floor."""
        if self.per_sender is not None:
            self._check_per_sender(sender, msg_id, expires_ms, now)
            return
        with self._lock:
            while self._heap and self._heap[0][0] < now:
                _, s, m = heapq.heappop(self._heap)
                self._seen.pop((s, m), None)
            key = (sender, msg_id)
            if key in self._seen:
                raise WireError(f"envelope from {sender!r}: replayed msg_id {msg_id!r}")
            if expires_ms <= self._floor_ms:
                raise WireError(
                    f"envelope from {sender!r}: msg_id {msg_id!r} is older than the replay window"
                )
            self._seen[key] = expires_ms
            heapq.heappush(self._heap, (expires_ms, sender, msg_id))
            while len(self._seen) > self.capacity:
                exp, s, m = heapq.heappop(self._heap)
                self._seen.pop((s, m), None)
                self._floor_ms = max(self._floor_ms, exp)

    def _check_per_sender(self, sender: str, msg_id: str, expires_ms: int, now: int) -> None:
        assert self.per_sender is not None
        with self._lock:
            self._calls += 1
            if self._calls % 10_000 == 0 or now - self._swept_ms > 60_000:
                self._swept_ms = now  # idle senders' expired entries go too
                for name in list(self._slots):
                    seen, heap, _ = self._slots[name]
                    while heap and heap[0][0] < now:
                        seen.pop(heapq.heappop(heap)[1], None)
                    if not seen:
                        del self._slots[name]
            seen, heap, floor = self._slots.setdefault(sender, ({}, [], [-1]))
            while heap and heap[0][0] < now:
                seen.pop(heapq.heappop(heap)[1], None)
            if msg_id in seen:
                raise WireError(f"envelope from {sender!r}: replayed msg_id {msg_id!r}")
            if expires_ms <= floor[0]:
                raise WireError(
                    f"envelope from {sender!r}: msg_id {msg_id!r} is older than the replay window"
                )
            seen[msg_id] = expires_ms
            heapq.heappush(heap, (expires_ms, msg_id))
            while len(seen) > self.per_sender:
                exp, m = heapq.heappop(heap)
                seen.pop(m, None)
                floor[0] = max(floor[0], exp)


def decode_envelope(
    data: bytes,
    key_lookup: Callable[[str], bytes | None],
    *,
    now_ms: int | None = None,
    replay_cache: ReplayCache | None = None,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
    expect_sender: str | None = None,
) -> Envelope:
    """Authenticate, then parse and freshness-check a received envelope.

    Order matters (docs/protocol.md, section 3): size, then the HMAC over the raw bytes
    (with the key of ``expect_sender``, or of the sender the bytes claim), and only then
    JSON with limits, the canonical form, the schema, ttl and clock skew, and last the
    replay cache. So a message nobody with a key signed costs a bounded scan and one
    HMAC, never a parse, and forged or stale messages can never fill the cache. Failures
    before the HMAC verifies raise :class:`UnauthenticatedError`; every failure is a
    :class:`WireError` with a one-line reason.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"envelope: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_ENVELOPE_BYTES:
        raise UnauthenticatedError(
            f"envelope: {len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit"
        )
    sender = expect_sender if expect_sender is not None else _claimed_sender(data)
    where = f"envelope from {sender!r}"
    signed, mac = _split_signed(data, where)
    key = key_lookup(sender)
    if key is None:
        raise UnauthenticatedError(f"{where}: unknown sender (no HMAC key)")
    _check_key(key, where)
    expected = _hmac.new(bytes(key), signed, hashlib.sha256).hexdigest().encode("ascii")
    if not _hmac.compare_digest(expected, mac):
        if not data.endswith(_TAIL) and data.rfind(b',"v":') > 0:
            raise UnauthenticatedError(
                f"{where}: bad HMAC (or a protocol version other than {PROTOCOL_VERSION})"
            )
        raise UnauthenticatedError(f"{where}: bad HMAC")
    # authenticated: whoever holds the key sent exactly these bytes; still checked in full
    d = parse_json(data, f"{where}: envelope")
    if not isinstance(d, dict):
        raise WireError(f"{where}: expected a JSON object, got {type(d).__name__}")
    _check_fields(d, where)
    if d["sender"] != sender or d["hmac"].encode("ascii") != mac:
        raise WireError(f"{where}: signed as {d['sender']!r:.80}")
    if canonical_json(d) != data:
        raise WireError(f"{where}: not in canonical form (sorted keys, no spaces)")
    where = f"envelope from {sender!r} type={d['type']!r} round={d['round']}"
    env = Envelope(**d)
    now = now_ms if now_ms is not None else wall_ms()
    if now > env.expires_ms:
        raise WireError(f"{where}: expired {now - env.expires_ms} ms ago (ttl {env.ttl_s} s)")
    if env.ts_ms > now + max_skew_ms:
        raise WireError(f"{where}: timestamp {env.ts_ms - now} ms in the future (clock skew)")
    if replay_cache is not None:
        replay_cache.check_and_add(env.sender, env.msg_id, env.expires_ms, now)
    return env
