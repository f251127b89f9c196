"""Plots a person would rather look at than read. Headless (Agg) so it runs anywhere."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")


def plot_curves(curves: dict[str, list[list[dict[str, float]]]], path: Path, title: str = "",
                *, chance: float | None = None, no_global: Sequence[str] = ()) -> None:
    """Global and personalized accuracy per evaluated round, one line per algorithm (mean over
    seeds, band = min..max across seeds). Each algorithm gets its own marker and dash so
    lines that overlap stay distinguishable; ``chance`` draws a dotted chance line;
    algorithms in ``no_global`` (no shared model, e.g. local-only) are left out of the global
    panel instead of being drawn at chance, and the legend says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "global_acc", "global accuracy"),
                           (axes[1], "personalized_acc", "personalized accuracy")):
        for i, (algorithm, per_seed) in enumerate(curves.items()):
            if key == "global_acc" and algorithm in no_global:
                continue
            rounds = [p["round"] for p in per_seed[0] if key in p]
            vals = np.array([[p[key] for p in seed_curve if key in p] for seed_curve in per_seed])
            if vals.size == 0 or not np.isfinite(vals).any():
                continue
            line, = ax.plot(rounds, vals.mean(0), label=algorithm, marker=MARKERS[i % len(MARKERS)],
                            linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=4, linewidth=1.4)
            if len(per_seed) > 1:
                ax.fill_between(rounds, vals.min(0), vals.max(0), alpha=0.15, color=line.get_color())
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
        ax.set_xlabel("round")
        ax.set_title(label + (f" (n/a: {', '.join(no_global)})"
                              if key == "global_acc" and no_global else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(loc="lower right", fontsize=8, ncol=2)
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
