"""The camera-accuracy report: the goal verdict, the Markdown, and its section in latency.md
(written by the benchmark, kept by ``benchmarks.report`` when it rewrites the file)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.camera_accuracy import (
    SECTION_END,
    SECTION_START,
    embed_section,
    evaluate,
    goal,
    main,
    markdown,
    write_reports,
)


def make_doc(int8_global: float) -> dict[str, Any]:
    """A report document shaped as ``run`` writes it, from predictions made up here."""
    y = np.arange(1000) % 10
    fp32 = np.where(np.arange(1000) < 850, y, (y + 1) % 10)  # 85.0% right
    int8 = fp32.copy()
    flip = int(round((0.85 - int8_global) * 1000))
    int8[:flip] = (y[:flip] + 1) % 10  # int8 wrong where fp32 was right
    preds = {"torch_fp32": {"global": fp32, "personal": fp32},
             "onnx_fp32": {"global": fp32, "personal": fp32},
             "onnx_int8": {"global": int8, "personal": int8}}
    res = evaluate(preds, y)
    return {
        "config": {"size": 64, "clients": 10, "alpha": 0.5, "rounds": 10, "local_epochs": 1,
                   "client": "0", "calibration_samples": 128, "num_global_experts": 8,
                   "num_local_experts": 2, "top_k": 2, "expert_hidden": 192},
        "data": {"public": 6000, "pool": 6000, "test": 1000, "public_pool_overlap": 0},
        "pretrain": {"samples": 5400, "val_samples": 600, "val_acc": 0.87, "epochs": 3,
                     "sha256": "ab" * 32},
        "simulation": {"personalized_acc": 0.9},
        "result": res,
        "goal": goal(res),
        "client_own_test": {"samples": 140, "torch_fp32": 0.93, "onnx_fp32": 0.93,
                            "onnx_int8": 0.92},
        "bundle": {"deployed_bytes": 2_540_000, "fp32_bytes": 8_790_000},
        "timing": {"total_s": 1000.0, "pretrain_s": 300.0, "federation_s": 600.0,
                   "export_s": 40.0, "evaluate_s": 60.0},
        "env": {"cpu": "test cpu"},
        "command": "python -m benchmarks.camera_accuracy",
    }


def test_agreement_and_goal_verdict() -> None:
    doc = make_doc(0.845)  # 0.5 points below fp32
    r = doc["result"]
    assert r["top1"]["torch_fp32"]["global"] == pytest.approx(0.85)
    assert r["top1"]["onnx_int8"]["global"] == pytest.approx(0.845)
    assert r["agreement"]["onnx_int8_vs_onnx_fp32"]["global"] == pytest.approx(0.995)
    assert r["agreement"]["onnx_fp32_vs_torch_fp32"]["global"] == 1.0
    assert doc["goal"]["met"] and doc["goal"]["int8_minus_fp32_points"] == pytest.approx(-0.5)
    missed = make_doc(0.83)  # 2 points below
    assert not missed["goal"]["met"]
    assert "**NOT met**" in markdown(missed) and "-2.00 points" in markdown(missed)


def test_markdown_table_rows() -> None:
    text = markdown(make_doc(0.85))
    assert "| ONNX int8 (`MoESession`, deployed files) | 85.00% | 85.00% |" in text
    assert "| int8 vs ONNX fp32 | 100.00% | 100.00% |" in text
    assert "**met** (int8 - torch fp32 = 0.00 points" in text  # no "-0.00"
    assert "a stratified 1,000-image subset of the official test split" in text


def test_section_is_replaced_not_duplicated() -> None:
    base = "# Latency\n\nrows\n"
    once = embed_section(base, "## Camera\n\nfirst\n")
    assert once.startswith(base.rstrip("\n")) and once.count(SECTION_START) == 1
    twice = embed_section(once, "## Camera\n\nsecond\n")
    assert twice.count(SECTION_START) == twice.count(SECTION_END) == 1
    assert "second" in twice and "first" not in twice and "rows" in twice


def test_reports_and_latency_report_keep_the_section(tmp_path: Path) -> None:
    from benchmarks import report

    latency_json = Path(report.RESULTS) / "latency.json"
    if not latency_json.is_file():
        pytest.skip("no committed latency.json to render")
    out = tmp_path / "results"
    out.mkdir()
    (out / "latency.json").write_text(latency_json.read_text())
    (out / "latency.md").write_text("# Latency and memory benchmark\n")
    write_reports(make_doc(0.845), out)
    assert json.loads((out / "camera_accuracy.json").read_text())["goal"]["met"]
    assert SECTION_START in (out / "latency.md").read_text()
    # the latency report rewrites latency.md from its JSON: the section comes back
    assert report.main(["--json", str(out / "latency.json")]) == 0
    text = (out / "latency.md").read_text()
    assert text.count(SECTION_START) == 1 and "## Trained camera bundle" in text
    assert "## Round-robin timing" in text  # the latency report itself is all there
    doc = copy.deepcopy(make_doc(0.83))
    (out / "camera_accuracy.json").write_text(json.dumps(doc))
    assert main(["--markdown-only", "--out", str(out)]) == 0
    assert "**NOT met**" in (out / "latency.md").read_text()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--size", "--public-fraction", "--data-fraction", "--test-samples", "--rounds"):
        assert flag in out


def test_trunk_cost_report_cites_the_camera_run() -> None:
    """The trunk-cost report's closing text names the camera run's figures once it landed
    (a rerun or ``--markdown-only`` writes them), and says where it is while it has not."""
    from benchmarks.trunk_cost import closing_text

    landed = closing_text(make_doc(0.845))
    assert "85.00% global-path" in landed and "87.00% for trunk + linear head" in landed
    assert "pending" not in landed and "`camera_accuracy.md`" in landed
    assert "python -m benchmarks.camera_accuracy" in closing_text(None)
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    committed = (results / "trunk_cost.md").read_text().rstrip("\n").splitlines()[-1]
    assert committed == closing_text(json.loads((results / "camera_accuracy.json").read_text()))


def _cross_doc(int8_agree: float) -> dict[str, Any]:
    """A ``cross_arch.json`` shaped as ``benchmarks.cross_arch.run`` writes it."""
    from benchmarks.cross_arch import goal as cross_goal

    pair = {"deployed": {"global": int8_agree, "personal": 1.0, "experts": 0.98,
                         "max_feature_diff": 0.1},
            "fp32": {"global": 1.0, "personal": 1.0, "experts": 1.0, "max_feature_diff": 1e-6}}
    res = {"native": "x86_64 host",
           "across_hosts": {"x86_64 host_vs_cortex-a72": pair,
                            "cortex-a72_vs_cortex-a76": pair},
           "int8_vs_fp32": {"x86_64 host": {"global": 0.989, "personal": 0.99, "experts": 0.96,
                                            "max_feature_diff": 0.5}}}
    return {"bundle": "runs/x/bundle_client0", "samples": 1000,
            "manifest": {"quantization": {"activations": "s8"}}, "result": res,
            "goal": cross_goal(res), "command": "python -m benchmarks.cross_arch --bundle B"}


def test_camera_report_carries_the_cross_arch_agreement(tmp_path: Path) -> None:
    """With a ``cross_arch.json`` beside it, the camera report states the x86 vs aarch64
    agreement of int8 and fp32 and the command; without one it says nothing of it."""
    (tmp_path / "camera_accuracy.json").write_text(json.dumps(make_doc(0.845)))
    assert main(["--markdown-only", "--out", str(tmp_path)]) == 0
    assert "aarch64" not in (tmp_path / "camera_accuracy.md").read_text()
    (tmp_path / "cross_arch.json").write_text(json.dumps(_cross_doc(0.993)))
    assert main(["--markdown-only", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "camera_accuracy.md").read_text()
    assert "| x86_64 host vs cortex-a72 | int8 | 99.30% |" in text
    assert "| x86_64 host vs cortex-a72 | fp32 | 100.00% |" in text
    assert "cortex-a72 vs cortex-a76" not in text  # only pairs with the native host
    assert "s8 activations" in text and "lowest over hosts: 98.90%" in text
    assert "`python -m benchmarks.cross_arch --bundle B`" in text
    from benchmarks.camera_accuracy import section_from  # what the latency report embeds

    assert "| x86_64 host vs cortex-a72 | int8 | 99.30% |" in (section_from(tmp_path) or "")


def test_committed_camera_report_matches_its_json() -> None:
    """``camera_accuracy.md`` is what its JSON and the committed cross-arch run render to."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    cross = json.loads((results / "cross_arch.json").read_text())
    doc = json.loads((results / "camera_accuracy.json").read_text())
    assert (results / "camera_accuracy.md").read_text() == markdown(doc, cross=cross)
