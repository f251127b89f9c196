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

This module holds the data types only and imports no strategy: each strategy owns its rule
(``Strategy.new_partial`` / ``accumulate`` / ``merge`` / ``finalize``, and its batch
``aggregate_round`` is that same fold followed by ``finalize``). A rule whose state is not a
weighted sum keeps it in :attr:`Partial.extra_sums` (added on merge) or
:attr:`Partial.extra_rows` (one row per client, concatenated on merge).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Arrays = dict[str, np.ndarray]

__all__ = ["WeightedSum", "ExpertSums", "Partial", "expert_weights", "EXTRA_SUM", "EXTRA_ROWS"]

EXTRA_SUM = "extra+/"  # array-name prefix of Partial.extra_sums in the plain-array form
EXTRA_ROWS = "extra|/"  # ... and of Partial.extra_rows


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
    O(clients x model) for the built-in rules.

    ``clients`` and ``samples`` are the bookkeeping every rule shares (``Strategy.fold``
    keeps them; the leader's quorum and ``check_partial`` read them). The rest is the
    strategy's: ``dense`` the sample-weighted sums (FedAvg: every key; FedCoE: gate, shared
    expert, exchanged trunk), ``experts`` FedCoE's per-expert sums, ``share`` the
    sample-weighted routing mass ``sum_i n_i r_i`` and ``affinity`` each client's reported
    row (for the EMA). A rule that needs other state keeps it in ``extra_sums`` (float64
    arrays that add on merge, e.g. a clipped-norm total) or ``extra_rows`` (arrays with one
    row per client, row i for ``clients[i]``, concatenated on merge: e.g. the updates a
    coordinate-wise median needs). Partials of disjoint client sets combine by :meth:`merge`.
    """

    round: int
    dense: WeightedSum = field(default_factory=WeightedSum)
    experts: ExpertSums | None = None
    share: np.ndarray | None = None
    samples: float = 0.0
    affinity: dict[str, list[float]] = field(default_factory=dict)
    clients: list[str] = field(default_factory=list)
    extra_sums: Arrays = field(default_factory=dict)
    extra_rows: Arrays = field(default_factory=dict)
    # ``clients`` as a set, for admit's duplicate check in O(1): a list scan per result made
    # a round of N results cost O(N^2) (docs/benchmarks.md, "Coordinator CPU profile")
    _members: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def _known(self) -> set[str]:
        """The set of ``clients``, rebuilt when the list was changed behind its back (a
        caller that assigns or appends to ``clients`` directly)."""
        if len(self._members) != len(self.clients):
            self._members = set(self.clients)
        return self._members

    def admit(self, client_id: str, num_samples: int) -> None:
        """Count one client in (before its numbers are folded); ValueError on a second
        result from the same client, which would count twice."""
        if client_id in self._known():
            raise ValueError(f"client {client_id!r:.40} is already in the partial of round {self.round}")
        self.clients.append(client_id)
        self._members.add(client_id)
        self.samples += num_samples

    def check_rows(self) -> None:
        """Every ``extra_rows`` array has one row per client (what keeps rows and clients
        aligned through merges); ValueError naming the first that does not."""
        for name, rows in self.extra_rows.items():
            if rows.ndim < 1 or rows.shape[0] != len(self.clients):
                raise ValueError(f"extra rows {name!r:.80} have {rows.shape[:1]} row(s) for "
                                 f"{len(self.clients)} client(s)")

    def merge(self, other: Partial) -> None:
        """Fold in a partial over other clients (a shard's); the round must match, the extra
        state must have the same names (both partials come from the same ``new_partial``)."""
        if other.round != self.round:
            raise ValueError(f"partial of round {other.round} merged into round {self.round}")
        overlap = self._known() & set(other.clients)
        if overlap:
            raise ValueError(f"partials overlap on client(s) {sorted(overlap)[:5]}")
        for what, mine, theirs in (("sums", self.extra_sums, other.extra_sums),
                                   ("rows", self.extra_rows, other.extra_rows)):
            if set(mine) != set(theirs):
                raise KeyError(f"partials with different extra {what} cannot be merged")
        self.dense.merge(other.dense)
        if other.experts is not None:
            if self.experts is None:
                self.experts = ExpertSums(other.experts.num_experts)
            self.experts.merge(other.experts)
        if other.share is not None:
            self.share = other.share.copy() if self.share is None else self.share + other.share
        for name, s in other.extra_sums.items():
            self.extra_sums[name] = np.asarray(self.extra_sums[name], dtype=np.float64) + s
        for name, rows in other.extra_rows.items():
            self.extra_rows[name] = np.concatenate([self.extra_rows[name], rows], axis=0)
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
        arrays.update({EXTRA_SUM + n: np.asarray(v) for n, v in self.extra_sums.items()})
        arrays.update({EXTRA_ROWS + n: np.asarray(v) for n, v in self.extra_rows.items()})
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
                   float(meta["samples"]), json.loads(meta["affinity"]), json.loads(meta["clients"]),
                   {n[len(EXTRA_SUM):]: np.asarray(v) for n, v in arrays.items() if n.startswith(EXTRA_SUM)},
                   {n[len(EXTRA_ROWS):]: np.asarray(v) for n, v in arrays.items() if n.startswith(EXTRA_ROWS)})
