"""The reduced benchmark behind ``fedcoe bench --quick --json PATH``.

Times MobileNetV2 and V3-Small (torch eager, ONNX fp32, ONNX int8) at 224x224, 1 thread,
batch 1 -- plus any extra cases, e.g. the FedCoE top-2 and dense rows -- without
pytest-benchmark, and writes ``{"rows": [...]}`` with the keys of
:data:`benchmarks.harness.ROW_KEYS`. Runs in well under 3 minutes on a 2-core VM.

``python -m benchmarks.quick --json PATH`` does the same from the shell.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import ROW_KEYS, ArtifactStore, Case, quick_cases, run_case
from benchmarks.sgemm_peak import measure_sgemm_peak

__all__ = ["run_quick"]


def run_quick(
    json_path: str | Path,
    cases: Sequence[Case] | None = None,
    *,
    rounds: int | None = 30,
    measure_memory: bool = True,
    workdir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``cases`` (default :func:`quick_cases`) and write the quick JSON; returns the rows.

    Rows carry exactly the schema's keys. ``workdir`` keeps the exported files (a
    temporary folder otherwise).
    """
    selected = list(cases) if cases is not None else quick_cases()
    peak = measure_sgemm_peak().gflops
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedcoe-bench-") as tmp:
        store = ArtifactStore(workdir or tmp)
        for case in selected:
            if progress:
                progress(case.id)
            full = run_case(case, store, peak, rounds=rounds, measure_memory=measure_memory)
            rows.append({k: full[k] for k in ROW_KEYS})
    out = Path(json_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n", encoding="utf-8")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="quick latency/memory benchmark")
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from benchmarks.fedcoe import quick_fedcoe_cases
    from benchmarks.harness import quick_cases as baseline_quick

    rows = run_quick(
        args.json,
        baseline_quick(quick_fedcoe_cases()),
        rounds=args.rounds,
        progress=lambda s: print(s, flush=True),
    )
    for r in rows:
        print(
            f"{r['model']:<20} {r['runtime']:<12} {r['precision']:<5} "
            f"p50 {r['p50_ms']:8.3f} ms  rss {r['peak_rss_mb'] or 0:6.1f} MB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
