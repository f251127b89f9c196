"""The private-copy variant measured by benchmarks/private_path.py (docs/design.md, "Local
level: what the demo's accuracies compare"): its comparison with FedCoE is only fair if the
copy changes the personal model and nothing else. Every upload and the global model must be
FedCoE's, bit for bit, while the personal prediction uses the device's trained copy."""

from __future__ import annotations

import numpy as np

from benchmarks.private_path import FedCoEPrivatePath
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.strategies.fedcoe import FedCoE

MODEL = ModelConfig(expert_hidden=16, num_global_experts=4, top_k=2)
TRAIN = TrainConfig(local_epochs=1, experts_per_client=2)


def test_the_copy_changes_the_personal_model_and_nothing_sent() -> None:
    fed = make_federation("digits", "dirichlet", num_clients=3, num_new_clients=0, seed=0, alpha=0.5)
    base, var = FedCoE(MODEL, TRAIN, seed=0), FedCoEPrivatePath(MODEL, TRAIN, seed=0)
    local_b: dict[str, dict[str, np.ndarray] | None] = dict.fromkeys(fed.clients)
    local_v = dict(local_b)
    for s in (base, var):
        s.initialize()
    for rnd in (1, 2):
        got = []
        for s, local in ((base, local_b), (var, local_v)):
            results = []
            for t in s.configure_round(rnd, list(fed.clients)):
                r, local[t.client_id] = s.client_update(t, local[t.client_id], fed.clients[t.client_id])
                results.append(r)
            got.append(results)
            s.aggregate_round(rnd, results, [])
        for rb, rv in zip(*got, strict=True):
            assert rb.params.keys() == rv.params.keys()
            assert all(np.array_equal(rb.params[n], rv.params[n]) for n in rb.params)
        assert all(np.array_equal(base.global_state[n], var.global_state[n]) for n in base.global_state)
    cid = next(iter(fed.clients))
    kept = local_v[cid]
    assert kept is not None and any(n.startswith("global.experts.") for n in kept)
    assert not any(n.startswith("global.") for n in local_b[cid] or {})
    x = fed.clients[cid].x_test
    # the copy differs from the aggregate it was pulled toward, so the predictions do
    assert not np.allclose(base.predict_personal(cid, local_b[cid], x),
                           var.predict_personal(cid, local_v[cid], x))
