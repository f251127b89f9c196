"""FedCoE ablations: each variant removes one part, so a user sees what that part buys.

Variants of FedCoE (arXiv 2605.21264, docs/design.md section 4), built without touching its code:

* ``fedcoe-noaffinity``: experts averaged by n_i alone, not n_i r_ik;
* ``fedcoe-nocoord``: no coordination regulariser (lam = 0: no KL(p_L || p_G); mu = 0: no
  proximal pull of the local copy of the global level);
* ``fedcoe-nolocal``: no local experts (M = 0): the personal model is the global path
  through the client's assigned experts;
* ``fedcoe-full``: full exchange (m = K) instead of partial exchange.
"""

from __future__ import annotations

import dataclasses

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.strategies.fedcoe import FedCoE


class FedCoENoAffinity(FedCoE):
    """Plain sample-weighted mean of experts."""

    name = "fedcoe-noaffinity"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed, affinity_weighting=False)


class FedCoENoCoord(FedCoE):
    """lam = mu = 0: local experts and the local copy of the global level drift freely."""

    name = "fedcoe-nocoord"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, dataclasses.replace(train_cfg, lam=0.0, mu=0.0), seed)


class FedCoENoLocal(FedCoE):
    """No private experts: the personal model is the (partially held) global path."""

    name = "fedcoe-nolocal"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(dataclasses.replace(model_cfg, num_local_experts=0), train_cfg, seed)


class FedCoEFull(FedCoE):
    """Every client trains and exchanges all K experts (m = K)."""

    name = "fedcoe-full"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed, partial_exchange=False)


ABLATIONS: tuple[type[FedCoE], ...] = (FedCoENoAffinity, FedCoENoCoord, FedCoENoLocal, FedCoEFull)
