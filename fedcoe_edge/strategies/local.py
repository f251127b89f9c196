"""Local-only training: every client trains its own model on its own data, nothing is shared.

The lower bound every personalized FL paper reports (e.g. Collins et al., FedRep, ICML 2021;
PFLlib's "Local"). Same network, local epochs and rounds as the federated methods, so the
only thing missing is collaboration. There is no shared model: ``predict_global`` and
``predict_cold`` answer with uniform probabilities (chance), and reports mark them n/a.

Also home of the private-state naming the personalized baselines share: a private copy of the
plain network is stored under ``local.personal.*`` so that everything a client keeps to itself
starts with ``local.`` (the model's wire rule: ``local.`` never leaves a device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask, Failure
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.fedcoe import client_seed
from fedcoe_edge.streaming import Partial
from fedcoe_edge.training import build_model, load_arrays, predict_probs, to_arrays

PRIVATE_PREFIX = "local.personal."


def to_private(arrays: Arrays) -> Arrays:
    """``global.X`` -> ``local.personal.X``: a client's own copy of the plain network."""
    return {PRIVATE_PREFIX + k.removeprefix("global."): v for k, v in arrays.items()}


def from_private(arrays: Arrays) -> Arrays:
    """Inverse of ``to_private``; keys without the private prefix are ignored."""
    return {"global." + k.removeprefix(PRIVATE_PREFIX): v for k, v in arrays.items()
            if k.startswith(PRIVATE_PREFIX)}


class Local(FedAvg):
    """Each client trains alone from its own seed; the server holds nothing."""

    name = "local"
    shares_model: ClassVar[bool] = False  # no global model: global/cold-start are chance

    def initialize(self) -> Arrays:
        self.global_state = {}
        return self.global_state

    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        return [ClientTask(cid, rnd, {}, config={"version": self.version}) for cid in client_ids]

    # --- aggregation: nothing is shared, so nothing is summed --------------------------
    def new_partial(self, rnd: int) -> Partial:
        return Partial(rnd)

    def accumulate(self, partial: Partial, result: ClientResult) -> None:
        """Nothing travels up (results carry no params); the client is only counted."""

    def finalize(self, rnd: int, partial: Partial, failures: Sequence[Failure]) -> Arrays:
        return self.global_state

    def start_state(self, client_id: str) -> Arrays:
        """A client's first model: built from its own seed, never downloaded."""
        model = build_model(self.net_cfg, client_seed(self.seed, client_id))
        return to_arrays(model.global_state())

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        start = from_private(local_state) if local_state else self.start_state(task.client_id)
        new = self.train_global(start, data, task.round, self.train_cfg.local_epochs)
        return ClientResult(task.client_id, task.round, data.num_train, {}), to_private(new)

    def predict_global(self, x: np.ndarray) -> np.ndarray:
        """No shared model exists: uniform probabilities, i.e. chance."""
        c = self.net_cfg.num_classes
        return np.full((len(x), c), 1.0 / c, dtype=np.float32)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        state = from_private(local_state) if local_state else self.start_state(client_id)
        load_arrays(self.model, state)
        return predict_probs(self.model, x)
