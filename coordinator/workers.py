"""Aggregation workers: uploads decoded, checked and folded in other processes.

One coordinator process tops out at one core: its handler thread decompressed, decoded,
validated and folded every upload, and the MQTT network thread shares the same
interpreter (docs/daemons.md, "Scale"). With ``[federation] workers = N`` (N >= 1) the
main process keeps what must be in one place (MQTT, chunk reassembly and its sha256,
claims, the round, SQLite, the ACKs) and hands each complete upload to one of N worker
processes, which:

1. check it exactly as the handler thread does (:func:`coordinator.engine.check_upload`:
   int8 delta against the exact parameters the device was sent, names, shapes, dtypes,
   finiteness, norm bound); a refused upload comes back as a one-line reason and is
   refused by the main process as before;
2. fold it (``Strategy.fold``, the defence included) into the worker's own partial sums
   for the round, in batches (at most ``BATCH_MAX`` updates or ``BATCH_S`` seconds);
3. write the new partial-sum snapshot (``rounds/<r>/acc-w<i>x<tag>-<seq>.safetensors``,
   fsynced) and name it to the main process, which commits the batch's rows in SQLite
   (each row names that snapshot), only then ACKs the devices, and tells the worker the
   batch is committed (or not: the worker goes back to its last committed snapshot).

An accepted update is thus durable before its ACK, as in-process (docs/daemons.md, "Scale").
At round close the main process waits until every upload it
handed out was answered, then merges the workers' committed snapshots into its own
partial with ``Strategy.merge`` (the leader's merge of shard partials), and the strategy
finalizes as before. A restarted coordinator merges the newest snapshot of each writer
(:meth:`coordinator.engine.RoundEngine.resume`).

What crosses the process boundary is never pickled: each message is one frame of a JSON
header and a raw byte payload (``Connection.send_bytes``): an upload's reassembled,
sha256-checked bytes (parsed in the worker by the project's safetensors decoder, nothing
executable), or the round's global state as ``encode_tensors`` bytes. Only the worker's
start-up arguments (the coordinator's own config) are pickled by ``multiprocessing``.

A worker that dies or stops answering (``STALL_S`` with uploads outstanding at round
close) is killed and replaced: the uploads it held are given up (claims released,
transfers forgotten, so each device's next chunk is unknown here and it announces its
update again, docs/protocol.md "6. Idempotency"), and its committed snapshot still counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import queue
import secrets
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig
from fedcoe_edge.checkpoint import save_arrays
from fedcoe_edge.messages import Result
from fedcoe_edge.streaming import Partial

log = logging.getLogger("fedcoe.coordinator")

BATCH_S = 0.02  # a worker gathers checked uploads for at least this long before folding them
# ... and for this many times the CPU time its last fold and snapshot took: a snapshot holds
# the worker's whole partial (its clients' rows grow with the round), so a fixed window
# would make a round's snapshot writes O(N^2); this keeps them a bounded share of its CPU.
# CPU, not wall time: a slow fsync on a busy disk must not hold the next ACKs back as well
BATCH_WRITE_FACTOR = 2.0
BATCH_MAX = 256  # ... or this many (the persister's own batch bounds, coordinator/daemon.py)
STALL_S = 60.0  # round close: a worker holding uploads with no answer for this long is killed
# workers that die this many times in a row with no answer in between are not started again:
# the coordinator checks and folds uploads in its own process from then on
MAX_RESPAWNS = 3
READY_S = 120.0  # start-up: how long the coordinator waits for its workers to be ready
_HEAD = struct.Struct("<I")  # a frame: header length, JSON header, raw payload


def _pack(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((_HEAD.pack(len(head)), head, payload))


def _unpack(frame: bytes) -> tuple[dict[str, Any], memoryview]:
    view = memoryview(frame)
    (n,) = _HEAD.unpack_from(view)
    header = json.loads(bytes(view[_HEAD.size:_HEAD.size + n]))
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, view[_HEAD.size + n:]


def snapshot_name(index: int, tag: str, seq: int) -> str:
    """A worker's partial-sum snapshot: ``acc-`` as the engine's own (resume reads both),
    then the writer (worker index and a tag new at each start), then the sequence."""
    return f"acc-w{index}x{tag}-{seq:06d}.safetensors"


@dataclass
class Job:
    """An upload handed to a worker; the main process keeps what it needs to record it."""

    id: int
    device: str
    round: int
    xfer: str
    body: Result
    nbytes: int
    experts: list[int]
    worker: int = -1
    sent_at: float = 0.0


@dataclass
class WorkerBatch:
    """A worker folded these jobs; its snapshot ``path`` holds them (durable, not yet
    committed): the persister commits the rows, then :meth:`WorkerPool.commit`."""

    worker: int
    tag: str
    seq: int
    round: int
    path: Path
    jobs: list[Job] = field(default_factory=list)


@dataclass
class PoolHandler:
    """What the pool tells the daemon (called from the pool's reader thread): a batch to
    commit, an upload refused (with its one-line reason), uploads given up (re-sent)."""

    on_batch: Callable[[WorkerBatch], None]
    on_refused: Callable[[Job, str], None]
    on_lost: Callable[[list[Job], str], None]


@dataclass
class _Slot:
    index: int
    tag: str
    proc: Any  # multiprocessing Process
    conn: Connection
    # frames for the worker, sent by the slot's own writer thread: no caller (the handler
    # thread, the persister, a round opening under the daemon's lock) ever blocks on a pipe
    # that a busy, starting or hung worker does not read
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    jobs: dict[int, Job] = field(default_factory=dict)
    answered_at: float = 0.0  # monotonic time of its last answer (or its start)
    dead: bool = False
    ready: bool = False  # it built its strategy and serves the pipe


class WorkerPool:
    """N aggregation worker processes and the main process's side of them."""

    def __init__(self, cfg: CoordinatorConfig, n: int, handler: PoolHandler) -> None:
        self.cfg = cfg
        self.n = n
        self.handler = handler
        self._ctx = mp.get_context("spawn")  # never fork a process with MQTT threads running
        self._lock = threading.Condition()
        self._slots: list[_Slot] = []
        self._next_id = 0
        self._open: bytes | None = None  # the current round's "open" frame, for a new worker
        self._round = 0
        self.committed: dict[str, Path] = {}  # worker tag -> its newest committed snapshot
        self._stopping = False
        self._reader: threading.Thread | None = None
        self.crashes = 0
        self._dead_in_a_row = 0  # deaths since the last answer from any worker

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            self._slots = [self._spawn(i) for i in range(self.n)]
        self._reader = threading.Thread(target=self._read_loop, name="coord-workers", daemon=True)
        self._reader.start()

    def _spawn(self, index: int) -> _Slot:
        tag = secrets.token_hex(3)
        mine, theirs = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, args=(theirs, self.cfg, index, tag),
                                 name=f"fedcoe-agg-{index}", daemon=True)
        proc.start()
        theirs.close()
        slot = _Slot(index, tag, proc, mine, answered_at=time.monotonic())
        threading.Thread(target=self._write_loop, args=(slot,), name=f"coord-worker-{index}-out",
                         daemon=True).start()
        if self._open is not None:
            self._send(slot, self._open)
        log.info("aggregation worker %d started (pid %d)", index, proc.pid)
        return slot

    def wait_ready(self, timeout: float = READY_S) -> bool:
        """Until every worker has built its strategy (imports included: seconds), so the
        first round's uploads do not queue behind them; False after ``timeout``."""
        end = time.monotonic() + timeout
        with self._lock:
            while not all(s.ready or s.dead for s in self._slots):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.2))
            return True

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            slots = list(self._slots)
        for s in slots:
            self._send(s, _pack({"op": "stop"}))
            s.outbox.put(None)
        for s in slots:
            s.proc.join(timeout=10)
            if s.proc.is_alive():
                s.proc.kill()
                s.proc.join(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=10)
        for s in slots:
            with contextlib.suppress(OSError):
                s.conn.close()

    def pids(self) -> list[int]:
        with self._lock:
            return [int(s.proc.pid) for s in self._slots]

    # ------------------------------------------------------------------ the main side
    def open(self, rnd: int, global_state: dict[str, np.ndarray], version: int,
             extra: dict[str, Any]) -> None:
        """Every worker starts round ``rnd`` from the server state before it (what
        ``Strategy.fold`` may read: the global state and the strategy's extras)."""
        from fedcoe_edge.wire import encode_tensors

        frame = _pack({"op": "open", "round": rnd, "version": version, "extra": extra},
                      encode_tensors(global_state))
        with self._lock:
            self._open, self._round = frame, rnd
            self.committed = {}
            slots = list(self._slots)
        for s in slots:  # a dead one is replaced with this frame
            self._send(s, frame)

    def reserve(self, device: str, rnd: int, xfer: str, body: Result, nbytes: int,
                experts: list[int]) -> Job | None:
        """Count a job as outstanding (cheap, no I/O: the daemon calls it with its lock
        held, so a round that starts closing waits for it in :meth:`drain`); None when no
        worker is alive (the daemon checks the upload in-process)."""
        with self._lock:
            live = [s for s in self._slots if not s.dead]
            if not live:
                return None
            self._next_id += 1
            slot = min(live, key=lambda s: len(s.jobs))
            job = Job(self._next_id, device, rnd, xfer, body, nbytes, list(experts), slot.index,
                      time.monotonic())
            if not slot.jobs:
                slot.answered_at = job.sent_at
            slot.jobs[job.id] = job
            return job

    def submit(self, job: Job, data: bytes) -> None:
        """Send a reserved job's bytes (without the daemon's lock: a busy worker's pipe may
        block for a moment; its answers are read by another thread meanwhile)."""
        b = job.body
        header = {"op": "job", "id": job.id, "device": job.device, "round": job.round,
                  "experts": job.experts, "encoding": b.manifest.encoding,
                  "num_samples": b.num_samples,
                  "affinity": None if b.affinity is None else list(b.affinity),
                  "metrics": b.metrics_dict()}
        with self._lock:
            slot = self._slots[job.worker]
        self._send(slot, _pack(header, data))  # a dead worker: the reader gives its jobs up

    def commit(self, batch: WorkerBatch, ok: bool) -> None:
        """The persister's verdict on a batch: committed (its snapshot is now the worker's
        durable state) or not (the worker goes back to its last committed one)."""
        if ok:
            with self._lock:
                self.committed[batch.tag] = batch.path
        with self._lock:
            slot = next((s for s in self._slots if s.tag == batch.tag), None)
        if slot is not None:
            self._send(slot, _pack({"op": "verdict", "seq": batch.seq, "ok": ok}))

    def outstanding(self) -> int:
        with self._lock:
            return sum(len(s.jobs) for s in self._slots)

    def drain(self, stop: threading.Event | None = None) -> None:
        """Until every handed-out upload is answered (folded into a batch or refused); a
        worker with uploads and no answer for ``STALL_S`` is killed (and replaced), its
        uploads given up, so a round close never hangs on one."""
        with self._lock:
            while any(s.jobs for s in self._slots):
                if stop is not None and stop.is_set():
                    return
                now = time.monotonic()
                for s in self._slots:
                    if s.jobs and not s.dead and now - s.answered_at > STALL_S:
                        log.error("aggregation worker %d gave no answer for %.0fs with %d "
                                  "upload(s); killing it", s.index, now - s.answered_at, len(s.jobs))
                        s.proc.kill()
                self._lock.wait(0.2)

    def committed_paths(self) -> list[Path]:
        with self._lock:
            return list(self.committed.values())

    # ------------------------------------------------------------------ the reader thread
    def _send(self, slot: _Slot, frame: bytes) -> None:
        if not slot.dead:
            slot.outbox.put(frame)

    def _write_loop(self, slot: _Slot) -> None:
        """A slot's writer: its frames in order, until told to stop or the pipe breaks (the
        reader thread then finds the worker dead and gives its jobs up)."""
        while True:
            frame = slot.outbox.get()
            if frame is None:
                return
            try:
                slot.conn.send_bytes(frame)
            except (OSError, ValueError):
                return

    def _read_loop(self) -> None:
        while True:
            with self._lock:
                if self._stopping and all(s.dead or not s.proc.is_alive() for s in self._slots):
                    return
                by_conn = {s.conn: s for s in self._slots if not s.dead}
            if not by_conn:
                if self._stopping:
                    return
                time.sleep(0.1)
                continue
            for conn in wait(list(by_conn), timeout=0.5):
                slot = by_conn[conn]  # type: ignore[index]
                try:
                    frame = slot.conn.recv_bytes()
                except (EOFError, OSError):
                    self._died(slot)
                    continue
                try:
                    self._answer(slot, frame)
                except Exception:  # noqa: BLE001 - one bad answer must not stop the reader
                    log.exception("aggregation worker %d: answer not handled", slot.index)

    def _answer(self, slot: _Slot, frame: bytes) -> None:
        header, _ = _unpack(frame)
        op = header.get("op")
        now = time.monotonic()
        self._dead_in_a_row = 0
        if op == "ready":
            with self._lock:
                slot.ready = True
                self._lock.notify_all()
        elif op == "batch":
            with self._lock:
                jobs = [slot.jobs.pop(int(i)) for i in header["ids"] if int(i) in slot.jobs]
                slot.answered_at = now
                self._lock.notify_all()
            batch = WorkerBatch(slot.index, slot.tag, int(header["seq"]), int(header["round"]),
                                Path(str(header["path"])), jobs)
            self.handler.on_batch(batch)
        elif op in ("refused", "lost"):
            with self._lock:
                jobs = [slot.jobs.pop(int(i)) for i in header["ids"] if int(i) in slot.jobs]
                slot.answered_at = now
                self._lock.notify_all()
            reason = str(header.get("reason", ""))[:300]
            if op == "refused":
                for job in jobs:
                    self.handler.on_refused(job, reason)
            elif jobs:
                log.warning("aggregation worker %d gave up %d upload(s): %s", slot.index,
                            len(jobs), reason)
                self.handler.on_lost(jobs, reason)
        else:
            log.warning("aggregation worker %d: unknown answer %r", slot.index, op)

    def _died(self, slot: _Slot) -> None:
        slot.proc.join(timeout=5)
        slot.outbox.put(None)
        with self._lock:
            slot.dead = True
            jobs = list(slot.jobs.values())
            slot.jobs.clear()
            stopping = self._stopping
            self._lock.notify_all()
        with contextlib.suppress(OSError):
            slot.conn.close()
        if stopping:
            return
        self.crashes += 1
        log.error("aggregation worker %d died (exit code %s) holding %d upload(s); the devices "
                  "announce them again, its committed partial sums still count", slot.index,
                  slot.proc.exitcode, len(jobs))
        if jobs:
            self.handler.on_lost(jobs, "the aggregation worker holding it died")
        self._dead_in_a_row += 1
        if self._dead_in_a_row > MAX_RESPAWNS:
            log.error("aggregation workers died %d times in a row; worker %d is not started "
                      "again (uploads are checked in-process once none is left)",
                      self._dead_in_a_row, slot.index)
            return
        with self._lock:
            if not self._stopping:
                self._slots[slot.index] = self._spawn(slot.index)


# ====================================================================== the worker process
def worker_main(conn: Connection, cfg: CoordinatorConfig, index: int, tag: str) -> None:
    """A worker process's entry point (``spawn``): serve the pipe until told to stop or it
    closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the coordinator, which stops us
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s agg-worker-{index} %(levelname)s %(message)s")
    from fedcoe_edge.strategies import make_strategy

    strategy = make_strategy(cfg.federation.algorithm, cfg.model, cfg.train, cfg.federation.seed)
    worker = _Worker(conn, cfg, strategy, index, tag)
    worker.reply({"op": "ready"})
    worker.serve()


class _Worker:
    def __init__(self, conn: Connection, cfg: CoordinatorConfig, strategy: Any, index: int,
                 tag: str) -> None:
        self.conn = conn
        self.cfg = cfg
        self.strategy = strategy
        self.index, self.tag = index, tag
        self.round = 0
        self.partial: Partial | None = None
        self.committed: Path | None = None  # snapshot of the last committed batch
        self.outstanding: tuple[int, Path, list[int]] | None = None  # (seq, path, ids) awaiting a verdict
        self.seq = 0
        self.tasks: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        self.ready: list[tuple[int, Any]] = []  # (job id, checked ClientResult)
        self.first_ready = 0.0
        self.window = BATCH_S  # how long the next batch gathers (see BATCH_WRITE_FACTOR)

    def reply(self, header: dict[str, Any]) -> None:
        self.conn.send_bytes(_pack(header))

    def serve(self) -> None:
        while True:
            timeout: float | None = None
            if self.ready and self.outstanding is None:
                timeout = max(0.0, self.first_ready + self.window - time.monotonic())
            try:
                has = self.conn.poll(timeout)
                if has:
                    header, payload = _unpack(self.conn.recv_bytes())
                    if not self.handle(header, payload):
                        return
            except (EOFError, OSError):
                return  # the coordinator is gone
            if self.ready and self.outstanding is None and (
                    not has or len(self.ready) >= BATCH_MAX
                    or time.monotonic() >= self.first_ready + self.window):
                self.flush()

    def handle(self, header: dict[str, Any], payload: memoryview) -> bool:
        op = header.get("op")
        if op == "stop":
            return False
        if op == "open":
            self.open(header, payload)
        elif op == "job":
            self.job(header, payload)
        elif op == "verdict":
            self.verdict(int(header["seq"]), bool(header["ok"]))
        return True

    def open(self, header: dict[str, Any], payload: memoryview) -> None:
        from fedcoe_edge.wire import decode_tensors

        lost = [i for i, _ in self.ready]
        if lost:  # jobs of a round that closed (cannot happen: the main drains first)
            self.reply({"op": "lost", "ids": lost, "reason": "round changed"})
        s = self.strategy
        s.global_state = decode_tensors(bytes(payload))
        s.version = int(header["version"])
        s.restore_extra(dict(header.get("extra") or {}))
        self.round = int(header["round"])
        self.partial = s.new_partial(self.round)
        self.committed, self.outstanding, self.ready = None, None, []
        self.tasks = {}

    def task(self, experts: list[int]) -> dict[str, np.ndarray]:
        from coordinator.engine import task_file
        from fedcoe_edge.checkpoint import load_arrays_file

        key = tuple(int(e) for e in experts)
        got = self.tasks.get(key)
        if got is None:
            got = self.tasks[key] = load_arrays_file(
                self.cfg.state_dir / "rounds" / str(self.round) / task_file(key))
        return got

    def job(self, h: dict[str, Any], data: memoryview) -> None:
        from coordinator.engine import check_upload
        from fedcoe_edge.errors import FedCoEError

        jid = int(h["id"])
        if int(h["round"]) != self.round or self.partial is None:
            self.reply({"op": "lost", "ids": [jid], "reason": f"worker has round {self.round}"})
            return
        try:
            sent = self.task(list(h["experts"]))
        except FedCoEError as exc:
            self.reply({"op": "lost", "ids": [jid], "reason": f"task parameters: {exc}"})
            return
        try:
            aff = h.get("affinity")
            result = check_upload(self.cfg, str(h["device"]), self.round, sent, str(h["encoding"]),
                                  bytes(data), int(h["num_samples"]),
                                  None if aff is None else [float(a) for a in aff],
                                  {str(k): float(v) for k, v in dict(h.get("metrics") or {}).items()})
        except (FedCoEError, ArithmeticError, ValueError, KeyError, TypeError) as exc:
            self.reply({"op": "refused", "ids": [jid], "reason": str(exc)})
            return
        if not self.ready:
            self.first_ready = time.monotonic()
        self.ready.append((jid, result))

    def flush(self) -> None:
        """Fold the checked uploads, write the snapshot, name it to the main process."""
        assert self.partial is not None
        batch, self.ready = self.ready, []
        t0 = time.process_time()  # the worker is one thread: its CPU is this flush's
        try:
            for _, result in batch:
                self.strategy.fold(self.partial, result)
            self.seq += 1
            path = self.cfg.state_dir / "rounds" / str(self.round) / snapshot_name(self.index, self.tag, self.seq)
            arrays, meta = self.partial.to_arrays()
            save_arrays(path, arrays, meta)
        except Exception as exc:  # noqa: BLE001 - a value the checks let through, a disk error
            self.restore()
            self.reply({"op": "lost", "ids": [i for i, _ in batch],
                        "reason": f"folding or writing failed ({type(exc).__name__}: {str(exc)[:200]})"})
            return
        self.window = max(BATCH_S, BATCH_WRITE_FACTOR * (time.process_time() - t0))
        ids = [i for i, _ in batch]
        self.outstanding = (self.seq, path, ids)
        self.reply({"op": "batch", "seq": self.seq, "round": self.round, "path": str(path), "ids": ids})

    def restore(self) -> None:
        """Back to the last committed partial sums."""
        from coordinator.engine import _load_partial

        self.partial = (self.strategy.new_partial(self.round) if self.committed is None
                        else _load_partial(self.committed))

    def verdict(self, seq: int, ok: bool) -> None:
        if self.outstanding is None or self.outstanding[0] != seq:
            return
        _, path, _ = self.outstanding
        self.outstanding = None
        if ok:
            old, self.committed = self.committed, path
            if old is not None and old != path:
                with contextlib.suppress(OSError):
                    os.unlink(old)
        else:
            self.restore()
            with contextlib.suppress(OSError):
                os.unlink(path)


__all__ = ["WorkerPool", "WorkerBatch", "Job", "PoolHandler", "snapshot_name", "BATCH_S",
           "BATCH_MAX", "STALL_S"]
