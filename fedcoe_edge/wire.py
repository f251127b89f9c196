"""Wire format shared by the coordinator and the device agents.

FedCoE (arXiv 2605.21264) exchanges only a subset of the global experts each round; this
module is how those experts and the control messages around them travel (docs/design.md, section 8):

* a versioned JSON **envelope** for control messages, signed with a per-device
  HMAC-SHA256 key and protected against replay by a bounded window of message ids;
* a **weight codec**: safetensors bytes, never pickle, with optional int8 compression of
  weight *deltas* (one scale per tensor, lossless for integer tensors);
* **chunked transfers**: a manifest (expert ids, base version, size, chunk count, sha256),
  a reassembler that tolerates duplicates and reordering and reports gaps for NACK, and a
  sender-side window because the broker drops QoS 1 messages silently for slow consumers;
* ``validate_update``: the schema gate (keys, shapes, dtypes, finite values, norm bound)
  every received update passes before a strategy sees it.

Everything here is transport-agnostic and pure Python + numpy, so it runs on the device.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac as _hmac
import json
import math
import os
import random
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import safetensors.numpy as st_numpy
from safetensors import SafetensorError

from fedcoe_edge.errors import ValidationError, WireError

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_NACK",
    "Envelope",
    "ReplayCache",
    "canonical_json",
    "encode_envelope",
    "decode_envelope",
    "new_msg_id",
    "wall_ms",
    "decode_tensor_metadata",
    "compressed_delta_metadata",
    "chunk_overhead",
    "encode_tensors",
    "decode_tensors",
    "compress_delta",
    "decompress_delta",
    "is_compressed_delta",
    "TransferManifest",
    "Chunk",
    "encode_chunk",
    "decode_chunk",
    "split_chunks",
    "Reassembler",
    "TransferWindow",
    "validate_update",
]

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
"""Smallest chunk a multi-chunk manifest may declare. Receiver work is per chunk (a frame,
a progress report every few chunks), so tiny chunks let a sender multiply the receiver's
work per byte: 1-byte chunks turned a 875 KB upload into 875k handler calls."""
MAX_NACK = 256
"""Most gaps one progress report lists; the report's ``highest`` is lowered to match, so
the sender never mistakes an unlisted gap for an acknowledged chunk."""
MAX_ENVELOPE_BYTES = 1024 * 1024
MAX_TTL_S = 24 * 3600
DEFAULT_MAX_SKEW_MS = 5 * 60 * 1000

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


def wall_ms() -> int:
    """Wall-clock milliseconds: envelopes carry absolute time so ttl works across hosts."""
    return int(time.time() * 1000)


_ID_RNG = random.Random(os.urandom(32))
_ID_LOCK = threading.Lock()
if hasattr(os, "register_at_fork"):  # a forked child must not repeat its parent's ids
    os.register_at_fork(after_in_child=lambda: _ID_RNG.seed(os.urandom(32)))


def new_msg_id() -> str:
    """A random 128-bit id: unique per message so the replay window can key on it.

    Uniqueness is all the replay window needs (the HMAC, not the id, authenticates), so the
    bits come from a generator seeded once from the OS instead of one ``urandom`` call per
    message, which cost a fleet's coordinator about 0.1 ms per message."""
    with _ID_LOCK:
        return f"{_ID_RNG.getrandbits(128):032x}"


# --------------------------------------------------------------------------------------
# Envelope
# --------------------------------------------------------------------------------------


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_fields(d: Mapping[str, Any], where: str) -> None:
    """Field-by-field schema check; one reason per failure so logs stay one line."""
    missing = [k for k in _ENVELOPE_FIELDS if k not in d]
    if missing:
        raise WireError(f"{where}: missing field(s) {', '.join(missing)}")
    extra = sorted(k for k in d if k not in _ENVELOPE_FIELDS)
    if extra:
        raise WireError(f"{where}: unexpected field(s) {', '.join(extra)}")
    if not _is_int(d["v"]):
        raise WireError(f"{where}: field 'v' must be an integer")
    if d["v"] != PROTOCOL_VERSION:
        raise WireError(
            f"{where}: unsupported protocol version {d['v']} (expected {PROTOCOL_VERSION})"
        )
    for name in ("msg_id", "federation", "sender", "recipient"):
        val = d[name]
        if not isinstance(val, str) or not (
            _ID_RE.match(val) or (name == "recipient" and val == "*")
        ):
            raise WireError(f"{where}: field '{name}' must match {_ID_RE.pattern}, got {val!r:.80}")
    if not isinstance(d["type"], str) or not _TYPE_RE.match(d["type"]):
        raise WireError(
            f"{where}: field 'type' must match {_TYPE_RE.pattern}, got {d['type']!r:.80}"
        )
    if not _is_int(d["round"]) or d["round"] < 0:
        raise WireError(f"{where}: field 'round' must be a non-negative integer")
    if not _is_int(d["ts_ms"]) or d["ts_ms"] < 0:
        raise WireError(f"{where}: field 'ts_ms' must be a non-negative integer")
    if not _is_int(d["ttl_s"]) or not 0 < d["ttl_s"] <= MAX_TTL_S:
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


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


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
) -> Envelope:
    """Parse, authenticate and freshness-check a received envelope.

    Order matters: schema, then HMAC (with the sender's key from ``key_lookup``), then
    ttl and clock skew, and only then the replay cache, so forged or stale messages can
    never fill the cache. Any failure raises :class:`WireError` with a one-line reason.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"envelope: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE_BYTES:
        raise WireError(f"envelope: {len(data)} bytes exceeds the {MAX_ENVELOPE_BYTES}-byte limit")
    try:
        d = json.loads(
            bytes(data).decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"envelope: not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise WireError(f"envelope: expected a JSON object, got {type(d).__name__}")
    sender = d.get("sender")
    where = f"envelope from {sender!r:.80}" if isinstance(sender, str) else "envelope"
    if "v" in d and _is_int(d["v"]) and d["v"] != PROTOCOL_VERSION:
        raise WireError(
            f"{where}: unsupported protocol version {d['v']} (expected {PROTOCOL_VERSION})"
        )
    _check_fields(d, where)
    where = f"envelope from {d['sender']!r} type={d['type']!r} round={d['round']}"
    key = key_lookup(d["sender"])
    if key is None:
        raise WireError(f"{where}: unknown sender (no HMAC key)")
    _check_key(key, where)
    if not _HEX64_RE.match(d["hmac"]):
        raise WireError(f"{where}: bad HMAC (not 64 lowercase hex digits)")
    expected = _hmac.new(bytes(key), _signing_bytes(d), hashlib.sha256).hexdigest()
    if not _hmac.compare_digest(expected, d["hmac"]):
        raise WireError(f"{where}: bad HMAC")
    env = Envelope(**d)
    now = now_ms if now_ms is not None else wall_ms()
    if now > env.expires_ms:
        raise WireError(f"{where}: expired {now - env.expires_ms} ms ago (ttl {env.ttl_s} s)")
    if env.ts_ms > now + max_skew_ms:
        raise WireError(f"{where}: timestamp {env.ts_ms - now} ms in the future (clock skew)")
    if replay_cache is not None:
        replay_cache.check_and_add(env.sender, env.msg_id, env.expires_ms, now)
    return env


# --------------------------------------------------------------------------------------
# Weight codec
# --------------------------------------------------------------------------------------

_CODEC_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float16, np.float32, np.float64,
        np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64,
        np.bool_,
    )
)  # fmt: skip


def encode_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize named arrays to safetensors bytes (data only: nothing executable)."""
    prepared: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise WireError(f"encode_tensors: tensor names must be non-empty strings, got {name!r}")
        if not isinstance(arr, np.ndarray):
            raise WireError(
                f"encode_tensors: tensor {name!r} is {type(arr).__name__}, not a numpy array"
            )
        if arr.dtype not in _CODEC_DTYPES:
            raise WireError(f"encode_tensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        # safetensors reads raw memory from the data pointer: it must be contiguous.
        prepared[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    meta = None
    if metadata is not None:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise WireError("encode_tensors: metadata keys and values must be strings")
            meta[k] = v
    return st_numpy.save(prepared, metadata=meta)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into writable arrays; malformed input raises WireError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"decode_tensors: expected bytes, got {type(data).__name__}")
    try:
        loaded = st_numpy.load(bytes(data))
    except (SafetensorError, KeyError, ValueError) as exc:
        raise WireError(f"decode_tensors: not a valid safetensors payload ({exc})") from None
    out: dict[str, np.ndarray] = {}
    for name, arr in loaded.items():
        if arr.dtype not in _CODEC_DTYPES:
            raise WireError(f"decode_tensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        out[name] = arr.copy()  # frombuffer views are read-only and pin the whole payload
    return out


def decode_tensor_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors payload (empty when absent)."""
    if len(data) < 8:
        raise WireError("decode_tensor_metadata: payload shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise WireError(f"decode_tensor_metadata: header length {n} exceeds payload size")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"decode_tensor_metadata: header is not JSON ({exc})") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("decode_tensor_metadata: __metadata__ must map strings to strings")
    return dict(meta)


# Payload keys of a compressed delta: "q:<name>" int8 codes, "s:<name>" float32 scale,
# "r:<name>" the new value verbatim (integer/bool tensors). The prefix is fixed-length,
# so any tensor name (dots, slashes, colons) maps back unambiguously.
_Q, _S, _R = "q:", "s:", "r:"
_DELTA_FORMAT_KEY = "fedcoe.delta"
_DELTA_FORMAT = "int8-per-tensor-v1"


def is_compressed_delta(payload: Mapping[str, np.ndarray]) -> bool:
    """True when every key carries a compressed-delta prefix (vs. plain weights)."""
    return bool(payload) and all(k[:2] in (_Q, _S, _R) for k in payload)


def compress_delta(
    new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Encode ``new`` as an int8 delta against ``base`` (what both sides already hold).

    Float tensors: ``d = new - base`` in float32, ``scale = max|d| / 127``,
    ``q = round(d / scale)`` as int8. Per element, the reconstruction error is at most
    ``scale / 2`` (= ``max|d| / 254``) plus float32 rounding of ``base + q*scale``.
    Integer and bool tensors are carried verbatim (lossless). The result is a plain
    tensor dict: feed it to :func:`encode_tensors`.
    """
    _same_keys_and_shapes(new, base, "compress_delta")
    out: dict[str, np.ndarray] = {}
    for name, n in new.items():
        b = base[name]
        if np.issubdtype(n.dtype, np.floating):
            d = n.astype(np.float32) - b.astype(np.float32)
            if not np.all(np.isfinite(d)):
                raise ValidationError(f"compress_delta: tensor {name!r} has non-finite values")
            amax = float(np.max(np.abs(d))) if d.size else 0.0
            scale = np.float32(amax / 127.0)
            if scale > 0:
                q = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
            else:
                q = np.zeros(d.shape, dtype=np.int8)
            out[_Q + name] = q
            out[_S + name] = np.array([scale], dtype=np.float32)
        else:
            out[_R + name] = n.copy(order="C")
    return out


def compressed_delta_metadata() -> dict[str, str]:
    """Metadata to pass to :func:`encode_tensors` so receivers can tell the format."""
    return {_DELTA_FORMAT_KEY: _DELTA_FORMAT}


def decompress_delta(
    payload: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rebuild full tensors from :func:`compress_delta` output and the same ``base``.

    Each result has the base tensor's dtype. A payload that does not cover exactly the
    base keys, or whose shapes/dtypes disagree, raises :class:`ValidationError` naming
    the tensor; a structurally malformed payload raises :class:`WireError`.
    """
    names: set[str] = set()
    for key in payload:
        prefix, name = key[:2], key[2:]
        if prefix not in (_Q, _S, _R) or not name:
            raise WireError(f"decompress_delta: unexpected payload key {key!r}")
        if prefix != _S:
            if name in names:
                raise WireError(f"decompress_delta: tensor {name!r} appears twice")
            names.add(name)
    missing = sorted(set(base) - names)
    if missing:
        raise ValidationError(f"decompress_delta: tensor {missing[0]!r} missing from the update")
    extra = sorted(names - set(base))
    if extra:
        raise ValidationError(f"decompress_delta: unexpected tensor {extra[0]!r} (not in base)")
    out: dict[str, np.ndarray] = {}
    for name, b in base.items():
        if _R + name in payload:
            r = payload[_R + name]
            if r.shape != b.shape or r.dtype != b.dtype:
                raise ValidationError(
                    f"decompress_delta: tensor {name!r} is {r.dtype}{list(r.shape)}, expected {b.dtype}{list(b.shape)}"
                )
            out[name] = np.array(r, copy=True)
            continue
        q = payload[_Q + name]
        s = payload.get(_S + name)
        if s is None or s.shape != (1,) or s.dtype != np.float32:
            raise WireError(f"decompress_delta: tensor {name!r} lacks a float32 scale of shape [1]")
        if q.dtype != np.int8:
            raise WireError(f"decompress_delta: tensor {name!r} codes are {q.dtype}, expected int8")
        if q.shape != b.shape:
            raise ValidationError(
                f"decompress_delta: tensor {name!r} has shape {list(q.shape)}, expected {list(b.shape)}"
            )
        if not np.issubdtype(b.dtype, np.floating):
            raise ValidationError(
                f"decompress_delta: tensor {name!r} is int8-coded but base is {b.dtype}"
            )
        scale = float(s[0])
        if not math.isfinite(scale) or scale < 0:
            raise ValidationError(f"decompress_delta: tensor {name!r} has invalid scale {scale}")
        rebuilt = b.astype(np.float32) + q.astype(np.float32) * np.float32(scale)
        out[name] = rebuilt.astype(b.dtype)
    return out


def _same_keys_and_shapes(
    new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], where: str
) -> None:
    missing = sorted(set(base) - set(new))
    if missing:
        raise ValidationError(f"{where}: tensor {missing[0]!r} missing from new weights")
    extra = sorted(set(new) - set(base))
    if extra:
        raise ValidationError(f"{where}: tensor {extra[0]!r} not in base")
    for name, n in new.items():
        b = base[name]
        if n.shape != b.shape:
            raise ValidationError(
                f"{where}: tensor {name!r} has shape {list(n.shape)}, base {list(b.shape)}"
            )
        if n.dtype != b.dtype:
            raise ValidationError(f"{where}: tensor {name!r} is {n.dtype}, base is {b.dtype}")


# --------------------------------------------------------------------------------------
# Chunked transfers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransferManifest:
    """What a receiver needs before the first chunk: sent in a signed control envelope.

    ``expert_ids`` names the global experts inside the payload (partial exchange);
    ``base_version`` is the global version a delta is relative to; ``encoding`` says how
    to read the bytes (``safetensors`` or ``safetensors+int8delta``).
    """

    transfer_id: str
    expert_ids: tuple[int, ...]
    base_version: int
    total_bytes: int
    chunk_size: int
    chunk_count: int
    sha256: str
    encoding: str = "safetensors"

    @classmethod
    def for_payload(
        cls,
        data: bytes,
        *,
        expert_ids: Iterable[int],
        base_version: int,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        transfer_id: str | None = None,
        encoding: str = "safetensors",
    ) -> TransferManifest:
        """Describe ``data``: size, chunking and sha256 for the end-to-end check."""
        if chunk_size < 1:
            raise WireError(f"transfer: chunk_size must be positive, got {chunk_size}")
        m = cls(
            transfer_id=transfer_id if transfer_id is not None else new_msg_id(),
            expert_ids=tuple(int(e) for e in expert_ids),
            base_version=base_version,
            total_bytes=len(data),
            chunk_size=chunk_size,
            chunk_count=max(1, -(-len(data) // chunk_size)),
            sha256=hashlib.sha256(data).hexdigest(),
            encoding=encoding,
        )
        m.check()
        return m

    def chunk_len(self, seq: int) -> int:
        """Expected size of chunk ``seq``: all full except possibly the last."""
        if seq < self.chunk_count - 1:
            return self.chunk_size
        return self.total_bytes - (self.chunk_count - 1) * self.chunk_size

    def check(self) -> None:
        """Raise :class:`WireError` unless the fields are self-consistent."""
        w = f"transfer manifest {self.transfer_id!r:.80}"
        if not isinstance(self.transfer_id, str) or not _ID_RE.match(self.transfer_id):
            raise WireError(f"{w}: transfer_id must match {_ID_RE.pattern}")
        if not all(_is_int(e) and e >= 0 for e in self.expert_ids):
            raise WireError(f"{w}: expert_ids must be non-negative integers")
        for name in ("base_version", "total_bytes", "chunk_size", "chunk_count"):
            val = getattr(self, name)
            if not _is_int(val) or val < 0:
                raise WireError(f"{w}: {name} must be a non-negative integer")
        if self.chunk_size < 1:
            raise WireError(f"{w}: chunk_size must be positive")
        if self.chunk_size < MIN_CHUNK_SIZE and self.total_bytes > self.chunk_size:
            raise WireError(
                f"{w}: chunk_size {self.chunk_size} is below the {MIN_CHUNK_SIZE}-byte minimum "
                f"for a payload of more than one chunk"
            )
        if self.chunk_count != max(1, -(-self.total_bytes // self.chunk_size)):
            raise WireError(
                f"{w}: chunk_count {self.chunk_count} does not match {self.total_bytes} bytes / {self.chunk_size}"
            )
        if not isinstance(self.sha256, str) or not _HEX64_RE.match(self.sha256):
            raise WireError(f"{w}: sha256 must be 64 lowercase hex digits")
        if not isinstance(self.encoding, str) or not _TYPE_RE.match(
            self.encoding.replace("+", ".")
        ):
            raise WireError(f"{w}: bad encoding {self.encoding!r:.40}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for an envelope body."""
        d = asdict(self)
        d["expert_ids"] = list(self.expert_ids)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TransferManifest:
        """Parse a manifest received in an envelope body; WireError when malformed."""
        if not isinstance(d, dict):
            raise WireError("transfer manifest: expected a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n != "encoding"]
        if missing:
            raise WireError(f"transfer manifest: missing field(s) {', '.join(missing)}")
        extra = sorted(k for k in d if k not in names)
        if extra:
            raise WireError(f"transfer manifest: unexpected field(s) {', '.join(extra)}")
        if not isinstance(d["expert_ids"], list):
            raise WireError("transfer manifest: expert_ids must be a list")
        m = cls(**{**d, "expert_ids": tuple(d["expert_ids"])})
        m.check()
        return m


# Chunk frame: magic, version, transfer-id length, then id, seq, count, payload.
_CHUNK_MAGIC = b"FCK"
_CHUNK_VERSION = 1
_CHUNK_HEAD = struct.Struct(">3sBB")
_CHUNK_SEQ = struct.Struct(">II")


@dataclass(frozen=True)
class Chunk:
    """One piece of a transfer as it travels on a blob topic."""

    transfer_id: str
    seq: int
    count: int
    data: bytes


def encode_chunk(transfer_id: str, seq: int, count: int, data: bytes) -> bytes:
    """Frame a chunk so it is self-describing (transfer id and position inside)."""
    tid = transfer_id.encode("ascii")
    if not _ID_RE.match(transfer_id) or len(tid) > 255:
        raise WireError(f"chunk: bad transfer id {transfer_id!r:.80}")
    if not 0 <= seq < count:
        raise WireError(f"chunk: seq {seq} outside 0..{count - 1}")
    return b"".join((_CHUNK_HEAD.pack(_CHUNK_MAGIC, _CHUNK_VERSION, len(tid)), tid,
                     _CHUNK_SEQ.pack(seq, count), data))  # fmt: skip


def chunk_overhead(transfer_id: str) -> int:
    """Bytes the chunk frame adds to each payload (for sizing chunks under a packet limit)."""
    return _CHUNK_HEAD.size + len(transfer_id.encode("ascii")) + _CHUNK_SEQ.size


def decode_chunk(payload: bytes) -> Chunk:
    """Parse a chunk frame; WireError when it is not one."""
    mv = memoryview(payload)
    if len(mv) < _CHUNK_HEAD.size:
        raise WireError(f"chunk: {len(mv)} bytes is shorter than the frame header")
    magic, ver, tlen = _CHUNK_HEAD.unpack_from(mv, 0)
    if magic != _CHUNK_MAGIC:
        raise WireError("chunk: bad magic (not a FedCoE chunk)")
    if ver != _CHUNK_VERSION:
        raise WireError(f"chunk: unsupported frame version {ver}")
    start = _CHUNK_HEAD.size + tlen + _CHUNK_SEQ.size
    if len(mv) < start:
        raise WireError("chunk: truncated frame header")
    try:
        tid = bytes(mv[_CHUNK_HEAD.size : _CHUNK_HEAD.size + tlen]).decode("ascii")
    except UnicodeDecodeError:
        raise WireError("chunk: transfer id is not ASCII") from None
    if not _ID_RE.match(tid):
        raise WireError(f"chunk: bad transfer id {tid!r:.80}")
    seq, count = _CHUNK_SEQ.unpack_from(mv, _CHUNK_HEAD.size + tlen)
    if not 0 <= seq < count:
        raise WireError(f"chunk {tid!r}: seq {seq} outside 0..{count - 1}")
    return Chunk(tid, seq, count, bytes(mv[start:]))


def split_chunks(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    """Cut ``data`` into ``chunk_size`` pieces (one empty piece for empty data)."""
    if chunk_size < 1:
        raise WireError(f"split_chunks: chunk_size must be positive, got {chunk_size}")
    if not data:
        return [b""]
    mv = memoryview(data)
    return [bytes(mv[i : i + chunk_size]) for i in range(0, len(mv), chunk_size)]


@dataclass
class _Incoming:
    manifest: TransferManifest
    buf: bytearray
    have: bytearray  # one flag per chunk
    received: int = 0
    highest: int = -1
    duplicates: int = 0
    resets: int = 0
    next: int = 0  # every chunk below is in (only moves forward until a reset)


class Reassembler:
    """Collects chunks of announced transfers; order and duplicates do not matter.

    A transfer must be announced with :meth:`expect` (its manifest arrives in a signed
    envelope) before chunks are accepted, so an attacker cannot make the receiver buffer
    arbitrary data. ``max_total_bytes`` bounds the memory of all open transfers.
    """

    def __init__(self, max_total_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_total_bytes = max_total_bytes
        self._open: dict[str, _Incoming] = {}
        self._lock = threading.Lock()

    def expect(self, manifest: TransferManifest) -> None:
        """Announce a transfer. Re-announcing the same manifest is a no-op (idempotent)."""
        manifest.check()
        with self._lock:
            cur = self._open.get(manifest.transfer_id)
            if cur is not None:
                if cur.manifest != manifest:
                    raise WireError(
                        f"transfer {manifest.transfer_id!r}: announced again with a different manifest"
                    )
                return
            used = sum(t.manifest.total_bytes for t in self._open.values())
            if used + manifest.total_bytes > self.max_total_bytes:
                raise WireError(
                    f"transfer {manifest.transfer_id!r}: {manifest.total_bytes} bytes would exceed the "
                    f"reassembly budget ({used} of {self.max_total_bytes} in use)"
                )
            self._open[manifest.transfer_id] = _Incoming(
                manifest, bytearray(manifest.total_bytes), bytearray(manifest.chunk_count)
            )

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._open

    def add(self, chunk: Chunk | bytes) -> bool:
        """Store a chunk; True if it was new, False for a duplicate.

        Raises :class:`WireError` for an unknown transfer, a count or length that
        disagrees with the manifest.
        """
        c = decode_chunk(chunk) if isinstance(chunk, bytes | bytearray | memoryview) else chunk
        with self._lock:
            t = self._open.get(c.transfer_id)
            if t is None:
                raise WireError(f"chunk for unknown transfer {c.transfer_id!r} (seq {c.seq})")
            m = t.manifest
            if c.count != m.chunk_count or not 0 <= c.seq < m.chunk_count:
                raise WireError(
                    f"transfer {m.transfer_id!r}: chunk {c.seq}/{c.count} disagrees with manifest count {m.chunk_count}"
                )
            want = m.chunk_len(c.seq)
            if len(c.data) != want:
                raise WireError(
                    f"transfer {m.transfer_id!r}: chunk {c.seq} has {len(c.data)} bytes, expected {want}"
                )
            if t.have[c.seq]:
                t.duplicates += 1
                return False
            off = c.seq * m.chunk_size
            t.buf[off : off + want] = c.data
            t.have[c.seq] = 1
            t.received += 1
            t.highest = max(t.highest, c.seq)
            return True

    def _get(self, transfer_id: str) -> _Incoming:
        t = self._open.get(transfer_id)
        if t is None:
            raise WireError(f"unknown transfer {transfer_id!r}")
        return t

    def manifest(self, transfer_id: str) -> TransferManifest:
        """The manifest an open transfer was announced with."""
        with self._lock:
            return self._get(transfer_id).manifest

    def is_complete(self, transfer_id: str) -> bool:
        """All chunks present (the hash is checked by :meth:`finish`)."""
        with self._lock:
            t = self._get(transfer_id)
            return t.received == t.manifest.chunk_count

    def missing(self, transfer_id: str, *, upto_highest: bool = False) -> list[int]:
        """Sequence numbers not yet received, for a NACK.

        With ``upto_highest`` only gaps below the highest received chunk are listed:
        those are certainly lost, while later ones may still be in flight.
        """
        with self._lock:
            t = self._get(transfer_id)
            end = t.highest + 1 if upto_highest else t.manifest.chunk_count
            return [i for i in range(end) if not t.have[i]]

    def progress(self, transfer_id: str) -> dict[str, Any]:
        """Body for a progress/NACK envelope: ``next`` (all below received), ``highest``,
        ``missing`` (gaps below highest), ``received``, and ``resets`` (times the buffer
        was thrown away after a hash mismatch). See :meth:`TransferWindow.on_progress`.

        Bounded work and size whatever the sender did: the scans run in C over the
        per-chunk flags, ``next`` only moves forward, and at most :data:`MAX_NACK` gaps
        are listed (``highest`` is then lowered to just below the first unlisted gap).
        """
        with self._lock:
            t = self._get(transfer_id)
            count = t.manifest.chunk_count
            nxt = t.have.find(0, t.next)
            nxt = count if nxt < 0 else nxt
            t.next = nxt
            highest, gaps, pos = t.highest, list[int](), nxt
            while pos <= highest:
                gap = t.have.find(0, pos, highest + 1)
                if gap < 0:
                    break
                if len(gaps) == MAX_NACK:
                    highest = gap - 1
                    break
                gaps.append(gap)
                pos = gap + 1
            return {"xfer": transfer_id, "next": nxt, "highest": highest,
                    "missing": gaps, "received": t.received, "resets": t.resets}  # fmt: skip

    def finish(self, transfer_id: str) -> bytes:
        """Verify size and sha256, close the transfer and return its bytes.

        On a hash mismatch the transfer stays open with every chunk marked missing and
        ``resets`` incremented: the next progress report makes the sender resend it all.
        The caller may :meth:`discard` instead.
        """
        with self._lock:
            t = self._get(transfer_id)
            m = t.manifest
            if t.received != m.chunk_count:
                raise WireError(
                    f"transfer {transfer_id!r}: incomplete, {m.chunk_count - t.received} of {m.chunk_count} chunks missing"
                )
            if len(t.buf) != m.total_bytes:
                raise WireError(
                    f"transfer {transfer_id!r}: size {len(t.buf)} != manifest {m.total_bytes}"
                )
            digest = hashlib.sha256(t.buf).hexdigest()
            if digest != m.sha256:
                t.have = bytearray(m.chunk_count)
                t.received, t.highest, t.next = 0, -1, 0
                t.resets += 1
                raise WireError(
                    f"transfer {transfer_id!r}: sha256 mismatch (got {digest[:12]}..., manifest {m.sha256[:12]}...)"
                )
            del self._open[transfer_id]
            return bytes(t.buf)

    def discard(self, transfer_id: str) -> None:
        """Forget a transfer (deadline passed, round closed). Unknown ids are ignored."""
        with self._lock:
            self._open.pop(transfer_id, None)

    def duplicates(self, transfer_id: str) -> int:
        """How many duplicate chunks arrived (QoS 1 redelivery, resends)."""
        with self._lock:
            return self._get(transfer_id).duplicates


@dataclass
class TransferWindow:
    """Sender side of a transfer: at most ``window`` chunks unacknowledged at once.

    The broker drops QoS 1 messages silently when a subscriber's queue is full, so the
    sender must not run ahead of the receiver. The receiver reports progress (cumulative
    ``next``, ``highest`` seen and the ``missing`` gaps); gaps are resent first. If no
    progress arrives within the retransmission timeout the oldest unacknowledged chunks (up
    to a window) are resent (covers a lost tail chunk or a lost ack). The timeout follows
    the receiver the way TCP's does (RFC 6298): smoothed round-trip time plus four times its
    variation, sampled from chunks sent once (Karn's rule), never below ``retransmit_s``;
    so a receiver that answers slowly because it is busy is not flooded with copies.
    Silence after a timeout is a busy or absent receiver, not loss: each further timeout
    without progress doubles the wait (up to ``max_retransmit_s``) and resends one probe
    chunk instead of a window. Any report brings back the full window on the next timeout;
    the doubling stays until a report yields a clean round-trip sample (else a receiver
    slower than ``retransmit_s`` would get every window twice, forever). The waits are
    stretched by a
    per-transfer factor in [1, 1.25) taken from the transfer id, so a fleet whose uploads
    all stalled at once does not retransmit in lockstep (docs/design.md, "Transfers").
    Without this, a coordinator that falls a few seconds behind at thousands of devices
    receives every window again every few seconds and never catches up.
    ``done`` becomes true only on a final ACK carrying the manifest's sha256. Clock values
    are passed in, so tests need no sleeps.
    """

    manifest: TransferManifest
    data: bytes
    window: int = 32
    retransmit_s: float = 5.0  # the least timeout without progress (before any RTT sample)
    max_retransmit_s: float = 60.0  # the backed-off timeout stops growing here
    verify: bool = True  # False: the caller built the manifest from these very bytes
    acked: bytearray = field(init=False)
    sent: bytearray = field(init=False)
    done: bool = field(init=False, default=False)
    resends: int = field(init=False, default=0)
    _resend: list[int] = field(init=False, default_factory=list)
    _resend_set: set[int] = field(init=False, default_factory=set)
    _next_new: int = field(init=False, default=0)
    _last_progress: float | None = field(init=False, default=None)
    _resets_seen: int = field(init=False, default=0)
    _timeouts: int = field(init=False, default=0)  # consecutive timeouts without progress
    _backoff: int = field(init=False, default=0)  # doublings of the timeout in force
    _jitter: float = field(init=False, default=1.0)
    _sent_at: list[float] = field(init=False, default_factory=list)  # first send; -1: resent
    _srtt: float | None = field(init=False, default=None)  # smoothed round-trip time
    _rttvar: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise WireError(f"transfer {self.manifest.transfer_id!r}: window must be >= 1")
        if not 0 < self.retransmit_s <= self.max_retransmit_s:
            raise WireError(
                f"transfer {self.manifest.transfer_id!r}: need 0 < retransmit_s <= "
                f"max_retransmit_s, got {self.retransmit_s} and {self.max_retransmit_s}"
            )
        h = hashlib.sha256(self.manifest.transfer_id.encode()).digest()
        self._jitter = 1.0 + 0.25 * int.from_bytes(h[:4], "big") / 2**32
        if len(self.data) != self.manifest.total_bytes or (
            self.verify and hashlib.sha256(self.data).hexdigest() != self.manifest.sha256
        ):
            raise WireError(
                f"transfer {self.manifest.transfer_id!r}: data does not match its manifest"
            )
        self.acked = bytearray(self.manifest.chunk_count)
        self.sent = bytearray(self.manifest.chunk_count)
        self._sent_at = [-1.0] * self.manifest.chunk_count

    @property
    def in_flight(self) -> int:
        """Chunks sent but not yet acknowledged."""
        sent = np.frombuffer(self.sent, dtype=np.uint8)
        return int(np.count_nonzero(sent > np.frombuffer(self.acked, dtype=np.uint8)))

    @property
    def rto_s(self) -> float:
        """Retransmission timeout from the measured round trips (RFC 6298), within
        [``retransmit_s``, ``max_retransmit_s``]; ``retransmit_s`` before the first sample."""
        if self._srtt is None:
            return self.retransmit_s
        rto = self._srtt + 4.0 * self._rttvar
        return min(self.max_retransmit_s, max(self.retransmit_s, rto))

    @property
    def timeout_s(self) -> float:
        """The current wait for progress before a resend: :attr:`rto_s` doubled per
        consecutive timeout, capped at ``max_retransmit_s``, times this transfer's jitter."""
        base = min(self.max_retransmit_s, self.rto_s * 2 ** min(self._backoff, 30))
        return base * self._jitter

    def _rtt_sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2.0
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    def chunk(self, seq: int) -> bytes:
        """The framed chunk ``seq``, ready to publish on the blob topic."""
        m = self.manifest
        off = seq * m.chunk_size
        return encode_chunk(
            m.transfer_id, seq, m.chunk_count, self.data[off : off + m.chunk_len(seq)]
        )

    def wants(self, now: float) -> bool:
        """Whether :meth:`due` would return anything now (cheap: a sender with many
        transfers polls this on a timer and calls :meth:`due` only for those that do)."""
        if self.done:
            return False
        if self._resend or self._last_progress is None:
            return True
        if now - self._last_progress >= self.timeout_s:
            return True
        return self._next_new < self.manifest.chunk_count and self.in_flight < self.window

    def due(self, now: float, limit: int | None = None) -> list[int]:
        """Sequence numbers to publish now (at most ``limit``: resends first, the rest wait
        for the next call); marks them sent. Call after every event."""
        if self.done:
            return []
        if self._last_progress is None:
            self._last_progress = now
        elif now - self._last_progress >= self.timeout_s:
            # Nothing heard for a while: resend the oldest unacknowledged chunks -- a window
            # the first time, one probe after that -- and wait longer next time.
            stale = [
                i for i in range(self.manifest.chunk_count) if self.sent[i] and not self.acked[i]
            ]
            for s in stale[: self.window if self._timeouts == 0 else 1]:
                if s not in self._resend_set:
                    self._resend.append(s)
                    self._resend_set.add(s)
            self._timeouts += 1
            self._backoff += 1
            self._last_progress = now
        out: list[int] = []
        cap = self.manifest.chunk_count if limit is None else max(0, limit)
        budget = min(self.window - self.in_flight, cap)
        while self._resend and len(out) < cap:
            seq = self._resend.pop(0)
            self._resend_set.discard(seq)
            if not self.acked[seq]:
                out.append(seq)
                self.resends += 1
        budget = min(budget, cap - len(out))
        while budget > 0 and self._next_new < self.manifest.chunk_count:
            seq = self._next_new
            self._next_new += 1
            if not self.acked[seq]:
                out.append(seq)
                budget -= 1
        for s in out:
            self._sent_at[s] = -1.0 if self.sent[s] else now  # Karn: no sample from a resend
            self.sent[s] = 1
        return out

    def on_progress(self, body: Mapping[str, Any], now: float) -> None:
        """Apply a receiver progress/NACK report (see :meth:`Reassembler.progress`).

        A report saying the receiver holds nothing (``received`` 0) after it had confirmed
        chunks, or after the final ACK, means the receiver restarted and lost its buffer:
        the transfer starts over instead of stalling on chunks it will never get.
        Work per report is bounded by the report's size, not by the transfer's.
        """
        m = self.manifest
        try:
            nxt, highest = int(body["next"]), int(body["highest"])
            miss = {int(s) for s in body["missing"]}
            resets = int(body.get("resets", 0))
            received = body.get("received")
            received = None if received is None else int(received)
        except (KeyError, TypeError, ValueError):
            raise WireError(f"transfer {m.transfer_id!r}: malformed progress report") from None
        if not (0 <= nxt <= m.chunk_count and -1 <= highest < m.chunk_count) or any(
            not nxt <= s <= highest for s in miss
        ):
            raise WireError(f"transfer {m.transfer_id!r}: progress report out of range")
        if resets < self._resets_seen:
            return  # a report from before the receiver's last reset: stale
        if resets > self._resets_seen:
            # The receiver threw its buffer away (hash mismatch): start over.
            self._resets_seen = resets
            self.on_nack_all(now)
        elif received == 0 and (self.done or self.acked.find(1) >= 0):
            self.done = False  # the receiver restarted: it has none of what it confirmed
            self.on_nack_all(now)
        if self.done:
            return
        if highest >= 0 and not self.acked[highest] and highest not in miss:
            t0 = self._sent_at[highest]
            if t0 >= 0.0 and now >= t0:
                self._rtt_sample(now - t0)  # one sample per report, from its newest chunk
                self._backoff = 0
        if nxt > 0:
            self.acked[:nxt] = b"\x01" * nxt
        if highest >= nxt:
            self.acked[nxt : highest + 1] = b"\x01" * (highest + 1 - nxt)
        for s in sorted(miss):
            self.acked[s] = 0
            if s not in self._resend_set:
                self._resend.append(s)
                self._resend_set.add(s)
        self._last_progress = now
        self._timeouts = 0

    def on_nack_all(self, now: float) -> None:
        """The receiver lost everything (hash mismatch, restart): resend the whole payload."""
        self.acked = bytearray(self.manifest.chunk_count)
        self.sent = bytearray(self.manifest.chunk_count)
        self._resend.clear()
        self._resend_set.clear()
        self._next_new = 0
        self._last_progress = now
        self._timeouts = 0

    def on_final_ack(self, sha256: str) -> bool:
        """Mark done when the receiver confirms the manifest hash; False for a wrong hash."""
        if sha256 != self.manifest.sha256:
            return False
        self.done = True
        self.acked = bytearray(b"\x01" * self.manifest.chunk_count)
        return True


# --------------------------------------------------------------------------------------
# Update validation
# --------------------------------------------------------------------------------------


def validate_update(
    params: Mapping[str, np.ndarray],
    reference_shapes_dtypes: Mapping[str, tuple[tuple[int, ...], Any]],
    norm_bound: float | Mapping[str, float] | None = None,
) -> None:
    """Check a received update before a strategy sees it.

    ``reference_shapes_dtypes`` maps each expected tensor name to ``(shape, dtype)``.
    ``norm_bound`` is either one bound on the L2 norm of the whole update (float tensors
    together) or a per-tensor mapping. Raises :class:`ValidationError` naming the tensor.
    """
    missing = sorted(set(reference_shapes_dtypes) - set(params))
    if missing:
        raise ValidationError(
            f"update: tensor {missing[0]!r} missing ({len(missing)} missing in all)"
        )
    extra = sorted(set(params) - set(reference_shapes_dtypes))
    if extra:
        raise ValidationError(f"update: unexpected tensor {extra[0]!r}")
    sq_total = 0.0
    largest = ("", -1.0)
    for name, (shape, dtype) in reference_shapes_dtypes.items():
        arr = params[name]
        if not isinstance(arr, np.ndarray):
            raise ValidationError(f"update: tensor {name!r} is {type(arr).__name__}, not an array")
        if tuple(arr.shape) != tuple(shape):
            raise ValidationError(
                f"update: tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}"
            )
        if arr.dtype != np.dtype(dtype):
            raise ValidationError(
                f"update: tensor {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}"
            )
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise ValidationError(f"update: tensor {name!r} has {bad} non-finite value(s)")
            if norm_bound is None:
                continue  # no bound: the norms are not needed (half the cost per update)
            sq = float(np.sum(np.square(arr, dtype=np.float64)))
            sq_total += sq
            if sq > largest[1]:
                largest = (name, sq)
            if isinstance(norm_bound, Mapping) and name in norm_bound:
                n = math.sqrt(sq)
                if n > norm_bound[name]:
                    raise ValidationError(
                        f"update: tensor {name!r} L2 norm {n:.4g} exceeds bound {norm_bound[name]:.4g}"
                    )
    if isinstance(norm_bound, int | float) and not isinstance(norm_bound, bool):
        total = math.sqrt(sq_total)
        if total > norm_bound:
            raise ValidationError(
                f"update: L2 norm {total:.4g} exceeds bound {norm_bound:.4g} "
                f"(largest tensor {largest[0]!r}, norm {math.sqrt(largest[1]):.4g})"
            )
