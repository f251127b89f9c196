"""FedALA: FedAvg's server; each client starts its round by Adaptive Local Aggregation.

Zhang, Hua, Wang, Song, Xue, Ma & Guan, "FedALA: Adaptive Local Aggregation for Personalized
Federated Learning", AAAI 2023 (Algorithm 1; the authors' ALA module). On receipt of the
global model θ_g a client with a local model θ_l builds its starting point

    lower layers:        θ_init = θ_g
    top p layers:        θ_init = θ_l + (θ_g - θ_l) ⊙ W,   W ∈ [0, 1] element-wise

where W (one weight per parameter of the top p layers, initialised to 1, kept on the device
across rounds) is learned on a random s share of the client's training data by SGD on the
cross-entropy of θ_init with step η, clipped to [0, 1] after every minibatch:

    W ← clip(W - η · ∇_θ L(θ_init) ⊙ (θ_g - θ_l), 0, 1).

The first time ALA runs on a client (its second participation: on the first θ_l = θ_g and ALA
is skipped, as in the paper) W is trained until the loss settles (the standard deviation of
the last ``ALA_WINDOW`` epoch losses below ``ALA_THRESHOLD``, at most ``ALA_MAX_EPOCHS``
epochs); later rounds train it one epoch. The client then trains θ_init as FedAvg does, uploads
it (the server averages as FedAvg) and keeps it as its local, personal model. After the last
round ``personalize`` runs ALA once more against the final global model: the paper evaluates
the model ALA builds on receipt.

"Layers" are the trunk's and the expert's parameter-holding modules in forward order (the
1-expert plain network's gate is constant and takes θ_g). The paper's default p = 1 makes the
top layer the expert's last Linear, the head; below it, the body, the global parameters
replace the local ones every round. Knobs (``train.extra``; defaults and range checks in
:func:`ala_knobs`): ``ala_layers`` p = 1, ``ala_sample`` s = 0.8, ``ala_eta`` η = 1.0, the
paper's. docs/design.md, "Personalized baselines".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.strategies.fedavg import FedAvg
from fedcoe_edge.strategies.local import from_private, to_private
from fedcoe_edge.training import load_arrays, minibatches, predict_probs, to_arrays

DEFAULT_LAYERS = 1  # p: the head only (paper)
DEFAULT_SAMPLE = 0.8  # s = 80% of the local training data (paper)
DEFAULT_ETA = 1.0  # η (paper)
ALA_THRESHOLD = 0.1  # std of the last epoch losses that ends the first W training (authors' code)
ALA_WINDOW = 10  # how many last losses that std is over (authors' code)
ALA_MAX_EPOCHS = 100  # a cap the paper has none of: W training always ends
ALA_SALT = 4  # separates ALA's subsample and minibatch order from local training's
W_PREFIX = "local.ala_w."
STARTED_KEY = "local.ala_started"  # 1.0 once the first (until-convergence) W training ran


@dataclass(frozen=True)
class ALAKnobs:
    layers: int
    sample: float
    eta: float


def ala_knobs(train_cfg: TrainConfig) -> ALAKnobs:
    """The knobs from ``train.extra`` with their defaults; one ConfigError line if out of range."""
    extra = train_cfg.extra
    p = extra.get("ala_layers", DEFAULT_LAYERS)
    s = extra.get("ala_sample", DEFAULT_SAMPLE)
    eta = extra.get("ala_eta", DEFAULT_ETA)
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ConfigError(f"train.extra.ala_layers must be an integer >= 1, got {p!r}")
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0 < s <= 1:
        raise ConfigError(f"train.extra.ala_sample must be in (0, 1], got {s!r}")
    if (isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta)
            or eta <= 0):
        raise ConfigError(f"train.extra.ala_eta must be > 0, got {eta!r}")
    return ALAKnobs(int(p), float(s), float(eta))


def ala_weight_step(w: torch.Tensor, grad: torch.Tensor, diff: torch.Tensor, eta: float) -> torch.Tensor:
    """One ALA step: ``clip(W - η · grad ⊙ (θ_g - θ_l), 0, 1)``; ``grad`` is ∂L/∂θ_init, and
    ∂θ_init/∂W = θ_g - θ_l, so ``grad ⊙ diff`` is ∂L/∂W."""
    return torch.clamp(w - eta * grad * diff, 0.0, 1.0)


def ala_blend(local: torch.Tensor, diff: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``θ_l + (θ_g - θ_l) ⊙ W``."""
    return local + diff * w


def layer_prefixes(model: DualLevelMoE) -> list[str]:
    """State-dict prefixes of the trunk's and the (single) expert's parameter-holding modules,
    in registration (= forward, for the built-ins) order: what "the top p layers" counts."""
    out = []
    for name, module in model.named_modules():
        if not (name.startswith("global.trunk") or name.startswith("global.experts.0")):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            out.append(name + ".")
    if not out:
        raise ValueError("FedALA needs a network with parameters in its trunk or expert")
    return out


class FedALA(FedAvg):
    """FedAvg's server; clients initialise by ALA, train, upload, keep the result."""

    name = "fedala"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.knobs = ala_knobs(train_cfg)
        layers = layer_prefixes(self.model)
        self.top = layers[-min(self.knobs.layers, len(layers)):]
        self.top_keys = [n for n, _ in self.model.named_parameters()
                         if any(n.startswith(p) for p in self.top)]

    def ala(self, received: Arrays, local_state: Arrays | None, data: ClientData,
            rnd: int) -> tuple[Arrays, Arrays]:
        """θ_init from the received global model and the client's local model, and the
        client's new ALA state (W and whether its first training ran)."""
        if not local_state or data.num_train == 0:
            return dict(received), dict(local_state or {})  # first receipt: θ_l = θ_g
        local = from_private(local_state)
        started = bool(local_state.get(STARTED_KEY, np.zeros(())).item())
        model = self.model
        load_arrays(model, received)  # lower layers: θ_g
        named = dict(model.named_parameters())
        lo = {k: torch.from_numpy(np.array(local[k])) for k in self.top_keys}
        diff = {k: torch.from_numpy(np.array(received[k])) - lo[k] for k in self.top_keys}
        w = {k: (torch.from_numpy(np.array(local_state[W_PREFIX + k])) if W_PREFIX + k in local_state
                 else torch.ones_like(lo[k])) for k in self.top_keys}
        rng = np.random.default_rng([self.seed, rnd, len(data.y_train), ALA_SALT])
        n = len(data.y_train)
        take = max(1, int(self.knobs.sample * n))
        sub = np.sort(rng.choice(n, size=take, replace=False))
        x, y = torch.from_numpy(data.x_train[sub]), torch.from_numpy(data.y_train[sub])
        for p in model.parameters():
            p.requires_grad_(False)
        top = [named[k] for k in self.top_keys]
        for p in top:
            p.requires_grad_(True)
        model.train()
        losses: list[float] = []
        for _ in range(ALA_MAX_EPOCHS if not started else 1):
            with torch.no_grad():
                for k in self.top_keys:
                    named[k].copy_(ala_blend(lo[k], diff[k], w[k]))
            loss = torch.zeros(())
            for idx in minibatches(take, self.train_cfg.batch_size, rng):
                bi = torch.from_numpy(idx)
                for p in top:
                    p.grad = None
                loss = F.nll_loss(model(x[bi]).log_probs, y[bi])
                if not bool(torch.isfinite(loss)):
                    continue  # no step from a non-finite loss (fedcoe_edge.health reports it)
                loss.backward()
                with torch.no_grad():
                    for k in self.top_keys:
                        grad = named[k].grad
                        if grad is not None:
                            w[k] = ala_weight_step(w[k], grad, diff[k], self.knobs.eta)
                        named[k].copy_(ala_blend(lo[k], diff[k], w[k]))
            losses.append(float(loss.detach()))
            if len(losses) > ALA_WINDOW and float(np.std(losses[-ALA_WINDOW:])) < ALA_THRESHOLD:
                break
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        init = to_arrays(model.global_state())
        state = {W_PREFIX + k: v.numpy().copy() for k, v in w.items()}
        state[STARTED_KEY] = np.ones((), np.float32)
        return init, state

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        init, ala_state = self.ala(task.params, local_state, data, task.round)
        new = self.train_global(init, data, task.round, self.train_cfg.local_epochs)
        return (ClientResult(task.client_id, task.round, data.num_train, new),
                {**to_private(new), **ala_state})

    def personalize(self, local_state: Arrays | None, data: ClientData) -> Arrays | None:
        """The model ALA builds from the final global model (what the paper evaluates)."""
        if not local_state:
            return local_state
        init, ala_state = self.ala(self.global_state, local_state, data, rnd=0)
        return {**to_private(init), **ala_state}

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        if not local_state:
            return self.predict_global(x)
        load_arrays(self.model, self.global_state)  # the constant gate and anything not kept
        load_arrays(self.model, from_private(local_state))
        return predict_probs(self.model, x)

    def top_layers(self) -> Sequence[str]:
        """The prefixes ALA blends (the rest take the global parameters)."""
        return list(self.top)
