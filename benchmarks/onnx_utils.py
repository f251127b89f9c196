"""torch -> ONNX export, static int8 QDQ quantization and onnxruntime sessions for benchmarks.

Traps measured on an x86 (AVX-512 VNNI) VM with onnxruntime 1.32, and what this module
does about them (issue 6):

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

A fourth trap is threads: on a shared 2-core VM, two intra-op threads that spin while
waiting can be slower than one; :func:`benchmarks.ort_session.make_session` (re-exported
here) exposes ``session.intra_op.allow_spinning``.

Quantization scheme: Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from benchmarks.ort_session import make_session, session_runner
from fedcoe_edge.errors import ConfigError

__all__ = [
    "OPSET",
    "ArrayCalibrationReader",
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

# Lowest opset the torch.export-based exporter implements natively (torch 2.13 converts
# anything lower and may fail); onnxruntime >= 1.14 runs it, which covers Pi/Jetson builds.
OPSET = 18


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


def rewrite_global_pool(model: onnx.ModelProto) -> int:
    """Replace ``ReduceMean(axes=H,W, keepdims=1)`` on 4-D tensors by ``GlobalAveragePool``.

    Returns the number of nodes rewritten. The two are the same function, but only
    ``GlobalAveragePool`` has an int8 kernel in onnxruntime.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    ranks = _value_ranks(model)
    done = 0
    for node in graph.node:
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("keepdims", 1) != 1:
            continue
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in inits:
                continue
            axes = numpy_helper.to_array(inits[node.input[1]]).reshape(-1).tolist()
        else:
            axes = list(attrs.get("axes", []))
        if ranks.get(node.input[0]) != 4 or sorted(int(a) % 4 for a in axes) != [2, 3]:
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        done += 1
    if done:
        used = {name for n in graph.node for name in n.input}
        keep = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return done


def _value_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor whose shape onnx shape inference knows."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks: dict[str, int] = {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    for vi in values:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def fold_quantized_hardsigmoid(model: onnx.ModelProto) -> int:
    """Rewrite ``DQ(x; s, z) -> HardSigmoid(alpha, beta) -> Q(s_h, 0)`` as an integer add.

    ``clip(alpha*x + beta, 0, 1)`` equals ``DQ(x; alpha*s, z) + beta`` quantized with a uint8
    output whose zero point is 0 (clips at 0) and whose top ``255*s_h <= 1`` (clips at the
    calibrated maximum, never above 1), so onnxruntime fuses it into one ``QLinearAdd`` and
    no fp32 tensor is materialised. Islands that do not satisfy these conditions are left
    as they are. Returns the number of rewrites.
    """
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}

    new_nodes: list[onnx.NodeProto] = []
    done = 0
    for node in graph.node:
        plan = _hardsigmoid_plan(node, producer, consumers, inits)
        if plan is None:
            new_nodes.append(node)
            continue
        dq, alpha, beta, scale = plan
        prefix = f"{node.name or 'hardsigmoid'}_qadd{done}"
        const_q = 1 if beta > 0 else 0
        const_scale = beta if beta > 0 else 1.0
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(scale * alpha, np.float32), prefix + "_xscale"),
                numpy_helper.from_array(np.array(const_q, np.uint8), prefix + "_c"),
                numpy_helper.from_array(np.array(const_scale, np.float32), prefix + "_cscale"),
                numpy_helper.from_array(np.array(0, np.uint8), prefix + "_czp"),
            ]
        )
        dq_inputs = [dq.input[0], prefix + "_xscale", *dq.input[2:3]]
        new_nodes += [
            helper.make_node("DequantizeLinear", dq_inputs, [prefix + "_x"], name=prefix + "_dqx"),
            helper.make_node(
                "DequantizeLinear",
                [prefix + "_c", prefix + "_cscale", prefix + "_czp"],
                [prefix + "_cval"],
                name=prefix + "_dqc",
            ),
            helper.make_node(
                "Add", [prefix + "_x", prefix + "_cval"], [node.output[0]], name=prefix + "_add"
            ),
        ]
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    # A DQ that only fed the HardSigmoid is now dead.
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    live = [n for n in graph.node if n.op_type != "DequantizeLinear" or n.output[0] in used]
    del graph.node[:]
    graph.node.extend(live)
    return done


def _hardsigmoid_plan(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    consumers: dict[str, list[onnx.NodeProto]],
    inits: dict[str, np.ndarray],
) -> tuple[onnx.NodeProto, float, float, float] | None:
    """The DQ node, alpha, beta and input scale when ``node`` is a foldable island."""
    if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    alpha = float(attrs.get("alpha", 0.2))
    beta = float(attrs.get("beta", 0.5))
    dq = producer.get(node.input[0])
    outs = consumers.get(node.output[0], [])
    if dq is None or dq.op_type != "DequantizeLinear" or len(outs) != 1:
        return None
    q = outs[0]
    if q.op_type != "QuantizeLinear" or len(q.input) < 3 or alpha <= 0 or not 0 <= beta <= 1:
        return None
    scale = inits.get(dq.input[1])
    zp_in = inits.get(dq.input[2]) if len(dq.input) > 2 else None
    out_scale = inits.get(q.input[1])
    out_zp = inits.get(q.input[2])
    if scale is None or scale.size != 1 or out_scale is None or out_zp is None:
        return None
    if zp_in is not None and zp_in.dtype != np.uint8:
        return None
    if out_zp.dtype != np.uint8 or out_zp.size != 1 or int(out_zp.reshape(())) != 0:
        return None
    if float(out_scale.reshape(())) * 255.0 > 1.0 + 1e-6:
        return None
    return dq, alpha, beta, float(scale.reshape(()))


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (inlined functions come unnamed, and the
    quantizer's ``nodes_to_exclude`` matches by name: ``""`` would exclude them all)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type.lower()}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def stem_nodes(model: onnx.ModelProto, max_in_channels: int = 4) -> list[str]:
    """Names of the first convolution on a graph input with few channels (an RGB stem) and
    of its activation (ReLU, Clip, or HardSwish as HardSigmoid + Mul).

    With 3 input channels an int8 convolution is all im2col and no GEMM: measured on
    MobileNetV3-Small, quantize + NHWC transpose + the int8 stem + int8 HardSwish cost
    ~3x the fp32 convolution with its fused HardSwish. Keeping the stem fp32 moves the
    first quantization to the stem's 16-channel output.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inputs = {i.name for i in graph.input} - set(inits)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    names: list[str] = []
    for node in graph.node:
        if node.op_type != "Conv" or node.input[0] not in inputs or node.input[1] not in inits:
            continue
        weight = inits[node.input[1]]
        if len(weight.dims) != 4 or weight.dims[1] > max_in_channels:
            continue
        names.append(node.name)
        after = consumers.get(node.output[0], [])
        hsig = [c for c in after if c.op_type == "HardSigmoid"]
        mul = [
            c
            for c in after
            if c.op_type == "Mul" and hsig and set(c.input) == {node.output[0], hsig[0].output[0]}
        ]
        if hsig and mul:
            names += [hsig[0].name, mul[0].name]
        elif len(after) == 1 and after[0].op_type in ("Relu", "Clip", "HardSwish"):
            names.append(after[0].name)
    return names


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds calibration batches (dicts of input name -> array) to ``quantize_static``."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        self._batches = [dict(b) for b in batches]
        if not self._batches:
            raise ConfigError("ArrayCalibrationReader: no calibration batches given")
        self._iter: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def random_calibration(
    input_name: str, shape: Sequence[int], count: int = 8, seed: int = 0
) -> ArrayCalibrationReader:
    """Standard-normal inputs (like normalised images); enough to time int8 kernels."""
    if count < 1:
        raise ConfigError(f"random_calibration: count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    return ArrayCalibrationReader(
        {input_name: rng.standard_normal(tuple(shape)).astype(np.float32)} for _ in range(count)
    )


@dataclass(frozen=True)
class QuantizeOptions:
    """Knobs of :func:`quantize_int8`; the defaults are the fast, fixed configuration."""

    per_channel: bool = True
    fold_hardsigmoid: bool = True
    global_pool: bool = True
    fp32_stem: bool = True
    calibrate_method: CalibrationMethod = CalibrationMethod.MinMax
    exclude_op_types: tuple[str, ...] = ()

    @classmethod
    def naive(cls) -> QuantizeOptions:
        """What a first attempt gets: no graph fixes (kept to measure the fixes against)."""
        return cls(fold_hardsigmoid=False, global_pool=False, fp32_stem=False)


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    calibration: CalibrationDataReader,
    options: QuantizeOptions | None = None,
) -> Path:
    """Static int8 QDQ quantization: uint8 activations, per-channel int8 weights.

    Steps: onnxruntime's pre-processing (shape inference, Conv+BN folding), the global-pool
    rewrite, ``quantize_static`` with the given calibration data (the RGB stem left fp32,
    see :func:`stem_nodes`), then the HardSigmoid fold.
    """
    opts = options or QuantizeOptions()
    src_path = Path(src)
    if not src_path.is_file():
        raise ConfigError(f"quantize_int8: source model {src_path} does not exist")
    dst_path = Path(dst)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedcoe-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src_path), str(pre), skip_symbolic_shape=True)
        proto = onnx.load(str(pre))
        name_nodes(proto)
        if opts.global_pool:
            rewrite_global_pool(proto)
        exclude = [n.name for n in proto.graph.node if n.op_type in opts.exclude_op_types]
        if opts.fp32_stem:
            exclude += stem_nodes(proto)
        onnx.save(proto, str(pre))
        quantize_static(
            str(pre),
            str(dst_path),
            calibration,
            quant_format=QuantFormat.QDQ,
            per_channel=opts.per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=opts.calibrate_method,
            nodes_to_exclude=exclude,
        )
    if opts.fold_hardsigmoid:
        proto = onnx.load(str(dst_path))
        if fold_quantized_hardsigmoid(proto):
            onnx.checker.check_model(proto)
            onnx.save(proto, str(dst_path))
    return dst_path
