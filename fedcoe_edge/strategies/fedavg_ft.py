"""FedAvg followed by local fine-tuning (FedAvg-FT).

The simple personalization baseline of Wang et al., "Federated Evaluation of On-device
Personalization" (arXiv 1910.10252) and Yu et al., "Salvaging Federated Learning by Local
Adaptation" (arXiv 2002.04758): train the global model with FedAvg, then every client
fine-tunes a copy on its own training split for ``train.finetune_epochs`` epochs.
"""

from __future__ import annotations

import numpy as np

from fedcoe_edge.strategies.base import Arrays, ClientData
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.local import from_private, to_private
from fedcoe_edge.training import load_arrays, predict_probs

FINETUNE_ROUND = 1_000_000  # seeds the fine-tuning minibatch order apart from any round


class FedAvgFT(FedAvg):
    """FedAvg rounds; ``personalize`` fine-tunes the final global model on each client."""

    name = "fedavg-ft"

    def personalize(self, local_state: Arrays | None, data: ClientData) -> Arrays | None:
        if data.num_train == 0:
            return local_state
        tuned = self.train_global(self.global_state, data, FINETUNE_ROUND,
                                  self.train_cfg.finetune_epochs)
        return to_private(tuned)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        """The fine-tuned copy once it exists; before the last round, the global model."""
        if not local_state:
            return self.predict_global(x)
        load_arrays(self.model, from_private(local_state))
        return predict_probs(self.model, x)
