"""In-process federation: the embedded default and the reference for every deployment.

The loop is the one the MQTT coordinator runs (configure -> clients -> aggregate), with the
clients called in-process. Bytes are the safetensors-serialised size of what would travel,
counted per task and per result, not estimated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as st_save

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import Federation, make_federation
from fedcoe_edge.data.federation import check_data_fraction
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.health import chance_warning, loss_warning, update_warning
from fedcoe_edge.strategies import STRATEGIES, Strategy, make_strategy
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask
from fedcoe_edge.training import accuracy

log = logging.getLogger(__name__)

METRIC_KEYS = ("global_acc", "personalized_acc", "cold_start_acc")

# A malicious client, injected at the result level (benchmarks/robustness.py): called with
# the strategy, the task, the honest result, the client's private state from before the
# round and its data; returns the result the server receives (the honest one to pass), or
# None to send nothing that round (a device that never reports). The client keeps its
# honest private state, so its own model is not what is attacked.
Attack = Callable[[Strategy, ClientTask, ClientResult, "Arrays | None", ClientData],
                  "ClientResult | None"]

# One round's client training (docs/engines.md, "Ray"): called with the algorithm's name, the
# server's strategy and the round's (task, private state, data) in task order; returns, in the
# same order, (the result the server gets, or None for one refused on its way back, and the
# client's private state after the round). In this process by default; a Ray cluster with
# fedcoe_edge.ray_backend.RayExecutor.
ClientJob = tuple[ClientTask, "Arrays | None", ClientData]
ClientExecutor = Callable[[str, Strategy, Sequence[ClientJob]],
                          "list[tuple[ClientResult | None, Arrays | None]]"]


def run_clients_here(algorithm: str, strategy: Strategy,
                     jobs: Sequence[ClientJob]) -> list[tuple[ClientResult | None, Arrays | None]]:
    """The default :data:`ClientExecutor`: each client's ``client_update`` in this process."""
    return [strategy.client_update(task, local, data) for task, local, data in jobs]


@dataclass
class SimulationConfig:
    """One experiment: data, federation size, algorithms and seeds."""

    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    clients: int = 20
    new_clients: int = 4
    rounds: int = 30
    algorithms: list[str] = field(default_factory=lambda: ["fedcoe", "fedavg"])
    seeds: list[int] = field(default_factory=lambda: [0])
    min_samples: int = 20
    data_fraction: float = 1.0  # stratified share of the dataset's train split used (fmnist: 0.1 fits 2 cores)
    data_dir: str | None = None  # where a dataset on disk lives (None: its default location)
    image_shape: tuple[int, ...] | None = None  # folder: images read as this (C, H, W); None: 3x32x32
    eval_every: int = 1  # rounds between evaluations for the curves (the last round always)
    split: str = "test"  # "val": score on validation splits (tuning); "test": the report's numbers
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        unknown = [a for a in self.algorithms if a not in STRATEGIES]
        if unknown:
            raise ConfigError(f"unknown algorithm(s) {', '.join(unknown)}; known: {', '.join(sorted(STRATEGIES))}")
        if not self.algorithms:
            raise ConfigError("no algorithms given")
        if not self.seeds:
            raise ConfigError("no seeds given")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.clients < 1 or self.new_clients < 0:
            raise ConfigError(f"need clients >= 1 and new clients >= 0, got {self.clients}, {self.new_clients}")
        if self.split not in ("test", "val"):
            raise ConfigError(f"split must be test or val, got {self.split!r}")
        check_data_fraction(self.data_fraction)
        if self.partition == "dirichlet" and not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["train"] = self.train.to_dict()
        return d


def serialized_nbytes(arrays: Arrays) -> int:
    """Bytes of the safetensors encoding: what the wire would carry."""
    return len(st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})) if arrays else 0


@dataclass
class RunResult:
    """One algorithm on one seed."""

    algorithm: str
    seed: int
    metrics: dict[str, float]
    curve: list[dict[str, float]]  # per evaluated round: round, global_acc, personalized_acc
    strategy: Strategy
    local_states: dict[str, Arrays | None]
    diagnostics: dict[str, Any] = field(default_factory=dict)  # Strategy.diagnostics at the end


def client_model(run: RunResult, client_id: str) -> Any:
    """The ``DualLevelMoE`` a simulated client ends with: the last global state plus its own
    private state (what ``fedcoe export --checkpoint-dir ... --client`` rebuilds from disk),
    in eval mode, ready for :func:`export.bundle.build_bundle`."""
    from fedcoe_edge.training import build_model, load_arrays

    if client_id not in run.local_states:
        raise ConfigError(f"client {client_id!r} is not in the {run.algorithm} run (clients: "
                          f"{', '.join(sorted(run.local_states))})")
    model = build_model(run.strategy.network_cfg, run.seed)
    load_arrays(model, run.strategy.global_state)
    local = run.local_states[client_id]
    if local:
        load_arrays(model, local)
    return model.eval()


def eval_view(fed: Federation, split: str) -> Federation:
    """The federation as the evaluator sees it: with ``split="val"`` every client's test split is
    its validation split, the global set is the pooled validation splits and cold start runs on
    the training clients' validation data, choosing from their training inputs as its pool
    (new clients stay unread). Tuning reads only this
    view, so test splits are read once, for the report. docs/design.md, "Evaluation"."""
    if split == "test":
        return fed
    clients = {cid: dataclasses.replace(d, x_test=d.x_val, y_test=d.y_val) for cid, d in fed.clients.items()}
    x_val = np.concatenate([d.x_val for d in fed.clients.values()])
    y_val = np.concatenate([d.y_val for d in fed.clients.values()])
    # the pool of a validation cold client is its training inputs, unlabelled: disjoint from
    # the validation split it is scored on, as a new client's pool is from its test split
    cold = {f"val{cid}": dataclasses.replace(d, x_train=d.x_train[:0], y_train=d.y_train[:0],
                                             x_test=d.x_val, y_test=d.y_val, x_pool=d.x_train)
            for cid, d in fed.clients.items()}
    return dataclasses.replace(fed, clients=clients, new_clients=cold, x_global_test=x_val,
                               y_global_test=y_val)


def personalized_accuracy(strategy: Strategy, fed: Federation,
                          local_states: dict[str, Arrays | None]) -> tuple[float, float]:
    """Sample-weighted mean of each client's own model on its own test split, and the std
    across clients."""
    accs, sizes = [], []
    for cid, data in fed.clients.items():
        if len(data.y_test) == 0:
            continue
        accs.append(accuracy(strategy.predict_personal(cid, local_states.get(cid), data.x_test), data.y_test))
        sizes.append(len(data.y_test))
    if not accs:
        return float("nan"), 0.0
    return float(np.average(accs, weights=sizes)), float(np.std(accs))


def cold_start_accuracy(strategy: Strategy, fed: Federation) -> float:
    """Accuracy of every new client's cold model on its test split, pooled. Whatever the
    strategy chooses (FedCoE: which experts to download) it chooses from the client's
    unlabelled pool, disjoint from the test split it is scored on (docs/design.md, "Cold
    start")."""
    correct, total = 0, 0
    for data in fed.new_clients.values():
        probs = strategy.predict_cold(data.x_test, x_unlabeled=data.x_pool)
        correct += int((probs.argmax(1) == data.y_test).sum())
        total += len(data.y_test)
    return correct / total if total else float("nan")


def warn_health(rnd: int, results: Sequence[ClientResult], point: dict[str, float],
                num_classes: int, shares: bool = True) -> None:
    """Log a warning for every client whose loss went non-finite and when the global model
    is still at chance after the grace rounds (fedcoe_edge.health)."""
    for r in results:
        line = loss_warning(rnd, r.client_id, r.metrics) or update_warning(rnd, r.client_id, r.params)
        if line:
            log.warning(line)
    if "global_acc" in point and shares:  # local-only has no global model to be at chance
        line = chance_warning(rnd, "global model", point["global_acc"], num_classes)
        if line:
            log.warning(line)


def run_one(algorithm: str, fed: Federation, cfg: SimulationConfig, seed: int,
            on_round: Callable[[int, dict[str, float]], None] | None = None,
            attack: Attack | None = None, executor: ClientExecutor | None = None) -> RunResult:
    """Train one algorithm on one federation; evaluate at the end (last round, not best) on
    the ``cfg.split`` splits. ``attack`` replaces results before the server sees them; the
    server defends as ``cfg.train`` says (docs/design.md, "Robust aggregation"). ``executor``
    runs each round's clients (default: :func:`run_clients_here`)."""
    strategy = make_strategy(algorithm, cfg.model, cfg.train, seed)
    strategy.initialize()
    view = eval_view(fed, cfg.split)
    local_states: dict[str, Arrays | None] = {cid: None for cid in fed.clients}
    bytes_up = bytes_down = 0
    exchanges = 0
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    for rnd in range(1, cfg.rounds + 1):
        selected = strategy.select_clients(rnd, list(fed.clients))
        results: list[ClientResult] = []
        jobs = [(t, local_states[t.client_id], fed.clients[t.client_id])
                for t in strategy.configure_round(rnd, selected)]
        trained = (executor or run_clients_here)(algorithm, strategy, jobs)
        for (task, before, _), (got, local_states[task.client_id]) in zip(jobs, trained, strict=True):
            bytes_down += serialized_nbytes(task.params)
            if got is None:  # refused on its way back (the executor logged why)
                continue
            result = got
            if attack is not None:
                sent = attack(strategy, task, result, before, fed.clients[task.client_id])
                if sent is None:
                    continue
                result = sent
            bytes_up += serialized_nbytes(result.params)
            exchanges += 1
            results.append(result)
        strategy.aggregate_round(rnd, results, [])  # defended inside (Strategy.fold)
        point: dict[str, float] = {"round": float(rnd)}
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            point["global_acc"] = accuracy(strategy.predict_global(view.x_global_test), view.y_global_test)
            if rnd < cfg.rounds:
                point["personalized_acc"] = personalized_accuracy(strategy, view, local_states)[0]
            curve.append(point)
        warn_health(rnd, results, point, fed.num_classes, getattr(strategy, "shares_model", True))
        if on_round is not None:
            on_round(rnd, point)
    for cid, data in fed.clients.items():
        local_states[cid] = strategy.personalize(local_states[cid], data)
    wall = time.perf_counter() - t0
    pers, pers_std = personalized_accuracy(strategy, view, local_states)
    if curve:
        curve[-1]["personalized_acc"] = pers
    metrics = {
        "global_acc": curve[-1]["global_acc"],
        "personalized_acc": pers,
        "personalized_acc_client_std": pers_std,
        "cold_start_acc": cold_start_accuracy(strategy, view),
        "bytes_up_per_client_round": bytes_up / max(exchanges, 1),
        "bytes_down_per_client_round": bytes_down / max(exchanges, 1),
        "wall_s": wall,
    }
    evals = {cid: (d.x_test, d.y_test) for cid, d in view.clients.items()}
    diagnostics = strategy.diagnostics(evals, local_states, view.x_global_test)
    return RunResult(algorithm, seed, metrics, curve, strategy, local_states, diagnostics)


def summarize(runs: Sequence[RunResult]) -> dict[str, float]:
    """Mean over seeds, with ``<metric>_std`` for the accuracies (0.0 with one seed)."""
    out: dict[str, float] = {}
    for key in runs[0].metrics:
        values = np.array([r.metrics[key] for r in runs], dtype=np.float64)
        out[key] = float(values.mean())
        if key in METRIC_KEYS:
            out[f"{key}_std"] = float(values.std())
    out["seeds"] = float(len(runs))
    return out


def mean_diagnostics(diags: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over seeds of each numeric diagnostic (lists element-wise; a NaN seed, e.g. no
    local experts, is skipped unless every seed is NaN); per-client matrices are left out (the
    heat map draws the first seed's); ``distinct_expert_sets`` is rounded to a count."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for d in diags for k in d if k != "routing_matrix"):
        try:
            arr = np.asarray([d[key] for d in diags if key in d], dtype=np.float64)
        except (TypeError, ValueError):
            continue
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(arr, axis=0) if np.isfinite(arr).any() else arr.mean(0)
        out[key] = mean.tolist() if mean.ndim else float(mean)
    if "distinct_expert_sets" in out:
        out["distinct_expert_sets"] = int(round(out["distinct_expert_sets"]))
    return out


def fit_model_to_data(model: ModelConfig, fed: Federation) -> ModelConfig:
    """The model config with the data's input shape and class count; CNN experts need images,
    so vector data (e.g. FedProx Synthetic) gets MLP experts, and the log says so."""
    kind = model.expert_kind
    if kind == "cnn" and len(fed.input_shape) != 3:
        log.info("inputs of shape %s are not images: using MLP experts instead of CNN", fed.input_shape)
        kind = "mlp"
    if (tuple(model.input_shape), model.num_classes, model.expert_kind) == (fed.input_shape, fed.num_classes, kind):
        return model
    return dataclasses.replace(model, input_shape=fed.input_shape, num_classes=fed.num_classes,
                               expert_kind=kind)


def simulate(cfg: SimulationConfig, progress: bool = True, executor: ClientExecutor | None = None,
             ) -> tuple[dict[str, Any], dict[str, list[RunResult]]]:
    """Run every algorithm on every seed (clients by ``executor``, see :func:`run_one`).
    Returns the results.json document and the raw runs."""
    from tqdm.auto import tqdm

    cfg.validate()
    runs: dict[str, list[RunResult]] = {a: [] for a in cfg.algorithms}
    # every federation is built before any training so bad data settings fail at once
    feds = {seed: make_federation(cfg.dataset, cfg.partition, cfg.clients, cfg.new_clients, seed,
                                  cfg.alpha, cfg.min_samples, data_fraction=cfg.data_fraction,
                                  data_dir=cfg.data_dir, image_shape=cfg.image_shape)
            for seed in cfg.seeds}
    total = len(cfg.seeds) * len(cfg.algorithms) * cfg.rounds
    with tqdm(total=total, disable=not progress, unit="round", dynamic_ncols=True) as bar:
        for seed, fed in feds.items():
            cfg.model = fit_model_to_data(cfg.model, fed)
            for algorithm in cfg.algorithms:
                def tick(rnd: int, point: dict[str, float], algorithm: str = algorithm, seed: int = seed) -> None:
                    bar.set_description(f"{algorithm} seed {seed}")
                    if "global_acc" in point:
                        bar.set_postfix(global_acc=f"{point['global_acc']:.3f}")
                    bar.update(1)
                run = run_one(algorithm, fed, cfg, seed, on_round=tick, executor=executor)
                runs[algorithm].append(run)
                log.info("%s seed %d: %s", algorithm, seed,
                         ", ".join(f"{k}={v:.4f}" for k, v in run.metrics.items()))
    doc = {"config": cfg.to_dict(),
           "algorithms": {a: summarize(rs) for a, rs in runs.items()},
           "diagnostics": {a: mean_diagnostics([r.diagnostics for r in rs])
                           for a, rs in runs.items() if rs[0].diagnostics}}
    return doc, runs


def results_table(doc: dict[str, Any]) -> str:
    """A Markdown table of results.json; the first algorithm's ratios are implicit in the rows."""
    head = ("| algorithm | global acc | personalized acc | cold-start acc | up KB/client/round "
            "| down KB/client/round | wall s |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, m in doc["algorithms"].items():
        lines.append(
            f"| {name} | {m['global_acc']:.4f} ± {m['global_acc_std']:.4f} "
            f"| {m['personalized_acc']:.4f} ± {m['personalized_acc_std']:.4f} "
            f"| {m['cold_start_acc']:.4f} ± {m['cold_start_acc_std']:.4f} "
            f"| {m['bytes_up_per_client_round'] / 1024:.1f} | {m['bytes_down_per_client_round'] / 1024:.1f} "
            f"| {m['wall_s']:.1f} |")
    return "\n".join(lines)


def diagnostics_table(diags: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown rows: expert use and what each level adds, one row per algorithm that reports
    diagnostics (``mean_diagnostics`` output); missing or NaN values print as "-"."""
    lines = [
        "| algorithm | expert share (per expert) | gate entropy (nats / normalized) | "
        "distinct expert sets | personal mixture acc | global path alone | local experts alone "
        "| personal - global path |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(d: Mapping[str, Any], key: str) -> str:
        v = d.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    for name, d in diags.items():
        share = " / ".join(f"{x:.2f}" for x in d.get("expert_share", []))
        lines.append(
            f"| {name} | {share} | {num(d, 'gate_entropy')} / {num(d, 'gate_entropy_norm')} "
            f"| {d.get('distinct_expert_sets', '-')} | {num(d, 'personal_acc')} "
            f"| {num(d, 'global_path_acc')} | {num(d, 'local_acc')} "
            f"| {num(d, 'personal_vs_global_path')} |"
        )
    return lines


def write_outputs(out_dir: Path, doc: dict[str, Any], runs: dict[str, list[RunResult]]) -> None:
    """results.json, report.md, curves.png and checkpoints/ (first seed), each written atomically."""
    from fedcoe_edge.checkpoint import save_run_checkpoints
    from fedcoe_edge.io import atomic_write_text
    from fedcoe_edge.plots import plot_curves, plot_routing_heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(doc, indent=2, sort_keys=False) + "\n")
    c = doc["config"]
    header = (f"# FedCoE simulation: {c['dataset']} / {c['partition']}"
              f"{' alpha=' + str(c['alpha']) if c['partition'] == 'dirichlet' else ''}, "
              f"{c['clients']} clients (+{c['new_clients']} new), {c['rounds']} rounds, "
              f"seeds {c['seeds']}\n\nAccuracy at the last round, mean ± std across seeds.\n\n")
    diag = ""
    if doc.get("diagnostics"):
        diag = ("\n## Diagnostics (mean over seeds)\n\nExpert share: routing mass per global expert as "
                "devices route; heat maps: `routing_<algorithm>.png` (first seed).\n\n"
                + "\n".join(diagnostics_table(doc["diagnostics"])) + "\n")
    atomic_write_text(out_dir / "report.md", header + results_table(doc) + "\n" + diag)
    plot_curves({a: [r.curve for r in rs] for a, rs in runs.items()}, out_dir / "curves.png",
                title=f"{c['dataset']} {c['partition']} alpha={c['alpha']}")
    for algorithm, rs in runs.items():
        matrix = rs[0].diagnostics.get("routing_matrix")
        if matrix:
            plot_routing_heatmap(matrix, out_dir / f"routing_{algorithm}.png",
                                 title=f"{algorithm}: routing mass per client, seed {rs[0].seed}")
    for algorithm, rs in runs.items():
        save_run_checkpoints(out_dir / "checkpoints" / algorithm, rs[0].strategy, rs[0].local_states,
                             meta={"algorithm": algorithm, "seed": rs[0].seed, "simulation": c})
