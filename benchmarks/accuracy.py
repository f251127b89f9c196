"""The accuracy benchmark: FedCoE against the baselines, on four settings, several seeds.

Issue 3 / design section 5: {digits Dir(0.1), digits Dir(0.5), digits-shift, synthetic(1,1)}
x {fedcoe, fedavg, fedprox, local, fedavg-ft, ditto, fedrep, mixture} x seeds {0, 1, 2}, then
FedCoE's ablations (no affinity weighting, no coordination regulariser, no local experts, full
exchange m=K). Every run uses the same clients, local epochs, batch size and rounds, and is
scored at the LAST round (not the best). FedCoE is "Bridging Generalization and
Personalization via Federated Coordinated Dual-level MoEs", arXiv 2605.21264.

Each finished run is appended to a cache file (one JSON line), so an interrupted grid resumes
where it stopped; runs are ordered seed-major, so a partial grid already covers every setting.
Writes ``accuracy.json``, ``accuracy.md`` and ``accuracy_<setting>.png`` under ``--out``.

    python -m benchmarks.accuracy                 # the full grid (resumes from its cache)
    python -m benchmarks.accuracy --quick --out /tmp/acc   # seconds: a smoke test
    python -m benchmarks.accuracy --report-only   # rebuild the report from the cache
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError, FedCoEError

MAIN_ALGORITHMS = (
    "fedcoe",
    "fedavg",
    "fedprox",
    "local",
    "fedavg-ft",
    "ditto",
    "fedrep",
    "mixture",
)
ABLATION_ALGORITHMS = ("fedcoe-noaffinity", "fedcoe-nocoord", "fedcoe-nolocal", "fedcoe-full")
METRICS = ("global_acc", "personalized_acc", "cold_start_acc")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setting:
    """One data setting of the grid."""

    name: str
    dataset: str
    partition: str
    alpha: float

    def describe(self) -> str:
        if self.partition == "natural":
            return f"{self.dataset}, one user per client (natural partition)"
        part = f"Dirichlet(alpha={self.alpha})" if self.partition == "dirichlet" else self.partition
        return f"{self.dataset}, labels {part}"


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("digits-dir0.1", "digits", "dirichlet", 0.1),
        Setting("digits-dir0.5", "digits", "dirichlet", 0.5),
        Setting("digits-shift", "digits-shift", "dirichlet", 0.5),
        Setting("synthetic(1,1)", "synthetic(1,1)", "natural", 1.0),
    )
}


@dataclass
class Grid:
    """What to run; ``fingerprint`` keys the cache so a changed grid never reuses stale runs."""

    settings: list[str]
    algorithms: list[str]
    ablations: list[str]
    seeds: list[int]
    rounds: int
    clients: int = 20
    new_clients: int = 4
    min_samples: int = 20
    eval_every: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ablation_seeds: list[int] | None = None  # None: the same seeds as the main grid

    def fingerprint(self, algorithm: str | None = None) -> str:
        """Hash of the settings a run depends on. For algorithms outside FedCoE's family the
        FedCoE-only loss and exchange knobs are left out: they cannot change those runs."""
        train = self.train.to_dict()
        if algorithm is not None and not is_fedcoe_family(algorithm):
            train = {k: v for k, v in train.items() if k not in FEDCOE_ONLY_TRAIN}
        doc = {
            "rounds": self.rounds,
            "clients": self.clients,
            "new_clients": self.new_clients,
            "min_samples": self.min_samples,
            "eval_every": self.eval_every,
            "model": self.model.to_dict(),
            "train": train,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def jobs(self) -> list[tuple[str, str, int]]:
        """(setting, algorithm, seed), seed-major, main algorithms before ablations."""
        out = [(s, a, seed) for seed in self.seeds for s in self.settings for a in self.algorithms]
        abl_seeds = self.seeds if self.ablation_seeds is None else self.ablation_seeds
        out += [(s, a, seed) for seed in abl_seeds for s in self.settings for a in self.ablations]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "algorithms": self.algorithms,
            "ablations": self.ablations,
            "seeds": self.seeds,
            "ablation_seeds": self.ablation_seeds,
            "rounds": self.rounds,
            "clients": self.clients,
            "new_clients": self.new_clients,
            "min_samples": self.min_samples,
            "eval_every": self.eval_every,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
        }


# TrainConfig fields only FedCoE (and its ablations) read
FEDCOE_ONLY_TRAIN = frozenset(
    {
        "beta",
        "gamma",
        "lam",
        "mu",
        "detach_global",
        "tau",
        "rho",
        "experts_per_client",
        "affinity_ema",
    }
)

# config values are in the grid fingerprint, so config.py itself is not hashed
CORE_MODULES = (
    "fedcoe_edge.model",
    "fedcoe_edge.training",
    "fedcoe_edge.aggregate",
    "fedcoe_edge.simulation",
    "fedcoe_edge.data.datasets",
    "fedcoe_edge.data.partition",
    "fedcoe_edge.data.federation",
    "fedcoe_edge.data.synthetic",
    "fedcoe_edge.data.shift",
    "fedcoe_edge.strategies.base",
)


def code_version(algorithm: str) -> str:
    """Hash of the source an algorithm's runs depend on: the shared core plus every module in
    its class hierarchy (FedCoE's family also its losses; baselines use only the proximal term).
    A cached run is reused only while this is unchanged, so editing fedcoe.py or losses.py
    re-runs FedCoE and its ablations but not FedAvg."""
    import importlib
    import inspect

    from fedcoe_edge.losses import proximal_term
    from fedcoe_edge.strategies import STRATEGIES

    mods = set(CORE_MODULES)
    mods.update(
        c.__module__
        for c in STRATEGIES[algorithm].__mro__
        if c.__module__.startswith("fedcoe_edge.")
    )
    if "fedcoe_edge.strategies.fedcoe" in mods:
        mods.add("fedcoe_edge.losses")
    h = hashlib.sha256()
    for name in sorted(mods):
        h.update(name.encode())
        h.update(inspect.getsource(importlib.import_module(name)).encode())
    if "fedcoe_edge.losses" not in mods:
        h.update(inspect.getsource(proximal_term).encode())
    return h.hexdigest()[:12]


_CODE_VERSIONS: dict[str, str] = {}


def run_key(grid: Grid, setting: str, algorithm: str, seed: int) -> str:
    """Cache key: the run, the settings it depends on and the source it ran."""
    if algorithm not in _CODE_VERSIONS:
        _CODE_VERSIONS[algorithm] = code_version(algorithm)
    return f"{setting}|{algorithm}|{seed}|{grid.fingerprint(algorithm)}|{_CODE_VERSIONS[algorithm]}"


def is_fedcoe_family(algorithm: str) -> bool:
    from fedcoe_edge.strategies import STRATEGIES
    from fedcoe_edge.strategies.fedcoe import FedCoE

    return issubclass(STRATEGIES[algorithm], FedCoE)


# --- one run (in a worker process) --------------------------------------------------------
def run_job(grid: Grid, setting_name: str, algorithm: str, seed: int) -> dict[str, Any]:
    """Build the setting's federation for ``seed`` and train ``algorithm``; JSON-ready record."""
    import torch

    from fedcoe_edge.data import make_federation
    from fedcoe_edge.simulation import SimulationConfig, run_one

    torch.set_num_threads(1)  # the machine is shared: one core per worker
    s = SETTINGS[setting_name]
    fed = make_federation(
        s.dataset, s.partition, grid.clients, grid.new_clients, seed, s.alpha, grid.min_samples
    )
    kind = grid.model.expert_kind if len(fed.input_shape) == 3 else "mlp"  # vectors: MLP experts
    model = dataclasses.replace(
        grid.model, input_shape=fed.input_shape, num_classes=fed.num_classes, expert_kind=kind
    )
    cfg = SimulationConfig(
        dataset=s.dataset,
        partition=s.partition,
        alpha=s.alpha,
        clients=grid.clients,
        new_clients=grid.new_clients,
        rounds=grid.rounds,
        algorithms=[algorithm],
        seeds=[seed],
        min_samples=grid.min_samples,
        eval_every=grid.eval_every,
        model=model,
        train=grid.train,
    )
    result = run_one(algorithm, fed, cfg, seed)
    return {
        "setting": setting_name,
        "algorithm": algorithm,
        "seed": seed,
        "metrics": result.metrics,
        "curve": result.curve,
    }


# --- cache ----------------------------------------------------------------------------------
def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Finished runs by key; a torn last line (killed mid-write) is skipped."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            done[rec["key"]] = rec
        except (json.JSONDecodeError, KeyError):
            continue
    return done


def append_cache(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as fh:
        fh.write(("\n" if torn else "") + json.dumps(record) + "\n")  # never glue onto a torn line
        fh.flush()
        os.fsync(fh.fileno())


# --- summary and report ---------------------------------------------------------------------
def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean over seeds with ``<metric>_std`` (population std; 0.0 with one seed)."""
    out: dict[str, float] = {}
    for key in records[0]["metrics"]:
        values = np.array([r["metrics"][key] for r in records], dtype=np.float64)
        out[key] = float(values.mean())
        if key in METRICS:
            out[f"{key}_std"] = float(values.std())
    out["seeds"] = float(len(records))
    return out


def build_document(
    grid: Grid, done: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """accuracy.json: ``{"settings": {setting: {"config", "algorithms": {alg: summary}}}}``."""
    from fedcoe_edge.strategies import shares_model

    settings: dict[str, Any] = {}
    for s_name in grid.settings:
        s = SETTINGS[s_name]
        algos: dict[str, Any] = {}
        all_seeds = sorted({*grid.seeds, *(grid.ablation_seeds or [])})
        for algorithm in [*grid.algorithms, *grid.ablations]:
            recs = [
                done[k]
                for seed in all_seeds
                if (k := run_key(grid, s_name, algorithm, seed)) in done
            ]
            if recs:
                summary = summarize(recs)
                summary["seed_list"] = [r["seed"] for r in recs]  # type: ignore[assignment]
                if not shares_model(algorithm):
                    summary["no_shared_model"] = True  # type: ignore[assignment]
                algos[algorithm] = summary
        settings[s_name] = {
            "config": {
                "dataset": s.dataset,
                "partition": s.partition,
                "alpha": s.alpha,
                "clients": grid.clients,
                "new_clients": grid.new_clients,
                "rounds": grid.rounds,
                "seeds": grid.seeds,
                "min_samples": grid.min_samples,
                "model": grid.model.to_dict(),
                "train": grid.train.to_dict(),
            },
            "algorithms": algos,
        }
        # FedCoE on exactly the ablations' seeds, so ablation rows compare like with like
        abl_seeds = grid.seeds if grid.ablation_seeds is None else grid.ablation_seeds
        ref = [done[k] for seed in abl_seeds
               if (k := run_key(grid, s_name, "fedcoe", seed)) in done]
        if ref and grid.ablations:
            settings[s_name]["fedcoe_on_ablation_seeds"] = summarize(ref)
    return {"meta": meta, "settings": settings}


def cell(m: dict[str, Any], key: str, best: float | None) -> str:
    if m.get("no_shared_model") and key != "personalized_acc":
        return "n/a"
    text = f"{m[key]:.3f} ± {m[key + '_std']:.3f}"
    return f"**{text}**" if best is not None and np.isclose(m[key], best) else text


def setting_table(algos: dict[str, Any], names: Sequence[str]) -> list[str]:
    rows = [n for n in names if n in algos]
    best: dict[str, float | None] = {}
    for key in METRICS:
        vals = [
            algos[n][key]
            for n in rows
            if not (algos[n].get("no_shared_model") and key != "personalized_acc")
        ]
        best[key] = max(vals) if vals else None
    lines = [
        "| algorithm | global acc | personalized acc | cold-start acc | up KB/round | "
        "down KB/round | wall s/run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in rows:
        m = algos[n]
        lines.append(
            f"| {n} | {cell(m, 'global_acc', best['global_acc'])} "
            f"| {cell(m, 'personalized_acc', best['personalized_acc'])} "
            f"| {cell(m, 'cold_start_acc', best['cold_start_acc'])} "
            f"| {m['bytes_up_per_client_round'] / 1024:.1f} "
            f"| {m['bytes_down_per_client_round'] / 1024:.1f} "
            f"| {m['wall_s']:.1f} | {int(m['seeds'])} |"
        )
    return lines


def goals(algos: dict[str, Any]) -> list[tuple[str, float, str, float, bool]]:
    """Issue 3's goals in one setting as (goal, fedcoe, rival, rival value, met), computed:
    personalized >= best baseline, global > FedAvg/FedProx, cold start >= best baseline."""
    if "fedcoe" not in algos:
        return []
    f = algos["fedcoe"]
    rivals = {n: m for n, m in algos.items() if n in MAIN_ALGORITHMS and n != "fedcoe"}
    out = []
    pers = {n: m["personalized_acc"] for n, m in rivals.items()}
    if pers:
        best = max(pers, key=pers.__getitem__)
        out.append(
            (
                "personalized",
                f["personalized_acc"],
                best,
                pers[best],
                f["personalized_acc"] >= pers[best] - 1e-9,
            )
        )
    avg = {n: rivals[n]["global_acc"] for n in ("fedavg", "fedprox") if n in rivals}
    if avg:
        top = max(avg, key=avg.__getitem__)
        out.append(("global", f["global_acc"], top, avg[top], f["global_acc"] > avg[top]))
    cold = {n: m["cold_start_acc"] for n, m in rivals.items() if not m.get("no_shared_model")}
    if cold:
        best = max(cold, key=cold.__getitem__)
        out.append(
            (
                "cold start",
                f["cold_start_acc"],
                best,
                cold[best],
                f["cold_start_acc"] >= cold[best] - 1e-9,
            )
        )
    return out


def verdict(algos: dict[str, Any]) -> list[str]:
    """The goals as Markdown bullets."""
    rows = goals(algos)
    if not rows:
        return ["- FedCoE not run yet."]
    return [
        f"- {g}: FedCoE {fv:.3f} vs {rival} {rv:.3f} ({fv - rv:+.3f}): {'met' if ok else 'NOT met'}"
        for g, fv, rival, rv, ok in rows
    ]


def summary_table(doc: dict[str, Any]) -> list[str]:
    """One row per setting: FedCoE minus its rival on each goal (met / NOT met)."""
    lines = [
        "| setting | personalized: FedCoE - best baseline | global: FedCoE - best of "
        "FedAvg/FedProx | cold start: FedCoE - best baseline |",
        "|---|---|---|---|",
    ]
    for s_name, block in doc["settings"].items():
        cells = {
            g: f"{fv - rv:+.3f} vs {rival} ({'met' if ok else 'NOT met'})"
            for g, fv, rival, rv, ok in goals(block["algorithms"])
        }
        lines.append(
            f"| {s_name} | {cells.get('personalized', '-')} | {cells.get('global', '-')} "
            f"| {cells.get('cold start', '-')} |"
        )
    return lines


NOTES = (
    "Each setting's table compares equal budgets: same clients, rounds, local epochs, batch "
    "size and learning rate for every algorithm. Caveat: FedCoE's loss weights and CNN experts "
    "are the defaults chosen by a sweep on digits (commit d59e344); the baselines got no sweep "
    "(their knobs are their papers' usual values), which favours FedCoE on the digits settings.",
    "Cold start = the new clients' accuracy with no gradient step. For baselines it is their "
    "global model (FedAvg's for FedAvg-FT, Ditto and the mixture, whose global models are "
    "trained exactly as FedAvg's); FedCoE routes with the gate and downloads only its top-m "
    "experts. Local-only has nothing to give a new client (n/a).",
    "FedRep's global and cold-start figures use its shared body with the mean of the clients' "
    "private heads (clients upload heads for that; counted in its bytes up). Personal heads "
    "averaged over very different label mixes make a weak global head, hence its low global "
    "accuracy.",
    "synthetic(1,1) (FedProx's generator): every user has its own labelling function "
    "W_k, b_k and its new users are nearly single-class, so cold-start accuracy there says "
    "more about which class a model defaults to than about transfer. Synthetic inputs are "
    "60-d vectors, so every algorithm uses MLP experts there.",
    "Bytes are per client per round, safetensors-serialised, as the wire would carry them. "
    "FedCoE sends the gate, shared expert and only the client's m experts; baselines send the "
    "whole plain network.",
)


def render_markdown(doc: dict[str, Any], grid: Grid) -> str:
    meta = doc["meta"]
    lines = [
        "# Accuracy benchmark: FedCoE vs baselines",
        "",
        f"Generated by `python -m benchmarks.accuracy`; runs from commit(s) "
        f"{', '.join(f'`{c}`' for c in meta.get('run_commits', [])) or '?'}; "
        f"{meta['runs_done']}/{meta['runs_total']} runs done"
        f"{'' if meta['complete'] else ' (PARTIAL: the grid did not finish)'}.",
        "",
        f"Protocol (design section 5): {grid.clients} training clients + {grid.new_clients} "
        f"new (cold-start) clients, {grid.rounds} rounds, every client every round, "
        f"{grid.train.local_epochs} local epochs, batch {grid.train.batch_size}, SGD lr "
        f"{grid.train.lr}, the same for every algorithm; seeds {grid.seeds}. Accuracy at the "
        "LAST round, mean ± std across seeds; best per column in bold. Baselines use one dense "
        "network whose width is FedCoE's active width (shared + top-k experts); with CNN experts "
        "conv cost grows with width squared, so on image settings the baselines spend about 2.2x "
        "FedCoE's MACs per input (2.70M vs 1.24M): the comparison favours them. Local-only has "
        "no shared model, so its global and cold-start cells are n/a (its JSON keeps chance).",
        "",
    ]
    lines += ["## Summary: issue 3's goals", "", *summary_table(doc), ""]
    for s_name, block in doc["settings"].items():
        algos = block["algorithms"]
        lines += [f"## {s_name}: {SETTINGS[s_name].describe()}", ""]
        lines += setting_table(algos, grid.algorithms)
        lines += ["", "Goals of issue 3 in this setting:", "", *verdict(algos), ""]
        if any(a in algos for a in grid.ablations):
            ref = block.get("fedcoe_on_ablation_seeds", algos.get("fedcoe"))
            lines += ["Ablations (what each part of FedCoE buys; the fedcoe row is FedCoE on the "
                      "ablations' own seeds):", ""]
            lines += setting_table({**algos, "fedcoe": ref} if ref else algos,
                                   ["fedcoe", *grid.ablations])
            lines.append("")
        lines += [f"![{s_name}](accuracy_{safe_name(s_name)}.png)", ""]
    lines += ["## How to read this", "", *(f"- {n}" for n in NOTES), ""]
    return "\n".join(lines)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def write_report(
    grid: Grid, done: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    from fedcoe_edge.io import atomic_write_text
    from fedcoe_edge.plots import plot_curves

    doc = build_document(grid, done, meta)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "accuracy.md", render_markdown(doc, grid) + "\n")
    for s_name in grid.settings:
        curves = {}
        for algorithm in grid.algorithms:
            per_seed = [
                done[k]["curve"]
                for seed in grid.seeds
                if (k := run_key(grid, s_name, algorithm, seed)) in done
            ]
            # seeds with equal curve lengths only (a partial grid may mix none of them)
            if per_seed:
                curves[algorithm] = per_seed
        if curves:
            plot_curves(
                curves,
                out / f"accuracy_{safe_name(s_name)}.png",
                title=f"{s_name}: {SETTINGS[s_name].describe()}",
            )
    return doc


def git_commit() -> str:
    """HEAD of the checkout (or $ACCURACY_COMMIT when run from an exported snapshot)."""
    if os.environ.get("ACCURACY_COMMIT"):
        return os.environ["ACCURACY_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- command line ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Run the accuracy grid (settings x algorithms x seeds, then FedCoE ablations) "
        "and write accuracy.md, accuracy.json and one PNG per setting. Finished runs "
        "are cached, so re-running resumes a half-done grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=30, help="federated rounds per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings")
    p.add_argument("--algorithms", default=",".join(MAIN_ALGORITHMS), help="comma-separated")
    p.add_argument(
        "--ablations",
        default=",".join(ABLATION_ALGORITHMS),
        help="comma-separated FedCoE variants ('' for none)",
    )
    p.add_argument("--ablation-seeds", default=None,
                   help="seeds for the ablations (default: --seeds)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--new-clients", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=10, help="rounds between curve points")
    p.add_argument(
        "--expert-kind",
        choices=("mlp", "cnn"),
        default=None,
        help="expert network on images (default: ModelConfig's); vectors always use mlp",
    )
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache of finished runs (default: OUT/accuracy_cache.jsonl)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 rounds, 6+1 clients, seed 0, every setting and algorithm",
    )
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the cache"
    )
    return p.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> Grid:
    def names(text: str) -> list[str]:
        # commas inside parentheses belong to a name: synthetic(1,1)
        return [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]

    from fedcoe_edge.strategies import STRATEGIES

    def int_list(text: str) -> list[int]:
        try:
            return [int(t) for t in names(text)]
        except ValueError:
            raise ConfigError(f"seeds must be comma-separated integers, got {text!r}") from None

    seeds = int_list(args.seeds)
    grid = Grid(
        settings=names(args.settings),
        algorithms=names(args.algorithms),
        ablations=names(args.ablations),
        seeds=seeds,
        ablation_seeds=None if args.ablation_seeds is None else int_list(args.ablation_seeds),
        rounds=args.rounds,
        clients=args.clients,
        new_clients=args.new_clients,
        eval_every=args.eval_every,
    )
    if args.expert_kind is not None:
        grid.model = dataclasses.replace(grid.model, expert_kind=args.expert_kind)
    if args.quick:
        grid.rounds, grid.clients, grid.new_clients, grid.seeds = 2, 6, 1, [0]
        grid.eval_every = 1
    bad = [s for s in grid.settings if s not in SETTINGS]
    if bad:
        raise ConfigError(f"unknown setting(s) {', '.join(bad)}; known: {', '.join(SETTINGS)}")
    bad = [a for a in [*grid.algorithms, *grid.ablations] if a not in STRATEGIES]
    if bad:
        raise ConfigError(
            f"unknown algorithm(s) {', '.join(bad)}; known: {', '.join(sorted(STRATEGIES))}"
        )
    if grid.rounds < 1 or not grid.seeds or args.jobs < 1 or grid.eval_every < 1:
        raise ConfigError("--rounds, --jobs and --eval-every must be >= 1 and --seeds non-empty")
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        grid = grid_from_args(args)
        return run_grid(grid, args)
    except FedCoEError as exc:
        print(f"benchmarks.accuracy: error: {exc}", file=sys.stderr)
        return 2


def run_grid(grid: Grid, args: argparse.Namespace) -> int:
    out: Path = args.out
    cache = args.cache or out / (
        "accuracy_cache_quick.jsonl" if args.quick else "accuracy_cache.jsonl"
    )
    fp = grid.fingerprint()
    done = load_cache(cache)
    jobs = grid.jobs()
    todo = [j for j in jobs if run_key(grid, *j) not in done]
    t0 = time.perf_counter()
    commit = git_commit()

    def meta() -> dict[str, Any]:
        finished = sum(run_key(grid, *j) in done for j in jobs)
        commits = sorted(
            {done[k].get("commit", "?") for j in jobs if (k := run_key(grid, *j)) in done}
        )
        return {
            "commit": commit,
            "run_commits": commits,
            "fingerprint": fp,
            "runs_total": len(jobs),
            "runs_done": finished,
            "complete": finished == len(jobs),
            "grid": grid.to_dict(),
        }

    print(
        f"accuracy grid: {len(jobs)} runs, {len(jobs) - len(todo)} cached in {cache}, "
        f"{len(todo)} to go, {args.jobs} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    if args.report_only and len(todo) == len(jobs):
        # the cache holds nothing for this source (e.g. the code changed since the grid ran):
        # rewriting the report now would replace real results with an empty table
        print(
            f"--report-only: none of the {len(jobs)} runs are cached for the current source; "
            f"keeping {out}/accuracy.md as it is (rerun the grid to refresh it)",
            file=sys.stderr,
        )
        return 2
    if not args.report_only and todo:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_job, grid, *j): j for j in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                s_name, algorithm, seed = futures[fut]
                rec = fut.result()
                rec["key"] = run_key(grid, s_name, algorithm, seed)
                rec["commit"] = commit
                append_cache(cache, rec)
                done[rec["key"]] = rec
                m = rec["metrics"]
                elapsed = time.perf_counter() - t0
                eta = elapsed / n * (len(todo) - n)
                print(
                    f"[{n}/{len(todo)}] {s_name} {algorithm} seed {seed}: "
                    f"global {m['global_acc']:.3f} personalized {m['personalized_acc']:.3f} "
                    f"cold {m['cold_start_acc']:.3f} ({m['wall_s']:.1f}s; elapsed "
                    f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)",
                    file=sys.stderr,
                    flush=True,
                )
                if n % 8 == 0:  # a readable partial report while the grid runs
                    write_report(grid, done, out, meta())
    write_report(grid, done, out, meta())
    m = meta()
    print(
        f"wrote {out}/accuracy.md, accuracy.json and PNGs ({m['runs_done']}/{m['runs_total']} runs)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
