"""Turn the benchmark JSON into a Markdown report and a bar chart.

``python -m benchmarks.report`` reads ``benchmarks/results/latency.json`` (pytest-benchmark
JSON whose ``extra_info`` holds the rows of :func:`benchmarks.harness.make_row`) and writes
``benchmarks/results/latency.md`` and ``latency.png``. Every FedCoE row (``family ==
"fedcoe"``) is shown as a ratio to MobileNetV3-Small and MobileNetV2 *measured in the same
run*: on shared or thermally throttled edge boards only same-run ratios are comparable.
The latency goal is checked on the way: FedCoE top-2 int8 at 224, 1 thread, batch 1
within 1.0x the latency of MobileNetV3-Small's best precision and 1.1x its peak memory: the
experts must cost no more than the classifier they replace.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedcoe_edge.errors import ConfigError

__all__ = [
    "load_rows",
    "main",
    "render_chart",
    "render_markdown",
    "repeat_ratio_spread",
    "repeat_ratio_spreads",
    "same_run_ratios",
]

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = "mobilenet_v3_small"
V2 = "mobilenet_v2"
LATENCY_GOAL = 1.0
MEMORY_GOAL = 1.1


def load_rows(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows and run metadata from a pytest-benchmark JSON file.

    The round-robin entry (``kind == "interleaved"``) goes to ``meta["interleaved"]``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"benchmarks.report: {p} does not exist; run `make bench` first")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"benchmarks.report: {p} is not JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ConfigError(
            f"benchmarks.report: {p} has no 'benchmarks' list (not pytest-benchmark JSON)"
        )
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {
        "datetime": data.get("datetime"),
        "env": {},
        "sgemm_peak": None,
        "interleaved": [],
        "breakdown": None,
    }
    for i, bench in enumerate(data["benchmarks"]):
        info = dict(bench.get("extra_info") or {})
        if info.get("kind") == "breakdown":
            meta["breakdown"] = {k: v for k, v in info.items() if k != "kind"}
            continue
        if info.get("kind") == "interleaved":
            meta["interleaved"] = list(info.get("rows") or [])
            meta["env"] = info.get("env", meta["env"])
            meta["sgemm_peak"] = info.get("sgemm_peak", meta["sgemm_peak"])
            continue
        if "model" not in info:
            raise ConfigError(
                f"benchmarks.report: {p} benchmark #{i} ({bench.get('name')}) has no result row "
                "in extra_info"
            )
        stats = bench.get("stats") or {}
        if info.get("p50_ms") is None and "median" in stats:
            info["p50_ms"] = stats["median"] * 1e3
        meta["env"] = info.pop("env", meta["env"])
        meta["sgemm_peak"] = info.pop("sgemm_peak", meta["sgemm_peak"])
        rows.append(info)
    return rows, meta


def _cfg(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["input"], row["threads"], row["batch"], row.get("spinning"))


def _same_config(row: dict[str, Any]) -> dict[str, Any]:
    """The fields a baseline row must share with ``row`` to be its "same" comparison."""
    return {"runtime": row["runtime"], "precision": row["precision"], "input": row["input"],
            "threads": row["threads"], "batch": row["batch"], "spinning": row.get("spinning")}


def _find(rows: Iterable[dict[str, Any]], **want: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in want.items()):
            return row
    return None


def _best(
    rows: Iterable[dict[str, Any]], model: str, cfg: tuple[Any, ...]
) -> dict[str, Any] | None:
    """The fastest row of ``model`` at the same input / threads / batch / spinning."""
    candidates = [
        r for r in rows if r["model"] == model and _cfg(r) == cfg and r["precision"] != "int8-naive"
    ]
    return min(candidates, key=lambda r: r["p50_ms"], default=None)


def _ratio(a: Any, b: Any) -> float | None:  # a row value, or a falsy missing row
    if a is None or b is None or b <= 0:
        return None
    return a / b


def same_run_ratios(
    row: dict[str, Any], rows: Sequence[dict[str, Any]], small: str = SMALL, v2: str = V2
) -> dict[str, Any]:
    """Latency and peak-RSS ratios of ``row`` to the baselines at the same configuration.

    ``*_same`` compares with the baseline at the same runtime and precision, ``*_best``
    with the baseline's fastest runtime/precision (the fair target for deployment).
    """
    same = _same_config(row)
    s_same = _find(rows, model=small, **same)
    v_same = _find(rows, model=v2, **same)
    s_best = _best(rows, small, _cfg(row))
    v_best = _best(rows, v2, _cfg(row))
    p50 = row["p50_ms"]
    rss = row.get("peak_rss_mb")
    return {
        "lat_small_same": _ratio(p50, s_same and s_same["p50_ms"]),
        "lat_small_best": _ratio(p50, s_best and s_best["p50_ms"]),
        "lat_v2_same": _ratio(p50, v_same and v_same["p50_ms"]),
        "lat_v2_best": _ratio(p50, v_best and v_best["p50_ms"]),
        "rss_small_same": _ratio(rss, s_same and s_same.get("peak_rss_mb")),
        "rss_small_best": _ratio(rss, s_best and s_best.get("peak_rss_mb")),
        "rss_v2_same": _ratio(rss, v_same and v_same.get("peak_rss_mb")),
        "small_best": s_best and f"{s_best['runtime']} {s_best['precision']}",
    }


def repeat_ratio_spread(
    numer: Sequence[float] | None, denom: Sequence[float] | None
) -> list[float] | None:
    """[median, min, max] over repeats of ``numer[r] / denom[r]`` (per-repeat p50s of two
    rows timed in the same blocks); None when either is missing, their lengths differ or a
    denominator is not positive. A ratio is taken within each repeat first, so load that
    shifts between repeats cancels out of it."""
    if not numer or not denom or len(numer) != len(denom) or any(d <= 0 for d in denom):
        return None
    ratios = [n / d for n, d in zip(numer, denom, strict=True)]
    return [statistics.median(ratios), min(ratios), max(ratios)]


def repeat_ratio_spreads(
    row: dict[str, Any], rows: Sequence[dict[str, Any]], small: str = SMALL, v2: str = V2
) -> dict[str, list[float] | None]:
    """The latency ratios of :func:`same_run_ratios` as median (min-max) over the repeat
    blocks of the round-robin timing (rows carrying ``repeat_p50_ms``); "best" is the
    baseline row fastest over all repeats."""
    same = _same_config(row)
    mine = row.get("repeat_p50_ms")

    def to(base: dict[str, Any] | None) -> list[float] | None:
        return repeat_ratio_spread(mine, None if base is None else base.get("repeat_p50_ms"))

    return {
        "lat_small_same": to(_find(rows, model=small, **same)),
        "lat_small_best": to(_best(rows, small, _cfg(row))),
        "lat_v2_same": to(_find(rows, model=v2, **same)),
        "lat_v2_best": to(_best(rows, v2, _cfg(row))),
    }


def _xs(spread: Sequence[float] | None, single: float | None = None) -> str:
    """``1.18x (1.10-1.25)`` from [median, min, max]; the single ratio when no spread."""
    if spread is None:
        return _x(single)
    return f"{spread[0]:.2f}x ({spread[1]:.2f}-{spread[2]:.2f})"


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return lines


def _threads_label(row: dict[str, Any]) -> str:
    return f"{row['threads']}" + (" no-spin" if row.get("spinning") is False else "")


def _sort_key(row: dict[str, Any]) -> tuple[Any, ...]:
    order = {"torch": 0, "onnxruntime": 1}
    prec = {"fp32": 0, "int8": 1, "int8-fold": 2, "int8-gap": 3, "int8-naive": 4}
    return (
        row.get("family") != "fedcoe",
        row["model"],
        -int(str(row["input"]).split("x")[-1]),
        row["batch"],
        row["threads"],
        row.get("spinning") is False,
        order.get(row["runtime"], 9),
        prec.get(row["precision"], 9),
    )


def render_markdown(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any], small: str = SMALL, v2: str = V2
) -> str:
    """The report: environment, FedCoE ratios and goal, int8 vs fp32, threads, full table.

    One function per section, in report order; a section with nothing to show returns no lines.
    """
    inter = list(meta.get("interleaved") or [])
    out = _header_lines(rows, meta)
    out += _round_robin_lines(inter, small, v2)
    out += _fedcoe_lines(rows, inter, small, v2)
    if meta.get("breakdown"):
        out += _breakdown_lines(meta["breakdown"], inter or rows, small)
    out += _int8_lines(rows)
    out += _all_rows_lines(rows)
    out += ["", "![p50 latency at 224x224, batch 1](latency.png)", ""]
    return "\n".join(out)


def _header_lines(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """Title, the machine and versions, the SGEMM peak, the load while timing, the method."""
    env = meta.get("env") or {}
    peak = meta.get("sgemm_peak") or {}
    out = ["# Latency and memory benchmark", ""]
    out.append(
        f"Run {meta.get('datetime') or '?'} on `{env.get('cpu', '?')}` "
        f"({env.get('cpu_count', '?')} cores, {env.get('machine', '?')}); python "
        f"{env.get('python', '?')}, torch {env.get('torch', '?')}, onnxruntime "
        f"{env.get('onnxruntime', '?')}, onnx {env.get('onnx', '?')}; ONNX opset "
        f"{_fmt(next((r.get('opset') for r in rows if r.get('opset')), None))}."
    )
    if peak:
        out.append(
            f"Single-thread SGEMM peak: **{peak.get('gflops', 0):.1f} GFLOP/s** "
            f"({peak.get('backend')}, n={peak.get('n')}); `% peak` divides achieved "
            "GFLOP/s (2 x MACs x batch / p50) by threads x this figure."
        )
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    if loads:
        out.append(
            f"Machine load (1-min load average) while timing: {min(loads):.1f} to "
            f"{max(loads):.1f} on {env.get('cpu_count', '?')} cores; rows timed under a load "
            "near or above the core count shared the CPU with other work (multi-thread rows "
            "suffer most)."
        )
    out += [
        "",
        "Latency is p50/p95/p99 of single calls after warm-up. Peak RSS is the growth of a "
        "fresh process's peak resident memory over one that only imported the runtime. "
        "Ratios compare rows measured in this same run.",
        "",
    ]
    return out


def _round_robin_lines(inter: Sequence[dict[str, Any]], small: str, v2: str) -> list[str]:
    """The round-robin rows (every model timed under the same background load), if any."""
    if not inter:
        return []
    repeats = len(inter[0].get("repeat_p50_ms") or [])
    spread_note = (
        f" Ratios: median (min-max) over {repeats} repeat blocks, the call order rotated "
        "and alternated per block; each ratio is taken within a block (p50 of the row over "
        "p50 of the baseline), p50/p95/p99 over all rounds."
        if repeats
        else ""
    )
    out = [
        "## Round-robin timing (one call of each model per round)",
        "",
        "Timed together, so every row saw the same background load: the fairest "
        "latency ratios of this run." + spread_note,
        "",
    ]
    body = []
    for r in sorted(inter, key=_sort_key):
        q = same_run_ratios(r, inter, small, v2)
        sp = repeat_ratio_spreads(r, inter, small, v2)
        body.append(
            [
                r["model"],
                f"{r['runtime']} {r['precision']}",
                r["input"],
                _fmt(r["p50_ms"], 3),
                _fmt(r.get("p95_ms"), 3),
                _fmt(r.get("p99_ms"), 3),
                _fmt(r.get("pct_of_peak"), 1),
                _xs(sp["lat_small_same"], q["lat_small_same"]),
                f"{_xs(sp['lat_small_best'], q['lat_small_best'])} ({q['small_best'] or '-'})",
                _xs(sp["lat_v2_same"], q["lat_v2_same"]),
            ]
        )
    out += _table(
        [
            "model",
            "runtime / precision",
            "input",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "% peak",
            "latency ÷ V3-S same",
            "latency ÷ V3-S best",
            "latency ÷ V2 same",
        ],
        body,
    )
    out.append("")
    return out


def _fedcoe_lines(
    rows: Sequence[dict[str, Any]], inter: Sequence[dict[str, Any]], small: str, v2: str
) -> list[str]:
    """FedCoE rows as same-run ratios to the baselines, the goal, sparse against dense."""
    fedcoe = sorted((r for r in rows if r.get("family") == "fedcoe"), key=_sort_key)
    if not fedcoe:
        return []
    out = ["## FedCoE against the MobileNet baselines", ""]
    body = []
    for r in fedcoe:
        q = same_run_ratios(r, rows, small, v2)
        body.append(
            [
                r["model"],
                f"{r['runtime']} {r['precision']}",
                r["input"],
                _threads_label(r),
                str(r["batch"]),
                _fmt(r["p50_ms"], 3),
                _fmt(r.get("peak_rss_mb"), 1),
                _x(q["lat_small_same"]),
                f"{_x(q['lat_small_best'])} ({q['small_best'] or '-'})",
                _x(q["lat_v2_same"]),
                _x(q["rss_small_same"]),
                _x(q["rss_small_best"]),
                _x(q["rss_v2_same"]),
            ]
        )
    out += _table(
        [
            "model",
            "runtime / precision",
            "input",
            "threads",
            "batch",
            "p50 ms",
            "peak RSS MB",
            "latency ÷ V3-S same",
            "latency ÷ V3-S best",
            "latency ÷ V2 same",
            "RSS ÷ V3-S same",
            "RSS ÷ V3-S best",
            "RSS ÷ V2 same",
        ],
        body,
    )
    out += ["", *_goal_lines(fedcoe, rows, inter, small, v2), ""]
    out += _sparse_vs_dense(rows)
    return out


def _int8_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """onnxruntime int8 (unfixed and fixed) against fp32 at equal settings."""
    out = ["## int8 against fp32 (onnxruntime)", ""]
    body = []
    for r in sorted(rows, key=_sort_key):
        if r["runtime"] != "onnxruntime" or r["precision"] != "fp32":
            continue
        cfg = {k: r[k] for k in ("model", "input", "threads", "batch")}
        cfg["spinning"] = r.get("spinning")
        i8 = _find(rows, runtime="onnxruntime", precision="int8", **cfg)
        naive = _find(rows, runtime="onnxruntime", precision="int8-naive", **cfg)
        if i8 is None and naive is None:
            continue
        body.append(
            [
                r["model"],
                r["input"],
                _threads_label(r),
                str(r["batch"]),
                _fmt(r["p50_ms"], 3),
                _fmt(naive and naive["p50_ms"], 3),
                _fmt(i8 and i8["p50_ms"], 3),
                _x(_ratio(r["p50_ms"], i8 and i8["p50_ms"])),
                _fmt(r.get("size_mb")),
                _fmt(i8 and i8.get("size_mb")),
            ]
        )
    out += _table(
        [
            "model",
            "input",
            "threads",
            "batch",
            "fp32 p50 ms",
            "int8 unfixed p50 ms",
            "int8 p50 ms",
            "int8 speed-up",
            "fp32 MB",
            "int8 MB",
        ],
        body,
    )
    out += [
        "",
        "`int8 unfixed` is onnxruntime's `quantize_static` on the raw export; `int8` adds the "
        "GlobalAveragePool rewrite, the integer HardSigmoid fold and an fp32 RGB stem "
        "(`export/quantize.py`, `export/graph_rewrites.py`; `python -m benchmarks.compare` times "
        "each step).",
        "",
    ]
    return out


def _all_rows_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every measured row, every column."""
    out = ["## All rows", ""]
    body = [
        [
            r["model"],
            r["runtime"],
            r["precision"],
            r["input"],
            _threads_label(r),
            str(r["batch"]),
            _fmt(r["p50_ms"], 3),
            _fmt(r.get("p95_ms"), 3),
            _fmt(r.get("p99_ms"), 3),
            _fmt(r.get("peak_rss_mb"), 1),
            _fmt(r.get("size_mb")),
            f"{r['params']:,}" if r.get("params") is not None else "-",
            _fmt(r["macs"] / 1e6 if r.get("macs") is not None else None, 1),
            _fmt(r.get("gflops"), 1),
            _fmt(r.get("pct_of_peak"), 1),
        ]
        for r in sorted(rows, key=_sort_key)
    ]
    out += _table(
        [
            "model",
            "runtime",
            "precision",
            "input",
            "threads",
            "batch",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "peak RSS MB",
            "size MB",
            "params",
            "MMACs",
            "GFLOP/s",
            "% peak",
        ],
        body,
    )
    return out


def _goal_lines(
    fedcoe: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    inter: Sequence[dict[str, Any]],
    small: str,
    v2: str,
) -> list[str]:
    """The latency goal at 224 / 1 thread / batch 1; latency from the round-robin rows when
    they include the model, memory from the fresh-process probes."""
    lines = []
    for r in fedcoe:
        if not (
            r["precision"] == "int8"
            and r["threads"] == 1
            and r["batch"] == 1
            and str(r["input"]).endswith("x224")
        ):
            continue
        q = same_run_ratios(r, rows, small, v2)
        lat, rss = q["lat_small_best"], q["rss_small_best"]
        twin = _find(inter, model=r["model"], runtime=r["runtime"], precision=r["precision"])
        source, spread = "sequential", None
        if twin is not None:
            lat = same_run_ratios(twin, inter, small, v2)["lat_small_best"]
            spread = repeat_ratio_spreads(twin, inter, small, v2)["lat_small_best"]
            source = "round-robin"
            if spread is not None:  # the goal is judged on the median over the repeats
                lat = spread[0]
                source += f", median (min-max) over {len(twin['repeat_p50_ms'])} repeats"
        ok_lat = lat is not None and lat <= LATENCY_GOAL
        ok_rss = rss is not None and rss <= MEMORY_GOAL
        lines.append(
            f"Goal for `{r['model']}` int8, 224, 1 thread: latency ({source}) {_xs(spread, lat)} of "
            f"MobileNetV3-Small's best (target <= {LATENCY_GOAL}x: "
            f"{'met' if ok_lat else 'not met'}), peak RSS {_x(rss)} "
            f"(target <= {MEMORY_GOAL}x: {'met' if ok_rss else 'not met'})."
        )
    return lines


def _sparse_vs_dense(rows: Sequence[dict[str, Any]]) -> list[str]:
    """fedcoe_top2 (sparse runtime) against fedcoe_dense (fused graph) at equal settings."""
    body = []
    for r in sorted(rows, key=_sort_key):
        if not str(r["model"]).startswith("fedcoe_top2"):
            continue
        cfg = {k: r[k] for k in ("runtime", "precision", "input", "threads", "batch")}
        d = _find(rows, model=str(r["model"]).replace("top2", "dense"), **cfg)
        if d is None:
            continue
        body.append([
            f"{r['runtime']} {r['precision']}", r["input"], _threads_label(r), str(r["batch"]),
            _fmt(r["p50_ms"], 3), _fmt(d["p50_ms"], 3), _x(_ratio(r["p50_ms"], d["p50_ms"])),
            _fmt(r.get("peak_rss_mb"), 1), _fmt(d.get("peak_rss_mb"), 1),
            _fmt(r["macs"] / 1e6, 1), _fmt(d["macs"] / 1e6, 1),
        ])
    if not body:
        return []
    out = ["### Sparse top-2 against the fused dense graph", ""]
    out += _table(["runtime / precision", "input", "threads", "batch", "top-2 p50 ms",
                   "dense p50 ms", "top-2 ÷ dense", "top-2 RSS MB", "dense RSS MB",
                   "top-2 MMACs", "dense MMACs"], body)
    out += ["", "Top-2 runs the trunk, one merged call for the always-on heads (gates, shared "
            "and local experts) and the two routed experts; dense runs all K experts in one "
            "graph. torch rows: `DualLevelMoE.forward` (sparse) and the fused module.", ""]
    return out


def _breakdown_lines(b: dict[str, Any], rows: Sequence[dict[str, Any]], small: str) -> list[str]:
    """Where one sparse top-2 call spends its time (benchmarks.fedcoe.sparse_breakdown)."""
    p50 = dict(b.get("p50_ms") or {})
    if "run" not in p50:
        return []
    run = p50["run"]
    base = _find(rows, model=small, runtime="onnxruntime", precision="int8", batch=1, threads=1)
    lines = ["## Where the sparse top-2 time goes (int8, 1 thread, batch 1)", ""]
    body = []
    for name, ms in p50.items():
        if name in ("run", "empty_call"):
            continue
        body.append([name, _fmt(ms, 3), f"{100 * ms / run:.0f}%"])
    body.append(["numpy glue (run - sessions)", _fmt(b.get("glue_ms"), 3),
                 f"{100 * (b.get('glue_ms') or 0) / run:.0f}%"])
    body.append(["**MoESession.run**", f"**{run:.3f}**", "100%"])
    lines += _table(["part", "p50 ms", "share"], body)
    lines.append("")
    lines.append(
        f"{b.get('calls_per_run')} onnxruntime calls per input; an empty call costs "
        f"{p50.get('empty_call', 0) * 1e3:.0f} us, so {b.get('call_overhead_ms', 0) * 1e3:.0f} us "
        f"of each run is the fixed cost of calling onnxruntime."
        + (f" For scale: MobileNetV3-Small int8 in the same run, {base['p50_ms']:.3f} ms for "
           "trunk and classifier in one call." if base else "")
    )
    lines.append("")
    return lines


def render_chart(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Grouped bars of p50 latency at 224x224, batch 1: one panel per thread setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["batch"] == 1 and str(r["input"]).endswith("x224")]
    if not sel:  # e.g. a smoke run at 32x32: chart batch 1 at whatever input there is
        sel = [r for r in rows if r["batch"] == 1]
    if not sel:
        raise ConfigError("benchmarks.report: no batch-1 rows to chart")
    panels = sorted({_threads_label(r) for r in sel})
    models = sorted({r["model"] for r in sel}, key=lambda m: (m.startswith("mobilenet"), m))
    series = sorted(
        {(r["runtime"], r["precision"]) for r in sel},
        key=lambda s: (s[0] != "torch", s[1]),
    )
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(5 + 2.5 * len(models), 4.5), squeeze=False
    )
    width = 0.8 / max(1, len(series))
    for ax, panel in zip(axes[0], panels, strict=True):
        for j, (runtime, precision) in enumerate(series):
            xs, ys = [], []
            for i, model in enumerate(models):
                hit = next(
                    (
                        r
                        for r in sel
                        if r["model"] == model
                        and _threads_label(r) == panel
                        and (r["runtime"], r["precision"]) == (runtime, precision)
                    ),
                    None,
                )
                x = i + (j - (len(series) - 1) / 2) * width
                if hit is not None:
                    xs.append(x)
                    ys.append(hit["p50_ms"])
                else:  # an empty slot would read as zero latency: say it was not measured
                    ax.text(x, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6,
                            color="grey")
            label = f"{'torch' if runtime == 'torch' else 'ORT'} {precision}"
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"threads = {panel}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    inputs = sorted({r["input"] for r in sel})
    fig.suptitle(f"p50 latency, batch 1, input {', '.join(inputs)} (lower is better)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the benchmark report")
    parser.add_argument("--json", type=Path, default=RESULTS / "latency.json")
    parser.add_argument("--md", type=Path, default=None, help="default: beside the JSON")
    parser.add_argument("--png", type=Path, default=None, help="default: beside the JSON")
    parser.add_argument("--small", default=SMALL, help="model name of the small baseline")
    parser.add_argument("--v2", default=V2, help="model name of the second baseline")
    args = parser.parse_args(argv)
    rows, meta = load_rows(args.json)
    md = args.md or args.json.with_suffix(".md")
    png = args.png or args.json.with_suffix(".png")
    text = render_markdown(rows, meta, args.small, args.v2)
    text = text.replace("](latency.png)", f"]({png.name})")
    from benchmarks.camera_accuracy import embed_section, section_from

    camera = section_from(args.json.parent)  # the trained bundle's accuracy, if measured
    if camera is not None:
        text = embed_section(text, camera)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text, encoding="utf-8")
    render_chart(rows, png)
    print(f"wrote {md} and {png} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
