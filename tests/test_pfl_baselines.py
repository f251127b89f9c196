"""FedAvg + label prior, FedALA and FedDBE: hand-computed values of their pure parts, what
makes each that algorithm, and a short digits run where each one personalizes.

docs/design.md, "Personalized baselines".
"""

import json

import numpy as np
import pytest
import torch

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import ClientData, make_federation
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.simulation import SimulationConfig, run_one
from fedcoe_edge.strategies import STRATEGIES, make_strategy
from fedcoe_edge.strategies.fedala import STARTED_KEY, W_PREFIX, FedALA, ala_blend, ala_weight_step
from fedcoe_edge.strategies.feddbe import (
    COLLECT,
    GLOBAL_MEAN_KEY,
    PRBM_KEY,
    FedDBE,
    mean_metrics,
    metrics_mean,
    mr_loss,
)
from fedcoe_edge.strategies.labelprior import COUNTS_KEY, FedAvgPrior, label_prior, reweight
from fedcoe_edge.strategies.local import from_private
from fedcoe_edge.training import load_arrays, to_arrays

CNN = ModelConfig(expert_hidden=16)  # the digits grid's kind of network (CNN expert)
TRAIN = TrainConfig(local_epochs=1)
NAMES = ("fedavg_prior", "fedala", "feddbe")


@pytest.fixture(scope="module")
def fed():
    """Digits, label skew Dirichlet(0.1), 6 clients: most hold 2-3 classes."""
    return make_federation("digits", "dirichlet", num_clients=6, num_new_clients=1, seed=0, alpha=0.1)


def one_round(s, fed, rnd, local):
    results = []
    for t in s.configure_round(rnd, list(fed.clients)):
        r, local[t.client_id] = s.client_update(t, local[t.client_id], fed.clients[t.client_id])
        results.append(r)
    s.aggregate_round(rnd, results, [])
    return results


def test_registered():
    for name in NAMES:
        assert STRATEGIES[name].name == name


# --- FedAvg + label prior ---------------------------------------------------------------------
def test_label_prior_by_hand():
    """counts (3, 0, 1), Laplace a = 1: prior (4, 1, 2) / 7; p = (0.2, 0.5, 0.3) becomes
    (0.8, 0.5, 0.6) / 7 renormalised = (0.8, 0.5, 0.6) / 1.9."""
    prior = label_prior(np.array([3, 0, 1]), 1.0)
    np.testing.assert_allclose(prior, [4 / 7, 1 / 7, 2 / 7])
    out = reweight(np.array([[0.2, 0.5, 0.3]]), prior)
    np.testing.assert_allclose(out, [[0.8 / 1.9, 0.5 / 1.9, 0.6 / 1.9]], rtol=1e-6)
    assert out[0, 1] > 0  # a class absent from training stays possible
    # a = 0.5: (3.5, 0.5, 1.5) / 5.5
    np.testing.assert_allclose(label_prior(np.array([3, 0, 1]), 0.5), [3.5 / 5.5, 0.5 / 5.5, 1.5 / 5.5])


def test_fedavg_prior_is_fedavg_plus_reweighting(fed):
    s = FedAvgPrior(CNN, TRAIN, seed=0)
    ref = make_strategy("fedavg", CNN, TRAIN, seed=0)
    s.initialize(), ref.initialize()
    local = {c: None for c in fed.clients}
    results = one_round(s, fed, 1, local)
    ref_results = one_round(ref, fed, 1, {c: None for c in fed.clients})
    for a, b in zip(results, ref_results, strict=True):  # same upload, byte for byte
        assert a.params.keys() == b.params.keys()
        assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    data = fed.clients["0"]
    counts = local["0"][COUNTS_KEY]
    np.testing.assert_array_equal(counts, np.bincount(data.y_train, minlength=10))
    g = s.predict_global(data.x_test)
    np.testing.assert_allclose(g, ref.predict_global(data.x_test), rtol=1e-6)
    expected = g * ((counts + 1) / (counts.sum() + 10))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(s.predict_personal("0", local["0"], data.x_test), expected, rtol=1e-5)
    np.testing.assert_allclose(s.predict_personal("0", None, data.x_test), g)
    # a client never selected gets its prior at the end all the same
    assert COUNTS_KEY in s.personalize(None, data)


@pytest.mark.parametrize("extra,word", [({"prior_smoothing": 0}, "prior_smoothing"),
                                        ({"ala_layers": 0}, "ala_layers"),
                                        ({"ala_sample": 1.5}, "ala_sample"),
                                        ({"ala_eta": -1.0}, "ala_eta"),
                                        ({"dbe_kappa": -0.1}, "dbe_kappa")])
def test_knob_ranges(extra, word):
    name = {"prior": "fedavg_prior", "ala": "fedala", "dbe": "feddbe"}[word.split("_")[0]]
    with pytest.raises(ConfigError, match=word) as err:
        make_strategy(name, CNN, TrainConfig(extra=extra))
    assert "\n" not in str(err.value)


# --- FedALA -----------------------------------------------------------------------------------
def test_ala_weight_step_by_hand():
    """W <- clip(W - eta * g * (theta_g - theta_l), 0, 1) on two parameters."""
    w = torch.tensor([1.0, 1.0])
    out = ala_weight_step(w, grad=torch.tensor([0.5, -2.0]), diff=torch.tensor([2.0, 1.0]), eta=1.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))  # 1 - 1 = 0; 1 + 2 = 3, clipped to 1
    w = torch.tensor([0.5, 0.5])
    out = ala_weight_step(w, grad=torch.tensor([0.1, -0.2]), diff=torch.tensor([1.0, 0.5]), eta=1.0)
    torch.testing.assert_close(out, torch.tensor([0.4, 0.6]))  # 0.5 - 0.1; 0.5 + 0.1
    out = ala_weight_step(w, grad=torch.tensor([0.1, -0.2]), diff=torch.tensor([1.0, 0.5]), eta=10.0)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0]))  # 0.5 - 1 -> 0; 0.5 + 1 -> 1
    # theta = theta_l + (theta_g - theta_l) * W: local (1, 2), diff (1, 0.5), W (0.4, 0.6)
    torch.testing.assert_close(ala_blend(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.5]),
                                         torch.tensor([0.4, 0.6])), torch.tensor([1.4, 2.3]))


def test_ala_initialisation(fed):
    """First receipt: theta_init = theta_g. Later: lower layers = theta_g, the top layer
    element-wise between theta_l and theta_g, W in [0, 1] kept on the device."""
    s = FedALA(CNN, TRAIN, seed=0)
    s.initialize()
    assert s.top == ["global.experts.0.fc."]  # p = 1: the head
    data = fed.clients["0"]
    task = s.configure_round(1, ["0"])[0]
    init, state = s.ala(task.params, None, data, 1)
    assert all(np.array_equal(init[k], task.params[k]) for k in init) and state == {}
    local = {c: None for c in fed.clients}
    one_round(s, fed, 1, local)  # every client: the global model is no client's own
    assert STARTED_KEY not in local["0"]
    received = s.configure_round(2, ["0"])[0].params
    mine = from_private(local["0"])
    init, state = s.ala(received, local["0"], data, 2)
    assert state[STARTED_KEY] == 1.0
    for k in init:
        if k in s.top_keys:
            w = state[W_PREFIX + k]
            assert w.shape == init[k].shape and w.min() >= 0 and w.max() <= 1
            lo, hi = np.minimum(mine[k], received[k]), np.maximum(mine[k], received[k])
            assert np.all(init[k] >= lo - 1e-6) and np.all(init[k] <= hi + 1e-6)
            np.testing.assert_allclose(init[k], mine[k] + (received[k] - mine[k]) * w, atol=1e-6)
        else:
            np.testing.assert_array_equal(init[k], received[k])
    assert any((state[W_PREFIX + k] < 1).any() for k in s.top_keys)  # W learned something


def test_ala_layers_reach_down():
    s = FedALA(CNN, TrainConfig(extra={"ala_layers": 2}), seed=0)
    assert s.top == ["global.experts.0.conv2.", "global.experts.0.fc."]


# --- FedDBE -----------------------------------------------------------------------------------
def test_mr_loss_by_hand():
    """features (1, 2), (3, 4): batch mean (2, 3); z_g = (1, 1): ||(1, 2)||^2 = 5; kappa 0.5."""
    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert float(mr_loss(f, torch.tensor([1.0, 1.0]), 0.5)) == pytest.approx(2.5)
    assert float(mr_loss(f, torch.tensor([2.0, 3.0]), 0.5)) == 0.0
    m = np.array([0.25, -1.5, 3.0])
    np.testing.assert_array_equal(metrics_mean(mean_metrics(m), 3), m)
    assert metrics_mean(mean_metrics(m), 2) is None and metrics_mean({}, 3) is None


def test_prbm_shifts_the_head_input(fed):
    """Personal prediction = softmax(head(f(x) + b)), by hand from the head's weights."""
    s = FedDBE(CNN, TRAIN, seed=0)
    s.initialize()
    x = fed.clients["0"].x_test[:5]
    b = np.linspace(-1, 1, s.feature_dim).astype(np.float32)
    load_arrays(s.model, s.global_state)
    with torch.no_grad():
        s.model(torch.from_numpy(x))
        f = s.features.clone()
        z = (f + torch.from_numpy(b)) @ s.head.weight.T + s.head.bias
    np.testing.assert_allclose(s.predict_personal("0", {PRBM_KEY: b}, x), z.softmax(-1).numpy(), rtol=1e-5)
    with torch.no_grad():
        z0 = f @ s.head.weight.T + s.head.bias
    np.testing.assert_allclose(s.predict_global(x), z0.softmax(-1).numpy(), rtol=1e-5)  # no bias


def test_dbe_collects_the_consensus_mean_once(fed):
    s = FedDBE(CNN, TrainConfig(local_epochs=1, samples_cap=0), seed=0)  # weights = n_i
    init = s.initialize()
    local = {c: None for c in fed.clients}
    tasks = s.configure_round(1, list(fed.clients))
    assert all(t.config[COLLECT] and set(t.params) == set(init) for t in tasks)
    results = one_round(s, fed, 1, local)
    assert all(v is None for v in local.values())  # no PRBM in the collection round
    means = np.stack([metrics_mean(r.metrics, s.feature_dim) for r in results])
    weights = [r.num_samples for r in results]
    np.testing.assert_allclose(s.global_mean, np.average(means, axis=0, weights=weights), rtol=1e-5)
    first = s.global_mean.copy()
    tasks = s.configure_round(2, list(fed.clients))
    assert all(not t.config.get(COLLECT) and GLOBAL_MEAN_KEY in t.params for t in tasks)
    results = one_round(s, fed, 2, local)
    assert all(set(r.params) == set(init) and not r.metrics for r in results)  # PRBM stays home
    assert all(set(v) == {PRBM_KEY} and np.abs(v[PRBM_KEY]).sum() > 0 for v in local.values())
    np.testing.assert_array_equal(s.global_mean, first)  # collected once
    doc = json.loads(json.dumps(s.checkpoint_extra()))
    back = FedDBE(CNN, TRAIN, seed=0)
    back.restore_extra(doc)
    np.testing.assert_allclose(back.global_mean, first)


def test_mr_pulls_feature_means_to_the_consensus(fed):
    """A large kappa makes a client's features' mean land nearer z_g than kappa = 0 does."""
    gaps = {}
    for kappa in (0.0, 10.0):
        s = FedDBE(CNN, TrainConfig(local_epochs=1, extra={"dbe_kappa": kappa}), seed=0)
        s.initialize()
        one_round(s, fed, 1, {c: None for c in fed.clients})
        task = s.configure_round(2, ["1"])[0]
        r, _ = s.client_update(task, None, fed.clients["1"])
        load_arrays(s.model, r.params)
        gaps[kappa] = float(((s.feature_mean(fed.clients["1"].x_train) - s.global_mean) ** 2).sum())
    assert gaps[10.0] < 0.5 * gaps[0.0], gaps


# --- the camera setting's split: identity trunk, MLP expert on 576-d features ------------------
def test_mlp_split_on_trunk_features():
    model = ModelConfig(input_shape=(576,), expert_kind="mlp", expert_hidden=16, num_global_experts=2,
                        top_k=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 576)).astype(np.float32)
    y = rng.integers(0, 10, 40).astype(np.int64)
    data = ClientData(x[:30], y[:30], x[30:], y[30:])
    ala = FedALA(model, TRAIN, seed=0)
    assert ala.top == ["global.experts.0.fc2."]  # head = the last Linear, body = the hidden layer
    dbe = FedDBE(model, TRAIN, seed=0)
    hidden = to_arrays(dbe.model.global_state())["global.experts.0.fc1.weight"].shape[0]
    assert dbe.feature_dim == hidden  # the PRBM is as wide as the MLP's hidden layer
    for s in (ala, dbe):
        s.initialize()
        local = None
        for rnd in (1, 2):
            task = s.configure_round(rnd, ["a"])[0]
            r, local = s.client_update(task, local, data)
            s.aggregate_round(rnd, [r], [])
        probs = s.predict_personal("a", local, data.x_test)
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


# --- each personalizes on label skew (the papers report personalized >> FedAvg there) ----------
@pytest.mark.parametrize("name", NAMES)
def test_personalizes_on_label_skew(name, fed):
    """Digits, Dirichlet(0.1), 5 rounds of 2 local epochs (the grid's): the personal models
    beat the same run's global model on the clients' own test splits by 0.15 or more
    (measured, personalized against global: prior 0.80 / 0.23, FedALA 0.98 / 0.40, FedDBE
    0.81 / 0.51)."""
    cfg = SimulationConfig(rounds=5, algorithms=[name], eval_every=5, model=CNN,
                           train=TrainConfig(local_epochs=2))
    m = run_one(name, fed, cfg, seed=0).metrics
    assert m["personalized_acc"] > m["global_acc"] + 0.15, m
