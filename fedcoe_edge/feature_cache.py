"""Feature cache for a frozen trunk: a sample's trunk features are computed once per device.

A frozen trunk (``ModelConfig.trunk_mode = "frozen"``, fedcoe_edge/trunk.py) has no
gradients and stays in eval mode, so its output for a given input never changes while its
weights do not; yet every SGD step of every epoch and round would run it again, and on the
camera model it is most of a step's cost (benchmarks/results/trunk_cost.md). The cache sits
inside the trunk's own ``forward`` so the training loop, the strategies and the model do not
know it is there:

* **Key.** Each sample's bytes are hashed (sha256, truncated to 16 bytes: 0.6 ms for a
  3x224x224 fp32 sample on the x86 dev box, which has SHA instructions; slower on a CPU
  without them, such as the Pi 4's, yet far below the trunk's forward) together with its
  dtype and shape; the trunk runs, in eval mode under ``no_grad``, only on the samples of a
  batch that miss, and the batch is reassembled in order.
* **Budget.** ``ModelConfig.trunk_cache_mb`` MiB (default
  :data:`~fedcoe_edge.config.DEFAULT_TRUNK_CACHE_MB` = 256, sized for a Raspberry Pi: about
  89k camera samples of 576 fp32 features; 0 disables; range-checked in ``ModelConfig``).
  An entry costs its features' bytes plus :data:`ENTRY_OVERHEAD_BYTES` for the key and
  bookkeeping; the cache never holds more than the budget. Eviction is least-recently-used, so when a device's data outgrows the budget the
  samples it keeps are those it trained on last; a simulator that cycles many clients
  through one model keeps the clients it saw last.
* **Invalidation.** Before each lookup the trunk's tensors are stamped (storage address and
  in-place version counter of every parameter and buffer: microseconds). When the stamp moves
  (a ``load_state_dict`` / ``load_arrays`` copy, a new pretrained file), a content fingerprint
  (sha256 of every tensor's name, dtype, shape and bytes) is recomputed, and the cache is
  emptied if it differs: reloading the same frozen weights (evaluation loads the global state)
  keeps the cache, any other weights drop it.
* **When it stands aside.** The trunk runs as if uncached while it is in training mode, while
  gradients are wanted through it (grad enabled and the input or any trunk parameter requires
  grad), under tracing / scripting / ``torch.compile`` (ONNX export), and while any forward
  hook is registered on it or its submodules (``count_macs`` counts what actually runs).

Cached features are the trunk's own outputs from the batch that first missed; without the
cache each step recomputes them on a different batch, so training with and without the cache
agrees up to float rounding (tests/test_feature_cache.py).
"""

from __future__ import annotations

import hashlib
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedcoe_edge.config import DEFAULT_TRUNK_CACHE_MB
from fedcoe_edge.errors import ConfigError

# key, OrderedDict node, tensor object and allocator slack per entry: measured ~680 B of RSS
# beyond the features on x86-64 / torch 2.13 (40k entries), rounded up
ENTRY_OVERHEAD_BYTES = 704
CACHE_ATTR = "feature_cache"  # the FeatureCache of a trunk that has one

Key = tuple[str, tuple[int, ...], bytes]  # (dtype, per-sample shape, content digest)


@dataclass
class CacheStats:
    """Counts in samples: ``misses`` is how many the trunk actually ran on through the cache."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    invalidations: int = 0  # times the trunk's weights changed and the cache was emptied
    bypassed: int = 0  # samples run without the cache (training mode, grads, tracing, hooks)


def sample_keys(x: torch.Tensor) -> list[Key]:
    """One content key per sample of the batch ``x`` (B, ...)."""
    rows = x.detach().cpu().contiguous().numpy()
    dtype, shape = str(rows.dtype), tuple(int(d) for d in rows.shape[1:])
    return [(dtype, shape, hashlib.sha256(row).digest()[:16]) for row in rows]


def trunk_tensors(trunk: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``trunk`` with its name, in a fixed order."""
    return list(trunk.named_parameters()) + list(trunk.named_buffers())


Stamp = tuple[int, ...]


@dataclass(frozen=True)
class TrunkScan:
    """What one pass over the trunk's modules tells a call (a few hundred attribute reads:
    tens of microseconds, against milliseconds for ``named_parameters``)."""

    stamp: Stamp  # storage address and in-place version of every parameter and buffer
    wants_grad: bool  # some parameter requires grad
    observed: bool  # forward hooks (or pre-hooks) on some module


def scan(modules: list[nn.Module]) -> TrunkScan:
    """Stamp, gradient need and hooks of ``modules`` (the trunk's ``modules()``, listed once):
    any copy into a tensor bumps its version, a replaced tensor has a new address."""
    stamp: list[int] = []
    wants_grad = observed = False
    for m in modules:
        observed = observed or bool(m._forward_hooks or m._forward_pre_hooks)
        for p in m._parameters.values():
            if p is not None:
                stamp += (p.data_ptr(), p._version)
                wants_grad = wants_grad or p.requires_grad
        for b in m._buffers.values():
            if b is not None:
                stamp += (b.data_ptr(), b._version)
    return TrunkScan(tuple(stamp), wants_grad, observed)


def trunk_fingerprint(trunk: nn.Module) -> str:
    """sha256 over the trunk's tensors (names, dtypes, shapes, bytes): equal iff same weights."""
    h = hashlib.sha256()
    for name, t in trunk_tensors(trunk):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}|{a.dtype}|{tuple(a.shape)}|".encode())
        h.update(a.numpy().tobytes() if a.dtype != torch.bfloat16 else a.float().numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Per-sample trunk features under a byte budget, least-recently-used eviction."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"feature cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self.entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.stats = CacheStats()
        self.fingerprint: str | None = None  # of the weights the entries were computed with
        self._stamp: Stamp | None = None
        self._modules: list[nn.Module] | None = None  # the trunk's modules, listed on first use

    def __len__(self) -> int:
        return len(self.entries)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureCache:
        """A copied model starts with an empty cache of the same budget (no doubled memory)."""
        return FeatureCache(self.budget_bytes)

    @staticmethod
    def entry_bytes(features: torch.Tensor) -> int:
        return features.numel() * features.element_size() + ENTRY_OVERHEAD_BYTES

    def clear(self) -> None:
        self.entries.clear()
        self.used_bytes = 0

    def scan(self, trunk: nn.Module) -> TrunkScan:
        """:func:`scan` over the trunk's modules (listed once: a trunk's structure is fixed)."""
        if self._modules is None:
            self._modules = list(trunk.modules())
        return scan(self._modules)

    def sync(self, trunk: nn.Module, stamp: Stamp | None = None) -> None:
        """Empty the cache if the trunk's weights are not those its entries came from."""
        stamp = self.scan(trunk).stamp if stamp is None else stamp
        if stamp == self._stamp:
            return
        self._stamp = stamp
        fingerprint = trunk_fingerprint(trunk)
        if fingerprint != self.fingerprint:
            if self.fingerprint is not None:
                self.stats.invalidations += 1
            self.clear()
            self.fingerprint = fingerprint

    def lookup(self, key: Key) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is not None:
            self.entries.move_to_end(key)
        return features

    def store(self, key: Key, features: torch.Tensor) -> None:
        """Keep a copy of one sample's features (a copy, so the batch it came from is freed);
        least-recently-used entries go first; an entry larger than the budget is not kept."""
        size = self.entry_bytes(features)
        if size > self.budget_bytes:
            return
        old = self.entries.pop(key, None)
        if old is not None:
            self.used_bytes -= self.entry_bytes(old)
        while self.used_bytes + size > self.budget_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.used_bytes -= self.entry_bytes(evicted)
            self.stats.evictions += 1
        self.entries[key] = features.detach().clone()
        self.used_bytes += size


def _global_hooks() -> bool:
    """Whether global forward hooks watch every module (they expect the trunk to run)."""
    from torch.nn.modules import module as torch_module

    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting()
                or (compiler is not None and compiler.is_compiling()))


def cache_usable(trunk: nn.Module, x: Any, state: TrunkScan) -> bool:
    """Whether this call may be served from the cache (see the module docstring)."""
    if (not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0 or trunk.training
            or _compiling()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or state.wants_grad):
        return False
    return not (state.observed or _global_hooks())


def _cached_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``forward`` of a trunk with a cache: run the class's forward only on the misses."""
    cache: FeatureCache = getattr(self, CACHE_ATTR)
    plain = type(self).forward
    state = cache.scan(self)
    if not cache_usable(self, x, state):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            cache.stats.bypassed += int(x.shape[0])
        return plain(self, x)
    cache.sync(self, state.stamp)
    keys = sample_keys(x)
    rows: list[torch.Tensor | None] = [cache.lookup(k) for k in keys]
    missing = [i for i, r in enumerate(rows) if r is None]
    cache.stats.hits += len(keys) - len(missing)
    if missing:
        cache.stats.misses += len(missing)
        with torch.no_grad():
            out = plain(self, x if len(missing) == len(keys) else x[torch.tensor(missing)])
        for j, i in enumerate(missing):
            rows[i] = out[j]
            cache.store(keys[i], out[j])
        if len(missing) == len(keys):
            return out
    return torch.stack([r for r in rows if r is not None])


def install_cache(trunk: nn.Module, budget_bytes: int) -> FeatureCache | None:
    """Give a frozen trunk a feature cache of ``budget_bytes`` (0: none, and any old one goes)."""
    if budget_bytes <= 0:
        if CACHE_ATTR in vars(trunk):
            delattr(trunk, CACHE_ATTR)
            vars(trunk).pop("forward", None)
        return None
    cache = FeatureCache(budget_bytes)
    setattr(trunk, CACHE_ATTR, cache)
    trunk.forward = types.MethodType(_cached_forward, trunk)  # type: ignore[method-assign]
    return cache


def cache_of(trunk: nn.Module) -> FeatureCache | None:
    """The trunk's feature cache, or None if it has none (any trunk that is not frozen)."""
    cache = vars(trunk).get(CACHE_ATTR)
    return cache if isinstance(cache, FeatureCache) else None


__all__ = ["CACHE_ATTR", "DEFAULT_TRUNK_CACHE_MB", "ENTRY_OVERHEAD_BYTES", "CacheStats",
           "FeatureCache", "cache_of", "cache_usable", "install_cache",
           "TrunkScan", "sample_keys", "scan", "trunk_fingerprint"]
