"""Accuracy of the trained camera-size FedCoE bundle: torch fp32, ONNX fp32 and ONNX int8.

The latency benchmark times the camera bundle (MobileNetV3-Small trunk, K=8 + M=2 MLP heads,
top-2) with random weights: it says how fast, not whether int8 keeps a trained model's
answers. This script trains that model on real data and measures it:

1. **Data.** Fashion-MNIST (the Debian IDX files), upsampled bilinearly from 28x28 to
   ``--size`` (default 64: the V3-Small trunk downsamples 32x, so 64 leaves a 2x2 map before
   the pool; 96 costs 2.3x the trunk time on the 2-core development VM) and repeated to 3
   channels, in [0, 1]. The official train split is cut into a **public slice**
   (``--public-fraction``, stratified; only the coordinator sees it) and the **client pool**
   (``--data-fraction`` of the train split, stratified, from what the public slice left);
   the two never overlap, and neither touches the official test split.
2. **Pretraining at the coordinator.** The trunk plus a linear classifier, trained on the
   public slice (``--pretrain-epochs``); the trunk is saved as a safetensors file with its
   sha256 (``model.trunk_weights`` / ``trunk_sha256``, docs/design.md "Trunk modes"). The
   training is the library's (``fedcoe_edge.pretrain.pretrain_trunk``, the verb behind
   ``fedcoe pretrain-trunk``, which cuts the same public slice for the same seed).
3. **Federation.** FedCoE in the in-process simulator (``fedcoe_edge.simulation.run_one``)
   with ``trunk_mode = "frozen"``: the pretrained trunk is loaded after its hash check and
   neither trained nor exchanged; the pool is split Dirichlet(``--alpha``) over
   ``--clients`` clients (60/15/25 train/validation/test each). Every step still runs the
   trunk forward (there is no feature cache).
4. **Export.** One client's model (global state + its local level, all K global experts) as
   an int8 bundle (static QDQ, calibrated on ``--calibration-samples`` of that client's
   training split) with fp32 parity copies (``export.bundle.build_bundle``).
5. **Measure** top-1 on the official test split (all 10,000 images, or a stratified
   ``--test-samples`` subset): torch fp32 (``DualLevelMoE``), ONNX fp32 and ONNX int8 (both
   through ``fedcoe_edge.runtime.MoESession``), for the global path (what the fleet shares)
   and the client's personal mixture; plus int8-vs-fp32 top-1 agreement. The goal: int8
   global-path top-1 within 1 point of torch fp32.

    python -m benchmarks.camera_accuracy            # make bench-camera; ~15 min on 1 thread

Writes ``camera_accuracy.json`` and ``camera_accuracy.md`` under ``--out`` and puts the same
table into ``latency.md`` between the markers of :data:`SECTION_START` / :data:`SECTION_END`
(``benchmarks.report`` keeps it there when it rewrites ``latency.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.pretrain import holdout_split, pretrain_trunk, public_indices, to_camera

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SECTION_START = "<!-- camera-accuracy:start (benchmarks/camera_accuracy.py) -->"
SECTION_END = "<!-- camera-accuracy:end -->"
GOAL_POINTS = 1.0  # int8 top-1 within this many points of fp32 (the product goal)
JSON_NAME = "camera_accuracy.json"
MD_NAME = "camera_accuracy.md"

__all__ = [
    "CameraData",
    "embed_section",
    "evaluate",
    "load_camera_data",
    "main",
    "markdown",
    "pretrain_trunk",
    "to_camera",
    "train_federation",
]


def _say(msg: str) -> None:
    print(f"[camera-accuracy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ data


@dataclass
class CameraData:
    """The three disjoint sources of the run, at 28x28 (upsampled on use) with their
    positions in the official splits, so disjointness can be checked and reported."""

    x_public: np.ndarray
    y_public: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    public_idx: np.ndarray  # positions in the official train split
    pool_idx: np.ndarray  # positions in the official train split
    test_idx: np.ndarray  # positions in the official test split


def load_camera_data(public_fraction: float, data_fraction: float, test_samples: int,
                     seed: int, data_dir: str | None = None,
                     splits: tuple[tuple[np.ndarray, np.ndarray],
                                   tuple[np.ndarray, np.ndarray]] | None = None) -> CameraData:
    """Cut Fashion-MNIST's official train split into a public slice (the coordinator's) and a
    client pool, both stratified and disjoint; keep the official test split (whole, or a
    stratified ``test_samples`` subset when > 0). ``data_fraction`` is a share of the whole
    train split; ``splits`` passes ``load_fmnist``'s result to skip reading the files."""
    from fedcoe_edge.data.federation import stratified_subset
    from fedcoe_edge.data.fmnist import load_fmnist
    from fedcoe_edge.errors import ConfigError

    if not 0 < public_fraction < 1 or not 0 < data_fraction < 1:
        raise ConfigError(f"public and client fractions must be in (0, 1), got "
                          f"{public_fraction} and {data_fraction}")
    if public_fraction + data_fraction > 1:
        raise ConfigError(f"public + client fractions must be <= 1 (disjoint slices), got "
                          f"{public_fraction} + {data_fraction}")
    (x, y), (xt, yt) = splits if splits is not None else load_fmnist(data_dir)
    public = public_indices(y, public_fraction, seed)  # what `fedcoe pretrain-trunk` cuts
    rest = np.setdiff1d(np.arange(len(y)), public)
    share = min(1.0, data_fraction / (1.0 - public_fraction))
    pool = rest[stratified_subset(y[rest], share, np.random.default_rng([seed, 12]))]
    assert not np.intersect1d(public, pool).size  # disjoint by construction
    if test_samples and test_samples < len(yt):
        test = stratified_subset(yt, test_samples / len(yt), np.random.default_rng([seed, 13]))
    else:
        test = np.arange(len(yt))
    return CameraData(x[public], y[public], x[pool], y[pool], xt[test], yt[test],
                      public, pool, test)


# ----------------------------------------------------------------------------- federation


def camera_fmnist_config(size: int, trunk_file: str, trunk_sha256: str) -> Any:
    """The latency benchmark's camera model (``benchmarks.fedcoe.camera_config``) at
    ``size`` px with Fashion-MNIST's 10 classes and the pretrained trunk, frozen."""
    from benchmarks.fedcoe import camera_config
    from fedcoe_edge.config import ModelConfig

    base = camera_config(size)
    return ModelConfig.from_dict({**base.to_dict(), "num_classes": 10, "trunk_mode": "frozen",
                                  "trunk_weights": trunk_file, "trunk_sha256": trunk_sha256})


def train_federation(data: CameraData, size: int, model_cfg: Any, train_cfg: Any, clients: int,
                     alpha: float, rounds: int, seed: int, min_samples: int = 20,
                     num_classes: int = 10, log: Callable[[str], None] = _say) -> tuple[Any, Any]:
    """FedCoE on the client pool (upsampled) with the simulator's loop; returns the
    ``RunResult`` and the ``Federation``. The global test set is the (upsampled) official
    test selection, scored once, after the last round."""
    from fedcoe_edge.data import Federation
    from fedcoe_edge.data.federation import split_client
    from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec
    from fedcoe_edge.simulation import SimulationConfig, run_one

    x_pool = to_camera(data.x_pool, size)
    rng = np.random.default_rng(seed)
    parts = PARTITIONERS["dirichlet"](data.y_pool, clients, rng,
                                      PartitionSpec("dirichlet", alpha, min_samples))
    fed_clients = {str(i): split_client(x_pool, data.y_pool, part, rng, str(i), 0.15, 0.25)
                   for i, part in enumerate(parts)}
    del x_pool  # the clients hold their own copies
    fed = Federation(fed_clients, {}, to_camera(data.x_test, size), data.y_test,
                     (3, size, size), num_classes,
                     meta={"dataset": "fmnist-camera", "partition": "dirichlet", "alpha": alpha,
                           "seed": seed})
    sim = SimulationConfig(dataset="fmnist-camera", alpha=alpha, clients=clients, new_clients=0,
                           rounds=rounds, algorithms=["fedcoe"], seeds=[seed],
                           min_samples=min_samples, eval_every=rounds, model=model_cfg,
                           train=train_cfg)
    t0 = time.perf_counter()

    def tick(rnd: int, point: dict[str, float]) -> None:
        extra = f", global acc {point['global_acc']:.4f}" if "global_acc" in point else ""
        log(f"federation round {rnd}/{rounds} ({time.perf_counter() - t0:.0f} s){extra}")

    run = run_one("fedcoe", fed, sim, seed, on_round=tick)
    return run, fed


# ------------------------------------------------------------------------------ measuring


def _batched(fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], x: np.ndarray,
             batch: int) -> tuple[np.ndarray, np.ndarray]:
    outs = [fn(x[i:i + batch]) for i in range(0, len(x), batch)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def predictions(model: Any, bundle: Path, x: np.ndarray, batch: int = 256
                ) -> dict[str, dict[str, np.ndarray]]:
    """Top-1 class of every input, per runtime ("torch_fp32", "onnx_fp32", "onnx_int8") and
    path ("global": the global path, "personal": the client's personal mixture)."""
    import torch

    from fedcoe_edge.runtime import MoESession

    def torch_fn(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(xb)))
        return out.global_log_probs.argmax(1).numpy(), out.log_probs.argmax(1).numpy()

    model.eval()
    preds: dict[str, dict[str, np.ndarray]] = {}
    g, p = _batched(torch_fn, x, batch)
    preds["torch_fp32"] = {"global": g, "personal": p}
    for name, precision in (("onnx_fp32", "fp32"), ("onnx_int8", "deployed")):
        sess = MoESession(bundle, precision=precision)

        def ort_fn(xb: np.ndarray, sess: MoESession = sess) -> tuple[np.ndarray, np.ndarray]:
            out = sess.run(np.ascontiguousarray(xb))
            return out.global_probs.argmax(1), out.probs.argmax(1)

        g, p = _batched(ort_fn, x, batch)
        preds[name] = {"global": g, "personal": p}
    return preds


def evaluate(preds: dict[str, dict[str, np.ndarray]], y: np.ndarray) -> dict[str, Any]:
    """Top-1 accuracy per runtime and path, and top-1 agreement between runtimes."""
    acc = {rt: {path: float((p == y).mean()) for path, p in paths.items()}
           for rt, paths in preds.items()}
    pairs = (("onnx_int8", "onnx_fp32"), ("onnx_int8", "torch_fp32"), ("onnx_fp32", "torch_fp32"))
    agree = {f"{a}_vs_{b}": {path: float((preds[a][path] == preds[b][path]).mean())
                             for path in preds[a]} for a, b in pairs}
    return {"top1": acc, "agreement": agree, "samples": int(len(y))}


def goal(result: dict[str, Any]) -> dict[str, Any]:
    """int8 global-path top-1 within GOAL_POINTS of fp32 (torch; ONNX fp32 shown too)."""
    top1 = result["top1"]
    gap = 100.0 * (top1["torch_fp32"]["global"] - top1["onnx_int8"]["global"])
    gap_onnx = 100.0 * (top1["onnx_fp32"]["global"] - top1["onnx_int8"]["global"])
    return {"goal_points": GOAL_POINTS, "int8_minus_fp32_points": -gap,
            "int8_minus_onnx_fp32_points": -gap_onnx, "met": gap <= GOAL_POINTS}


# -------------------------------------------------------------------------------- report


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _points(v: float) -> str:
    return f"{v + 0.0:+.2f}" if round(v, 2) else "0.00"  # no "-0.00"


def markdown(doc: dict[str, Any], heading: str = "#", cross: dict[str, Any] | None = None
             ) -> str:
    """The table and how it was made, as Markdown (``heading``: the level of its title);
    ``cross``: a ``cross_arch.json`` of the same results folder, whose x86 vs aarch64
    agreement is added (docs/bundle.md, "Same answers on every CPU")."""
    c, r, g = doc["config"], doc["result"], doc["goal"]
    top1, agree = r["top1"], r["agreement"]
    names = {"torch_fp32": "torch fp32 (`DualLevelMoE`)",
             "onnx_fp32": "ONNX fp32 (`MoESession`, parity copies)",
             "onnx_int8": "ONNX int8 (`MoESession`, deployed files)"}
    test = ("the official test split, all 10,000 images" if r["samples"] == 10000
            else f"a stratified {r['samples']:,}-image subset of the official test split")
    lines = [
        f"{heading} Trained camera bundle: accuracy of fp32 and int8",
        "",
        f"FedCoE with the camera model of this benchmark (MobileNetV3-Small trunk, K="
        f"{c['num_global_experts']} + M={c['num_local_experts']} MLP heads of width "
        f"{c['expert_hidden']}, top-{c['top_k']}) trained on Fashion-MNIST upsampled to "
        f"{c['size']}x{c['size']} and repeated to 3 channels. The trunk was pretrained at the "
        f"coordinator on a public slice of the train split ({doc['data']['public']:,} images: "
        f"{doc['pretrain']['samples']:,} to fit, {doc['pretrain']['epochs']} epochs; "
        f"{doc['pretrain']['val_samples']:,} to check it, where trunk + linear head scored "
        f"{_pct(doc['pretrain']['val_acc'])} in eval mode; sha256 "
        f"`{doc['pretrain']['sha256'][:12]}...`) and "
        f"frozen in the federation ({c['clients']} clients, Dirichlet({c['alpha']}), "
        f"{doc['data']['pool']:,} images disjoint from the public slice, {c['rounds']} rounds, "
        f"{c['local_epochs']} local epoch(s) per round). Client {c['client']}'s bundle (all "
        f"{c['num_global_experts']} global experts, static int8 calibrated on "
        f"{c['calibration_samples']} of its training images) is scored on {test}.",
        "",
        "| runtime | global path top-1 | personal mixture top-1 |",
        "|---|---|---|",
    ]
    for rt in ("torch_fp32", "onnx_fp32", "onnx_int8"):
        lines.append(f"| {names[rt]} | {100 * top1[rt]['global']:.2f}% | "
                     f"{100 * top1[rt]['personal']:.2f}% |")
    lines += [
        "",
        "| top-1 agreement | global path | personal mixture |",
        "|---|---|---|",
    ]
    for key, label in (("onnx_int8_vs_onnx_fp32", "int8 vs ONNX fp32"),
                       ("onnx_int8_vs_torch_fp32", "int8 vs torch fp32"),
                       ("onnx_fp32_vs_torch_fp32", "ONNX fp32 vs torch fp32")):
        lines.append(f"| {label} | {100 * agree[key]['global']:.2f}% | "
                     f"{100 * agree[key]['personal']:.2f}% |")
    verdict = "**met**" if g["met"] else "**NOT met**"
    lines += [
        "",
        f"Goal: int8 global-path top-1 within {g['goal_points']:.0f} point of fp32: {verdict} "
        f"(int8 - torch fp32 = {_points(g['int8_minus_fp32_points'])} points; int8 - ONNX fp32 "
        f"= {_points(g['int8_minus_onnx_fp32_points'])}). The personal mixture is client "
        f"{c['client']}'s own model, scored here on the balanced test split (its own test "
        f"split: {100 * doc['client_own_test']['torch_fp32']:.2f}% torch fp32, "
        f"{100 * doc['client_own_test']['onnx_int8']:.2f}% int8, "
        f"{doc['client_own_test']['samples']} images); the simulator's personalized accuracy "
        f"over all clients was {100 * doc['simulation']['personalized_acc']:.2f}%.",
        "",
        f"Bundle: {doc['bundle']['deployed_bytes'] / 1e6:.2f} MB int8 deployed "
        f"({doc['bundle']['fp32_bytes'] / 1e6:.2f} MB fp32). CPU: {doc['env']['cpu']}, 1 torch "
        f"thread; {doc['timing']['total_s'] / 60:.1f} min in all (pretraining "
        f"{doc['timing']['pretrain_s'] / 60:.1f}, federation "
        f"{doc['timing']['federation_s'] / 60:.1f}, export {doc['timing']['export_s'] / 60:.1f}, "
        f"scoring {doc['timing']['evaluate_s'] / 60:.1f}). Command: `{doc['command']}`.",
    ]
    if cross is not None:
        from benchmarks.cross_arch import agreement_lines

        lines += ["", *agreement_lines(cross)]
    return "\n".join(lines) + "\n"


def embed_section(text: str, section: str) -> str:
    """``text`` with ``section`` between the camera markers: replaced where the markers are,
    appended otherwise (so ``latency.md`` carries it whoever wrote last)."""
    block = f"{SECTION_START}\n{section.rstrip()}\n{SECTION_END}"
    start, end = text.find(SECTION_START), text.find(SECTION_END)
    if start != -1 and end > start:
        return text[:start] + block + text[end + len(SECTION_END):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def section_from(results: Path) -> str | None:
    """The latency report's section from ``results/camera_accuracy.json``, if there is one."""
    path = results / JSON_NAME
    if not path.is_file():
        return None
    return markdown(json.loads(path.read_text()), heading="##", cross=_cross(results))


def _cross(results: Path) -> dict[str, Any] | None:
    """The ``cross_arch.json`` beside the camera report, if one was run."""
    from benchmarks.cross_arch import JSON_NAME as CROSS_JSON

    path = results / CROSS_JSON
    return json.loads(path.read_text()) if path.is_file() else None


def write_reports(doc: dict[str, Any], out: Path) -> None:
    """``camera_accuracy.json`` / ``.md`` and the section in ``latency.md`` (if present)."""
    from fedcoe_edge.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    cross = _cross(out)
    atomic_write_text(out / JSON_NAME, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(out / MD_NAME, markdown(doc, cross=cross))
    latency = out / "latency.md"
    if latency.is_file():
        atomic_write_text(latency, embed_section(latency.read_text(),
                                                 markdown(doc, heading="##", cross=cross)))


# ---------------------------------------------------------------------------------- main


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from benchmarks.harness import cpu_model
    from export.bundle import build_bundle, bundle_sizes, calibration_sample
    from export.quantize import Activations, QuantizeOptions, QuantMode
    from fedcoe_edge.config import TrainConfig
    from fedcoe_edge.simulation import client_model

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()
    data = load_camera_data(args.public_fraction, args.data_fraction, args.test_samples,
                            args.seed, args.data_dir)
    _say(f"data: {len(data.y_public):,} public (coordinator), {len(data.y_pool):,} client pool, "
         f"{len(data.y_test):,} test images at {args.size}x{args.size}")

    t0 = time.perf_counter()
    # a tenth of the public slice scores the pretrained trunk (never the test split); the
    # library's verb (`fedcoe pretrain-trunk`) makes the same cut and the same file
    fit, val = holdout_split(data.y_public, 0.1, args.seed)
    pre = pretrain_trunk(data.x_public[fit], data.y_public[fit], args.size, args.pretrain_epochs,
                         work / "trunk_pretrained.safetensors", seed=args.seed,
                         lr=args.pretrain_lr, x_val=data.x_public[val], y_val=data.y_public[val],
                         log=_say)
    timing["pretrain_s"] = time.perf_counter() - t0
    _say(f"trunk saved: {pre['file']} sha256 {pre['sha256'][:16]}...")

    cfg = camera_fmnist_config(args.size, pre["file"], pre["sha256"])
    train = TrainConfig(local_epochs=args.local_epochs, lr=args.lr, batch_size=args.batch_size)
    t0 = time.perf_counter()
    result, fed = train_federation(data, args.size, cfg, train, args.clients, args.alpha,
                                   args.rounds, args.seed)
    timing["federation_s"] = time.perf_counter() - t0
    sim = {k: float(v) for k, v in result.metrics.items()}
    _say(f"federation done: global acc {sim['global_acc']:.4f}, personalized "
         f"{sim['personalized_acc']:.4f} ({timing['federation_s']:.0f} s)")

    client = str(args.client)
    model = client_model(result, client)
    t0 = time.perf_counter()
    bundle = work / f"bundle_client{client}"
    calib = calibration_sample(fed.clients[client].x_train, args.calibration_samples, args.seed)
    manifest = build_bundle(model, bundle, calibration=calib,
                            options=QuantizeOptions(mode=QuantMode.STATIC,
                                                    activations=Activations(args.activations),
                                                    calibration_samples=args.calibration_samples),
                            include_fused=False, meta={"benchmark": "camera_accuracy"})
    timing["export_s"] = time.perf_counter() - t0
    sizes = bundle_sizes(manifest)
    _say(f"exported int8 bundle {bundle} ({timing['export_s']:.0f} s)")

    t0 = time.perf_counter()
    preds = predictions(model, bundle, fed.x_global_test)
    res = evaluate(preds, fed.y_global_test)
    own = predictions(model, bundle, fed.clients[client].x_test)
    own_y = fed.clients[client].y_test
    timing["evaluate_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_all
    doc: dict[str, Any] = {
        "config": {"size": args.size, "public_fraction": args.public_fraction,
                   "data_fraction": args.data_fraction, "clients": args.clients,
                   "alpha": args.alpha, "rounds": args.rounds, "local_epochs": args.local_epochs,
                   "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                   "client": client, "calibration_samples": int(len(calib)),
                   "activations": args.activations,
                   "test_samples": args.test_samples, "threads": args.threads,
                   "num_global_experts": cfg.num_global_experts,
                   "num_local_experts": cfg.num_local_experts, "top_k": cfg.top_k,
                   "expert_hidden": cfg.expert_hidden, "trunk_mode": cfg.trunk_mode},
        "data": {"public": int(len(data.y_public)), "pool": int(len(data.y_pool)),
                 "test": int(len(data.y_test)),
                 "public_pool_overlap": int(np.intersect1d(data.public_idx, data.pool_idx).size),
                 "client_train_sizes": {cid: int(len(d.y_train)) for cid, d in fed.clients.items()}},
        "pretrain": {k: v for k, v in pre.items() if k != "file"},
        "simulation": sim,
        "diagnostics": {k: v for k, v in result.diagnostics.items() if k != "routing_matrix"},
        "result": res,
        "goal": goal(res),
        "client_own_test": {"samples": int(len(own_y)),
                            **{rt: float((p["personal"] == own_y).mean())
                               for rt, p in own.items()}},
        "bundle": {"deployed_bytes": sum(v["deployed_bytes"] for v in sizes.values()),
                   "fp32_bytes": sum(v["fp32_bytes"] or 0 for v in sizes.values()),
                   "parts": sizes},
        "timing": timing,
        "env": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                "onnxruntime": ort.__version__, "python": platform.python_version()},
        "command": command,
    }
    return doc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.camera_accuracy",
        description="Train the camera-size FedCoE (MobileNetV3-Small trunk pretrained on a "
                    "public Fashion-MNIST slice, frozen) in simulation, export it to int8 and "
                    "measure top-1 of torch fp32, ONNX fp32 and ONNX int8 on the official test "
                    "split. Defaults take about 15 minutes on one thread.")
    p.add_argument("--size", type=int, default=64, help="input side in px (default 64)")
    p.add_argument("--public-fraction", type=float, default=0.1,
                   help="share of the train split the coordinator pretrains the trunk on "
                        "(default 0.1 = 6,000 images)")
    p.add_argument("--data-fraction", type=float, default=0.1,
                   help="share of the train split the clients hold, disjoint from the public "
                        "slice (default 0.1 = 6,000 images)")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--client", default="0", help="the client whose bundle is exported")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--test-samples", type=int, default=0,
                   help="stratified subset of the official test split (0 = all 10,000)")
    p.add_argument("--activations", choices=("u8", "s8"), default="u8",
                   help="static int8 activation type of the bundle (export.quantize.Activations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--work", default="runs/camera_accuracy",
                   help="where the trunk file and the bundle are written")
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder of camera_accuracy.json / .md (and latency.md's section)")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite the Markdown (and latency.md's section) from the JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.markdown_only:
        write_reports(json.loads((args.out / JSON_NAME).read_text()), args.out)
        return 0
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m benchmarks.camera_accuracy", *given])
    doc = run(args, command.strip())
    write_reports(doc, args.out)
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
