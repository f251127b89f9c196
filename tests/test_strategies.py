"""Strategy contracts on a tiny problem, and FedCoE's partial exchange and cold start."""

import dataclasses

import numpy as np
import pytest

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.strategies import STRATEGIES, Failure, make_strategy
from fedcoe_edge.strategies.fedcoe import FedCoE, expert_of

MODEL = ModelConfig(expert_hidden=16, num_global_experts=4, top_k=2)
TRAIN = TrainConfig(local_epochs=1, experts_per_client=2)


@pytest.fixture(scope="module")
def fed():
    return make_federation("digits", "dirichlet", num_clients=4, num_new_clients=1, seed=0, alpha=0.5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract(name, fed):
    s = make_strategy(name, MODEL, TRAIN, seed=0)
    init = {k: v.copy() for k, v in s.initialize().items()}
    shares = getattr(s, "shares_model", True)
    assert bool(init) == shares
    assert all(k.startswith("global.") for k in init)
    tasks = s.configure_round(1, list(fed.clients))
    assert [t.client_id for t in tasks] == list(fed.clients)
    results, local = [], {}
    for t in tasks:
        r, local[t.client_id] = s.client_update(t, None, fed.clients[t.client_id])
        assert set(r.params) <= set(init)
        assert r.num_samples == fed.clients[t.client_id].num_train
        assert all(k.startswith("local.") for k in (local[t.client_id] or {}))
        results.append(r)
    new = s.aggregate_round(1, results, [Failure("x", 1, "timeout")])
    assert set(new) == set(init)
    assert not shares or any(not np.allclose(new[k], init[k]) for k in init)
    # no results: the state is kept
    assert s.aggregate_round(2, [], [Failure("0", 2, "dropped")]) is new or \
        all(np.array_equal(s.global_state[k], new[k]) for k in new)
    for cid, data in fed.clients.items():
        probs = s.predict_personal(cid, local[cid], data.x_test)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert s.predict_global(fed.x_global_test).shape == (len(fed.y_global_test), 10)
    assert s.predict_cold(next(iter(fed.new_clients.values())).x_test).shape[1] == 10


def test_fedcoe_partial_exchange_after_first_report(fed):
    s = FedCoE(MODEL, TRAIN, seed=0)
    s.initialize()
    first = s.configure_round(1, ["0"])[0]
    assert first.expert_ids == [0, 1, 2, 3]
    r, _ = s.client_update(first, None, fed.clients["0"])
    assert np.isclose(sum(r.affinity), 1.0)
    s.aggregate_round(1, [r], [])
    second = s.configure_round(2, ["0"])[0]
    assert len(second.expert_ids) == 2
    sent_experts = {expert_of(k) for k in second.params} - {None}
    assert sent_experts == set(second.expert_ids)
    assert any(k.startswith("global.gate.") for k in second.params)  # the gate always travels
    r2, _ = s.client_update(second, None, fed.clients["0"])
    assert {expert_of(k) for k in r2.params} - {None} == set(second.expert_ids)


def test_fedcoe_unsent_experts_keep_their_value(fed):
    s = FedCoE(MODEL, TRAIN, seed=0)
    s.initialize()
    s.affinity["0"] = np.array([0.7, 0.2, 0.05, 0.05])
    task = s.configure_round(1, ["0"])[0]
    before = {k: v.copy() for k, v in s.global_state.items()}
    r, _ = s.client_update(task, None, fed.clients["0"])
    s.aggregate_round(1, [r], [])
    for k, v in s.global_state.items():
        if expert_of(k) in (2, 3):
            np.testing.assert_array_equal(v, before[k])
        if expert_of(k) in (0, 1):
            assert not np.array_equal(v, before[k])


def test_fedcoe_cold_start_downloads_top_experts(fed):
    s = FedCoE(MODEL, TRAIN, seed=0)
    s.initialize()
    x = next(iter(fed.new_clients.values())).x_test
    ids = s.cold_start_experts(x)
    prior = s.routing_prior(x)
    order = np.argsort(-prior, kind="stable")
    need = int(np.searchsorted(np.cumsum(prior[order]) / prior.sum(), TRAIN.cold_start_mass) + 1)
    assert ids == sorted(order[:max(need, MODEL.top_k)].tolist())
    s.train_cfg = dataclasses.replace(TRAIN, cold_start_mass=1e-6)  # a narrow device: top_k only
    assert s.cold_start_experts(x) == sorted(order[:MODEL.top_k].tolist())


def test_device_payload_dense_strategy_sends_everything() -> None:
    s = make_strategy("fedavg", MODEL, TRAIN, seed=0)
    s.initialize()
    ids, params = s.device_payload("c0", [1])  # a dense model cannot be split
    assert ids == [0, 1, 2, 3]
    assert set(params) == set(s.global_state)
    assert s.choose_cold_experts(params, np.zeros((2, 64), np.float32)) == [0, 1, 2, 3]
    assert s.checkpoint_extra() == {"robust": {"bound": None, "norm_history": [], "samples": {}}}


def test_device_payload_fedcoe_sends_the_experts_asked_for() -> None:
    s = make_strategy("fedcoe", MODEL, TRAIN, seed=0)
    assert isinstance(s, FedCoE)
    s.initialize()
    ids, params = s.device_payload("c0", [2])
    assert ids == [2]
    held = {expert_of(n) for n in params} - {None}
    assert held == {2}
    assert set(params) == set(s.params_for([2]))
    ids, _ = s.device_payload("c0", None)  # no request: the device's assignment
    assert ids == s.experts_for("c0")
    with pytest.raises(ValueError, match="0..3"):
        s.device_payload("c0", [4])


def test_fedcoe_checkpoint_extra_round_trips_the_affinity() -> None:
    s = make_strategy("fedcoe", MODEL, TRAIN, seed=0)
    assert isinstance(s, FedCoE)
    s.affinity = {"c1": np.array([0.5, 0.25, 0.25, 0.0]), "c0": np.array([0.0, 0.0, 0.5, 0.5])}
    doc = s.checkpoint_extra()
    assert list(doc["affinity"]) == ["c0", "c1"]
    t = make_strategy("fedcoe", MODEL, TRAIN, seed=0)
    assert isinstance(t, FedCoE)
    t.restore_extra({"version": 3, **doc})
    assert {c: r.tolist() for c, r in t.affinity.items()} == {
        "c0": [0.0, 0.0, 0.5, 0.5], "c1": [0.5, 0.25, 0.25, 0.0]}
    t.restore_extra({})  # a checkpoint from before affinities existed
    assert t.affinity == {}


def test_aggregation_is_one_rule_that_a_subclass_cannot_bypass() -> None:
    """``aggregate_round`` is the base class's fold + finalize for every strategy (no class
    keeps a second batch rule), and a subclass changes aggregation by overriding the steps,
    which every path then uses."""
    from fedcoe_edge.strategies.base import Strategy
    from fedcoe_edge.strategies.fedavg import FedAvg

    for name, cls in STRATEGIES.items():
        assert cls.aggregate_round is Strategy.aggregate_round, name
        assert cls.fold is Strategy.fold, name

    class Halved(FedAvg):  # its own rule: finalize moves half way to the mean
        def finalize(self, rnd, partial, failures):  # type: ignore[no-untyped-def]
            old = dict(self.global_state)
            new = super().finalize(rnd, partial, failures)
            self.global_state = {k: ((old[k] + new[k]) / 2).astype(old[k].dtype) for k in new}
            return self.global_state

    bare = dataclasses.replace(TRAIN, update_clip="none", samples_cap=0.0)  # +1 everywhere: unclipped
    a, b = Halved(MODEL, bare), Halved(MODEL, bare)
    init = dict(a.initialize())
    b.initialize()
    moved = {k: v + 1.0 for k, v in init.items()}
    from fedcoe_edge.strategies import ClientResult

    a.aggregate_round(1, [ClientResult("c", 1, 3, moved)], [])
    p = b.new_partial(1)
    b.fold(p, ClientResult("c", 1, 3, moved))
    b.finalize(1, p, [])
    for k, v in init.items():
        np.testing.assert_allclose(a.global_state[k], v + 0.5, rtol=1e-6)
        assert a.global_state[k].tobytes() == b.global_state[k].tobytes()
