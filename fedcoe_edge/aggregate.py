"""Aggregation maths as small pure functions over numpy arrays.

Affinity-weighted expert aggregation is FedCoE's server rule (arXiv 2605.21264, design
section 4): each global expert k is averaged over the clients that sent it, each client
weighted by ``n_i * r_ik`` (samples times how strongly its data routes to k). Sample-weighted
means are FedAvg's (McMahan et al., AISTATS 2017); the robust means (coordinate-wise median,
trimmed mean) follow Yin et al., ICML 2018.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i a_i / sum_i w_i, computed in float64 and returned in the inputs' dtype."""
    if len(arrays) == 0 or len(arrays) != len(weights):
        raise ValueError(f"need as many weights as arrays, got {len(arrays)} and {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    stacked = np.stack([np.asarray(a, dtype=np.float64) for a in arrays])  # (I, *shape)
    mean = np.tensordot(w / w.sum(), stacked, axes=1)
    return mean.astype(np.asarray(arrays[0]).dtype, copy=False)


def sample_weighted_mean(states: Sequence[Mapping[str, np.ndarray]], num_samples: Sequence[int],
                         keys: Sequence[str] | None = None) -> Arrays:
    """FedAvg: every key averaged with weights n_i. ``keys`` defaults to the first state's."""
    names = list(keys) if keys is not None else list(states[0])
    return {k: weighted_mean([s[k] for s in states], num_samples) for k in names}


def affinity_weights(num_samples: np.ndarray, affinity: np.ndarray, sent: np.ndarray) -> np.ndarray:
    """FedCoE weights w_ik = n_i r_ik / sum_j n_j r_jk over the clients that sent expert k.

    num_samples: (I,), affinity: (I, K) routing means, sent: (I, K) bool.
    Returns (I, K); a column is all zero when nobody sent expert k. When every sender has
    zero affinity for k, the senders are weighted by n_i alone, so their work is not lost.
    """
    n = np.asarray(num_samples, dtype=np.float64)[:, None]  # (I, 1)
    r = np.clip(np.asarray(affinity, dtype=np.float64), 0.0, None)
    mask = np.asarray(sent, dtype=bool)
    raw = n * r * mask  # (I, K)
    fallback = np.broadcast_to(n, mask.shape) * mask
    col = raw.sum(0, keepdims=True)  # (1, K)
    use = np.where(col > 0, raw, fallback)
    total = use.sum(0, keepdims=True)
    return np.divide(use, total, out=np.zeros_like(use), where=total > 0)


def aggregate_experts(old: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]],
                      weights: np.ndarray, expert_keys: Sequence[Sequence[str]]) -> Arrays:
    """Affinity-weighted mean per expert; experts nobody sent keep their old value.

    expert_keys[k] lists the state keys of expert k; weights is (I, K) from affinity_weights.
    """
    new: Arrays = {}
    for k, keys in enumerate(expert_keys):
        col = weights[:, k]
        senders = [i for i in range(len(updates)) if col[i] > 0]
        for name in keys:
            if senders:
                new[name] = weighted_mean([updates[i][name] for i in senders], col[senders])
            else:
                new[name] = np.array(old[name], copy=True)
    return new


def ema(old: np.ndarray | None, new: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average ``(1 - alpha) old + alpha new``; the first report is taken whole."""
    new = np.asarray(new, dtype=np.float64)
    return new.copy() if old is None else (1.0 - alpha) * np.asarray(old, dtype=np.float64) + alpha * new


def top_m(affinity: np.ndarray, m: int) -> list[int]:
    """Indices of the m largest affinities, ties to the lower index, sorted ascending."""
    order = np.argsort(-np.asarray(affinity, dtype=np.float64), kind="stable")
    return sorted(int(i) for i in order[:m])


def covering_experts(prior: np.ndarray, mass: float, at_least: int) -> list[int]:
    """The fewest experts, taken in order of ``prior``, whose prior sums to at least ``mass``
    of the total, and never fewer than ``at_least``; sorted ascending.

    A new device downloads these (cold start, docs/design.md "Cold start"): a fixed top-m
    cuts off experts that still carry a real share of its inputs when its data is spread
    over more kinds than m experts cover. Ties go to the lower index. ``mass`` in (0, 1];
    1 takes every expert with any prior mass.
    """
    p = np.clip(np.asarray(prior, dtype=np.float64), 0.0, None)
    k = p.size
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    order = np.argsort(-p, kind="stable")
    total = float(p.sum())
    if total <= 0:
        return sorted(int(i) for i in order[:max(at_least, 1)])
    cum = np.cumsum(p[order]) / total
    n = int(np.searchsorted(cum, mass - 1e-12) + 1)  # first prefix reaching the mass
    n = min(k, max(n, at_least, 1))
    return sorted(int(i) for i in order[:n])


def assign_experts(scores: np.ndarray, m: int, capacity: int,
                   tiebreak: np.ndarray | None = None) -> list[list[int]]:
    """Capacity-limited assignment of m experts to each client (docs/design.md, "Routing").

    scores: (I, K) client-expert affinities; each client gets exactly ``m`` distinct experts and
    no expert more than ``capacity`` clients (``capacity * K >= I * m`` is required). Pairs are
    taken greedily from the highest score down, so a client gets the experts its data routes
    to unless they are full; then the next best. Without the cap every client picks the
    expert that is best for everybody early on and the assignment locks onto it. ``tiebreak``
    (I, K), e.g. a seeded permutation, orders equal scores; default: lower client, lower expert.
    Returns each client's experts, sorted ascending.
    """
    r = np.asarray(scores, dtype=np.float64)
    i_n, k_n = r.shape
    if not 1 <= m <= k_n:
        raise ValueError(f"m must be in [1, {k_n}], got {m}")
    if capacity * k_n < i_n * m:
        raise ValueError(f"capacity {capacity} x {k_n} experts < {i_n} clients x m={m}")
    tb = np.zeros_like(r) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
    # sort by score desc, then tiebreak asc, then flat index asc (lexsort: last key is primary)
    flat = np.lexsort((np.arange(r.size), tb.ravel(), -r.ravel()))
    load = np.zeros(k_n, dtype=np.int64)
    chosen: list[list[int]] = [[] for _ in range(i_n)]
    for f in flat:
        i, k = divmod(int(f), k_n)
        if len(chosen[i]) < m and load[k] < capacity:
            chosen[i].append(k)
            load[k] += 1
    for i in range(i_n):  # the cap can strand a client behind full experts: give it the least loaded
        while len(chosen[i]) < m:
            k = min((k for k in range(k_n) if k not in chosen[i]), key=lambda k: (load[k], k))
            chosen[i].append(k)
            load[k] += 1
    return [sorted(c) for c in chosen]


def expert_capacity(num_clients: int, m: int, num_experts: int, slack: float = 1.0) -> int:
    """Clients one expert may serve in a round: ``ceil(slack * I * m / K)``, at least 1."""
    return max(1, int(np.ceil(slack * num_clients * m / num_experts - 1e-9)))


def balance_bias_step(share: np.ndarray, rate: float, floor: float = 1e-4) -> np.ndarray:
    """Gate-bias correction toward uniform expert use: ``rate * (log(1/K) - log(share_k))``.

    share: (K,) the fleet's routing mass per expert (sums to 1). The server adds the result
    to the gate's output bias after aggregating, the auxiliary-loss-free balancing of
    Wang et al. 2024 (arXiv 2408.15664) applied federated: it acts over all K experts even
    when each client holds only m of them. Zero when use is already uniform.
    """
    s = np.clip(np.asarray(share, dtype=np.float64), floor, None)
    s = s / s.sum()
    return rate * (np.log(1.0 / len(s)) - np.log(s))


def coordinate_median(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median: robust to a minority of arbitrary updates."""
    return np.median(np.stack(arrays), axis=0).astype(np.asarray(arrays[0]).dtype, copy=False)


def trimmed_mean(arrays: Sequence[np.ndarray], trim_ratio: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``trim_ratio`` largest and smallest values."""
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    stacked = np.sort(np.stack(arrays), axis=0)
    cut = int(trim_ratio * len(arrays))
    kept = stacked[cut : len(arrays) - cut]
    return kept.mean(axis=0).astype(np.asarray(arrays[0]).dtype, copy=False)
