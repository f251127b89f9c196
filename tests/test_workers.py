"""Aggregation workers ([federation] workers = N, coordinator/workers.py): uploads checked
and folded in worker processes give the round the single-process result; a malformed
upload is refused in a worker with its one-line reason while the others count; a worker
that dies never hangs the round (its uploads are given up and re-sent, its committed
partial sums still count).

The engine-level tests drive the real worker processes (spawned, real pipes, real files)
with the round engine directly, so every step is visible; the daemon-level ones run the
real coordinator and device agents over the in-memory broker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig, FederationSettings
from coordinator.engine import Accepted, RoundEngine
from coordinator.harness import EmbeddedFederation, small
from coordinator.store import Store
from coordinator.workers import Job, PoolHandler, WorkerBatch, WorkerPool
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError, ValidationError
from fedcoe_edge.messages import Result
from fedcoe_edge.strategies import ClientResult, make_strategy
from fedcoe_edge.transport import MemoryBroker, Transport, Will
from fedcoe_edge.wire import TransferManifest, encode_tensors

DEVICES = ["a", "b", "c", "d"]
SAMPLES = {"a": 10, "b": 30, "c": 20, "d": 40}


def _config(root: Path, algorithm: str, workers: int, **train: Any) -> CoordinatorConfig:
    fed = FederationSettings(algorithm=algorithm, state_dir=str(root), workers=workers,
                             min_devices=len(DEVICES))
    cfg = CoordinatorConfig(federation=fed, secret=bytes(range(32)),
                            model=ModelConfig(expert_hidden=16),
                            train=TrainConfig(local_epochs=1, **train))
    cfg.validate()
    return cfg


def _engine(cfg: CoordinatorConfig) -> RoundEngine:
    f = cfg.federation
    engine = RoundEngine(cfg, make_strategy(f.algorithm, cfg.model, cfg.train, f.seed),
                         Store(cfg.state_dir / "coordinator.sqlite"))
    engine.resume()
    engine.open_round(1, engine.plan(1, DEVICES))
    return engine


def _upload(engine: RoundEngine, dev: str, bad: bool = False) -> tuple[Result, bytes]:
    """Device ``dev``'s update: its task's weights plus a small change of its own (seeded)."""
    task = engine.tasks[dev]
    rng = np.random.default_rng(sum(map(ord, dev)))
    params = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in task.params.items()}
    if bad:
        name = sorted(params)[0]
        params[name] = params[name].copy()
        params[name].flat[0] = np.nan
    data = encode_tensors(params)
    manifest = TransferManifest.for_payload(data, expert_ids=task.expert_ids, base_version=0)
    k = engine.cfg.model.num_global_experts
    aff = tuple(float(x) for x in rng.dirichlet(np.ones(k)))
    return Result(manifest, SAMPLES[dev], aff if engine.fed.algorithm == "fedcoe" else None), data


class _Driver:
    """The daemon's side of the pool, reduced to the engine calls it makes: a batch is
    recorded (rows naming the worker's snapshot) and committed; refusals and losses are
    collected for the test to read."""

    def __init__(self, engine: RoundEngine) -> None:
        self.engine = engine
        self.pool: WorkerPool | None = None
        self.refused: dict[str, str] = {}
        self.lost: list[Job] = []
        self.done = threading.Condition()

    def handler(self) -> PoolHandler:
        return PoolHandler(self.on_batch, self.on_refused, self.on_lost)

    def on_batch(self, wb: WorkerBatch) -> None:
        assert self.pool is not None
        items = [Accepted(j.device, j.round, ClientResult(j.device, j.round, j.body.num_samples, {},
                                                          None if j.body.affinity is None
                                                          else list(j.body.affinity)),
                          j.nbytes, j.xfer, j.body.manifest.encoding, snapshot=wb.path)
                 for j in wb.jobs]
        self.engine.record(items)
        self.pool.commit(wb, ok=True)
        with self.done:
            self.done.notify_all()

    def on_refused(self, job: Job, reason: str) -> None:
        self.engine.fail(job.device, job.round, f"update rejected: {reason}")
        self.refused[job.device] = reason
        with self.done:
            self.done.notify_all()

    def on_lost(self, jobs: list[Job], reason: str) -> None:
        for j in jobs:
            self.engine.release(j.device)
        self.lost += jobs
        with self.done:
            self.done.notify_all()

    def submit(self, dev: str, body: Result, data: bytes) -> None:
        assert self.pool is not None
        task, why = self.engine.claim(dev, 1)
        assert task is not None, why
        job = self.pool.reserve(dev, 1, body.manifest.transfer_id, body, len(data), list(task.expert_ids))
        assert job is not None
        self.pool.submit(job, data)

    def settle(self, want: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        with self.done:
            while len(self.engine.settled) + len(self.lost) < want:
                assert time.monotonic() < end, "workers did not answer"
                self.done.wait(0.2)


def _run_with_workers(cfg: CoordinatorConfig, uploads: dict[str, bool], workers_kill: bool = False
                      ) -> tuple[RoundEngine, _Driver]:
    engine = _engine(cfg)
    drv = _Driver(engine)
    pool = drv.pool = WorkerPool(cfg, cfg.federation.workers, drv.handler())
    pool.start()
    try:
        s = engine.strategy
        pool.open(1, s.global_state, s.version, s.checkpoint_extra())
        bodies = {d: _upload(engine, d, bad) for d, bad in uploads.items()}
        first = sorted(bodies)[0]
        if workers_kill:  # the first upload goes to a worker that is stopped, then killed
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGSTOP)
            drv.submit(first, *bodies[first])
            os.kill(pid, signal.SIGKILL)
            drv.settle(1)
            assert [j.device for j in drv.lost] == [first]
            assert pool.crashes == 1
            drv.submit(first, *bodies[first])  # the device announces its update again
        else:
            drv.submit(first, *bodies[first])
        for d in sorted(bodies)[1:]:
            drv.submit(d, *bodies[d])
        drv.settle(len(bodies) + len(drv.lost))
        pool.drain()
        engine.merge_partials(pool.committed_paths())
        engine.close_round()
    finally:
        pool.close()
        engine.store.close()
    return engine, drv


def _run_in_process(cfg: CoordinatorConfig, uploads: dict[str, bool]) -> RoundEngine:
    engine = _engine(cfg)
    for d, bad in uploads.items():
        body, data = _upload(engine, d, bad)
        if bad:
            with pytest.raises(ValidationError):
                engine.accept(d, 1, body, data)
        else:
            engine.accept(d, 1, body, data)
    engine.close_round()
    engine.store.close()
    return engine


@pytest.mark.slow
def test_worker_aggregation_equals_the_single_process_one_and_the_hand_mean(tmp_path: Path) -> None:
    """Same four updates, same round: FedAvg through two worker processes gives the global
    state of the in-process path, and both are the sample-weighted mean of the uploads
    (n = 10, 30, 20, 40), computed here by hand (the server-side defence off, so that the
    mean is the plain one)."""
    plain = {"update_clip": "none", "samples_cap": 0.0}
    uploads = dict.fromkeys(DEVICES, False)
    ref = _run_in_process(_config(tmp_path / "one", "fedavg", 0, **plain), uploads)
    got, drv = _run_with_workers(_config(tmp_path / "w", "fedavg", 2, **plain), uploads)
    assert not drv.refused and not drv.lost
    assert sorted(got.results) == DEVICES and got.strategy.version == ref.strategy.version == 1
    # the hand-computed mean: sum_i n_i x_i / sum_i n_i over the uploads as the devices sent them
    hand = _engine(_config(tmp_path / "hand", "fedavg", 0, **plain))
    sent = {d: _upload(hand, d)[1] for d in DEVICES}
    hand.store.close()
    from fedcoe_edge.wire import decode_tensors

    ups = {d: decode_tensors(b) for d, b in sent.items()}
    total = sum(SAMPLES.values())
    for name, value in ref.strategy.global_state.items():
        if name not in ups["a"]:
            continue
        want = sum(SAMPLES[d] * ups[d][name].astype(np.float64) for d in DEVICES) / total
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got.strategy.global_state[name], value, rtol=1e-6, atol=1e-7,
                                   err_msg=name)
    # every worker's snapshot is named in the update rows; both workers took uploads
    snaps = sorted(p.name for p in (tmp_path / "w" / "rounds" / "1").glob("acc-w*"))
    assert {n.split("x")[0] for n in snaps} == {"acc-w0", "acc-w1"}, snaps


@pytest.mark.slow
def test_fedcoe_through_workers_equals_in_process_and_a_malformed_update_is_refused(
        tmp_path: Path) -> None:
    """FedCoE (per-expert affinity sums): one upload carries a NaN. The worker refuses it
    with the validator's one-line reason, the round closes with the other three, and the
    global state equals the in-process run of the same updates."""
    uploads = {"a": False, "b": True, "c": False, "d": False}
    ref = _run_in_process(_config(tmp_path / "one", "fedcoe", 0), uploads)
    got, drv = _run_with_workers(_config(tmp_path / "w", "fedcoe", 2), uploads)
    assert list(drv.refused) == ["b"]
    reason = drv.refused["b"]
    assert "\n" not in reason and "finite" in reason, reason
    assert got.failed["b"] == f"update rejected: {reason}" == ref.failed["b"]
    assert sorted(got.results) == ["a", "c", "d"] and got.strategy.version == ref.strategy.version
    for name, value in ref.strategy.global_state.items():
        np.testing.assert_allclose(got.strategy.global_state[name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


@pytest.mark.slow
def test_a_worker_that_dies_holding_an_upload_does_not_hang_the_round(tmp_path: Path) -> None:
    """The only worker is stopped with an upload in its pipe, then killed: the upload is
    given up (the device re-sends it), a new worker takes over, and the round closes with
    all four updates counted once: the in-process result."""
    uploads = dict.fromkeys(DEVICES, False)
    ref = _run_in_process(_config(tmp_path / "one", "fedcoe", 0), uploads)
    got, drv = _run_with_workers(_config(tmp_path / "w", "fedcoe", 1), uploads, workers_kill=True)
    assert len(drv.lost) == 1 and not drv.refused
    assert sorted(got.results) == DEVICES
    for name, value in ref.strategy.global_state.items():
        np.testing.assert_allclose(got.strategy.global_state[name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_the_workers_knob_is_checked_in_one_place(tmp_path: Path) -> None:
    for bad, match in ((-1, "workers must be in 0..64"), (65, "workers must be in 0..64"),
                       (True, "workers must be in")):
        with pytest.raises(ConfigError, match=match):
            _config(tmp_path, "fedcoe", bad)  # type: ignore[arg-type]
    fed = FederationSettings(state_dir=str(tmp_path), workers=2, aggregation="batch")
    with pytest.raises(ConfigError, match='workers = 2 needs aggregation = "stream"'):
        CoordinatorConfig(federation=fed, secret=bytes(range(32))).validate()
    assert FederationSettings().workers == 0  # in-process unless asked


# --- the daemon ------------------------------------------------------------------------
def _memory() -> Any:
    broker = MemoryBroker()

    def make(cid: str, will: Will | None, birth: Will | None) -> Transport:
        return broker.client(cid, will=will, birth=birth)
    return make


@pytest.mark.slow
def test_the_daemon_with_a_worker_refuses_a_bad_update_and_survives_a_worker_crash(
        tmp_path: Path) -> None:
    """The real coordinator with one aggregation worker and three devices, two rounds:
    device 1 sends a NaN in round 1 (refused, its reason in the round log, the round closes
    with the other two); device 0 kills the worker just before its round-2 upload (the
    upload is given up and re-sent, or reaches the worker's successor), and round 2 counts
    all three. The final state equals the in-process coordinator's on the same run."""
    def nan_in_round_1(rnd: int, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if rnd != 1:
            return params
        name = sorted(params)[0]
        params = dict(params)
        params[name] = params[name].copy()
        params[name].flat[0] = np.nan
        return params

    killed: list[int] = []

    def federation(root: Path, workers: int) -> EmbeddedFederation:
        def kill_worker(agent: DeviceAgent, rnd: int) -> bool:
            c = fed.coordinator
            if rnd == 2 and workers and not killed and c is not None and c._workers is not None:
                killed.append(c._workers.pids()[0])
                os.kill(killed[0], signal.SIGKILL)
            return True
        # plain uploads: an int8 delta of a NaN is refused on the device already
        fed = EmbeddedFederation(root, _memory(), devices=3, rounds=2, workers=workers, compress=False,
                                 hooks={"1": AgentHooks(tamper=nan_in_round_1),
                                        "0": AgentHooks(before_upload=kill_worker)},
                                 **small())
        return fed

    results = {}
    for workers in (0, 1):
        fed = federation(tmp_path / str(workers), workers)
        fed.start()
        try:
            fed.wait_rounds(150)
            c = fed.coordinator
            assert c is not None
            rows = [c.store.round_summary(r) for r in (1, 2)]
            reasons = [e["reason"] for e in c.store.events(kind="rejected")]
            results[workers] = (dict(c.strategy.global_state), rows, reasons)
        finally:
            fed.stop()
    assert killed, "the worker was not killed"
    (want, want_rows, _), (got, rows, reasons) = results[0], results[1]
    assert [(r["accepted"], r["failed"]) for r in rows] == [(2, 1), (3, 0)]
    assert [(r["accepted"], r["failed"]) for r in want_rows] == [(2, 1), (3, 0)]
    assert any("finite" in r for r in reasons), reasons
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_a_coordinator_restarted_mid_round_merges_its_workers_snapshots(tmp_path: Path) -> None:
    """Round 2 open with two of three updates committed by the worker: the coordinator stops
    (its round stays open in the database), a new one on the same folder merges the newest
    snapshot of each writer named by the update rows, the third device's update goes to the
    new worker, and the result equals an uninterrupted in-process run."""
    from coordinator.store import Store as _Store

    want = EmbeddedFederation(tmp_path / "ref", _memory(), devices=3, rounds=3,
                              **small()).final_state(90)
    held = threading.Event()

    def hold_round2(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 2 and not held.is_set():
            held.set()
            return False  # trained, but the upload is held back until the coordinator restarts
        return True

    fed = EmbeddedFederation(tmp_path / "crash", _memory(), devices=3, rounds=3, workers=1,
                             hooks={"1": AgentHooks(before_upload=hold_round2)}, **small())
    fed.start()
    try:
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: c.round == 2 and len(c.results) == 2 and held.is_set(), 60, "round 2 half done")
        c.stop()
        for t in fed.threads:
            t.join(timeout=10)
        db = _Store(tmp_path / "crash" / "coordinator" / "coordinator.sqlite")
        rows = db.updates(2)
        db.close()
        assert len(rows) == 2 and all(Path(u["path"]).name.startswith("acc-w0x") for u in rows)
        fed.threads.clear()
        fed.coordinator = None
        coordinator = fed.start_coordinator()
        fed.wait_rounds(90)
        got = dict(coordinator.strategy.global_state)
        accepted = [coordinator.store.round_summary(r)["accepted"] for r in (1, 2, 3)]
    finally:
        fed.stop()
    assert accepted == [3, 3, 3]
    writers = {p.name.rpartition("-")[0] for p in
               (tmp_path / "crash" / "coordinator" / "rounds" / "2").glob("acc-*.safetensors")}
    assert len(writers) == 2, writers  # the first worker's and its successor's after the restart
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
