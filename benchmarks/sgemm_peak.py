"""Measured single-thread SGEMM throughput: the physical reference for "% of peak".

A large float32 matrix product is the best case for a CPU core (compute bound, perfectly
vectorised by the BLAS), so its GFLOP/s on one pinned thread is the ceiling that a
network's achieved ``2 * MACs / latency`` is compared to. We take the best of torch
(oneDNN/MKL-style GEMM) and numpy (OpenBLAS) and the best of several repeats: the figure
is what the core *can* do, so noise only ever lowers it.

``python -m benchmarks.sgemm_peak`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from fedcoe_edge.errors import ConfigError

__all__ = ["SgemmPeak", "measure_sgemm_peak"]


@dataclass(frozen=True)
class SgemmPeak:
    """Best single-thread float32 GEMM rate and where it came from (``backend@n`` rates)."""

    gflops: float
    n: int
    backend: str
    per_backend: dict[str, float]
    threads: int = 1


def _best_time(fn: Callable[[], object], repeats: int, min_seconds: float) -> float:
    fn()  # warm-up: page in the operands, let the BLAS pick its kernel
    best = float("inf")
    start = time.perf_counter()
    done = 0
    while done < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        done += 1
        if done >= 10 * repeats:
            break
    return best


def _torch_rate(n: int, repeats: int, min_seconds: float) -> float:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        c = torch.empty(n, n)
        best = _best_time(lambda: torch.mm(a, b, out=c), repeats, min_seconds)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * n**3 / best / 1e9


def _numpy_rate(n: int, repeats: int, min_seconds: float) -> float:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    with threadpool_limits(limits=1):
        best = _best_time(lambda: np.matmul(a, b, out=c), repeats, min_seconds)
    return 2.0 * n**3 / best / 1e9


_BACKENDS: dict[str, Callable[[int, int, float], float]] = {
    "torch": _torch_rate,
    "numpy": _numpy_rate,
}


def measure_sgemm_peak(
    sizes: Sequence[int] = (512, 768, 1000),
    repeats: int = 5,
    min_seconds: float = 0.2,
    backends: Sequence[str] = ("torch", "numpy"),
) -> SgemmPeak:
    """Best GFLOP/s of ``n x n`` float32 matmuls on one thread over sizes and backends.

    Sizes of 512..1000 (3-12 MiB of operands) saturate one core's FMA units on x86 and
    ARM in milliseconds each; several sizes (none a large power of two, whose cache-set
    aliasing can cost 5-25%) and the best of repeats make the figure robust to a
    neighbour stealing the core for a moment.
    """
    if not sizes or any(int(n) < 16 for n in sizes):
        raise ConfigError(f"measure_sgemm_peak: sizes must be ints >= 16, got {list(sizes)}")
    if repeats < 1:
        raise ConfigError(f"measure_sgemm_peak: repeats must be >= 1, got {repeats}")
    unknown = [b for b in backends if b not in _BACKENDS]
    if unknown or not backends:
        raise ConfigError(
            f"measure_sgemm_peak: backends must be a non-empty subset of {sorted(_BACKENDS)}, "
            f"got {list(backends)}"
        )
    rates: dict[str, float] = {}
    for b in backends:
        for n in sizes:
            rates[f"{b}@{int(n)}"] = _BACKENDS[b](int(n), repeats, min_seconds)
    best = max(rates, key=lambda k: rates[k])
    backend, _, n_best = best.partition("@")
    return SgemmPeak(gflops=rates[best], n=int(n_best), backend=backend, per_backend=rates)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="single-thread SGEMM peak (GFLOP/s)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(json.dumps(asdict(measure_sgemm_peak(args.sizes, args.repeats)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
