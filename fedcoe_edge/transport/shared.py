"""Shared downloads: one retained copy of a payload per federation, not one per device.

Devices that are sent the same bytes (the same expert set of the same version, the trunk
file) used to get one chunked transfer each on their own ``dn/{dev}/blob`` topic, so the
broker held one copy per device. Here the coordinator publishes each distinct payload once,
as retained chunk messages on ``fl/v1/{federation}/shared/{id}/{seq}`` (``id``: the first 32
hex digits of its sha256), and each device's signed ``task`` / ``model`` envelope names it
(``shared``: :class:`~fedcoe_edge.messages.SharedRef`). The device subscribes, reassembles,
checks size and sha256 against its OWN authenticated manifest, and falls back to the
windowed per-device transfer of the same manifest when chunks are missing, late or wrong
(docs/protocol.md, "Shared downloads"). The per-device transfer stays the protocol every
agent speaks; the shared copy is an optimisation a device may ignore.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fedcoe_edge.errors import WireError
from fedcoe_edge.messages import SHARED_ID_LEN, SharedRef
from fedcoe_edge.transport.base import Transport
from fedcoe_edge.transport.blob import fit_chunk_size
from fedcoe_edge.transport.topics import Topics
from fedcoe_edge.wire import Reassembler, TransferManifest, decode_chunk, encode_chunk

__all__ = [
    "SHARED_EXPIRY_S",
    "SHARED_IDLE_S",
    "SharedDownload",
    "clear_shared",
    "publish_shared",
    "shared_id",
]

# Retained chunks carry this message expiry: a coordinator killed before it cleared them
# leaves nothing in the broker for longer. Live copies are re-published at half of it.
SHARED_EXPIRY_S = 3600
# A device falls back to its per-device transfer after this long without a new shared chunk.
# Retained chunks arrive right after the SUBACK on an idle broker, but 5,000 devices
# subscribing within seconds on a loaded host took more than 15 s (933 needless fallbacks
# in the fleet benchmark); a broker or ACL that serves none is noticed after this long.
SHARED_IDLE_S = 60.0


def shared_id(sha256: str) -> str:
    """The id of the shared download of the payload with this sha256 (a prefix of it)."""
    return sha256[:SHARED_ID_LEN]


def publish_shared(transport: Transport, topics: Topics, data: bytes, sha256: str,
                   chunk_size: int, expiry_s: int = SHARED_EXPIRY_S) -> SharedRef:
    """Publish ``data`` (whose sha256 the caller computed) once as retained QoS 1 chunks,
    one topic per chunk, and return the reference a device's envelope carries. The chunk
    size is the largest <= ``chunk_size`` the broker takes on the longest of these topics."""
    sid = shared_id(sha256)
    longest = topics.shared_chunk(sid, max(0, -(-len(data) // max(1, chunk_size)) - 1))
    size = fit_chunk_size(transport, longest + "0", sid, chunk_size)  # +1 digit of margin
    count = max(1, -(-len(data) // size))
    for seq in range(count):
        frame = encode_chunk(sid, seq, count, data[seq * size:(seq + 1) * size])
        transport.publish(topics.shared_chunk(sid, seq), frame, qos=1, retain=True,
                          expiry_s=expiry_s)
    return SharedRef(sid, size, count)


def clear_shared(transport: Transport, topics: Topics, ref: SharedRef) -> None:
    """Remove the retained chunks of ``ref`` from the broker (an empty retained message on
    each topic): the version they belong to is superseded."""
    for seq in range(ref.chunk_count):
        transport.publish(topics.shared_chunk(ref.id, seq), b"", qos=1, retain=True)


@dataclass
class SharedDownload:
    """One device's reassembly of a shared payload, bounded by its signed manifest.

    Only the bytes the device's own authenticated envelope announced are accepted: the
    reassembly manifest is the signed one (size, sha256, encoding) under the shared id and
    chunking (:meth:`SharedRef.manifest_for`), its buffer is that size and nothing more, and
    :meth:`add` returns the bytes only when their sha256 is the signed one."""

    ref: SharedRef
    manifest: TransferManifest  # the device's own (per-device transfer id)
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0  # monotonic time of the last new chunk (or the start)

    def __post_init__(self) -> None:
        self._shared = self.ref.manifest_for(self.manifest)
        self._rx = Reassembler(max_total_bytes=self._shared.total_bytes)
        self._rx.expect(self._shared)
        self.last = self.started

    @property
    def received(self) -> int:
        return self._rx.received(self.ref.id)

    def idle_s(self, now: float) -> float:
        return now - self.last

    def add(self, payload: bytes, now: float | None = None) -> bytes | None:
        """Take one shared chunk message; the payload's bytes once complete and verified.
        WireError for a chunk that is not this download's, or a payload whose sha256 is not
        the signed manifest's (the caller falls back to the per-device transfer)."""
        chunk = decode_chunk(payload)
        if chunk.transfer_id != self.ref.id:
            raise WireError(f"shared chunk of {chunk.transfer_id!r}, not {self.ref.id!r}")
        if self._rx.add(chunk):
            self.last = time.monotonic() if now is None else now
        if not self._rx.is_complete(self.ref.id):
            return None
        return self._rx.finish(self.ref.id)  # size and sha256 against the signed manifest
