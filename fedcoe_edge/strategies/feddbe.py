"""FedDBE: FedAvg with a Domain Bias Eliminator (PRBM + MR).

Zhang, Hua, Cao, Wang, Song, Xue, Ma & Guan, "Eliminating Domain Bias for Federated Learning
in Representation Space", NeurIPS 2023 (FedAvg + DBE, the authors' PFLlib ``FedDBE``). The
plain network splits into a feature extractor (every layer but the expert's last Linear: for
the camera setting's MLP expert the hidden layer and its ReLU; for the CNN expert both convs
and pools, flattened) and a head (that last Linear), as FedRep splits it. Each client keeps

* a **personalized representation bias memory (PRBM)** b_i, one learnable vector as wide as
  the head's input, added to the extractor's output: the head reads f(x) + b_i. It starts at
  0, is trained by the same SGD as the model, stays on the device and is never uploaded;
* a **mean regularization (MR)** ``κ ||mean_batch f(x) - z̄_g||²`` pulling the batch mean of
  the extractor's features (without b_i) to the consensus mean z̄_g.

z̄_g is collected once, in the first round (the paper's initialization period): that round
is plain FedAvg, and each client also reports the mean of its extractor's features over its
training split (after its local training), D floats in ``ClientResult.metrics``
(``dbe_mean/<i>``), which the server averages weighted by sample counts. They travel as
metrics, not tensors, so that a result carries only global tensors (the strategy contract)
and the server's update clipping, which bounds the change of the model's weights, neither
counts nor scales them; the simulator's byte count covers tensors only, so these 4·D bytes,
once per client, are not in ``bytes_up_per_client_round``. From the next round on every task
carries z̄_g (``dbe.global_mean``, counted in the bytes down) and clients train with PRBM and
MR; the upload is extractor + head. A first round that aggregates nothing (no result, or the
median / trimmed-mean rules, which rebuild results from their tensors only) leaves z̄_g unset
and the next round collects instead. The daemons' wire carries at most 64 metrics, so FedDBE
is simulation-only (``coordinator.config.SIMULATION_ONLY``), as FedRep is.

Personal prediction uses the client's b_i. Global and cold-start prediction use no bias
(b = 0): the server never sees any b_i (averaging them would cost an upload the method
does not make), and a new client's PRBM starts at 0. The MR term is the brief's sum of
squares (PFLlib's code uses ``0.5 · mean`` over the D coordinates of a running (momentum 0.1)
mean, i.e. its κ is 2D times ours); κ is ``train.extra["dbe_kappa"]`` (default
``DEFAULT_KAPPA``; range [0, 1e6]). docs/design.md, "Personalized baselines".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask, Failure
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.fedrep import head_prefix
from fedcoe_edge.streaming import Partial
from fedcoe_edge.training import load_arrays, predict_probs, run_epochs, to_arrays

DEFAULT_KAPPA = 0.01  # on our sum-of-squares scale; chosen on validation (docs/design.md, "Personalized baselines")
MAX_KAPPA = 1e6
MEAN_METRIC = "dbe_mean/"  # + coordinate index: a client's feature mean, in the collection round
COLLECT = "dbe_collect"  # task.config flag of the collection round
GLOBAL_MEAN_KEY = "dbe.global_mean"  # down every later round
PRBM_KEY = "local.dbe.prbm"
SUM, WEIGHT = "dbe_mean_sum", "dbe_mean_weight"  # the partial's extra sums in the collection round
DBE_SALT = 5


def kappa_of(train_cfg: TrainConfig) -> float:
    """``train.extra["dbe_kappa"]`` with its default and range check (one place)."""
    k = train_cfg.extra.get("dbe_kappa", DEFAULT_KAPPA)
    if isinstance(k, bool) or not isinstance(k, int | float) or not math.isfinite(k) or not 0 <= k <= MAX_KAPPA:
        raise ConfigError(f"train.extra.dbe_kappa must be in [0, {MAX_KAPPA:g}], got {k!r}")
    return float(k)


def mr_loss(features: torch.Tensor, global_mean: torch.Tensor, kappa: float) -> torch.Tensor:
    """MR: ``κ ||mean over the batch of features - z̄_g||²`` (features (B, D), z̄_g (D,))."""
    return kappa * ((features.mean(0) - global_mean) ** 2).sum()


def mean_metrics(mean: np.ndarray) -> dict[str, float]:
    """A feature mean as ``ClientResult.metrics`` entries ``dbe_mean/<i>``."""
    return {f"{MEAN_METRIC}{i}": float(v) for i, v in enumerate(np.asarray(mean).reshape(-1))}


def metrics_mean(metrics: Mapping[str, float], dim: int) -> np.ndarray | None:
    """The feature mean a result reports, (dim,) float64; None when it reports none, or one
    of the wrong size or not finite (such a report is left out of z̄_g)."""
    try:
        m = np.array([float(metrics[f"{MEAN_METRIC}{i}"]) for i in range(dim)], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if f"{MEAN_METRIC}{dim}" in metrics or not np.isfinite(m).all():
        return None
    return m


class FedDBE(FedAvg):
    """FedAvg + a private representation bias (PRBM) + mean regularization (MR)."""

    name = "feddbe"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.kappa = kappa_of(train_cfg)
        prefix = head_prefix(self.model)
        head = self.model.get_submodule(prefix.rstrip("."))
        if not isinstance(head, nn.Linear):
            raise ConfigError("FedDBE needs an expert whose head is an nn.Linear")
        self.head = head
        self.feature_dim = head.in_features
        self.global_mean: np.ndarray | None = None  # z̄_g, once collected
        # what the head's pre-hook adds to, and records of, the extractor's output
        self.bias: torch.Tensor | None = None
        self.features: torch.Tensor | None = None
        head.register_forward_pre_hook(self._at_head)

    def _at_head(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """Record the extractor's output f(x); feed the head f(x) + b when a PRBM is set."""
        self.features = args[0]
        if self.bias is None:
            return None
        return (args[0] + self.bias, *args[1:])

    # --- server ---------------------------------------------------------------------------
    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        if self.global_mean is None:
            return [ClientTask(cid, rnd, self.global_state, config={"version": self.version, COLLECT: True})
                    for cid in client_ids]
        params = {**self.global_state, GLOBAL_MEAN_KEY: self.global_mean}
        return [ClientTask(cid, rnd, params, config={"version": self.version}) for cid in client_ids]

    def new_partial(self, rnd: int) -> Partial:
        partial = self.with_defence(Partial(rnd))
        if self.global_mean is None:  # the collection round: z̄_g is summed beside the model
            partial.extra_sums[SUM] = np.zeros(self.feature_dim, np.float64)
            partial.extra_sums[WEIGHT] = np.zeros((), np.float64)
        return partial

    def accumulate(self, partial: Partial, result: ClientResult) -> None:
        super().accumulate(partial, result)
        if SUM not in partial.extra_sums:
            return
        m = metrics_mean(result.metrics, self.feature_dim)
        if m is not None:
            partial.extra_sums[SUM] = partial.extra_sums[SUM] + result.num_samples * m
            partial.extra_sums[WEIGHT] = partial.extra_sums[WEIGHT] + float(result.num_samples)

    def finalize(self, rnd: int, partial: Partial, failures: Sequence[Failure]) -> Arrays:
        if SUM in partial.extra_sums and float(partial.extra_sums[WEIGHT]) > 0:
            self.global_mean = (partial.extra_sums[SUM] / float(partial.extra_sums[WEIGHT])).astype(np.float32)
        return super().finalize(rnd, partial, failures)

    def checkpoint_extra(self) -> dict[str, Any]:
        doc = super().checkpoint_extra()
        doc["dbe_global_mean"] = None if self.global_mean is None else self.global_mean.tolist()
        return doc

    def restore_extra(self, doc: Mapping[str, Any]) -> None:
        super().restore_extra(doc)
        mean = doc.get("dbe_global_mean")
        self.global_mean = None if mean is None else np.asarray(mean, dtype=np.float32)

    # --- client ---------------------------------------------------------------------------
    def feature_mean(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Mean of the extractor's output over ``x`` with the loaded weights, (D,)."""
        self.model.eval()
        total = torch.zeros(self.feature_dim, dtype=torch.float64)
        self.bias = None
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                self.model(torch.from_numpy(x[start : start + batch_size]))
                assert self.features is not None
                total += self.features.flatten(1).double().sum(0)
        return (total / max(len(x), 1)).numpy().astype(np.float32)

    def dbe_loss(self, global_mean: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            ce = F.nll_loss(self.model(xb).log_probs, yb)
            assert self.features is not None
            return ce + mr_loss(self.features, global_mean, self.kappa)
        return loss

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays | None]:
        params = {k: v for k, v in task.params.items() if k.startswith("global.")}
        if GLOBAL_MEAN_KEY not in task.params:  # collection round: FedAvg plus the feature mean
            self.bias = None
            new = self.train_global(params, data, task.round, self.train_cfg.local_epochs)
            metrics = ({} if not task.config.get(COLLECT) or data.num_train == 0
                       else mean_metrics(self.feature_mean(data.x_train)))
            return ClientResult(task.client_id, task.round, data.num_train, new, metrics=metrics), local_state
        model = self.model
        load_arrays(model, params)
        prbm = (local_state or {}).get(PRBM_KEY)
        bias = nn.Parameter(torch.from_numpy(np.array(prbm, dtype=np.float32)) if prbm is not None
                            else torch.zeros(self.feature_dim))
        self.bias = bias
        gmean = torch.from_numpy(np.asarray(task.params[GLOBAL_MEAN_KEY], dtype=np.float32))
        trainable = [p for n, p in model.named_parameters() if n.startswith("global.")] + [bias]
        rng = np.random.default_rng([self.seed, task.round, len(data.y_train), DBE_SALT])
        try:
            run_epochs(model, trainable, data.x_train, data.y_train, self.train_cfg,
                       self.train_cfg.local_epochs, rng, self.dbe_loss(gmean))
        finally:
            self.bias = None
        new = to_arrays(model.global_state())
        return (ClientResult(task.client_id, task.round, data.num_train, new),
                {PRBM_KEY: bias.detach().numpy().copy()})

    # --- evaluation -------------------------------------------------------------------------
    def predict_global(self, x: np.ndarray) -> np.ndarray:
        """The shared extractor and head with no bias (see the module docstring)."""
        self.bias = None
        return super().predict_global(x)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        if not local_state or PRBM_KEY not in local_state:
            return self.predict_global(x)
        load_arrays(self.model, self.global_state)
        self.bias = torch.from_numpy(np.array(local_state[PRBM_KEY], dtype=np.float32))
        try:
            return predict_probs(self.model, x)
        finally:
            self.bias = None
