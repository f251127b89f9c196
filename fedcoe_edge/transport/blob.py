"""Chunked transfers of expert weights over any :class:`Transport`.

FedCoE (arXiv 2605.21264) ships only the experts a device needs, but even a subset is
megabytes, more than a broker takes in one packet and more than its per-client queue
holds. :class:`BlobSender` publishes chunks on a blob topic with a window of chunks in
flight; :class:`BlobReceiver` reassembles them and answers with progress reports (which
double as NACKs of gaps) and a final ACK carrying the verified sha256. Both are agnostic
of the control channel: the caller carries the manifest and the reports inside signed
envelopes on the ctl topics (docs/protocol.md, "Transfers").
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedcoe_edge.errors import WireError
from fedcoe_edge.transport.base import Transport
from fedcoe_edge.wire import (
    DEFAULT_CHUNK_SIZE,
    REPORT_EVERY,
    Reassembler,
    TransferManifest,
    TransferWindow,
    chunk_overhead,
    decode_chunk,
    new_msg_id,
)

__all__ = [
    "XFER_PROGRESS",
    "XFER_DONE",
    "BlobSender",
    "BlobReceiver",
    "fit_chunk_size",
    "open_blob",
]

XFER_PROGRESS = "xfer_progress"
"""Envelope type of a receiver progress report / NACK (body: Reassembler.progress)."""
XFER_DONE = "xfer_done"
"""Envelope type of the final ACK (body: ``{"xfer", "sha256"}``)."""

ReportFn = Callable[[str, dict[str, Any]], None]


def fit_chunk_size(
    transport: Transport, topic: str, transfer_id: str, preferred: int = DEFAULT_CHUNK_SIZE
) -> int:
    """The largest chunk size <= ``preferred`` whose framed publish fits the broker limit."""
    room = transport.max_payload(topic) - chunk_overhead(transfer_id)
    if room < 1024:
        raise WireError(
            f"topic {topic!r}: broker maximum packet size {transport.max_packet_size} leaves "
            f"no room for chunks"
        )
    return min(preferred, room)


def open_blob(
    transport: Transport,
    topic_for: Callable[[str], str],
    data: bytes,
    *,
    chunk_size: int,
    window: int,
    transfer_id: str | None = None,
    base: TransferManifest | None = None,
    expert_ids: Iterable[int] = (),
    base_version: int = 0,
    encoding: str = "safetensors",
    verify: bool = True,
    budget: Callable[[], int] | None = None,
) -> BlobSender:
    """The one recipe of every chunked send (docs/protocol.md, "Transfers"): a transfer id
    (``transfer_id``, else a new one), its topic (``topic_for(id)``), the largest chunk size
    <= ``chunk_size`` whose framed publish the broker takes on that topic, the manifest, and
    the sender. The manifest is hashed here, or, for one payload sent to many receivers,
    ``base`` (hashed once) re-chunked under this id. The caller announces
    ``sender.manifest`` in its own signed envelope and feeds the sender the reports."""
    xid = transfer_id if transfer_id is not None else new_msg_id()
    topic = topic_for(xid)
    size = fit_chunk_size(transport, topic, xid, chunk_size)
    if base is None:
        manifest = TransferManifest.for_payload(data, expert_ids=expert_ids,
                                                base_version=base_version, chunk_size=size,
                                                transfer_id=xid, encoding=encoding, window=window)
    else:
        if len(data) != base.total_bytes:
            raise WireError(f"open_blob: {len(data)} bytes to send under a manifest of "
                            f"{base.total_bytes} bytes")
        manifest = dataclasses.replace(base, transfer_id=xid, chunk_size=size,
                                       chunk_count=max(1, -(-len(data) // size)),
                                       report_every=min(REPORT_EVERY, window))
        manifest.check()  # what for_payload checks on the other path
    return BlobSender(transport, topic, manifest, data, window=window, verify=verify,
                      budget=budget)


class BlobSender:
    """Sends one payload; feed it the receiver's reports, then :meth:`wait` or poll ``done``.

    Thread-safe: :meth:`on_progress` / :meth:`on_done` run on the handler thread while
    :meth:`wait` (or a daemon's timer calling :meth:`pump`) runs elsewhere.
    """

    def __init__(
        self,
        transport: Transport,
        topic: str,
        manifest: TransferManifest,
        data: bytes,
        *,
        window: int = 32,
        retransmit_s: float = 2.0,
        qos: int = 1,
        clock: Callable[[], float] = time.monotonic,
        verify: bool = True,
        budget: Callable[[], int] | None = None,
    ) -> None:
        """``verify=False`` skips re-hashing ``data`` against the manifest: for a sender that
        built the manifest from these bytes and sends them to many receivers. ``budget``
        (shared by many senders) says how many chunks may be published right now; what it
        holds back goes out on a later :meth:`pump`, so one process sending to thousands of
        devices keeps a bounded backlog in its MQTT client instead of every payload."""
        transport.check_size(
            topic, manifest.chunk_size + chunk_overhead(manifest.transfer_id), qos, False
        )
        self.manifest = manifest
        self._t = transport
        self._topic = topic
        self._qos = qos
        self._clock = clock
        self._win = TransferWindow(manifest, data, window=window, retransmit_s=retransmit_s,
                                   verify=verify)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.chunks_published = 0
        self._budget = budget

    @property
    def done(self) -> bool:
        """True once the receiver confirmed the sha256."""
        return self._done.is_set()

    @property
    def resends(self) -> int:
        return self._win.resends

    def pump(self) -> int:
        """Publish what the window allows now (call on a timer, too: it drives resends).

        While the transport is down nothing is queued: the stall timer resends after the
        reconnect instead of piling duplicates into the client's offline queue.
        """
        if not self._t.connected:
            return 0
        with self._lock:
            now = self._clock()
            if not self._win.wants(now):
                return 0
            limit = None if self._budget is None else self._budget()
            if limit is not None and limit <= 0:
                return 0
            frames = [self._win.chunk(s) for s in self._win.due(now, limit)]
        for f in frames:
            self._t.publish(self._topic, f, qos=self._qos)
        self.chunks_published += len(frames)
        return len(frames)

    def on_progress(self, body: Mapping[str, Any]) -> None:
        """Apply an ``xfer_progress`` report, then publish what it frees or asks for."""
        with self._lock:
            self._win.on_progress(body, self._clock())
            if not self._win.done and self._done.is_set():
                self._done.clear()  # the receiver restarted after our final ACK
        self.pump()

    def on_done(self, body: Mapping[str, Any]) -> bool:
        """Apply an ``xfer_done`` report; True if it confirmed the right hash."""
        ok = self._win.on_final_ack(str(body.get("sha256", "")))
        if ok:
            self._done.set()
        return ok

    def wait(self, timeout: float, poll_s: float = 0.1) -> bool:
        """Block until done or ``timeout``; pumps the retransmit timer meanwhile.

        Never call it from a handler: the reports it waits for arrive on that thread.
        """
        if self._t.is_handler_thread():
            raise RuntimeError(
                "BlobSender.wait() called on the handler thread: it would stall delivery"
            )
        deadline = time.monotonic() + timeout
        self.pump()
        while not self._done.wait(poll_s):
            if time.monotonic() >= deadline:
                return False
            self.pump()
        return True


@dataclass
class _RecvState:
    every: int  # report every this many new chunks: the receiver's, or the sender's window
    since_report: int = 0
    highest: int = -1
    dup_reported: bool = False


class BlobReceiver:
    """Receives announced transfers; ``report(type, body)`` sends a ctl message back.

    Reports go out every ``ack_every`` new chunks, or every ``report_every`` of the
    transfer's manifest when that is smaller (a sender's window below ``ack_every``: it
    hears from the receiver once per window instead of only after its timer fired), at
    once on a gap (a NACK) or on the first duplicate after progress (the sender is
    retransmitting, so it lacks news).
    When the hash checks out, :meth:`on_chunk` returns the payload; the final
    ``xfer_done`` goes out when the caller calls :meth:`ack` — after it has persisted
    what it received (docs/design.md section 8: persist, then acknowledge) — or at once with
    ``auto_ack=True``. Completed transfers are remembered, so a late duplicate re-sends
    the final ACK (or is ignored while the ACK is pending) instead of failing.
    """

    def __init__(
        self,
        report: ReportFn,
        *,
        reassembler: Reassembler | None = None,
        ack_every: int = REPORT_EVERY,
        remember: int = 256,
        auto_ack: bool = False,
    ) -> None:
        self.reassembler = reassembler if reassembler is not None else Reassembler()
        self._report = report
        self._ack_every = max(1, ack_every)
        self._remember = remember
        self._state: dict[str, _RecvState] = {}
        self._auto_ack = auto_ack
        # transfer id -> sha256 once acknowledged, None while the caller has not acked yet
        self._completed: OrderedDict[str, str | None] = OrderedDict()
        self._finished: dict[str, str] = {}
        self._lock = threading.RLock()

    def expect(self, manifest: TransferManifest) -> None:
        """Accept chunks for ``manifest`` (idempotent; a completed transfer is re-ACKed)."""
        with self._lock:
            if manifest.transfer_id in self._completed:
                self._resend_done(manifest.transfer_id)
                return
            self.reassembler.expect(manifest)
            self._state.setdefault(manifest.transfer_id, self._new_state(manifest))

    def on_chunk(self, payload: bytes) -> tuple[TransferManifest, bytes] | None:
        """Handle one blob message; returns ``(manifest, data)`` when a transfer completes.

        Raises :class:`WireError` for garbage, unknown transfers and a failed sha256 (the
        buffer is reset and the report makes the sender start over).
        """
        chunk = decode_chunk(payload)
        xid = chunk.transfer_id
        with self._lock:
            if xid in self._completed:
                self._resend_done(xid)
                return None
            is_new = self.reassembler.add(chunk)
            st = self._state.get(xid)
            if st is None:
                st = self._state[xid] = self._new_state(self.reassembler.manifest(xid))
            if self.reassembler.is_complete(xid):
                manifest = self.reassembler.manifest(xid)
                try:
                    data = self.reassembler.finish(xid)
                except WireError:
                    st.since_report, st.highest, st.dup_reported = 0, -1, False
                    self._report(XFER_PROGRESS, self.reassembler.progress(xid))
                    raise
                del self._state[xid]
                self._complete(xid, manifest.sha256)
                return manifest, data
            gap = is_new and chunk.seq > st.highest + 1
            st.highest = max(st.highest, chunk.seq)
            st.since_report += 1
            due = st.since_report >= st.every or gap
            if is_new:
                st.dup_reported = False
            elif not st.dup_reported:
                due, st.dup_reported = True, True
            if due:
                st.since_report = 0
                self._report(XFER_PROGRESS, self.reassembler.progress(xid))
        return None

    def adopt(self, manifest: TransferManifest) -> None:
        """Record ``manifest``'s transfer as completed with bytes that came another way (a
        shared download whose sha256 the caller checked against this manifest,
        fedcoe_edge/transport/shared.py): with ``auto_ack`` the final ACK goes out now, and
        a re-announce or a late chunk of it is answered with that ACK, as for any completed
        transfer."""
        xid = manifest.transfer_id
        with self._lock:
            self.reassembler.discard(xid)
            self._state.pop(xid, None)
            self._complete(xid, manifest.sha256)

    def _complete(self, xid: str, sha256: str) -> None:
        """Remember ``xid`` as finished with ``sha256`` (the last ``remember`` of them, so a
        re-announce or a late chunk is answered with the final ACK) and, with ``auto_ack``,
        send that ACK now. Called with the lock held."""
        self._completed[xid] = None
        self._finished[xid] = sha256
        while len(self._completed) > self._remember:
            old, _ = self._completed.popitem(last=False)
            self._finished.pop(old, None)
        if self._auto_ack:
            self.ack(xid)

    def _new_state(self, manifest: TransferManifest) -> _RecvState:
        return _RecvState(every=max(1, min(self._ack_every, manifest.report_every)))

    def ack(self, transfer_id: str) -> None:
        """Send the final ACK for a completed transfer (idempotent). Call it once what
        :meth:`on_chunk` returned is safely stored, or rejected for good."""
        with self._lock:
            sha = self._finished.get(transfer_id)
            if sha is None:
                raise WireError(f"ack: transfer {transfer_id!r} has not completed here")
            self._completed[transfer_id] = sha
            self._report(XFER_DONE, {"xfer": transfer_id, "sha256": sha})

    def _resend_done(self, transfer_id: str) -> None:
        sha = self._completed[transfer_id]
        if sha is not None:  # a duplicate: the sender missed our ACK
            self._report(XFER_DONE, {"xfer": transfer_id, "sha256": sha})

    def completed(self, transfer_id: str) -> bool:
        """Whether ``transfer_id`` finished here (and is still remembered): a chunk of it
        is a retransmission to answer with the final ACK, not an unknown transfer."""
        with self._lock:
            return transfer_id in self._completed

    def is_open(self, transfer_id: str) -> bool:
        """Whether ``transfer_id`` was announced and is still being reassembled."""
        with self._lock:
            return transfer_id in self.reassembler

    def received(self, transfer_id: str) -> int:
        """New chunks of an open transfer received so far (0 when it is not open): a
        caller that bounds idle transfers counts progress by it, never by duplicates."""
        with self._lock:
            return self.reassembler.received(transfer_id)

    def nudge(self, transfer_id: str) -> None:
        """Send a progress report now (e.g. from a timer when chunks stop arriving)."""
        with self._lock:
            if transfer_id in self.reassembler:
                self._report(XFER_PROGRESS, self.reassembler.progress(transfer_id))

    def forget(self, transfer_id: str) -> None:
        """Forget a completed transfer the caller could not keep (e.g. storing it failed):
        its late chunks then count as unknown, so the sender is told to announce it again."""
        with self._lock:
            self._completed.pop(transfer_id, None)
            self._finished.pop(transfer_id, None)
            self.reassembler.discard(transfer_id)
            self._state.pop(transfer_id, None)

    def discard(self, transfer_id: str) -> None:
        """Drop an open transfer (deadline passed)."""
        with self._lock:
            self.reassembler.discard(transfer_id)
            self._state.pop(transfer_id, None)
