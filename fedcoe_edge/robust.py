"""Defences against poisoned updates, as small pure functions plus the state they carry.

One device must not be able to wreck the shared model (docs/design.md, "Robust
aggregation"). Three defences act before the strategy's own rule:

* **Clipping the change.** An update's change ``params - global`` is scaled down to an L2
  bound. The bound is adaptive and depends only on state from *before* the round (the
  previous rounds' change norms), never on the round's own updates, so it is fixed while a
  round's updates arrive: batch, streamed and sharded aggregation clip every update the
  same way, in any order. Two rules: a multiple of the previous round's median pre-clip
  norm (default), or the geometric quantile tracking of Andrew et al., "Differentially
  private learning with adaptive clipping" (NeurIPS 2021). The first round has no history:
  its bound is a multiple of the norm of the global weights the update changes.
* **Capping the weight of ``num_samples``.** A device reports its own sample count and is
  weighted by it; the weight used is at most ``samples_cap`` times the median of the
  counts accepted before this round (one per device, the capped value), and at most
  ``samples_growth`` times the device's own last accepted count. In the first round,
  with no history, every device weighs the same.
* **Coordinate-wise median or trimmed mean** (Yin et al., ICML 2018) instead of the
  strategy's weighted mean, opt-in (``train.aggregation_rule``): they need every (clipped)
  update of the round at once, memory O(N x model).

All three are per-result transforms given :class:`DefenceState`; :func:`close_round` then
folds the round's pre-clip norms and accepted counts into the state for the next round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcoe_edge.aggregate import coordinate_median, trimmed_mean

if TYPE_CHECKING:
    from fedcoe_edge.config import TrainConfig
    from fedcoe_edge.strategies.base import ClientResult
    from fedcoe_edge.streaming import Partial

Arrays = dict[str, np.ndarray]

NORM_HISTORY = 32  # rounds of median change norms kept in the state (diagnostics, checkpoint)


# --- pure functions ---------------------------------------------------------------------------
def change_norm(params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``params - base`` over the floating tensors ``params`` carries (float64).

    A key missing from ``base`` or a non-float tensor (a counter) does not count: the bound
    is on the weights a device changed, as the coordinator's ``norm_bound`` check."""
    total = 0.0
    for name, value in params.items():
        v = np.asarray(value)
        if name not in base or not np.issubdtype(v.dtype, np.floating):
            continue
        d = v.astype(np.float64) - np.asarray(base[name], dtype=np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(total)


def weights_norm(params: Mapping[str, np.ndarray], keys: Iterable[str]) -> float:
    """L2 norm of the floating tensors of ``params`` named in ``keys`` (float64)."""
    total = 0.0
    for name in keys:
        v = np.asarray(params[name])
        if np.issubdtype(v.dtype, np.floating):
            total += float(np.dot(v.astype(np.float64).ravel(), v.astype(np.float64).ravel()))
    return math.sqrt(total)


def clip_factor(norm: float, bound: float) -> float:
    """``min(1, bound / norm)``: the scale that brings a change of ``norm`` within ``bound``.

    A non-finite norm gives 0 (the change is dropped, the device still counted): NaN or
    inf cannot be scaled into range."""
    if not math.isfinite(norm):
        return 0.0
    if bound < 0 or not math.isfinite(bound):
        raise ValueError(f"clip bound must be finite and >= 0, got {bound}")
    return 1.0 if norm <= bound else bound / norm


def clip_update(params: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                bound: float) -> tuple[Arrays, float]:
    """``base + min(1, bound / ||params - base||) (params - base)`` per floating tensor, in
    each tensor's dtype, and the pre-clip norm. Tensors ``base`` lacks, or that are not
    floats, pass unchanged. Within the bound the input arrays are returned as they are."""
    norm = change_norm(params, base)
    factor = clip_factor(norm, bound)
    if factor == 1.0:
        return dict(params), norm
    out: Arrays = {}
    for name, value in params.items():
        v = np.asarray(value)
        if name not in base or not np.issubdtype(v.dtype, np.floating):
            out[name] = v
            continue
        b = np.asarray(base[name], dtype=np.float64)
        d = np.nan_to_num(v.astype(np.float64) - b, nan=0.0, posinf=0.0, neginf=0.0)
        out[name] = (b + factor * d).astype(v.dtype, copy=False)
    return out, norm


def median_bound(norms: Sequence[float], multiplier: float) -> float | None:
    """``multiplier x median`` of the finite norms; None when there is none. A minority of
    attackers moves the median only to a neighbouring quantile of the honest norms."""
    finite = [x for x in norms if math.isfinite(x)]
    return multiplier * float(np.median(finite)) if finite else None


def quantile_bound_step(bound: float, frac_under: float, target: float, lr: float) -> float:
    """Andrew et al. 2021, geometric update: ``bound * exp(-lr (frac_under - target))``.

    ``frac_under`` is the share of last round's updates with a change norm <= ``bound``;
    the bound grows while fewer than ``target`` were under it and shrinks otherwise, so it
    tracks the ``target`` quantile of the norms, moving at most a factor ``exp(lr)`` a round."""
    if not 0.0 <= frac_under <= 1.0:
        raise ValueError(f"frac_under must be in [0, 1], got {frac_under}")
    return bound * math.exp(-lr * (frac_under - target))


def samples_cap(accepted: Iterable[float], multiple: float) -> float | None:
    """``multiple x median`` of previously accepted sample counts; None without history."""
    values = [float(x) for x in accepted if math.isfinite(float(x)) and float(x) > 0]
    return multiple * float(np.median(values)) if values else None


def capped_samples(reported: float, cap: float | None, own_last: float | None,
                   growth: float) -> float:
    """The weight a device's ``reported`` sample count carries (docs/design.md, "Robust
    aggregation"): at most ``cap`` (the fleet rule) and at most ``growth x own_last`` (its
    own last accepted count; ``growth`` 0 turns that check off). ``cap`` None (no history
    yet) weighs every device as 1. Never below 1."""
    if cap is None:
        return 1.0
    n = min(float(reported), cap)
    if own_last is not None and growth > 0:
        n = min(n, growth * own_last)
    return max(1.0, n)


def robust_combine(arrays: Sequence[np.ndarray], rule: str, trim_ratio: float) -> np.ndarray:
    """One tensor's coordinate-wise median or trimmed mean over the given updates."""
    if rule == "median":
        return coordinate_median(arrays)
    if rule == "trimmed_mean":
        return trimmed_mean(arrays, trim_ratio)
    raise ValueError(f"not a robust rule: {rule!r}")


def robust_substitute(results: Sequence[ClientResult], rule: str, trim_ratio: float
                      ) -> list[ClientResult]:
    """Per tensor name, every result that carries it gets the median / trimmed mean over
    all results that carry it. Any weighted mean over those senders (FedAvg's ``n_i``,
    FedCoE's ``n_i r_ik``) then *is* the robust statistic, and the strategy's own
    bookkeeping (affinity EMA, gate balancing, version) runs unchanged."""
    if rule == "mean" or not results:
        return list(results)
    senders: dict[str, list[int]] = {}
    for i, r in enumerate(results):
        for name in r.params:
            senders.setdefault(name, []).append(i)
    robust: Arrays = {name: robust_combine([np.asarray(results[i].params[name]) for i in idx],
                                           rule, trim_ratio)
                      for name, idx in senders.items()}
    return [replace(r, params={n: robust[n] for n in r.params}) for r in results]


# --- the state a federation carries between rounds ---------------------------------------------
@dataclass
class RoundNote:
    """What :func:`close_round` needs of one accepted result: mergeable by concatenation."""

    client_id: str
    norm: float  # pre-clip change norm
    bound: float  # the bound it was clipped to
    samples: float  # its count as the history keeps it: the report, capped once a cap exists


@dataclass
class DefenceState:
    """Clip bound and sample history from before the current round (JSON via to_json)."""

    bound: float | None = None  # None: no round closed yet (the first-round rule applies)
    norm_history: list[float] = field(default_factory=list)  # median pre-clip norm per round
    samples: dict[str, float] = field(default_factory=dict)  # device -> last accepted weight
    # samples_cap of ``samples`` per multiple: the history is fixed while a round runs (the
    # next round gets a new state), so its median is taken once a round, not per update
    _caps: dict[tuple[float, int], float | None] = field(default_factory=dict, init=False,
                                                         repr=False, compare=False)

    def samples_cap(self, multiple: float) -> float | None:
        """:func:`samples_cap` of this state's history, computed once per state (and again
        should ``samples`` gain or lose devices): every update of a round is capped by the
        same value, and a median over the fleet per update cost O(fleet) each
        (docs/benchmarks.md, "Coordinator CPU profile")."""
        key = (float(multiple), len(self.samples))
        if key not in self._caps:
            if len(self._caps) >= 8:
                self._caps.clear()
            self._caps[key] = samples_cap(self.samples.values(), multiple)
        return self._caps[key]

    def to_json(self) -> dict[str, Any]:
        return {"bound": self.bound, "norm_history": [float(x) for x in self.norm_history],
                "samples": {c: float(n) for c, n in sorted(self.samples.items())}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> DefenceState:
        """A checkpoint written before the state existed (None) starts afresh."""
        if not doc:
            return cls()
        bound = doc.get("bound")
        return cls(None if bound is None else float(bound),
                   [float(x) for x in doc.get("norm_history", [])],
                   {str(c): float(n) for c, n in dict(doc.get("samples", {})).items()})


def round_bound(state: DefenceState, cfg: TrainConfig, params: Mapping[str, np.ndarray],
                base: Mapping[str, np.ndarray]) -> float:
    """The clip bound for one result this round: the state's bound, or in the first round
    ``clip_init x`` the norm of the global weights that result changes (so it scales with
    the model, not a magic constant). ``fixed`` always uses the first-round rule; ``none``
    is infinite."""
    if cfg.update_clip == "none":
        return math.inf
    if state.bound is not None and cfg.update_clip != "fixed":
        return state.bound
    return cfg.clip_init * weights_norm(base, [n for n in params if n in base])


def defend(state: DefenceState, cfg: TrainConfig, result: ClientResult,
           base: Mapping[str, np.ndarray]) -> tuple[ClientResult, RoundNote]:
    """Clip ``result``'s change against ``base`` (the global weights it was sent) and cap its
    sample weight, from ``state`` alone: the same for any order of arrival."""
    bound = round_bound(state, cfg, result.params, base)
    if math.isinf(bound):
        params, norm = dict(result.params), change_norm(result.params, base)
    else:
        params, norm = clip_update(result.params, base, bound)
    n = kept = _as_float(result.num_samples)
    if cfg.samples_cap > 0:
        cap = state.samples_cap(cfg.samples_cap)
        n = capped_samples(n, cap, state.samples.get(result.client_id), cfg.samples_growth)
        # the history keeps the report itself until a cap exists: the first round's equal
        # weights say nothing about the fleet's sizes, and its median is robust to a liar
        kept = n if cap is not None else kept
    note = RoundNote(result.client_id, norm, bound, kept if math.isfinite(kept) else 1.0)
    return replace(result, params=params, num_samples=max(1, int(round(n)))), note


def _as_float(value: float) -> float:
    """``float(value)``, with an int too large for a float as inf (not OverflowError)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def close_round(state: DefenceState, cfg: TrainConfig, notes: Sequence[RoundNote]) -> DefenceState:
    """The state for the next round from this round's notes (any order: sorted first).

    ``median``: bound = ``clip_multiplier x`` the median pre-clip norm; ``quantile``: one
    geometric step from the share of norms under this round's bound (the first round
    starts from the median of its bounds). Accepted sample weights replace each device's
    last. A round with no notes leaves the state as it was."""
    if not notes:
        return state
    ordered = sorted(notes, key=lambda n: n.client_id)
    norms = [n.norm for n in ordered]
    med = median_bound(norms, 1.0)
    history = list(state.norm_history)
    if med is not None:
        history = (history + [med])[-NORM_HISTORY:]
    bound = state.bound
    if cfg.update_clip == "median" and med is not None:
        bound = cfg.clip_multiplier * med
    elif cfg.update_clip == "quantile":
        start = state.bound if state.bound is not None else float(np.median([n.bound for n in ordered]))
        under = sum(1 for n in ordered if n.norm <= n.bound) / len(ordered)
        bound = quantile_bound_step(start, under, cfg.clip_quantile, cfg.clip_lr)
    samples = dict(state.samples)
    samples.update({n.client_id: n.samples for n in ordered})
    return DefenceState(bound, history, samples)


def defend_round(state: DefenceState, cfg: TrainConfig, results: Sequence[ClientResult],
                 base: Mapping[str, np.ndarray]) -> tuple[list[ClientResult], DefenceState]:
    """A whole round at once (the batch path): every result defended, the robust rule
    substituted, and the next round's state."""
    pairs = [defend(state, cfg, r, base) for r in results]
    defended = robust_substitute([p[0] for p in pairs], cfg.aggregation_rule, cfg.trim_ratio)
    return defended, close_round(state, cfg, [p[1] for p in pairs])


# --- the defence inside a strategy's partial (Strategy.fold / finalize) -------------------------
# A partial of a strategy with the defence carries, as ``extra_rows`` (one row per client,
# concatenated when shards' partials merge, checked finite by the leader): each client's
# note (pre-clip norm, bound, counted samples; -1 stands for "not finite") and, for the
# median / trimmed-mean rules only, its clipped update per tensor with a mask of the tensors
# it sent, plus its weight and affinity row, so :func:`close_partial` can rebuild the results.
ROWS = "robust/"
_NOTE = ("norm", "bound", "samples")


def _finite_or(x: float, sentinel: float = -1.0) -> float:
    return float(x) if math.isfinite(x) else sentinel


def add_rows(partial: Partial, cfg: TrainConfig, state: Mapping[str, np.ndarray],
             keys: Sequence[str], num_experts: int) -> Partial:
    """``partial`` (empty, from a strategy's ``new_partial``) with the defence's rows: the
    notes always, the updates of ``keys`` (shapes and dtypes of ``state``) for a robust rule."""
    for name in _NOTE:
        partial.extra_rows[ROWS + name] = np.zeros(0, dtype=np.float64)
    if cfg.aggregation_rule != "mean":
        for name in keys:
            ref = np.asarray(state[name])
            partial.extra_rows[ROWS + "u/" + name] = np.zeros((0, *ref.shape), dtype=ref.dtype)
        partial.extra_rows[ROWS + "sent"] = np.zeros((0, len(keys)), dtype=bool)
        partial.extra_rows[ROWS + "n"] = np.zeros(0, dtype=np.float64)
        partial.extra_rows[ROWS + "affinity"] = np.zeros((0, num_experts), dtype=np.float64)
        partial.extra_rows[ROWS + "has_affinity"] = np.zeros(0, dtype=bool)
    return partial


def has_rows(partial: Partial) -> bool:
    """Whether ``partial`` came from a ``new_partial`` that added the defence's rows."""
    return ROWS + "norm" in partial.extra_rows


def keeps_updates(partial: Partial) -> bool:
    """Whether the partial keeps every update (a median / trimmed-mean rule)."""
    return ROWS + "sent" in partial.extra_rows


def _append(partial: Partial, name: str, row: np.ndarray) -> None:
    rows = partial.extra_rows[name]
    partial.extra_rows[name] = np.concatenate([rows, np.asarray(row, dtype=rows.dtype)[None]], axis=0)


def record(partial: Partial, note: RoundNote, result: ClientResult) -> None:
    """Append one defended result's rows (after ``Partial.admit`` counted its client)."""
    _append(partial, ROWS + "norm", np.asarray(_finite_or(note.norm)))
    _append(partial, ROWS + "bound", np.asarray(_finite_or(note.bound)))
    _append(partial, ROWS + "samples", np.asarray(_finite_or(note.samples, 1.0)))
    if not keeps_updates(partial):
        return
    keys = [k[len(ROWS) + 2:] for k in partial.extra_rows if k.startswith(ROWS + "u/")]
    sent = np.array([k in result.params for k in keys], dtype=bool)
    for k in keys:
        rows = partial.extra_rows[ROWS + "u/" + k]
        value = result.params[k] if k in result.params else np.zeros(rows.shape[1:], rows.dtype)
        _append(partial, ROWS + "u/" + k, np.nan_to_num(np.asarray(value), nan=0.0, posinf=0.0, neginf=0.0))
    _append(partial, ROWS + "sent", sent)
    _append(partial, ROWS + "n", np.asarray(float(result.num_samples)))
    width = partial.extra_rows[ROWS + "affinity"].shape[1]
    aff = result.affinity
    ok = aff is not None and len(aff) == width and all(math.isfinite(float(a)) for a in aff)
    _append(partial, ROWS + "affinity", np.asarray(aff if ok else np.zeros(width), dtype=np.float64))
    _append(partial, ROWS + "has_affinity", np.asarray(ok))


def notes_of(partial: Partial) -> list[RoundNote]:
    """The round's notes, row i for ``partial.clients[i]`` (-1 read back as inf / NaN)."""
    r = partial.extra_rows
    return [RoundNote(c, float(n) if n >= 0 else math.nan, float(b) if b >= 0 else math.inf, float(s))
            for c, n, b, s in zip(partial.clients, r[ROWS + "norm"], r[ROWS + "bound"],
                                  r[ROWS + "samples"], strict=True)]


def results_of(partial: Partial, result_type: Callable[..., ClientResult]) -> list[ClientResult]:
    """The defended results a partial that keeps updates holds, in its client order, built
    with ``result_type`` (``ClientResult``; passed in, so this module imports no strategy)."""
    r = partial.extra_rows
    keys = [k[len(ROWS) + 2:] for k in r if k.startswith(ROWS + "u/")]
    out = []
    for i, cid in enumerate(partial.clients):
        params = {k: r[ROWS + "u/" + k][i] for j, k in enumerate(keys) if r[ROWS + "sent"][i, j]}
        aff = r[ROWS + "affinity"][i].tolist() if r[ROWS + "has_affinity"][i] else None
        out.append(result_type(cid, partial.round, int(r[ROWS + "n"][i]), params, aff))
    return out
