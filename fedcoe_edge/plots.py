"""Plots a person would rather look at than read. Headless (Agg) so it runs anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_curves(curves: dict[str, list[list[dict[str, float]]]], path: Path, title: str = "") -> None:
    """Global and personalized accuracy per round, one line per algorithm (mean over seeds,
    band = min..max across seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in ((axes[0], "global_acc", "global accuracy"),
                           (axes[1], "personalized_acc", "personalized accuracy")):
        for algorithm, per_seed in curves.items():
            rounds = [p["round"] for p in per_seed[0] if key in p]
            vals = np.array([[p[key] for p in seed_curve if key in p] for seed_curve in per_seed])
            if vals.size == 0:
                continue
            line, = ax.plot(rounds, vals.mean(0), label=algorithm)
            if len(per_seed) > 1:
                ax.fill_between(rounds, vals.min(0), vals.max(0), alpha=0.2, color=line.get_color())
        ax.set_xlabel("round")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_routing_heatmap(matrix: Sequence[Sequence[float]], path: Path, title: str = "") -> None:
    """Client x expert heat map of routing mass (one row per client, rows sum to 1): shows
    whether clients share one expert (a collapsed router) or spread over several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * m.shape[1], 1.5 + 0.22 * m.shape[0]))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("global expert")
    ax.set_ylabel("client")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.tick_params(axis="y", labelsize=6)
    fig.colorbar(im, ax=ax, label="share of routing mass")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
