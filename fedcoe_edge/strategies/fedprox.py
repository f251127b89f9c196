"""FedProx: FedAvg with a proximal term in the client objective.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. Each client
minimises ``CE + mu/2 ||w - w_t||^2`` around the model it received, which bounds client drift
under heterogeneous data; the server aggregates as FedAvg. ``mu`` is ``train.prox_mu``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.strategies.fedavg import FedAvg, prox_loss


class FedProx(FedAvg):
    """FedAvg's server; the client adds ``prox_mu/2 ||w - w_received||^2``."""

    name = "fedprox"

    def local_loss(self, model: DualLevelMoE, anchor: dict[str, torch.Tensor]
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return prox_loss(model, anchor, self.train_cfg.prox_mu)
