"""Streaming aggregation: running sums against hand-computed values, the strategy's one rule
folded in any order against its batch ``aggregate_round`` (equal up to float rounding, exactly
in the same order), partial aggregates that merge, and the registration check."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from fedcoe_edge.aggregate import affinity_weights, aggregate_experts, sample_weighted_mean
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.registry import RegistryError
from fedcoe_edge.strategies import (
    ClientResult,
    FedAvg,
    FedCoE,
    Strategy,
    make_strategy,
    register_strategy,
)
from fedcoe_edge.strategies.fedcoe import expert_of
from fedcoe_edge.streaming import ExpertSums, Partial, WeightedSum, expert_weights


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
        partial = stream.new_partial(rnd)
        for r in reversed(results):  # arrival order differs from the batch's sorted order
            stream.fold(partial, r)
        stream.finalize(rnd, partial, [])
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
    s.finalize(1, s.new_partial(1), [])
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
    p1 = one.new_partial(1)
    for r in results:
        one.fold(p1, r)
    one.finalize(1, p1, [])
    shards = [three.new_partial(1) for _ in range(3)]
    for i, r in enumerate(results):
        three.fold(shards[i % 3], r)
    merged = three.merge(1, [Partial.from_arrays(*sh.to_arrays()) for sh in shards])
    three.finalize(1, merged, [])
    assert sorted(merged.clients) == sorted(r.client_id for r in results)
    for name, value in one.global_state.items():
        np.testing.assert_allclose(three.global_state[name], value, rtol=1e-6, atol=1e-8, err_msg=name)
    with pytest.raises(ValueError, match="overlap"):
        merged.merge(Partial.from_arrays(*shards[0].to_arrays()))


def test_fold_in_client_order_is_aggregate_round_exactly() -> None:
    """The batch path is the streamed rule: folded in the same (client-id) order, the
    coordinator's fold + finalize gives aggregate_round's bytes."""
    batch = make_strategy("fedcoe", ModelConfig(expert_hidden=16), TrainConfig(), 0)
    batch.initialize()
    stream = copy.deepcopy(batch)
    assert isinstance(batch, FedCoE)
    results = _results(batch, 1, 5, seed=3)
    batch.aggregate_round(1, list(reversed(results)), [])
    partial = stream.new_partial(1)
    for r in sorted(results, key=lambda r: r.client_id):
        stream.fold(partial, r)
    stream.finalize(1, partial, [])
    for name, value in batch.global_state.items():
        assert stream.global_state[name].tobytes() == value.tobytes(), name
    with pytest.raises(ValueError, match="already in the partial"):
        stream.fold(partial, results[0])  # a client counted twice


def test_fedcoe_rule_matches_the_normalised_weights_of_aggregate_py() -> None:
    """The running sums implement the rule of fedcoe_edge.aggregate (normalised n_i r_ik
    expert weights, n_i for the rest): an independent reference, within float rounding."""
    # the defences off: this checks the strategy's own rule (docs/design.md, "Robust aggregation")
    train = TrainConfig(balance_rate=0.0, update_clip="none", samples_cap=0.0)
    s = make_strategy("fedcoe", ModelConfig(expert_hidden=16), train, 0)
    old = dict(s.initialize())
    assert isinstance(s, FedCoE)
    results = _results(s, 1, 6, seed=11)
    s.aggregate_round(1, results, [])
    k = s.model_cfg.num_global_experts
    n = np.array([r.num_samples for r in results], dtype=np.float64)
    sent = np.array([[any(expert_of(x) == e for x in r.params) for e in range(k)] for r in results])
    rows = np.array([r.affinity if r.affinity is not None else np.full(k, 1.0 / k) for r in results])
    want = aggregate_experts(old, [r.params for r in results], affinity_weights(n, rows, sent),
                             s.expert_keys())
    want.update(sample_weighted_mean([r.params for r in results], n,
                                     keys=[x for x in old if expert_of(x) is None]))
    for name, value in want.items():
        np.testing.assert_allclose(s.global_state[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_every_strategy_streams_and_a_partial_one_is_refused() -> None:
    """Every registered strategy implements the aggregation interface (so each streams and
    shards); a class without it is refused at registration, in one line naming what is
    missing."""
    from fedcoe_edge.strategies import STRATEGIES

    cfg, train = ModelConfig(expert_hidden=16), TrainConfig()
    for name in STRATEGIES:
        s = make_strategy(name, cfg, train, 0)
        assert isinstance(s.new_partial(1), Partial), name

    class Bare(Strategy):  # the pre-aggregation contract only: no new_partial/accumulate/finalize
        def initialize(self) -> dict[str, np.ndarray]:
            return {}

        def configure_round(self, rnd, client_ids):  # type: ignore[no-untyped-def]
            return []

        def client_update(self, task, local_state, data):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def predict_global(self, x):  # type: ignore[no-untyped-def]
            return x

        def predict_personal(self, client_id, local_state, x):  # type: ignore[no-untyped-def]
            return x

    with pytest.raises(RegistryError) as err:
        register_strategy("bare", Bare)  # type: ignore[type-abstract]  # the point of the test
    msg = str(err.value)
    assert "\n" not in msg and "bare" in msg
    for missing in ("accumulate", "finalize", "new_partial"):
        assert missing in msg
    with pytest.raises(RegistryError, match="already registered"):
        register_strategy("fedavg", FedAvg)
    with pytest.raises(RegistryError, match="not a subclass"):
        register_strategy("x", dict)  # type: ignore[arg-type]


def test_partial_admit_refuses_a_second_result_after_merges_and_direct_edits() -> None:
    """admit's duplicate check (a set beside ``clients``) sees clients that came in by
    merge, by from_arrays and by a caller appending to ``clients`` itself."""
    p = Partial(1)
    for c in ("a", "b"):
        p.admit(c, 1)
    other = Partial(1)
    other.admit("c", 2)
    p.merge(other)
    p.clients.append("d")
    for c in ("a", "c", "d"):
        with pytest.raises(ValueError, match="already in the partial"):
            p.admit(c, 1)
    p.admit("e", 1)
    back = Partial.from_arrays(*p.to_arrays())
    with pytest.raises(ValueError, match="already in the partial"):
        back.admit("e", 1)
    back.admit("f", 1)
    assert back.clients == ["a", "b", "c", "d", "e", "f"] and p.samples == 5
