"""onnxruntime's quantizer logs INFO through the root logger; export.quantize mutes it while
it quantizes, whoever configured logging, and leaves everyone else's lines alone."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
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


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def collect() -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches the root logger's handlers, at INFO, through a fresh
    handler of our own: pytest's caplog handler is shared by the whole session and may
    carry filters another test's ``fedcoe`` CLI call added to the root handlers."""
    root, handler = logging.getLogger(), ListHandler()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def ort_info(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno < logging.WARNING and "onnxruntime" in r.pathname]


CALIB = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)


def test_the_quantizer_floods_without_the_filter(tmp_path: Path) -> None:
    """What the filter is for: the same graph through onnxruntime directly logs INFO."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from export.quantize import ArrayCalibrationReader

    src = tiny_gemm(tmp_path / "a.onnx")
    with collect() as records:
        quantize_static(str(src), str(tmp_path / "q.onnx"), ArrayCalibrationReader("feats", CALIB),
                        quant_format=QuantFormat.QDQ, per_channel=True)
    assert len(ort_info(records)) >= 4


def test_quantize_part_is_quiet_at_info(tmp_path: Path) -> None:
    src = tiny_gemm(tmp_path / "a.onnx")
    with collect() as records:
        result = quantize_part(src, tmp_path / "q.onnx", "feats", CALIB,
                               QuantizeOptions(mode=QuantMode.STATIC))
    assert result.mode is QuantMode.STATIC
    assert ort_info(records) == []
    assert not any(isinstance(f, logging.Filter) and type(f).__name__ == "_DropQuantizerInfo"
                   for f in logging.getLogger().filters)  # removed afterwards


def test_other_lines_and_warnings_still_show() -> None:
    with collect() as records, quiet_quantizer():
        logging.getLogger("fedcoe_edge.simulation").info("round 1 done")
        logging.warning("a warning on the root logger")
        logging.info("an info line of this test, on the root logger")
    messages = [r.getMessage() for r in records]
    assert messages == ["round 1 done", "a warning on the root logger",
                        "an info line of this test, on the root logger"]
