"""What a device without torch asks a strategy (the runtime install profile, docs/daemons.md).

Such a device runs its signed ONNX bundle and never builds a :class:`Strategy` (the strategy
classes build torch models), so a strategy whose model it can serve declares, here and in
numpy only, the one rule the device needs: which global experts a cold device downloads,
given the routing prior of the gate it fetched first on its own unlabeled inputs. The
strategy's torch side applies the same function (``FedCoE.experts_for_prior``), so the rule
is stated once. An algorithm with no entry is not served from a bundle: the device declines.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcoe_edge.aggregate import covering_experts
from fedcoe_edge.config import ModelConfig, TrainConfig

# (routing prior over the global experts, the model's config, the federation's train config)
# -> the sorted global expert ids a cold device downloads
ColdRule = Callable[[np.ndarray, ModelConfig, TrainConfig], list[int]]


def cover_prior(prior: np.ndarray, model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[int]:
    """FedCoE's cold start: the fewest experts, by routing prior, that carry
    ``train.cold_start_mass`` of it, never fewer than ``top_k`` (docs/design.md, "Cold start")."""
    return covering_experts(prior, train_cfg.cold_start_mass, model_cfg.top_k)


# algorithm name -> its cold rule, for the algorithms whose model a bundle serves
BUNDLE_COLD_RULES: dict[str, ColdRule] = {"fedcoe": cover_prior}


def bundle_cold_rule(algorithm: str) -> ColdRule | None:
    """The cold rule of ``algorithm`` for a device without torch; None when its model is
    not served from a bundle."""
    return BUNDLE_COLD_RULES.get(algorithm)
