"""Streaming aggregation: running sums against hand-computed values, against the batch
rules (``aggregate_round``) up to float rounding, and partial aggregates that merge."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.strategies import ClientResult, FedAvg, FedCoE, make_strategy
from fedcoe_edge.strategies.base import Arrays, Failure
from fedcoe_edge.streaming import (
    ExpertSums,
    Partial,
    WeightedSum,
    accumulate,
    aggregate_partial,
    expert_weights,
    new_partial,
)


def test_weighted_sum_by_hand() -> None:
    s = WeightedSum()
    s.add({"a": np.array([1.0, 2.0], dtype=np.float32)}, 1.0)
    s.add({"a": np.array([3.0, 4.0], dtype=np.float32)}, 3.0)
    s.add({"a": np.array([100.0, 100.0], dtype=np.float32)}, 0.0)  # zero weight: skipped
    np.testing.assert_array_equal(s.sums["a"], [10.0, 14.0])
    assert (s.weight, s.count) == (4.0, 2)
    m = s.mean({"a": np.zeros(2, dtype=np.float32)})
    assert m["a"].dtype == np.float32
    np.testing.assert_array_equal(m["a"], [2.5, 3.5])
    with pytest.raises(ValueError, match="finite and >= 0"):
        s.add({"a": np.zeros(2)}, -1.0)
    # a 0-d integer tensor (BatchNorm's num_batches_tracked) stays a 0-d array of its dtype
    z = WeightedSum()
    z.add({"n": np.array(4, dtype=np.int64)}, 1.0)
    z.add({"n": np.array(7, dtype=np.int64)}, 2.0)
    got = z.mean({"n": np.array(0, dtype=np.int64)})["n"]
    assert isinstance(got, np.ndarray) and got.shape == () and got.dtype == np.int64 and got == 6
    with pytest.raises(KeyError):
        s.add({"b": np.zeros(2)}, 1.0)
    with pytest.raises(ValueError, match="empty"):
        WeightedSum().mean({})


def test_weighted_sum_merge_and_roundtrip() -> None:
    a, b = WeightedSum(), WeightedSum()
    a.add({"x": np.array([2.0])}, 2.0)  # 4, w 2
    b.add({"x": np.array([8.0])}, 1.0)  # 8, w 1
    a.merge(b)
    np.testing.assert_array_equal(a.sums["x"], [12.0])
    assert (a.weight, a.count) == (3.0, 2)
    back = WeightedSum.from_arrays(a.to_arrays("p"), "p")
    np.testing.assert_array_equal(back.sums["x"], [12.0])
    assert (back.weight, back.count) == (3.0, 2)


def test_expert_weights_and_fallback_by_hand() -> None:
    w_aff, w_n = expert_weights(10, [0.5, -0.2, 0.3], [True, True, False])
    np.testing.assert_allclose(w_aff, [5.0, 0.0, 0.0])  # negative affinity clipped, unsent 0
    np.testing.assert_allclose(w_n, [10.0, 10.0, 0.0])
    keys = [["e0"], ["e1"], ["e2"]]
    old = {n: np.full(1, 9.0, dtype=np.float32) for n in ("e0", "e1", "e2")}
    sums = ExpertSums(3)
    sums.add({"e0": np.array([1.0], np.float32), "e1": np.array([1.0], np.float32)}, keys, 10, [0.5, 0.0, 0.5])
    sums.add({"e0": np.array([4.0], np.float32), "e1": np.array([3.0], np.float32)}, keys, 30, [0.5, 0.0, 0.5])
    got = sums.means(old, keys)
    # e0: weights n r = 5, 15 -> (5*1 + 15*4) / 20 = 3.25
    np.testing.assert_allclose(got["e0"], [3.25])
    # e1: every sender has affinity 0 -> weighted by n: (10*1 + 30*3) / 40 = 2.5
    np.testing.assert_allclose(got["e1"], [2.5])
    # e2: nobody sent it -> old value
    np.testing.assert_array_equal(got["e2"], [9.0])
    assert sums.by_samples[0].count == 0  # e0 had positive affinity: its fallback was dropped
    # the same two clients in two shards, merged: the same means
    a, b = ExpertSums(3), ExpertSums(3)
    a.add({"e0": np.array([1.0], np.float32), "e1": np.array([1.0], np.float32)}, keys, 10, [0.5, 0.0, 0.5])
    b.add({"e0": np.array([4.0], np.float32), "e1": np.array([3.0], np.float32)}, keys, 30, [0.5, 0.0, 0.5])
    a.merge(b)
    merged = a.means(old, keys)
    np.testing.assert_allclose(merged["e0"], [3.25])
    np.testing.assert_allclose(merged["e1"], [2.5])
    # a zero-affinity shard merged into one with positive affinity: affinity rule wins
    c, d = ExpertSums(3), ExpertSums(3)
    c.add({"e1": np.array([8.0], np.float32)}, keys, 10, [0.0, 0.0, 0.0])
    d.add({"e1": np.array([2.0], np.float32)}, keys, 10, [0.0, 1.0, 0.0])
    c.merge(d)
    np.testing.assert_allclose(c.means(old, keys)["e1"], [2.0])


def _results(strategy: FedCoE | FedAvg, rnd: int, count: int, seed: int) -> list[ClientResult]:
    rng = np.random.default_rng(seed)
    k = strategy.model_cfg.num_global_experts
    out = []
    for i in range(count):
        if isinstance(strategy, FedCoE):
            ids = sorted(rng.choice(k, size=2, replace=False).tolist())
            base = strategy.params_for(ids)
            aff: list[float] | None = rng.dirichlet(np.ones(k)).tolist()
            if i == 0:
                aff = None  # no report: uniform
            elif i == 1:
                aff[ids[0]] = 0.0  # type: ignore[index]
        else:
            base, aff = strategy.global_state, None
        params = {n: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
                  if np.issubdtype(v.dtype, np.floating) else v.copy() for n, v in base.items()}
        out.append(ClientResult(f"c{i}", rnd, int(rng.integers(5, 200)), params, aff))
    return out


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedcoe-noaffinity", "fedavg"])
def test_streamed_equals_aggregate_round(algorithm: str) -> None:
    """Two rounds, batch vs streamed: same global state up to float rounding, same version
    and affinity table."""
    batch = make_strategy(algorithm, ModelConfig(expert_hidden=16), TrainConfig(), 0)
    batch.initialize()
    stream = copy.deepcopy(batch)
    for rnd in (1, 2):
        assert isinstance(batch, FedCoE | FedAvg)
        results = _results(batch, rnd, 7, seed=rnd)
        batch.aggregate_round(rnd, results, [])
        partial = new_partial(stream, rnd)
        assert partial is not None
        for r in reversed(results):  # arrival order differs from the batch's sorted order
            accumulate(stream, partial, r)
        aggregate_partial(stream, rnd, partial, [])
        assert stream.version == batch.version == rnd
        for name, value in batch.global_state.items():
            assert stream.global_state[name].dtype == value.dtype
            np.testing.assert_allclose(stream.global_state[name], value, rtol=1e-5, atol=1e-7,
                                       err_msg=name)
        if isinstance(batch, FedCoE):
            assert isinstance(stream, FedCoE)
            assert sorted(stream.affinity) == sorted(batch.affinity)
            for c, row in batch.affinity.items():
                np.testing.assert_allclose(stream.affinity[c], row, rtol=1e-12)


def test_empty_partial_keeps_the_state() -> None:
    s = make_strategy("fedcoe", ModelConfig(expert_hidden=16), TrainConfig(), 0)
    before = dict(s.initialize())
    partial = new_partial(s, 1)
    assert partial is not None
    aggregate_partial(s, 1, partial, [])
    assert s.version == 0 and all(s.global_state[n] is v for n, v in before.items())


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
def test_one_shard_equals_three_shards(algorithm: str) -> None:
    """Partial aggregates combine exactly: one partial over all clients and three shard
    partials merged (and shipped through their array form) give the same global state."""
    one = make_strategy(algorithm, ModelConfig(expert_hidden=16), TrainConfig(), 0)
    one.initialize()
    three = copy.deepcopy(one)
    assert isinstance(one, FedCoE | FedAvg)
    results = _results(one, 1, 12, seed=5)
    p1 = new_partial(one, 1)
    assert p1 is not None
    for r in results:
        accumulate(one, p1, r)
    aggregate_partial(one, 1, p1, [])
    shards = [new_partial(three, 1) for _ in range(3)]
    for i, r in enumerate(results):
        accumulate(three, shards[i % 3], r)  # type: ignore[arg-type]
    merged = new_partial(three, 1)
    assert merged is not None
    for sh in shards:
        assert sh is not None
        arrays, meta = sh.to_arrays()
        merged.merge(Partial.from_arrays(arrays, meta))
    aggregate_partial(three, 1, merged, [])
    assert sorted(merged.clients) == sorted(r.client_id for r in results)
    for name, value in one.global_state.items():
        np.testing.assert_allclose(three.global_state[name], value, rtol=1e-6, atol=1e-8, err_msg=name)
    with pytest.raises(ValueError, match="overlap"):
        merged.merge(Partial.from_arrays(*shards[0].to_arrays()))  # type: ignore[union-attr]


def test_which_strategies_stream() -> None:
    """Streamed exactly where aggregate_round is the mirrored rule; others are batch-only."""
    from fedcoe_edge.strategies import STRATEGIES

    cfg, train = ModelConfig(expert_hidden=16), TrainConfig()
    streamed = {name for name in STRATEGIES
                if new_partial(make_strategy(name, cfg, train, 0), 1) is not None}
    assert {"fedcoe", "fedcoe-noaffinity", "fedcoe-full", "fedavg", "fedprox", "local",
            "ditto"} <= streamed

    class Custom(FedAvg):
        def aggregate_round(self, rnd: int, results: Sequence[ClientResult],
                            failures: Sequence[Failure]) -> Arrays:
            return self.global_state

    custom = Custom(cfg, train, 0)
    assert new_partial(custom, 1) is None
    with pytest.raises(TypeError, match="does not aggregate incrementally"):
        accumulate(custom, Partial(1), ClientResult("c", 1, 1, {}))
