"""FedCoE's client objective (docs/design.md section 4, our reading of arXiv 2605.21264).

    L = CE(p) + beta CE(p_G) + gamma load_balance(g) + lam KL(p_L || p_G)
        + mu/2 ||theta_G - theta_G_server||^2 + rho routing_consistency

The load-balance term is the Switch Transformer auxiliary loss (Fedus et al., JMLR 2022);
the proximal term is FedProx's (Li et al., MLSys 2020) restricted to global parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedcoe_edge.config import TrainConfig
from fedcoe_edge.model import MoEOutput


def label_log_prior(labels: torch.Tensor, num_classes: int, tau: float, eps: float = 1e-3) -> torch.Tensor:
    """``tau * log`` of the label frequencies (C,); absent classes get log(eps)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    return tau * torch.log(counts / counts.sum() + eps)


def load_balance_loss(gate_probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Importance loss ``n * sum_k P_k^2`` over the n experts the gate may use (``mask``, all K
    when None): 1.0 when the batch's mean gate probability P is uniform over them, n when it
    sits on one.

    gate_probs: (B, K) probabilities, zero on masked-out experts. Unlike the Switch loss
    ``K sum_k f_k P_k``, whose dispatch counts f are constant when a client holds exactly
    top_k experts (every input goes to all of them, so its gradient vanishes), this term
    always pushes P toward even use. docs/design.md, "Routing".
    """
    n = gate_probs.shape[-1] if mask is None else int(mask.sum().clamp_min(1))
    p = gate_probs.mean(0)  # (K,)
    return n * p.pow(2).sum()


def routing_consistency(gate_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """-log of the gate mass on the experts this client holds, batch mean.

    A client trains only its m assigned experts, so a masked softmax never tells the shared
    gate that this client's inputs should NOT go to the other experts. This term does: it is
    the negative signal that keeps the aggregated gate routing each kind of input to the
    experts that were trained on it. Zero when the client holds every expert.
    """
    if mask is None or bool(mask.all()):
        return torch.zeros(())
    held = gate_logits.masked_fill(~mask.bool(), float("-inf")).logsumexp(-1)
    return (gate_logits.logsumexp(-1) - held).mean()


def consensus_kl(local_log_probs: torch.Tensor, global_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_L || p_G), batch mean: keeps the local experts near the global consensus."""
    # the global path is the target, not the student: no gradient flows into it from here
    return F.kl_div(global_log_probs.detach(), local_log_probs, log_target=True, reduction="batchmean")


def proximal_term(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """0.5 * ||theta - theta_anchor||^2 over the parameters present in ``anchor``."""
    total = torch.zeros(())
    for name, ref in anchor.items():
        total = total + (params[name] - ref).pow(2).sum()
    return 0.5 * total


@dataclass
class LossParts:
    total: torch.Tensor
    ce: float
    ce_global: float
    balance: float
    kl: float
    prox: float
    route: float


def fedcoe_loss(out: MoEOutput, y: torch.Tensor, cfg: TrainConfig,
                params: Mapping[str, torch.Tensor] | None = None,
                anchor: dict[str, torch.Tensor] | None = None,
                expert_mask: torch.Tensor | None = None,
                log_prior: torch.Tensor | None = None) -> LossParts:
    """The full client objective with each part reported for logging.

    ``log_prior`` (C,) is ``tau * log`` of the client's label frequencies: the global path is
    trained with the balanced softmax (Ren et al., NeurIPS 2020; FedLC, Zhang et al., ICML
    2022), so p_G models p(y|x) under a uniform label prior instead of each client's skew.
    """
    ce = F.nll_loss(out.log_probs, y)
    g_lp = out.global_log_probs if log_prior is None else out.global_log_probs + log_prior
    ce_g = F.cross_entropy(g_lp, y)  # == nll of log_softmax(z_G + log_prior)
    bal = load_balance_loss(out.gate_probs, expert_mask)
    kl = (consensus_kl(out.local_log_probs, out.global_log_probs)
          if out.local_log_probs is not None and cfg.lam > 0 else torch.zeros(()))
    prox = proximal_term(params, anchor) if params is not None and anchor and cfg.mu > 0 else torch.zeros(())
    route = routing_consistency(out.gate_logits, expert_mask) if cfg.rho > 0 else torch.zeros(())
    total = ce + cfg.beta * ce_g + cfg.gamma * bal + cfg.lam * kl + cfg.mu * prox + cfg.rho * route
    return LossParts(total, *(float(t.detach()) for t in (ce, ce_g, bal, kl, prox, route)))
