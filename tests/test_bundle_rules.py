"""A device without torch asks the strategy which experts a cold start downloads
(fedcoe_edge/strategies/bundle_rules.py) instead of restating FedCoE's rule or branching on
an algorithm's name."""

from __future__ import annotations

import numpy as np

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.strategies import STRATEGIES, FedCoE
from fedcoe_edge.strategies.bundle_rules import bundle_cold_rule


def test_the_bundle_rule_is_the_strategys_own() -> None:
    """For every prior, a bundle device picks what FedCoE's torch side picks."""
    model, train = ModelConfig(expert_hidden=16), TrainConfig(cold_start_mass=0.8)
    s = FedCoE(model, train, 0)
    rule = bundle_cold_rule("fedcoe")
    assert rule is not None
    rng = np.random.default_rng(0)
    for _ in range(50):
        prior = rng.dirichlet(np.full(model.num_global_experts, 0.3))
        assert rule(prior, model, train) == s.experts_for_prior(prior)


def test_only_algorithms_a_bundle_serves_have_a_rule() -> None:
    """The dense baselines' models are not in a device's bundle: no rule, the device declines."""
    served = {name for name in STRATEGIES if bundle_cold_rule(name) is not None}
    assert served == {"fedcoe"}
    assert bundle_cold_rule("no-such-algorithm") is None
