"""torch -> ONNX export, static int8 QDQ quantization and onnxruntime sessions for benchmarks.

Traps measured on an x86 (AVX-512 VNNI) VM with onnxruntime 1.32, and what this module
does about them:

* ``quantize_dynamic`` turns convolutions into ``ConvInteger`` with per-call activation
  scaling, which is many times slower than fp32 on conv nets; we only use
  ``quantize_static`` (QDQ format, per-channel int8 weights, uint8 activations), which
  onnxruntime fuses into ``QLinearConv`` NHWC kernels.
* MobileNetV3's HardSwish (inlined by the quantizer's pre-processing into ``HardSigmoid``
  and ``Mul``) and the SE block's HardSigmoid have no quantized kernel in onnxruntime
  (fp32 fuses HardSwish into the convolution instead). The quantizer leaves ``DequantizeLinear -> HardSigmoid (fp32) ->
  QuantizeLinear`` islands around every one of them, so int8 ends up *slower* than fp32.
  :func:`fold_quantized_hardsigmoid` rewrites each island as one integer ``QLinearAdd``:
  ``hsig(x) = clip(alpha * x + beta, 0, 1)`` is ``x`` read with scale ``alpha * s`` plus
  ``beta``, and the clip is the saturation of the uint8 output (zero point 0, range
  within ``[0, 1]``). HardSwish ``x * hsig(x)`` then runs as ``QLinearAdd + QLinearMul``.
* The exporter writes ``AdaptiveAvgPool2d(1)`` as ``ReduceMean`` over H, W, which is not
  quantized either (another fp32 island per SE block); :func:`rewrite_global_pool` turns it
  into ``GlobalAveragePool``, which onnxruntime runs as ``QLinearGlobalAveragePool``.

The rewrites live in :mod:`export.graph_rewrites` and the quantization recipe in
:mod:`export.quantize` (``quantize_int8``, ``QuantizeOptions``, ``GraphFixes``,
``ArrayCalibrationReader``; all re-exported here), shared with the bundle exporter so the
FedCoE trunk gets exactly the same int8 graph as the baselines; ``OPSET`` is the exporter's.

A fourth trap is threads: on a shared 2-core VM, two intra-op threads that spin while
waiting can be slower than one; :func:`benchmarks.ort_session.make_session` (re-exported
here) exposes ``session.intra_op.allow_spinning``.

Quantization scheme: Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks.ort_session import make_session, session_runner
from export.graph_rewrites import (
    fold_quantized_hardsigmoid,
    name_nodes,
    rewrite_global_pool,
    stem_nodes,
)
from export.onnx_export import OPSET
from export.quantize import ArrayCalibrationReader, GraphFixes, QuantizeOptions, quantize_int8
from fedcoe_edge.errors import ConfigError

__all__ = [
    "OPSET",
    "ArrayCalibrationReader",
    "GraphFixes",
    "QuantizeOptions",
    "export_onnx",
    "fold_quantized_hardsigmoid",
    "make_session",
    "model_op_counts",
    "name_nodes",
    "quantize_int8",
    "random_calibration",
    "rewrite_global_pool",
    "session_runner",
    "stem_nodes",
]


def export_onnx(
    model: Any,
    example: Any,
    path: str | os.PathLike[str],
    *,
    opset: int = OPSET,
    input_name: str = "x",
    output_name: str = "y",
    dynamic_batch: bool = False,
    global_pool: bool = True,
) -> Path:
    """Export ``model`` (eval mode) to one self-contained ONNX file with torch's dynamo exporter.

    The dynamo exporter (default since torch 2.9) needs ``onnxscript``; it folds BatchNorm
    into Conv and keeps HardSwish as one op. Weights are embedded (no ``.data`` side file) so
    the file can be hashed, shipped and quantized as one unit. ``global_pool`` applies
    :func:`rewrite_global_pool` (off only to reproduce the unfixed graph).
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"export_onnx: model must be a torch.nn.Module, got {type(model)!r}")
    if not isinstance(example, torch.Tensor):
        raise ConfigError(f"export_onnx: example must be a torch.Tensor, got {type(example)!r}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    finally:
        model.train(was_training)
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("export_onnx: torch.onnx.export returned no program")
    proto = program.model_proto
    if global_pool:
        rewrite_global_pool(proto)
    onnx.save(proto, out)
    return out


def model_op_counts(model: onnx.ModelProto | str | os.PathLike[str]) -> dict[str, int]:
    """Operator histogram of a model's main graph, for tests and the report."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def random_calibration(
    input_name: str, shape: Sequence[int], count: int = 8, seed: int = 0
) -> ArrayCalibrationReader:
    """``count`` batches of shape ``shape`` of standard-normal inputs (like normalised
    images); enough to time int8 kernels."""
    if count < 1:
        raise ConfigError(f"random_calibration: count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal(tuple(shape)).astype(np.float32) for _ in range(count)]
    return ArrayCalibrationReader(input_name, np.concatenate(batches), batch=int(shape[0]))
