"""Streaming aggregation: running weighted sums, folded in as updates are accepted.

The batch rules of ``fedcoe_edge.aggregate`` stack every update of a round (memory
O(N x model), float64 copies on top). A coordinator serving thousands of devices instead
keeps, per tensor, ``S = sum_i w_i x_i`` and ``W = sum_i w_i`` in float64 and divides once
when the round closes: memory O(model) whatever N is (docs/design.md, "Streaming
aggregation"). The result equals the batch mean up to float rounding (the batch path
normalises the weights first and sums in another order); ``fedcoe simulate`` keeps the
batch path, so its numbers do not move.

Partial sums combine exactly by addition (:meth:`WeightedSum.merge`, :meth:`Partial.merge`),
which is what lets several aggregators each own a shard of a fleet and a leader merge their
partials. Partials serialise to plain arrays (safetensors) so one can be persisted before
an update is acknowledged, or sent over the wire.

The strategy half (:func:`new_partial`, :func:`accumulate`, :func:`aggregate_partial`)
mirrors each strategy's ``aggregate_round`` from outside its class, and only for strategies
whose ``aggregate_round`` is exactly the one mirrored (FedCoE and its ablations, the FedAvg
family, Local); anything else gets ``None`` and is aggregated as a batch. Keeping it out of
the strategy modules leaves their source, and so the accuracy grid's cache keys, untouched.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedcoe_edge.strategies.base import ClientResult, Failure, Strategy

Arrays = dict[str, np.ndarray]

__all__ = ["WeightedSum", "ExpertSums", "Partial", "expert_weights", "new_partial", "accumulate",
           "aggregate_partial"]


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


def expert_weights(num_samples: int, affinity: Sequence[float] | np.ndarray, sent: Sequence[bool]
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
            num_samples: int, affinity: Sequence[float] | np.ndarray) -> None:
        """Fold in one client's experts. The fallback sum of expert k is kept only while no
        sender had a positive affinity for k: weights are never negative, so once one did,
        the fallback can no longer apply and its sum is dropped (half the work and memory)."""
        sent = [any(n in arrays for n in keys) for keys in expert_keys]
        w_aff, w_n = expert_weights(num_samples, affinity, sent)
        for k, keys in enumerate(expert_keys):
            if sent[k]:
                self.by_affinity[k].add(arrays, w_aff[k], keys)
                if self.by_affinity[k].weight > 0:
                    if self.by_samples[k].count:
                        self.by_samples[k] = WeightedSum()
                else:
                    self.by_samples[k].add(arrays, w_n[k], keys)

    def merge(self, other: ExpertSums) -> None:
        for k in range(self.num_experts):
            self.by_affinity[k].merge(other.by_affinity[k])
            if self.by_affinity[k].weight > 0:
                self.by_samples[k] = WeightedSum()  # the fallback cannot apply any more
            else:
                self.by_samples[k].merge(other.by_samples[k])

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


@dataclass
class Partial:
    """A round's aggregate so far, folded in one result at a time: memory O(model), not
    O(clients x model).

    ``dense`` holds the sample-weighted sums (FedAvg: every key; FedCoE: gate, shared
    expert, trunk), ``experts`` FedCoE's per-expert sums, ``share`` the sample-weighted
    routing mass ``sum_i n_i r_i`` and ``affinity`` each client's reported row (for the
    EMA). Partials of disjoint client sets combine exactly by :meth:`merge`.
    """

    round: int
    dense: WeightedSum = field(default_factory=WeightedSum)
    experts: ExpertSums | None = None
    share: np.ndarray | None = None
    samples: float = 0.0
    affinity: dict[str, list[float]] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)

    def merge(self, other: Partial) -> None:
        """Fold in a partial over other clients (a shard's); the round must match."""
        if other.round != self.round:
            raise ValueError(f"partial of round {other.round} merged into round {self.round}")
        overlap = set(self.clients) & set(other.clients)
        if overlap:
            raise ValueError(f"partials overlap on client(s) {sorted(overlap)[:5]}")
        self.dense.merge(other.dense)
        if other.experts is not None:
            if self.experts is None:
                self.experts = ExpertSums(other.experts.num_experts)
            self.experts.merge(other.experts)
        if other.share is not None:
            self.share = other.share.copy() if self.share is None else self.share + other.share
        self.samples += other.samples
        self.affinity.update(other.affinity)
        self.clients += other.clients

    def to_arrays(self) -> tuple[Arrays, dict[str, str]]:
        """Plain arrays plus string metadata (safetensors), e.g. to persist before an ACK."""
        arrays = self.dense.to_arrays("dense")
        if self.experts is not None:
            arrays.update(self.experts.to_arrays("experts/"))
        if self.share is not None:
            arrays["share"] = np.asarray(self.share, dtype=np.float64)
        meta = {"round": str(self.round), "samples": repr(self.samples),
                "experts": str(self.experts.num_experts if self.experts is not None else 0),
                "affinity": json.dumps(self.affinity), "clients": json.dumps(self.clients)}
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> Partial:
        k = int(meta["experts"])
        return cls(int(meta["round"]), WeightedSum.from_arrays(arrays, "dense"),
                   ExpertSums.from_arrays(arrays, "experts/", k) if k else None,
                   np.asarray(arrays["share"], dtype=np.float64) if "share" in arrays else None,
                   float(meta["samples"]), json.loads(meta["affinity"]), json.loads(meta["clients"]))


# --- the strategies' aggregation rules, streamed ------------------------------------------
def new_partial(strategy: Strategy, rnd: int) -> Partial | None:
    """An empty partial for ``rnd``; None when ``strategy`` can only aggregate a whole batch."""
    kind = strategy.stream_rule()
    if kind == "fedcoe":
        k = strategy.model_cfg.num_global_experts
        return Partial(rnd, experts=ExpertSums(k), share=np.zeros(k, dtype=np.float64))
    return Partial(rnd) if kind is not None else None


def accumulate(strategy: Strategy, partial: Partial, result: ClientResult) -> None:
    """Fold one accepted result into ``partial`` (the result's weights may be dropped after).

    FedCoE (``FedCoE.aggregate_round``): experts by ``n_i r_ik`` (``n_i`` as the fallback),
    everything else by ``n_i``, the routing mass for balancing, the reported row for the
    EMA. FedAvg: every global key by ``n_i``. Local: nothing is shared."""
    kind = strategy.stream_rule()
    if kind == "fedcoe":
        from fedcoe_edge.strategies.fedcoe import expert_of

        k_total = strategy.model_cfg.num_global_experts
        row = (np.asarray(result.affinity, dtype=np.float64) if result.affinity is not None
               else np.full(k_total, 1.0 / k_total))
        weights_row = row if strategy.affinity_weighting else np.ones_like(row)  # type: ignore[attr-defined]
        assert partial.experts is not None and partial.share is not None
        partial.experts.add(result.params, strategy.expert_keys(), result.num_samples,  # type: ignore[attr-defined]
                            weights_row)
        dense_keys = [n for n in strategy.global_state if expert_of(n) is None]
        partial.dense.add(result.params, result.num_samples, keys=dense_keys)
        partial.share += float(result.num_samples) * row
        partial.affinity[result.client_id] = row.tolist()
    elif kind == "fedavg":
        partial.dense.add(result.params, result.num_samples, keys=list(strategy.global_state))
    elif kind is None:
        raise TypeError(f"{type(strategy).__name__} does not aggregate incrementally")
    partial.samples += result.num_samples
    partial.clients.append(result.client_id)


def aggregate_partial(strategy: Strategy, rnd: int, partial: Partial,
                      failures: Sequence[Failure]) -> Arrays:
    """What ``strategy.aggregate_round`` does, from a partial: the same rules, equal up to
    float rounding. With no client in the partial, the state and version stay."""
    kind = strategy.stream_rule()
    if kind is None:
        raise TypeError(f"{type(strategy).__name__} does not aggregate incrementally")
    if kind == "local" or not partial.clients:
        return strategy.global_state
    if kind == "fedavg":
        strategy.global_state = partial.dense.mean(strategy.global_state)
        strategy.version += 1
        return strategy.global_state
    from fedcoe_edge.aggregate import balance_bias_step, ema

    assert partial.experts is not None and partial.share is not None
    s = strategy
    k_total = s.model_cfg.num_global_experts
    new = dict(s.global_state)
    new.update(partial.experts.means(s.global_state, s.expert_keys()))  # type: ignore[attr-defined]
    new.update(partial.dense.mean(s.global_state))
    for cid in sorted(partial.affinity):
        s.affinity[cid] = ema(s.affinity.get(cid), np.asarray(partial.affinity[cid]),  # type: ignore[attr-defined]
                              s.train_cfg.affinity_ema)
    if s.train_cfg.balance_rate > 0 and k_total > 1:
        share = partial.share / max(partial.samples, 1e-12)
        key = s.gate_bias_key()  # type: ignore[attr-defined]
        step = balance_bias_step(share, s.train_cfg.balance_rate)
        new[key] = (np.asarray(new[key], dtype=np.float64) + step).astype(new[key].dtype)
    s.global_state = new
    s.version += 1
    return new
