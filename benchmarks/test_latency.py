"""Latency / memory benchmark suite (pytest-benchmark), run by ``make bench``.

Every case of :func:`benchmarks.harness.baseline_cases` (MobileNetV2 and V3-Small x torch
eager, ONNX fp32, ONNX int8 x 1 / all threads x batch 1 / 8, plus 32x32 inputs) is timed
with ``benchmark.pedantic`` after warm-up rounds; ``extra_info`` carries the result row
(versions, opset, precision, params, MACs, achieved GFLOP/s and % of the measured SGEMM
peak, p95/p99, peak-RSS increase in a fresh process, file size), which
``python -m benchmarks.report`` turns into ``benchmarks/results/latency.md`` and ``.png``.

FedCoE rows (:mod:`benchmarks.fedcoe`): ``fedcoe_top2`` (the sparse runtime,
``MoESession`` over an int8 bundle) and ``fedcoe_dense`` (the fused graph), over the same
runtimes, precisions, threads and batches; their report rows carry ratios to the baselines.

``test_interleaved`` times the 224 / 1-thread / batch-1 cases round-robin (one call of
each per round), so all of them see the same background load; the report takes its
latency ratios from there when present. The rounds run in ``INTERLEAVED_REPEATS`` blocks,
the call order rotated and alternated per block (:func:`benchmarks.compare.repeat_order`);
each row keeps its p50 per block (``repeat_p50_ms``) and its ratios to the baselines as
median (min-max) over the blocks (``ratio_spreads``), since a single ratio moves by about
±0.1 with the timing.

``FEDCOE_BENCH_SMOKE=1`` swaps the matrix for a tiny net and two rounds per case; the
smoke test (``tests/test_bench_smoke.py``) runs this file that way.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from benchmarks.compare import RoundRobin, repeat_order
from benchmarks.fedcoe import fedcoe_cases, int8_bundle, smoke_fedcoe_cases, sparse_breakdown
from benchmarks.harness import (
    ArtifactStore,
    Case,
    baseline_cases,
    environment,
    make_row,
    prepare,
    rounds_for,
    smoke_cases,
)
from benchmarks.memory import peak_rss_increase
from benchmarks.report import SMALL, V2, repeat_ratio_spreads
from benchmarks.sgemm_peak import measure_sgemm_peak

SMOKE = os.environ.get("FEDCOE_BENCH_SMOKE", "") == "1"
CASES: list[Case] = (
    smoke_cases() + smoke_fedcoe_cases() if SMOKE else baseline_cases() + fedcoe_cases()
)
WARMUP_ROUNDS = 1 if SMOKE else 5
# Timed round-robin as well, so their ratios hold on a machine shared with other work.
INTERLEAVED: list[Case] = [
    c
    for c in CASES
    if c.threads == 1
    and c.batch == 1
    and c.input_size == (32 if SMOKE else 224)
    and c.precision in ("fp32", "int8")
]
INTERLEAVED_ROUNDS = 2 if SMOKE else 60  # in all, over the repeat blocks
INTERLEAVED_REPEATS = 2 if SMOKE else 5  # blocks of INTERLEAVED_ROUNDS / REPEATS rounds each

pytestmark = pytest.mark.bench


@pytest.fixture(scope="session")
def sgemm_peak() -> dict[str, Any]:
    """Single-thread SGEMM peak of this machine, measured once per run."""
    import dataclasses

    if SMOKE:
        peak = measure_sgemm_peak(sizes=(128,), repeats=1, min_seconds=0.0)
    else:
        peak = measure_sgemm_peak()
    return dataclasses.asdict(peak)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    """Exported / quantized files, built once per run and shared by the cases."""
    return ArtifactStore(tmp_path_factory.mktemp("bench-artifacts"))


@pytest.fixture(scope="session")
def env_info() -> dict[str, Any]:
    return environment()


@pytest.fixture(autouse=True)
def _single_threaded_torch() -> Iterator[None]:
    """Each case sets its own thread count; put torch back to one thread afterwards."""
    import torch

    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_latency(
    benchmark: Any,
    case: Case,
    store: ArtifactStore,
    sgemm_peak: dict[str, Any],
    env_info: dict[str, Any],
) -> None:
    prepared = prepare(case, store)
    try:
        rounds = 2 if SMOKE else rounds_for(prepared.run)
        benchmark.group = f"{case.input_label} threads={case.threads} batch={case.batch}"
        benchmark.pedantic(prepared.run, rounds=rounds, iterations=1, warmup_rounds=WARMUP_ROUNDS)
        stats = benchmark.stats
        if stats is None:
            pytest.skip("pytest-benchmark is disabled; run with --benchmark-enable")
        times = list(stats.stats.data)
    finally:
        prepared.close()
    # The smoke run skips the torch probe (two fresh torch imports) to stay fast.
    probe = prepared.memory is not None and not (SMOKE and case.runtime == "torch")
    memory = peak_rss_increase(prepared.memory) if probe and prepared.memory else None
    row = make_row(case, prepared, times, sgemm_peak["gflops"], memory)
    benchmark.extra_info.update(row)
    benchmark.extra_info["sgemm_peak"] = sgemm_peak
    benchmark.extra_info["env"] = env_info
    assert row["p50_ms"] > 0


def test_interleaved(
    benchmark: Any,
    store: ArtifactStore,
    sgemm_peak: dict[str, Any],
    env_info: dict[str, Any],
) -> None:
    rr = RoundRobin(INTERLEAVED, store)
    prepared = list(rr.prepared)
    per_block = INTERLEAVED_ROUNDS // INTERLEAVED_REPEATS
    blocks: list[list[list[float]]] = []  # [repeat][case] -> call times (s)

    def block() -> None:
        """One repeat: ``per_block`` rounds in this repeat's call order."""
        rr.reset()
        order = repeat_order(len(INTERLEAVED), len(blocks))
        for _ in range(per_block):
            rr.round(order)
        blocks.append(rr.times)

    try:
        for _ in range(WARMUP_ROUNDS):
            rr.round()
        benchmark.group = "interleaved"
        benchmark.pedantic(block, rounds=INTERLEAVED_REPEATS, iterations=1)
    finally:
        rr.close()
    rows = []
    for i, (case, prep) in enumerate(zip(INTERLEAVED, prepared, strict=True)):
        row = make_row(case, prep, [t for b in blocks for t in b[i]], sgemm_peak["gflops"])
        row["repeat_p50_ms"] = [1e3 * statistics.median(b[i]) for b in blocks]
        rows.append(row)
    small, v2 = ("tiny_convnet", "tiny_convnet") if SMOKE else (SMALL, V2)
    for row in rows:
        row["ratio_spreads"] = repeat_ratio_spreads(row, rows, small, v2)
    benchmark.extra_info.update(
        {"kind": "interleaved", "rows": rows, "repeats": INTERLEAVED_REPEATS,
         "rounds_per_repeat": per_block, "sgemm_peak": sgemm_peak, "env": env_info}
    )
    assert len(blocks) == INTERLEAVED_REPEATS
    assert all(len(r["repeat_p50_ms"]) == INTERLEAVED_REPEATS for r in rows)
    assert all(row["rounds"] == per_block * INTERLEAVED_REPEATS for row in rows)


def test_fedcoe_breakdown(benchmark: Any, store: ArtifactStore, env_info: dict[str, Any]) -> None:
    """Where one sparse top-2 call spends its time (224, 1 thread, batch 1): trunk, merged
    heads, routed experts, the fixed cost of an onnxruntime call, and numpy glue."""
    bundle = int8_bundle(store, smoke=SMOKE)
    result: dict[str, Any] = {}

    def measure() -> None:
        result.update(sparse_breakdown(bundle, 32 if SMOKE else 224, rounds=5 if SMOKE else 300))

    benchmark.group = "breakdown"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({"kind": "breakdown", "model": "fedcoe_top2", **result})
    assert result["p50_ms"]["run"] > 0 and result["calls_per_run"] >= 2
