"""``fedcoe bench``: latency / memory benchmark of FedCoE against MobileNet baselines.

``fedcoe bench --quick --json PATH`` times MobileNetV2, MobileNetV3-Small, FedCoE sparse
top-2 (``MoESession`` over an int8 bundle) and the fused dense FedCoE graph at 224x224,
1 thread, batch 1, and writes ``{"rows": [...]}``. The full suite (every runtime, thread
count and batch, with the Markdown report and chart) is ``make bench``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcoe_edge.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "bench",
        help="latency/memory of FedCoE vs MobileNetV2 / V3-Small",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--quick", action="store_true", help="the reduced set (under 3 minutes)")
    p.add_argument("--json", type=Path, required=True, help="where to write the rows")
    p.add_argument("--rounds", type=int, default=30, help="timed calls per row (default 30)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS probes")
    p.add_argument("--workdir", type=Path, default=None, help="keep exported files here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the quick benchmark and print one line per row."""
    if not args.quick:
        raise ConfigError("fedcoe bench: only --quick runs from the CLI; the full suite is `make bench`")
    if args.rounds < 1:
        raise ConfigError(f"fedcoe bench: --rounds must be >= 1, got {args.rounds}")
    import torch

    from benchmarks.fedcoe import quick_fedcoe_cases
    from benchmarks.harness import quick_cases
    from benchmarks.quick import run_quick

    torch.set_num_threads(1)
    rows = run_quick(
        args.json,
        quick_cases(quick_fedcoe_cases()),
        rounds=args.rounds,
        measure_memory=not args.no_memory,
        workdir=args.workdir,
        progress=lambda case_id: print(f"timing {case_id}", flush=True),
    )
    for r in rows:
        rss = "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.1f}"
        print(
            f"{r['model']:<20} {r['runtime']:<12} {r['precision']:<5} {r['input']} "
            f"t{r['threads']} b{r['batch']}  p50 {r['p50_ms']:8.3f} ms  "
            f"p95 {r['p95_ms']:8.3f} ms  rss {rss} MB"
        )
    print(f"wrote {args.json}")
    return 0
