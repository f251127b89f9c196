"""The deployed setting's accuracy grid: frozen pretrained V3-Small trunk, FedCoE heads on top,
every client a camera of its own (docs/benchmarks.md, "Camera grid: the deployed setting").

The accuracy grid (``benchmarks/accuracy.py``) trains small CNNs from scratch on 28x28 images;
the product ships a frozen, pretrained MobileNetV3-Small trunk with FedCoE's experts on top,
on cameras whose images differ. This grid measures that setting:

1. **Data.** Fashion-MNIST at 64x64 (``fedcoe_edge.pretrain.to_camera``). The official train
   split is cut into the coordinator's **public slice** (10%, stratified, the cut of
   ``fedcoe pretrain-trunk``) and the **client pool**: ``pct`` percent of the other 54,000
   images, stratified. The pool is split Dirichlet(alpha) over 20 training + 4 cold-start
   clients (60/15/25 train/validation/test each); the global test set is the official test
   split (10,000 images).
2. **Feature shift per client.** Every client is a camera (``fedcoe_edge.data.shift.Camera``:
   rotation, contrast, brightness, Gaussian blur, sensor noise) drawn ONCE from
   ``CAMERA_SEED`` before any run, the same for every seed and algorithm, and listed in the
   report. The cold-start clients' cameras were seen by nobody in training; the global test
   set goes through a fresh camera per image from the same distribution.
3. **Frozen trunk, once per image.** The trunk is pretrained on the public slice
   (``fedcoe_edge.pretrain.pretrain_trunk``, as ``benchmarks/camera_accuracy.py`` does) and
   saved as safetensors with its sha256; each camera image runs through it ONCE and the pooled
   576-d features are stored (npz keyed by the trunk's sha256, the cameras, the setting and
   the seed). The federation then runs on the features with an identity trunk and MLP heads
   (``expert_kind="mlp"``): exactly what a frozen trunk computes, at the cost of small MLPs.
   FedCoE's gate and experts (K=8 + M=2 heads of width 192, top-2: the camera bundle's) sit on
   the features; every baseline trains one dense head of the same active MACs
   (``fedcoe_edge.strategies.fedavg.plain_config``).
4. **Honest protocol.** ``--phase tune`` gives every algorithm the same budget (4 runs) over
   the same learning-rate values, scored on VALIDATION splits only at ``cam-dir0.1-10``, seed
   0 (``camera_tuned.json``); the grid then runs each algorithm at its winner, 3 seeds,
   scored on the test splits once, at the last round.

Finished runs are appended to ``camera_grid_cache.jsonl`` (tuning runs to
``camera_grid_tuning_cache.jsonl``), keyed by everything they depend on, so an interrupted grid
resumes. Writes ``camera_grid.json``, ``camera_grid.md`` and ``camera_grid.png`` (accuracy vs
bytes uploaded per client per round) under ``--out``.

    python -m benchmarks.camera_grid                # make bench-camera-grid (tune, then grid)
    python -m benchmarks.camera_grid --quick --out /tmp/cg   # a smoke test, about a minute
    python -m benchmarks.camera_grid --report-only  # rebuild the report from the caches
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.accuracy import (
    Goal,
    append_cache,
    apply_knobs,
    convergence,
    git_commit,
    goals,
    goals_table,
    jsonable,
    load_cache,
    names,
    run_pool,
    summarize,
    summarize_diagnostics,
)
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError, DataError, FedCoEError

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_WORK = Path(__file__).resolve().parents[1] / "runs" / "camera_grid"
FEATURE_VERSION = 1  # bump when what a feature file holds changes
# --- the setting (fixed before any run; docs/benchmarks.md, "Camera grid: the deployed setting")
SIZE = 64  # input side: V3-Small leaves a 2x2 map before its pool
PUBLIC_FRACTION = 0.1  # the coordinator's public slice of the train split
TRUNK_SEED = 0  # cut of the public slice and pretraining
PRETRAIN_EPOCHS = 3
PRETRAIN_LR = 0.05
PRETRAIN_VAL_FRACTION = 0.1
CAMERA_SEED = 20261207  # the clients' cameras: one draw, the same for every seed
SHIFT_STRENGTH = 1.0  # fedcoe_edge.data.shift.random_camera's scale
FEATURE_DIM = 576  # V3-Small's pooled features
CLIENTS, NEW_CLIENTS, MIN_SAMPLES = 20, 4, 20
VAL_FRACTION, CLIENT_TEST_FRACTION = 0.15, 0.25
TEST_SAMPLES = 2000  # global test set: a stratified slice of the official test split (cost)
STABILITY_ROUNDS = 20  # round-to-round std of global accuracy over this many last rounds
# --- algorithms
ALGORITHMS = ("fedcoe", "fedavg", "fedprox", "fedavg-ft", "ditto", "fedrep", "local", "mixture",
              "fedala", "feddbe", "fedavg_prior")
# --- tuning: every algorithm the same budget over the same learning rates
TUNE_SETTING = "cam-dir0.1-10"
TUNE_SEED = 0
LRS = (0.02, 0.05, 0.1, 0.2)
BUDGET = len(LRS)
# an algorithm's own knobs alternate over the lr values (a Latin design: each lr once, each
# knob value twice), so no algorithm gets more configurations or a wider lr range
OWN_KNOBS: dict[str, list[dict[str, Any]]] = {
    "fedprox": [{"prox_mu": 0.01}, {"prox_mu": 0.1}, {"prox_mu": 0.1}, {"prox_mu": 0.01}],
    "fedavg-ft": [{"finetune_epochs": 2}, {"finetune_epochs": 5}, {"finetune_epochs": 5},
                  {"finetune_epochs": 2}],
    "ditto": [{"ditto_lambda": 0.1}, {"ditto_lambda": 1.0}, {"ditto_lambda": 1.0},
              {"ditto_lambda": 0.1}],
    # the three personalized baselines: the knob and values benchmarks/tune.py searches
    "fedavg_prior": [{"prior_smoothing": 0.1}, {"prior_smoothing": 1.0},
                     {"prior_smoothing": 1.0}, {"prior_smoothing": 0.1}],
    "fedala": [{"ala_layers": 1}, {"ala_layers": 2}, {"ala_layers": 2}, {"ala_layers": 1}],
    "feddbe": [{"dbe_kappa": 0.001}, {"dbe_kappa": 0.01}, {"dbe_kappa": 0.01},
               {"dbe_kappa": 0.001}],
    "fedcoe": [{"lam": 0.02, "experts_per_client": 2}, {"lam": 0.1, "experts_per_client": 3},
               {"lam": 0.1, "experts_per_client": 2}, {"lam": 0.02, "experts_per_client": 3}],
}
# the report's goals (as the accuracy grid's, plus stability)
MAX_UPLOAD_VS_FEDAVG = 0.60
# --quick: a smoke test of the whole pipeline (untuned, one setting, two algorithms)
QUICK_ROUNDS, QUICK_CLIENTS, QUICK_NEW_CLIENTS, QUICK_TEST_SAMPLES = 3, 6, 1, 500


def say(msg: str) -> None:
    """A progress line with a timestamp (stderr, flushed: readable in a nohup log)."""
    print(f"[camera-grid {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class CamSetting:
    """``cam-dir<alpha>-<pct>``: Dirichlet(alpha) label skew over ``pct`` percent of the
    client pool (the train split less the public slice)."""

    name: str
    alpha: float
    pct: float

    @property
    def fraction(self) -> float:
        return self.pct / 100.0

    def describe(self) -> str:
        return (f"Dirichlet({self.alpha:g}) label skew, {self.pct:g}% of the client pool, one "
                f"camera per client")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_RE = re.compile(r"^cam-dir(?P<alpha>[0-9.]+)-(?P<pct>[0-9.]+)$")
DEFAULT_SETTINGS = ("cam-dir0.1-10", "cam-dir0.5-10", "cam-dir0.1-100", "cam-dir0.5-100")


def parse_setting(name: str) -> CamSetting:
    """``cam-dir0.1-10`` -> alpha 0.1 over 10% of the pool; one line on a bad name."""
    m = SETTING_RE.match(name)
    try:
        alpha, pct = (float(m["alpha"]), float(m["pct"])) if m else (0.0, 0.0)
    except ValueError:  # "0.1.2"
        alpha, pct = 0.0, 0.0
    if m is None or not alpha > 0 or not 0 < pct <= 100:
        raise ConfigError(f"setting {name!r}: expected cam-dir<alpha>-<percent of the client "
                          f"pool>, alpha > 0 and percent in (0, 100] (e.g. cam-dir0.1-10)")
    return CamSetting(name, alpha, pct)


@dataclass(frozen=True)
class Prep:
    """What the features of a setting depend on besides the setting and the seed."""

    clients: int = CLIENTS
    new_clients: int = NEW_CLIENTS
    min_samples: int = MIN_SAMPLES
    test_samples: int = 0  # 0: the whole official test split; n: a stratified subset
    camera_seed: int = CAMERA_SEED
    strength: float = SHIFT_STRENGTH
    data_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("data_dir")
        return d


@dataclass(frozen=True)
class Trunk:
    """The pretrained trunk file and its sha256 (checked before any use)."""

    file: str
    sha256: str
    info: dict[str, Any] = field(default_factory=dict, compare=False)


def model_config() -> ModelConfig:
    """FedCoE on pooled trunk features: the camera bundle's heads (K=8 + M=2 MLP heads of
    width 192, top-2; ``benchmarks.fedcoe.camera_config``) behind an identity trunk."""
    from benchmarks.fedcoe import CAMERA_HIDDEN

    return ModelConfig(input_shape=(FEATURE_DIM,), num_classes=10, trunk="identity",
                       expert_kind="mlp", expert_hidden=CAMERA_HIDDEN, num_global_experts=8,
                       top_k=2, num_local_experts=2)


def camera_params(n: int, camera_seed: int, strength: float) -> list[Any]:
    """The ``n`` client cameras, client i's from the stream ``[camera_seed, i]``: fixed before
    any run and independent of the run seed, the partition and the number of clients."""
    from fedcoe_edge.data.shift import random_camera

    return [random_camera(np.random.default_rng([camera_seed, i]), strength) for i in range(n)]


# ----------------------------------------------------------------------------- the trunk
def check_trunk(trunk: Trunk) -> None:
    """DataError naming the file unless it exists and its sha256 is the one given."""
    path = Path(trunk.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"trunk file {path}: unreadable: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != trunk.sha256:
        raise DataError(f"trunk file {path}: sha256 {digest[:16]}... does not match the expected "
                        f"{trunk.sha256[:16]}...")


def ensure_trunk(work: Path, data_dir: str | None, log: Callable[[str], None] = say) -> Trunk:
    """The pretrained trunk in ``work``: reused when ``trunk.json`` names its hash and the file
    matches, else pretrained on the public slice (3 epochs, the camera benchmark's recipe)."""
    from fedcoe_edge.data.fmnist import load_fmnist
    from fedcoe_edge.pretrain import holdout_split, pretrain_trunk, public_indices

    file, meta = work / "trunk.safetensors", work / "trunk.json"
    if file.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        trunk = Trunk(str(file), info["sha256"], info)
        check_trunk(trunk)  # a file changed under its record is bad input, not a cache miss
        return trunk
    (x, y), _ = load_fmnist(data_dir)
    pub = public_indices(y, PUBLIC_FRACTION, TRUNK_SEED)
    fit, val = holdout_split(y[pub], PRETRAIN_VAL_FRACTION, TRUNK_SEED)
    log(f"pretraining the trunk on {len(fit):,} public images ({len(val):,} held out), "
        f"{PRETRAIN_EPOCHS} epochs at {SIZE}x{SIZE}")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    pre = pretrain_trunk(x[pub][fit], y[pub][fit], SIZE, PRETRAIN_EPOCHS, file, seed=TRUNK_SEED,
                         lr=PRETRAIN_LR, x_val=x[pub][val], y_val=y[pub][val], log=log)
    pre["cpu_s"] = time.process_time() - t0
    from fedcoe_edge.io import atomic_write_text

    atomic_write_text(meta, json.dumps(jsonable(pre), indent=1) + "\n")
    log(f"trunk {file} sha256 {pre['sha256'][:16]}..., held-out acc {pre['val_acc']:.3f}")
    return Trunk(str(file), pre["sha256"], pre)


def load_trunk_module(trunk: Trunk) -> Any:
    """The V3-Small trunk with the file's weights, frozen, eval mode (hash checked first)."""
    from fedcoe_edge.mobilenet import mobilenet_v3_small_trunk
    from fedcoe_edge.trunk import freeze, load_trunk_weights

    check_trunk(trunk)
    cfg = ModelConfig(input_shape=(3, SIZE, SIZE), num_classes=10, trunk="mobilenet_v3_small",
                      expert_kind="mlp", trunk_mode="frozen", trunk_weights=trunk.file,
                      trunk_sha256=trunk.sha256)
    module = mobilenet_v3_small_trunk()
    load_trunk_weights(module, cfg)
    freeze(module)
    return module


# -------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=2)
def _fmnist(data_dir: str | None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from fedcoe_edge.data.fmnist import load_fmnist

    return load_fmnist(data_dir)  # type: ignore[no-any-return]


@dataclass
class Split:
    """Positions (official train split) of each client's train/val/test images, the new
    clients' images and the global test images (official test split)."""

    clients: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    new_clients: dict[str, np.ndarray]
    test: np.ndarray


def split_setting(s: CamSetting, seed: int, prep: Prep) -> Split:
    """The label partition of a setting for a seed (no image touched). A client left with no
    training sample is a DataError naming it: checked for every job before any training."""
    from fedcoe_edge.data.federation import split_train_val_test, stratified_subset
    from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec
    from fedcoe_edge.pretrain import public_indices

    (_, y), (_, yt) = _fmnist(prep.data_dir)
    public = public_indices(y, PUBLIC_FRACTION, TRUNK_SEED)
    rest = np.setdiff1d(np.arange(len(y)), public)
    pool = rest[stratified_subset(y[rest], s.fraction, np.random.default_rng([seed, 12]))]
    rng = np.random.default_rng(seed)
    total = prep.clients + prep.new_clients
    try:
        parts = PARTITIONERS["dirichlet"](y[pool], total, rng,
                                          PartitionSpec("dirichlet", s.alpha, prep.min_samples))
    except DataError as exc:
        raise DataError(f"setting {s.name}, seed {seed}: {exc}") from None
    clients = {}
    for i, part in enumerate(parts[:prep.clients]):
        try:
            tr, va, te = split_train_val_test(pool[part], rng, str(i), VAL_FRACTION,
                                              CLIENT_TEST_FRACTION)
        except DataError as exc:
            raise DataError(f"setting {s.name}, seed {seed}: {exc}") from None
        if len(tr) == 0:
            raise DataError(f"setting {s.name}, seed {seed}: client {i} has no training sample")
        clients[str(i)] = (tr, va, te)
    new = {f"new{j}": np.sort(pool[part]) for j, part in enumerate(parts[prep.clients:])}
    if prep.test_samples and prep.test_samples < len(yt):
        test = stratified_subset(yt, prep.test_samples / len(yt), np.random.default_rng([seed, 13]))
    else:
        test = np.arange(len(yt))
    return Split(clients, new, test)


def feature_key(s: CamSetting, seed: int, prep: Prep, trunk: Trunk) -> str:
    """What a feature file depends on: trunk hash, cameras, setting, seed, prep, version."""
    cams = [c.to_dict() for c in camera_params(prep.clients + prep.new_clients,
                                                prep.camera_seed, prep.strength)]
    doc = {"trunk_sha256": trunk.sha256, "cameras": cams, "setting": s.to_dict(), "seed": seed,
           "prep": prep.to_dict(), "size": SIZE, "public_fraction": PUBLIC_FRACTION,
           "version": FEATURE_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def _features(module: Any, x28: np.ndarray, cam: Any, rng: np.random.Generator,
              batch: int = 256) -> np.ndarray:
    """Images (N, 1, 28, 28) -> camera (at 64x64, grey sensor) -> frozen trunk -> (N, 576)."""
    import torch

    from fedcoe_edge.data.shift import apply_camera, random_camera
    from fedcoe_edge.pretrain import to_camera

    out = np.zeros((len(x28), FEATURE_DIM), dtype=np.float32)
    for start in range(0, len(x28), batch):
        up = to_camera(x28[start:start + batch], SIZE)[:, :1]
        if cam is None:  # the population: a fresh camera per image (the global test set)
            shot = np.concatenate([apply_camera(up[i:i + 1], random_camera(rng, SHIFT_STRENGTH), rng)
                                   for i in range(len(up))]) if len(up) else up
        else:
            shot = apply_camera(up, cam, rng)
        with torch.no_grad():
            feats = module(torch.from_numpy(np.ascontiguousarray(np.repeat(shot, 3, axis=1))))
        out[start:start + len(up)] = feats.numpy()
    return out


def build_federation(s: CamSetting, seed: int, prep: Prep, trunk: Trunk, cache_dir: Path,
                     log: Callable[[str], None] = say) -> Any:
    """The setting's federation over trunk features, read from the feature file when one with
    this key exists, else computed (every image through its client's camera and the trunk
    once) and written atomically."""
    from fedcoe_edge.data import Federation
    from fedcoe_edge.data.client import ClientData
    from fedcoe_edge.data.federation import split_new_client

    split = split_setting(s, seed, prep)
    key = feature_key(s, seed, prep, trunk)
    path = cache_dir / f"features_{s.name}_s{seed}_{key}.npz"
    arrays: dict[str, np.ndarray]
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        (x, y), (xt, yt) = _fmnist(prep.data_dir)
        module = load_trunk_module(trunk)
        cams = camera_params(prep.clients + prep.new_clients, prep.camera_seed, prep.strength)
        t0 = time.process_time()
        arrays = {}
        for i, (cid, idx3) in enumerate(split.clients.items()):
            for part, idx in zip(("tr", "va", "te"), idx3, strict=True):
                rng = np.random.default_rng([prep.camera_seed, i, seed, ("tr", "va", "te").index(part)])
                arrays[f"c{cid}_{part}"] = _features(module, x[idx], cams[i], rng)
        for j, (cid, idx) in enumerate(split.new_clients.items()):
            rng = np.random.default_rng([prep.camera_seed, prep.clients + j, seed, 3])
            arrays[f"c{cid}_te"] = _features(module, x[idx], cams[prep.clients + j], rng)
        arrays["global"] = _features(module, xt[split.test], None,
                                     np.random.default_rng([prep.camera_seed, 10**6, seed]))
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")  # workers may race
        np.savez(tmp, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        os.replace(tmp, path)
        n = sum(len(v) for v in arrays.values())
        log(f"features {s.name} seed {seed}: {n:,} images through camera + trunk in "
            f"{time.process_time() - t0:.0f} CPU s -> {path.name}")
    (_, y), (_, yt) = _fmnist(prep.data_dir)
    clients = {cid: ClientData(arrays[f"c{cid}_tr"], y[tr], arrays[f"c{cid}_te"], y[te],
                               arrays[f"c{cid}_va"], y[va])
               for cid, (tr, va, te) in split.clients.items()}
    # a new client's images: an unlabelled pool its cold start chooses from, and a disjoint
    # test split it is scored on, cut as the library's federations cut them (docs/design.md,
    # "Cold start"); the feature file holds both, so the cut needs no new features
    pool_rng = np.random.default_rng([seed, 4])
    new = {cid: split_new_client(arrays[f"c{cid}_te"], y[idx], np.arange(len(idx)), pool_rng, cid)
           for cid, idx in split.new_clients.items()}
    return Federation(clients, new, arrays["global"], yt[split.test], (FEATURE_DIM,), 10,
                      meta={"dataset": "fmnist-camera-features", "setting": s.name, "seed": seed,
                            "feature_file": path.name})


# ------------------------------------------------------------------------------ the grid
def tune_knobs(algorithm: str) -> list[dict[str, Any]]:
    """The ``BUDGET`` configurations ``algorithm`` is tuned over: each lr of ``LRS`` once,
    with its own knobs (if any) alternating."""
    own = OWN_KNOBS.get(algorithm, [{}] * BUDGET)
    return [{"lr": lr, **k} for lr, k in zip(LRS, own, strict=True)]


@dataclass
class CamGrid:
    """What to run: settings x algorithms x seeds at ``rounds``; ``knobs`` per algorithm
    (tuned on validation); ``split="val"`` for tuning runs."""

    settings: list[str]
    algorithms: list[str]
    seeds: list[int]
    rounds: int
    trunk: Trunk
    prep: Prep = field(default_factory=Prep)
    split: str = "test"
    knobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_epochs: int = 1
    batch_size: int = 32

    def train_for(self, algorithm: str) -> TrainConfig:
        base = TrainConfig(local_epochs=self.local_epochs, batch_size=self.batch_size)
        return apply_knobs(base, self.knobs.get(algorithm, {}))

    def key(self, setting: str, algorithm: str, seed: int) -> str:
        from fedcoe_edge.data.federation import COLD_POOL_FRACTION
        from fedcoe_edge.numerics import NUMERICS_VERSION

        s = parse_setting(setting)
        doc = {"setting": s.to_dict(), "algorithm": algorithm, "seed": seed,
               "rounds": self.rounds, "split": self.split,
               "features": feature_key(s, seed, self.prep, self.trunk),
               "model": model_config().to_dict(), "train": self.train_for(algorithm).to_dict()}
        if self.split == "test":  # scored runs: cold start chooses from a pool, not its test split
            doc["cold_pool_fraction"] = COLD_POOL_FRACTION
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
        return f"{setting}|{algorithm}|{seed}|{self.split}|{digest}|numerics-v{NUMERICS_VERSION}"

    def jobs(self) -> list[tuple[str, str, int]]:
        """Setting-major (the priority order), then seed, then algorithm: a grid cut short
        holds whole settings, every algorithm on the same seeds."""
        return [(s, a, seed) for s in self.settings for seed in self.seeds
                for a in self.algorithms]


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """One thread, deterministic kernels: same commit + seed + machine, same bits; the
    process's previous settings come back afterwards (a test process runs other tests)."""
    import torch

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def run_job(grid: CamGrid, setting: str, algorithm: str, seed: int, cache_dir: str
            ) -> dict[str, Any]:
    """One run on the setting's features; a JSON-ready record (metrics, curve, diagnostics,
    both head MAC counts, CPU seconds)."""
    with deterministic():
        return _run_job(grid, setting, algorithm, seed, cache_dir)


def _run_job(grid: CamGrid, setting: str, algorithm: str, seed: int, cache_dir: str
             ) -> dict[str, Any]:
    from fedcoe_edge.simulation import SimulationConfig, run_one
    from fedcoe_edge.strategies.fedavg import active_macs, plain_config

    s = parse_setting(setting)
    fed = build_federation(s, seed, grid.prep, grid.trunk, Path(cache_dir))
    model = model_config()
    cfg = SimulationConfig(dataset="fmnist-camera-features", alpha=s.alpha,
                           clients=grid.prep.clients, new_clients=grid.prep.new_clients,
                           rounds=grid.rounds, algorithms=[algorithm], seeds=[seed],
                           min_samples=grid.prep.min_samples, eval_every=1, split=grid.split,
                           model=model, train=grid.train_for(algorithm))
    cfg.validate()
    t0 = time.process_time()
    result = run_one(algorithm, fed, cfg, seed)
    return {"setting": setting, "algorithm": algorithm, "seed": seed,
            "knobs": grid.knobs.get(algorithm, {}), "metrics": jsonable(result.metrics),
            "curve": jsonable(result.curve), "diagnostics": jsonable(result.diagnostics),
            "macs": {"fedcoe": int(active_macs(model)),
                     "baseline": int(active_macs(plain_config(model)))},
            "cpu_s": time.process_time() - t0}


# ----------------------------------------------------------------------------- analysis
def stability(rec: dict[str, Any], n: int = STABILITY_ROUNDS, key: str = "global_acc"
              ) -> float | None:
    """Round-to-round std of ``key`` over the last ``n`` rounds of one run (population std of
    the per-round values; every round is evaluated in this grid)."""
    pts = [p[key] for p in rec["curve"] if key in p][-n:]
    return float(np.std(pts)) if len(pts) >= 2 else None


def slope(conv: dict[str, Any] | None) -> float | None:
    """Accuracy change per round over the last quarter (accuracy.convergence's delta)."""
    if conv is None or conv["to_round"] <= conv["from_round"]:
        return None
    return float(conv["delta"]) / (conv["to_round"] - conv["from_round"])


def select(rows: Sequence[dict[str, Any] | None]) -> int | None:
    """The winning configuration (benchmarks.tune's rule: mean of validation global and
    personalized accuracy, personalized alone without a shared model; ties to the first);
    None until every configuration ran."""
    from benchmarks.tune import score

    full = [r for r in rows if r is not None]
    if len(full) < BUDGET or len(full) < len(rows):
        return None
    best = 0
    for i, r in enumerate(full):
        if score(r) > score(full[best]) + 1e-12:
            best = i
    return best


def tuning_doc(tune: dict[str, CamGrid], done: dict[str, dict[str, Any]],
               algorithms: Sequence[str]) -> dict[str, Any]:
    """camera_tuned.json: ``{"tuned": {alg: knobs}, "scores": {alg: [row per config]}}``."""
    from fedcoe_edge.strategies import shares_model

    tuned: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for a in algorithms:
        rows: list[dict[str, Any] | None] = []
        for i, knobs in enumerate(tune_knobs(a)):
            g = tune[f"{a}#{i}"]
            rec = done.get(g.key(TUNE_SETTING, a, TUNE_SEED))
            if rec is None:
                rows.append(None)
                continue
            m = rec["metrics"]
            rows.append({"knobs": knobs, "shares_model": shares_model(a),
                         "global_acc": m["global_acc"], "personalized_acc": m["personalized_acc"],
                         "cold_start_acc": m["cold_start_acc"], "cpu_s": rec.get("cpu_s")})
        win = select(rows)
        if win is not None:
            tuned[a] = tune_knobs(a)[win]
        scores[a] = [r if r is not None else {"knobs": k, "not_run": True}
                     for r, k in zip(rows, tune_knobs(a), strict=True)]
        for i, r in enumerate(scores[a]):
            r["chosen"] = i == win
    return {"tuned": tuned, "scores": scores}


def label_coverage(s: CamSetting, seed: int, prep: Prep, rare: float = 0.01) -> dict[str, Any]:
    """How much of the cold-start clients' data is of classes the training clients barely
    hold (each < ``rare`` of all training images): a label skew this strong can hand whole
    classes to the cold-start clients, which no algorithm can then learn."""
    (_, y), _ = _fmnist(prep.data_dir)
    split = split_setting(s, seed, prep)
    train = np.bincount(np.concatenate([y[t[0]] for t in split.clients.values()]), minlength=10)
    cold_idx = [i for i in split.new_clients.values() if len(i)]
    cold = (np.bincount(np.concatenate([y[i] for i in cold_idx]), minlength=10) if cold_idx
            else np.zeros(10, dtype=np.int64))
    rare_classes = np.flatnonzero(train < rare * train.sum())
    return {"train_per_class": train.tolist(), "cold_per_class": cold.tolist(),
            "rare_classes": rare_classes.tolist(),
            "cold_share_in_rare": float(cold[rare_classes].sum() / max(cold.sum(), 1))}


def env_info() -> dict[str, Any]:
    """Library versions and the CPU flags that change float kernels (AVX2, AVX-512, VNNI)."""
    import torch

    from benchmarks.harness import cpu_model

    try:
        import onnxruntime as ort

        ort_version = ort.__version__
    except ImportError:  # pragma: no cover - the dev install has it
        ort_version = "not installed"
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = sorted({f for f in line.split(":", 1)[1].split()
                                if f == "avx2" or f.startswith("avx512") or "vnni" in f
                                or f == "fma"})
                break
    except OSError:
        pass
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "cpu_flags": flags,
            "torch": torch.__version__, "onnxruntime": ort_version,
            "numpy": np.__version__, "python": platform.python_version(), "torch_threads": 1}


def build_doc(grid: CamGrid, done: dict[str, dict[str, Any]], skipped: dict[str, str],
              tuned: dict[str, Any], meta: dict[str, Any],
              tuning_scores: dict[str, Any] | None = None) -> dict[str, Any]:
    """camera_grid.json: per setting, per algorithm the mean ± std over the seeds that ran,
    stability, convergence slope, bytes; FedCoE diagnostics; goals."""
    from fedcoe_edge.strategies import shares_model

    settings: dict[str, Any] = {}
    for s_name in grid.settings:
        algos: dict[str, Any] = {}
        conv: dict[str, Any] = {}
        diags: dict[str, Any] = {}
        macs = None
        for a in grid.algorithms:
            recs = [done[k] for seed in grid.seeds
                    if (k := grid.key(s_name, a, seed)) in done]
            if not recs:
                continue
            summ = summarize(recs)
            summ["rounds"] = grid.rounds
            shares = shares_model(a)
            if not shares:
                summ["no_shared_model"] = True
            stab = [v for r in recs if (v := stability(r)) is not None]
            summ["global_std_last20"] = float(np.mean(stab)) if stab and shares else None
            summ["global_std_last20_std"] = float(np.std(stab)) if stab and shares else None
            summ["cpu_s"] = float(np.mean([r.get("cpu_s", 0.0) for r in recs]))
            metric = "global_acc" if shares else "personalized_acc"
            c = convergence(recs, grid.rounds, metric)
            if c is not None:
                conv[a] = {**c, "metric": metric, "slope_per_round": slope(c)}
            if a.startswith("fedcoe") and any(r.get("diagnostics") for r in recs):
                diags[a] = summarize_diagnostics(recs)
            algos[a] = summ
            macs = macs or recs[0].get("macs")
        block: dict[str, Any] = {"setting": parse_setting(s_name).to_dict(), "algorithms": algos,
                                 "convergence": conv, "diagnostics": diags}
        if algos:
            block["labels"] = {str(seed): label_coverage(parse_setting(s_name), seed, grid.prep)
                               for seed in grid.seeds}
        if macs:
            block["macs"] = {**macs, "ratio": macs["baseline"] / macs["fedcoe"]}
        rows = setting_goals(grid, algos)
        block["goals"] = [dataclasses.asdict(g) for g in rows]
        settings[s_name] = block
    return {"meta": meta, "skipped": skipped, "tuned": tuned, "tuning_scores": tuning_scores,
            "settings": settings}


def setting_goals(grid: CamGrid, algos: dict[str, Any]) -> list[Goal]:
    """The accuracy grid's goals (personalized, global, cold start, upload) plus stability:
    FedCoE's round-to-round std of global accuracy <= FedAvg's."""
    baselines = [a for a in grid.algorithms if a != "fedcoe"]
    rows = goals(algos, None, len(grid.seeds), baselines)
    f, b = algos.get("fedcoe"), algos.get("fedavg")
    goal = f"round-to-round std of global acc (last {STABILITY_ROUNDS} rounds) <= FedAvg's"
    if not f or not b or f.get("global_std_last20") is None or b.get("global_std_last20") is None:
        rows.append(Goal(goal, "pending", "needs fedcoe and fedavg (not run)"))
    else:
        margin = b["global_std_last20"] - f["global_std_last20"]
        full = int(f["seeds"]) >= len(grid.seeds) and int(b["seeds"]) >= len(grid.seeds)
        status = ("met" if margin >= -1e-12 else "NOT met") if full else "pending"
        rows.append(Goal(goal, status, f"FedCoE {f['global_std_last20']:.4f} vs FedAvg "
                                       f"{b['global_std_last20']:.4f}: margin {margin:+.4f}"))
    return rows


# ------------------------------------------------------------------------------- report
def _pm(m: dict[str, Any], key: str) -> str:
    if m.get("no_shared_model") and key != "personalized_acc":
        return "n/a"
    return f"{m[key]:.3f} ± {m[key + '_std']:.3f}"


def render(doc: dict[str, Any], grid: CamGrid) -> str:
    """camera_grid.md: the verdict first, then one section per setting, then how it was made."""
    meta = doc["meta"]
    lines = ["# Camera grid: frozen pretrained V3-Small trunk + FedCoE heads, one camera per "
             "client", ""]
    lines += _verdict_lines(doc, grid)
    lines += [
        f"Generated by `{meta['command']}` at commit `{meta['commit']}` (runs from "
        f"{', '.join(f'`{c}`' for c in meta['run_commits']) or '?'}); "
        f"{meta['runs_done']}/{meta['runs_total']} grid runs done"
        f"{'' if meta['complete'] else ' (PARTIAL: cells not run say so)'}; "
        f"{meta['cpu_s'] / 3600:.2f} CPU h in cached grid runs.", "",
        "Setting (docs/benchmarks.md, \"Camera grid: the deployed setting\"): Fashion-MNIST at "
        f"{SIZE}x{SIZE}; trunk MobileNetV3-Small pretrained on the public slice "
        f"({PUBLIC_FRACTION:.0%} of the train split; {PRETRAIN_EPOCHS} epochs, held-out "
        f"acc {_num(meta['trunk'].get('val_acc'))}; sha256 `{meta['trunk']['sha256']}`), frozen; "
        f"features pooled ({FEATURE_DIM}-d), computed once per image. "
        f"{grid.prep.clients} training + {grid.prep.new_clients} cold-start clients, "
        f"{grid.rounds} rounds, every client every round, {grid.local_epochs} local epoch(s), "
        f"batch {grid.batch_size}; seeds {grid.seeds}. Scores on the TEST splits at the LAST "
        "round, mean ± std over seeds. Each algorithm at its knobs from camera_tuned.json "
        f"(validation only, {BUDGET} configurations each over lr {list(LRS)}).", "",
    ]
    if meta.get("notes"):
        lines += [*(f"- {n}" for n in meta["notes"]), ""]
    lines += _coverage_lines(doc, grid)
    if doc["skipped"]:
        lines += ["Algorithms skipped:", ""]
        lines += [f"- `{a}`: {why}" for a, why in doc["skipped"].items()]
        lines.append("")
    for s_name, block in doc["settings"].items():
        lines += _setting_lines(grid, s_name, block)
    lines += _tuning_lines(doc)
    lines += _cameras_lines(meta)
    lines += _env_lines(meta)
    return "\n".join(lines) + "\n"


def _coverage_lines(doc: dict[str, Any], grid: CamGrid) -> list[str]:
    """Exactly which settings, algorithms and seeds ran, at how many rounds, and what did not."""
    lines = ["## What ran", "",
             f"Grid runs: {grid.rounds} rounds each; tuning runs: {doc['meta']['tune_rounds']} "
             f"rounds at {TUNE_SETTING}, seed {TUNE_SEED}, validation splits.", "",
             "| setting | algorithms with all seeds | seeds run per algorithm | NOT run |",
             "|---|---|---|---|"]
    for s_name, block in doc["settings"].items():
        algos = block["algorithms"]
        full = [a for a in grid.algorithms if a in algos and int(algos[a]["seeds"]) == len(grid.seeds)]
        per = ", ".join(f"{a} {algos[a]['seed_list']}" for a in grid.algorithms if a in algos)
        missing = {a: [seed for seed in grid.seeds
                       if seed not in algos.get(a, {}).get("seed_list", [])]
                   for a in grid.algorithms}
        missing = {a: m for a, m in missing.items() if m}
        total = len(grid.algorithms) * len(grid.seeds)
        if not algos:
            gap = f"all {total} runs"
        else:
            gap = ", ".join(f"{a} {m}" for a, m in missing.items()) or "nothing"
        lines.append(f"| {s_name} | {len(full)}/{len(grid.algorithms)} | {per or '-'} | {gap} |")
    return [*lines, ""]


def _tuning_lines(doc: dict[str, Any]) -> list[str]:
    """Every tuning configuration's validation scores; the chosen one marked."""
    lines = ["## Tuning (validation splits only)", "",
             f"{BUDGET} configurations per algorithm over lr {list(LRS)}, own knobs alternating "
             f"(camera_tuned.json); score = mean of validation global and personalized accuracy "
             "(personalized alone for local).", "",
             "| algorithm | knobs | val global | val personalized | chosen |", "|---|---|---|---|---|"]
    for a, rows in doc.get("tuning_scores", {}).items():
        for r in rows:
            knobs = ", ".join(f"{k}={v:g}" for k, v in r["knobs"].items())
            if r.get("not_run"):
                lines.append(f"| {a} | {knobs} | not run | not run | |")
                continue
            glob = "n/a" if not r["shares_model"] else f"{r['global_acc']:.3f}"
            lines.append(f"| {a} | {knobs} | {glob} | {r['personalized_acc']:.3f} | "
                         f"{'**chosen**' if r['chosen'] else ''} |")
    return [*lines, ""]


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _verdict_lines(doc: dict[str, Any], grid: CamGrid) -> list[str]:
    """Whether FedCoE leads, per setting that ran it, at the top of the report."""
    out = []
    for s_name, block in doc["settings"].items():
        algos = block["algorithms"]
        if "fedcoe" not in algos:
            continue
        f = algos["fedcoe"]
        rivals = {a: m for a, m in algos.items() if a != "fedcoe"}
        if not rivals:
            continue
        best_p = max(rivals, key=lambda a: rivals[a]["personalized_acc"])
        shared = {a: m for a, m in rivals.items() if not m.get("no_shared_model")}
        best_g = max(shared, key=lambda a: shared[a]["global_acc"]) if shared else None
        lead_p = f["personalized_acc"] >= rivals[best_p]["personalized_acc"] - 1e-12
        lead_g = best_g is None or f["global_acc"] >= shared[best_g]["global_acc"] - 1e-12
        verdict = "FedCoE leads" if lead_p and lead_g else "FedCoE does NOT lead"
        text = (f"**{s_name}: {verdict}** (personalized {f['personalized_acc']:.3f} vs best "
                f"baseline {best_p} {rivals[best_p]['personalized_acc']:.3f}")
        if best_g:
            text += (f"; global {f['global_acc']:.3f} vs best baseline {best_g} "
                     f"{shared[best_g]['global_acc']:.3f}")
        text += f"; {int(f['seeds'])} seed(s)). "
        met = sum(g["status"] == "met" for g in block["goals"])
        notmet = [g["goal"] for g in block["goals"] if g["status"] == "NOT met"]
        pending = sum(g["status"] == "pending" for g in block["goals"])
        text += f"Goals met {met}/{len(block['goals'])}"
        text += f" ({pending} pending: a run they need is missing)" if pending else ""
        text += f"; NOT met: {'; '.join(notmet)}." if notmet else "."
        out += [text, ""]
        if not (lead_p and lead_g):
            out += _why_lines(block)
    return out


def _why_lines(block: dict[str, Any]) -> list[str]:
    """Diagnostics when FedCoE does not lead: expert shares, what each level adds."""
    d = block.get("diagnostics", {}).get("fedcoe")
    if not d:
        return []
    share = " / ".join(f"{x:.2f}" for x in d.get("expert_share", []))
    return [f"Diagnostics (FedCoE, mean over seeds): expert shares {share}; personal mixture "
            f"{_num(d.get('personal_acc'))}, global path alone {_num(d.get('global_path_acc'))}, "
            f"local experts alone {_num(d.get('local_acc'))} (personal - global path "
            f"{_num(d.get('personal_vs_global_path'))}); gate entropy (normalized) "
            f"{_num(d.get('gate_entropy_norm'))}; distinct expert sets "
            f"{d.get('distinct_expert_sets', '-')}.", ""]


def _setting_lines(grid: CamGrid, s_name: str, block: dict[str, Any]) -> list[str]:
    from fedcoe_edge.simulation import diagnostics_table

    s = parse_setting(s_name)
    algos = block["algorithms"]
    lines = [f"## {s_name}: {s.describe()}", "",
             "| algorithm | global acc | personalized acc | cold-start acc | global std, last "
             f"{STABILITY_ROUNDS} rounds | up KB/client/round (vs FedAvg) | slope/round, last "
             "quarter | CPU s/run | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    ref = algos.get("fedavg")
    for a in grid.algorithms:
        m = algos.get(a)
        if m is None:
            lines.append(f"| {a} | not run | not run | not run | - | - | - | - | 0 |")
            continue
        up = m["bytes_up_per_client_round"]
        ratio = f" ({up / ref['bytes_up_per_client_round']:.2f}x)" if ref else ""
        c = block["convergence"].get(a)
        sl = "-" if not c or c.get("slope_per_round") is None else f"{c['slope_per_round']:+.5f}"
        stab = ("n/a" if m.get("global_std_last20") is None else
                f"{m['global_std_last20']:.4f} ± {m['global_std_last20_std']:.4f}")
        lines.append(f"| {a} | {_pm(m, 'global_acc')} | {_pm(m, 'personalized_acc')} | "
                     f"{_pm(m, 'cold_start_acc')} | {stab} | {up / 1024:.1f}{ratio} | {sl} | "
                     f"{m['cpu_s']:.0f} | {int(m['seeds'])} |")
    lines.append("")
    if block.get("macs"):
        mc = block["macs"]
        lines += [f"Head MACs per input (on the {FEATURE_DIM}-d features): FedCoE active path "
                  f"{mc['fedcoe'] / 1e6:.3f}M, each baseline's head {mc['baseline'] / 1e6:.3f}M "
                  f"(ratio {mc['ratio']:.3f}); the frozen trunk adds the same "
                  f"{grid_trunk_macs() / 1e6:.1f}M to every algorithm.", ""]
    if block["convergence"]:
        c0 = next(iter(block["convergence"].values()))
        lines += [f"Convergence: slope = change of global accuracy (personalized for local) "
                  f"from round {c0['from_round']} to {c0['to_round']}, per round, mean over "
                  "seeds.", ""]
    if block.get("labels"):
        parts = [f"seed {seed}: {100 * c['cold_share_in_rare']:.0f}% (classes "
                 f"{c['rare_classes']}; cold-start images per class {c['cold_per_class']}, "
                 f"training {c['train_per_class']})" for seed, c in block["labels"].items()]
        lines += ["Label coverage: share of the cold-start clients' images whose class is under "
                  "1% of the training clients' images (the partition draws over all 24 clients, "
                  f"so strong skew can hand a class to the cold-start clients): {'; '.join(parts)}.",
                  ""]
    lines += ["Goals:", "", *goals_table([Goal(**g) for g in block["goals"]]), ""]
    if block.get("diagnostics"):
        lines += ["FedCoE diagnostics (mean over seeds):", "",
                  *diagnostics_table(block["diagnostics"]), ""]
    lines += [f"![{s_name}: accuracy vs upload](camera_grid.png)", ""]
    return lines


@functools.lru_cache(maxsize=1)
def grid_trunk_macs() -> int:
    """The V3-Small trunk's MACs per 64x64 image (what every algorithm runs once per image)."""
    from fedcoe_edge.flops import count_macs
    from fedcoe_edge.mobilenet import mobilenet_v3_small_trunk

    return int(count_macs(mobilenet_v3_small_trunk(), input_shape=(1, 3, SIZE, SIZE)).macs)


def _cameras_lines(meta: dict[str, Any]) -> list[str]:
    lines = ["## The cameras (fixed before any run)", "",
             f"Drawn once from seed {meta['prep']['camera_seed']} (client i from the stream "
             f"[{meta['prep']['camera_seed']}, i], `fedcoe_edge.data.shift.random_camera`, "
             f"strength {meta['prep']['strength']:g}): rotation in degrees, contrast multiplies, "
             "brightness is added, blur is a Gaussian sigma in px at 64x64, noise is the std of "
             "additive Gaussian noise drawn per image. Clients new0.. are the cold-start "
             "clients; the global test set uses a fresh camera per image from the same "
             "distribution.", "",
             "| client | angle | contrast | brightness | blur | noise |", "|---|---|---|---|---|---|"]
    for cid, c in meta["cameras"].items():
        lines.append(f"| {cid} | {c['angle']:+.1f} | {c['contrast']:.3f} | {c['brightness']:.3f} "
                     f"| {c['blur']:.3f} | {c['noise']:.3f} |")
    return [*lines, ""]


def _env_lines(meta: dict[str, Any]) -> list[str]:
    e = meta["env"]
    return ["## Reproducibility", "",
            f"torch {e['torch']}, onnxruntime {e['onnxruntime']}, numpy {e['numpy']}, Python "
            f"{e['python']}; {e['torch_threads']} torch thread, deterministic algorithms; CPU "
            f"{e['cpu']} ({e['cpus']} cores), flags {', '.join(e['cpu_flags']) or 'none'}. The "
            "same commit, seed and machine give the same numbers bit for bit "
            "(tests/test_camera_grid.py runs a tiny grid twice and compares).", ""]


def plot_pareto(doc: dict[str, Any], path: Path) -> None:
    """Accuracy vs bytes uploaded per client per round, one panel per setting: personalized
    (filled) and global (hollow) accuracy per algorithm, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcoe_edge.plots import MARKERS

    blocks = {s: b for s, b in doc["settings"].items() if b["algorithms"]}
    if not blocks:
        return
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.5 * len(blocks), 4.4), squeeze=False)
    for ax, (s_name, block) in zip(axes[0], blocks.items(), strict=True):
        for i, (a, m) in enumerate(block["algorithms"].items()):
            kb = m["bytes_up_per_client_round"] / 1024
            color = f"C{i % 10}"
            ax.scatter([kb], [m["personalized_acc"]], marker=MARKERS[i % len(MARKERS)],
                       color=color, s=60, label=a)
            if not m.get("no_shared_model"):
                ax.scatter([kb], [m["global_acc"]], marker=MARKERS[i % len(MARKERS)],
                           facecolors="none", edgecolors=color, s=60)
        ax.set_xlabel("upload KB per client per round")
        ax.set_ylabel("test accuracy (filled: personalized, hollow: global)")
        ax.set_title(s_name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.camera_grid",
        description="The deployed setting's accuracy grid: Fashion-MNIST at 64x64 through one "
        "camera per client (rotation, contrast, brightness, blur, noise; drawn once, fixed), "
        "a frozen MobileNetV3-Small trunk pretrained on a public slice (features computed once "
        "per image and cached), FedCoE and every baseline on the features with heads of the "
        "same active MACs. Phase 'tune' picks each algorithm's knobs on VALIDATION splits "
        "(same budget and lr values for all; camera_tuned.json); phase 'grid' runs them on 3 "
        "seeds and scores the test splits once. Finished runs are cached (jsonl), so "
        "re-running resumes. Exit 2 with one line on bad input (a client with no training "
        "sample, a trunk file whose sha256 differs) before any training.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--phase", choices=("all", "tune", "grid"), default="all",
                   help="tune (validation only), grid (needs camera_tuned.json), or both")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                   help="comma-separated cam-dir<alpha>-<percent of the client pool>")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated; names not registered are skipped with a line")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the grid")
    p.add_argument("--rounds", type=int, default=30, help="rounds per grid run")
    p.add_argument("--tune-rounds", type=int, default=10, help="rounds per tuning run")
    p.add_argument("--local-epochs", type=int, default=1,
                   help="local epochs per round, the same for every algorithm")
    p.add_argument("--min-samples", type=int, default=MIN_SAMPLES,
                   help="Dirichlet partition: fewest images per client")
    p.add_argument("--test-samples", type=int, default=TEST_SAMPLES,
                   help="stratified subset of the official test split as the global test set "
                   "(0 = all 10,000)")
    p.add_argument("--trunk", type=Path, default=None,
                   help="a pretrained trunk safetensors file to use instead of pretraining "
                   "(needs --trunk-sha256)")
    p.add_argument("--trunk-sha256", default=None, help="the sha256 --trunk must have")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help="trunk file and feature cache (npz)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: setting cam-dir0.5-10, {QUICK_CLIENTS}+"
                   f"{QUICK_NEW_CLIENTS} clients, {QUICK_ROUNDS} rounds, seed 0, "
                   f"{QUICK_TEST_SAMPLES} test images, fedcoe and fedavg, untuned")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from caches")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the top of the report (e.g. why a setting was not run); "
                   "repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in names(text)]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        given = list(sys.argv[1:] if argv is None else argv)
        shown = [("..." if i and given[i - 1] == "--note" else g) for i, g in enumerate(given)]
        return run(args, " ".join(["python -m benchmarks.camera_grid", *shown]))
    except FedCoEError as exc:
        print(f"benchmarks.camera_grid: error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, command: str) -> int:
    from fedcoe_edge.io import atomic_write_text
    from fedcoe_edge.strategies import STRATEGIES

    t_start = time.perf_counter()
    settings = names(args.settings)
    algorithms = names(args.algorithms)
    seeds = _int_list(args.seeds)
    rounds, tune_rounds = args.rounds, args.tune_rounds
    prep = Prep(min_samples=args.min_samples, test_samples=args.test_samples,
                data_dir=args.data_dir)
    if args.quick:
        settings, algorithms, seeds = ["cam-dir0.5-10"], ["fedcoe", "fedavg"], [0]
        rounds = QUICK_ROUNDS
        prep = dataclasses.replace(prep, clients=QUICK_CLIENTS, new_clients=QUICK_NEW_CLIENTS,
                                   test_samples=QUICK_TEST_SAMPLES)
    for s in settings:
        parse_setting(s)
    if rounds < 1 or tune_rounds < 1 or not seeds or args.jobs < 1 or args.local_epochs < 1:
        raise ConfigError("--rounds, --tune-rounds, --local-epochs and --jobs must be >= 1, "
                          "--seeds non-empty")
    if (args.trunk is None) != (args.trunk_sha256 is None):
        raise ConfigError("--trunk and --trunk-sha256 go together")
    skipped = {a: "not registered in fedcoe_edge.strategies yet (no such algorithm to run)"
               for a in algorithms if a not in STRATEGIES}
    algorithms = [a for a in algorithms if a in STRATEGIES]
    for a, why in skipped.items():
        say(f"skipping {a}: {why}")
    # bad input first, before any training: every job's partition, then the trunk's hash
    all_seeds = sorted({*seeds, TUNE_SEED})
    for s in [*settings, *([TUNE_SETTING] if args.phase != "grid" and not args.quick else [])]:
        for seed in all_seeds:
            split_setting(parse_setting(s), seed, prep)
    work: Path = args.work
    if args.trunk is not None:
        trunk = Trunk(str(args.trunk), args.trunk_sha256, {"sha256": args.trunk_sha256})
        check_trunk(trunk)
    else:
        trunk = ensure_trunk(work, args.data_dir)
    out: Path = args.out
    suffix = "_quick" if args.quick else ""
    tune_cache = out / f"camera_grid_tuning_cache{suffix}.jsonl"
    grid_cache = out / f"camera_grid_cache{suffix}.jsonl"
    tuned_path = out / f"camera_tuned{suffix}.json"
    feat_dir = work / "features"
    commit = git_commit()

    # --- tuning (validation splits only) ------------------------------------------------
    tune_setting = settings[0] if args.quick else TUNE_SETTING
    tune = {f"{a}#{i}": CamGrid([tune_setting], [a], [TUNE_SEED], tune_rounds, trunk, prep,
                                split="val", knobs={a: k}, local_epochs=args.local_epochs)
            for a in algorithms for i, k in enumerate(tune_knobs(a))}
    tdone = load_cache(tune_cache)
    if args.phase in ("all", "tune") and not args.report_only and not args.quick:
        todo = [(n, g) for n, g in tune.items()
                if g.key(tune_setting, g.algorithms[0], TUNE_SEED) not in tdone]
        say(f"tuning: {len(tune)} runs ({BUDGET} per algorithm), {len(tune) - len(todo)} cached, "
            f"{len(todo)} to go at {tune_setting}, seed {TUNE_SEED}, {tune_rounds} rounds")
        _run(todo, lambda j: (j[1], tune_setting, j[1].algorithms[0], TUNE_SEED, str(feat_dir)),
             lambda j: j[1].key(tune_setting, j[1].algorithms[0], TUNE_SEED), tdone, tune_cache,
             commit, args, "tuning")
    tdoc = tuning_doc(tune, tdone, algorithms)
    if not args.quick:
        old = json.loads(tuned_path.read_text()) if tuned_path.is_file() else {}
        for a, rows in (old.get("scores") or {}).items():  # algorithms not run here keep theirs
            if a not in tdoc["scores"]:
                tdoc["scores"][a] = rows
                if a in (old.get("tuned") or {}):
                    tdoc["tuned"][a] = old["tuned"][a]
        tdoc["meta"] = {"setting": tune_setting, "seed": TUNE_SEED, "rounds": tune_rounds,
                        "split": "val", "budget": BUDGET, "lrs": list(LRS),
                        "own_knobs": OWN_KNOBS, "commit": commit}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(tuned_path, json.dumps(jsonable(tdoc), indent=2) + "\n")
    if args.phase == "tune":
        say(f"wrote {tuned_path}")
        return 0

    # --- the grid (test splits, read once) ----------------------------------------------
    untuned = [a for a in algorithms if a not in tdoc["tuned"]] if not args.quick else []
    for a in untuned:
        skipped[a] = "no tuned knobs yet (its tuning runs have not all finished)"
        say(f"skipping {a} in the grid: {skipped[a]}")
    grid = CamGrid(settings, [a for a in algorithms if a not in untuned], seeds, rounds, trunk,
                   prep, knobs={} if args.quick else dict(tdoc["tuned"]),
                   local_epochs=args.local_epochs)
    done = load_cache(grid_cache)
    jobs = grid.jobs()
    todo_jobs = [j for j in jobs if grid.key(*j) not in done]
    cams = camera_params(prep.clients + prep.new_clients, prep.camera_seed, prep.strength)
    cam_ids = [str(i) for i in range(prep.clients)] + [f"new{j}" for j in range(prep.new_clients)]

    def meta() -> dict[str, Any]:
        recs = [done[k] for j in jobs if (k := grid.key(*j)) in done]
        return {"command": command, "commit": commit,
                "run_commits": sorted({r.get("commit", "?") for r in recs}),
                "runs_total": len(jobs), "runs_done": len(recs),
                "complete": len(recs) == len(jobs),
                "cpu_s": float(sum(r.get("cpu_s", 0.0) for r in recs)),
                "invocation_wall_s": time.perf_counter() - t_start,
                "settings": settings, "seeds": seeds, "rounds": rounds,
                "tune_rounds": tune_rounds, "notes": list(args.note),
                "trunk": {"sha256": trunk.sha256,
                          **{k: v for k, v in trunk.info.items()
                             if k in ("val_acc", "epochs", "samples", "val_samples", "cpu_s")}},
                "prep": prep.to_dict(),
                "cameras": {cid: c.to_dict() for cid, c in zip(cam_ids, cams, strict=True)},
                "env": env_info()}

    def report() -> None:
        doc = build_doc(grid, done, skipped, tdoc["tuned"], meta(), tdoc["scores"])
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"camera_grid{suffix}.json", json.dumps(jsonable(doc), indent=2)
                          + "\n")
        atomic_write_text(out / f"camera_grid{suffix}.md", render(doc, grid))
        plot_pareto(doc, out / f"camera_grid{suffix}.png")

    if not args.report_only and todo_jobs:
        say(f"grid: {len(jobs)} runs, {len(jobs) - len(todo_jobs)} cached, {len(todo_jobs)} "
            f"to go, {rounds} rounds each")
        _run(todo_jobs, lambda j: (grid, *j, str(feat_dir)), lambda j: grid.key(*j), done,
             grid_cache, commit, args, "grid", report)
    report()
    say(f"wrote {out}/camera_grid{suffix}.md, .json, .png ({meta()['runs_done']}/"
        f"{len(jobs)} runs)")
    return 0


def _run(todo: Sequence[Any], args_of: Callable[[Any], tuple[Any, ...]],
         key_of: Callable[[Any], str], done: dict[str, dict[str, Any]], cache: Path,
         commit: str, args: argparse.Namespace, desc: str,
         after: Callable[[], None] | None = None) -> None:
    """Run jobs in the pool; every finished one is appended to ``cache`` with a progress line."""
    if not todo:
        return
    t0 = time.perf_counter()
    count = 0

    def on_done(job: Any, rec: dict[str, Any]) -> None:
        nonlocal count
        rec["key"], rec["commit"] = key_of(job), commit
        append_cache(cache, rec)
        done[rec["key"]] = rec
        count += 1
        m = rec["metrics"]
        say(f"{desc} {count}/{len(todo)}: {rec['setting']} {rec['algorithm']} seed {rec['seed']} "
            f"knobs {rec['knobs']}: global {m['global_acc']:.4f}, personalized "
            f"{m['personalized_acc']:.4f}, cold {m['cold_start_acc']:.4f} "
            f"({rec['cpu_s']:.0f} CPU s; {time.perf_counter() - t0:.0f} s so far)")
        if after is not None:
            after()

    run_pool(todo, run_job, args_of, on_done, args.jobs, desc,
             progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
