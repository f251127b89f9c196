"""Choose every algorithm's knobs on VALIDATION accuracy, with the same budget for each.

For each dataset (Fashion-MNIST at fmnist-dir0.1, digits at digits-dir0.1), seed 0, every
algorithm (FedCoE and the seven baselines) runs exactly ``BUDGET`` = 4 configurations of the
knobs it reads, scored with ``split="val"``: global accuracy on the pooled client validation
splits, personalized accuracy on each client's validation split; test splits are never read.
One selection rule for everybody: the mean of validation global and personalized accuracy
(personalized alone for ``local``, which has no shared model); ties go to the first
configuration listed. The grid (``python -m benchmarks.accuracy``) then runs each algorithm
at its winner on every setting of that dataset and seed; FedCoE's ablations reuse FedCoE's.

Each finished run is one JSON line in ``tuning_cache.jsonl``, keyed like the grid's cache
(the run, everything it depends on, and the declared numerics version,
``fedcoe_edge.numerics.NUMERICS_VERSION``), so tuning resumes across sessions. Baselines run
first and FedCoE last. Writes ``tuned.json`` and ``tuning.md`` under ``--out``.

    python -m benchmarks.tune --jobs 2     # make tune
    python -m benchmarks.tune --report-only
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.accuracy import (
    BASELINE_ALGORITHMS,
    DEFAULT_FRACTION,
    DEFAULT_OUT,
    PFL_ALGORITHMS,
    QUICK_FRACTION,
    Grid,
    append_cache,
    git_commit,
    load_cache,
    names,
    run_job,
    run_key,
    run_pool,
)
from fedcoe_edge.errors import ConfigError, FedCoEError

BUDGET = 4  # configurations per algorithm: the same search budget for every algorithm
TUNE_SETTINGS = {"fmnist": "fmnist-dir0.1", "digits": "digits-dir0.1"}
TUNE_SEED = 0
LR4 = (0.01, 0.02, 0.05, 0.1)
LR2 = (0.02, 0.05)
KAPPA_LO, KAPPA_HI = 0.001, 0.01  # FedDBE's MR weight on our sum-of-squares scale


def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, first axis slowest."""
    keys = list(axes)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*axes.values())]


# What each algorithm reads besides the shared lr / local_epochs / batch_size (fixed for all):
# FedProx train.prox_mu; Ditto its lambda, train.extra["ditto_lambda"]; FedAvg-FT
# train.finetune_epochs; FedCoE lam (the pull of its local experts toward the consensus),
# experts_per_client (m, its exchange width) and lr. FedAvg, Local, FedRep and the mixture
# read no knob of their own, so their budget goes to a wider lr grid. The label prior its
# smoothing, train.extra["prior_smoothing"]; FedALA how many top layers ALA blends,
# train.extra["ala_layers"] (the paper's p = 1, and 2; s and eta stay at the paper's 0.8 and
# 1.0); FedDBE the MR weight train.extra["dbe_kappa"] (docs/design.md, "Personalized baselines").
SEARCH: dict[str, list[dict[str, Any]]] = {
    "fedavg": product(lr=LR4),
    "fedprox": product(lr=LR2, prox_mu=(0.01, 0.1)),
    "local": product(lr=LR4),
    "fedavg-ft": product(lr=LR2, finetune_epochs=(2, 5)),
    "ditto": product(lr=LR2, ditto_lambda=(0.1, 1.0)),
    "fedrep": product(lr=LR4),
    "mixture": product(lr=LR4),
    "fedavg_prior": product(lr=LR2, prior_smoothing=(0.1, 1.0)),
    "fedala": product(lr=LR2, ala_layers=(1, 2)),
    "feddbe": product(lr=LR2, dbe_kappa=(KAPPA_LO, KAPPA_HI)),
    "fedcoe": [
        {"lr": 0.05, "lam": 0.02, "experts_per_client": 2},
        {"lr": 0.05, "lam": 0.1, "experts_per_client": 2},
        {"lr": 0.05, "lam": 0.02, "experts_per_client": 3},
        {"lr": 0.1, "lam": 0.02, "experts_per_client": 2},
    ],
}
ALGORITHMS = (*BASELINE_ALGORITHMS, *PFL_ALGORITHMS, "fedcoe")  # baselines first: their cache outlives FedCoE edits
assert all(len(v) == BUDGET for v in SEARCH.values())


def score(row: dict[str, Any]) -> float:
    """The selection score: mean of validation global and personalized accuracy; personalized
    alone for an algorithm with no shared model (its global accuracy is chance by design)."""
    if not row.get("shares_model", True):
        return float(row["personalized_acc"])
    return (float(row["global_acc"]) + float(row["personalized_acc"])) / 2


def select(rows: Sequence[dict[str, Any]], budget: int = BUDGET) -> int | None:
    """Index of the winning configuration, or None until all ``budget`` have run (a partial
    search must not pick a winner another configuration might beat); ties go to the first."""
    if len(rows) < budget or any(r.get("global_acc") is None for r in rows):
        return None
    best = 0
    for i, r in enumerate(rows):
        if score(r) > score(rows[best]) + 1e-12:
            best = i
    return best


def tune_grid(dataset: str, algorithm: str, knobs: dict[str, Any], quick: bool,
              data_fraction: float, data_dir: str | None) -> Grid:
    """The one-run grid of a configuration: the accuracy grid's protocol with split="val"."""
    grid = Grid(
        settings=[TUNE_SETTINGS[dataset]],
        algorithms=[algorithm],
        ablations=[],
        seeds=[TUNE_SEED],
        rounds=30,
        split="val",
        data_fraction=data_fraction,
        data_dir=data_dir,
        tuned={dataset: {algorithm: dict(knobs)}},
    )
    if quick:
        grid.rounds, grid.clients, grid.new_clients, grid.eval_every = 2, 6, 1, 1
        grid.data_fraction = QUICK_FRACTION
    return grid


Job = tuple[str, str, int]  # dataset, algorithm, index into SEARCH[algorithm]


def job_list(datasets: Sequence[str], algorithms: Sequence[str]) -> list[Job]:
    """Baselines before FedCoE; the fast digits runs before Fashion-MNIST within each."""
    base = [a for a in algorithms if a != "fedcoe"]
    order = [*base, *(["fedcoe"] if "fedcoe" in algorithms else [])]
    return [(d, a, i) for a in order for d in datasets for i in range(len(SEARCH[a]))]


def build(done: dict[str, dict[str, Any]], keys: dict[Job, str], datasets: Sequence[str],
          algorithms: Sequence[str]) -> dict[str, Any]:
    """tuned.json: ``{"tuned": {dataset: {algorithm: knobs}}, "scores": {dataset:
    {algorithm: [row per configuration]}}}``; an algorithm appears under "tuned" only once all
    its configurations have run."""
    from fedcoe_edge.strategies import shares_model

    tuned: dict[str, dict[str, Any]] = {}
    scores: dict[str, dict[str, Any]] = {}
    for d in datasets:
        tuned[d], scores[d] = {}, {}
        for a in algorithms:
            rows = []
            for i, knobs in enumerate(SEARCH[a]):
                rec = done.get(keys[(d, a, i)])
                row: dict[str, Any] = {"knobs": knobs, "shares_model": shares_model(a)}
                if rec is None:
                    row.update(global_acc=None, personalized_acc=None, cold_start_acc=None,
                               score=None, wall_s=None)
                else:
                    m = rec["metrics"]
                    row.update(global_acc=m["global_acc"], personalized_acc=m["personalized_acc"],
                               cold_start_acc=m["cold_start_acc"], wall_s=m["wall_s"])
                    row["score"] = score(row)
                rows.append(row)
            win = select([r for r in rows if r["score"] is not None], len(rows))
            for i, r in enumerate(rows):
                r["chosen"] = i == win
            if win is not None:
                tuned[d][a] = rows[win]["knobs"]
            scores[d][a] = rows
    return {"tuned": tuned, "scores": scores}


def carry_over(path: Path, doc: dict[str, Any], datasets: Sequence[str],
               algorithms: Sequence[str]) -> list[str]:
    """Keep what an earlier tuning wrote for the algorithms this invocation does not run
    (``--algorithms fedcoe`` re-tunes FedCoE and leaves the baselines' choices and scores as
    they were). Returns "dataset/algorithm" for each entry carried over."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    carried = []
    for d in datasets:
        for a, rows in (old.get("scores") or {}).get(d, {}).items():
            if a in algorithms or a not in SEARCH:
                continue
            doc["scores"].setdefault(d, {})[a] = rows
            if a in (old.get("tuned") or {}).get(d, {}):
                doc["tuned"].setdefault(d, {})[a] = old["tuned"][d][a]
            carried.append(f"{d}/{a}")
    return carried


def render(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        "# Tuning on validation splits",
        "",
        f"Generated by `python -m benchmarks.tune`; {meta['runs_done']}/{meta['runs_total']} "
        f"runs done{'' if meta['complete'] else ' (PARTIAL)'}; runs from commit(s) "
        f"{', '.join(f'`{c}`' for c in meta['run_commits']) or '?'}. CPU time "
        f"{meta['cpu_s'] / 3600:.2f} h summed over the cached runs (one core each); this "
        f"invocation {meta['invocation_wall_s'] / 60:.1f} min of wall clock.",
        "",
        f"Protocol: seed {TUNE_SEED}, {meta['rounds']} rounds, {meta['clients']} + "
        f"{meta['new_clients']} clients, local epochs 2, batch 32, the grid's model; "
        f"Fashion-MNIST at a {meta['data_fraction']:g} stratified subset. Scores are on "
        "VALIDATION splits only (global: pooled client validation splits; personalized: each "
        "client's validation split). Every algorithm gets the same budget of "
        f"{BUDGET} configurations; score = mean of validation global and personalized accuracy "
        "(personalized alone for local, which has no shared model); ties go to the first "
        "configuration. The winner (**chosen**) is what the grid runs on every setting of "
        "that dataset; FedCoE's ablations reuse FedCoE's. Ditto's lambda is "
        "`train.extra.ditto_lambda` (the knob Ditto reads); likewise the label prior's "
        "`prior_smoothing`, FedALA's `ala_layers` and FedDBE's `dbe_kappa`.",
        "",
    ]
    if meta.get("carried_over"):
        lines += [f"Carried over unchanged from an earlier invocation (same protocol, not re-run "
                  f"here; their CPU time is included above): {', '.join(meta['carried_over'])}.", ""]
    for d, algos in doc["scores"].items():
        lines += [f"## {d} (tuned at {TUNE_SETTINGS[d]})", "",
                  "| algorithm | knobs | val global | val personalized | val cold start | score "
                  "| wall s | |",
                  "|---|---|---|---|---|---|---|---|"]
        for a, rows in algos.items():
            for r in rows:
                knobs = ", ".join(f"{k}={v:g}" for k, v in r["knobs"].items())
                if r["score"] is None:
                    lines.append(f"| {a} | {knobs} | not run | not run | not run | - | - | |")
                    continue
                glob = "n/a" if not r["shares_model"] else f"{r['global_acc']:.3f}"
                cold = "n/a" if not r["shares_model"] else f"{r['cold_start_acc']:.3f}"
                mark = "**chosen**" if r["chosen"] else ""
                lines.append(
                    f"| {a} | {knobs} | {glob} | {r['personalized_acc']:.3f} | {cold} "
                    f"| {r['score']:.3f} | {r['wall_s']:.0f} | {mark} |"
                )
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tune",
        description="Tune every algorithm's knobs on validation splits (same budget each) and "
        "write tuned.json and tuning.md. Finished runs are cached; re-running resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--datasets", default=",".join(TUNE_SETTINGS), help="comma-separated")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated")
    p.add_argument("--data-fraction", type=float, default=DEFAULT_FRACTION,
                   help="stratified share of Fashion-MNIST's train split")
    p.add_argument("--data-dir", default=None, help="where the Fashion-MNIST IDX files are")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache of finished runs (default: OUT/tuning_cache.jsonl)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 rounds, 6+1 clients, a tiny Fashion-MNIST subset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild tuned.json / tuning.md from the cache")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(parse_args(argv))
    except FedCoEError as exc:
        print(f"benchmarks.tune: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    from fedcoe_edge.data.federation import check_data_fraction
    from fedcoe_edge.io import atomic_write_text

    datasets, algorithms = names(args.datasets), names(args.algorithms)
    bad = [d for d in datasets if d not in TUNE_SETTINGS] + [
        a for a in algorithms if a not in SEARCH]
    if bad:
        raise ConfigError(f"unknown dataset(s)/algorithm(s) {', '.join(bad)}; known: "
                          f"{', '.join(TUNE_SETTINGS)} / {', '.join(ALGORITHMS)}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    check_data_fraction(args.data_fraction, "--data-fraction")
    out: Path = args.out
    cache = args.cache or out / ("tuning_cache_quick.jsonl" if args.quick else "tuning_cache.jsonl")
    grids = {j: tune_grid(j[0], j[1], SEARCH[j[1]][j[2]], args.quick, args.data_fraction,
                          args.data_dir) for j in job_list(datasets, algorithms)}
    keys = {j: run_key(g, TUNE_SETTINGS[j[0]], j[1], TUNE_SEED) for j, g in grids.items()}
    done = load_cache(cache)
    todo = [j for j in grids if keys[j] not in done]
    commit = git_commit()
    t0 = time.perf_counter()
    print(f"tuning: {len(grids)} runs, {len(grids) - len(todo)} cached in {cache}, "
          f"{len(todo)} to go, {args.jobs} worker(s)", file=sys.stderr, flush=True)
    some = next(iter(grids.values()))

    def write() -> dict[str, Any]:
        doc = build(done, keys, datasets, algorithms)
        carried = carry_over(out / "tuned.json", doc, datasets, algorithms) if not args.quick else []
        recs = [done[k] for k in keys.values() if k in done]
        doc["meta"] = {
            "commit": commit,
            "run_commits": sorted({r.get("commit", "?") for r in recs}),
            "runs_total": len(keys),
            "runs_done": len(recs),
            "complete": len(recs) == len(keys),
            "cpu_s": float(sum(r["metrics"]["wall_s"] for r in recs)) + sum(
                float(row["wall_s"] or 0.0) for da in carried
                for row in doc["scores"][da.split("/")[0]][da.split("/")[1]]),
            "invocation_wall_s": time.perf_counter() - t0,
            "rounds": some.rounds,
            "clients": some.clients,
            "new_clients": some.new_clients,
            "data_fraction": some.data_fraction,
            "split": "val",
            "settings": {d: TUNE_SETTINGS[d] for d in datasets},
            "search": {a: SEARCH[a] for a in algorithms},
            "carried_over": carried,
        }
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tuned.json", json.dumps(doc, indent=2) + "\n")
        atomic_write_text(out / "tuning.md", render(doc) + "\n")
        return doc

    if args.report_only and len(todo) == len(grids) and (out / "tuned.json").is_file():
        # nothing cached at this numerics version: an empty rewrite would drop the knobs
        # the grid runs with (docs/benchmarks.md, "Caches")
        print(f"--report-only: none of the {len(grids)} runs are cached at this numerics "
              f"version; keeping {out}/tuned.json as it is", file=sys.stderr)
        return 2
    if not args.report_only and todo:
        def on_done(job: Job, rec: dict[str, Any]) -> None:
            rec["key"], rec["commit"], rec["dataset"] = keys[job], commit, job[0]
            append_cache(cache, rec)
            done[rec["key"]] = rec
            write()  # tuned.json always reflects every finished run

        run_pool(todo, run_job, lambda j: (grids[j], TUNE_SETTINGS[j[0]], j[1], TUNE_SEED),
                 on_done, args.jobs, "tuning", progress=not args.no_progress)
    doc = write()
    m = doc["meta"]
    print(f"wrote {out}/tuned.json and tuning.md ({m['runs_done']}/{m['runs_total']} runs, "
          f"{m['cpu_s'] / 3600:.2f} CPU h cached)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
