"""Every strategy the daemons can deploy reproduces ``fedcoe simulate`` exactly.

The design's one rule (section 2): an algorithm never knows its transport. The coordinator
and agents drive the same Strategy objects as the simulator (select, configure, client
update on the device, aggregate, and the final ``personalize``), so with uncompressed
uploads over the in-memory transport every round's global and personalized accuracy must
equal the simulator's to the last bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.harness import EmbeddedFederation, small
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.simulation import SimulationConfig, run_one
from fedcoe_edge.strategies import SIMULATION_ONLY, STRATEGIES
from fedcoe_edge.transport import MemoryBroker

DEPLOYABLE = sorted(a for a in STRATEGIES if a not in SIMULATION_ONLY)


@pytest.mark.parametrize("algorithm", DEPLOYABLE)
def test_deployed_strategy_equals_the_simulator(tmp_path: Path, algorithm: str) -> None:
    broker = MemoryBroker()
    fed = EmbeddedFederation(tmp_path, lambda c, w, b: broker.client(c, will=w, birth=b),
                             devices=3, rounds=2, algorithm=algorithm, compress=False,
                             aggregation="batch", **small())  # the simulator's fold, bit for bit
    fed.start()
    try:
        fed.wait_rounds(90)
        c = fed.coordinator
        assert c is not None
        rows = [c.store.round_summary(r) for r in (1, 2)]
    finally:
        fed.stop()
    sim = run_one(algorithm, make_federation("digits", "dirichlet", 3, 1, 0, 0.5, 20),
                  SimulationConfig(clients=3, new_clients=1, rounds=2, model=ModelConfig(expert_hidden=16),
                                   train=TrainConfig(local_epochs=1)), 0)
    assert [r["accepted"] for r in rows] == [3, 3]
    assert [r["global_acc"] for r in rows] == [p["global_acc"] for p in sim.curve]
    assert [r["personalized_acc"] for r in rows] == [p["personalized_acc"] for p in sim.curve]


def test_simulation_only_strategies_are_refused_by_the_coordinator_config(tmp_path: Path) -> None:
    from coordinator.config import load_config
    from fedcoe_edge.errors import ConfigError

    for name in SIMULATION_ONLY:
        path = tmp_path / f"{name}.toml"
        path.write_text(f"[federation]\nalgorithm = '{name}'\n[security]\nsecret = '{'ab' * 16}'\n")
        with pytest.raises(ConfigError, match=f"algorithm '{name}' runs in `fedcoe simulate` only"):
            load_config(path, {})
