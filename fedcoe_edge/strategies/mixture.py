"""Mixture of a global and a local expert with a learned gate.

Zec, Mogren, Martinsson, Sütfeld & Zhou, "Specialized federated learning using a mixture of
experts" (arXiv 2010.02056, 2020): a global model trained by FedAvg, a private local model,
and a private gating function that, per input, weighs them:
``p(x) = h(x) p_G(x) + (1 - h(x)) p_L(x)``.

This is exactly FedCoE's model with one global expert, no routing and one local expert, so
the network is ``DualLevelMoE`` with K=1 and M=1, the global expert as wide as FedAvg's plain
network and the local expert of the device's tier (same architecture, as in the paper). Each
round a client trains its copy of the global model on CE(p_G) (uploaded, FedAvg), then the
local expert and gate on CE(p) with the received global model frozen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedavg import FedAvg, plain_config
from fedcoe_edge.strategies.fedcoe import client_seed
from fedcoe_edge.training import build_model, load_arrays, predict_probs, run_epochs, to_arrays

LOCAL_SALT = 3  # separates the mixture's minibatch order from the global model's


class Mixture(FedAvg):
    """FedAvg global model + private local expert + private gate (Zec et al. 2020)."""

    name = "mixture"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.net_cfg = dataclasses.replace(plain_config(model_cfg), num_local_experts=1)
        self.model = build_model(self.net_cfg, seed)

    def local_loss(self, model: DualLevelMoE, anchor: dict[str, torch.Tensor]
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The global model learns from its own prediction only (FedAvg on p_G)."""
        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.nll_loss(model(xb, use_local=False).log_probs, yb)
        return loss

    def fresh_local_state(self, client_id: str) -> Arrays:
        return to_arrays(build_model(self.net_cfg, client_seed(self.seed, client_id)).local_state())

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        new_global = self.train_global(task.params, data, task.round, self.train_cfg.local_epochs)
        model = self.model
        load_arrays(model, task.params)  # the mixture is trained around the received global model
        load_arrays(model, local_state if local_state else self.fresh_local_state(task.client_id))
        trainable = [p for n, p in model.named_parameters() if n.startswith("local.")]

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.nll_loss(model(xb).log_probs, yb)

        rng = np.random.default_rng([self.seed, task.round, len(data.y_train), LOCAL_SALT])
        run_epochs(model, trainable, data.x_train, data.y_train, self.train_cfg,
                   self.train_cfg.local_epochs, rng, loss)
        local = to_arrays(model.local_state())
        return ClientResult(task.client_id, task.round, data.num_train, new_global), local

    def predict_global(self, x: np.ndarray) -> np.ndarray:
        load_arrays(self.model, self.global_state)
        return predict_probs(self.model, x, use_local=False)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        load_arrays(self.model, self.global_state)
        load_arrays(self.model, local_state if local_state else self.fresh_local_state(client_id))
        return predict_probs(self.model, x)
