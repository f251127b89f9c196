"""Chunked transfers: manifest, chunk frames, receiver-side reassembly, sender-side window.

Part of :mod:`fedcoe_edge.wire`: a payload too big for one broker message travels as
chunks announced by a :class:`TransferManifest` (sent in a signed envelope); the
:class:`Reassembler` tolerates duplicates and reordering and reports gaps for NACK, and the
:class:`TransferWindow` paces the sender, because a broker drops QoS 1 messages silently
for slow consumers.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from fedcoe_edge.errors import ConfigError, WireError
from fedcoe_edge.wire.common import HEX64_RE, ID_RE, TYPE_RE, is_int, new_msg_id

DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
"""Smallest chunk a multi-chunk manifest may declare. Receiver work is per chunk (a frame,
a progress report every few chunks), so tiny chunks let a sender multiply the receiver's
work per byte: 1-byte chunks turned a 875 KB upload into 875k handler calls."""
MAX_CHUNK_SIZE = 16 * 1024 * 1024
"""Largest chunk a daemon may be configured to send (one chunk is one broker message; a
broker's own packet limit may lower it further, see ``transport.blob.fit_chunk_size``)."""
MAX_NACK = 256
"""Most gaps one progress report lists; the report's ``highest`` is lowered to match, so
the sender never mistakes an unlisted gap for an acknowledged chunk."""
REPORT_EVERY = 4
"""A receiver reports progress every this many new chunks (and at once on a gap). A
sender whose window is smaller declares it in its manifest (``report_every``), so the
receiver reports at least once per window: otherwise a window of 1 or 2 chunks is only
ever acknowledged after the sender's retransmission timer fired (docs/protocol.md,
"Transfers", item 4)."""
DEFAULT_WINDOW = 16
"""Chunks a daemon keeps unacknowledged in one transfer (config ``window``), the device's
and the coordinator's alike."""
MAX_WINDOW = 256
"""Largest configurable window: one progress report lists at most :data:`MAX_NACK` gaps,
so every loss in a window is NACKed in one report; and a coordinator's window stays far
below a device's broker queue (Mosquitto keeps 1,000 QoS 1 messages per client by default
and drops the rest silently)."""
# the least margin of a measured retransmission timeout over the smoothed round trip
# (RFC 6298's G): coordinator and agents poll for due chunks every 50-100 ms and receivers
# report progress in batches, so round trips read to within a few ticks
RTO_GRANULARITY_S = 0.25


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
    # the receiver reports at least every this many new chunks: a sender with a window
    # below REPORT_EVERY declares its window here; absent on the wire when REPORT_EVERY,
    # so manifests of the usual windows are unchanged (and old receivers read them)
    report_every: int = REPORT_EVERY

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
        window: int = DEFAULT_WINDOW,
    ) -> TransferManifest:
        """Describe ``data``: size, chunking and sha256 for the end-to-end check; ``window``
        is the sender's, so the receiver reports at least once per window."""
        if chunk_size < 1:
            raise WireError(f"transfer: chunk_size must be positive, got {chunk_size}")
        if not is_int(window) or window < 1:
            raise WireError(f"transfer: window must be a positive integer, got {window!r}")
        m = cls(
            transfer_id=transfer_id if transfer_id is not None else new_msg_id(),
            expert_ids=tuple(int(e) for e in expert_ids),
            base_version=base_version,
            total_bytes=len(data),
            chunk_size=chunk_size,
            chunk_count=max(1, -(-len(data) // chunk_size)),
            sha256=hashlib.sha256(data).hexdigest(),
            encoding=encoding,
            report_every=min(REPORT_EVERY, window),
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
        if not isinstance(self.transfer_id, str) or not ID_RE.match(self.transfer_id):
            raise WireError(f"{w}: transfer_id must match {ID_RE.pattern}")
        if not all(is_int(e) and e >= 0 for e in self.expert_ids):
            raise WireError(f"{w}: expert_ids must be non-negative integers")
        for name in ("base_version", "total_bytes", "chunk_size", "chunk_count"):
            val = getattr(self, name)
            if not is_int(val) or val < 0:
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
        if not isinstance(self.sha256, str) or not HEX64_RE.match(self.sha256):
            raise WireError(f"{w}: sha256 must be 64 lowercase hex digits")
        if not isinstance(self.encoding, str) or not TYPE_RE.match(
            self.encoding.replace("+", ".")
        ):
            raise WireError(f"{w}: bad encoding {self.encoding!r:.40}")
        if not is_int(self.report_every) or not 1 <= self.report_every <= REPORT_EVERY:
            raise WireError(f"{w}: report_every must be an integer in 1..{REPORT_EVERY}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for an envelope body (``report_every`` only when it is not the
        default, so a manifest of a window >= REPORT_EVERY reads as it always did)."""
        d = asdict(self)
        d["expert_ids"] = list(self.expert_ids)
        if self.report_every == REPORT_EVERY:
            del d["report_every"]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TransferManifest:
        """Parse a manifest received in an envelope body; WireError when malformed."""
        if not isinstance(d, dict):
            raise WireError("transfer manifest: expected a JSON object")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d and n not in ("encoding", "report_every")]
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
    if not ID_RE.match(transfer_id) or len(tid) > 255:
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
    if not ID_RE.match(tid):
        raise WireError(f"chunk: bad transfer id {tid!r:.80}")
    seq, count = _CHUNK_SEQ.unpack_from(mv, _CHUNK_HEAD.size + tlen)
    if not 0 <= seq < count:
        raise WireError(f"chunk {tid!r}: seq {seq} outside 0..{count - 1}")
    return Chunk(tid, seq, count, bytes(mv[start:]))


def check_chunk_size(chunk_size: int, where: str) -> None:
    """The one range check of a configured chunk size: ``MIN_CHUNK_SIZE``..``MAX_CHUNK_SIZE``
    (1 KiB..16 MiB), so a daemon refuses at start what a receiver or broker would refuse
    later, chunk by chunk."""
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"{where} chunk_size must be in 1 KiB..16 MiB, got {chunk_size}")


def check_window(window: int, where: str) -> None:
    """The one range check of a configured transfer window (coordinator and agent configs
    alike): 1..``MAX_WINDOW``. Every window in that range completes a transfer at the
    receiver's pace, because the manifest makes the receiver report at least once per
    window (``report_every``)."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise ConfigError(f"{where} window must be an integer in 1..{MAX_WINDOW}, got {window!r}")


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

    def received(self, transfer_id: str) -> int:
        """New chunks of an open transfer so far (0 for an unknown one); O(1)."""
        with self._lock:
            t = self._open.get(transfer_id)
            return 0 if t is None else t.received

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
    chunk instead of a window. Any report brings back the full window on the next timeout,
    and a report that acknowledges anything new ends the doubling: with a clean sample the
    wait is the measured timeout again; when the newest chunk it acknowledges was sent twice
    (no sample, Karn) the wait keeps only the doublings that chunk's delay since its first
    send shows are needed, so a receiver slower than ``retransmit_s`` is not sent every
    window twice, while a stalled transfer never carries its longest wait into later
    windows. The window must not be below the manifest's ``report_every``, so the
    receiver reports at least once per window. The waits are stretched by a
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
    _sent_at: list[float] = field(init=False, default_factory=list)  # first send of each chunk
    _resent: bytearray = field(init=False)  # sent again since its first send: no RTT sample
    _srtt: float | None = field(init=False, default=None)  # smoothed round-trip time
    _rttvar: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise WireError(f"transfer {self.manifest.transfer_id!r}: window must be >= 1")
        if self.window < self.manifest.report_every:
            raise WireError(
                f"transfer {self.manifest.transfer_id!r}: window {self.window} is below the "
                f"manifest's report_every {self.manifest.report_every}: the receiver would not "
                f"report once per window (build it with TransferManifest.for_payload(window=...))"
            )
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
        self._resent = bytearray(self.manifest.chunk_count)

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
        # RFC 6298's clock-granularity term G: once the round trips stop varying, rttvar
        # decays to ~0 and an RTO of bare srtt fires on ordinary scheduling jitter (a pump
        # tick, a batched progress report), resending chunks that were merely on their way
        rto = self._srtt + max(RTO_GRANULARITY_S, 4.0 * self._rttvar)
        return min(self.max_retransmit_s, max(self.retransmit_s, rto))

    @property
    def timeout_s(self) -> float:
        """The current wait for progress before a resend: :attr:`rto_s` doubled per
        consecutive timeout, capped at ``max_retransmit_s``, times this transfer's jitter."""
        base = min(self.max_retransmit_s, self.rto_s * 2 ** min(self._backoff, 30))
        return base * self._jitter

    def _doublings_for(self, delay: float) -> int:
        """The fewest doublings in force (at most the current ones) whose wait, give or take
        the clock granularity, covers ``delay``: what a receiver that answered only after a
        resend showed it needs, without a round-trip sample to say more."""
        b = 0
        while b < self._backoff and (
            min(self.max_retransmit_s, self.rto_s * 2**b) * self._jitter + RTO_GRANULARITY_S
            < delay
        ):
            b += 1
        return b

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
            if self.sent[s]:
                self._resent[s] = 1  # Karn: a report cannot say which copy it answers
            else:
                self._sent_at[s], self._resent[s] = now, 0
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
        fresh = highest >= 0 and not self.acked[highest] and highest not in miss
        newest = highest if fresh else (nxt - 1 if nxt > 0 and not self.acked[nxt - 1] else -1)
        if newest >= 0:  # progress: the doubling ends (see the class docstring)
            t0 = self._sent_at[newest]
            if fresh and not self._resent[newest] and 0.0 <= t0 <= now:
                self._rtt_sample(now - t0)  # one sample per report, from its newest chunk
                self._backoff = 0
            else:
                self._backoff = self._doublings_for(now - t0 if 0.0 <= t0 <= now else 0.0)
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


@dataclass
class _Hold:
    owner: str
    nbytes: int
    progress_at: float  # admission, then the last new chunk


@dataclass
class Admission:
    """What :meth:`ReassemblyBudget.admit` decided: ``admitted``, and the transfers it
    evicted to make room (the caller drops them and counts a refusal for each)."""

    admitted: bool
    evicted: list[Any]


class ReassemblyBudget:
    """Memory for the open incoming transfers of many senders (a coordinator's uploads),
    shared so that no sender, nor many of them together, can hold it hostage.

    * **Shares.** With ``owners`` senders entitled (a round's selected devices) each is
      guaranteed ``total_bytes // owners``. What a sender holds beyond its share is borrowed
      from the shares of others: with one open transfer per sender (as the coordinator
      keeps) a transfer announced within its sender's share always gets in, by evicting
      borrowers (oldest progress first), however full the budget is.
    * **Stalled transfers make room.** A transfer with no new chunk for ``stall_s`` is
      evicted, oldest progress first, when an announce does not fit otherwise.
    * **Idle timeout.** A transfer with no new chunk for ``idle_s`` is dropped outright
      (:meth:`expire`, called on the caller's timer).

    Only an announce that still does not fit is deferred (the sender re-announces). Keys are
    the caller's (e.g. ``(device, transfer id)``). Holds are kept in order of progress, so
    the stalled ones are a prefix: :meth:`expire` and a deferred announce beyond its share
    look at that prefix only; an announce within its share may scan further, and then gets
    in. Not thread-safe: the caller holds its lock. docs/protocol.md, "Bounds".
    """

    def __init__(self, total_bytes: int, *, idle_s: float, stall_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if total_bytes < 1 or not 0 < stall_s <= idle_s:
            raise ConfigError(f"reassembly budget: need total_bytes >= 1 and 0 < stall_s <= "
                              f"idle_s, got {total_bytes}, {stall_s}, {idle_s}")
        self.total_bytes = total_bytes
        self.idle_s, self.stall_s = idle_s, stall_s
        self.owners = 1
        self.used = 0
        self._clock = clock
        self._holds: OrderedDict[Any, _Hold] = OrderedDict()  # oldest progress first

    @property
    def share(self) -> int:
        """Bytes each entitled sender is guaranteed."""
        return self.total_bytes // max(1, self.owners)

    def __len__(self) -> int:
        return len(self._holds)

    def __contains__(self, key: object) -> bool:
        return key in self._holds

    def admit(self, key: Any, owner: str, nbytes: int) -> Admission:
        """Reserve ``nbytes`` for transfer ``key`` of ``owner`` if it fits, or fits once
        borrowers (for an announce within its share) and stalled transfers are evicted,
        oldest progress first; else nothing changes (``admitted`` False)."""
        if key in self._holds:
            return Admission(True, [])
        if nbytes > self.total_bytes:
            return Admission(False, [])
        now = self._clock()
        need = self.used + nbytes - self.total_bytes
        evict: list[Any] = []
        if need > 0:
            within = nbytes <= self.share
            freed = 0
            for k, h in self._holds.items():  # oldest progress first
                stalled = now - h.progress_at >= self.stall_s
                if not (stalled or within):
                    break  # the stalled ones are a prefix; borrowers count only for `within`
                if stalled or h.nbytes > self.share:
                    evict.append(k)
                    freed += h.nbytes
                    if freed >= need:
                        break
            if freed < need:
                return Admission(False, [])
            for k in evict:
                self.release(k)
        self._holds[key] = _Hold(owner, nbytes, now)
        self.used += nbytes
        return Admission(True, evict)

    def progress(self, key: Any) -> None:
        """A new chunk of ``key`` arrived: it is not idle (unknown keys are ignored)."""
        h = self._holds.get(key)
        if h is not None:
            h.progress_at = self._clock()
            self._holds.move_to_end(key)

    def release(self, key: Any) -> None:
        """``key`` finished or was dropped: its bytes are free (unknown keys are ignored)."""
        h = self._holds.pop(key, None)
        if h is not None:
            self.used -= h.nbytes

    def expire(self) -> list[Any]:
        """Release and return the transfers with no new chunk for ``idle_s``."""
        now, out = self._clock(), []
        while self._holds:
            k, h = next(iter(self._holds.items()))
            if now - h.progress_at < self.idle_s:
                break
            self.release(k)
            out.append(k)
        return out
