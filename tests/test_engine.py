"""The round engine with plain calls: a whole federation with no transport.

``coordinator/engine.py`` holds what decides a round (open, accept, close, checkpoint,
resume); the daemon only parses messages and moves bytes. These tests drive two rounds of
FedCoE on a tiny model through the engine's methods: the devices train in-process with the
strategy's own ``client_update`` and upload what an agent would (a safetensors payload and
its manifest), and the tests read what a deployment leaves behind: the store's rows, the
task and update files, the checkpoint and its version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig, EvalSettings, FederationSettings
from coordinator.engine import GLOBAL_DEVICES_EVAL, RoundEngine, task_file
from coordinator.store import Store
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.errors import ValidationError
from fedcoe_edge.messages import Result
from fedcoe_edge.strategies import ClientTask, make_strategy
from fedcoe_edge.wire import TransferManifest, encode_tensors

DEVICES = ["0", "1", "2"]
SEED = 3


def config(root: Path, aggregation: str) -> CoordinatorConfig:
    fed = FederationSettings(id="engine", algorithm="fedcoe", seed=SEED, rounds=2,
                             min_devices=len(DEVICES), quorum=2, state_dir=str(root),
                             aggregation=aggregation)
    return CoordinatorConfig(federation=fed, secret=bytes(32),
                             model=ModelConfig(expert_hidden=16),
                             train=TrainConfig(local_epochs=1),
                             eval=EvalSettings(dataset="digits", num_clients=len(DEVICES),
                                               seed=SEED))


def engine_at(cfg: CoordinatorConfig) -> RoundEngine:
    """What the daemon's start does before it connects: build, load the eval set, resume."""
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    s = make_strategy(cfg.federation.algorithm, cfg.model, cfg.train, cfg.federation.seed)
    e = RoundEngine(cfg, s, Store(cfg.state_dir / "coordinator.sqlite"))
    e.load_eval()
    e.resume()
    return e


def upload(e: RoundEngine, task: ClientTask, data_of: dict, *, poison: bool = False
           ) -> tuple[Result, bytes]:
    """One device's trained update as it goes on the wire: the encoded tensors and the
    ``result`` body announcing them (manifest, samples, affinity, metrics)."""
    result, _ = e.strategy.client_update(task, None, data_of[task.client_id])
    params = dict(result.params)
    if poison:
        name = next(k for k, v in params.items() if np.issubdtype(v.dtype, np.floating))
        params[name] = np.full_like(params[name], np.nan)
    data = encode_tensors(params)
    manifest = TransferManifest.for_payload(data, expert_ids=task.expert_ids,
                                            base_version=e.strategy.version)
    body = Result(manifest, result.num_samples,
                  None if result.affinity is None else tuple(float(a) for a in result.affinity),
                  tuple(sorted((k, float(v)) for k, v in result.metrics.items())))
    return body, data


@pytest.fixture(scope="module")
def data_of() -> dict:
    fed = make_federation("digits", "dirichlet", len(DEVICES), 0, SEED, 0.5, 20)
    return fed.clients


@pytest.mark.parametrize("aggregation", ["stream", "batch"])
def test_two_rounds_by_plain_calls(tmp_path: Path, data_of: dict, aggregation: str) -> None:
    cfg = config(tmp_path / "coordinator", aggregation)
    e = engine_at(cfg)
    assert (e.round, e.round_open, e.strategy.version) == (0, False, 0)

    # round 1: every device selected; one update is poisoned (NaN) and counts as a failure
    tasks = e.open_round(1, e.plan(1, DEVICES))
    assert sorted(t.client_id for t in tasks) == DEVICES
    for t in tasks:
        assert (cfg.state_dir / "rounds" / "1" / task_file(t.expert_ids)).is_file()
    opened = e.store.last_round()
    assert opened is not None and opened["state"] == "open"
    accepted = []
    for t in tasks:
        body, data = upload(e, t, data_of, poison=t.client_id == "2")
        if t.client_id == "2":
            with pytest.raises(ValidationError, match="finite"):
                e.accept("2", 1, body, data)
            continue
        e.accept(t.client_id, 1, body, data)
        accepted.append(t.client_id)
        with pytest.raises(ValidationError, match="duplicate"):
            e.accept(t.client_id, 1, body, data)  # a re-send counts once
    assert e.pending() == 0
    assert [f.client_id for f in e.failures()] == ["2"]
    assert e.failures()[0].reason.startswith("update rejected:")
    rows = e.store.updates(1)
    assert sorted(r["device"] for r in rows) == accepted
    paths = sorted(Path(r["path"]) for r in rows)
    if aggregation == "stream":  # partial-sum snapshots, the newest kept; no update files
        assert all(p.name.startswith("acc-") for p in paths)
        assert [p.is_file() for p in paths] == [False] * (len(paths) - 1) + [True]
        assert all(r.params == {} for r in e.results.values())
    else:
        assert {p.name for p in paths} == {f"update_{d}.safetensors" for d in accepted}
        assert all(p.is_file() for p in paths)

    closed = e.close_round()
    assert (closed.round, closed.applied, closed.version_before, closed.version_after) == (1, True, 0, 1)
    assert closed.accuracy is not None and 0.0 <= closed.accuracy <= 1.0
    # the same global model on the devices' own test splits: what personal acc is read on
    row = e.store.evals(GLOBAL_DEVICES_EVAL)
    ev = cfg.eval
    seen = make_federation(ev.dataset, ev.partition, ev.num_clients, ev.new_clients, ev.seed,
                           ev.alpha, ev.min_samples).clients
    x_dev = np.concatenate([d.x_test for d in seen.values()])
    y_dev = np.concatenate([d.y_test for d in seen.values()])
    want = int((e.strategy.predict_global(x_dev).argmax(1) == y_dev).sum())
    assert [(r["round"], r["device"], r["correct"], r["total"]) for r in row] == [
        (1, "coordinator", want, len(y_dev))]
    assert closed.note == "aggregated 2 update(s), 1 failure(s)"
    last = e.store.last_round()
    assert last is not None and (last["round"], last["state"]) == (1, "closed")
    summary = json.loads((cfg.state_dir / "rounds" / "1" / "round.json").read_text())
    assert summary["round"] == 1 and closed.summary == summary
    meta = json.loads((cfg.state_dir / "checkpoint" / "model.json").read_text())
    assert (meta["round"], meta["version"]) == (1, 1)
    with pytest.raises(ValidationError, match="closed round"):
        e.accept("0", 1, *upload(e, tasks[0], data_of))

    # round 2: all three count; the global state moves again
    before = {k: v.copy() for k, v in e.strategy.global_state.items()}
    tasks = e.open_round(2, e.plan(2, DEVICES))
    for t in tasks:
        e.accept(t.client_id, 2, *upload(e, t, data_of))
    closed = e.close_round()
    assert (closed.applied, closed.version_after) == (True, 2)
    assert closed.note == f"aggregated {len(tasks)} update(s), 0 failure(s)"
    assert any(not np.array_equal(before[k], v) for k, v in e.strategy.global_state.items())
    meta = json.loads((cfg.state_dir / "checkpoint" / "model.json").read_text())
    assert (meta["round"], meta["version"]) == (2, 2)
    final = {k: v.copy() for k, v in e.strategy.global_state.items()}
    e.store.close()

    # a restarted engine resumes the closed federation from the state folder alone
    again = engine_at(cfg)
    assert (again.round, again.round_open, again.strategy.version) == (2, False, 2)
    assert all(np.array_equal(final[k], v) for k, v in again.strategy.global_state.items())
    again.store.close()


@pytest.mark.parametrize("aggregation", ["stream", "batch"])
def test_an_open_round_resumes_with_its_accepted_updates(tmp_path: Path, data_of: dict,
                                                         aggregation: str) -> None:
    """Stop after two of three updates: a new engine reloads the round (tasks, results, the
    partial sums) and closes it to the same global state as the engine that ran it."""
    cfg = config(tmp_path / "coordinator", aggregation)
    e = engine_at(cfg)
    tasks = e.open_round(1, e.plan(1, DEVICES))
    sent = {t.client_id: upload(e, t, data_of) for t in tasks}
    for d in ("0", "1"):
        e.accept(d, 1, *sent[d])

    again = engine_at(cfg)  # the state folder as the first engine left it
    assert (again.round, again.round_open) == (1, True)
    assert sorted(again.results) == ["0", "1"] and again.pending() == 1
    again.accept("2", 1, *sent["2"])
    assert again.close_round().version_after == 1
    e.accept("2", 1, *sent["2"])
    e.close_round()
    for k, v in e.strategy.global_state.items():
        np.testing.assert_allclose(again.strategy.global_state[k], v, rtol=1e-6, atol=1e-6)
    e.store.close()
    again.store.close()
