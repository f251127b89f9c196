"""Torch plumbing every strategy shares: state conversion, minibatches, SGD, prediction.

Kept separate from the strategies so each algorithm file reads as its algorithm only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.model import DualLevelMoE

Arrays = dict[str, np.ndarray]


def to_arrays(state: Mapping[str, torch.Tensor]) -> Arrays:
    """Detached float copies of a state dict as numpy arrays (what crosses the wire)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load a subset of named arrays into ``model``; unknown names are an error."""
    own = model.state_dict()
    unknown = sorted(set(arrays) - set(own))
    if unknown:
        raise KeyError(f"state has names the model does not: {unknown[:5]}")
    with torch.no_grad():
        for name, value in arrays.items():
            own[name].copy_(torch.from_numpy(np.asarray(value)).to(own[name].dtype))


def build_model(cfg: ModelConfig, seed: int) -> DualLevelMoE:
    """A model whose initial weights depend only on ``seed``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return DualLevelMoE(cfg)
    finally:
        torch.random.set_rng_state(gen_state)


def minibatches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Shuffled index batches covering 0..n-1 once."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def sgd(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_epochs(model: nn.Module, params: list[nn.Parameter], x: np.ndarray, y: np.ndarray,
               cfg: TrainConfig, epochs: int, rng: np.random.Generator,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Minibatch SGD over ``params`` only; returns the mean loss of the last epoch."""
    if not params or len(y) == 0:
        return float("nan")
    requires = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in requires)
    opt = sgd(params, cfg)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    last = 0.0
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in minibatches(len(y), cfg.batch_size, rng):
            bi = torch.from_numpy(idx)
            loss = loss_fn(xt[bi], yt[bi])
            if not bool(torch.isfinite(loss)) or not loss.requires_grad:
                # diverged (or nothing left to train): no step from a non-finite loss; the
                # caller sees a NaN mean loss and fedcoe_edge.health names the round and client
                total, count = float("nan"), count + len(idx)
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm > 0:  # one bad batch cannot throw the weights to inf
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return last


@torch.no_grad()
def predict_probs(model: DualLevelMoE, x: np.ndarray, batch_size: int = 512, **forward_kw) -> np.ndarray:
    """Personal-mixture probabilities (or the global path with ``use_local=False``), (N, C)."""
    model.eval()
    outs = []
    for start in range(0, len(x), batch_size):
        out = model(torch.from_numpy(x[start : start + batch_size]), **forward_kw)
        outs.append(out.log_probs.exp().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.cfg.num_classes), np.float32)


def accuracy(probs: np.ndarray, y: np.ndarray) -> float:
    return float((probs.argmax(1) == y).mean()) if len(y) else float("nan")
