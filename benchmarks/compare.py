"""Interleaved (round-robin) timing of several cases, for ratios that survive a noisy machine.

pytest-benchmark times one case after another, so a neighbour's burst of work lands on
whichever case was running. Here every case is prepared first and then called in turn,
round after round, so all cases see the same background load and their *ratios* stay
meaningful on a shared VM or a throttling board. Single-thread cases only: idle
multi-threaded pools would spin and steal the core from the case being timed.

``python -m benchmarks.compare`` times the int8 fix ablation of MobileNetV2 and V3-Small
at 224x224, batch 1, one thread: torch eager, ONNX fp32, int8 unfixed (``int8-naive``),
+ GlobalAveragePool rewrite (``int8-gap``), + integer HardSigmoid fold (``int8-fold``),
+ fp32 RGB stem (``int8``, the default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import ArtifactStore, Case, Prepared, prepare, summarize
from fedcoe_edge.errors import ConfigError

__all__ = ["ABLATION", "RoundRobin", "interleaved", "repeat_order"]

ABLATION: tuple[tuple[str, str], ...] = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8-naive"),
    ("onnxruntime", "int8-gap"),
    ("onnxruntime", "int8-fold"),
    ("onnxruntime", "int8"),
)


def repeat_order(n: int, repeat: int) -> list[int]:
    """The call order of ``n`` cases in repeat block ``repeat``: forward on even repeats,
    backward on odd ones (each case follows its other neighbour), rotated so the case that
    runs first differs in every block of ``n`` repeats: 0, n-1, 1, n-2, ..."""
    if n < 1 or repeat < 0:
        raise ConfigError(f"repeat_order: need n >= 1 and repeat >= 0, got {n}, {repeat}")
    half, odd = divmod(repeat, 2)
    shift = (-half if odd else half) % n
    order = list(range(shift, n)) + list(range(shift))
    return order[::-1] if odd else order


class RoundRobin:
    """Prepared cases called in turn; each :meth:`round` times one call of every case."""

    def __init__(self, cases: Sequence[Case], store: ArtifactStore) -> None:
        if not cases:
            raise ConfigError("RoundRobin: no cases given")
        if any(c.threads != 1 for c in cases):
            raise ConfigError("RoundRobin: only single-thread cases can be interleaved fairly")
        self.cases = list(cases)
        self.prepared: list[Prepared] = []
        try:
            for c in self.cases:
                self.prepared.append(prepare(c, store))
        except BaseException:
            self.close()
            raise
        self.times: list[list[float]] = [[] for _ in self.cases]

    def round(self, order: Sequence[int] | None = None) -> None:
        """One call of every case, in ``order`` (indices into the cases; default as given)."""
        for i in range(len(self.prepared)) if order is None else order:
            p = self.prepared[i]
            t0 = time.perf_counter()
            p.run()
            self.times[i].append(time.perf_counter() - t0)

    def reset(self) -> None:
        """Forget the timings so far (call after warm-up rounds)."""
        self.times = [[] for _ in self.cases]

    def stats(self) -> dict[str, dict[str, float]]:
        return {c.id: summarize(t) for c, t in zip(self.cases, self.times, strict=True)}

    def close(self) -> None:
        for p in self.prepared:
            p.close()
        self.prepared = []


def interleaved(
    cases: Sequence[Case], store: ArtifactStore, rounds: int = 100, warmup: int = 5
) -> dict[str, dict[str, float]]:
    """p50/p95/p99 (ms) per case id, timing one call of each case per round."""
    rr = RoundRobin(cases, store)
    try:
        for _ in range(warmup):
            rr.round()
        rr.reset()
        for _ in range(rounds):
            rr.round()
    finally:
        rr.close()
    return rr.stats()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="round-robin latency comparison")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "mobilenet_v3_small"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=None, help="keep exported files here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cases = [Case(m, rt, p, args.input_size) for m in args.models for rt, p in ABLATION]
    with tempfile.TemporaryDirectory(prefix="fedcoe-compare-") as tmp:
        store = ArtifactStore(args.workdir or tmp)
        stats = interleaved(cases, store, rounds=args.rounds)
    rows: list[tuple[Any, ...]] = []
    for c in cases:
        s = stats[c.id]
        rows.append((c.model, c.runtime, c.precision, s["p50_ms"], s["p95_ms"], s["p99_ms"]))
    print(
        f"{'model':<20} {'runtime':<12} {'precision':<11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    for r in rows:
        print(f"{r[0]:<20} {r[1]:<12} {r[2]:<11} {r[3]:8.3f} {r[4]:8.3f} {r[5]:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
