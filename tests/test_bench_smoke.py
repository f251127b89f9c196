"""Smoke tests of the benchmark harness (not the benchmark): tiny models, few iterations.

The end-to-end test runs ``benchmarks/test_latency.py`` for real under pytest-benchmark
with ``FEDCOE_BENCH_SMOKE=1`` (a tiny net through torch, ONNX fp32 and ONNX int8), then
``python -m benchmarks.report`` on its JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from benchmarks.compare import repeat_order
from benchmarks.fedcoe import smoke_fedcoe_cases
from benchmarks.harness import (
    ROW_KEYS,
    ArtifactStore,
    Case,
    Prepared,
    make_row,
    prepare,
    smoke_cases,
    summarize,
)
from benchmarks.memory import MemoryTarget, peak_rss_increase
from benchmarks.onnx_utils import (
    QuantizeOptions,
    fold_quantized_hardsigmoid,
    model_op_counts,
    name_nodes,
    quantize_int8,
    random_calibration,
    rewrite_global_pool,
    stem_nodes,
)
from benchmarks.ort_session import make_session
from benchmarks.quick import run_quick
from benchmarks.report import (
    load_rows,
    render_markdown,
    repeat_ratio_spread,
    repeat_ratio_spreads,
    same_run_ratios,
)
from benchmarks.sgemm_peak import measure_sgemm_peak
from fedcoe_edge.errors import ConfigError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ a V3-style ONNX graph


def _se_hardswish_graph(seed: int = 0) -> onnx.ModelProto:
    """RGB stem conv + ReLU -> conv -> HardSwish -> SE (ReduceMean, 1x1 conv, HardSigmoid,
    Mul) -> 1x1 conv: the int8 trouble spots of MobileNetV3 in a few hundred weights."""
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("HardSwish", ["c1"], ["h"]),
        helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=1),
        helper.make_node("Conv", ["m", "w2", "b2"], ["c2"]),
        helper.make_node("HardSigmoid", ["c2"], ["s"], alpha=1.0 / 6.0, beta=0.5),
        helper.make_node("Mul", ["h", "s"], ["hs"]),
        helper.make_node("Conv", ["hs", "w3", "b3"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "se_hardswish",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [
            init("w0", (8, 3, 3, 3), 0.6),
            init("b0", (8,), 0.2),
            init("w1", (8, 8, 3, 3), 0.3),
            init("b1", (8,), 0.5),
            numpy_helper.from_array(np.array([-1, -2], np.int64), "axes"),
            init("w2", (8, 8, 1, 1), 0.8),
            init("b2", (8,), 1.0),
            init("w3", (4, 8, 1, 1), 0.5),
            init("b3", (4,), 0.1),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def se_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("se")
    fp32 = root / "fp32.onnx"
    onnx.save(_se_hardswish_graph(), fp32)
    out = {"fp32": fp32}
    for name, opts in (("naive", QuantizeOptions.naive()), ("fixed", QuantizeOptions())):
        out[name] = quantize_int8(
            fp32, root / f"{name}.onnx", random_calibration("x", (1, 3, 16, 16), 16), opts
        )
    return out


def test_int8_fix_removes_every_fp32_island(se_models: dict[str, Path], tmp_path: Path) -> None:
    naive = model_op_counts(se_models["naive"])
    fixed = model_op_counts(se_models["fixed"])
    assert naive["HardSigmoid"] == 2 and naive["ReduceMean"] == 1
    assert "HardSigmoid" not in fixed and "ReduceMean" not in fixed
    assert fixed["GlobalAveragePool"] == 1

    # What onnxruntime actually runs: integer kernels only, fp32 only at the graph edges.
    def optimized_ops(path: Path) -> dict[str, int]:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"opt-{path.name}")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return model_op_counts(so.optimized_model_filepath)

    ops_fixed = optimized_ops(se_models["fixed"])
    ops_naive = optimized_ops(se_models["naive"])
    assert ops_naive.get("HardSigmoid", 0) == 2
    assert "HardSigmoid" not in ops_fixed and "ReduceMean" not in ops_fixed
    assert ops_fixed.get("QLinearAdd", 0) == 2
    assert ops_fixed.get("QLinearGlobalAveragePool", 0) == 1
    assert ops_fixed.get("QLinearConv", 0) == 3  # all but the stem
    # One quantization after the fp32 stem, one dequantization at the output.
    assert ops_fixed.get("QuantizeLinear", 0) == 1
    assert ops_fixed.get("DequantizeLinear", 0) == 1
    assert ops_naive.get("QLinearConv", 0) == 4


def test_int8_fix_keeps_the_numbers(se_models: dict[str, Path]) -> None:
    x = np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = _run(se_models["fp32"], x)
    naive = _run(se_models["naive"], x)
    fixed = _run(se_models["fixed"], x)
    span = float(ref.max() - ref.min())
    assert np.abs(fixed - ref).max() < 0.05 * span
    # Same quantized function as the unfixed graph, up to integer rounding.
    assert np.abs(fixed - naive).mean() < 0.01 * span


def test_stem_nodes_finds_the_rgb_conv_and_its_activation() -> None:
    model = _se_hardswish_graph()
    name_nodes(model)
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    first, relu = model.graph.node[0], model.graph.node[1]
    assert stem_nodes(model) == [first.name, relu.name]
    assert stem_nodes(model, max_in_channels=2) == []


def test_fold_skips_islands_whose_clip_is_not_saturation(se_models: dict[str, Path]) -> None:
    model = onnx.load(str(se_models["naive"]))
    q_after = {n.input[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    hs_outputs = [n.output[0] for n in model.graph.node if n.op_type == "HardSigmoid"]
    zp_names = {q_after[o].input[2] for o in hs_outputs}
    for init in model.graph.initializer:
        if init.name in zp_names:
            init.CopyFrom(numpy_helper.from_array(np.array(3, np.uint8), init.name))
    assert fold_quantized_hardsigmoid(model) == 0
    assert model_op_counts(model)["HardSigmoid"] == 2


def test_global_pool_rewrite_is_exact(tmp_path: Path) -> None:
    model = _se_hardswish_graph()
    assert rewrite_global_pool(model) == 1
    assert model_op_counts(model).get("ReduceMean", 0) == 0
    assert all(i.name != "axes" for i in model.graph.initializer)
    onnx.save(model, tmp_path / "gap.onnx")
    onnx.save(_se_hardswish_graph(), tmp_path / "rm.onnx")
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        _run(tmp_path / "gap.onnx", x), _run(tmp_path / "rm.onnx", x), rtol=1e-5, atol=1e-5
    )


def test_quantize_rejects_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"quantize_int8: source model .*missing\.onnx"):
        quantize_int8(
            tmp_path / "missing.onnx", tmp_path / "q.onnx", random_calibration("x", (1, 3, 4, 4))
        )


def test_session_threads_and_options(se_models: dict[str, Path]) -> None:
    s = make_session(se_models["fixed"], 2, spinning=False)
    assert s.get_session_options().intra_op_num_threads == 2
    entries = s.get_session_options().get_session_config_entry
    assert entries("session.intra_op.allow_spinning") == "0"
    with pytest.raises(ConfigError, match="threads"):
        make_session(se_models["fixed"], 0)
    with pytest.raises(ConfigError, match="optimization"):
        make_session(se_models["fixed"], optimization="max")


# ----------------------------------------------------------------- measurement pieces


def test_memory_probe_sees_an_allocation() -> None:
    """A 48 MiB array allocated (and touched) by the target shows up as the increase."""
    target = MemoryTarget("numpy:ones", {"shape": 6 * 2**20, "dtype": "float64"}, ("numpy",))
    result = peak_rss_increase(target)
    assert 44.0 < result.increase_mb < 64.0
    assert result.baseline_mb > 5.0


def test_memory_probe_reports_a_failing_target() -> None:
    with pytest.raises(RuntimeError, match="no_such_module"):
        peak_rss_increase(MemoryTarget("no_such_module:f", {}, ("numpy",)))


def test_sgemm_peak_is_measured() -> None:
    peak = measure_sgemm_peak(sizes=(64, 96), repeats=1, min_seconds=0.0)
    assert peak.gflops == max(peak.per_backend.values()) > 0
    assert set(peak.per_backend) == {"torch@64", "torch@96", "numpy@64", "numpy@96"}
    with pytest.raises(ConfigError, match="sizes"):
        measure_sgemm_peak(sizes=(8,))
    with pytest.raises(ConfigError, match="backends"):
        measure_sgemm_peak(sizes=(64,), backends=("blas",))


def test_make_row_derives_throughput_and_percent_of_peak() -> None:
    case = Case("m", "onnxruntime", "int8", 224, threads=2, batch=4)
    prepared = Prepared(run=lambda: None, params=10, macs=5_000_000, size_bytes=2**20)
    times = [0.002, 0.004, 0.004, 0.010]
    row = make_row(case, prepared, times, sgemm_peak_gflops=10.0)
    assert set(ROW_KEYS) <= set(row)
    assert row["p50_ms"] == pytest.approx(4.0)
    assert row["gflops"] == pytest.approx(2 * 5e6 * 4 / 4e-3 / 1e9)
    assert row["pct_of_peak"] == pytest.approx(100 * row["gflops"] / 20.0)
    assert row["size_mb"] == pytest.approx(1.0)
    assert row["p95_ms"] > row["p50_ms"] and row["p99_ms"] >= row["p95_ms"]
    assert summarize([0.001])["rounds"] == 1
    with pytest.raises(ConfigError, match="no timings"):
        summarize([])


def test_case_validation_and_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="runtime"):
        Case("m", "tensorrt")
    with pytest.raises(ConfigError, match="batch"):
        Case("m", "torch", batch=0)
    with pytest.raises(ConfigError, match="no preparer registered for model 'nope'"):
        prepare(Case("nope", "torch"), ArtifactStore(tmp_path))


def test_quick_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "quick.json"
    rows = run_quick(
        out, [Case("tiny_convnet", "torch", "fp32", 32)], rounds=2, measure_memory=False
    )
    data = json.loads(out.read_text())
    assert data == {"rows": rows}
    assert list(rows[0]) == list(ROW_KEYS)
    assert rows[0]["macs"] > 0 and rows[0]["params"] == 778 and rows[0]["p50_ms"] > 0


# ------------------------------------------------------------------------- end to end


@pytest.mark.slow  # pytest-benchmark in a subprocess, then the report: 22-26 s (make test-all)
def test_benchmark_suite_and_report_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    env = dict(os.environ, FEDCOE_BENCH_SMOKE="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/test_latency.py",
        "-q",
        "-m",
        "bench",
        "--benchmark-enable",
        "--benchmark-only",
        f"--benchmark-json={out}",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    rows, meta = load_rows(out)
    cases = smoke_cases() + smoke_fedcoe_cases()
    assert sorted(r["case_id"] for r in rows) == sorted(c.id for c in cases)
    assert meta["env"]["onnxruntime"] and meta["sgemm_peak"]["gflops"] > 0
    inter = meta["interleaved"]
    assert sorted(r["case_id"] for r in inter) == sorted(c.id for c in cases)
    # the FedCoE rows ran the real bundle: sparse top-2 through MoESession, dense fused graph
    top2 = next(r for r in rows if r["case_id"] == "fedcoe_top2_smoke-onnxruntime-int8-32-t1-b1")
    dense = next(r for r in rows if r["model"] == "fedcoe_dense_smoke")
    assert top2["note_kind"] == "sparse top-2" and dense["note_kind"] == "dense fused"
    assert top2["note_quantization"] == ["static_int8"]
    assert top2["params"] == top2["note_active_params"] < dense["params"]
    assert top2["macs"] < dense["macs"] == top2["note_dense_macs"]
    assert all(r["rounds"] == 2 and r["p50_ms"] > 0 for r in inter)
    assert all(len(r["repeat_p50_ms"]) == 2 and min(r["repeat_p50_ms"]) > 0 for r in inter)
    moe_inter = next(r for r in inter if r["family"] == "fedcoe")
    spread = moe_inter["ratio_spreads"]["lat_small_same"]
    assert spread == repeat_ratio_spreads(moe_inter, inter, "tiny_convnet", "tiny_convnet")[
        "lat_small_same"
    ]
    assert spread is not None and spread[1] <= spread[0] <= spread[2]
    for row in rows:
        for key in ROW_KEYS:
            if key == "peak_rss_mb" and row["runtime"] == "torch":
                continue  # the smoke run skips the torch memory probe
            assert row[key] is not None, (row["case_id"], key)
        assert row["p95_ms"] >= row["p50_ms"] > 0
        assert row["rounds"] == 2
    onnx_rows = [r for r in rows if r["runtime"] == "onnxruntime"]
    assert all(r["opset"] == 18 and r["peak_rss_mb"] > 0 for r in onnx_rows)
    int8 = next(r for r in rows if r["model"] == "tiny_convnet" and r["precision"] == "int8")
    fp32 = next(
        r
        for r in rows
        if r["model"] == "tiny_convnet"
        and r["precision"] == "fp32"
        and r["runtime"] == "onnxruntime"
    )
    assert int8["size_mb"] < fp32["size_mb"]

    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.report",
            "--json",
            str(out),
            "--small",
            "tiny_convnet",
            "--v2",
            "tiny_convnet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr[-2000:]
    md = (tmp_path / "latency.md").read_text()
    moe = next(r for r in rows if r["family"] == "fedcoe")
    expected = same_run_ratios(moe, rows, "tiny_convnet", "tiny_convnet")["lat_small_same"]
    assert expected == pytest.approx(moe["p50_ms"] / int8["p50_ms"])
    assert f"{expected:.2f}x" in md
    assert "## FedCoE against the MobileNet baselines" in md
    assert "## Round-robin timing" in md
    assert "median (min-max) over 2 repeat blocks" in md
    assert f"{spread[0]:.2f}x ({spread[1]:.2f}-{spread[2]:.2f})" in md
    assert "### Sparse top-2 against the fused dense graph" in md
    assert "## Where the sparse top-2 time goes" in md and "numpy glue" in md
    assert md.count("| tiny_convnet") >= 4
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_rejects_foreign_json(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ConfigError, match="no 'benchmarks' list"):
        load_rows(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(tmp_path / "missing.json")


def test_repeat_ratio_spread_on_hand_computed_values() -> None:
    # per-repeat ratios 2/1, 3/2, 4/2 = 2.0, 1.5, 2.0: median 2.0, min 1.5, max 2.0
    assert repeat_ratio_spread([2.0, 3.0, 4.0], [1.0, 2.0, 2.0]) == [2.0, 1.5, 2.0]
    # even count: the median is the mean of the middle two (1.2 and 1.4)
    got = repeat_ratio_spread([1.2, 1.0, 2.8, 1.4], [1.0, 1.0, 2.0, 1.0])
    assert got == pytest.approx([1.3, 1.0, 1.4])
    for numer, denom in (([1.0], [1.0, 2.0]), (None, [1.0]), ([1.0], []), ([1.0], [0.0])):
        assert repeat_ratio_spread(numer, denom) is None


def _rr_row(model: str, precision: str, p50s: list[float]) -> dict[str, object]:
    return {"model": model, "family": "fedcoe" if model.startswith("fedcoe") else "baseline",
            "runtime": "onnxruntime", "precision": precision, "input": "3x224x224",
            "threads": 1, "batch": 1, "p50_ms": sorted(p50s)[len(p50s) // 2],
            "repeat_p50_ms": p50s}


def test_round_robin_table_and_goal_carry_the_spread_over_repeats() -> None:
    rows = [
        _rr_row("fedcoe_top2", "int8", [2.4, 2.2, 2.6]),
        _rr_row("mobilenet_v3_small", "int8", [2.0, 2.0, 2.0]),
        _rr_row("mobilenet_v3_small", "fp32", [2.4, 2.4, 2.4]),
        _rr_row("mobilenet_v2", "int8", [4.0, 4.4, 4.0]),
    ]
    sp = repeat_ratio_spreads(rows[0], rows)
    assert sp["lat_small_same"] == pytest.approx([1.2, 1.1, 1.3])  # 2.4/2, 2.2/2, 2.6/2
    assert sp["lat_small_best"] == pytest.approx([1.2, 1.1, 1.3])  # int8 is V3-S's fastest
    assert sp["lat_v2_same"] == pytest.approx([0.6, 0.5, 0.65])  # 2.4/4, 2.2/4.4, 2.6/4
    seq = [dict(r, peak_rss_mb=30.0) for r in rows]
    md = render_markdown(seq, {"interleaved": rows, "env": {}, "sgemm_peak": None})
    assert "| 1.20x (1.10-1.30) | 1.20x (1.10-1.30) (onnxruntime int8) | 0.60x (0.50-0.65) |" in md
    assert ("latency (round-robin, median (min-max) over 3 repeats) 1.20x (1.10-1.30) of "
            "MobileNetV3-Small's best (target <= 1.0x: not met)") in md
    old = [{k: v for k, v in r.items() if k != "repeat_p50_ms"} for r in rows]  # an older JSON
    md_old = render_markdown(seq, {"interleaved": old, "env": {}, "sgemm_peak": None})
    assert "| 1.20x | 1.20x (onnxruntime int8) | 0.60x |" in md_old


def test_repeat_order_rotates_and_alternates() -> None:
    assert repeat_order(3, 0) == [0, 1, 2]
    assert repeat_order(3, 1) == [2, 1, 0]  # backward
    assert repeat_order(3, 2) == [1, 2, 0]  # forward, rotated by 1
    assert repeat_order(3, 3) == [1, 0, 2]  # backward from [2, 0, 1]
    assert [repeat_order(5, r)[0] for r in range(5)] == [0, 4, 1, 3, 2]  # each case leads once
    assert all(sorted(repeat_order(5, r)) == list(range(5)) for r in range(7))
    with pytest.raises(ConfigError, match="repeat_order"):
        repeat_order(0, 0)


def test_interleaved_times_every_case_each_round(tmp_path: Path) -> None:
    from benchmarks.compare import interleaved

    cases = [
        Case("tiny_convnet", "torch", "fp32", 32),
        Case("tiny_convnet_moe", "torch", "fp32", 32),
    ]
    stats = interleaved(cases, ArtifactStore(tmp_path), rounds=3, warmup=1)
    assert list(stats) == [c.id for c in cases]
    assert all(s["rounds"] == 3 and s["p50_ms"] > 0 for s in stats.values())
    with pytest.raises(ConfigError, match="single-thread"):
        interleaved([Case("tiny_convnet", "torch", "fp32", 32, threads=2)], ArtifactStore(tmp_path))


# ------------------------------------------------------------------------- FedCoE rows


def test_camera_fedcoe_heads_cost_what_v3_small_classifier_costs() -> None:
    """The benchmark's head width keeps top-2 arithmetic at V3-Small's."""
    from benchmarks.fedcoe import CAMERA_HIDDEN, build_fedcoe, fedcoe_costs

    costs = fedcoe_costs(build_fedcoe("camera", 224))
    h, d, c = CAMERA_HIDDEN, 576, 1000
    heads = costs["active_macs"] - costs["trunk_macs"]
    assert heads == 5 * (d * h + h * c) + d * 8 + d * 3  # shared + 2 routed + 2 local, 2 gates
    classifier = 576 * 1024 + 1024 * 1000  # MobileNetV3-Small's head
    assert 0.9 < heads / classifier <= 1.0
    assert costs["trunk_params"] == 927_008  # V3-Small features (2,542,856 minus its head)
    assert costs["dense_macs"] - costs["active_macs"] == 6 * (d * h + h * c)
    assert costs["bundle_params"] > costs["active_params"]


def test_image_like_calibration_inputs() -> None:
    from benchmarks.fedcoe import image_like

    x = image_like(4, 64, seed=1)
    assert x.shape == (4, 3, 64, 64) and x.dtype == np.float32
    assert np.array_equal(x, image_like(4, 64, seed=1))
    # normalised colour fields: neighbouring pixels are close, unlike i.i.d. noise
    assert np.abs(np.diff(x, axis=-1)).mean() < 0.5 * x.std()
    with pytest.raises(ConfigError, match="count and input_size"):
        image_like(0, 32)


def test_bench_cli_needs_quick(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from fedcoe_edge.cli import main

    assert main(["bench", "--json", str(tmp_path / "q.json")]) == 2
    assert "only --quick" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
