"""FedAvg: sample-weighted averaging of full models.

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017. The baseline network is a plain (single-expert) model whose width matches the
compute FedCoE spends per input on a device (gates, shared expert, top-k routed experts and the
local experts), so the comparison is at equal inference cost, not equal parameter count.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.losses import proximal_term
from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.strategies.base import (
    Arrays,
    ClientData,
    ClientResult,
    ClientTask,
    Failure,
    Strategy,
)
from fedcoe_edge.streaming import Partial
from fedcoe_edge.training import build_model, load_arrays, predict_probs, run_epochs, to_arrays


def active_macs(cfg: ModelConfig) -> int:
    """Per-input MACs of FedCoE's personal inference path: trunk, both gates, the shared
    expert, ``top_k`` routed experts and every local expert (what a device runs per input)."""
    from fedcoe_edge.flops import count_macs

    model = DualLevelMoE(cfg)
    g, loc = model.global_part, model.local_part
    x = torch.zeros((1, *cfg.input_shape))
    feats = g.trunk(x)
    total = count_macs(g.trunk, inputs=x).macs if cfg.trunk != "identity" else 0
    total += count_macs(g.gate, inputs=feats).macs
    if g.shared is not None:
        total += count_macs(g.shared, inputs=feats).macs
    total += cfg.top_k * count_macs(g.experts[0], inputs=feats).macs
    if len(loc.experts) > 0:
        total += count_macs(loc.gate, inputs=feats).macs
        total += sum(count_macs(e, inputs=feats).macs for e in loc.experts)
    return int(total)


_PLAIN_CACHE: dict[str, ModelConfig] = {}


def plain_config(cfg: ModelConfig) -> ModelConfig:
    """A single dense network as wide as FedCoE's personal path costs: the width whose
    per-input MACs come closest to :func:`active_macs` (within a few percent; the report
    states both), so baselines are compared at equal inference cost, not equal parameters.
    docs/design.md, "Baselines"."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key in _PLAIN_CACHE:
        return _PLAIN_CACHE[key]
    target = active_macs(cfg)

    def plain(width: int) -> ModelConfig:
        return dataclasses.replace(cfg, num_global_experts=1, top_k=1, num_local_experts=0,
                                   shared_expert=False, expert_hidden=width)

    lo, hi = 1, max(8, cfg.expert_hidden)
    while active_macs(plain(hi)) < target:  # MACs grow with width: bracket, then bisect
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if active_macs(plain(mid)) < target else (lo, mid)
    best = min((lo, hi), key=lambda w: abs(active_macs(plain(w)) - target))
    _PLAIN_CACHE[key] = plain(best)
    return _PLAIN_CACHE[key]


class FedAvg(Strategy):
    """Full-model exchange, mean weighted by client sample counts."""

    name = "fedavg"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.net_cfg = plain_config(model_cfg)
        self.model: DualLevelMoE = build_model(self.net_cfg, seed)

    @property
    def network_cfg(self) -> ModelConfig:
        return self.net_cfg

    def initialize(self) -> Arrays:
        self.global_state = to_arrays(self.model.global_state())
        return self.global_state

    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        return [ClientTask(cid, rnd, self.global_state, config={"version": self.version})
                for cid in client_ids]

    # --- aggregation (docs/design.md, "Streaming aggregation") -------------------------
    def new_partial(self, rnd: int) -> Partial:
        return self.with_defence(Partial(rnd))

    def accumulate(self, partial: Partial, result: ClientResult) -> None:
        """Every global tensor, weighted by the client's sample count n_i."""
        partial.dense.add(result.params, result.num_samples, keys=list(self.global_state))

    def finalize(self, rnd: int, partial: Partial, failures: Sequence[Failure]) -> Arrays:
        """``sum_i n_i w_i / sum_i n_i`` per tensor (FedAvg); no client: the state stays."""
        partial = self.close_defence(partial)
        if partial.clients:
            self.global_state = partial.dense.mean(self.global_state)
            self.version += 1
        return self.global_state

    def local_loss(self, model: DualLevelMoE, anchor: dict[str, torch.Tensor]
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Cross-entropy of the shared model; FedProx adds its proximal term here."""
        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.nll_loss(model(xb).log_probs, yb)
        return loss

    def train_global(self, params: Arrays, data: ClientData, rnd: int, epochs: int) -> Arrays:
        """Local SGD from ``params``; returns the trained global state."""
        model = self.model
        load_arrays(model, params)
        anchor = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
        trainable = [p for n, p in model.named_parameters() if n.startswith("global.")]
        rng = np.random.default_rng([self.seed, rnd, len(data.y_train)])
        run_epochs(model, trainable, data.x_train, data.y_train, self.train_cfg, epochs, rng,
                   self.local_loss(model, anchor))
        return to_arrays(model.global_state())

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays | None]:
        new = self.train_global(task.params, data, task.round, self.train_cfg.local_epochs)
        return ClientResult(task.client_id, task.round, data.num_train, new), local_state

    def predict_global(self, x: np.ndarray) -> np.ndarray:
        load_arrays(self.model, self.global_state)
        return predict_probs(self.model, x)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        return self.predict_global(x)


def prox_loss(model: DualLevelMoE, anchor: dict[str, torch.Tensor], mu: float
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """CE plus ``mu/2 ||w - w_anchor||^2`` over the anchored (global) parameters."""
    named = dict(model.named_parameters())

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        ce = F.nll_loss(model(xb).log_probs, yb)
        return ce + mu * proximal_term(named, {k: v for k, v in anchor.items() if k in named})
    return loss
