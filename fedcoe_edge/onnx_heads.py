"""ONNX graphs of the small bundle parts (experts, gates) written from numpy weights, no torch.

A device with the runtime install profile (numpy, onnxruntime, safetensors; no torch, no
``onnx`` package) receives global experts and the gate as safetensors arrays over MQTT and
must swap them into its bundle (docs/design.md, "Install profiles"). These parts are tiny
and fixed in shape (:mod:`fedcoe_edge.model`: ``MLPExpert``, ``CNNExpert``, ``Gate``), so
their graphs are written here directly as ONNX protobuf bytes: Flatten, Gemm, Relu, Conv,
MaxPool, fp32, opset 18, the same input/output names and state-dict initializer names as
the torch exporter's files. The trunk is never rebuilt here: it stays the bundle's own
(a frozen, shipped-once trunk; a federated trunk needs a re-export on a train install).

Only the protobuf wire format is needed (varints and length-delimited fields), which keeps
the runtime profile free of the ``onnx`` package (and its 20+ MB).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import DataError

OPSET = 18
IR_VERSION = 8  # the IR that goes with opset 18
_FLOAT = 1  # TensorProto.FLOAT
_ATTR_FLOAT, _ATTR_INT, _ATTR_INTS = 1, 2, 7  # AttributeProto.AttributeType


# --- protobuf wire format ---------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 as two's complement, ten bytes
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _str(field: int, value: str) -> bytes:
    return _bytes(field, value.encode())


def _attr(name: str, value: int | float | Sequence[int]) -> bytes:
    if isinstance(value, float):
        body = _str(1, name) + _varint(2 << 3 | 5) + struct.pack("<f", value) + _int(20, _ATTR_FLOAT)
    elif isinstance(value, int):
        body = _str(1, name) + _int(3, value) + _int(20, _ATTR_INT)
    else:
        body = _str(1, name) + b"".join(_int(8, int(v)) for v in value) + _int(20, _ATTR_INTS)
    return body


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
          **attrs: int | float | Sequence[int]) -> bytes:
    body = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    body += _str(3, name) + _str(4, op)
    body += b"".join(_bytes(5, _attr(k, v)) for k, v in attrs.items())
    return body


def _tensor(name: str, arr: np.ndarray) -> bytes:
    a = np.ascontiguousarray(arr, dtype="<f4")
    return (b"".join(_int(1, d) for d in a.shape) + _int(2, _FLOAT) + _str(8, name)
            + _bytes(9, a.tobytes()))


def _value_info(name: str, dims: Sequence[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _str(2, d) if isinstance(d, str) else _int(1, d)) for d in dims)
    tensor_type = _int(1, _FLOAT) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))


def _model(nodes: Sequence[bytes], inits: Mapping[str, np.ndarray], inp: tuple[str, list],
           out: tuple[str, list], graph_name: str) -> bytes:
    graph = b"".join(_bytes(1, n) for n in nodes) + _str(2, graph_name)
    graph += b"".join(_bytes(5, _tensor(k, v)) for k, v in inits.items())
    graph += _bytes(11, _value_info(*inp)) + _bytes(12, _value_info(*out))
    opset = _str(1, "") + _int(2, OPSET)
    return (_int(1, IR_VERSION) + _str(2, "fedcoe-edge onnx_heads") + _bytes(7, graph)
            + _bytes(8, opset))


# --- the parts ----------------------------------------------------------------------------


class _Graph:
    """Builds a chain of nodes; tensor names follow the state dict (``prefix + fc1.weight``)."""

    def __init__(self, params: Mapping[str, np.ndarray], prefix: str) -> None:
        self.params, self.prefix = params, prefix
        self.nodes: list[bytes] = []
        self.inits: dict[str, np.ndarray] = {}
        self.cur = "feats"

    def weight(self, name: str, shape: tuple[int, ...]) -> str:
        full = self.prefix + name
        if full not in self.params:
            raise DataError(f"received parameters lack {full!r}")
        arr = np.asarray(self.params[full], dtype=np.float32)
        if arr.shape != shape:
            raise DataError(f"received {full!r} has shape {list(arr.shape)}, the model's is "
                            f"{list(shape)}")
        self.inits[full] = arr
        return full

    def op(self, op: str, *extra: str, out: str | None = None, **attrs: int | float | Sequence[int]) -> None:
        name = out or f"t{len(self.nodes)}"
        self.nodes.append(_node(op, [self.cur, *extra], [name], f"n{len(self.nodes)}_{op}", **attrs))
        self.cur = name

    def linear(self, name: str, n_in: int, n_out: int, out: str | None = None) -> None:
        w = self.weight(f"{name}.weight", (n_out, n_in))
        b = self.weight(f"{name}.bias", (n_out,))
        self.op("Gemm", w, b, out=out, transB=1)

    def conv(self, name: str, c_in: int, c_out: int) -> None:
        w = self.weight(f"{name}.weight", (c_out, c_in, 3, 3))
        b = self.weight(f"{name}.bias", (c_out,))
        self.op("Conv", w, b, kernel_shape=[3, 3], pads=[1, 1, 1, 1])

    def build(self, feat_shape: Sequence[int], n_out: int, graph_name: str) -> bytes:
        return _model(self.nodes, self.inits, ("feats", ["batch", *feat_shape]),
                      ("logits", ["batch", n_out]), graph_name)


def expert_graph(cfg: ModelConfig, feat_shape: Sequence[int], params: Mapping[str, np.ndarray],
                 prefix: str, hidden: int) -> bytes:
    """An expert (``MLPExpert`` or ``CNNExpert``) under ``prefix`` as ONNX bytes."""
    g = _Graph(params, prefix)
    if cfg.expert_kind == "cnn":
        c, h, w = (int(d) for d in feat_shape)
        c1, c2 = max(4, hidden // 4), max(8, hidden // 2)
        stem_pool = min(h, w) >= 16
        g.conv("conv1", c, c1)
        g.op("Relu")
        if stem_pool:
            g.op("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
            h, w = h // 2, w // 2
        g.conv("conv2", c1, c2)
        g.op("Relu")
        g.op("MaxPool", kernel_shape=[2, 2], strides=[2, 2])
        g.op("Flatten", axis=1)
        g.linear("fc", c2 * (h // 2) * (w // 2), cfg.num_classes, out="logits")
    else:
        d = math.prod(int(v) for v in feat_shape)
        g.op("Flatten", axis=1)
        g.linear("fc1", d, hidden)
        g.op("Relu")
        g.linear("fc2", hidden, cfg.num_classes, out="logits")
    return g.build(feat_shape, cfg.num_classes, prefix.rstrip("."))


def gate_graph(cfg: ModelConfig, feat_shape: Sequence[int], params: Mapping[str, np.ndarray],
               prefix: str, n_out: int) -> bytes:
    """A ``Gate`` (linear, or one hidden layer when ``gate_hidden`` > 0) as ONNX bytes."""
    g = _Graph(params, prefix)
    d = math.prod(int(v) for v in feat_shape)
    g.op("Flatten", axis=1)
    if cfg.gate_hidden > 0:
        g.linear("net.0", d, cfg.gate_hidden)
        g.op("Relu")
        g.linear("net.2", cfg.gate_hidden, n_out, out="logits")
    else:
        g.linear("net", d, n_out, out="logits")
    return g.build(feat_shape, n_out, prefix.rstrip("."))


def global_part_graphs(cfg: ModelConfig, feat_shape: Sequence[int],
                       params: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """Bundle part name -> ONNX bytes for every gate or expert present in ``params``
    (a state dict of ``global.*`` arrays, as the coordinator sends them)."""
    out: dict[str, bytes] = {}
    if any(n.startswith("global.gate.") for n in params):
        out["global_gate"] = gate_graph(cfg, feat_shape, params, "global.gate.",
                                        cfg.num_global_experts)
    if cfg.shared_expert and any(n.startswith("global.shared.") for n in params):
        out["expert_shared"] = expert_graph(cfg, feat_shape, params, "global.shared.",
                                            cfg.expert_hidden)
    ids = sorted({int(n.split(".")[2]) for n in params if n.startswith("global.experts.")})
    for k in ids:
        out[f"expert_g{k}"] = expert_graph(cfg, feat_shape, params, f"global.experts.{k}.",
                                           cfg.expert_hidden)
    return out
