"""onnxruntime's quantizer logs INFO through the root logger; export.quantize mutes it while
it quantizes, whoever configured logging, and leaves everyone else's lines alone."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantize import QuantizeOptions, QuantMode, quantize_part, quiet_quantizer


def tiny_gemm(path: Path) -> Path:
    """feats (B, 8) -> logits (B, 4) whose weights are so small that the quantizer widens
    every bias scale, logging one INFO line per output channel."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((1e-12 * rng.standard_normal((8, 4))).astype(np.float32), "w")
    b = numpy_helper.from_array(np.ones(4, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["feats", "w", "b"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def ort_info(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno < logging.WARNING and "onnxruntime" in r.pathname]


CALIB = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)


def test_the_quantizer_floods_without_the_filter(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """What the filter is for: the same graph through onnxruntime directly logs INFO."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from export.quantize import ArrayCalibrationReader

    src = tiny_gemm(tmp_path / "a.onnx")
    with caplog.at_level(logging.INFO):
        quantize_static(str(src), str(tmp_path / "q.onnx"), ArrayCalibrationReader("feats", CALIB),
                        quant_format=QuantFormat.QDQ, per_channel=True)
    assert len(ort_info(caplog.records)) >= 4


def test_quantize_part_is_quiet_at_info(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = tiny_gemm(tmp_path / "a.onnx")
    with caplog.at_level(logging.INFO):
        result = quantize_part(src, tmp_path / "q.onnx", "feats", CALIB,
                               QuantizeOptions(mode=QuantMode.STATIC))
    assert result.mode is QuantMode.STATIC
    assert ort_info(caplog.records) == []
    assert logging.getLogger().filters == []  # the filter is removed afterwards


def test_other_lines_and_warnings_still_show(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO), quiet_quantizer():
        logging.getLogger("fedcoe_edge.simulation").info("round 1 done")
        logging.warning("a warning on the root logger")
        logging.info("an info line of this test, on the root logger")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["round 1 done", "a warning on the root logger",
                        "an info line of this test, on the root logger"]
