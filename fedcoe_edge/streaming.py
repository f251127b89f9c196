"""Streaming aggregation: running weighted sums, folded in as updates are accepted.

The batch rules of ``fedcoe_edge.aggregate`` stack every update of a round (memory
O(N x model), float64 copies on top). A coordinator serving thousands of devices instead
keeps, per tensor, ``S = sum_i w_i x_i`` and ``W = sum_i w_i`` in float64 and divides once
when the round closes: memory O(model) whatever N is (docs/design.md, "Streaming
aggregation"). The result equals the batch mean up to float rounding (the batch path
normalises the weights first and sums in another order); ``fedcoe simulate`` keeps the
batch path, so its numbers do not move.

Partial sums combine exactly by addition (:meth:`WeightedSum.merge`), which is what lets
several aggregators each own a shard of a fleet and a leader merge their partials.
Everything here is numpy only, and serialises to plain arrays (safetensors) so a partial
can be persisted before an update is acknowledged, or sent over the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Arrays = dict[str, np.ndarray]

__all__ = ["WeightedSum", "ExpertSums", "expert_weights"]


@dataclass
class WeightedSum:
    """``sum_i w_i x_i`` per tensor name and ``sum_i w_i``, in float64.

    Every added state must carry the same names (the first add fixes them). ``count`` is
    how many states went in (with a positive weight).
    """

    sums: Arrays = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0

    def add(self, arrays: Mapping[str, np.ndarray], weight: float,
            keys: Iterable[str] | None = None) -> None:
        """Fold in one state with ``weight`` (>= 0; zero weights are skipped)."""
        w = float(weight)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
        if w == 0.0:
            return
        names = list(keys) if keys is not None else list(arrays)
        if self.sums and set(names) != set(self.sums):
            raise KeyError(f"state names differ from the running sum's ({len(names)} vs {len(self.sums)})")
        for name in names:
            # asarray: on a 0-d tensor numpy returns a scalar, which `+=` would not update in place
            term = np.asarray(np.multiply(arrays[name], w, dtype=np.float64))
            acc = self.sums.get(name)
            if acc is None:
                self.sums[name] = term
            else:
                if acc.shape != term.shape:
                    raise ValueError(f"tensor {name!r} has shape {list(term.shape)}, "
                                     f"the running sum {list(acc.shape)}")
                acc += term
        self.weight += w
        self.count += 1

    def merge(self, other: WeightedSum) -> None:
        """Add another partial sum (e.g. a shard's) into this one."""
        if other.weight == 0.0:
            return
        if self.sums and set(other.sums) != set(self.sums):
            raise KeyError("partial sums over different tensor names cannot be merged")
        for name, s in other.sums.items():
            acc = self.sums.get(name)
            if acc is None:
                self.sums[name] = np.array(s, dtype=np.float64, copy=True)
            else:
                acc += s
        self.weight += other.weight
        self.count += other.count

    def mean(self, like: Mapping[str, np.ndarray]) -> Arrays:
        """``S / W`` per name, in the dtype of ``like[name]``; ValueError when nothing went in."""
        if self.weight <= 0:
            raise ValueError("mean of an empty running sum")
        # asarray: a 0-d sum divided is a numpy scalar, and tensors must stay arrays
        return {n: np.asarray(s / self.weight).astype(np.asarray(like[n]).dtype, copy=False)
                for n, s in self.sums.items()}

    # --- plain arrays, for persistence and the wire ---
    def to_arrays(self, prefix: str) -> Arrays:
        out = {f"{prefix}/{n}": s for n, s in self.sums.items()}
        out[f"{prefix}#"] = np.array([self.weight, self.count], dtype=np.float64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str) -> WeightedSum:
        head = f"{prefix}/"
        meta = arrays.get(f"{prefix}#")
        if meta is None or meta.shape != (2,):
            raise KeyError(f"running sum {prefix!r} missing from the arrays")
        sums = {k[len(head):]: np.asarray(v, dtype=np.float64) for k, v in arrays.items()
                if k.startswith(head)}
        return cls(sums, float(meta[0]), int(meta[1]))


def expert_weights(num_samples: int, affinity: Sequence[float], sent: Sequence[bool]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One client's unnormalised FedCoE weights: ``(n r_k, n)`` for each expert k it sent,
    0 for the others. ``affinity`` is clipped at 0, as in
    :func:`fedcoe_edge.aggregate.affinity_weights`."""
    n = float(num_samples)
    mask = np.asarray(sent, dtype=bool)
    r = np.clip(np.asarray(affinity, dtype=np.float64), 0.0, None)
    return n * r * mask, n * mask.astype(np.float64)


@dataclass
class ExpertSums:
    """Per global expert k, two running sums over the clients that sent it: weighted by
    ``n_i r_ik`` (FedCoE's rule) and by ``n_i`` alone (the batch rule's fallback when every
    sender has zero affinity for k). :meth:`means` picks per expert as
    :func:`fedcoe_edge.aggregate.affinity_weights` and ``aggregate_experts`` do."""

    num_experts: int
    by_affinity: list[WeightedSum] = field(default_factory=list)
    by_samples: list[WeightedSum] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.by_affinity:
            self.by_affinity = [WeightedSum() for _ in range(self.num_experts)]
        if not self.by_samples:
            self.by_samples = [WeightedSum() for _ in range(self.num_experts)]

    def add(self, arrays: Mapping[str, np.ndarray], expert_keys: Sequence[Sequence[str]],
            num_samples: int, affinity: Sequence[float]) -> None:
        sent = [any(n in arrays for n in keys) for keys in expert_keys]
        w_aff, w_n = expert_weights(num_samples, affinity, sent)
        for k, keys in enumerate(expert_keys):
            if sent[k]:
                self.by_affinity[k].add(arrays, w_aff[k], keys)
                self.by_samples[k].add(arrays, w_n[k], keys)

    def merge(self, other: ExpertSums) -> None:
        for mine, theirs in zip(self.by_affinity + self.by_samples,
                                other.by_affinity + other.by_samples, strict=True):
            mine.merge(theirs)

    def means(self, old: Mapping[str, np.ndarray], expert_keys: Sequence[Sequence[str]]) -> Arrays:
        """New value of every expert key; experts nobody sent keep their old value."""
        out: Arrays = {}
        for k, keys in enumerate(expert_keys):
            if self.by_affinity[k].weight > 0:
                out.update(self.by_affinity[k].mean(old))
            elif self.by_samples[k].weight > 0:
                out.update(self.by_samples[k].mean(old))
            else:
                out.update({n: np.array(old[n], copy=True) for n in keys})
        return out

    def to_arrays(self, prefix: str) -> Arrays:
        out: Arrays = {}
        for k in range(self.num_experts):
            out.update(self.by_affinity[k].to_arrays(f"{prefix}a{k}"))
            out.update(self.by_samples[k].to_arrays(f"{prefix}n{k}"))
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str, num_experts: int) -> ExpertSums:
        return cls(num_experts,
                   [WeightedSum.from_arrays(arrays, f"{prefix}a{k}") for k in range(num_experts)],
                   [WeightedSum.from_arrays(arrays, f"{prefix}n{k}") for k in range(num_experts)])
