"""The leader <-> shard channel: signed control envelopes plus chunked, sha256-checked blobs.

Both ends of sharded aggregation (coordinator/leader.py, coordinator/shard.py) move arrays
that outgrow one broker packet: the global state down, a shard's partial sums up. They use
the same pieces as the device channel (:class:`BlobSender`, :class:`BlobReceiver`, signed
envelopes whose manifest carries the payload's sha256), so a partial is authenticated the
way a device's update is: the HMAC covers the manifest, the manifest pins the bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedcoe_edge import protocol as P
from fedcoe_edge.errors import FedCoEError, WireError
from fedcoe_edge.protocol import retry_delay
from fedcoe_edge.transport import Transport
from fedcoe_edge.transport.blob import (
    XFER_DONE,
    XFER_PROGRESS,
    BlobReceiver,
    BlobSender,
    open_blob,
)
from fedcoe_edge.wire import TransferManifest

log = logging.getLogger("fedcoe.peerlink")

STALE_S = 900.0  # a transfer nobody finished in this long is dropped


@dataclass
class _Out:
    peer: str
    sender: BlobSender
    announce: tuple[str, dict[str, Any], int]
    created: float
    announced_at: float = 0.0
    announces: int = 0
    started: bool = False


class PeerLink:
    """One side of the channel. ``ctl_topic(peer)`` / ``blob_topic(peer, xfer)`` say where
    this side publishes to ``peer``; ``key(peer)`` is the HMAC key shared with it."""

    def __init__(self, transport: Transport, messenger: P.Messenger, ctl_topic: Callable[[str], str],
                 blob_topic: Callable[[str, str], str], key: Callable[[str], bytes | None],
                 chunk_size: int, window: int) -> None:
        self.transport = transport
        self.messenger = messenger
        self._ctl_topic, self._blob_topic, self._key = ctl_topic, blob_topic, key
        self.chunk_size, self.window = chunk_size, window
        self._lock = threading.Lock()
        self._out: dict[str, _Out] = {}
        self._receivers: dict[str, BlobReceiver] = {}

    def send(self, peer: str, type: str, body: dict[str, Any], rnd: int) -> None:
        key = self._key(peer)
        if key is None:
            raise WireError(f"no key for peer {peer!r}")
        self.messenger.send(self._ctl_topic(peer), type, peer, body, key, round=rnd)

    def send_blob(self, peer: str, type: str, body: dict[str, Any], data: bytes, rnd: int) -> str:
        """Start a chunked transfer of ``data``; its manifest travels in ``body["manifest"]``
        of a ``type`` envelope, repeated until the peer reports progress."""
        sender = open_blob(self.transport, lambda xid: self._blob_topic(peer, xid), data,
                           chunk_size=self.chunk_size, window=self.window)
        manifest = sender.manifest
        xid = manifest.transfer_id
        announce = (type, {**body, "manifest": manifest.to_dict()}, rnd)
        now = time.monotonic()
        with self._lock:
            self._out[xid] = _Out(peer, sender, announce, now)
        self._announce(xid)
        return xid

    def _announce(self, xid: str) -> None:
        with self._lock:
            out = self._out.get(xid)
            if out is None:
                return
            out.announced_at, out.announces = time.monotonic(), out.announces + 1
        type_, body, rnd = out.announce
        self.send(out.peer, type_, body, rnd)

    def done(self, xid: str) -> bool:
        """True once the peer confirmed the sha256 (or the transfer is unknown here)."""
        with self._lock:
            out = self._out.get(xid)
        return out is None or out.sender.done

    def on_report(self, peer: str, type: str, body: dict[str, Any]) -> None:
        """An ``xfer_progress`` / ``xfer_done`` report of the peer for one of our transfers."""
        xid = body.get("xfer")
        with self._lock:
            out = self._out.get(xid) if isinstance(xid, str) else None
        if out is None or out.peer != peer:
            return
        if type == XFER_PROGRESS:
            out.started = True
            out.sender.on_progress(body)
        elif type == XFER_DONE and out.sender.on_done(body):
            with self._lock:
                self._out.pop(xid, None)  # type: ignore[arg-type]

    def expect(self, peer: str, manifest: TransferManifest) -> None:
        self._receiver(peer).expect(manifest)
        self._receiver(peer).nudge(manifest.transfer_id)

    def on_chunk(self, peer: str, payload: bytes) -> tuple[TransferManifest, bytes] | None:
        """A blob message from ``peer``; the payload once its transfer completes (ACKed at
        once: the receiving side keeps it in memory and acts on it, nothing to persist first)."""
        return self._receiver(peer).on_chunk(payload)

    def _receiver(self, peer: str) -> BlobReceiver:
        with self._lock:
            rcv = self._receivers.get(peer)
            if rcv is None:
                def report(type: str, body: dict[str, Any], peer: str = peer) -> None:
                    try:
                        self.send(peer, type, body, 0)
                    except FedCoEError as exc:
                        log.warning("report to %s: %s", peer, exc)
                rcv = self._receivers[peer] = BlobReceiver(report, auto_ack=True)
            return rcv

    def pump(self) -> None:
        """Call on a timer: drives chunk windows and retransmits, repeats unanswered
        announces (a lost QoS 1 message), forgets transfers nobody finished."""
        now = time.monotonic()
        with self._lock:
            outs = list(self._out.items())
        for xid, out in outs:
            try:
                if out.started:
                    out.sender.pump()
                elif now - out.announced_at > retry_delay(out.announces):
                    self._announce(xid)
            except FedCoEError as exc:
                log.warning("transfer %s to %s: %s", xid, out.peer, exc)
            if now - out.created > STALE_S:
                with self._lock:
                    self._out.pop(xid, None)

