"""The activations-cost benchmark's arithmetic and its refusal of a bundle without fp32 copies
(the timing itself runs in the benchmark, not here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.activations_cost import main, markdown, summarize


def test_ratios_are_taken_within_each_block() -> None:
    medians = {"fp32": [1.0, 2.0, 1.0], "int8 u8": [0.9, 1.6, 1.0], "int8 s8": [9.0, 30.0, 12.0]}
    s = summarize(medians)
    assert s["p50_ms"] == {"fp32": 1.0, "int8 u8": 1.0, "int8 s8": 12.0}
    u8 = s["ratios"]["int8 u8 / fp32"]
    assert (u8["median"], u8["min"], u8["max"]) == pytest.approx((0.9, 0.8, 1.0))
    s8u8 = s["ratios"]["int8 s8 / int8 u8"]  # 10, 18.75, 12 per block
    assert (s8u8["median"], s8u8["min"], s8u8["max"]) == pytest.approx((12.0, 10.0, 18.75))
    doc = {"bundle": "b", "size": 64, "blocks": 3, "calls": 10, "result": s,
           "env": {"cpu": "cpu", "onnxruntime": "1"}, "command": "python -m x"}
    text = markdown(doc)
    assert "| int8 s8 / int8 u8 | 12.00x | 10.00-18.75 |" in text and "`python -m x`" in text


def test_a_bundle_without_fp32_copies_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"model": {"input_shape": [1, 8, 8]}}))
    with pytest.raises(SystemExit) as exc:
        main(["--bundle", str(tmp_path), "--calibration-samples", "2", "--out",
              str(tmp_path / "out")])
    assert "fp32/trunk.onnx missing" in str(exc.value)
    assert not (tmp_path / "out").exists()
