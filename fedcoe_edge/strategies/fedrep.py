"""FedRep: a shared representation, a personal head per client.

Collins, Hassani, Mokhtari & Shakkottai, "Exploiting Shared Representations for Personalized
Federated Learning", ICML 2021 (Algorithm 1). The plain network splits into a body (every
layer but the last Linear of the expert) and a head (that last Linear). Each round a client
trains its private head with the body frozen, then the body with its head frozen, for
``train.local_epochs`` epochs each, and uploads the body; the server averages bodies by n_i.

Global and cold-start accuracy need a head nobody owns. Clients therefore also upload their
head, which the server averages into a global head used only for those two metrics (it is
never sent down); the bytes this costs are counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.training import load_arrays, predict_probs, run_epochs, to_arrays

HEAD_ROUND_SALT = 2  # separates the head's minibatch order from the body's


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the last Linear layer of the network's (single) expert."""
    last = None
    for name, module in model.named_modules():
        if name.startswith("global.experts.0") and isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError("FedRep needs an expert that ends in a Linear layer")
    return last + "."


class FedRep(FedAvg):
    """Shared body by FedAvg; private head trained first each round."""

    name = "fedrep"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.head = head_prefix(self.model)
        self.initial_head = {k: v for k, v in to_arrays(self.model.global_state()).items()
                             if self.is_head(k)}

    def is_head(self, key: str) -> bool:
        return key.startswith(self.head)

    def private_head(self, head: Arrays) -> Arrays:
        return {"local.head." + k.removeprefix(self.head): v for k, v in head.items()}

    def public_head(self, local_state: Arrays) -> Arrays:
        return {self.head + k.removeprefix("local.head."): v for k, v in local_state.items()
                if k.startswith("local.head.")}

    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        body = {k: v for k, v in self.global_state.items() if not self.is_head(k)}
        return [ClientTask(cid, rnd, body, config={"version": self.version}) for cid in client_ids]

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        model, cfg = self.model, self.train_cfg
        head = self.public_head(local_state) if local_state else self.initial_head
        load_arrays(model, {**task.params, **head})
        named = dict(model.named_parameters())
        head_params = [p for n, p in named.items() if self.is_head(n)]
        body_params = [p for n, p in named.items() if n.startswith("global.") and not self.is_head(n)]
        loss = self.local_loss(model, {})
        rng = np.random.default_rng([self.seed, task.round, len(data.y_train), HEAD_ROUND_SALT])
        run_epochs(model, head_params, data.x_train, data.y_train, cfg, cfg.local_epochs, rng, loss)
        run_epochs(model, body_params, data.x_train, data.y_train, cfg, cfg.local_epochs, rng, loss)
        state = to_arrays(model.global_state())
        new_head = {k: v for k, v in state.items() if self.is_head(k)}
        # body for aggregation, head only for the server's evaluation head (never sent down)
        return ClientResult(task.client_id, task.round, data.num_train, state), self.private_head(new_head)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        """Global body with the client's own head."""
        load_arrays(self.model, self.global_state)
        if local_state:
            load_arrays(self.model, self.public_head(local_state))
        return predict_probs(self.model, x)
