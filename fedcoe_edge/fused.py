"""One ONNX graph for the whole FedCoE forward pass, composed in memory from a bundle's parts.

``MoESession.run`` calls onnxruntime once per part (trunk, merged heads, each routed
expert) and routes and mixes in numpy between the calls; at batch 1 those calls and the
numpy between them cost about 0.2x of MobileNetV3-Small (docs/bundle.md, "Runtime cost").
:func:`compose_moe_graph` joins the *verified* part graphs (the bytes whose sha256 the
signed manifest lists, never re-exported or re-quantized) into one graph that also does
the routing and the mixture, so a whole forward pass is a single ``InferenceSession.run``:

    l      = gate(f) + gate_bias             gate_bias: log prior and -inf for masked experts
    g      = Softmax(l)
    r      = ScatterElements(0, TopK(l, k).indices, g[top] / sum g[top])   ties: lower index
    z      = S(f) + sum_{i held} r_i E_i(f)
    p_G    = Softmax(z);  p = h_0 p_G + sum_j h_j Softmax(z + L_j(f)),  h = Softmax(local_gate(f))

Two ways to run the held experts: ``"dense"`` runs every held expert and multiplies by its
weight (zero for the experts not routed); ``"if"`` wraps each held expert in an ONNX ``If``
whose condition is "some row routes to it", so only the routed experts' kernels run, as in
the sparse numpy path.

The runtime install profile has no ``onnx`` package, so the graphs are joined at the
protobuf wire level, as :mod:`fedcoe_edge.onnx_heads` writes them: every tensor, node and
initializer name of a part gets the part's prefix, the part's input is renamed to the
tensor that feeds it, and the nodes, initializers and value infos are concatenated. A part
this cannot join safely (subgraphs, local functions, external data, sparse initializers,
differing default opsets, an opset below 18) raises :class:`FuseError`; the caller then
keeps the per-part sessions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcoe_edge.onnx_heads import _bytes, _int, _node, _str, _tensor, _value_info, _varint

__all__ = ["FUSE_MODES", "Buf", "FuseError", "FusedPart", "compose_moe_graph"]

FUSE_MODES = ("dense", "if")
MIN_OPSET = 18  # the glue uses opset-18 forms (ReduceMax/ReduceSum axes as inputs)
_INT64 = 7  # TensorProto.INT64
_ATTR_GRAPH = 5  # AttributeProto.GRAPH


class FuseError(ValueError):
    """The parts cannot be joined into one graph (the per-part sessions still work)."""


# --- protobuf wire format: reading ------------------------------------------------------


Buf = bytes | memoryview  # a piece of a serialized message (memoryview: no copy)


def _wrap(num: int, pieces: Sequence[Buf]) -> list[Buf]:
    """Length-delimited field ``num`` around ``pieces``, without joining them."""
    return [_varint(num << 3 | 2) + _varint(sum(len(p) for p in pieces)), *pieces]


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise FuseError("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(data: Buf) -> list[tuple[int, int, int | memoryview, memoryview]]:
    """(field number, wire type, value, the field's raw bytes) for each field of a message;
    values and raw bytes are views into ``data`` (a weight tensor is never copied here)."""
    buf = memoryview(data)
    out: list[tuple[int, int, int | memoryview, memoryview]] = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise FuseError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise FuseError("truncated protobuf field")
        out.append((num, wire, value, buf[start:pos]))
    return out


def _text(v: int | memoryview) -> str:
    assert isinstance(v, memoryview)
    return bytes(v).decode()


# --- one part, renamed ------------------------------------------------------------------


@dataclass
class FusedPart:
    """A part's graph bytes and how it plugs in: its single input is fed by ``feed``;
    ``outputs`` maps each of its output names to the name it gets in the fused graph."""

    name: str
    model: Buf
    feed: str
    outputs: Mapping[str, str]
    prefix: str = ""


@dataclass
class _Parsed:
    nodes: list[bytes] = field(default_factory=list)
    inits: list[list[Buf]] = field(default_factory=list)
    value_infos: list[bytes] = field(default_factory=list)
    opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 0


def _rename_node(raw: memoryview, rename: Mapping[str, str], part: str) -> bytes:
    out = b""
    for num, _wire, value, field_raw in _fields(raw):
        if num in (1, 2, 3):  # input, output, name
            name = _text(value)
            out += _str(num, rename.get(name, name) if num != 3 else f"{part}/{name}")
        elif num == 5:  # attribute: a subgraph would need its names renamed too
            for anum, _w, _v, _r in _fields(value if isinstance(value, memoryview) else b""):
                if anum in (6, 11):
                    raise FuseError(f"part '{part}' has a node with a subgraph")
            out += field_raw
        else:
            out += field_raw
    return out


def _rename_named(raw: memoryview, name_field: int, rename: Mapping[str, str], part: str,
                  tensor: bool = False) -> list[Buf]:
    out: list[Buf] = []
    for num, _wire, value, field_raw in _fields(raw):
        if num == name_field:
            name = _text(value)
            out.append(_str(num, rename.get(name, name)))
        else:
            if tensor and num == 14 and value == 1:
                raise FuseError(f"part '{part}' keeps tensor data outside the file")
            out.append(field_raw)
    return out


def _parse_part(part: FusedPart, into: _Parsed) -> None:
    graph: Buf = b""
    for num, _wire, value, _raw in _fields(part.model):
        if num == 1:
            assert isinstance(value, int)
            into.ir_version = max(into.ir_version, value)
        elif num == 7:
            assert isinstance(value, memoryview)
            graph = value
        elif num == 8:
            assert isinstance(value, memoryview)
            domain, version = "", 1
            for onum, _w, ov, _r in _fields(value):
                if onum == 1:
                    domain = _text(ov)
                elif onum == 2:
                    assert isinstance(ov, int)
                    version = ov
            if domain in ("", "ai.onnx"):
                domain = ""
            known = into.opsets.get(domain)
            if domain == "" and known is not None and known != version:
                raise FuseError(f"part '{part.name}' has opset {version}, another part {known}")
            into.opsets[domain] = max(version, known or 0)
        elif num == 25:
            raise FuseError(f"part '{part.name}' has local functions")
    if into.opsets.get("", 0) < MIN_OPSET:
        raise FuseError(f"part '{part.name}' has opset {into.opsets.get('', 0)}, "
                        f"fusing needs >= {MIN_OPSET}")
    fields = _fields(graph)
    names: set[str] = set()
    inputs: list[str] = []
    init_names: set[str] = set()
    for num, _wire, value, _raw in fields:
        assert isinstance(value, memoryview)
        if num == 1:
            for nnum, _w, nv, _r in _fields(value):
                if nnum in (1, 2):
                    names.add(_text(nv))
        elif num == 5:
            for tnum, _w, tv, _r in _fields(value):
                if tnum == 8:
                    init_names.add(_text(tv))
        elif num == 11:
            for vnum, _w, vv, _r in _fields(value):
                if vnum == 1:
                    inputs.append(_text(vv))
        elif num == 15:
            raise FuseError(f"part '{part.name}' has sparse initializers")
    real_inputs = [n for n in inputs if n not in init_names]
    if len(real_inputs) != 1:
        raise FuseError(f"part '{part.name}' has inputs {real_inputs}, expected one")
    rename = {n: part.prefix + n for n in names | init_names if n}
    rename[real_inputs[0]] = part.feed
    for old, new in part.outputs.items():
        rename[old] = new
    for num, _wire, value, _raw in fields:
        assert isinstance(value, memoryview)
        if num == 1:
            into.nodes.append(_rename_node(value, rename, part.name))
        elif num == 5:
            into.inits.append(_rename_named(value, 8, rename, part.name, tensor=True))
        elif num == 13:
            name = next((_text(v) for n, _w, v, _r in _fields(value) if n == 1), "")
            if name not in (real_inputs[0], *part.outputs):
                into.value_infos.append(b"".join(_rename_named(value, 1, rename, part.name)))


# --- the glue ---------------------------------------------------------------------------


def _i64(name: str, values: Sequence[int], scalar: bool = False) -> bytes:
    a = np.asarray(values, dtype="<i8")
    dims = b"" if scalar else _int(1, len(a))
    return dims + _int(2, _INT64) + _str(8, name) + _bytes(9, a.tobytes())


def _float_info(name: str) -> bytes:
    """A value info of a float tensor of unknown shape (an If branch's output)."""
    return _str(1, name) + _bytes(2, _bytes(1, _int(1, 1)))


def _graph_attr(name: str, graph: bytes) -> bytes:
    return _str(1, name) + _bytes(6, graph) + _int(20, _ATTR_GRAPH)


class _Glue:
    def __init__(self) -> None:
        self.nodes: list[bytes | list[Buf]] = []  # an If node: pieces (its weights, unjoined)
        self.inits: list[bytes] = []
        self._consts: dict[str, str] = {}

    def op(self, op: str, inputs: Sequence[str], out: str,
           **attrs: int | float | Sequence[int]) -> str:
        self.nodes.append(_node(op, inputs, [out], f"moe/{out}", **attrs))
        return out

    def ints(self, values: Sequence[int], scalar: bool = False) -> str:
        """An int64 initializer: a 1-D tensor, or with ``scalar`` a rank-0 one (one value)."""
        key = f"i64{'s' if scalar else ''}:" + ",".join(str(v) for v in values)
        if key not in self._consts:
            name = f"moe/const_{len(self._consts)}"
            self.inits.append(_i64(name, values, scalar))
            self._consts[key] = name
        return self._consts[key]

    def floats(self, value: float, shape: Sequence[int] = (1, 1)) -> str:
        key = f"f32:{value}:{tuple(shape)}"
        if key not in self._consts:
            name = f"moe/const_{len(self._consts)}"
            self.inits.append(_tensor(name, np.full(tuple(shape), value, np.float32)))
            self._consts[key] = name
        return self._consts[key]


def compose_moe_graph(*, trunk: FusedPart | None, heads: Sequence[FusedPart],
                      experts: Mapping[int, FusedPart], num_global: int, top_k: int,
                      num_local: int, num_classes: int, shared_expert: bool,
                      local_residual: bool, input_shape: Sequence[int],
                      mode: str = "dense") -> list[Buf]:
    """The fused model, as the pieces of its serialized bytes in order (``b"".join`` them,
    or write them one by one: the weights are views into the parts' bytes, not copies,
    so composing adds no second copy of the bundle to the process's peak memory).

    Inputs ``x`` (batch, *input_shape) and ``gate_bias`` (1 or batch, K); outputs ``probs``, ``global_probs`` (batch, C), ``gate_probs``,
    ``routing`` (batch, K) and, with local experts, ``local_gate_probs`` (batch, 1+M).

    ``heads`` must produce the tensors ``global_gate``, ``expert_shared`` (when
    ``shared_expert``), ``local_gate`` and ``expert_l{j}`` (logits); ``experts`` maps each
    held expert id to its part, whose output is renamed by the caller to ``expert_g{k}``.
    Each part's ``feed`` must be ``feats`` (or ``x`` for an identity trunk)."""
    if mode not in FUSE_MODES:
        raise FuseError(f"mode must be one of {FUSE_MODES}, got {mode!r}")
    parsed = _Parsed()
    for part in ([trunk] if trunk is not None else []) + list(heads):
        _parse_part(part, parsed)
    g = _Glue()
    k_total = num_global
    # routing: softmax over the biased logits, TopK on the logits (ONNX TopK: ties go to
    # the lower index, as the numpy path), the top-k probabilities renormalised
    logits = g.op("Add", ["global_gate", "gate_bias"], "moe/gate_logits")
    gate_probs = g.op("Softmax", [logits], "gate_probs", axis=-1)
    if top_k >= k_total:
        routing = g.op("Identity", [gate_probs], "routing")
    else:
        g.nodes.append(_node("TopK", [logits, g.ints([top_k])], ["moe/top_v", "moe/top_i"],
                             "moe/topk", axis=-1, largest=1, sorted=1))
        top = g.op("GatherElements", [gate_probs, "moe/top_i"], "moe/top_p", axis=1)
        kept = g.op("ReduceSum", [top, g.ints([1])], "moe/kept", keepdims=1)
        kept = g.op("Max", [kept, g.floats(1e-12)], "moe/kept_safe")
        weights = g.op("Div", [top, kept], "moe/top_w")
        zeros = g.op("Mul", [gate_probs, g.floats(0.0)], "moe/zeros")
        routing = g.op("ScatterElements", [zeros, "moe/top_i", weights], "routing", axis=1)
    terms = ["expert_shared" if shared_expert else g.floats(0.0)]
    if mode == "if":  # expert k runs when some row routes to it: (K,) bools, one pass
        used = g.op("ReduceMax", [routing, g.ints([0])], "moe/used_w", keepdims=0)
        used = g.op("Greater", [used, g.floats(0.0, ())], "moe/used")
    for k, part in sorted(experts.items()):
        if mode == "dense":
            _parse_part(part, parsed)
            w = g.op("Gather", [routing, g.ints([k])], f"moe/w{k}", axis=1)  # (B, 1)
            terms.append(g.op("Mul", [f"expert_g{k}", w], f"moe/term{k}"))
            continue
        branch = _Parsed(opsets=parsed.opsets)
        _parse_part(part, branch)
        parsed.ir_version = max(parsed.ir_version, branch.ir_version)
        out = f"moe/term{k}"
        then_nodes = [*branch.nodes,
                      _node("Gather", [routing, g.ints([k])], [f"moe/w{k}"], f"moe/w{k}", axis=1),
                      _node("Mul", [f"expert_g{k}", f"moe/w{k}"], [f"{out}_then"],
                            f"moe/{out}_mul")]
        then_graph: list[Buf] = [b"".join(_bytes(1, n) for n in then_nodes),
                                 _str(2, f"then_g{k}")]
        for t in branch.inits:
            then_graph += _wrap(5, t)
        then_graph += [_bytes(12, _float_info(f"{out}_then")),
                       *(_bytes(13, v) for v in branch.value_infos)]
        # no node to run when not routed: the branch's output is its own zero initializer
        else_graph = (_str(2, f"else_g{k}")
                      + _bytes(5, _tensor(f"{out}_else", np.zeros((1, 1), np.float32)))
                      + _bytes(12, _float_info(f"{out}_else")))
        cond = g.op("Gather", [used, g.ints([k], scalar=True)], f"moe/run{k}", axis=0)
        then_attr = [_str(1, "then_branch"), *_wrap(6, then_graph), _int(20, _ATTR_GRAPH)]
        g.nodes.append([_node("If", [cond], [out], f"moe/if{k}"), *_wrap(5, then_attr),
                        _bytes(5, _graph_attr("else_branch", else_graph))])
        terms.append(out)
    z = g.op("Sum", terms, "moe/z")
    outputs: list[tuple[str, list[int | str]]] = [
        ("probs", ["batch", num_classes]), ("global_probs", ["batch", num_classes]),
        ("gate_probs", ["batch", k_total]), ("routing", ["batch", k_total])]
    if num_local > 0:
        h = g.op("Softmax", ["local_gate"], "local_gate_probs", axis=-1)
        rows = [z]
        for j in range(num_local):
            lj = f"expert_l{j}"
            rows.append(g.op("Add", [z, lj], f"moe/zl{j}") if local_residual else lj)
        flat = g.op("Concat", rows, "moe/flat", axis=1)  # (B, (1+M) C)
        stack = g.op("Reshape", [flat, g.ints([0, 1 + num_local, num_classes])], "moe/stack")
        stack = g.op("Softmax", [stack], "moe/stack_p", axis=-1)  # (B, 1+M, C)
        h_row = g.op("Unsqueeze", [h, g.ints([1])], "moe/h_row")  # (B, 1, 1+M)
        mixed = g.op("MatMul", [h_row, stack], "moe/mixed")
        g.op("Reshape", [mixed, g.ints([0, num_classes])], "probs")
        g.op("Gather", [stack, g.ints([0], scalar=True)], "global_probs", axis=1)
        outputs.append(("local_gate_probs", ["batch", 1 + num_local]))
    else:
        g.op("Softmax", [z], "global_probs", axis=-1)
        g.op("Identity", ["global_probs"], "probs")
    graph: list[Buf] = []
    for node in [*parsed.nodes, *g.nodes]:
        graph += _wrap(1, node if isinstance(node, list) else [node])
    graph.append(_str(2, "fedcoe_moe"))
    inits: list[list[Buf]] = list(parsed.inits)
    inits += [[t] for t in g.inits]
    for tensor in inits:
        graph += _wrap(5, tensor)
    graph += [_bytes(11, _value_info("x", ["batch", *input_shape])),
              _bytes(11, _value_info("gate_bias", ["bias_rows", k_total])),
              *(_bytes(12, _value_info(n, dims)) for n, dims in outputs),
              *(_bytes(13, v) for v in parsed.value_infos)]
    opsets = b"".join(_bytes(8, _str(1, d) + _int(2, v)) for d, v in sorted(parsed.opsets.items()))
    return [_int(1, max(parsed.ir_version, 8)) + _str(2, "fedcoe-edge fused"),
            *_wrap(7, graph), opsets]

