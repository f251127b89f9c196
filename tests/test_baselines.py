"""Baselines and FedCoE ablations: each one's contract and what makes it that algorithm."""

import numpy as np
import pytest

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.simulation import SimulationConfig, run_one
from fedcoe_edge.strategies import STRATEGIES, make_strategy, shares_model
from fedcoe_edge.strategies.ablations import FedCoENoAffinity, FedCoENoCoord, FedCoENoLocal
from fedcoe_edge.strategies.ditto import Ditto
from fedcoe_edge.strategies.fedrep import FedRep
from fedcoe_edge.strategies.local import from_private, to_private

MODEL = ModelConfig(expert_kind="mlp", expert_hidden=16, num_global_experts=4, top_k=2)
CNN = ModelConfig(expert_kind="cnn", expert_hidden=16, num_global_experts=4, top_k=2)
TRAIN = TrainConfig(local_epochs=1, experts_per_client=2)
BASELINES = ["fedprox", "local", "fedavg-ft", "ditto", "fedrep", "mixture"]
VARIANTS = ["fedcoe-noaffinity", "fedcoe-nocoord", "fedcoe-nolocal", "fedcoe-full"]


@pytest.fixture(scope="module")
def fed():
    return make_federation("digits", "dirichlet", num_clients=4, num_new_clients=1, seed=0, alpha=0.5)


def one_round(s, fed, local=None):
    local = local if local is not None else {cid: None for cid in fed.clients}
    results = []
    for t in s.configure_round(1, list(fed.clients)):
        r, local[t.client_id] = s.client_update(t, local[t.client_id], fed.clients[t.client_id])
        results.append(r)
    s.aggregate_round(1, results, [])
    return results, local


def test_registry_names():
    for name in ["fedcoe", "fedavg", *BASELINES, *VARIANTS]:
        assert name in STRATEGIES and STRATEGIES[name].name == name


@pytest.mark.parametrize("name,model", [(n, MODEL) for n in BASELINES + VARIANTS]
                         + [("fedrep", CNN), ("mixture", CNN)])
def test_contract(name, model, fed):
    s = make_strategy(name, model, TRAIN, seed=0)
    init = {k: v.copy() for k, v in s.initialize().items()}
    assert all(k.startswith("global.") for k in init)
    tasks = s.configure_round(1, list(fed.clients))
    assert [t.client_id for t in tasks] == list(fed.clients)
    results, local = one_round(s, fed)
    for r in results:
        assert set(r.params) <= set(init)
        assert r.num_samples == fed.clients[r.client_id].num_train
    for cid, data in fed.clients.items():
        local[cid] = s.personalize(local[cid], data)
        assert all(k.startswith("local.") for k in (local[cid] or {}))  # private state stays private
        probs = s.predict_personal(cid, local[cid], data.x_test)
        assert probs.shape == (len(data.y_test), 10)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    if shares_model(name):
        assert any(not np.allclose(s.global_state[k], init[k]) for k in init)
    assert s.predict_global(fed.x_global_test).shape == (len(fed.y_global_test), 10)
    assert s.predict_cold(next(iter(fed.new_clients.values())).x_test).shape[1] == 10


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_learn(name, fed):
    """A few rounds take every baseline's personal models well above chance (0.1)."""
    cfg = SimulationConfig(rounds=5, algorithms=[name], eval_every=5, model=MODEL, train=TRAIN)
    m = run_one(name, fed, cfg, seed=0).metrics
    assert m["personalized_acc"] > 0.5, m


def test_fedprox_pulls_toward_received_model(fed):
    train = TrainConfig(local_epochs=1, prox_mu=5.0)
    dist = {}
    for name in ("fedavg", "fedprox"):
        s = make_strategy(name, MODEL, train, seed=0)
        s.initialize()
        task = s.configure_round(1, ["0"])[0]
        r, _ = s.client_update(task, None, fed.clients["0"])
        dist[name] = sum(float(((r.params[k] - task.params[k]) ** 2).sum()) for k in task.params)
    assert dist["fedprox"] < 0.7 * dist["fedavg"]


def test_local_shares_nothing(fed):
    s = make_strategy("local", MODEL, TRAIN, seed=0)
    assert s.initialize() == {}
    assert all(t.params == {} for t in s.configure_round(1, list(fed.clients)))
    results, local = one_round(s, fed)
    assert all(r.params == {} for r in results)
    assert not shares_model("local")
    # each client's model is its own: two clients predict differently on the same inputs
    x = fed.x_global_test
    assert not np.allclose(s.predict_personal("0", local["0"], x), s.predict_personal("1", local["1"], x))
    np.testing.assert_allclose(s.predict_global(x), 0.1)


def test_private_names_round_trip():
    arrays = {"global.experts.0.fc1.weight": np.ones((2, 2), np.float32)}
    private = to_private(arrays)
    assert all(k.startswith("local.") for k in private)
    assert from_private(private).keys() == arrays.keys()


def test_fedavg_ft_personalizes_only_at_the_end(fed):
    s = make_strategy("fedavg-ft", MODEL, TRAIN, seed=0)
    s.initialize()
    _, local = one_round(s, fed)
    data = fed.clients["0"]
    before = s.predict_personal("0", local["0"], data.x_test)
    np.testing.assert_allclose(before, s.predict_global(data.x_test))
    tuned = s.personalize(local["0"], data)
    after = s.predict_personal("0", tuned, data.x_test)
    assert not np.allclose(before, after)
    np.testing.assert_allclose(s.predict_global(data.x_test), before)  # global untouched


def test_ditto_lambda_controls_the_pull(fed):
    gaps = {}
    for lam in (0.0, 50.0):
        s = Ditto(MODEL, TrainConfig(local_epochs=1, extra={"ditto_lambda": lam}), seed=0)
        s.initialize()
        task = s.configure_round(1, ["0"])[0]
        r, local = s.client_update(task, None, fed.clients["0"])
        personal = from_private(local)
        gaps[lam] = sum(float(((personal[k] - task.params[k]) ** 2).sum()) for k in task.params)
        assert set(personal) == set(r.params)  # v_i has the global model's shape
    assert gaps[50.0] < 0.5 * gaps[0.0]


def test_fedrep_keeps_heads_private(fed):
    s = FedRep(MODEL, TRAIN, seed=0)
    s.initialize()
    tasks = s.configure_round(1, list(fed.clients))
    assert all(not any(s.is_head(k) for k in t.params) for t in tasks)  # heads never go down
    _, local = one_round(s, fed)
    heads = [s.public_head(local[c]) for c in fed.clients]
    assert heads[0] and all(k.startswith(s.head) for k in heads[0])
    key = next(iter(heads[0]))
    assert not np.allclose(heads[0][key], heads[1][key])  # personal heads differ


def test_mixture_global_model_is_fedavg(fed):
    """Zec et al.'s global model is plain FedAvg: same init, same minibatches, same result."""
    results = {}
    for name in ("fedavg", "mixture"):
        s = make_strategy(name, MODEL, TRAIN, seed=0)
        s.initialize()
        task = s.configure_round(1, ["1"])[0]
        r, local = s.client_update(task, None, fed.clients["1"])
        results[name] = r.params
        if name == "mixture":
            assert {k.split(".")[1] for k in local} == {"experts", "gate"}
    assert results["fedavg"].keys() == results["mixture"].keys()
    for k in results["fedavg"]:
        np.testing.assert_allclose(results["fedavg"][k], results["mixture"][k], rtol=1e-5, atol=1e-6)


def test_ablations_change_one_thing(fed):
    assert FedCoENoAffinity(MODEL, TRAIN).affinity_weighting is False
    nc = FedCoENoCoord(MODEL, TRAIN)
    assert nc.train_cfg.lam == 0 and nc.train_cfg.mu == 0 and TRAIN.lam > 0  # caller's config untouched
    nl = FedCoENoLocal(MODEL, TRAIN)
    assert nl.model_cfg.num_local_experts == 0
    assert not any(k.startswith("local.experts.") for k in nl.model.local_state())
    full = make_strategy("fedcoe-full", MODEL, TRAIN)
    full.initialize()
    one_round(full, fed)
    assert full.experts_for("0") == [0, 1, 2, 3]
    part = make_strategy("fedcoe", MODEL, TRAIN)
    part.initialize()
    one_round(part, fed)
    assert len(part.experts_for("0")) == 2
