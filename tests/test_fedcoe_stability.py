"""FedCoE's server stabilization knobs (docs/design.md, "Server stabilization"): the defaults
are the plain mean, ``server_lr`` moves part of the way to the aggregate, ``server_momentum``
carries a velocity, experts nobody sent stay put, and the velocity survives a checkpoint."""

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.base import ClientResult
from fedcoe_edge.strategies.fedcoe import FedCoE, expert_of

MODEL = ModelConfig(expert_hidden=8, num_global_experts=4, top_k=2)
TRAIN = TrainConfig(local_epochs=1, experts_per_client=2, balance_rate=0.0)


@pytest.fixture(scope="module")
def fed():
    return make_federation("digits", "dirichlet", num_clients=3, num_new_clients=1, seed=0, alpha=0.5)


def round_results(s: FedCoE, fed, rnd: int) -> list[ClientResult]:
    out = []
    for t in s.configure_round(rnd, ["0"]):  # one client, 64 samples: enough for the arithmetic
        d = fed.clients[t.client_id]
        r, _ = s.client_update(t, None, dataclasses.replace(d, x_train=d.x_train[:64], y_train=d.y_train[:64]))
        out.append(r)
    return out


def strategy(**train: Any) -> FedCoE:
    s = FedCoE(MODEL, dataclasses.replace(TRAIN, **train), seed=0)
    s.initialize()
    return s


def test_defaults_are_the_plain_mean_and_stay_out_of_the_wire_config(fed) -> None:
    plain = strategy()
    assert "server_lr" not in TRAIN.to_dict() and "server_momentum" not in TRAIN.to_dict()
    assert dataclasses.replace(TRAIN, server_lr=0.5).to_dict()["server_lr"] == 0.5
    agg = {n: v + 1.0 for n, v in plain.global_state.items()}
    assert plain.server_step(agg, [0, 1, 2, 3]) is agg
    assert plain.velocity == {}


def test_server_lr_moves_part_of_the_way(fed) -> None:
    plain, damped = strategy(), strategy(server_lr=0.5)
    start = {n: v.copy() for n, v in plain.global_state.items()}
    results = round_results(plain, fed, 1)
    a = plain.aggregate_round(1, results, [])
    b = damped.aggregate_round(1, results, [])
    moved = [n for n in a if not np.allclose(a[n], start[n])]
    assert moved  # the round changed something
    for n in moved:
        np.testing.assert_allclose(b[n], start[n] + 0.5 * (a[n] - start[n]), rtol=1e-5, atol=1e-6)


def test_momentum_carries_the_last_step_and_unsent_experts_stay(fed) -> None:
    s = strategy(server_lr=0.5, server_momentum=0.5)
    old = {n: v.astype(np.float64) for n, v in s.global_state.items()}
    d1 = {n: np.full_like(v, 0.2) for n, v in old.items()}
    first = s.server_step({n: old[n] + d1[n] for n in old}, [0, 1, 2, 3])
    for n in old:
        np.testing.assert_allclose(first[n], old[n] + 0.5 * d1[n], rtol=1e-5)
    s.global_state = first
    # expert 3 not sent: its value (and velocity) stay; the rest step by lr * (mom * v + d)
    agg = {n: (first[n] if expert_of(n) == 3 else first[n] + 0.1) for n in first}
    second = s.server_step(agg, [0, 1, 2])
    for n in first:
        if expert_of(n) == 3:
            np.testing.assert_array_equal(second[n], first[n])
        else:
            np.testing.assert_allclose(second[n], first[n] + 0.5 * (0.5 * 0.2 + 0.1), rtol=1e-5)


def test_velocity_survives_a_checkpoint() -> None:
    s = strategy(server_momentum=0.9)
    s.velocity = {"global.gate.net.bias": np.array([0.5, -0.25, 0.0, 1.0])}
    doc = s.checkpoint_extra()
    t = strategy(server_momentum=0.9)
    t.restore_extra(doc)
    np.testing.assert_array_equal(t.velocity["global.gate.net.bias"], [0.5, -0.25, 0.0, 1.0])
    assert "server_velocity" not in strategy().checkpoint_extra()  # off: nothing extra


@pytest.mark.parametrize("field,value", [("server_lr", 0.0), ("server_lr", 1.5), ("server_lr", float("nan")),
                                         ("server_momentum", 1.0), ("server_momentum", -0.1),
                                         ("server_momentum", True)])
def test_out_of_range_knobs_are_one_line(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"train.{field} must be in"):
        TrainConfig(**{field: value})
