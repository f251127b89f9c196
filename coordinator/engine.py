"""The round engine: a federation's rounds with no transport (docs/design.md, "The daemons: a round engine and thin handlers").

The coordinator daemon (coordinator/daemon.py) parses messages, moves bytes and calls this
engine; everything that decides a round lives here, callable with plain method calls:

* :meth:`RoundEngine.open_round` -- the strategy selects and configures, the tasks' parameters
  are written (one file per distinct expert set) and the round is opened in the store;
* :meth:`RoundEngine.accept` -- an update is claimed (:meth:`claim`), checked against the
  exact parameters its device was sent (:meth:`check_update`) and recorded (:meth:`record`):
  folded into the strategy's partial (``aggregation = "stream"``, one durable snapshot per
  batch) or kept as a file (``"batch"``), then one SQLite transaction;
* :meth:`RoundEngine.close_round` -- failures named, the strategy finalizes, the checkpoint is
  written, the round closes in the store with its accuracy.

The daemon runs the same steps split over its threads (claim and check on the handler thread,
``record`` on the persister, ACKs after it); a test drives them in one call each. The engine
holds one re-entrant lock, shared with the daemon's handlers, so every method may be called
from any thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig, FederationSettings
from coordinator.store import Store
from fedcoe_edge import protocol as P
from fedcoe_edge.checkpoint import load_arrays_file, save_arrays
from fedcoe_edge.errors import ConfigError, DataError, FedCoEError, ValidationError
from fedcoe_edge.io import atomic_write_text
from fedcoe_edge.messages import Result
from fedcoe_edge.simulation import serialized_nbytes
from fedcoe_edge.strategies import ClientResult, ClientTask, Failure, Strategy
from fedcoe_edge.streaming import Partial
from fedcoe_edge.wire import TransferManifest, decode_tensors, decompress_delta, validate_change

log = logging.getLogger("fedcoe.coordinator")

NO_UPDATE = "deadline passed with no accepted update"
# eval kind of the coordinator's own row: the global model on the devices' test splits
GLOBAL_DEVICES_EVAL = "global_devices"

# (round, results, failures) -> (applied, note for the round log): how a round is applied
Aggregator = Callable[[int, list[ClientResult], list[Failure]], tuple[bool, str]]


@dataclass
class Accepted:
    """A checked update waiting to be recorded (the daemon ACKs it once it is durable)."""

    device: str
    round: int
    result: ClientResult
    nbytes: int
    xfer: str
    encoding: str
    # set when an aggregation worker already folded it: the worker's durable partial-sum
    # snapshot holding it (coordinator/workers.py); None: the engine folds it in record()
    snapshot: Path | None = None


@dataclass
class EvalReport:
    """A device's evaluation report, stored with the next recorded batch."""

    device: str
    round: int
    kind: str
    correct: int
    total: int


@dataclass
class Closed:
    """What closing a round did (for the daemon's log line and broadcast)."""

    round: int
    applied: bool
    note: str
    version_before: int
    version_after: int
    accuracy: float | None
    summary: dict[str, Any]  # the round's row and counts, as written to its round.json


def task_file(expert_ids: Sequence[int]) -> str:
    """File of a round's task parameters for one expert set (shared by its devices)."""
    return "task_e" + "-".join(str(int(i)) for i in expert_ids) + ".safetensors"


def write_checkpoint(folder: Path, s: Strategy, fed: FederationSettings, rnd: int,
                     **extra: Any) -> None:
    """Global state under a versioned name, then model.json pointing at it (the atomic
    switch), then ``global.safetensors`` for ``load_checkpoint`` readers; older versioned
    files go. The coordinator's and the sharded leader's layout (``extra``: the leader's
    shard count), so ``fedcoe`` tools that read one read the other."""
    name = f"global-v{s.version}-r{rnd}.safetensors"
    save_arrays(folder / name, s.global_state)
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    doc = {"model": s.network_cfg.to_dict(), "algorithm": fed.algorithm, "seed": fed.seed,
           "version": s.version, "round": rnd, "global_file": name, "global_sha256": digest,
           "classes": list(fed.classes),
           "rng": s.rng.bit_generator.state,
           **s.checkpoint_extra(),
           "clients": [], **extra}
    atomic_write_text(folder / "model.json", json.dumps(doc, indent=1) + "\n")
    save_arrays(folder / "global.safetensors", s.global_state)
    for old in folder.glob("global-v*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def check_upload(cfg: CoordinatorConfig, dev: str, rnd: int, sent: dict[str, np.ndarray],
                 encoding: str, data: bytes, num_samples: int,
                 affinity: list[float] | None, metrics: dict[str, float]) -> ClientResult:
    """An upload decoded and checked against the exact parameters ``sent`` to its device:
    int8 delta decompressed, then keys, shapes, dtypes, finiteness and the norm bound
    (``validate_change``), then the affinity's length; ValidationError names the defect.
    The one check of both paths: the handler thread's (:meth:`RoundEngine.check_update`)
    and an aggregation worker's (coordinator/workers.py), so nothing is folded anywhere
    before it passed (docs/daemons.md, "Scale")."""
    payload = decode_tensors(data)
    params = decompress_delta(payload, sent) if encoding == P.ENCODING_DELTA else payload
    validate_change(params, sent, cfg.federation.norm_bound)
    # num_samples, affinity and metrics were typed, finite and in range (Result.from_wire)
    if affinity is not None:
        k = cfg.model.num_global_experts
        if len(affinity) != k:
            raise ValidationError(f"affinity must be {k} finite non-negative numbers")
    return ClientResult(dev, rnd, num_samples, params, affinity, metrics)


def _load_partial(path: Path) -> Partial:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    return Partial.from_arrays(load_arrays_file(path), meta)


class RoundEngine:
    """One federation's round state and its transitions; no MQTT, no threads of its own."""

    def __init__(self, cfg: CoordinatorConfig, strategy: Strategy, store: Store) -> None:
        self.cfg = cfg
        self.fed = cfg.federation
        self.strategy = strategy
        self.store = store
        self.state_dir = cfg.state_dir
        self.lock = threading.RLock()
        self.streaming = self.fed.aggregation == "stream"
        self.round = 0  # the open round, or the last closed one
        self.round_open = False
        self.deadline = 0.0  # monotonic time the open round's updates are due
        self.tasks: dict[str, ClientTask] = {}
        self.results: dict[str, ClientResult] = {}
        self.failed: dict[str, str] = {}
        self.settled: set[str] = set()  # this round's devices with a result or a failure
        self.persisting: set[str] = set()  # updates checked, waiting to be durable
        self.closing = False  # set while a round closes: no update is claimed any more
        self.partial: Partial | None = None
        self.snapshot: tuple[int, Path | None] = (0, None)  # newest durable partial
        self.eval_x: np.ndarray | None = None
        self.eval_y: np.ndarray | None = None
        # the training clients' own test splits, pooled: the inputs devices score their
        # personal models on, so global and personal accuracy can be read on the same images
        self.eval_clients: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ opening
    def plan(self, rnd: int, available: Sequence[str]) -> list[ClientTask]:
        """The strategy's tasks for round ``rnd`` among ``available`` devices."""
        ids = self.strategy.select_clients(rnd, list(available))
        return self.strategy.configure_round(rnd, ids)

    def open_round(self, rnd: int, tasks: list[ClientTask]) -> list[ClientTask]:
        """Open round ``rnd`` with ``tasks`` (from :meth:`plan`, or a shard's leader): the
        parameters are written once per distinct expert set, and devices holding the same
        experts share one params dict (one encoding each, whatever the fleet's size)."""
        with self.lock:
            # what FedAvg-style full exchange would move in ONE direction this round
            full = serialized_nbytes(self.strategy.global_state) * len(tasks)
            folder = self.state_dir / "rounds" / str(rnd)
            shared: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
            for t in tasks:
                key = tuple(t.expert_ids)
                if key not in shared:
                    shared[key] = t.params
                    save_arrays(folder / task_file(t.expert_ids), t.params)
                t.params = shared[key]
            self.round, self.round_open = rnd, True
            self.deadline = time.monotonic() + self.fed.deadline_s
            self.tasks = {t.client_id: t for t in tasks}
            self.results, self.failed = {}, {}
            self.settled, self.persisting = set(), set()
            self.partial = self.strategy.new_partial(rnd) if self.streaming else None
            self.snapshot = (0, None)
            self.store.open_round(rnd, sorted(self.tasks),
                                  {t.client_id: list(t.expert_ids) for t in tasks},
                                  time.time() + self.fed.deadline_s, self.strategy.version, full)
        return tasks

    # ------------------------------------------------------------------ questions
    def pending(self) -> int:
        """Selected devices of the open round with neither a result nor a failure yet."""
        with self.lock:
            return len(self.tasks) - len(self.settled)

    def owes(self, dev: str) -> bool:
        """True when ``dev`` was selected for the open round and has not settled it."""
        with self.lock:
            return (self.round_open and dev in self.tasks and dev not in self.results
                    and dev not in self.failed)

    def is_current(self, rnd: int) -> bool:
        """True when ``rnd`` is the open round."""
        with self.lock:
            return self.round_open and rnd == self.round

    def newest_closed(self) -> int:
        """The newest closed round (0 before the first)."""
        with self.lock:
            return self.round - 1 if self.round_open else self.round

    # ------------------------------------------------------------------ accepting
    def claim(self, dev: str, rnd: int) -> tuple[ClientTask | None, str | None]:
        """Reserve the open round's slot for ``dev``'s update before it is checked:
        ``(task, None)``, or ``(None, reason)`` when the update cannot count (the round
        closed or is closing, or one is already accepted or being written)."""
        with self.lock:
            if not self.round_open or rnd != self.round or self.closing:
                return None, f"update for closed round {rnd} (current round {self.round})"
            if dev in self.results or dev in self.persisting:
                return None, f"duplicate update for round {rnd} (one already accepted)"
            task = self.tasks.get(dev)
            if task is None:
                return None, f"device not selected for round {rnd}"
            self.persisting.add(dev)
            return task, None

    def check_update(self, dev: str, rnd: int, task: ClientTask, body: Result,
                     manifest: TransferManifest, data: bytes) -> ClientResult:
        """Decode and check an upload (docs/design.md, section 8): keys, shapes, dtypes,
        finiteness, the norm bound on the change made; ValidationError names the defect.
        Needs no lock (it reads only the task)."""
        aff = None if body.affinity is None else list(body.affinity)
        return check_upload(self.cfg, dev, rnd, task.params, manifest.encoding, data,
                            body.num_samples, aff, body.metrics_dict())

    def fail(self, dev: str, rnd: int, reason: str) -> bool:
        """Settle ``dev``'s task of round ``rnd`` as a failure (its update was refused, or it
        declined); False when that round is no longer open."""
        with self.lock:
            self.persisting.discard(dev)
            if not (self.round_open and rnd == self.round):
                return False
            self.failed[dev] = reason
            self.settled.add(dev)
            return True

    def release(self, dev: str) -> None:
        """Give up a claim (the update was not recorded; the device may send it again)."""
        with self.lock:
            self.persisting.discard(dev)

    def record(self, items: Sequence[Accepted | EvalReport],
               counted: Callable[[list[Accepted]], None] | None = None) -> None:
        """Make a batch durable, then count it: update files (batch aggregation) or one
        partial-sum snapshot (stream), then one SQLite transaction with the batch's
        evaluations, then the results (``counted`` runs with them, under the lock). Raises
        if anything fails to be written; then :meth:`rollback` restores the partial sums to
        the last durable snapshot."""
        evals = [e for e in items if isinstance(e, EvalReport)]
        batch = [a for a in items if isinstance(a, Accepted)]
        if not batch:
            with self.store.batch():
                for e in evals:
                    self.store.add_eval(e.round, e.device, e.kind, e.correct, e.total)
                self.store.flush_later()
            return
        rnd = batch[0].round
        folder = self.state_dir / "rounds" / str(rnd)
        seq, path = 0, folder
        mine = [a for a in batch if a.snapshot is None]
        paths = {a.device: a.snapshot for a in batch if a.snapshot is not None}
        if self.partial is not None and mine:
            for a in mine:
                self.strategy.fold(self.partial, a.result)
            seq = self.snapshot[0] + 1
            path = folder / f"acc-{seq:06d}.safetensors"
            arrays, meta = self.partial.to_arrays()
            save_arrays(path, arrays, meta)
            paths.update({a.device: path for a in mine})
        elif mine:
            for a in mine:
                paths[a.device] = folder / f"update_{a.device}.safetensors"
                save_arrays(paths[a.device], a.result.params)
        with self.store.batch():
            for e in evals:
                self.store.add_eval(e.round, e.device, e.kind, e.correct, e.total)
            for a in batch:
                r = a.result
                self.store.add_update(rnd, a.device, r.num_samples, r.affinity, r.metrics, a.nbytes,
                                      str(paths[a.device]))
                self.store.add_traffic(rnd, a.device, "up", "train", a.nbytes)
            self.store.flush_later()
        if self.partial is not None and mine:
            old, self.snapshot = self.snapshot[1], (seq, path)
            if old is not None:
                old.unlink(missing_ok=True)  # the new snapshot holds everything the old one did
        with self.lock:
            for a in batch:
                if self.partial is not None or a.snapshot is not None:
                    a.result.params = {}  # summed: the weights themselves are not kept
                self.results[a.device] = a.result
                self.persisting.discard(a.device)
                self.settled.add(a.device)
            if counted is not None:
                counted(batch)

    def rollback(self, rnd: int) -> None:
        """After a failed :meth:`record`: the partial sums as last made durable (a failed
        batch must not stay summed: its devices re-send, and would count twice)."""
        if self.partial is None:
            return
        path = self.snapshot[1]
        self.partial = self.strategy.new_partial(rnd) if path is None else _load_partial(path)

    def accept(self, dev: str, rnd: int, body: Result, data: bytes, xfer: str = "") -> ClientResult:
        """Claim, check and record one update in one call (the daemon runs these steps on
        two threads); ValidationError with the reason when it does not count."""
        task, why = self.claim(dev, rnd)
        if task is None:
            raise ValidationError(why or "update refused")
        try:
            result = self.check_update(dev, rnd, task, body, body.manifest, data)
        except (FedCoEError, ArithmeticError, ValueError, KeyError, TypeError) as exc:
            # what the daemon refuses an upload for: a failure of this round, with its reason
            self.fail(dev, rnd, f"update rejected: {exc}")
            if isinstance(exc, ValidationError):
                raise
            raise ValidationError(str(exc)) from None
        item = Accepted(dev, rnd, result, len(data), xfer or body.manifest.transfer_id,
                        body.manifest.encoding)
        try:
            self.record([item])
        except BaseException:
            self.rollback(rnd)
            self.release(dev)
            raise
        return result

    # ------------------------------------------------------------------ closing
    def failures(self) -> list[Failure]:
        """The open round's selected devices without an accepted update, with the reason."""
        with self.lock:
            return [Failure(d, self.round, self.failed.get(d, NO_UPDATE))
                    for d in sorted(self.tasks) if d not in self.results]

    def aggregate(self, rnd: int, results: list[ClientResult], failures: list[Failure]
                  ) -> tuple[bool, str]:
        """Apply the round through the strategy: ``(applied, note for the round log)``. Below
        quorum the global state is kept (the strategy still sees the failures)."""
        applied = len(results) >= self.fed.quorum
        partial = self.partial
        if applied:
            try:
                if partial is not None:
                    self.strategy.finalize(rnd, partial, failures)
                else:
                    self.strategy.aggregate_round(rnd, results, failures)
                note = f"aggregated {len(results)} update(s), {len(failures)} failure(s)"
            except (KeyError, ValueError) as exc:  # a strategy/contract mismatch: keep going
                log.error("round %d: %s failed to aggregate (%s); global state kept", rnd,
                          self.fed.algorithm, exc)
                applied, note = False, f"aggregation failed: {exc}"[:300]
        elif partial is not None:
            self.strategy.finalize(rnd, self.strategy.new_partial(rnd), failures)
            note = f"quorum not met ({len(results)} < {self.fed.quorum}); global state kept"
        else:
            self.strategy.aggregate_round(rnd, [], failures)
            note = f"quorum not met ({len(results)} < {self.fed.quorum}); global state kept"
        return applied, note

    def close_round(self, aggregate: Aggregator | None = None,
                    checkpoint: Callable[[int], None] | None = None) -> Closed:
        """Close the open round: log its failures, apply it (``aggregate``, by default
        :meth:`aggregate`), write the checkpoint, then close it in the store together with
        its accuracy (never a closed round without it) and write its ``round.json``. Every
        recorded update must be durable first (the daemon drains its persister)."""
        with self.lock:
            before = self.strategy.version
            rnd = self.round
            results = [self.results[d] for d in sorted(self.results)]
            failures = self.failures()
            for f in failures:
                log.warning("failure device=%s round=%d reason=%s", f.client_id, rnd, f.reason)
                self.store.later("add_event", rnd, f.client_id, "failure", f.reason)
            self.store.flush_later()
            applied, note = (aggregate or self.aggregate)(rnd, results, failures)
            (checkpoint or self.checkpoint)(rnd)
            acc = self.evaluate()
            self.evaluate_device_splits(rnd)
            self.store.close_round(rnd, self.strategy.version, applied, note, global_acc=acc)
            self.round_open = False
            self.partial = None
        summary = self.store.round_summary(rnd)
        atomic_write_text(self.state_dir / "rounds" / str(rnd) / "round.json",
                          json.dumps(summary, indent=1) + "\n")
        return Closed(rnd, applied, note, before, self.strategy.version, acc, summary)

    # ------------------------------------------------------------------ durability
    def checkpoint(self, rnd: int) -> None:
        """Write the global state and the strategy's state (atomically switched)."""
        write_checkpoint(self.state_dir / "checkpoint", self.strategy, self.fed, rnd)

    def resume(self) -> None:
        """Restore strategy state and the open round (if any) from the state folder; a fresh
        folder initializes the strategy."""
        s = self.strategy
        meta_path = self.state_dir / "checkpoint" / "model.json"
        ck_round = 0
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                path = meta_path.parent / meta["global_file"]
                if hashlib.sha256(path.read_bytes()).hexdigest() != meta["global_sha256"]:
                    raise DataError(f"{path}: sha256 does not match model.json")
                if meta["algorithm"] != self.fed.algorithm:
                    raise ConfigError(f"state folder {self.state_dir} holds a {meta['algorithm']!r} run, "
                                      f"config says {self.fed.algorithm!r}")
                s.global_state = load_arrays_file(path)
                s.version, ck_round = int(meta["version"]), int(meta["round"])
                s.rng.bit_generator.state = meta["rng"]
                s.restore_extra(meta)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                raise DataError(f"corrupt coordinator checkpoint {meta_path}: {exc}") from None
            log.info("resumed checkpoint: round %d, version %d", ck_round, s.version)
        else:
            s.initialize()
        last = self.store.last_round()
        if last is None:
            self.round = ck_round
            return
        rnd = int(last["round"])
        if last["state"] == "closed" or ck_round >= rnd:
            if last["state"] != "closed":  # crashed between checkpoint and the round log
                self.store.close_round(rnd, s.version, True, "closed after restart",
                                       global_acc=self.evaluate() if ck_round == rnd else None)
            self.round = max(rnd, ck_round)
            return
        # The round was open: reload its tasks and accepted updates; a fresh deadline.
        folder = self.state_dir / "rounds" / str(rnd)
        experts = json.loads(last["experts"])
        shared: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
        self.tasks = {}
        for d in json.loads(last["selected"]):
            ids = list(experts[d])
            own = folder / f"task_{d}.safetensors"  # the layout before tasks were shared
            if own.is_file():
                params = load_arrays_file(own)
            else:
                if tuple(ids) not in shared:
                    shared[tuple(ids)] = load_arrays_file(folder / task_file(ids))
                params = shared[tuple(ids)]
            self.tasks[d] = ClientTask(d, rnd, params, ids, {"version": s.version})
        self.results = {}
        rows = self.store.updates(rnd)
        snapshots = sorted({Path(u["path"]) for u in rows if Path(u["path"]).name.startswith("acc-")})
        self.partial = s.new_partial(rnd) if self.streaming else None
        if snapshots:
            if self.partial is None:
                raise DataError(f"round {rnd} in {self.state_dir} was aggregated as a stream; "
                                "set [federation] aggregation = \"stream\" to resume it")
            self.partial, self.snapshot = self._resume_partial(rnd, snapshots)
        for u in rows:
            result = ClientResult(u["device"], rnd, int(u["num_samples"]), {},
                                  json.loads(u["affinity"]), json.loads(u["metrics"]))
            if not Path(u["path"]).name.startswith("acc-"):
                result.params = load_arrays_file(Path(u["path"]))
                if self.partial is not None:
                    s.fold(self.partial, result)
                    result.params = {}
            self.results[u["device"]] = result
        self.settled = set(self.results)
        self.round, self.round_open = rnd, True
        self.deadline = time.monotonic() + self.fed.deadline_s

    def _resume_partial(self, rnd: int, snapshots: Sequence[Path]) -> tuple[Partial, tuple[int, Path | None]]:
        """The durable partial sums of an open round from the snapshots its update rows
        name: the newest of each writer (``acc-<seq>`` the engine's own, ``acc-w<i>x<tag>-<seq>``
        an aggregation worker's, coordinator/workers.py), merged. A snapshot whose clients
        another already holds (the engine's own after a restart without workers) is skipped,
        so nothing counts twice."""
        newest: dict[str, tuple[int, Path]] = {}
        for p in snapshots:
            group, _, seq = p.stem.rpartition("-")
            if seq.isdigit() and int(seq) >= newest.get(group, (-1, p))[0]:
                newest[group] = (int(seq), p)
        own = newest.get("acc")
        if set(newest) == {"acc"} and own is not None:
            return _load_partial(own[1]), own
        loaded = sorted((_load_partial(p) for _, p in newest.values()), key=lambda q: -len(q.clients))
        merged: list[Partial] = []
        seen: set[str] = set()
        for q in loaded:
            if set(q.clients) <= seen:
                continue
            merged.append(q)
            seen.update(q.clients)
        try:
            return self.strategy.merge(rnd, merged), (0, None)
        except (KeyError, ValueError) as exc:
            raise DataError(f"round {rnd} in {self.state_dir}: partial-sum snapshots do not "
                            f"merge ({exc})") from None

    def merge_partials(self, paths: Sequence[Path]) -> None:
        """Round close with aggregation workers: their durable partial sums (each the
        newest snapshot whose batch was committed) merged into the engine's, by the
        strategy's merge step, the same one a leader runs over its shards' partials
        (``Strategy.merge``; docs/daemons.md, "Scale")."""
        with self.lock:
            if self.partial is None or not paths:
                return
            self.partial = self.strategy.merge(self.round, [self.partial, *(_load_partial(p) for p in paths)])

    # ------------------------------------------------------------------ evaluation
    def load_eval(self) -> None:
        """Load the held-out set named by ``[eval]`` (none: rounds close without accuracy)."""
        e = self.cfg.eval
        if not e.dataset:
            return
        from fedcoe_edge.data import make_federation

        fed = make_federation(e.dataset, e.partition, e.num_clients, e.new_clients, e.seed, e.alpha,
                              e.min_samples)
        self.eval_x, self.eval_y = fed.x_global_test, fed.y_global_test
        if fed.clients:
            self.eval_clients = (np.concatenate([d.x_test for d in fed.clients.values()]),
                                 np.concatenate([d.y_test for d in fed.clients.values()]))

    def evaluate(self) -> float | None:
        """The global model's accuracy on the held-out set, or None without one."""
        if self.eval_x is None or self.eval_y is None:
            return None
        from fedcoe_edge.training import accuracy

        return accuracy(self.strategy.predict_global(self.eval_x), self.eval_y)

    def evaluate_device_splits(self, rnd: int) -> None:
        """The global model on the devices' own test splits (pooled), stored as the eval row
        ``(rnd, "coordinator", "global_devices")``. The held-out set above is class-balanced
        while the devices' splits carry their label skew, so only this figure and the
        devices' personal accuracy are read on the same images (docs/design.md, "Local
        level: what the demo's accuracies compare")."""
        if self.eval_clients is None:
            return
        x, y = self.eval_clients
        correct = int((self.strategy.predict_global(x).argmax(1) == y).sum())
        self.store.add_eval(rnd, P.COORDINATOR_ID, GLOBAL_DEVICES_EVAL, correct, int(len(y)))
