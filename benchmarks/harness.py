"""The benchmark matrix: cases, how each is built, timed and turned into a result row.

A :class:`Case` names one configuration (model x runtime x precision x input x threads x
batch). A *preparer* turns a case into a :class:`Prepared`: a zero-argument ``run`` that
performs one inference, the model's parameters and MACs, its file size, and a
:class:`~benchmarks.memory.MemoryTarget` that re-creates it in a fresh process for the
peak-RSS probe. Baselines (MobileNetV2, MobileNetV3-Small; Sandler et al. 2018, Howard et
al. 2019) come with preparers here; a FedCoE row is added by registering a preparer that
builds the bundle and returns a runner::

    register_preparer("fedcoe_top2", prepare_fedcoe_top2)   # (case, store) -> Prepared
    cases = baseline_cases() + [Case("fedcoe_top2", "onnxruntime", "int8", family="fedcoe")]

``benchmarks/test_latency.py`` times the cases with pytest-benchmark; :func:`run_case` times
one without it (``fedcoe bench --quick``). Both emit the same row (:func:`make_row`), which
:mod:`benchmarks.report` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.memory import TORCH_IMPORTS, MemoryResult, MemoryTarget
from fedcoe_edge.errors import ConfigError

__all__ = [
    "ALL_CORES",
    "ArtifactStore",
    "Case",
    "Prepared",
    "baseline_cases",
    "environment",
    "make_row",
    "prepare",
    "register_preparer",
    "rounds_for",
    "run_case",
    "summarize",
]

ALL_CORES = os.cpu_count() or 1
RUNTIMES = ("torch", "onnxruntime")
BASELINES = ("mobilenet_v2", "mobilenet_v3_small")
ROW_KEYS = (
    "model",
    "runtime",
    "precision",
    "input",
    "threads",
    "batch",
    "p50_ms",
    "p95_ms",
    "peak_rss_mb",
    "size_mb",
    "params",
    "macs",
    "gflops",
    "pct_of_peak",
)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``family="fedcoe"`` rows get baseline ratios in the report.

    ``spinning`` applies to onnxruntime with ``threads > 1`` (None: onnxruntime's default,
    which spins).
    """

    model: str
    runtime: str
    precision: str = "fp32"
    input_size: int = 224
    threads: int = 1
    batch: int = 1
    spinning: bool | None = None
    family: str = "baseline"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"Case {self.model}: runtime must be one of {RUNTIMES}")
        for name in ("input_size", "threads", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Case {self.model}: {name} must be a positive int, got {value}")

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, 3, self.input_size, self.input_size)

    @property
    def input_label(self) -> str:
        return f"3x{self.input_size}x{self.input_size}"

    @property
    def id(self) -> str:
        spin = "-nospin" if self.spinning is False else ""
        return (
            f"{self.model}-{self.runtime}-{self.precision}-{self.input_size}"
            f"-t{self.threads}{spin}-b{self.batch}"
        )


@dataclass
class Prepared:
    """A ready-to-time configuration; call ``close`` when done (frees sessions, threads)."""

    run: Callable[[], object]
    params: int
    macs: int
    size_bytes: int | None = None
    opset: int | None = None
    memory: MemoryTarget | None = None
    close: Callable[[], None] = field(default=lambda: None)
    notes: dict[str, Any] = field(default_factory=dict)


class ArtifactStore:
    """A folder where each exported / quantized file is built once per session."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, make: Callable[[Path], object]) -> Path:
        """Path of ``name``, calling ``make(path)`` first if it does not exist yet."""
        path = self.root / name
        if not path.exists():
            tmp = path.with_name(path.name + ".partial")
            make(tmp)
            if not tmp.exists():
                raise RuntimeError(f"ArtifactStore: building {name} produced no file")
            tmp.replace(path)
        return path


Preparer = Callable[[Case, ArtifactStore], Prepared]


def _onnx_precisions() -> dict[str, Any]:
    from export.quantize import GraphFixes, QuantizeOptions, QuantMode

    static = QuantMode.STATIC
    return {
        "fp32": None,
        # int8 steps of the HardSwish fix, kept to measure each step against the next.
        "int8-naive": QuantizeOptions.naive(),
        "int8-gap": QuantizeOptions(mode=static, graph_fixes=GraphFixes(
            global_pool=True, fp32_stem=False, fold_hardsigmoid=False)),
        "int8-fold": QuantizeOptions(mode=static, graph_fixes=GraphFixes(
            global_pool=True, fp32_stem=False, fold_hardsigmoid=True)),
        "int8": QuantizeOptions(mode=static),
    }


_PREPARERS: dict[str, Preparer] = {}


def register_preparer(model: str, preparer: Preparer) -> None:
    """Make ``model`` benchmarkable: ``preparer(case, store)`` builds and returns a runner."""
    _PREPARERS[model] = preparer


def prepare(case: Case, store: ArtifactStore) -> Prepared:
    """Build ``case`` (export, quantize, create the session) and return its runner."""
    if case.model not in _PREPARERS:
        raise ConfigError(
            f"prepare: no preparer registered for model {case.model!r} "
            f"(known: {sorted(_PREPARERS)})"
        )
    return _PREPARERS[case.model](case, store)


# ------------------------------------------------------------------- torch-module preparers


def torch_module_preparer(builder: str, family_kwargs: dict[str, Any] | None = None) -> Preparer:
    """Preparer for any ``nn.Module`` built by ``"module:function"`` (importable by name so
    the memory probe can rebuild it): torch eager, ONNX fp32, ONNX int8 / int8-naive."""
    kwargs = dict(family_kwargs or {})

    def prep(case: Case, store: ArtifactStore) -> Prepared:
        import torch

        from benchmarks.memory import resolve_target
        from fedcoe_edge.flops import count_macs

        torch.manual_seed(0)
        model = resolve_target(builder)(**kwargs).eval()
        cost = count_macs(model, (1, 3, case.input_size, case.input_size))
        if case.runtime == "torch":
            return _prepare_torch(case, store, model, builder, kwargs, cost.params, cost.macs)
        # Files are keyed by what builds them, so two names for one net share the export.
        key = builder.replace(":", ".") + (
            "-" + hashlib.sha256(json.dumps(kwargs, sort_keys=True).encode()).hexdigest()[:8]
            if kwargs
            else ""
        )
        return _prepare_onnx(case, store, model, key, cost.params, cost.macs)

    return prep


def torch_prepared(
    case: Case,
    store: ArtifactStore,
    weights_name: str,
    model: Any,
    module: Any,
    x: Any,
    builder: str,
    builder_kwargs: dict[str, Any],
    params: int,
    macs: int,
    notes: dict[str, Any] | None = None,
) -> Prepared:
    """A torch-eager row: ``model``'s weights saved for the size column, ``module(x)`` timed at
    ``case.threads`` threads (restored on close), peak memory from ``builder`` in a fresh process."""
    import torch
    from safetensors.torch import save_file

    if case.precision != "fp32":
        raise ConfigError(f"{case.id}: torch eager runs fp32 only, got {case.precision!r}")
    weights = store.get(
        weights_name,
        lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p)),
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(case.threads)

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    target = MemoryTarget(
        "benchmarks.memory:run_torch",
        {
            "builder": builder,
            "input_shape": list(case.input_shape),
            "threads": case.threads,
            "builder_kwargs": builder_kwargs,
        },
        TORCH_IMPORTS,
    )
    return Prepared(
        run=run,
        params=params,
        macs=macs,
        size_bytes=weights.stat().st_size,
        memory=target,
        close=lambda: torch.set_num_threads(previous),
        notes=notes if notes is not None else {},
    )


def _prepare_torch(
    case: Case,
    store: ArtifactStore,
    model: Any,
    builder: str,
    kwargs: dict[str, Any],
    params: int,
    macs: int,
) -> Prepared:
    import torch

    x = torch.randn(*case.input_shape, generator=torch.Generator().manual_seed(0))
    return torch_prepared(case, store, f"{case.model}.safetensors", model, model, x, builder, kwargs,
                          params, macs)


def _prepare_onnx(
    case: Case, store: ArtifactStore, model: Any, key: str, params: int, macs: int
) -> Prepared:
    import torch

    from benchmarks.onnx_utils import OPSET, export_onnx, quantize_int8, random_calibration
    from benchmarks.ort_session import make_session, session_runner

    stem = f"{key}-{case.input_size}-b{case.batch}"
    example = torch.randn(*case.input_shape, generator=torch.Generator().manual_seed(0))
    precisions = _onnx_precisions()
    if case.precision not in precisions:
        raise ConfigError(
            f"{case.id}: unknown precision {case.precision!r} (one of {sorted(precisions)})"
        )
    naive = case.precision == "int8-naive"
    fp32 = store.get(
        f"{stem}{'-raw' if naive else ''}-fp32.onnx",
        lambda p: export_onnx(model, example, p, global_pool=not naive),
    )
    options = precisions[case.precision]
    if options is None:
        path = fp32
    else:
        path = store.get(
            f"{stem}-{case.precision}.onnx",
            lambda p: quantize_int8(
                fp32, p, random_calibration("x", case.input_shape, count=8), options
            ),
        )
    session = make_session(path, case.threads, spinning=case.spinning)
    x = np.random.default_rng(0).standard_normal(case.input_shape).astype(np.float32)
    run = session_runner(session, {session.get_inputs()[0].name: x})
    target = MemoryTarget(
        "benchmarks.memory:run_onnx",
        {
            "path": str(path),
            "input_shape": list(case.input_shape),
            "threads": case.threads,
            "spinning": case.spinning,
        },
    )
    holder = {"session": session}
    return Prepared(
        run=run,
        params=params,
        macs=macs,
        size_bytes=path.stat().st_size,
        opset=OPSET,
        memory=target,
        close=holder.clear,
    )


for _name in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"):
    register_preparer(_name, torch_module_preparer(f"fedcoe_edge.mobilenet:{_name}"))


def tiny_convnet() -> Any:
    """A few-kilobyte V3-style net (conv, HardSwish, SE, pool, linear) for smoke tests."""
    from torch import nn

    from fedcoe_edge.mobilenet import SqueezeExcitation

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        SqueezeExcitation(8, 8),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


register_preparer("tiny_convnet", torch_module_preparer("benchmarks.harness:tiny_convnet"))
# The same net under a second name stands in for a FedCoE row in the smoke test.
register_preparer("tiny_convnet_moe", torch_module_preparer("benchmarks.harness:tiny_convnet"))


# ---------------------------------------------------------------------------- the matrix


def baseline_cases(models: Sequence[str] = BASELINES, all_cores: int = ALL_CORES) -> list[Case]:
    """MobileNet baselines: {torch, ONNX fp32, ONNX int8} x {1, all threads} x batch {1, 8}
    at 224, plus 32x32 at batch 1, the unfixed int8 graph, and all-cores without spinning."""
    threads = sorted({1, all_cores})
    cases: list[Case] = []
    for model in models:
        for batch in (1, 8):
            for t in threads:
                cases.append(Case(model, "torch", "fp32", 224, t, batch))
                cases.append(Case(model, "onnxruntime", "fp32", 224, t, batch))
                cases.append(Case(model, "onnxruntime", "int8", 224, t, batch))
        cases.append(Case(model, "onnxruntime", "int8-naive", 224, 1, 1))
        if all_cores > 1:
            for precision in ("fp32", "int8"):
                cases.append(Case(model, "onnxruntime", precision, 224, all_cores, 1, False))
        for runtime, precision in (
            ("torch", "fp32"),
            ("onnxruntime", "fp32"),
            ("onnxruntime", "int8"),
        ):
            cases.append(Case(model, runtime, precision, 32, 1, 1))
    return cases


def smoke_cases() -> list[Case]:
    """The tiny net through every runtime path, 1 thread, batch 1 (for the smoke test)."""
    return [
        Case("tiny_convnet", "torch", "fp32", 32),
        Case("tiny_convnet", "onnxruntime", "fp32", 32),
        Case("tiny_convnet", "onnxruntime", "int8", 32),
        Case("tiny_convnet_moe", "onnxruntime", "int8", 32, family="fedcoe"),
    ]


def quick_cases(extra: Sequence[Case] = ()) -> list[Case]:
    """The reduced set of ``fedcoe bench --quick``: 224, 1 thread, batch 1."""
    cases = [
        Case(m, rt, p, 224, 1, 1)
        for m in BASELINES
        for rt, p in (("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"))
    ]
    return cases + list(extra)


# --------------------------------------------------------------------------- measurement


def rounds_for(
    run: Callable[[], object],
    target_seconds: float = 1.5,
    min_rounds: int = 15,
    max_rounds: int = 300,
) -> int:
    """How many timed rounds fit in ``target_seconds``, from the median of three probe calls
    (not the best: on a loaded machine the best underestimates and the run overshoots)."""
    probe = statistics.median(_time_once(run) for _ in range(3))
    return int(min(max_rounds, max(min_rounds, target_seconds / max(probe, 1e-6))))


def _time_once(run: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/min in milliseconds from per-call times in seconds."""
    if not times_s:
        raise ConfigError("summarize: no timings")
    arr = np.asarray(times_s, dtype=np.float64) * 1e3
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "min_ms": float(arr.min()),
        "stdev_ms": float(statistics.pstdev(arr.tolist())),
        "rounds": len(arr),
    }


def make_row(
    case: Case,
    prepared: Prepared,
    times_s: Sequence[float],
    sgemm_peak_gflops: float,
    memory: MemoryResult | None = None,
) -> dict[str, Any]:
    """One result row: the ``fedcoe bench --json`` schema plus the details the report uses.

    Achieved GFLOP/s is ``2 * MACs * batch / p50``; ``pct_of_peak`` compares it with
    ``threads x`` the measured single-thread SGEMM peak.
    """
    stats = summarize(times_s)
    gflops = 2.0 * prepared.macs * case.batch / (stats["p50_ms"] / 1e3) / 1e9
    peak = sgemm_peak_gflops * case.threads
    row: dict[str, Any] = {
        "model": case.model,
        "runtime": case.runtime,
        "precision": case.precision,
        "input": case.input_label,
        "threads": case.threads,
        "batch": case.batch,
        "p50_ms": stats["p50_ms"],
        "p95_ms": stats["p95_ms"],
        "peak_rss_mb": memory.increase_mb if memory else None,
        "size_mb": prepared.size_bytes / 2**20 if prepared.size_bytes is not None else None,
        "params": prepared.params,
        "macs": prepared.macs,
        "gflops": gflops,
        "pct_of_peak": 100.0 * gflops / peak if peak > 0 else None,
        # details beyond the quick schema
        "p99_ms": stats["p99_ms"],
        "mean_ms": stats["mean_ms"],
        "min_ms": stats["min_ms"],
        "rounds": stats["rounds"],
        "family": case.family,
        "spinning": case.spinning,
        "opset": prepared.opset,
        "sgemm_peak_gflops": sgemm_peak_gflops,
        "rss_baseline_mb": memory.baseline_mb if memory else None,
        "case_id": case.id,
        # Other processes on the machine (1-minute load average when the row was made):
        # rows timed above ~ALL_CORES-1 shared the cores with someone else.
        "loadavg_1m": _loadavg(),
    }
    row.update({f"note_{k}": v for k, v in prepared.notes.items()})
    return row


def _loadavg() -> float | None:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - not on Linux/macOS
        return None


def run_case(
    case: Case,
    store: ArtifactStore,
    sgemm_peak_gflops: float,
    *,
    rounds: int | None = None,
    warmup: int = 3,
    measure_memory: bool = True,
) -> dict[str, Any]:
    """Prepare, warm up, time and (optionally) memory-probe one case without pytest."""
    prepared = prepare(case, store)
    try:
        for _ in range(warmup):
            prepared.run()
        n = rounds if rounds is not None else rounds_for(prepared.run)
        times = [_time_once(prepared.run) for _ in range(max(1, n))]
    finally:
        prepared.close()
    memory = None
    if measure_memory and prepared.memory is not None:
        from benchmarks.memory import peak_rss_increase

        memory = peak_rss_increase(prepared.memory)
    return make_row(case, prepared, times, sgemm_peak_gflops, memory)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every row."""
    import onnx
    import onnxruntime

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": ALL_CORES,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        info["torch"] = None
    return info


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86 `model name`, Arm `Hardware` / `cpu model`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
