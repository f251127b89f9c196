"""Ditto: a global model by FedAvg plus a personal model pulled toward it.

Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021 (Algorithm 1). Each round a client (1) trains its copy of the
global model w as in FedAvg and uploads it, and (2) trains its personal model v_i on
``CE(v_i) + lambda/2 ||v_i - w_t||^2`` around the global model it received, for the same
number of local epochs. v_i starts as the first global model the client receives and never
leaves the device. ``lambda`` is ``train.extra["ditto_lambda"]`` (default 0.1, from the low end
of the paper's grid {0.05, 0.1, 0.2, 0.5, 1, 2}; not tuned here, as FedCoE is not).
"""

from __future__ import annotations

import numpy as np
import torch

from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedavg import FedAvg, prox_loss
from fedcoe_edge.strategies.local import from_private, to_private
from fedcoe_edge.training import load_arrays, predict_probs, run_epochs, to_arrays

DEFAULT_LAMBDA = 0.1


class Ditto(FedAvg):
    """FedAvg for w; a private v_i per client with a proximal pull to w."""

    name = "ditto"

    @property
    def ditto_lambda(self) -> float:
        return float(self.train_cfg.extra.get("ditto_lambda", DEFAULT_LAMBDA))

    def train_personal(self, personal: Arrays, anchor: Arrays, data: ClientData, rnd: int) -> Arrays:
        """Local SGD on v_i with ``lambda/2 ||v_i - w_t||^2``; returns the new v_i."""
        model = self.model
        load_arrays(model, personal)
        ref = {k: torch.from_numpy(np.array(v)) for k, v in anchor.items()}
        trainable = [p for n, p in model.named_parameters() if n.startswith("global.")]
        rng = np.random.default_rng([self.seed, rnd, len(data.y_train), 1])
        run_epochs(model, trainable, data.x_train, data.y_train, self.train_cfg,
                   self.train_cfg.local_epochs, rng, prox_loss(model, ref, self.ditto_lambda))
        return to_arrays(model.global_state())

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        new_global = self.train_global(task.params, data, task.round, self.train_cfg.local_epochs)
        personal = from_private(local_state) if local_state else dict(task.params)
        personal = self.train_personal(personal, task.params, data, task.round)
        return (ClientResult(task.client_id, task.round, data.num_train, new_global),
                to_private(personal))

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        if not local_state:
            return self.predict_global(x)
        load_arrays(self.model, from_private(local_state))
        return predict_probs(self.model, x)
