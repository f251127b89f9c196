"""The accuracy benchmark: FedCoE against seven baselines on five non-IID settings, 3 seeds.

Settings: Fashion-MNIST at Dirichlet(0.1), Dirichlet(0.5) and two classes per client
(pathological shards), digits-shift and digits Dirichlet(0.1); algorithms: FedCoE, fedavg,
fedprox, local, fedavg-ft, ditto, fedrep, mixture, then FedCoE's ablations at fmnist-dir0.1.
Every run uses the same clients, rounds, local epochs and batch size, and is scored at the LAST
round (not the best). Each algorithm runs with its knobs from ``tuned.json``, which
``python -m benchmarks.tune`` chose on VALIDATION splits; the grid reads the test splits once,
for this report, so no number here was tuned on what it reports.

Each finished run is appended to a cache file (one JSON line) keyed by the run, the settings
it depends on and the declared numerics version of the code (``fedcoe_edge/numerics.py``), so
an interrupted grid resumes where it stopped; runs are
ordered seed-major, so a partial grid already covers every setting. Writes ``accuracy.json``,
``accuracy.md``, ``accuracy_<setting>.png`` (curves) and ``accuracy_<setting>_routing.png``
(FedCoE's client x expert routing) under ``--out``.

    python -m benchmarks.accuracy                 # the full grid (resumes from its cache)
    python -m benchmarks.accuracy --quick --out /tmp/acc   # seconds: a smoke test
    python -m benchmarks.accuracy --report-only   # rebuild the report from the cache
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
BASELINE_ALGORITHMS = MAIN_ALGORITHMS[1:]
# Personalized-FL baselines outside the default grid (docs/design.md, "Personalized
# baselines"): tuned by benchmarks.tune like the others, run with --algorithms; the default
# grid and its goals stay as published until their runs exist.
PFL_ALGORITHMS = ("fedavg_prior", "fedala", "feddbe")
ABLATION_ALGORITHMS = ("fedcoe-noaffinity", "fedcoe-nocoord", "fedcoe-nolocal", "fedcoe-full")
ABLATION_SETTINGS = ("fmnist-dir0.1",)  # ablations cost a full FedCoE run each: one setting
METRICS = ("global_acc", "personalized_acc", "cold_start_acc")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_TUNED = DEFAULT_OUT / "tuned.json"
DEFAULT_FRACTION = 0.1  # 6,000 Fashion-MNIST training images: the grid fits a 2-core machine
QUICK_FRACTION = 0.02
QUICK_GLOBAL_TEST = 1000  # --quick scores the global model on a stratified slice of this size
# the goals of the report (docs/benchmarks.md, "Accuracy")
MIN_SHARE = 0.10  # an expert "carries" routing mass from this share on
MIN_CARRYING_EXPERTS = 3
MIN_DISTINCT_SETS = 3
MAX_UPLOAD_VS_FEDAVG = 0.60


@dataclass(frozen=True)
class Setting:
    """One data setting of the grid; ``family`` names the dataset whose tuned knobs it uses."""

    name: str
    dataset: str
    partition: str
    alpha: float
    family: str
    shards_per_client: int = 2

    @property
    def uses_fraction(self) -> bool:
        """Only Fashion-MNIST is subsampled; digits is small enough whole."""
        return self.dataset == "fmnist"

    def describe(self) -> str:
        if self.partition == "natural":
            return f"{self.dataset}, one user per client (natural partition)"
        if self.partition == "dirichlet":
            part = f"labels Dirichlet(alpha={self.alpha})"
        elif self.partition == "shards":
            part = f"{self.shards_per_client} label shards per client (pathological)"
        else:
            part = f"labels {self.partition}"
        return f"{self.dataset}, {part}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("fmnist-dir0.1", "fmnist", "dirichlet", 0.1, "fmnist"),
        Setting("fmnist-dir0.5", "fmnist", "dirichlet", 0.5, "fmnist"),
        Setting("fmnist-shards2", "fmnist", "shards", 0.5, "fmnist", shards_per_client=2),
        Setting("digits-shift", "digits-shift", "dirichlet", 0.5, "digits"),
        Setting("digits-dir0.1", "digits", "dirichlet", 0.1, "digits"),
    )
}


def grid_model() -> ModelConfig:
    """The grid's model: narrow experts keep 9 algorithms x 5 settings x 3 seeds on 2 cores."""
    return ModelConfig(expert_hidden=32)


def grid_train() -> TrainConfig:
    """What every algorithm shares; the tuned knobs are applied on top."""
    return TrainConfig(local_epochs=2, batch_size=32)


def apply_knobs(train: TrainConfig, knobs: dict[str, Any]) -> TrainConfig:
    """``train`` with ``knobs`` set: TrainConfig fields directly, anything else (a strategy's
    own knob such as ``ditto_lambda``) into ``extra``, which is where strategies read it."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    direct = {k: v for k, v in knobs.items() if k in names and k != "extra"}
    extra = {**train.extra, **{k: v for k, v in knobs.items() if k not in names}}
    return dataclasses.replace(train, **direct, extra=extra)


def tuned_name(algorithm: str) -> str:
    """Whose tuned knobs an algorithm runs with: the ablations reuse FedCoE's, so they differ
    from FedCoE in one part only."""
    return "fedcoe" if algorithm.startswith("fedcoe") else algorithm


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
    eval_every: int = 5
    data_fraction: float = DEFAULT_FRACTION
    data_dir: str | None = None
    split: str = "test"
    model: ModelConfig = field(default_factory=grid_model)
    train: TrainConfig = field(default_factory=grid_train)
    # {family: {algorithm: {knob: value}}}; None: every algorithm at ``train`` (--untuned)
    tuned: dict[str, dict[str, dict[str, Any]]] | None = None
    ablation_seeds: list[int] | None = None  # None: the same seeds as the main grid
    ablation_settings: tuple[str, ...] = ABLATION_SETTINGS
    # None: the whole global test set; a number: a stratified slice of that many images
    # (``--quick``: evaluating a 2-round smoke run on all 10,000 Fashion-MNIST test images
    # was most of its time; docs/benchmarks.md, "Accuracy: FedCoE against seven baselines")
    global_test_samples: int | None = None

    def knobs(self, setting: str, algorithm: str) -> dict[str, Any]:
        """The tuned knobs of ``algorithm`` for the setting's dataset ({} when untuned)."""
        if self.tuned is None:
            return {}
        family = SETTINGS[setting].family
        try:
            return dict(self.tuned[family][tuned_name(algorithm)])
        except KeyError:
            raise ConfigError(
                f"tuned knobs missing for {tuned_name(algorithm)} on {family}: run "
                "`python -m benchmarks.tune` first (or pass --untuned)"
            ) from None

    def train_for(self, setting: str, algorithm: str) -> TrainConfig:
        return apply_knobs(self.train, self.knobs(setting, algorithm))

    def fraction_for(self, setting: str) -> float:
        return self.data_fraction if SETTINGS[setting].uses_fraction else 1.0

    def fingerprint(self, setting: str, algorithm: str) -> str:
        """Hash of everything a run depends on. For algorithms outside FedCoE's family the
        FedCoE-only loss and exchange knobs are left out: they cannot change those runs."""
        train = self.train_for(setting, algorithm).to_dict()
        if not is_fedcoe_family(algorithm):
            train = {k: v for k, v in train.items() if k not in FEDCOE_ONLY_TRAIN}
        doc = {
            "setting": SETTINGS[setting].to_dict(),
            "rounds": self.rounds,
            "clients": self.clients,
            "new_clients": self.new_clients,
            "min_samples": self.min_samples,
            "eval_every": self.eval_every,
            "data_fraction": self.fraction_for(setting),
            "split": self.split,
            "model": self.model.to_dict(),
            "train": train,
        }
        if self.global_test_samples is not None:  # absent otherwise: existing keys hold
            doc["global_test_samples"] = self.global_test_samples
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def ablation_seed_list(self) -> list[int]:
        return self.seeds if self.ablation_seeds is None else self.ablation_seeds

    def jobs(self) -> list[tuple[str, str, int]]:
        """(setting, algorithm, seed), seed-major, main algorithms before ablations."""
        out = [(s, a, seed) for seed in self.seeds for s in self.settings for a in self.algorithms]
        out += [
            (s, a, seed)
            for seed in self.ablation_seed_list()
            for s in self.settings
            if s in self.ablation_settings
            for a in self.ablations
        ]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "algorithms": self.algorithms,
            "ablations": self.ablations,
            "ablation_settings": list(self.ablation_settings),
            "seeds": self.seeds,
            "ablation_seeds": self.ablation_seeds,
            "rounds": self.rounds,
            "clients": self.clients,
            "new_clients": self.new_clients,
            "min_samples": self.min_samples,
            "eval_every": self.eval_every,
            "data_fraction": self.data_fraction,
            "global_test_samples": self.global_test_samples,
            "split": self.split,
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "tuned": self.tuned,
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
        "capacity_slack",
        "balance_rate",
        "cold_start_mass",
    }
)

# config values are in the grid fingerprint, so config.py itself is not hashed
def run_key(grid: Grid, setting: str, algorithm: str, seed: int) -> str:
    """Cache key: the run, every setting it depends on (``Grid.fingerprint``) and the
    declared numerics version of the code (``fedcoe_edge.numerics.NUMERICS_VERSION``), not
    the code's source: moving code keeps the cache, a change to what runs compute bumps the
    version and re-runs everything (docs/benchmarks.md, "Caches")."""
    from fedcoe_edge.numerics import NUMERICS_VERSION

    return (
        f"{setting}|{algorithm}|{seed}|{grid.fingerprint(setting, algorithm)}"
        f"|numerics-v{NUMERICS_VERSION}"
    )


def is_fedcoe_family(algorithm: str) -> bool:
    from fedcoe_edge.strategies import STRATEGIES
    from fedcoe_edge.strategies.fedcoe import FedCoE

    return issubclass(STRATEGIES[algorithm], FedCoE)


# --- one run (in a worker process) --------------------------------------------------------
def run_job(grid: Grid, setting_name: str, algorithm: str, seed: int) -> dict[str, Any]:
    """Build the setting's federation for ``seed`` and train ``algorithm``; JSON-ready record
    with its metrics, curve, diagnostics and both MAC counts (so the report needs no model)."""
    import torch

    from fedcoe_edge.data import make_federation
    from fedcoe_edge.simulation import SimulationConfig, fit_model_to_data, run_one
    from fedcoe_edge.strategies.fedavg import active_macs, plain_config

    torch.set_num_threads(1)  # the machine is shared: one core per worker
    s = SETTINGS[setting_name]
    fraction = grid.fraction_for(setting_name)
    fed = make_federation(
        s.dataset,
        s.partition,
        grid.clients,
        grid.new_clients,
        seed,
        s.alpha,
        grid.min_samples,
        shards_per_client=s.shards_per_client,
        data_fraction=fraction,
        data_dir=grid.data_dir,
    )
    fed = limit_global_test(fed, grid.global_test_samples, seed)
    model = fit_model_to_data(grid.model, fed)
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
        data_fraction=fraction,
        data_dir=grid.data_dir,
        eval_every=grid.eval_every,
        split=grid.split,
        model=model,
        train=grid.train_for(setting_name, algorithm),
    )
    cfg.validate()
    result = run_one(algorithm, fed, cfg, seed)
    return {
        "setting": setting_name,
        "algorithm": algorithm,
        "seed": seed,
        "knobs": grid.knobs(setting_name, algorithm),
        "metrics": result.metrics,
        "curve": result.curve,
        "diagnostics": jsonable(result.diagnostics),
        "macs": {"fedcoe": int(active_macs(model)), "baseline": int(active_macs(plain_config(model)))},
    }


def limit_global_test(fed: Any, samples: int | None, seed: int) -> Any:
    """``fed`` with a stratified slice of ``samples`` global test images (every class kept
    in proportion), or unchanged when ``samples`` is None or the set is no larger."""
    import dataclasses

    from fedcoe_edge.data.federation import stratified_subset

    n = len(fed.y_global_test)
    if samples is None or n <= samples:
        return fed
    keep = stratified_subset(fed.y_global_test, samples / n, np.random.default_rng([seed, 7]))
    return dataclasses.replace(fed, x_global_test=fed.x_global_test[keep],
                               y_global_test=fed.y_global_test[keep])


def jsonable(value: Any) -> Any:
    """numpy scalars and arrays as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


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
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def append_cache(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a") as fh:
        fh.write(("\n" if torn else "") + json.dumps(record) + "\n")  # never glue onto a torn line
        fh.flush()
        os.fsync(fh.fileno())


def run_pool(
    todo: Sequence[Any],
    work: Callable[..., dict[str, Any]],
    args_of: Callable[[Any], tuple[Any, ...]],
    on_done: Callable[[Any, dict[str, Any]], None],
    jobs: int,
    desc: str,
    progress: bool = True,
) -> None:
    """Run ``work(*args_of(job))`` for every job on ``jobs`` worker processes with a progress
    bar, handing each finished record to ``on_done`` in the parent (the only cache writer).
    A run that raises stops the pool after the runs already finished are recorded."""
    from tqdm import tqdm

    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(work, *args_of(j)): j for j in todo}
        bar = tqdm(total=len(todo), desc=desc, unit="run", disable=not progress, file=sys.stderr)
        try:
            for fut in as_completed(futures):
                on_done(futures[fut], fut.result())
                bar.update(1)
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            bar.close()


# --- summary and report ---------------------------------------------------------------------
def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds with ``<metric>_std`` (population std; 0.0 with one seed)."""
    out: dict[str, Any] = {}
    for key in records[0]["metrics"]:
        values = np.array([r["metrics"][key] for r in records], dtype=np.float64)
        out[key] = float(values.mean())
        if key in METRICS:
            out[f"{key}_std"] = float(values.std())
    out["seeds"] = float(len(records))
    out["seed_list"] = [r["seed"] for r in records]
    if records[0].get("knobs"):
        out["knobs"] = records[0]["knobs"]
    return out


DIAG_KEYS = (
    "expert_share",
    "global_expert_share",
    "distinct_expert_sets",
    "gate_entropy",
    "gate_entropy_norm",
    "personal_vs_global_path",
    "global_path_acc",
    "local_acc",
    "personal_acc",
)


def summarize_diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds of FedCoE's diagnostics (``DIAG_KEYS``; the library's averaging)."""
    from fedcoe_edge.simulation import mean_diagnostics

    diags = [r.get("diagnostics", {}) for r in records]
    return mean_diagnostics([{k: d[k] for k in DIAG_KEYS if k in d} for d in diags])


def convergence(records: Sequence[dict[str, Any]], rounds: int, key: str) -> dict[str, Any] | None:
    """Change of ``key`` (mean over seeds) over the last quarter of the rounds: from the last
    evaluated round at or before 75% of the run to the final round. Near zero means flat."""
    start_round = math.floor(0.75 * rounds)
    deltas, first = [], None
    for r in records:
        pts = [p for p in r["curve"] if key in p]
        if len(pts) < 2:
            continue
        early = [p for p in pts[:-1] if p["round"] <= start_round] or pts[:1]
        deltas.append(pts[-1][key] - early[-1][key])
        first = int(early[-1]["round"])
    if not deltas:
        return None
    return {"from_round": first, "to_round": rounds, "delta": float(np.mean(deltas))}


def records_for(grid: Grid, done: dict[str, dict[str, Any]], setting: str, algorithm: str,
                seeds: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for seed in seeds:
        try:
            k = run_key(grid, setting, algorithm, seed)
        except ConfigError:  # untuned algorithm: nothing of it can be cached
            return []
        if k in done:
            out.append(done[k])
    return out


def build_document(
    grid: Grid, done: dict[str, dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """accuracy.json: ``{"settings": {setting: {"config", "rounds", "algorithms": {alg:
    summary}, "diagnostics": {fedcoe-family alg: means}, "convergence", "macs"}}}``."""
    from fedcoe_edge.strategies import shares_model

    settings: dict[str, Any] = {}
    for s_name in grid.settings:
        s = SETTINGS[s_name]
        algos: dict[str, Any] = {}
        diags: dict[str, Any] = {}
        conv: dict[str, Any] = {}
        macs: dict[str, int] | None = None
        ablations = grid.ablations if s_name in grid.ablation_settings else []
        for algorithm in [*grid.algorithms, *ablations]:
            seeds = grid.seeds if algorithm in grid.algorithms else grid.ablation_seed_list()
            recs = records_for(grid, done, s_name, algorithm, seeds)
            if not recs:
                continue
            summary = summarize(recs)
            if not shares_model(algorithm):
                summary["no_shared_model"] = True
            algos[algorithm] = summary
            key = "global_acc" if shares_model(algorithm) else "personalized_acc"
            c = convergence(recs, grid.rounds, key)
            if c is not None:
                conv[algorithm] = {**c, "metric": key}
            if is_fedcoe_family(algorithm) and any(r.get("diagnostics") for r in recs):
                diags[algorithm] = summarize_diagnostics(recs)
            macs = macs or recs[0].get("macs")
        block: dict[str, Any] = {
            "config": {
                **s.to_dict(),
                "clients": grid.clients,
                "new_clients": grid.new_clients,
                "rounds": grid.rounds,
                "seeds": grid.seeds,
                "min_samples": grid.min_samples,
                "data_fraction": grid.fraction_for(s_name),
                "global_test_samples": grid.global_test_samples,
                "split": grid.split,
                "model": grid.model.to_dict(),
                "train": grid.train.to_dict(),
            },
            "rounds": grid.rounds,
            "algorithms": algos,
            "diagnostics": diags,
            "convergence": conv,
        }
        if macs:
            block["macs"] = {**macs, "ratio": macs["baseline"] / macs["fedcoe"]}
        if ablations:
            # FedCoE on exactly the ablations' seeds, so ablation rows compare like with like
            ref = records_for(grid, done, s_name, "fedcoe", grid.ablation_seed_list())
            if ref:
                block["fedcoe_on_ablation_seeds"] = summarize(ref)
        settings[s_name] = block
    return {"meta": meta, "settings": settings}


def cell(m: dict[str, Any] | None, key: str, best: float | None) -> str:
    if m is None:
        return "not run"
    if m.get("no_shared_model") and key != "personalized_acc":
        return "n/a"
    text = f"{m[key]:.3f} ± {m[key + '_std']:.3f}"
    return f"**{text}**" if best is not None and np.isclose(m[key], best) else text


def setting_table(algos: dict[str, Any], names: Sequence[str]) -> list[str]:
    """Mean ± std over seeds, best per column in bold, bytes as ratios to FedAvg's; an
    algorithm not yet run shows as "not run" rather than disappearing."""
    best: dict[str, float | None] = {}
    for key in METRICS:
        vals = [
            algos[n][key]
            for n in names
            if n in algos and not (algos[n].get("no_shared_model") and key != "personalized_acc")
        ]
        best[key] = max(vals) if vals else None
    ref = algos.get("fedavg")
    lines = [
        "| algorithm | global acc | personalized acc | cold-start acc | up KB/round (vs FedAvg) | "
        "down KB/round (vs FedAvg) | wall s/run | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        m = algos.get(n)
        if m is None:
            lines.append(f"| {n} | not run | not run | not run | - | - | - | 0 |")
            continue

        def kb(key: str, m: dict[str, Any] = m) -> str:
            ratio = f" ({m[key] / ref[key]:.2f}x)" if ref and ref.get(key) else ""
            return f"{m[key] / 1024:.1f}{ratio}"

        lines.append(
            f"| {n} | {cell(m, 'global_acc', best['global_acc'])} "
            f"| {cell(m, 'personalized_acc', best['personalized_acc'])} "
            f"| {cell(m, 'cold_start_acc', best['cold_start_acc'])} "
            f"| {kb('bytes_up_per_client_round')} | {kb('bytes_down_per_client_round')} "
            f"| {m['wall_s']:.1f} | {int(m['seeds'])} |"
        )
    return lines


@dataclass
class Goal:
    """One goal row: ``status`` is "met", "NOT met" or "pending" (a run it needs is missing
    or has fewer seeds than the grid; provisional numbers are then shown, never a verdict)."""

    goal: str
    status: str
    detail: str


def goals(
    algos: dict[str, Any],
    diag: dict[str, Any] | None,
    seeds: int,
    baselines: Sequence[str] = BASELINE_ALGORITHMS,
    routing_goals: bool = False,
) -> list[Goal]:
    """The report's goals for one setting, from mean-over-seeds numbers: FedCoE personalized
    >= the best baseline's; global >= FedAvg's and >= FedProx's; cold start >= every baseline
    with a shared model; with ``routing_goals`` at least 3 experts carrying >= 10% of routing
    mass and >= 3 distinct expert sets; upload <= 60% of FedAvg's."""
    from fedcoe_edge.strategies import shares_model

    f = algos.get("fedcoe")
    out: list[Goal] = []

    def missing(names: Sequence[str]) -> list[str]:
        return [n for n in names if n not in algos or int(algos[n]["seeds"]) < seeds]

    def compare(goal: str, key: str, rivals: Sequence[str], note: str = "") -> None:
        lack = missing(["fedcoe", *rivals])
        have = [n for n in rivals if n in algos]
        if f is None or not have:
            out.append(Goal(goal, "pending", f"needs {', '.join(lack)} (not run){note}"))
            return
        top = max(have, key=lambda n: algos[n][key])
        margin = f[key] - algos[top][key]
        detail = f"FedCoE {f[key]:.3f} vs {top} {algos[top][key]:.3f}: margin {margin:+.3f}{note}"
        if lack:
            out.append(Goal(goal, "pending", f"{detail} (provisional; waiting for "
                                              f"{', '.join(lack)} at {seeds} seeds)"))
        else:
            out.append(Goal(goal, "met" if margin >= -1e-9 else "NOT met", detail))

    compare("personalized >= best baseline", "personalized_acc", list(baselines))
    compare("global >= FedAvg", "global_acc", ["fedavg"])
    compare("global >= FedProx", "global_acc", ["fedprox"])
    shared = [n for n in baselines if shares_model(n)]
    excluded = [n for n in baselines if not shares_model(n)]
    note = (f" ({', '.join(excluded)} excluded: no shared model to give a new client)"
            if excluded else "")
    compare("cold start >= every baseline", "cold_start_acc", shared, note)
    if routing_goals:
        lack = missing(["fedcoe"])
        if not diag or "expert_share" not in diag:
            out.append(Goal(f"experts carrying >= {MIN_SHARE:.0%} of routing >= "
                            f"{MIN_CARRYING_EXPERTS}", "pending", "FedCoE diagnostics not run"))
            out.append(Goal(f"distinct expert sets >= {MIN_DISTINCT_SETS}", "pending",
                            "FedCoE diagnostics not run"))
        else:
            share = diag["expert_share"]
            carrying = sum(x >= MIN_SHARE for x in share)
            shares = ", ".join(f"{x:.2f}" for x in share)
            sets = int(diag["distinct_expert_sets"])
            for goal, value, need, detail in (
                (f"experts carrying >= {MIN_SHARE:.0%} of routing >= {MIN_CARRYING_EXPERTS}",
                 carrying, MIN_CARRYING_EXPERTS,
                 f"{carrying} of {len(share)} (shares {shares})"),
                (f"distinct expert sets >= {MIN_DISTINCT_SETS}", sets, MIN_DISTINCT_SETS,
                 f"{sets} sets"),
            ):
                detail = f"{detail}: margin {value - need:+d}"
                status = "pending" if lack else ("met" if value >= need else "NOT met")
                out.append(Goal(goal, status, detail + (" (provisional)" if lack else "")))
    key = "bytes_up_per_client_round"
    lack = missing(["fedcoe", "fedavg"])
    goal = f"upload <= {MAX_UPLOAD_VS_FEDAVG:.0%} of FedAvg's"
    if f is None or "fedavg" not in algos:
        out.append(Goal(goal, "pending", f"needs {', '.join(lack)} (not run)"))
    else:
        ratio = f[key] / algos["fedavg"][key]
        detail = (f"FedCoE {f[key] / 1024:.1f} KB vs FedAvg {algos['fedavg'][key] / 1024:.1f} "
                  f"KB = {ratio:.0%}: margin {MAX_UPLOAD_VS_FEDAVG - ratio:+.0%} of FedAvg's")
        status = "pending" if lack else ("met" if ratio <= MAX_UPLOAD_VS_FEDAVG + 1e-9 else "NOT met")
        out.append(Goal(goal, status, detail))
    return out


def goals_table(rows: Sequence[Goal]) -> list[str]:
    lines = ["| goal | status | numbers (mean over seeds) |", "|---|---|---|"]
    lines += [f"| {g.goal} | **{g.status}** | {g.detail} |" for g in rows]
    return lines


def setting_goals(grid: Grid, s_name: str, block: dict[str, Any]) -> list[Goal] | None:
    """Goals apply to the Fashion-MNIST settings; the routing goals to its Dir(0.1) setting."""
    if SETTINGS[s_name].family != "fmnist":
        return None
    return goals(
        block["algorithms"],
        block.get("diagnostics", {}).get("fedcoe"),
        len(grid.seeds),
        [a for a in grid.algorithms if a != "fedcoe"],
        routing_goals=s_name == "fmnist-dir0.1",
    )


def summary_table(grid: Grid, doc: dict[str, Any]) -> list[str]:
    """One row per Fashion-MNIST setting: how many goals are met, not met, pending."""
    lines = ["| setting | met | NOT met | pending |", "|---|---|---|---|"]
    for s_name, block in doc["settings"].items():
        rows = setting_goals(grid, s_name, block)
        if rows is None:
            continue
        by = {st: [g.goal for g in rows if g.status == st] for st in ("met", "NOT met", "pending")}
        lines.append(
            f"| {s_name} | {len(by['met'])} | {len(by['NOT met'])}"
            f"{': ' + '; '.join(by['NOT met']) if by['NOT met'] else ''} | {len(by['pending'])} |"
        )
    return lines


NOTES = (
    "Knobs: every algorithm (FedCoE and each baseline) got the same budget of 4 configurations, "
    "chosen by `python -m benchmarks.tune` on VALIDATION accuracy (mean of global and "
    "personalized; personalized alone for local) at one setting per dataset (fmnist-dir0.1, "
    "digits-dir0.1), seed 0, and reused for that dataset's other settings and seeds; the "
    "ablations reuse FedCoE's knobs. See tuning.md. Test splits are read once, here.",
    "Cold start = the new clients' accuracy with no gradient step. For baselines it is their "
    "global model (FedAvg's for FedAvg-FT, Ditto and the mixture, whose global models are "
    "trained exactly as FedAvg's); FedCoE routes with the gate alone on the new client's "
    "unlabeled inputs and downloads the fewest experts carrying 90% of that routing prior "
    "(at least top_k; `train.cold_start_mass`). Local-only has nothing to give a new client (n/a), so the cold-start goal "
    "leaves it out.",
    "FedRep's global and cold-start figures use its shared body with the mean of the clients' "
    "private heads (clients upload heads for that; counted in its bytes up).",
    "Bytes are per client per round, safetensors-serialised, as the wire would carry them. "
    "FedCoE sends the gate, shared expert and only the client's m experts; baselines send the "
    "whole plain network. Why the 60% goal is out of reach under this protocol: the experts "
    "are dense CNNs, so parameters grow with MACs; the baseline is sized to the MACs of "
    "FedCoE's active path (shared + top_k experts), so it holds about as many parameters as "
    "that path, and a FedCoE client trains and sends at least the path it uses (m >= top_k) "
    "plus the gate. The per-expert and fixed parts are in the line under each table where "
    "the full-exchange ablation ran. Both sides would shrink alike on the agents' int8-delta "
    "wire, so the ratio stays.",
    "Diagnostics (FedCoE family, mean over seeds, on the clients' test splits): expert share = "
    "routing mass per global expert as devices route (held experts, top-k); gate entropy of "
    "the server's gate on the global test set; distinct expert sets = how many different "
    "expert sets the clients hold; the personal mixture beside the global path alone and the "
    "local experts alone.",
    "Convergence: change of each algorithm's global accuracy (personalized for local; mean "
    "over seeds) over the last quarter of the rounds. Near zero means the curve is flat at "
    "the reported round; a clearly positive change means more rounds would still help. "
    "`make accuracy-long` re-runs FedCoE and the seven baselines on the Fashion-MNIST "
    "settings at 60 rounds (seeds 0, 1, 2) into long60/accuracy.md beside this report.",
)


def upload_split(algos: dict[str, dict[str, Any]], m: int, k: int, top_k: int) -> str | None:
    """What one global expert and the fixed part (gate + shared expert) cost on the way up,
    from the partial (``m`` experts) and full-exchange (``k`` experts) rows of one setting."""
    key = "bytes_up_per_client_round"
    part, full, base = (algos.get(a, {}).get(key) for a in ("fedcoe", "fedcoe-full", "fedavg"))
    if not (part and full and base) or k <= m:
        return None
    per_expert = (full - part) / (k - m)
    fixed = part - m * per_expert
    return (f"Upload split: each global expert {per_expert / 1024:.1f} KB, gate + shared expert "
            f"{fixed / 1024:.1f} KB; FedCoE sends {m} of {k} experts ({part / 1024:.1f} KB), the "
            f"MAC-matched baseline network is {base / 1024:.1f} KB. The fixed part plus the "
            f"top_k experts a device needs is already {(fixed + top_k * per_expert) / base:.0%} of "
            f"the baseline; the 60% goal needs a different expert shape (see How to read this).")


def render_markdown(doc: dict[str, Any], grid: Grid) -> str:
    """The report: header, goal summary, one section per setting, how to read it.

    One function per section, in report order.
    """
    lines = _header_lines(doc["meta"], grid)
    lines += ["## Summary: goals on the Fashion-MNIST settings", "", *summary_table(grid, doc), ""]
    for s_name, block in doc["settings"].items():
        lines += _setting_lines(grid, s_name, block)
    lines += ["## How to read this", "", *(f"- {n}" for n in NOTES), ""]
    return "\n".join(lines)


def _header_lines(meta: dict[str, Any], grid: Grid) -> list[str]:
    """Title, where the runs come from and what they cost, and the protocol they share."""
    untuned = grid.tuned is None
    return [
        "# Accuracy benchmark: FedCoE vs baselines",
        "",
        f"Generated by `python -m benchmarks.accuracy`; runs from commit(s) "
        f"{', '.join(f'`{c}`' for c in meta.get('run_commits', [])) or '?'}; "
        f"{meta['runs_done']}/{meta['runs_total']} runs done"
        f"{'' if meta['complete'] else ' (PARTIAL: the grid did not finish; missing cells say not run)'}.",
        "",
        f"CPU time: {meta['cpu_s'] / 3600:.2f} h summed over the {meta['runs_done']} cached runs "
        f"(one core each); this invocation took {meta['invocation_wall_s'] / 60:.1f} min of "
        "wall clock.",
        "",
        f"Protocol: {grid.clients} training clients + {grid.new_clients} new (cold-start) "
        f"clients, {grid.rounds} rounds, every client every round, {grid.train.local_epochs} "
        f"local epochs, batch {grid.train.batch_size}, the same for every algorithm; "
        f"Fashion-MNIST uses a stratified {grid.data_fraction:g} of its train split (the "
        f"official test split is the global test set); seeds {grid.seeds}; model: "
        f"expert_hidden={grid.model.expert_hidden}, K={grid.model.num_global_experts}, "
        f"top_k={grid.model.top_k}. "
        + ("UNTUNED: every algorithm at the shared defaults (--untuned). " if untuned else
           "Each algorithm at its knobs tuned on validation splits (tuned.json). ")
        + "Accuracy on the TEST splits at the LAST round, mean ± std across seeds; best per "
        "column in bold. Local-only has no shared model, so its global and cold-start cells "
        "are n/a.",
        "",
    ]


def _setting_lines(grid: Grid, s_name: str, block: dict[str, Any]) -> list[str]:
    """One setting: its table, then each sub-section it has data for, then its figures."""
    algos = block["algorithms"]
    lines = [f"## {s_name}: {SETTINGS[s_name].describe()}", ""]
    lines += setting_table(algos, grid.algorithms)
    lines.append("")
    lines += _macs_lines(block)
    split = upload_split(algos, grid.train_for(s_name, "fedcoe").experts_per_client,
                         grid.model.num_global_experts, grid.model.top_k)
    if split:
        lines += [split, ""]
    lines += _convergence_lines(grid, block)
    rows = setting_goals(grid, s_name, block)
    if rows is not None:
        lines += ["Goals:", "", *goals_table(rows), ""]
    lines += _diagnostics_lines(block)
    lines += _ablation_lines(grid, s_name, block)
    lines += [f"![{s_name} curves](accuracy_{safe_name(s_name)}.png)", ""]
    if "fedcoe" in algos:
        lines += [f"![{s_name} routing](accuracy_{safe_name(s_name)}_routing.png)", ""]
    return lines


def _macs_lines(block: dict[str, Any]) -> list[str]:
    """Inference MACs of FedCoE's active path beside the MAC-matched baseline network."""
    macs = block.get("macs")
    if not macs:
        return []
    return [
        f"MACs per input at inference: FedCoE active path {macs['fedcoe'] / 1e6:.3f}M, "
        f"each baseline's network {macs['baseline'] / 1e6:.3f}M (ratio baseline / "
        f"FedCoE {macs['ratio']:.3f}).",
        "",
    ]


def _convergence_lines(grid: Grid, block: dict[str, Any]) -> list[str]:
    """Each main algorithm's accuracy change over the last quarter of the rounds."""
    conv = block.get("convergence", {})
    if not conv:
        return []
    parts = [f"{n} {c['delta']:+.3f}" for n, c in conv.items() if n in grid.algorithms]
    c0 = next(iter(conv.values()))
    return [
        f"Convergence (accuracy change from round {c0['from_round']} to "
        f"{c0['to_round']}, mean over seeds): {', '.join(parts)}.",
        "",
    ]


def _diagnostics_lines(block: dict[str, Any]) -> list[str]:
    """FedCoE's routing diagnostics, when the setting ran FedCoE."""
    from fedcoe_edge.simulation import diagnostics_table

    diags = block.get("diagnostics", {})
    if not diags:
        return []
    return ["FedCoE diagnostics (mean over seeds):", "", *diagnostics_table(diags), ""]


def _ablation_lines(grid: Grid, s_name: str, block: dict[str, Any]) -> list[str]:
    """The ablations beside FedCoE on the ablations' own seeds, at the ablation settings."""
    if s_name not in grid.ablation_settings or not grid.ablations:
        return []
    algos = block["algorithms"]
    ref = block.get("fedcoe_on_ablation_seeds", algos.get("fedcoe"))
    lines = ["Ablations (what each part of FedCoE buys; the fedcoe row is FedCoE on the "
             "ablations' own seeds):", ""]
    lines += setting_table({**algos, "fedcoe": ref} if ref else algos, ["fedcoe", *grid.ablations])
    lines.append("")
    return lines


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_")


def write_report(
    grid: Grid, done: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]
) -> dict[str, Any]:
    from fedcoe_edge.io import atomic_write_text
    from fedcoe_edge.plots import plot_curves, plot_routing_heatmap
    from fedcoe_edge.strategies import shares_model

    doc = build_document(grid, done, meta)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "accuracy.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / "accuracy.md", render_markdown(doc, grid) + "\n")
    for s_name in grid.settings:
        curves = {}
        for algorithm in grid.algorithms:
            recs = records_for(grid, done, s_name, algorithm, grid.seeds)
            if recs:
                curves[algorithm] = [r["curve"] for r in recs]
        if curves:
            plot_curves(
                curves,
                out / f"accuracy_{safe_name(s_name)}.png",
                title=f"{s_name}: {SETTINGS[s_name].describe()} (test splits)",
                chance=1.0 / 10,  # every grid dataset has 10 classes
                no_global=[a for a in curves if not shares_model(a)],
            )
        first = records_for(grid, done, s_name, "fedcoe", grid.seeds[:1])
        matrix = first[0].get("diagnostics", {}).get("routing_matrix") if first else None
        if matrix:
            plot_routing_heatmap(
                matrix,
                out / f"accuracy_{safe_name(s_name)}_routing.png",
                title=f"FedCoE routing, {s_name}, seed {grid.seeds[0]}",
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


def load_tuned(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """The ``{dataset: {algorithm: knobs}}`` part of tune.py's tuned.json."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: run `python -m benchmarks.tune` first (or pass --untuned)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None
    tuned = doc.get("tuned") if isinstance(doc, dict) else None
    if not isinstance(tuned, dict):
        raise ConfigError(f"{path} has no 'tuned' section: rerun `python -m benchmarks.tune`")
    return tuned


# --- command line ---------------------------------------------------------------------------
def names(text: str) -> list[str]:
    # commas inside parentheses belong to a name: synthetic(1,1)
    return [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in names(text)]
    except ValueError:
        raise ConfigError(f"seeds must be comma-separated integers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description="Run the accuracy grid (settings x algorithms x seeds, then FedCoE ablations) "
        "with each algorithm's tuned knobs and write accuracy.md, accuracy.json, curve and "
        "routing PNGs. Finished runs are cached, so re-running resumes a half-done grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=30, help="federated rounds per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated settings")
    p.add_argument("--algorithms", default=",".join(MAIN_ALGORITHMS), help="comma-separated")
    p.add_argument(
        "--ablations",
        default=",".join(ABLATION_ALGORITHMS),
        help="comma-separated FedCoE variants, run at fmnist-dir0.1 only ('' for none)",
    )
    p.add_argument("--ablation-seeds", default=None,
                   help="seeds for the ablations (default: --seeds)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--new-clients", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=5, help="rounds between curve points")
    p.add_argument("--data-fraction", type=float, default=DEFAULT_FRACTION,
                   help="stratified share of Fashion-MNIST's train split (1 = all 60,000)")
    p.add_argument("--data-dir", default=None, help="where the Fashion-MNIST IDX files are")
    p.add_argument("--tuned", type=Path, default=DEFAULT_TUNED,
                   help="knobs chosen by `python -m benchmarks.tune`")
    p.add_argument("--untuned", action="store_true",
                   help="run every algorithm at the shared defaults instead of tuned.json")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
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
        help=f"smoke test: 2 rounds, 6+1 clients, seed 0, {QUICK_FRACTION:g} of Fashion-MNIST, "
        f"{QUICK_GLOBAL_TEST} global test images, untuned",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the cache"
    )
    return p.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> Grid:
    from fedcoe_edge.strategies import STRATEGIES

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
        data_fraction=args.data_fraction,
        data_dir=args.data_dir,
    )
    if args.quick:
        grid.rounds, grid.clients, grid.new_clients, grid.seeds = 2, 6, 1, [0]
        grid.eval_every, grid.data_fraction, grid.ablation_seeds = 1, QUICK_FRACTION, None
        grid.global_test_samples = QUICK_GLOBAL_TEST
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
    from fedcoe_edge.data.federation import check_data_fraction

    check_data_fraction(grid.data_fraction, "--data-fraction")
    if not (args.untuned or args.quick):
        grid.tuned = load_tuned(args.tuned)
        for s, a, _ in grid.jobs():
            grid.knobs(s, a)  # one line naming what tuned.json lacks, before any run
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
    done = load_cache(cache)
    jobs = grid.jobs()
    todo = [j for j in jobs if run_key(grid, *j) not in done]
    t0 = time.perf_counter()
    commit = git_commit()

    def meta() -> dict[str, Any]:
        recs = [done[k] for j in jobs if (k := run_key(grid, *j)) in done]
        return {
            "commit": commit,
            "run_commits": sorted({r.get("commit", "?") for r in recs}),
            "runs_total": len(jobs),
            "runs_done": len(recs),
            "complete": len(recs) == len(jobs),
            "cpu_s": float(sum(r["metrics"]["wall_s"] for r in recs)),
            "invocation_wall_s": time.perf_counter() - t0,
            "grid": grid.to_dict(),
        }

    print(
        f"accuracy grid: {len(jobs)} runs, {len(jobs) - len(todo)} cached in {cache}, "
        f"{len(todo)} to go, {args.jobs} worker(s)",
        file=sys.stderr,
        flush=True,
    )
    if args.report_only and len(todo) == len(jobs):
        # the cache holds nothing at this numerics version (it was bumped since the grid ran):
        # rewriting the report now would replace real results with an empty table
        print(
            f"--report-only: none of the {len(jobs)} runs are cached at this numerics version; "
            f"keeping {out}/accuracy.md as it is (rerun the grid to refresh it)",
            file=sys.stderr,
        )
        return 2
    if not args.report_only and todo:
        finished = 0

        def on_done(job: tuple[str, str, int], rec: dict[str, Any]) -> None:
            nonlocal finished
            rec["key"] = run_key(grid, *job)
            rec["commit"] = commit
            append_cache(cache, rec)
            done[rec["key"]] = rec
            finished += 1
            if finished % 8 == 0:  # a readable partial report while the grid runs
                write_report(grid, done, out, meta())

        run_pool(todo, run_job, lambda j: (grid, *j), on_done, args.jobs, "accuracy grid",
                 progress=not args.no_progress)
    write_report(grid, done, out, meta())
    m = meta()
    print(
        f"wrote {out}/accuracy.md, accuracy.json and PNGs ({m['runs_done']}/{m['runs_total']} "
        f"runs; {m['cpu_s'] / 3600:.2f} CPU h in cached runs, this invocation "
        f"{m['invocation_wall_s'] / 60:.1f} min)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
