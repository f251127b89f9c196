"""The dual-level Mixture-of-Experts of FedCoE.

FedCoE: "Bridging Generalization and Personalization via Federated Coordinated Dual-level
MoEs" (arXiv 2605.21264). The global level is a shared expert plus K routed experts behind a
shared softmax gate; the local level is M private experts behind a private gate that mixes
them with the global mixture:

    p_G(x) = softmax(S(x) + sum_k g_k(x) E_k(x))          (global path, logits combined)
    p(x)   = h_0(x) p_G(x) + sum_j h_j(x) softmax(z_G(x) + L_j(x))  (personal mixture)

where z_G is the global path's logits. Local experts are residual corrections of the global
consensus (``local_residual``, zero-initialised); with ``local_residual=False`` the j-th term is
softmax(L_j(x)) as in the paper's plain reading. See docs/design.md, "Model".

The always-on shared expert S follows Fed-MoE (IJCAI 2025) and DeepSeekMoE's shared experts.

State-dict names are a wire format: everything under ``global.`` may leave a device,
everything under ``local.`` never does. Keep names stable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcoe_edge.config import ModelConfig
from fedcoe_edge.registry import EXPERTS, TRUNKS, RegistryError

GLOBAL_PREFIX = "global."
LOCAL_PREFIX = "local."


class MLPExpert(nn.Module):
    """Two-layer perceptron over the flattened features; returns class logits."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, *feat) -> (B, D)
        return self.fc2(F.relu(self.fc1(x)))


class CNNExpert(nn.Module):
    """Small two-conv network for small images; returns class logits.

    On images of 16 px and more (e.g. 28x28 Fashion-MNIST) the first conv is followed by a
    2x2 max-pool, so the second conv runs at a quarter of the pixels: about 1 MMAC per
    28x28 input at width 64 instead of 3.7 MMAC. Tiny inputs (8x8 digits) keep full
    resolution until the last pool. See docs/design.md, "Model".
    """

    def __init__(self, in_shape: tuple[int, ...], width: int, num_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        c1, c2 = max(4, width // 4), max(8, width // 2)
        self.stem_pool = min(h, w) >= 16  # pool after conv1 on images of 16 px and more
        self.conv1 = nn.Conv2d(c, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        if self.stem_pool:
            h, w = h // 2, w // 2
        self.fc = nn.Linear(c2 * (h // 2) * (w // 2), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        if self.stem_pool:
            x = F.max_pool2d(x, 2)  # (B, c1, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, H', W')
        return self.fc(x.flatten(1))


class Gate(nn.Module):
    """Router: flattened features -> logits over ``n_out`` choices."""

    def __init__(self, in_dim: int, n_out: int, hidden: int = 0) -> None:
        super().__init__()
        self.net: nn.Module
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        else:
            self.net = nn.Linear(in_dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def output_layer(expert: nn.Module) -> nn.Linear:
    """The Linear that produces an expert's logits (its last Linear)."""
    layers = [m for m in expert.modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise RegistryError(f"{type(expert).__name__} has no nn.Linear output layer, which a "
                            f"residual local expert zero-initialises (model.local_residual)")
    return layers[-1]


# --- trunks and experts: built-ins and the user's own, through one registry ------------
# (fedcoe_edge/registry.py; docs/design.md, "Your own model and data")


def identity_trunk(input_shape: tuple[int, ...]) -> nn.Module:
    """No trunk: the experts read the input itself (small images, feature vectors)."""
    return nn.Identity()


def mobilenet_v3_small_trunk(input_shape: tuple[int, ...]) -> nn.Module:
    """MobileNetV3-Small features + global pool (576 wide) for camera-sized RGB inputs."""
    from fedcoe_edge.mobilenet import mobilenet_v3_small_trunk as v3_small

    return v3_small()


def mlp_expert(feat_shape: tuple[int, ...], hidden: int, num_classes: int) -> nn.Module:
    return MLPExpert(math.prod(feat_shape), hidden, num_classes)


def cnn_expert(feat_shape: tuple[int, ...], hidden: int, num_classes: int) -> nn.Module:
    if len(feat_shape) != 3:
        raise RegistryError(f"expert 'cnn' needs (C, H, W) features, got {feat_shape}; "
                            f"use expert_kind = \"mlp\" on vectors")
    return CNNExpert(feat_shape, hidden, num_classes)


PROBE_BATCH = 2  # a batch of 1 hides a batch dimension a module drops or mixes


def _probe(module: nn.Module, shape: tuple[int, ...]) -> object:
    """``module`` on zeros of ``(PROBE_BATCH, *shape)`` in eval mode, without gradient: no
    parameter, buffer, mode or random state changes, so building stays numerically neutral."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            return module(torch.zeros((PROBE_BATCH, *shape)))
    finally:
        for m, mode in modes.items():
            m.training = mode


def _made(obj: object, kind: str, name: str) -> nn.Module:
    if not isinstance(obj, nn.Module):
        raise RegistryError(f"{kind} {name!r}: the factory returned a {type(obj).__name__}, "
                            f"not a torch.nn.Module")
    return obj


def build_trunk(cfg: ModelConfig) -> tuple[nn.Module, tuple[int, ...]]:
    """Shared feature extractor and the per-sample shape it outputs.

    A trunk other than ``identity`` is run once on a zero batch of ``cfg.input_shape``, so an
    input shape it does not accept or an output without the batch dimension is a one-line
    RegistryError here, at build time, not a shape error in the first training step.
    """
    factory = TRUNKS.resolve(cfg.trunk)
    try:
        made = factory(cfg.input_shape)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"trunk {cfg.trunk!r}: the factory raised {type(exc).__name__}: "
                            f"{exc}") from None
    trunk = _made(made, "trunk", cfg.trunk)
    if cfg.trunk == "identity":
        return trunk, cfg.input_shape
    try:
        out = _probe(trunk, cfg.input_shape)
    except Exception as exc:
        raise RegistryError(f"trunk {cfg.trunk!r} does not accept inputs of model.input_shape "
                            f"{list(cfg.input_shape)}: {type(exc).__name__}: {exc}") from None
    if (not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != PROBE_BATCH
            or not out.is_floating_point()):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RegistryError(f"trunk {cfg.trunk!r} must map (B, *input_shape) to float features "
                            f"(B, *feat_shape); on a batch of {PROBE_BATCH} it returned {got}")
    return trunk, tuple(int(d) for d in out.shape[1:])


def make_expert(cfg: ModelConfig, feat_shape: tuple[int, ...], hidden: int,
                check: bool = False) -> nn.Module:
    """One expert of ``cfg.expert_kind`` over features of ``feat_shape``. With ``check`` it is
    run once on a zero batch: features it cannot read (a width that does not match the trunk)
    or logits of the wrong shape are a one-line RegistryError naming trunk and expert."""
    factory = EXPERTS.resolve(cfg.expert_kind)
    try:
        made = factory(feat_shape, hidden, cfg.num_classes)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"expert {cfg.expert_kind!r} cannot be built on trunk {cfg.trunk!r}'s "
                            f"features {list(feat_shape)}: {type(exc).__name__}: {exc}") from None
    expert = _made(made, "expert", cfg.expert_kind)
    if not check:
        return expert
    try:
        out = _probe(expert, feat_shape)
    except Exception as exc:
        raise RegistryError(f"expert {cfg.expert_kind!r} does not accept trunk {cfg.trunk!r}'s "
                            f"features of shape {list(feat_shape)}: {type(exc).__name__}: "
                            f"{exc}") from None
    want = [PROBE_BATCH, cfg.num_classes]
    if not isinstance(out, torch.Tensor) or list(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RegistryError(f"expert {cfg.expert_kind!r} must return logits (B, num_classes) = "
                            f"(B, {cfg.num_classes}); on a batch of {PROBE_BATCH} it returned {got}")
    return expert


def _needs_check(cfg: ModelConfig) -> bool:
    """Built-in pairs are shape-checked by ModelConfig.validate; anything else is probed."""
    return not (TRUNKS.is_builtin(cfg.trunk) and EXPERTS.is_builtin(cfg.expert_kind))



def topk_routing(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's top-k gate probabilities, renormalised to sum to one.

    probs: (B, K) -> (B, K) with K - k zeros per row. Ties break toward the lower index,
    the same rule the ONNX runtime uses, so torch and device route identically.
    """
    if k >= probs.shape[-1]:
        return probs
    # torch.topk breaks ties arbitrarily on CPU; a stable descending sort keeps the lower index
    top_vals, top_idx = probs.sort(dim=-1, descending=True, stable=True)
    top_vals, top_idx = top_vals[..., :k], top_idx[..., :k]
    weights = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim, with masked-out entries (mask False) exactly zero."""
    if mask is not None:
        logits = logits.masked_fill(~mask.bool(), float("-inf"))
    return logits.softmax(-1)


class GlobalMoE(nn.Module):
    """The shared level: trunk, always-on shared expert, K routed experts, global gate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.trunk, self.feat_shape = build_trunk(cfg)
        feat_dim = math.prod(self.feat_shape)
        check = _needs_check(cfg)  # probe the first expert of this width only
        self.shared = (make_expert(cfg, self.feat_shape, cfg.expert_hidden, check)
                       if cfg.shared_expert else None)
        self.experts = nn.ModuleList(
            make_expert(cfg, self.feat_shape, cfg.expert_hidden, check and k == 0 and self.shared is None)
            for k in range(cfg.num_global_experts)
        )
        self.gate = Gate(feat_dim, cfg.num_global_experts, cfg.gate_hidden)


class LocalMoE(nn.Module):
    """The private level: M experts sized by the device's tier and the local gate."""

    def __init__(self, cfg: ModelConfig, feat_shape: tuple[int, ...]) -> None:
        super().__init__()
        check = _needs_check(cfg)
        self.experts = nn.ModuleList(
            make_expert(cfg, feat_shape, cfg.local_hidden, check and j == 0)
            for j in range(cfg.num_local_experts)
        )
        if cfg.local_residual:
            # a residual expert starts as "no correction": the device's first personal model
            # is the global path, and the local level can only add what its data supports
            for expert in self.experts:
                last = output_layer(expert)
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        # weights over [global mixture, local expert 1..M]
        self.gate = Gate(math.prod(feat_shape), 1 + cfg.num_local_experts, cfg.gate_hidden)


@dataclass
class MoEOutput:
    """What a forward pass returns: predictions plus the routing the losses need."""

    log_probs: torch.Tensor  # (B, C) log p(x), the personal mixture
    global_log_probs: torch.Tensor  # (B, C) log p_G(x), the global path
    local_log_probs: torch.Tensor | None  # (B, C) log of the local experts' own mixture
    gate_probs: torch.Tensor  # (B, K) softmax of the global gate over the experts held
    routing: torch.Tensor  # (B, K) top-k renormalised weights actually used
    local_gate_probs: torch.Tensor | None  # (B, 1+M) weights over [global, local_1..M]
    gate_logits: torch.Tensor  # (B, K) raw global gate logits over all K (prior applied)


class DualLevelMoE(nn.Module):
    """FedCoE's model. ``state_dict`` keys start with ``global.`` or ``local.``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.add_module("global", GlobalMoE(cfg))
        self.add_module("local", LocalMoE(cfg, self.global_part.feat_shape))

    @property
    def global_part(self) -> GlobalMoE:
        return self._modules["global"]  # type: ignore[return-value]

    @property
    def local_part(self) -> LocalMoE:
        return self._modules["local"]  # type: ignore[return-value]

    def gate_logits(self, feats: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Global gate logits (B, K), optionally reweighted by a routing prior (cold start)."""
        logits = self.global_part.gate(feats)
        if prior is not None:
            logits = logits + torch.log(prior.clamp_min(1e-8))
        return logits

    def gate_probs(self, feats: torch.Tensor, prior: torch.Tensor | None = None,
                   expert_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Global gate probabilities (B, K), restricted to the experts a device holds."""
        return masked_softmax(self.gate_logits(feats, prior), expert_mask)

    def global_logits(self, feats: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """S(x) + sum_k routing_k E_k(x); experts with zero weight for the whole batch are skipped."""
        g = self.global_part
        out = (g.shared(feats) if g.shared is not None
               else feats.new_zeros((feats.shape[0], self.cfg.num_classes)))
        used = (routing > 0).any(0)  # (K,) experts any sample routes to
        for k, expert in enumerate(g.experts):
            if bool(used[k]):
                out = out + routing[:, k : k + 1] * expert(feats)
        return out  # (B, C)

    def forward(self, x: torch.Tensor, *, prior: torch.Tensor | None = None,
                expert_mask: torch.Tensor | None = None, use_local: bool = True,
                detach_global: bool = False) -> MoEOutput:
        """``detach_global`` stops the personal mixture's gradient at the global path, so the
        global path learns only from its own loss term (the local level cannot bend it)."""
        feats = self.global_part.trunk(x)
        gate_logits = self.gate_logits(feats, prior)
        gate_probs = masked_softmax(gate_logits, expert_mask)
        routing = topk_routing(gate_probs, self.cfg.top_k)
        z_global = self.global_logits(feats, routing)  # (B, C)
        global_log_probs = z_global.log_softmax(-1)
        local = self.local_part
        if not use_local or len(local.experts) == 0:
            return MoEOutput(global_log_probs, global_log_probs, None, gate_probs, routing, None,
                             gate_logits)
        h = local.gate(feats).log_softmax(-1)  # (B, 1+M) log weights
        local_z = torch.stack([e(feats) for e in local.experts], 1)  # (B, M, C)
        if self.cfg.local_residual:  # L_j corrects the global logits: softmax(z_G + L_j(x))
            local_z = local_z + (z_global.detach() if detach_global else z_global).unsqueeze(1)
        expert_lp = local_z.log_softmax(-1)
        g_lp = global_log_probs.detach() if detach_global else global_log_probs
        parts = torch.cat([g_lp.unsqueeze(1), expert_lp], 1)  # (B, 1+M, C)
        log_probs = torch.logsumexp(h.unsqueeze(-1) + parts, 1)  # (B, C)
        local_log_probs = torch.logsumexp(h[:, 1:].log_softmax(-1).unsqueeze(-1) + expert_lp, 1)
        return MoEOutput(log_probs, global_log_probs, local_log_probs, gate_probs, routing, h.exp(),
                         gate_logits)

    # --- state split: what may travel and what stays -----------------------------------
    def global_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(GLOBAL_PREFIX)}

    def local_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(LOCAL_PREFIX)}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
