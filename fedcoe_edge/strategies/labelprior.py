"""FedAvg + label prior: FedAvg's global model, personalized by each client's label frequencies.

The cheapest personalization there is, and so the bar any personalized method must clear on
label skew: no training beyond FedAvg's, no extra byte on the wire. A client reweights the
global model's class probabilities by its own training-label frequencies (Bayes' rule for a
label shift, p_j(y|x) ∝ p(y|x) p_j(y) / p(y), with the federation's marginal p(y) taken as
uniform: estimating it would need label histograms to leave the devices, and on the
class-balanced datasets of the grid it is a constant):

    p_personal(y|x) ∝ p_global(y|x) * prior_j(y),
    prior_j(y) = (n_j(y) + a) / (n_j + C a)            (additive smoothing, a = 1: Laplace)

so a class absent from the client's training split keeps probability mass (a > 0) and is
down-weighted, not made impossible. ``a`` is ``train.extra["prior_smoothing"]`` (default 1.0,
range (0, 1e6]). Global and cold-start predictions are FedAvg's; the upload is FedAvg's. The
counts live in the client's private state (``local.prior.counts``), never on the wire.
docs/design.md, "Personalized baselines".
"""

from __future__ import annotations

import math

import numpy as np

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedavg import FedAvg

DEFAULT_SMOOTHING = 1.0  # Laplace's rule: one pseudo-count per class
MAX_SMOOTHING = 1e6  # above this the prior is uniform to float precision: a typo
COUNTS_KEY = "local.prior.counts"


def smoothing_of(train_cfg: TrainConfig) -> float:
    """``train.extra["prior_smoothing"]`` with its default and range check (one place)."""
    a = train_cfg.extra.get("prior_smoothing", DEFAULT_SMOOTHING)
    if (isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a)
            or not 0 < a <= MAX_SMOOTHING):
        raise ConfigError(f"train.extra.prior_smoothing must be in (0, {MAX_SMOOTHING:g}], got {a!r}")
    return float(a)


def label_prior(counts: np.ndarray, smoothing: float) -> np.ndarray:
    """``(n(y) + a) / (n + C a)``: the smoothed label frequencies, (C,), summing to 1."""
    c = np.asarray(counts, dtype=np.float64)
    return (c + smoothing) / (c.sum() + smoothing * len(c))


def reweight(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Rows of ``probs * prior`` renormalised to sum to 1, (N, C) float32."""
    p = np.asarray(probs, dtype=np.float64) * prior[None, :]
    return (p / p.sum(1, keepdims=True)).astype(np.float32)


def label_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float32)


class FedAvgPrior(FedAvg):
    """FedAvg; the personal model is the global one times the client's smoothed label prior."""

    name = "fedavg_prior"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.smoothing = smoothing_of(train_cfg)

    def counts_state(self, data: ClientData) -> Arrays:
        return {COUNTS_KEY: label_counts(data.y_train, self.net_cfg.num_classes)}

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays | None]:
        result, _ = super().client_update(task, local_state, data)
        return result, self.counts_state(data)

    def personalize(self, local_state: Arrays | None, data: ClientData) -> Arrays | None:
        """A client never selected still knows its labels: the prior needs no round."""
        return self.counts_state(data) if data.num_train else local_state

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        probs = self.predict_global(x)
        if not local_state or COUNTS_KEY not in local_state:
            return probs
        return reweight(probs, label_prior(local_state[COUNTS_KEY], self.smoothing))
