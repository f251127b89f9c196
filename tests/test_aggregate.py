"""Aggregation maths against hand-computed arrays."""

import numpy as np
import pytest

from fedcoe_edge.aggregate import (
    affinity_weights,
    aggregate_experts,
    coordinate_median,
    covering_experts,
    ema,
    sample_weighted_mean,
    top_m,
    trimmed_mean,
    weighted_mean,
)


def test_weighted_mean_matches_hand_computation():
    a, b = np.array([1.0, 2.0], np.float32), np.array([3.0, 6.0], np.float32)
    out = weighted_mean([a, b], [1, 3])
    np.testing.assert_allclose(out, [2.5, 5.0])
    assert out.dtype == np.float32


@pytest.mark.parametrize("weights", [[0, 0], [-1, 2], [float("nan"), 1]])
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError):
        weighted_mean([np.zeros(2), np.ones(2)], weights)


def test_sample_weighted_mean_is_fedavg():
    states = [{"w": np.array([0.0])}, {"w": np.array([10.0])}]
    assert sample_weighted_mean(states, [30, 10])["w"][0] == pytest.approx(2.5)


def test_affinity_weights_hand_computed_with_zero_affinity_and_unsent_expert():
    n = np.array([10, 30])
    r = np.array([[0.5, 0.0, 0.5],
                  [0.25, 0.75, 0.0]])
    sent = np.array([[True, True, False],
                     [True, True, False]])
    w = affinity_weights(n, r, sent)
    # expert 0: 10*.5=5 vs 30*.25=7.5 -> 5/12.5, 7.5/12.5
    np.testing.assert_allclose(w[:, 0], [0.4, 0.6])
    # expert 1: client 0 has zero affinity -> weight 0
    np.testing.assert_allclose(w[:, 1], [0.0, 1.0])
    # expert 2: nobody sent it -> all zero
    np.testing.assert_allclose(w[:, 2], [0.0, 0.0])


def test_affinity_weights_fall_back_to_samples_when_all_senders_have_zero_affinity():
    w = affinity_weights(np.array([1, 3]), np.zeros((2, 1)), np.ones((2, 1), bool))
    np.testing.assert_allclose(w[:, 0], [0.25, 0.75])


def test_aggregate_experts_keeps_unsent_expert():
    old = {"e0": np.array([100.0]), "e1": np.array([7.0])}
    updates = [{"e0": np.array([1.0])}, {"e0": np.array([3.0])}]
    weights = np.array([[0.25, 0.0], [0.75, 0.0]])
    new = aggregate_experts(old, updates, weights, [["e0"], ["e1"]])
    assert new["e0"][0] == pytest.approx(2.5)
    assert new["e1"][0] == 7.0
    assert new["e1"] is not old["e1"]


def test_covering_experts_by_hand():
    prior = np.array([0.05, 0.5, 0.3, 0.15])  # sorted: 1 (.5), 2 (.8), 3 (.95), 0 (1.0)
    assert covering_experts(prior, 0.5, 1) == [1]
    assert covering_experts(prior, 0.8, 1) == [1, 2]
    assert covering_experts(prior, 0.9, 2) == [1, 2, 3]
    assert covering_experts(prior, 0.95, 2) == [1, 2, 3]
    assert covering_experts(prior, 1.0, 2) == [0, 1, 2, 3]
    assert covering_experts(prior, 0.3, 2) == [1, 2]  # never fewer than at_least
    assert covering_experts(np.array([2.0, 6.0, 2.0]), 0.7, 1) == [0, 1]  # unnormalised; tie -> lower
    assert covering_experts(np.zeros(4), 0.9, 2) == [0, 1]
    with pytest.raises(ValueError, match="mass"):
        covering_experts(prior, 0.0, 1)


def test_ema_and_top_m():
    assert ema(None, np.array([1.0, 0.0]), 0.5).tolist() == [1.0, 0.0]
    assert ema(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.25).tolist() == [0.75, 0.25]
    assert top_m(np.array([0.1, 0.5, 0.5, 0.2]), 2) == [1, 2]
    assert top_m(np.array([0.3, 0.1, 0.6]), 1) == [2]


def test_robust_means():
    arrays = [np.array([1.0]), np.array([2.0]), np.array([100.0]), np.array([3.0])]
    assert coordinate_median(arrays)[0] == pytest.approx(2.5)
    assert trimmed_mean(arrays, 0.25)[0] == pytest.approx(2.5)
    with pytest.raises(ValueError):
        trimmed_mean(arrays, 0.5)


def test_assign_experts_respects_capacity_by_hand():
    from fedcoe_edge.aggregate import assign_experts, expert_capacity

    # four clients all prefer expert 0; capacity 2 sends the weaker two elsewhere
    r = np.array([[0.9, 0.1, 0.0, 0.0],
                  [0.8, 0.2, 0.0, 0.0],
                  [0.7, 0.3, 0.0, 0.0],
                  [0.6, 0.1, 0.2, 0.1]])
    assert expert_capacity(4, 2, 4) == 2
    got = assign_experts(r, m=2, capacity=2)
    # greedy by score: (0,0) (1,0) then (2,1) (1,1) full for 1 -> (3,2), (0,1) taken by cap ...
    assert got == [[0, 2], [0, 1], [1, 3], [2, 3]]
    load = np.bincount(np.concatenate(got), minlength=4)
    assert load.max() <= 2 and all(len(set(g)) == 2 for g in got)


def test_assign_experts_ties_follow_the_tiebreak_not_the_index():
    from fedcoe_edge.aggregate import assign_experts

    zeros = np.zeros((2, 4))
    tb = np.array([[3, 2, 1, 0], [7, 6, 5, 4]], dtype=float)  # prefer high indices
    assert assign_experts(zeros, 1, 1, tb) == [[3], [2]]
    with pytest.raises(ValueError, match="capacity"):
        assign_experts(np.zeros((3, 4)), 2, 1)  # 3 clients x 2 > 4 experts x 1


def test_balance_bias_step_by_hand():
    from fedcoe_edge.aggregate import balance_bias_step

    np.testing.assert_allclose(balance_bias_step(np.full(4, 0.25), 0.1), np.zeros(4), atol=1e-12)
    step = balance_bias_step(np.array([0.7, 0.1, 0.1, 0.1]), 0.1)
    np.testing.assert_allclose(step, 0.1 * (np.log(0.25) - np.log([0.7, 0.1, 0.1, 0.1])))
    assert step[0] < 0 < step[1]
