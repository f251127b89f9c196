"""Cold start never sees the inputs it is scored on (docs/design.md, "Cold start"): a new
client's data is an unlabelled pool and a disjoint test split, experts are chosen from the
pool, and a device agent routes only unscored inputs."""

import dataclasses
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from device_agent.daemon import DeviceAgent
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.data.client import ClientData
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.simulation import cold_start_accuracy, eval_view
from fedcoe_edge.strategies.fedcoe import FedCoE

MODEL = ModelConfig(expert_hidden=8, num_global_experts=4, top_k=2)


def rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


@pytest.fixture(scope="module")
def fed():
    return make_federation("digits", "dirichlet", num_clients=4, num_new_clients=2, seed=0, alpha=0.5)


def test_new_clients_have_a_disjoint_pool_and_training_clients_are_unchanged(fed) -> None:
    for cid, d in fed.new_clients.items():
        n = len(d.x_pool) + len(d.y_test)
        assert len(d.y_train) == 0 and abs(len(d.x_pool) - 0.3 * n) <= 1, cid
        assert not rows(d.x_pool) & rows(d.x_test), f"{cid}: pool and test share inputs"
    other = make_federation("digits", "dirichlet", num_clients=4, num_new_clients=2, seed=0,
                            alpha=0.5, cold_pool_fraction=0.5)
    for cid, d in fed.clients.items():  # the pool's own random stream: nothing else moves
        assert np.array_equal(d.x_train, other.clients[cid].x_train)
        assert np.array_equal(d.y_test, other.clients[cid].y_test)
    assert np.array_equal(fed.y_global_test, other.y_global_test)
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="pool fraction"):
            make_federation("digits", num_clients=4, num_new_clients=1, cold_pool_fraction=bad)


def test_cold_start_chooses_from_the_pool_never_from_the_scored_inputs(fed, monkeypatch) -> None:
    s = FedCoE(MODEL, TrainConfig(), seed=0)
    s.initialize()
    routed: list[np.ndarray] = []
    real = FedCoE.routing_prior

    def spy(self: FedCoE, x: np.ndarray) -> np.ndarray:
        routed.append(x)
        return real(self, x)

    monkeypatch.setattr(FedCoE, "routing_prior", spy)
    acc = cold_start_accuracy(s, fed)
    assert 0 <= acc <= 1 and len(routed) == len(fed.new_clients)
    scored = set().union(*(rows(d.x_test) for d in fed.new_clients.values()))
    for x in routed:
        assert not rows(x) & scored, "cold start routed inputs it is scored on"
    # the validation view: cold clients are training clients' validation splits, the pool
    # their training inputs
    routed.clear()
    view = eval_view(fed, "val")
    cold_start_accuracy(s, view)
    scored = set().union(*(rows(d.x_val) for d in fed.clients.values()))
    assert routed and all(not rows(x) & scored for x in routed)


def test_the_agent_routes_only_unscored_inputs() -> None:
    x = np.arange(5 * 64, dtype=np.float32).reshape(5, 1, 8, 8)
    labelled = ClientData(x[:0], np.zeros(0, np.int64), x[:3], np.array([1, 2, 3]), x_pool=x[3:])
    agent: Any = SimpleNamespace(data=labelled, dev="d")
    assert rows(DeviceAgent.prior_inputs(agent)) == rows(x[3:])
    # unlabelled test inputs (-1) are scored by nobody: they may guide the choice
    unlabelled = dataclasses.replace(labelled, y_test=np.array([-1, 2, -1]))
    agent = SimpleNamespace(data=unlabelled, dev="d")
    assert rows(DeviceAgent.prior_inputs(agent)) == rows(x[3:]) | rows(x[[0, 2]])
