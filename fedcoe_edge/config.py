"""Configuration dataclasses: one for the model's shape, one for how clients train.

Defaults are the ones the simulator and `make demo` use on scikit-learn digits (8x8 images,
10 classes). Every field is plain data so a config round-trips through JSON/TOML and travels
inside a bundle manifest.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fedcoe_edge.errors import ConfigError
from fedcoe_edge.registry import EXPERTS, TRUNKS, Registry, is_import_path, resolve_import_path

# A registered name ("identity", "mobilenet_v3_small", "mlp", "cnn", or one the user
# registered) or an import path "package.module:factory" (fedcoe_edge/registry.py).
ExpertKind = str
TrunkKind = str
TrunkMode = Literal["federated", "frozen", "local-finetune"]
TRUNK_MODES = ("federated", "frozen", "local-finetune")
# Trunk options left out of to_dict() at their defaults: a config (and every cache key,
# manifest and welcome built from one) that does not use them reads exactly as before.
# Frozen trunk's feature cache (fedcoe_edge/feature_cache.py): MiB of RAM, 0 disables.
DEFAULT_TRUNK_CACHE_MB = 256  # sized for a Raspberry Pi: ~89k camera samples' features
MAX_TRUNK_CACHE_MB = 1 << 20  # 1 TiB: anything above is a typo
_TRUNK_DEFAULTS: dict[str, Any] = {"trunk_mode": "federated", "trunk_weights": "",
                                   "trunk_sha256": "", "trunk_cache_mb": DEFAULT_TRUNK_CACHE_MB}
Tier = Literal["small", "medium", "large"]
# Server-side defences against poisoned updates (fedcoe_edge/robust.py; docs/design.md,
# "Robust aggregation"). Left out of TrainConfig.to_dict() at their defaults, like the trunk
# options: a device of an older release reads the train section a coordinator sends it.
AGGREGATION_RULES = ("mean", "trimmed_mean", "median")
UPDATE_CLIPS = ("median", "quantile", "fixed", "none")
_ROBUST_DEFAULTS: dict[str, Any] = {"aggregation_rule": "mean", "trim_ratio": 0.2,
                                    "update_clip": "median", "clip_multiplier": 1.0,
                                    "clip_quantile": 0.5, "clip_lr": 0.2, "clip_init": 0.5,
                                    "samples_cap": 2.0, "samples_growth": 2.0}
# Server-side smoothing of FedCoE's global state (docs/design.md, "Server stabilization"),
# left out of TrainConfig.to_dict() at these defaults (plain mean) for the same reason.
_SERVER_DEFAULTS: dict[str, Any] = {"server_lr": 1.0, "server_momentum": 0.0}

# Width multiplier of the private (local) experts per device tier: a Pi Zero gets "small",
# a Jetson "large". Global experts keep one size so they can be aggregated.
TIER_WIDTH: dict[str, float] = {"small": 0.5, "medium": 1.0, "large": 2.0}


@dataclass
class ModelConfig:
    """Shape of a DualLevelMoE (docs/design.md, section 3)."""

    input_shape: tuple[int, ...] = (1, 8, 8)  # per-sample shape, (C, H, W) or (F,)
    num_classes: int = 10
    trunk: TrunkKind = "identity"  # shared feature extractor; identity for small inputs
    expert_kind: ExpertKind = "cnn"  # "cnn" on small images, "mlp" on flattened input / trunk features
    expert_hidden: int = 64  # hidden width of a global expert (and of the shared expert)
    num_global_experts: int = 4  # K routed global experts
    top_k: int = 2  # experts used per input at inference (training is dense)
    num_local_experts: int = 1  # M private experts, never leave the device
    tier: Tier = "medium"  # picks the local experts' width via TIER_WIDTH
    shared_expert: bool = True  # always-on global expert under the routed ones
    gate_hidden: int = 0  # 0: linear gates; >0: one hidden layer of this width
    local_residual: bool = True  # local experts add logits to the global path's (zero-initialised)
    # docs/design.md, "Trunk modes": "federated" trains and exchanges the trunk (default);
    # "frozen" neither trains nor exchanges it; "local-finetune" trains it on each device
    # and keeps it there (private, like the local level)
    trunk_mode: TrunkMode = "federated"
    trunk_weights: str = ""  # pretrained trunk: a local safetensors file, loaded at build time
    trunk_sha256: str = ""  # that file's sha256 (required with trunk_weights)
    # RAM budget (MiB) of a frozen trunk's per-sample feature cache; 0 disables; no effect on
    # results (docs/design.md, "Trunk modes"); ignored unless trunk_mode = "frozen"
    trunk_cache_mb: int = DEFAULT_TRUNK_CACHE_MB

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        self.validate()

    def validate(self) -> None:
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ConfigError(f"model.input_shape must be positive dims, got {self.input_shape}")
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be >= 2, got {self.num_classes}")
        _check_part(TRUNKS, self.trunk, "model.trunk")
        _check_part(EXPERTS, self.expert_kind, "model.expert_kind")
        # the built-in pairs are checked here; a trunk of the user's is probed when built
        if (self.expert_kind == "cnn" and TRUNKS.is_builtin(self.trunk)
                and (self.trunk != "identity" or len(self.input_shape) != 3)):
            raise ConfigError("model.expert_kind=cnn needs an identity trunk and (C, H, W) inputs")
        if self.num_global_experts < 1:
            raise ConfigError(f"model.num_global_experts must be >= 1, got {self.num_global_experts}")
        if not 1 <= self.top_k <= self.num_global_experts:
            raise ConfigError(
                f"model.top_k must be in [1, {self.num_global_experts}], got {self.top_k}"
            )
        if self.num_local_experts < 0:
            raise ConfigError(f"model.num_local_experts must be >= 0, got {self.num_local_experts}")
        if self.tier not in TIER_WIDTH:
            raise ConfigError(f"model.tier must be one of {sorted(TIER_WIDTH)}, got {self.tier!r}")
        if self.expert_hidden < 1 or self.gate_hidden < 0:
            raise ConfigError("model.expert_hidden must be >= 1 and model.gate_hidden >= 0")
        if self.trunk_mode not in TRUNK_MODES:
            raise ConfigError(f"model.trunk_mode must be one of {'|'.join(TRUNK_MODES)}, "
                              f"got {self.trunk_mode!r}")
        if self.trunk == "identity" and (self.trunk_mode != "federated" or self.trunk_weights):
            raise ConfigError("model.trunk_mode and model.trunk_weights need a real trunk "
                              "(not identity); the identity trunk has no weights")
        if bool(self.trunk_weights) != bool(self.trunk_sha256):
            raise ConfigError("model.trunk_weights and model.trunk_sha256 go together: the "
                              "pretrained trunk file is loaded only after its sha256 is checked")
        if self.trunk_sha256 and (len(self.trunk_sha256) != 64 or any(
                c not in "0123456789abcdef" for c in self.trunk_sha256)):
            raise ConfigError("model.trunk_sha256 must be 64 lowercase hex digits")
        if (isinstance(self.trunk_cache_mb, bool) or not isinstance(self.trunk_cache_mb, int)
                or not 0 <= self.trunk_cache_mb <= MAX_TRUNK_CACHE_MB):
            raise ConfigError(f"model.trunk_cache_mb must be an integer number of MiB in "
                              f"0..{MAX_TRUNK_CACHE_MB} (0 disables the frozen trunk's feature "
                              f"cache), got {self.trunk_cache_mb!r}")

    @property
    def local_hidden(self) -> int:
        return max(4, int(round(self.expert_hidden * TIER_WIDTH[self.tier])))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        for key, default in _TRUNK_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, check_names: bool = True) -> ModelConfig:
        """``check_names=False`` accepts any trunk / expert name without looking it up: a
        bundle's manifest on a device, where the ONNX files carry the parts and the user's
        Python package (or registration) need not exist."""
        if check_names:
            return cls(**_known_fields(cls, d, "model"))
        with names_unchecked():
            return cls(**_known_fields(cls, d, "model"))


_CHECK_NAMES: contextvars.ContextVar[bool] = contextvars.ContextVar("check_names", default=True)


@contextmanager
def names_unchecked() -> Iterator[None]:
    """ModelConfigs made inside skip the trunk / expert registry lookup (see from_dict)."""
    token = _CHECK_NAMES.set(False)
    try:
        yield
    finally:
        _CHECK_NAMES.reset(token)


def _check_part(registry: Registry[Any], spec: Any, where: str) -> None:
    """A registered name, or an import path that resolves to a callable (imported here, so a
    wrong path fails when the config is read, not when the first model is built)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"{where} must be a name or an import path, got {spec!r}")
    if not _CHECK_NAMES.get():
        return
    if not registry.accepts(spec):
        raise ConfigError(f"{where} must be {registry.choices()}, got {spec!r}")
    if spec not in registry and is_import_path(spec):
        resolve_import_path(spec, where)


@dataclass
class TrainConfig:
    """How a client trains each round, and the FedCoE loss weights (docs/design.md, section 4)."""

    local_epochs: int = 2  # passes over the client's training split per round
    batch_size: int = 32
    lr: float = 0.05  # SGD learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4
    beta: float = 2.0  # weight of CE on the global path: p_G learns only from this term
    gamma: float = 0.5  # importance-balance weight over the held experts (docs/design.md, "Routing")
    lam: float = 0.02  # KL(p_L || p_G): keeps residual local experts near the global consensus (tuned on fmnist validation)
    mu: float = 0.01  # proximal pull of the local copy of global params to the server's
    detach_global: bool = True  # personal-mixture CE trains only the local level; p_G learns from beta*CE(p_G)
    tau: float = 0.0  # balanced-softmax strength on the global path's CE (0 = plain CE)
    rho: float = 0.5  # routing consistency: gate mass on the experts the client holds
    experts_per_client: int = 2  # m experts trained/exchanged per round (m=3 of K=4 is sturdier at Dir 0.1)
    affinity_ema: float = 0.5  # weight of the newest affinity report in the server's EMA
    capacity_slack: float = 1.0  # an expert serves at most ceil(slack * clients * m / K) clients a round
    balance_rate: float = 0.1  # server step of the gate bias toward uniform expert use (0 = off)
    cold_start_mass: float = 0.9  # a new device downloads the fewest experts (>= top_k) carrying this share of its routing prior
    clip_grad_norm: float = 5.0  # max global gradient norm per SGD step (0 = no clipping)
    fraction_fit: float = 1.0  # share of clients selected each round
    finetune_epochs: int = 5  # used by fine-tuning baselines (FedAvg-FT)
    prox_mu: float = 0.01  # FedProx / Ditto proximal weight
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific knobs
    # --- robust aggregation (server side; docs/design.md, "Robust aggregation") ---
    # mean: the strategy's own weighted mean; trimmed_mean / median: coordinate-wise over the
    # (clipped) updates, opt-in, memory O(updates x model) while a round is open
    aggregation_rule: str = "mean"
    trim_ratio: float = 0.2  # trimmed_mean: share cut from each end per coordinate, [0, 0.5)
    # clip each update's change (params - global) to a bound set from earlier rounds only:
    # median (bound = clip_multiplier x last round's median change norm) | quantile (Andrew
    # et al. 2021: track the clip_quantile quantile, step clip_lr) | fixed (always the
    # first-round bound) | none
    update_clip: str = "median"
    clip_multiplier: float = 1.0  # median rule: (0, 100]
    clip_quantile: float = 0.5  # quantile rule: target share of updates under the bound, (0, 1)
    clip_lr: float = 0.2  # quantile rule: geometric step per round, (0, 5]
    clip_init: float = 0.5  # first round: bound = clip_init x norm of the global weights sent, (0, 100]
    # a device's num_samples weighs at most samples_cap x the median of accepted counts
    # (0 = off; first round: equal weights) and at most samples_growth x its own last one (0 = off)
    samples_cap: float = 2.0
    samples_growth: float = 2.0
    # --- server stabilization (FedCoE; docs/design.md, "Server stabilization") ---
    # v = server_momentum * v + (aggregate - global); global += server_lr * v, over the gate,
    # shared expert, exchanged trunk and the experts sent that round. 1.0 / 0.0: the plain
    # mean (FedAvg); server_lr < 1 with momentum 0 is an EMA of the aggregates (FedAvgM with
    # momentum > 0, Hsu et al. 2019)
    server_lr: float = 1.0  # (0, 1]
    server_momentum: float = 0.0  # [0, 1)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError("train.local_epochs and train.batch_size must be >= 1")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for name in ("beta", "gamma", "lam", "mu", "rho", "tau", "prox_mu", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.experts_per_client < 1:
            raise ConfigError(f"train.experts_per_client must be >= 1, got {self.experts_per_client}")
        if not 0 < self.affinity_ema <= 1:
            raise ConfigError(f"train.affinity_ema must be in (0, 1], got {self.affinity_ema}")
        if self.capacity_slack < 1:
            raise ConfigError(f"train.capacity_slack must be >= 1, got {self.capacity_slack}")
        if not 0 < self.cold_start_mass <= 1:
            raise ConfigError(f"train.cold_start_mass must be in (0, 1], got {self.cold_start_mass}")
        if self.balance_rate < 0 or self.clip_grad_norm < 0:
            raise ConfigError("train.balance_rate and train.clip_grad_norm must be >= 0")
        if not 0 < self.fraction_fit <= 1:
            raise ConfigError(f"train.fraction_fit must be in (0, 1], got {self.fraction_fit}")
        for name, ok, span in (("server_lr", lambda v: 0 < v <= 1, "(0, 1]"),
                               ("server_momentum", lambda v: 0 <= v < 1, "[0, 1)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"train.{name} must be in {span}, got {v!r}")
        self.validate_robust()

    def validate_robust(self) -> None:
        """Ranges of the robust-aggregation fields (docs/design.md, "Robust aggregation")."""
        if self.aggregation_rule not in AGGREGATION_RULES:
            raise ConfigError(f"train.aggregation_rule must be one of {'|'.join(AGGREGATION_RULES)}, "
                              f"got {self.aggregation_rule!r}")
        if self.update_clip not in UPDATE_CLIPS:
            raise ConfigError(f"train.update_clip must be one of {'|'.join(UPDATE_CLIPS)}, "
                              f"got {self.update_clip!r}")
        ranges = {"trim_ratio": (0.0, 0.5, True, False), "clip_multiplier": (0.0, 100.0, False, True),
                  "clip_quantile": (0.0, 1.0, False, False), "clip_lr": (0.0, 5.0, False, True),
                  "clip_init": (0.0, 100.0, False, True), "samples_cap": (0.0, 1e6, True, True),
                  "samples_growth": (0.0, 1e6, True, True)}
        for name, (lo, hi, lo_in, hi_in) in ranges.items():
            v = getattr(self, name)
            ok = (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                  and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi))
            if not ok:
                raise ConfigError(f"train.{name} must be in {'[' if lo_in else '('}{lo:g}, "
                                  f"{hi:g}{']' if hi_in else ')'}, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, default in {**_ROBUST_DEFAULTS, **_SERVER_DEFAULTS}.items():
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known_fields(cls, d, "train"))


def _known_fields(cls: type, d: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {section} option(s): {', '.join(unknown)}")
    return dict(d)
