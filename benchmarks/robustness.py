"""Poisoned updates against the server's defences (docs/benchmarks.md, "Robustness").

1 and 2 malicious devices of 10 on Fashion-MNIST, labels Dirichlet(0.5), FedCoE and FedAvg.
Each attack is injected at the client-result level through the simulator's ``attack`` hook
(``fedcoe_edge.simulation.run_one``): the attacker trains honestly, then replaces what it
uploads; it keeps its honest private state, so personalized accuracy measures the damage
done to everyone through the shared model. Defences are ``train`` settings
(fedcoe_edge/robust.py, docs/design.md "Robust aggregation"):

* ``none``: no clip, no cap on ``num_samples``, the strategy's weighted mean;
* ``default``: the shipped defaults (adaptive clip at the previous round's median change
  norm, ``num_samples`` capped at 2x the median accepted count);
* ``trimmed``: the defaults plus a coordinate-wise 20% trimmed mean;
* ``median``: the defaults plus a coordinate-wise median.

Every run is appended to a cache (one JSON line, keyed by the run and the source it ran), so
an interrupted grid resumes; the report is written from whatever finished. Jobs run in
priority order (clean runs; 2 attackers under the default defence and under none; 1 attacker
under the default; clean runs on more seeds; 1 attacker under none; the robust rules) so a
cut-short grid still answers the goals first.

    python -m benchmarks.robustness                  # the grid, resumed from its cache
    python -m benchmarks.robustness --report-only    # rebuild the report from the cache
    python -m benchmarks.robustness --budget-min 35  # start no run after 35 CPU min
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy import append_cache, git_commit, load_cache
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.numerics import NUMERICS_VERSION

OUT = Path(__file__).resolve().parent / "results"
CACHE = OUT / "robustness_cache.jsonl"
ALGORITHMS = ("fedcoe", "fedavg")
LR = {"fedcoe": 0.05, "fedavg": 0.1}  # benchmarks/results/tuned.json (fmnist) when it is absent
ATTACKS = ("scale10", "scale100", "scale1e4", "signflip", "noise", "labelflip", "samples")
ATTACK_TEXT = {
    "none": "no attack",
    "scale10": "scaled update x10",
    "scale100": "scaled update x100",
    "scale1e4": "scaled update x1e4",
    "signflip": "sign flip (-1 x change)",
    "noise": "random noise (N(0,1) per weight)",
    "labelflip": "label flip (y -> 9 - y)",
    "samples": "lying num_samples (1e9)",
    "absent": "control: the attackers send nothing",
}
# Not an attack: the attackers' clients never report, so the federation trains without their
# data. A sign flip or label flip also takes that data's contribution away, so no rule that
# cannot tell such a device from an honest one with unusual data does better than this row.
CONTROL = "absent"
DEFENCES: dict[str, dict[str, Any]] = {
    "none": {"update_clip": "none", "samples_cap": 0.0, "aggregation_rule": "mean"},
    "default": {},
    "trimmed": {"aggregation_rule": "trimmed_mean"},
    "median": {"aggregation_rule": "median"},
}
NUM_CLASSES = 10  # Fashion-MNIST
# Bump when what these runs compute changes (a defence's rule, the attacks, and with every
# NUMERICS_VERSION bump that touches training or aggregation): the cache keys on it and the
# settings, not on the source, so a refactor that moves the defence without changing a
# number keeps the finished runs. Each run records its commit and numerics version.
BENCH_VERSION = 1
GOAL_POINTS = 2.0  # an attack under the default defence: within this of the clean accuracy
CLEAN_COST_POINTS = 0.5  # the default defence on clean runs: costs at most this


@dataclass(frozen=True)
class Job:
    algorithm: str
    attack: str
    attackers: int
    defence: str
    seed: int

    def key(self, grid: Grid) -> str:
        return (f"{self.algorithm}|{self.attack}|{self.attackers}|{self.defence}|{self.seed}|"
                f"{grid.fingerprint()}")


@dataclass(frozen=True)
class Grid:
    clients: int = 10
    rounds: int = 12
    data_fraction: float = 0.02
    alpha: float = 0.5
    seeds: tuple[int, ...] = (0,)
    extra_seeds: tuple[int, ...] = (1, 2)  # clean runs (none, default) only, for the spread

    def fingerprint(self) -> str:
        """Settings, the defences' defaults and the attacks' source (see BENCH_VERSION)."""
        h = hashlib.sha256(json.dumps([dataclasses.asdict(self), BENCH_VERSION, DEFENCES,
                                       TrainConfig().to_dict(), dataclasses.asdict(TrainConfig())],
                                      sort_keys=True, default=str).encode())
        h.update(attack_source().encode())
        return h.hexdigest()[:12]

    def jobs(self) -> list[Job]:
        """Every run, in priority order (see the module docstring); no duplicates."""
        out: list[Job] = []
        s0 = self.seeds[0]

        def cells(d: str, counts: Sequence[int], order: Sequence[str] = ATTACKS) -> list[Job]:
            return [Job(alg, a, k, d, s0) for k in counts for a in order for alg in ALGORITHMS]

        # the robust rules come last: their most telling attacks first
        robust_order = ("signflip", "scale1e4", "labelflip", "samples", "noise", "scale10", "scale100")

        def clean(d: str, seeds: Sequence[int]) -> list[Job]:
            return [Job(alg, "none", 0, d, s) for s in seeds for alg in ALGORITHMS]

        out += clean("none", [s0]) + clean("default", [s0])
        out += cells("default", (2,)) + cells("none", (2,)) + cells("default", (1,))
        extra = [*self.seeds[1:], *self.extra_seeds]
        out += [j for s in extra for j in clean("none", [s]) + clean("default", [s])]
        out += [Job(alg, CONTROL, k, "default", s0) for k in (1, 2) for alg in ALGORITHMS]
        out += clean("trimmed", [s0]) + clean("median", [s0])
        for a in robust_order:
            out += [Job(alg, a, 2, d, s0) for d in ("trimmed", "median") for alg in ALGORITHMS]
        out += cells("none", (1,))
        for d in ("trimmed", "median"):
            out += cells(d, (1,), robust_order)
        return list(dict.fromkeys(out))


# --- attacks: client-result level, through the simulator's hook --------------------------------
@functools.lru_cache(maxsize=1)
def attack_source() -> str:
    """make_attack's source, read once: ``inspect.getsource`` reads the file on disk by the
    loaded code's line numbers, so an edit to this file while a grid runs would otherwise
    give the same attacks another fingerprint."""
    return inspect.getsource(make_attack)


def make_attack(name: str, attackers: Sequence[str], seed: int) -> Callable[..., Any] | None:
    """The ``attack`` hook for ``run_one``: the clients in ``attackers`` replace their upload."""
    if name == "none" or not attackers:
        return None
    bad = set(attackers)
    rng = np.random.default_rng([seed, 99])

    def attack(strategy: Any, task: Any, result: Any, before: Any, data: Any) -> Any:
        if task.client_id not in bad:
            return result
        if name == "samples":
            return dataclasses.replace(result, num_samples=10**9)
        if name == "labelflip":
            flipped = dataclasses.replace(data, y_train=(NUM_CLASSES - 1 - data.y_train))
            bad_result, _ = strategy.client_update(task, before, flipped)
            return bad_result
        params = {}
        for k, v in result.params.items():
            base = task.params.get(k)
            if base is None or not np.issubdtype(np.asarray(v).dtype, np.floating):
                params[k] = v
                continue
            b = np.asarray(base, dtype=np.float64)
            d = np.asarray(v, dtype=np.float64) - b
            if name.startswith("scale"):
                new = b + float(name[len("scale"):]) * d
            elif name == "signflip":
                new = b - d
            elif name == "noise":
                new = b + rng.standard_normal(b.shape)
            else:
                raise ValueError(f"unknown attack {name!r}")
            params[k] = new.astype(np.asarray(v).dtype)
        return dataclasses.replace(result, params=params)

    return attack


def make_absent(attackers: Sequence[str]) -> Callable[..., Any]:
    """The control run's hook: the given clients send nothing, every round."""
    bad = set(attackers)

    def absent(strategy: Any, task: Any, result: Any, before: Any, data: Any) -> Any:
        return None if task.client_id in bad else result

    return absent


def train_for(algorithm: str, defence: str) -> TrainConfig:
    lr = LR[algorithm]
    tuned = OUT / "tuned.json"
    if tuned.is_file():
        lr = json.loads(tuned.read_text()).get("tuned", {}).get("fmnist", {}).get(algorithm, {}).get("lr", lr)
    knobs: dict[str, Any] = {"lr": lr, **DEFENCES[defence]}
    if algorithm == "fedcoe":
        knobs.update(lam=0.02, experts_per_client=2)
    return TrainConfig(local_epochs=2, batch_size=32, **knobs)


@functools.lru_cache(maxsize=4)
def federation(clients: int, seed: int, alpha: float, data_fraction: float) -> Any:
    """The seed's federation, built once per process (read-only to the runs)."""
    from fedcoe_edge.data import make_federation

    return make_federation("fmnist", "dirichlet", clients, 0, seed, alpha, 20,
                           data_fraction=data_fraction)


def run_job(grid: Grid, job: Job) -> dict[str, Any]:
    import torch

    from fedcoe_edge.simulation import SimulationConfig, fit_model_to_data, run_one

    torch.set_num_threads(1)
    fed = federation(grid.clients, job.seed, grid.alpha, grid.data_fraction)
    model = fit_model_to_data(ModelConfig(expert_hidden=32), fed)
    cfg = SimulationConfig(dataset="fmnist", partition="dirichlet", alpha=grid.alpha,
                           clients=grid.clients, new_clients=0, rounds=grid.rounds,
                           algorithms=[job.algorithm], seeds=[job.seed],
                           data_fraction=grid.data_fraction, eval_every=grid.rounds,
                           model=model, train=train_for(job.algorithm, job.defence))
    cfg.validate()
    attackers = sorted(fed.clients)[: job.attackers]
    attack = (make_absent(attackers) if job.attack == CONTROL
              else make_attack(job.attack, attackers, job.seed))
    t0 = time.process_time()
    result = run_one(job.algorithm, fed, cfg, job.seed, attack=attack)
    m = result.metrics
    return {**dataclasses.asdict(job), "key": job.key(grid), "attacker_ids": attackers,
            "commit": git_commit(), "numerics": NUMERICS_VERSION,
            "global_acc": m["global_acc"], "personalized_acc": m["personalized_acc"],
            "cpu_s": time.process_time() - t0}


# --- report ----------------------------------------------------------------------------------
def records(grid: Grid, done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [done[j.key(grid)] for j in grid.jobs() if j.key(grid) in done]


def stats(recs: Sequence[dict[str, Any]], key: str) -> tuple[float, float, int] | None:
    vals = [r[key] for r in recs if isinstance(r.get(key), float) and math.isfinite(r[key])]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals)), len(vals)


def build_document(grid: Grid, recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means (and spread over seeds) per cell; goals per attack for the default defence."""
    def pick(alg: str, attack: str, k: int, d: str, seed: int | None = None) -> list[dict[str, Any]]:
        return [r for r in recs if (r["algorithm"], r["attack"], r["attackers"], r["defence"]) ==
                (alg, attack, k, d) and (seed is None or r["seed"] == seed)]

    s0 = grid.seeds[0]
    cells: list[dict[str, Any]] = []
    goals: list[dict[str, Any]] = []
    for alg in ALGORITHMS:
        clean = {d: pick(alg, "none", 0, d, s0) for d in DEFENCES}
        ref = clean["none"][0] if clean["none"] else None
        for attack in ("none", *ATTACKS, CONTROL):
            for k in ((0,) if attack == "none" else (1, 2)):
                for d in DEFENCES:
                    rs = pick(alg, attack, k, d, s0)
                    if not rs:
                        continue
                    r = rs[0]
                    row = {"algorithm": alg, "attack": attack, "attackers": k, "defence": d,
                           "global_acc": r["global_acc"], "personalized_acc": r["personalized_acc"],
                           "cpu_s": r["cpu_s"]}
                    if ref is not None:
                        row["global_drop"] = ref["global_acc"] - r["global_acc"]
                        row["personalized_drop"] = ref["personalized_acc"] - r["personalized_acc"]
                    cells.append(row)
                    if d == "default" and attack not in ("none", CONTROL) and ref is not None:
                        worst = max(row["global_drop"], row["personalized_drop"]) * 100
                        goals.append({"algorithm": alg, "attack": attack, "attackers": k,
                                      "global_drop_pts": row["global_drop"] * 100,
                                      "personalized_drop_pts": row["personalized_drop"] * 100,
                                      "met": bool(worst <= GOAL_POINTS)})
    clean_cost: list[dict[str, Any]] = []
    for alg in ALGORITHMS:
        base = {r["seed"]: r for r in pick(alg, "none", 0, "none")}
        for d in ("default", "trimmed", "median"):
            pairs = [(base[r["seed"]], r) for r in pick(alg, "none", 0, d) if r["seed"] in base]
            if not pairs:
                continue
            g = [100 * (b["global_acc"] - r["global_acc"]) for b, r in pairs]
            p = [100 * (b["personalized_acc"] - r["personalized_acc"]) for b, r in pairs]
            entry: dict[str, Any] = {"algorithm": alg, "defence": d, "seeds": sorted(b["seed"] for b, _ in pairs),
                     "global_cost_pts": float(np.mean(g)), "global_cost_std": float(np.std(g)),
                     "personalized_cost_pts": float(np.mean(p)),
                     "personalized_cost_std": float(np.std(p))}
            if d == "default":
                entry["met"] = bool(max(entry["global_cost_pts"], entry["personalized_cost_pts"])
                                    <= CLEAN_COST_POINTS)
            clean_cost.append(entry)
    commits: dict[str, int] = {}
    for r in recs:
        commits[r.get("commit", "unknown")] = commits.get(r.get("commit", "unknown"), 0) + 1
    return {"grid": dataclasses.asdict(grid), "commit": git_commit(), "run_commits": commits,
            "runs_done": len(recs), "runs_planned": len(grid.jobs()),
            "cpu_s": float(sum(r["cpu_s"] for r in recs)),
            "cells": cells, "goals": goals, "clean_cost": clean_cost}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_markdown(doc: dict[str, Any]) -> str:
    g = doc["grid"]
    lines = [
        "# Robustness: poisoned updates against the server's defences",
        "",
        f"Fashion-MNIST, labels Dirichlet({g['alpha']}), {g['clients']} devices, "
        f"{g['data_fraction']:.0%} of the training split, {g['rounds']} rounds, the grid's CNN "
        f"experts (hidden 32); attackers are the first 1 or 2 client ids and attack from round 1. "
        f"Report at commit {doc['commit']}; runs per commit "
        f"{', '.join(f'{c}: {n}' for c, n in doc.get('run_commits', {}).items())}; "
        f"{doc['runs_done']} of {doc['runs_planned']} planned runs, "
        f"{doc['cpu_s'] / 60:.1f} CPU min. Command: `make bench-robustness` "
        "(`python -m benchmarks.robustness`).",
        "",
        "Accuracy at the last round in %: global (10,000 test images) / personalized "
        "(each device's own model on its own test split, ~300 images in all, so ±2-3 points "
        "of noise). Drops are against the clean run without any defence (seed "
        f"{g['seeds'][0]}).",
        "",
        "## Goals",
        "",
    ]
    for c in doc["clean_cost"]:
        if c["defence"] != "default":
            continue
        lines.append(
            f"- **{c['algorithm']}, default defence costs <= {CLEAN_COST_POINTS} points on clean "
            f"runs: {'met' if c['met'] else 'NOT met'}**: global {c['global_cost_pts']:+.2f} "
            f"(±{c['global_cost_std']:.2f}), personalized {c['personalized_cost_pts']:+.2f} "
            f"(±{c['personalized_cost_std']:.2f}) points over seeds {c['seeds']}")
    control = {(c["algorithm"], c["attackers"]): c for c in doc["cells"] if c["attack"] == CONTROL}
    met = sum(r["met"] for r in doc["goals"])
    lines.append(f"- attacks within {GOAL_POINTS:g} points under the default defence (global and "
                 f"personalized): **{met} of {len(doc['goals'])} met**; drops are points below "
                 "the clean run, negative when the attacked run was better; one seed per attack")
    for r in doc["goals"]:
        ctl = control.get((r["algorithm"], r["attackers"]))
        lines.append(
            f"- {r['algorithm']}, {ATTACK_TEXT[r['attack']]}, {r['attackers']} attacker(s): within "
            f"{GOAL_POINTS:g} points with the default defence: **{'met' if r['met'] else 'NOT met'}** "
            f"(global drop {r['global_drop_pts']:+.1f}, personalized drop "
            f"{r['personalized_drop_pts']:+.1f}"
            + (f"; without the attackers' data at all: {100 * ctl['global_drop']:+.1f} / "
               f"{100 * ctl['personalized_drop']:+.1f}" if ctl and "global_drop" in ctl else "")
            + ")")
    lines += ["", "## Accuracy per attack and defence (global / personalized, %)", ""]
    for alg in ALGORITHMS:
        lines += [f"### {alg}", "", "| attack | attackers | " + " | ".join(DEFENCES) + " |",
                  "|---|---|" + "---|" * len(DEFENCES)]
        rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
        for c in doc["cells"]:
            if c["algorithm"] == alg:
                rows.setdefault((c["attack"], c["attackers"]), {})[c["defence"]] = c
        for (attack, k), by_d in rows.items():
            cells = [f"{pct(by_d[d]['global_acc'])} / {pct(by_d[d]['personalized_acc'])}"
                     if d in by_d else "-" for d in DEFENCES]
            lines.append(f"| {ATTACK_TEXT[attack]} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Clean-run cost of each defence (points lost against no defence; mean ± std over "
              "seeds)", "", "| algorithm | defence | seeds | global | personalized |", "|---|---|---|---|---|"]
    for c in doc["clean_cost"]:
        lines.append(f"| {c['algorithm']} | {c['defence']} | {len(c['seeds'])} | "
                     f"{c['global_cost_pts']:+.2f} ± {c['global_cost_std']:.2f} | "
                     f"{c['personalized_cost_pts']:+.2f} ± {c['personalized_cost_std']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ALGORITHMS), figsize=(15, 5), sharey=True)
    short = {"scale10": "x10", "scale100": "x100", "scale1e4": "x1e4", "signflip": "sign",
             "noise": "noise", "labelflip": "labels", "samples": "1e9 n"}
    labels = [f"{short[a]}\n{k} att." for a in ATTACKS for k in (1, 2)]
    width = 0.8 / len(DEFENCES)
    for ax, alg in zip(np.atleast_1d(axes), ALGORITHMS, strict=True):
        for j, d in enumerate(DEFENCES):
            by = {(c["attack"], c["attackers"]): c["global_acc"] for c in doc["cells"]
                  if c["algorithm"] == alg and c["defence"] == d}
            ys = [100 * by.get((a, k), float("nan")) for a in ATTACKS for k in (1, 2)]
            ax.bar(np.arange(len(labels)) + (j - 1.5) * width, ys, width, label=d)
        clean = [c["global_acc"] for c in doc["cells"] if c["algorithm"] == alg
                 and c["attack"] == "none" and c["defence"] == "none"]
        if clean:
            ax.axhline(100 * clean[0], color="k", lw=0.8, ls="--", label="clean, no defence")
            ax.axhline(100 * clean[0] - GOAL_POINTS, color="r", lw=0.8, ls=":", label="goal")
        ax.set_title(f"{alg}: global accuracy under attack")
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=7)
        ax.set_ylim(0, 100)
    np.atleast_1d(axes)[0].set_ylabel("global accuracy, %")
    handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(grid: Grid, cache: Path, out: Path) -> dict[str, Any]:
    from fedcoe_edge.io import atomic_write_text

    doc = build_document(grid, records(grid, load_cache(cache)))
    atomic_write_text(out / "robustness.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "robustness.md", render_markdown(doc))
    if doc["cells"]:
        plot(doc, out / "robustness.png")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=Grid.rounds)
    ap.add_argument("--data-fraction", type=float, default=Grid.data_fraction)
    ap.add_argument("--budget-min", type=float, default=35.0,
                    help="start no run after this many CPU minutes of this process (one core; "
                         "on a shared machine the wall time is longer); the report covers what "
                         "finished")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated algorithm filter (smoke runs)")
    args = ap.parse_args(argv)
    grid = Grid(rounds=args.rounds, data_fraction=args.data_fraction)
    if not args.report_only:
        os.environ.setdefault("ACCURACY_COMMIT", git_commit())  # the code the runs started on
        done = load_cache(args.cache)
        todo = [j for j in grid.jobs() if j.key(grid) not in done
                and (not args.only or j.algorithm in args.only.split(","))]
        t0 = time.process_time()
        for i, job in enumerate(todo):
            if time.process_time() - t0 > 60 * args.budget_min:
                print(f"budget of {args.budget_min} CPU min spent: {len(todo) - i} runs not started",
                      file=sys.stderr)
                break
            rec = run_job(grid, job)
            append_cache(args.cache, rec)
            print(f"[{i + 1}/{len(todo)}] {job}: global {rec['global_acc']:.4f} personalized "
                  f"{rec['personalized_acc']:.4f} ({rec['cpu_s']:.0f} CPU s)", file=sys.stderr, flush=True)
            write_report(grid, args.cache, args.out)
    doc = write_report(grid, args.cache, args.out)
    print(f"{doc['runs_done']} of {doc['runs_planned']} runs; report in {args.out / 'robustness.md'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
