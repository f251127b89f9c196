"""ONNX graph rewrites that keep int8 MobileNetV3-style graphs integer in onnxruntime.

One implementation for the bundle exporter (:mod:`export.quantize`, the FedCoE trunk) and the
benchmarks (:mod:`benchmarks.onnx_utils`, the MobileNet baselines), so both run the same int8
graph. Measured on an x86 (AVX-512 VNNI) VM with onnxruntime 1.32:

* MobileNetV3's HardSwish (inlined by the quantizer's pre-processing into ``HardSigmoid``
  and ``Mul``) and the SE block's HardSigmoid have no quantized kernel in onnxruntime; the
  quantizer leaves ``DequantizeLinear -> HardSigmoid (fp32) -> QuantizeLinear`` islands
  around each, so int8 ends up slower than fp32. :func:`fold_quantized_hardsigmoid`
  rewrites each island as one integer ``QLinearAdd``.
* The exporter writes ``AdaptiveAvgPool2d(1)`` as ``ReduceMean`` over H, W, which has no
  int8 kernel; :func:`rewrite_global_pool` turns it into ``GlobalAveragePool``
  (``QLinearGlobalAveragePool`` once quantized).
* An int8 convolution on 3 input channels is all im2col; :func:`stem_nodes` names the RGB
  stem (and its activation) so the quantizer leaves it fp32.

Quantization scheme: Jacob et al., "Quantization and Training of Neural Networks for
Efficient Integer-Arithmetic-Only Inference", CVPR 2018 (arXiv 1712.05877); MobileNetV3:
Howard et al., "Searching for MobileNetV3", ICCV 2019 (arXiv 1905.02244).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["fold_quantized_hardsigmoid", "name_nodes", "rewrite_global_pool", "stem_nodes"]


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
