"""How different are the clients? Label-distribution statistics and a recommendation.

Design section 6. For client label distributions p_i and the population p (pooled counts):

* total variation ``TV(p_i, p) = 0.5 |p_i - p|_1``; over unordered labels with the 0/1 ground
  metric this IS the earth mover's distance, so one number serves as both;
* Jensen-Shannon distance (``scipy.spatial.distance.jensenshannon``, base 2, in [0, 1]);
* smoothed KL ``KL(p_i || p)`` with add-eps smoothing so empty classes stay finite;
* mean pairwise JS distance and TV over all client pairs (1.0 when no two clients share a
  label, 0.0 when all clients are alike).

The recommendation follows the observation that motivates personalised FL (e.g. Hsu et al.,
arXiv 1909.06335; FedCoE, arXiv 2605.21264): under strong label skew a single averaged model
loses to personalised ones, while on near-IID clients FedAvg is hard to beat. The statistic is
the mean pairwise JS distance in excess of what IID sampling of the same client sizes would
give (finite samples alone make small clients look different); the threshold and the
evidence are part of the output. Only label histograms are used, so feature shift (one
"camera" per client) is invisible here; label histograms should leave a device only if the
operator allows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon

from fedcoe_edge.errors import DataError

DEFAULT_THRESHOLD = 0.15  # excess mean pairwise JS distance above which to personalise
KL_EPS = 1e-3  # additive smoothing of the class probabilities for KL
IID_DRAWS = 20  # multinomial re-draws for the IID baseline


def label_counts(labels: Sequence[np.ndarray], num_classes: int | None = None) -> np.ndarray:
    """(clients, classes) histogram from each client's label array."""
    if not labels:
        raise DataError("no clients to analyse")
    arrays = [np.asarray(y, dtype=np.int64).ravel() for y in labels]
    if any(len(a) and a.min() < 0 for a in arrays):
        raise DataError("labels must be non-negative class indices")
    top = max((int(a.max()) for a in arrays if len(a)), default=-1) + 1
    c = max(top, num_classes or 0)
    if c < 1:
        raise DataError("all clients are empty")
    return np.stack([np.bincount(a, minlength=c) for a in arrays]).astype(np.float64)


def _normalise(counts: np.ndarray) -> np.ndarray:
    sums = counts.sum(1, keepdims=True)
    return counts / np.where(sums > 0, sums, 1.0)


def smoothed_kl(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> float:
    """KL(p || q) in nats after adding ``eps`` to every class and renormalising."""
    ps = (p + eps) / (p + eps).sum()
    qs = (q + eps) / (q + eps).sum()
    return float(np.sum(ps * np.log(ps / qs)))


def pairwise(dist: np.ndarray) -> np.ndarray:
    """Upper-triangle values of a square matrix (i < j)."""
    i, j = np.triu_indices(len(dist), k=1)
    return dist[i, j]


def _pairwise_js_tv(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(probs)
    js = np.zeros((n, n))
    tv = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            js[a, b] = js[b, a] = float(jensenshannon(probs[a], probs[b], base=2))
            tv[a, b] = tv[b, a] = 0.5 * float(np.abs(probs[a] - probs[b]).sum())
    return np.nan_to_num(js), tv


def iid_baseline_js(counts: np.ndarray, rng: np.random.Generator, draws: int = IID_DRAWS) -> float:
    """Mean pairwise JS distance if each client drew its n_i labels IID from the population."""
    sizes = counts.sum(1).astype(np.int64)
    pop = counts.sum(0) / counts.sum()
    if len(counts) < 2:
        return 0.0
    vals = []
    for _ in range(draws):
        sample = np.stack([rng.multinomial(n, pop) for n in sizes]).astype(np.float64)
        vals.append(pairwise(_pairwise_js_tv(_normalise(sample))[0]).mean())
    return float(np.mean(vals))


def analyse(counts: np.ndarray, client_ids: Sequence[str] | None = None,
            threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> dict[str, Any]:
    """All statistics and the recommendation for a (clients, classes) count matrix."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 2:
        raise DataError(f"label counts must be (clients >= 1, classes >= 2), got {counts.shape}")
    if np.any(counts < 0) or not np.isfinite(counts).all():
        raise DataError("label counts must be finite and non-negative")
    empty = np.flatnonzero(counts.sum(1) == 0)
    if len(empty):
        raise DataError(f"client at row {int(empty[0])} has no samples")
    ids = list(client_ids) if client_ids is not None else [str(i) for i in range(len(counts))]
    if len(ids) != len(counts):
        raise DataError(f"{len(ids)} client ids for {len(counts)} rows of counts")
    probs = _normalise(counts)
    pop = counts.sum(0) / counts.sum()
    per_client: dict[str, dict[str, Any]] = {}
    for cid, p_i, n_i in zip(ids, probs, counts, strict=True):
        per_client[cid] = {
            "samples": int(n_i.sum()),
            "tv": 0.5 * float(np.abs(p_i - pop).sum()),
            "js": float(np.nan_to_num(jensenshannon(p_i, pop, base=2))),
            "kl": smoothed_kl(p_i, pop),
            "classes_present": int((n_i > 0).sum()),
            "label_distribution": [round(float(v), 6) for v in p_i],
        }
    js_mat, tv_mat = _pairwise_js_tv(probs)
    pair_js = pairwise(js_mat)
    pair_tv = pairwise(tv_mat)
    mean_pair_js = float(pair_js.mean()) if len(pair_js) else 0.0
    baseline = iid_baseline_js(counts, np.random.default_rng(seed))
    excess = mean_pair_js - baseline
    recommend = "dual-level-moe" if excess > threshold else "fedavg"
    return {
        "clients": len(ids),
        "classes": int(counts.shape[1]),
        "population": [round(float(v), 6) for v in pop],
        "mean_tv": float(np.mean([c["tv"] for c in per_client.values()])),
        "mean_emd": float(np.mean([c["tv"] for c in per_client.values()])),  # = TV, 0/1 metric
        "mean_js": float(np.mean([c["js"] for c in per_client.values()])),
        "mean_kl": float(np.mean([c["kl"] for c in per_client.values()])),
        "mean_pairwise_js": mean_pair_js,
        "mean_pairwise_tv": float(pair_tv.mean()) if len(pair_tv) else 0.0,
        "per_client": per_client,
        "recommendation": recommend,
        "evidence": {
            "statistic": "mean_pairwise_js - iid_baseline_js",
            "mean_pairwise_js": mean_pair_js,
            "iid_baseline_js": baseline,
            "excess_js": excess,
            "threshold": threshold,
            "rule": f"dual-level-moe if excess_js > {threshold}, else fedavg",
            "note": "label statistics only: feature shift between clients is not measured",
        },
    }


def analyse_labels(labels: Mapping[str, np.ndarray], num_classes: int | None = None,
                   threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> dict[str, Any]:
    """``analyse`` from each client's label array, keyed by client id."""
    ids = list(labels)
    return analyse(label_counts([labels[c] for c in ids], num_classes), ids, threshold, seed)


def plot_heatmap(report: dict[str, Any], path: Path, title: str = "") -> None:
    """Clients x classes heat map of label shares, one row per client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(report["per_client"])
    mat = np.array([report["per_client"][c]["label_distribution"] for c in ids])
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * mat.shape[1], 1.5 + 0.28 * len(ids)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(mat.shape[1]))
    ax.set_yticks(range(len(ids)))
    ax.set_yticklabels(ids, fontsize=7)
    fig.colorbar(im, ax=ax, label="share of client's samples")
    ax.set_title(title or f"mean pairwise JS {report['mean_pairwise_js']:.2f}: "
                          f"{report['recommendation']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
