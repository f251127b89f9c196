"""FedCoE rows of the latency / memory benchmark: camera-size dual-level MoE bundles.

FedCoE (Federated Coordinated dual-level MoE, arXiv 2605.21264) on a camera: a
MobileNetV3-Small trunk (Howard et al., ICCV 2019, arXiv 1905.02244) shared by K=8 global
expert heads and M=2 private local heads, top-2 routing. Two ways to run it:

* ``fedcoe_top2``: the sparse runtime, :class:`fedcoe_edge.runtime.MoESession` over the
  bundle that :func:`export.bundle.build_bundle` writes (static int8 QDQ, calibrated on
  image-like inputs): trunk, gate, then only the two routed experts, plus the local level;
* ``fedcoe_dense``: the fused single graph (every expert computed, routing as math), the
  bundle's ``fused_dense.onnx`` in fp32 and its int8 quantization.

Torch eager rows run ``DualLevelMoE.forward`` (sparse) and the fused module (dense).

Head widths: V3-Small's classifier (576 -> 1024 -> 1000) costs 1.61M MACs. FedCoE's active
heads are the shared expert, two routed and two local experts (each ``576 -> h -> 1000``)
and two linear gates: ``5 * 1576 * h + 6336`` MACs. ``h = 192`` (a multiple of the int8
GEMM kernels' 32/64 blocking) gives 1.52M, 94% of V3-Small's classifier, so top-2 has the
same arithmetic as V3-Small and any latency gap is the runtime's, not the model's. The
whole bundle (11 expert heads) holds 3.3M head parameters beside the trunk's 0.93M.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import ArtifactStore, Case, Prepared, register_preparer, torch_prepared
from benchmarks.memory import MemoryTarget
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import ConfigError

__all__ = [
    "CAMERA_HIDDEN",
    "camera_config",
    "fedcoe_cases",
    "fedcoe_costs",
    "image_like",
    "smoke_config",
    "smoke_fedcoe_cases",
]

CAMERA_HIDDEN = 192
CAMERA_CLASSES = 1000
CALIBRATION_SAMPLES = 32
MODELS = ("fedcoe_top2", "fedcoe_dense")


def camera_config(input_size: int = 224) -> ModelConfig:
    """The benchmark's FedCoE: V3-Small trunk, K=8 global + M=2 local MLP heads, top-2."""
    return ModelConfig(
        input_shape=(3, input_size, input_size),
        num_classes=CAMERA_CLASSES,
        trunk="mobilenet_v3_small",
        expert_kind="mlp",
        expert_hidden=CAMERA_HIDDEN,
        num_global_experts=8,
        top_k=2,
        num_local_experts=2,
    )


def smoke_config(input_size: int = 32) -> ModelConfig:
    """A tiny stand-in for the smoke test: identity trunk, narrow heads, same K, M, top-k."""
    return ModelConfig(
        input_shape=(3, input_size, input_size),
        num_classes=10,
        trunk="identity",
        expert_kind="mlp",
        expert_hidden=8,
        num_global_experts=8,
        top_k=2,
        num_local_experts=2,
    )


_CONFIGS: dict[str, Callable[[int], ModelConfig]] = {
    "camera": camera_config,
    "smoke": smoke_config,
}


def image_like(count: int, input_size: int, seed: int = 0) -> np.ndarray:
    """Normalised pseudo-images (N, 3, S, S): smooth colour fields plus fine noise.

    Calibration sets activation ranges; i.i.d. noise has no spatial structure and gives a
    trunk ranges that real frames never reach, so the int8 scales are taken on inputs with
    an image's low-frequency content instead (no data set is downloaded).
    """
    if count < 1 or input_size < 1:
        raise ConfigError(f"image_like: count and input_size must be >= 1, got {count}, {input_size}")
    rng = np.random.default_rng(seed)
    cells = max(1, input_size // 32)
    coarse = rng.uniform(0.0, 1.0, size=(count, 3, cells + 1, cells + 1))
    # bilinear upsampling of the coarse grid, rows then columns
    pos = np.linspace(0, cells, input_size)
    lo = np.minimum(pos.astype(int), cells - 1)
    w = (pos - lo)[None, None, :]
    rows = coarse[:, :, lo, :] * (1 - w[..., None]) + coarse[:, :, lo + 1, :] * w[..., None]
    img = rows[:, :, :, lo] * (1 - w[:, :, None, :]) + rows[:, :, :, lo + 1] * w[:, :, None, :]
    img = np.clip(img + 0.05 * rng.standard_normal(img.shape), 0.0, 1.0)
    mean = np.array([0.485, 0.456, 0.406])[None, :, None, None]
    std = np.array([0.229, 0.224, 0.225])[None, :, None, None]
    return ((img - mean) / std).astype(np.float32)


# ------------------------------------------------------------------------- model and bundle


def build_fedcoe(kind: str = "camera", input_size: int = 224, seed: int = 0) -> Any:
    """The benchmark's DualLevelMoE in eval mode (random weights: latency does not care)."""
    import torch

    from fedcoe_edge.training import build_model

    if kind not in _CONFIGS:
        raise ConfigError(f"build_fedcoe: kind must be one of {sorted(_CONFIGS)}, got {kind!r}")
    torch.manual_seed(seed)
    return build_model(_CONFIGS[kind](input_size), seed).eval()


def build_dense(kind: str = "camera", input_size: int = 224, seed: int = 0) -> Any:
    """torch module ``x -> (log_probs, global_log_probs)``: every expert computed."""
    import torch
    from torch import nn

    from export.onnx_export import FusedDenseMoE

    model = build_fedcoe(kind, input_size, seed)
    fused = FusedDenseMoE(model, range(model.cfg.num_global_experts)).eval()

    class Dense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fused = fused
            self.register_buffer("bias", torch.zeros(model.cfg.num_global_experts))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fused(x, self.bias)

    return Dense().eval()


def _kind(case: Case) -> str:
    return "smoke" if case.model.endswith("_smoke") else "camera"


def _bundle(case: Case, store: ArtifactStore, model: Any, precision: str) -> Path:
    """The bundle for the case's config, input size and precision, built once per store.

    int8: what a device is sent (static int8 parts, no fp32 parity copies, no fused graph),
    so the sparse runtime loads what it would load in the field. fp32: fp32 parts plus the
    fused dense graph (the dense rows' source, quantized separately for int8).
    """
    from export.bundle import build_bundle
    from export.quantize import QuantizeOptions, QuantMode

    cfg = model.cfg
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    calib = image_like(CALIBRATION_SAMPLES, case.input_size)
    int8 = precision == "int8"
    opts = QuantizeOptions(
        mode=QuantMode.STATIC if int8 else QuantMode.FP32,
        calibration_samples=CALIBRATION_SAMPLES,
        calibration_batch=8,
    )

    def make(path: Path) -> None:
        build_bundle(
            model,
            path,
            calibration=calib,
            options=opts,
            include_fp32=False,
            include_fused=not int8,
            meta={"benchmark": "fedcoe latency", "precision": precision},
        )

    return store.get(f"fedcoe-{_kind(case)}-{case.input_size}-{key}-{precision}-bundle", make)


def int8_bundle(store: ArtifactStore, smoke: bool = False, input_size: int | None = None) -> Path:
    """The int8 deployment bundle the sparse rows time (built once per store)."""
    size = input_size or (32 if smoke else 224)
    case = Case("fedcoe_top2_smoke" if smoke else "fedcoe_top2", "onnxruntime", "int8", size)
    return _bundle(case, store, build_fedcoe(_kind(case), size), "int8")


def _fused_int8(store: ArtifactStore, bundle: Path, case: Case, k_total: int) -> Path:
    """``fused_dense.onnx`` quantized the way the baselines are (same graph rewrites)."""
    from export.quantize import ArrayCalibrationReader, QuantizeOptions, QuantMode, quantize_int8

    calib = image_like(CALIBRATION_SAMPLES, case.input_size)
    reader = ArrayCalibrationReader("x", calib, 8, fixed={"gate_bias": np.zeros(k_total, np.float32)})
    options = QuantizeOptions(mode=QuantMode.STATIC)
    return store.get(
        f"{bundle.name}-fused-int8.onnx",
        lambda p: quantize_int8(bundle / "fused_dense.onnx", p, reader, options),
    )


def fedcoe_costs(model: Any) -> dict[str, int]:
    """Parameters and per-sample MACs of the top-2 active path and of the whole bundle."""
    import torch

    from fedcoe_edge.flops import count_macs

    cfg = model.cfg
    g, loc = model.global_part, model.local_part
    shape = (1, *cfg.input_shape)
    trunk = count_macs(g.trunk, shape) if cfg.trunk != "identity" else None
    feats = torch.zeros(1, *g.feat_shape)
    heads = {
        "gate": g.gate,
        "shared": g.shared,
        "expert": g.experts[0],
        "local_gate": loc.gate,
        "local_expert": loc.experts[0] if len(loc.experts) else None,
    }
    cost = {n: count_macs(m, inputs=feats) for n, m in heads.items() if m is not None}

    def pm(name: str) -> tuple[int, int]:
        c = cost.get(name)
        return (c.params, c.macs) if c is not None else (0, 0)

    t_p, t_m = (trunk.params, trunk.macs) if trunk is not None else (0, 0)
    always = [pm("gate"), pm("shared"), pm("local_gate")]
    always += [pm("local_expert")] * cfg.num_local_experts
    routed = pm("expert")
    active_p = t_p + sum(p for p, _ in always) + cfg.top_k * routed[0]
    active_m = t_m + sum(m for _, m in always) + cfg.top_k * routed[1]
    total_p = sum(p.numel() for p in model.parameters())
    dense_m = t_m + sum(m for _, m in always) + cfg.num_global_experts * routed[1]
    return {
        "active_params": int(active_p),
        "active_macs": int(active_m),
        "bundle_params": int(total_p),
        "dense_macs": int(dense_m),
        "trunk_params": int(t_p),
        "trunk_macs": int(t_m),
    }


# ----------------------------------------------------------------------------- preparers


def _input(case: Case) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(case.input_shape).astype(np.float32)


def _prepare(case: Case, store: ArtifactStore) -> Prepared:
    sparse = case.model.startswith("fedcoe_top2")
    kind = _kind(case)
    model = build_fedcoe(kind, case.input_size)
    costs = fedcoe_costs(model)
    params = costs["active_params"] if sparse else costs["bundle_params"]
    macs = costs["active_macs"] if sparse else costs["dense_macs"]
    notes: dict[str, Any] = {**costs, "kind": "sparse top-2" if sparse else "dense fused"}
    if case.runtime == "torch":
        return _prepare_torch(case, store, model, sparse, kind, params, macs, notes)
    if case.precision not in ("fp32", "int8"):
        raise ConfigError(f"{case.id}: FedCoE rows run fp32 or int8, got {case.precision!r}")
    sparse_int8 = sparse and case.precision == "int8"
    bundle = _bundle(case, store, model, "int8" if sparse_int8 else "fp32")
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    from benchmarks.onnx_utils import OPSET

    if sparse:
        return _prepare_sparse(case, bundle, manifest, params, macs, notes, OPSET)
    return _prepare_dense(case, store, bundle, model, params, macs, notes, OPSET)


def _prepare_torch(
    case: Case,
    store: ArtifactStore,
    model: Any,
    sparse: bool,
    kind: str,
    params: int,
    macs: int,
    notes: dict[str, Any],
) -> Prepared:
    import torch

    module = model if sparse else build_dense(kind, case.input_size)
    builder = "benchmarks.fedcoe:build_fedcoe" if sparse else "benchmarks.fedcoe:build_dense"
    return torch_prepared(case, store, f"fedcoe-{kind}-{case.input_size}.safetensors", model, module,
                          torch.from_numpy(_input(case)), builder,
                          {"kind": kind, "input_size": case.input_size}, params, macs, notes)


def _prepare_sparse(
    case: Case,
    bundle: Path,
    manifest: dict[str, Any],
    params: int,
    macs: int,
    notes: dict[str, Any],
    opset: int,
) -> Prepared:
    from fedcoe_edge.runtime import MoESession

    precision = "deployed"  # the int8 bundle's parts are int8, the fp32 bundle's fp32
    session = MoESession(bundle, threads=case.threads, precision=precision)
    x = _input(case)
    parts = manifest["parts"]
    files = list(parts.values())
    size = sum(int(f["bytes"]) for f in files)
    cfg = session.cfg
    active = ["trunk", "global_gate", "expert_shared", "local_gate"]
    active += [f"expert_l{j}" for j in range(cfg.num_local_experts)]
    routed = [f"expert_g{k}" for k in range(cfg.top_k)]
    by_name = dict(zip(parts, files, strict=True))
    notes = {
        **notes,
        "active_size_bytes": sum(int(by_name[n]["bytes"]) for n in active + routed if n in by_name),
        "quantization": sorted({str(p["quantization"]) for p in parts.values()}),
    }

    def run() -> object:
        return session.run(x)

    target = MemoryTarget(
        "benchmarks.memory:run_sparse",
        {
            "bundle": str(bundle),
            "precision": precision,
            "input_shape": list(case.input_shape),
            "threads": case.threads,
        },
    )
    holder = {"session": session}
    return Prepared(
        run=run,
        params=params,
        macs=macs,
        size_bytes=size,
        opset=opset,
        memory=target,
        close=holder.clear,
        notes=notes,
    )


def _prepare_dense(
    case: Case,
    store: ArtifactStore,
    bundle: Path,
    model: Any,
    params: int,
    macs: int,
    notes: dict[str, Any],
    opset: int,
) -> Prepared:
    from benchmarks.ort_session import make_session, session_runner

    k_total = model.cfg.num_global_experts
    if case.precision == "int8":
        path = _fused_int8(store, bundle, case, k_total)
    else:
        path = bundle / "fused_dense.onnx"
    session = make_session(path, case.threads, spinning=case.spinning)
    inputs = {"x": _input(case), "gate_bias": np.zeros(k_total, np.float32)}
    target = MemoryTarget(
        "benchmarks.memory:run_dense",
        {
            "path": str(path),
            "input_shape": list(case.input_shape),
            "num_experts": k_total,
            "threads": case.threads,
        },
    )
    holder = {"session": session}
    return Prepared(
        run=session_runner(session, inputs),
        params=params,
        macs=macs,
        size_bytes=path.stat().st_size,
        opset=opset,
        memory=target,
        close=holder.clear,
        notes=notes,
    )


for _name in MODELS:
    register_preparer(_name, _prepare)
    register_preparer(_name + "_smoke", _prepare)


# ---------------------------------------------------------------------------- the matrix


def fedcoe_cases(all_cores: int | None = None) -> list[Case]:
    """fedcoe_top2 and fedcoe_dense x {torch, ONNX fp32, ONNX int8} x {1, all threads} x
    batch {1, 8} at 224, plus batch 1 / 1 thread at 32x32."""
    from benchmarks.harness import ALL_CORES

    threads = sorted({1, all_cores or ALL_CORES})
    cases: list[Case] = []
    for model in MODELS:
        for batch in (1, 8):
            for t in threads:
                for runtime, precision in (
                    ("torch", "fp32"),
                    ("onnxruntime", "fp32"),
                    ("onnxruntime", "int8"),
                ):
                    cases.append(Case(model, runtime, precision, 224, t, batch, family="fedcoe"))
        for runtime, precision in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")):
            cases.append(Case(model, runtime, precision, 32, 1, 1, family="fedcoe"))
    return cases


def quick_fedcoe_cases() -> list[Case]:
    """FedCoE rows of ``fedcoe bench --quick``: 224, 1 thread, batch 1, ONNX fp32 and int8."""
    return [
        Case(model, "onnxruntime", precision, 224, 1, 1, family="fedcoe")
        for model in MODELS
        for precision in ("fp32", "int8")
    ]


def smoke_fedcoe_cases() -> list[Case]:
    """The tiny FedCoE through the sparse runtime and the fused graph (smoke test)."""
    return [
        Case("fedcoe_top2_smoke", "onnxruntime", "int8", 32, family="fedcoe"),
        Case("fedcoe_top2_smoke", "torch", "fp32", 32, family="fedcoe"),
        Case("fedcoe_dense_smoke", "onnxruntime", "int8", 32, family="fedcoe"),
    ]


# ------------------------------------------------------------------- where the time goes


def _empty_session(threads: int) -> Any:
    """An onnxruntime session on a one-node Identity graph: the fixed cost of one call."""
    import onnx
    from onnx import TensorProto, helper

    from benchmarks.ort_session import make_session

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "empty",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return make_session(model.SerializeToString(), threads)


def sparse_breakdown(bundle: str | Path, input_size: int = 224, rounds: int = 200,
                     warmup: int = 20) -> dict[str, Any]:
    """Per-part p50 (ms) of one ``MoESession.run`` at batch 1, 1 thread, timed round-robin.

    Parts: the trunk session, the always-on heads (one merged call, or one call per part),
    the routed experts, an empty onnxruntime call (the fixed cost every call pays), and the
    rest of ``run`` (numpy routing and mixing, input checks): ``glue = run - sessions``.
    """
    import time

    from fedcoe_edge.runtime import MoESession

    session = MoESession(bundle, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, input_size, input_size)).astype(np.float32)
    feats = session.features(x)
    routed = session.run(x).experts_run
    sessions = session._sessions  # the runtime's own sessions: same objects run() calls
    names = session._input_names
    heads = [n for n in sessions if n not in ("trunk",) and not n.startswith("expert_g")]
    empty = _empty_session(1)
    z = np.zeros((1, 8), np.float32)

    def call(name: str, inp: np.ndarray) -> Callable[[], object]:
        sess, key = sessions[name], names[name]
        return lambda: sess.run(None, {key: inp})

    timers: dict[str, Callable[[], object]] = {"run": lambda: session.run(x)}
    if "trunk" in sessions:
        timers["trunk"] = call("trunk", x)
    for n in heads:
        timers[n] = call(n, feats)
    for r in routed:
        timers[f"expert_g{r}"] = call(f"expert_g{r}", feats)
    timers["empty_call"] = lambda: empty.run(None, {"x": z})
    for fn in timers.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    p50 = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    sessions_ms = sum(v for k, v in p50.items() if k not in ("run", "empty_call"))
    n_calls = len(timers) - 2
    return {
        "p50_ms": p50,
        "calls_per_run": n_calls,
        "heads_merged": "heads" in sessions,
        "routed": routed,
        "sessions_ms": sessions_ms,
        "glue_ms": p50["run"] - sessions_ms,
        "call_overhead_ms": n_calls * p50["empty_call"],
    }
