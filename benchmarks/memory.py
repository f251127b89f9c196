"""Peak resident memory of one inference configuration, measured in a fresh interpreter.

What a device pays for a model is the memory its process grows by to load and run it,
not the interpreter or the runtime library. So each measurement starts two fresh
processes: one that only imports the runtime modules (``onnxruntime, numpy`` or
``torch``) and one that imports them, then loads and runs the configuration. Both report
their own ``VmHWM`` (peak RSS of their address space, which starts afresh at exec, unlike
``ru_maxrss`` of a child forked from a large parent); the figure is the difference.

Child usage (what :func:`peak_rss_increase` runs)::

    python -m benchmarks.memory --imports onnxruntime,numpy \
        [--target benchmarks.memory:run_onnx --kwargs '{"path": "m.onnx", ...}']

This module imports only the standard library at the top, so the probe measures nothing
of its own.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MemoryResult",
    "MemoryTarget",
    "peak_rss_increase",
    "read_vmhwm_kb",
    "run_dense",
    "run_onnx",
    "run_sparse",
    "resolve_target",
    "run_torch",
]

ONNX_IMPORTS: tuple[str, ...] = ("onnxruntime", "numpy")
TORCH_IMPORTS: tuple[str, ...] = ("torch",)
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class MemoryTarget:
    """How to re-create one configuration in a fresh process.

    ``target`` is ``"module:function"``; the function is called with ``kwargs`` (JSON
    values only) and must load the model and run it at least once. ``imports`` are the
    runtime modules whose import cost is *not* charged to the configuration.
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    imports: tuple[str, ...] = ONNX_IMPORTS


@dataclass(frozen=True)
class MemoryResult:
    """Peak RSS (MiB) of the runtime-only interpreter, of the full run, and their difference."""

    baseline_mb: float
    peak_mb: float

    @property
    def increase_mb(self) -> float:
        return max(0.0, self.peak_mb - self.baseline_mb)


def read_vmhwm_kb() -> int:
    """This process's peak resident set size in KiB (Linux ``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource  # fallback for systems without procfs (macOS: bytes, Linux: KiB)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(_REPO_ROOT) + (os.pathsep + path if path else "")
    # One thread unless the target sets its own: the probe must not fight the benchmark.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    return env


def _run_child(imports: Sequence[str], target: MemoryTarget | None, timeout: float) -> int:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--imports", ",".join(imports)]
    if target is not None:
        cmd += ["--target", target.target, "--kwargs", json.dumps(target.kwargs)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=_REPO_ROOT,
        env=_child_env(),
        check=False,
    )
    if proc.returncode != 0:
        what = target.target if target else "baseline"
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(
            f"memory probe for {what} exited with {proc.returncode}: " + " | ".join(tail)
        )
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return int(json.loads(line)["vmhwm_kb"])
    raise RuntimeError(f"memory probe printed no result: {proc.stdout[-300:]!r}")


_BASELINES: dict[tuple[str, ...], int] = {}


def peak_rss_increase(target: MemoryTarget, timeout: float = 300.0) -> MemoryResult:
    """Peak RSS of running ``target`` over a fresh interpreter that only imported its runtime.

    The runtime-only baseline is measured once per set of imports and cached.
    """
    key = tuple(target.imports)
    if key not in _BASELINES:
        _BASELINES[key] = _run_child(key, None, timeout)
    peak = _run_child(key, target, timeout)
    return MemoryResult(baseline_mb=_BASELINES[key] / 1024.0, peak_mb=peak / 1024.0)


# ----------------------------------------------------------------------------- targets


def run_onnx(
    path: str,
    input_shape: Sequence[int],
    threads: int = 1,
    iters: int = 3,
    spinning: bool | None = None,
    input_name: str | None = None,
) -> None:
    """Load one ONNX model and run it ``iters`` times on random float32 input."""
    import numpy as np

    from benchmarks.ort_session import make_session

    session = make_session(path, threads, spinning=spinning)
    name = input_name or session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    for _ in range(iters):
        session.run(None, {name: x})


def run_sparse(
    bundle: str, precision: str, input_shape: Sequence[int], threads: int = 1, iters: int = 3
) -> None:
    """Load a bundle with MoESession and run it ``iters`` times (memory probe target)."""
    import numpy as np

    from fedcoe_edge.runtime import MoESession

    session = MoESession(bundle, threads=threads, precision=precision)
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    for _ in range(iters):
        session.run(x)


def run_dense(
    path: str, input_shape: Sequence[int], num_experts: int, threads: int = 1, iters: int = 3
) -> None:
    """Load the fused dense graph and run it ``iters`` times (memory probe target)."""
    import numpy as np

    from benchmarks.ort_session import make_session

    session = make_session(path, threads)
    x = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    bias = np.zeros(num_experts, np.float32)
    for _ in range(iters):
        session.run(None, {"x": x, "gate_bias": bias})


def run_torch(
    builder: str,
    input_shape: Sequence[int],
    threads: int = 1,
    iters: int = 3,
    builder_kwargs: dict[str, Any] | None = None,
) -> None:
    """Build a torch model from ``"module:function"`` and run it eagerly ``iters`` times."""
    import torch

    torch.set_num_threads(threads)
    model = resolve_target(builder)(**(builder_kwargs or {})).eval()
    x = torch.randn(*input_shape)
    with torch.inference_mode():
        for _ in range(iters):
            model(x)


def resolve_target(spec: str) -> Any:
    """The object named by ``"module:function"`` (how a fresh process finds its target)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"memory target must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--imports", default=",".join(ONNX_IMPORTS))
    parser.add_argument("--target", default=None, help="module:function to run")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments")
    args = parser.parse_args(argv)
    for mod in filter(None, args.imports.split(",")):
        importlib.import_module(mod.strip())
    if args.target:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        resolve_target(args.target)(**kwargs)
    print(json.dumps({"vmhwm_kb": read_vmhwm_kb()}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
