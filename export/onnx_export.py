"""torch -> ONNX export of a FedCoE DualLevelMoE, one graph per part plus a fused dense graph.

FedCoE (arXiv 2605.21264) routes each input to its top-k global experts; exporting each
part separately (docs/design.md, section 7) lets a device run only the experts an input routes to and
replace one expert file without re-sending the rest. Parts and their graphs:

* ``trunk``: ``x -> feats``; not exported for an identity trunk (the runtime passes x on);
* ``global_gate``: ``feats -> logits`` (B, K). Logits, not probabilities, so the runtime
  adds the cold-start prior and the held-expert mask exactly where torch does;
* ``expert_shared``, ``expert_g{k}``, ``expert_l{j}``: ``feats -> logits`` (B, C);
* ``local_gate``: ``feats -> logits`` (B, 1+M);
* ``fused_dense``: ``(x, gate_bias) -> (log_probs, global_log_probs)``: every held expert
  computed densely, routing as math (TopK + scatter), for comparison with the sparse runtime.

torch 2.13's exporter is the ``torch.export``-based one (``dynamo=True``, needs onnxscript).
The opset is pinned to :data:`OPSET` and recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx.utils
import torch
from torch import nn

from fedcoe_edge.model import DualLevelMoE

# The lowest opset the torch.export-based exporter implements natively; onnxruntime >= 1.14
# (what Raspberry Pi OS and JetPack ship or pip-install) runs it.
OPSET = 18
EXAMPLE_BATCH = 2  # export with batch 2: torch.export specialises a dimension seen as 1


def export_graph(module: nn.Module, examples: Sequence[torch.Tensor], path: str | os.PathLike[str],
                 input_names: Sequence[str], output_names: Sequence[str],
                 batched: Sequence[bool] | None = None, opset: int = OPSET) -> Path:
    """Export ``module`` to one self-contained ONNX file with a dynamic batch dimension.

    ``batched[i]`` says whether input i has the batch as dim 0 (default: all do).
    """
    batched = list(batched) if batched is not None else [True] * len(examples)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = tuple({0: batch} if b else None for b in batched)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the exporter logs one warning per missing torchvision op on every call: not our concern
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    modes = {m: m.training for m in module.modules()}  # restore each one: a wrapper is new
    module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, tuple(examples), dynamo=True, opset_version=opset,
                                        input_names=list(input_names),
                                        output_names=list(output_names),
                                        dynamic_shapes=dynamic, external_data=False, verbose=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return out


def graph_topk_routing(probs: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`fedcoe_edge.model.topk_routing` written with ``topk`` so it exports to ONNX.

    The model's version uses a stable sort (exact ties to the lower index), which torch's
    ONNX exporter cannot translate; ONNX ``TopK`` applies the same tie rule itself.
    """
    if k >= probs.shape[-1]:
        return probs
    top_vals, top_idx = probs.topk(k, dim=-1)
    weights = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)


class FusedDenseMoE(nn.Module):
    """DualLevelMoE.forward as one static graph: all held experts computed, routing as math.

    ``gate_bias`` (K,) is added to the gate logits: log of a routing prior and/or ``-inf``
    for experts a caller masks out. Experts not held by the bundle are masked inside.
    """

    def __init__(self, model: DualLevelMoE, held: Sequence[int], use_local: bool = True) -> None:
        super().__init__()
        # Re-register the parts under plain names: the model's "global" submodule is a Python
        # keyword, which breaks the FX code torch.export generates for attribute access.
        g, loc, cfg = model.global_part, model.local_part, model.cfg
        self.top_k = cfg.top_k
        self.held = sorted(held)
        self.trunk = g.trunk
        self.gate = g.gate
        self.shared = g.shared
        self.experts = nn.ModuleList(g.experts[k] for k in self.held)
        self.use_local = use_local and len(loc.experts) > 0
        self.local_gate = loc.gate
        self.local_experts = loc.experts
        self.local_residual = cfg.local_residual
        mask = torch.zeros(cfg.num_global_experts, dtype=torch.bool)
        mask[self.held] = True
        self.held_mask: torch.Tensor
        self.register_buffer("held_mask", mask)

    def forward(self, x: torch.Tensor, gate_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(x)
        logits = (self.gate(feats) + gate_bias).masked_fill(~self.held_mask, float("-inf"))
        routing = graph_topk_routing(logits.softmax(-1), self.top_k)
        z = self.shared(feats) if self.shared is not None else torch.zeros_like(routing[:, :1])
        for k, expert in zip(self.held, self.experts, strict=True):
            z = z + routing[:, k : k + 1] * expert(feats)
        global_lp = z.log_softmax(-1)
        if not self.use_local:
            return global_lp, global_lp
        h = self.local_gate(feats).log_softmax(-1)
        local_z = torch.stack([e(feats) for e in self.local_experts], 1)  # (B, M, C)
        if self.local_residual:  # residual local experts correct the global logits
            local_z = local_z + z.unsqueeze(1)
        parts = torch.cat([global_lp.unsqueeze(1), local_z.log_softmax(-1)], 1)
        return torch.logsumexp(h.unsqueeze(-1) + parts, 1), global_lp


def part_modules(model: DualLevelMoE, held: Sequence[int]) -> dict[str, nn.Module]:
    """Part name -> the submodule exported for it, in the runtime's order."""
    g, loc, cfg = model.global_part, model.local_part, model.cfg
    parts: dict[str, nn.Module] = {}
    if cfg.trunk != "identity":
        parts["trunk"] = g.trunk
    parts["global_gate"] = g.gate
    if g.shared is not None:
        parts["expert_shared"] = g.shared
    for k in sorted(held):
        parts[f"expert_g{k}"] = g.experts[k]
    if len(loc.experts) > 0:
        parts["local_gate"] = loc.gate
        for j, expert in enumerate(loc.experts):
            parts[f"expert_l{j}"] = expert
    return parts


def io_spec(name: str, shape: Sequence[int | str], dtype: str = "float32") -> dict[str, object]:
    return {"name": name, "shape": list(shape), "dtype": dtype}


class AllParts(nn.Module):
    """Every part's output and the fused dense graph's, from one trace.

    torch.export costs about a second per call whatever the module's size, so the bundle is
    traced once and :func:`split_graph` cuts each part out of the resulting ONNX graph.
    Outputs: ``feats`` (only with a real trunk), one per part, then the fused pair.
    """

    def __init__(self, model: DualLevelMoE, held: Sequence[int]) -> None:
        super().__init__()
        self.fused = FusedDenseMoE(model, held)
        self.has_trunk = model.cfg.trunk != "identity"

    def forward(self, x: torch.Tensor, gate_bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.fused
        feats = f.trunk(x)
        outs: list[torch.Tensor] = [feats] if self.has_trunk else []
        outs.append(f.gate(feats))
        if f.shared is not None:
            outs.append(f.shared(feats))
        outs += [e(feats) for e in f.experts]
        if len(f.local_experts) > 0:
            outs.append(f.local_gate(feats))
            outs += [e(feats) for e in f.local_experts]
        log_probs, global_lp = f(x, gate_bias)
        if not f.use_local:  # one tensor cannot be two graph outputs
            log_probs = log_probs + 0.0
        return (*outs, log_probs, global_lp)


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    if old == new:
        return
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for vi in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        if vi.name == old:
            vi.name = new


def state_dict_names(wrapper: AllParts) -> dict[str, str]:
    """Wrapper parameter name -> the model's state-dict name (``global.experts.2.fc1.weight``).

    Initializers carry the names that travel on the wire, so a swapped expert file can be
    matched to its state-dict entries.
    """
    f = wrapper.fused
    prefixes = {"trunk.": "global.trunk.", "gate.": "global.gate.", "shared.": "global.shared.",
                "local_gate.": "local.gate.", "local_experts.": "local.experts."}
    out: dict[str, str] = {}
    for name, _ in [*f.named_parameters(), *f.named_buffers()]:
        new = None
        if name.startswith("experts."):
            idx, rest = name.removeprefix("experts.").split(".", 1)
            new = f"global.experts.{f.held[int(idx)]}.{rest}"
        else:
            for old, repl in prefixes.items():
                if name.startswith(old):
                    new = repl + name.removeprefix(old)
                    break
        if new is not None:
            out[f"fused.{name}"] = new
    return out


def strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and scopes: a third of a tiny part's bytes."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _set_batch_dim(values: Sequence[onnx.ValueInfoProto], batched: Sequence[bool]) -> None:
    for vi, b in zip(values, batched, strict=True):
        if b:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"


def split_graph(proto: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str],
                new_inputs: Sequence[str], new_outputs: Sequence[str],
                batched_inputs: Sequence[bool] | None = None) -> onnx.ModelProto:
    """The subgraph from ``inputs`` to ``outputs``, its I/O renamed, dim 0 named "batch"."""
    sub = onnx.utils.Extractor(proto).extract_model(list(inputs), list(outputs))
    for old, new in [*zip(inputs, new_inputs, strict=True), *zip(outputs, new_outputs, strict=True)]:
        _rename(sub.graph, old, new)
    _set_batch_dim(sub.graph.input, batched_inputs or [True] * len(inputs))
    _set_batch_dim(sub.graph.output, [True] * len(outputs))
    del sub.graph.value_info[:]
    onnx.checker.check_model(sub)
    return sub


def always_on_parts(names: Sequence[str]) -> list[str]:
    """The parts every input runs whatever its routing: gates, shared and local experts."""
    return [n for n in names if n != "trunk" and not n.startswith("expert_g")]


def export_bundle_graphs(model: DualLevelMoE, out_dir: str | os.PathLike[str], held: Sequence[int],
                         *, include_fused: bool = True, include_heads: bool = True,
                         opset: int = OPSET
                         ) -> tuple[dict[str, dict[str, object]], dict[str, object] | None,
                                    dict[str, object] | None]:
    """Export every part to ``out_dir/<part>.onnx``, the dense graph to ``fused_dense.onnx``
    and the always-on heads as one graph, ``heads.onnx``.

    ``heads.onnx`` (``feats`` -> one output per always-on part, named after the part) lets
    the runtime compute the gates, shared and local experts in one onnxruntime call instead
    of one per part: each call costs ~15 us and ~0.6 MB of session state on a Cortex-class
    core, as much as a 576x192 int8 head itself. The routed experts stay separate files
    (sparse, swappable). Returns (part -> {path, inputs, outputs}, fused or None, heads
    {path, inputs, outputs, parts} or None when fewer than two parts are always on).
    """
    out = Path(out_dir)
    cfg = model.cfg
    k_total = cfg.num_global_experts
    feat_shape = tuple(model.global_part.feat_shape)
    names = list(part_modules(model, held))
    traced = out / ".all_parts.onnx"
    wrapper = AllParts(model, held)
    export_graph(wrapper,
                 [torch.randn(EXAMPLE_BATCH, *cfg.input_shape), torch.zeros(k_total)], traced,
                 ["x", "gate_bias"], [*names, "log_probs", "global_log_probs"],
                 batched=[True, False], opset=opset)
    proto = onnx.load(str(traced))
    traced.unlink()
    strip_metadata(proto)
    for old, new in state_dict_names(wrapper).items():
        _rename(proto.graph, old, new)
    feats_name = "trunk" if "trunk" in names else "x"
    parts: dict[str, dict[str, object]] = {}
    for name in names:
        if name == "trunk":
            sub = split_graph(proto, ["x"], ["trunk"], ["x"], ["feats"])
            ins, outs = [io_spec("x", ["batch", *cfg.input_shape])], [io_spec("feats", ["batch", *feat_shape])]
        else:
            sub = split_graph(proto, [feats_name], [name], ["feats"], ["logits"])
            n_out = {"global_gate": k_total, "local_gate": 1 + cfg.num_local_experts}.get(
                name, cfg.num_classes)
            ins, outs = [io_spec("feats", ["batch", *feat_shape])], [io_spec("logits", ["batch", n_out])]
        path = out / f"{name}.onnx"
        onnx.save(sub, str(path))
        parts[name] = {"path": path, "inputs": ins, "outputs": outs}
    fused = None
    if include_fused:
        sub = split_graph(proto, ["x", "gate_bias"], ["log_probs", "global_log_probs"],
                          ["x", "gate_bias"], ["log_probs", "global_log_probs"],
                          batched_inputs=[True, False])
        path = out / "fused_dense.onnx"
        onnx.save(sub, str(path))
        fused = {"path": path,
                 "inputs": [io_spec("x", ["batch", *cfg.input_shape]), io_spec("gate_bias", [k_total])],
                 "outputs": [io_spec("log_probs", ["batch", cfg.num_classes]),
                             io_spec("global_log_probs", ["batch", cfg.num_classes])]}
    heads = None
    merged = always_on_parts(names)
    if include_heads and len(merged) > 1:
        sub = split_graph(proto, [feats_name], merged, ["feats"], merged)
        path = out / "heads.onnx"
        onnx.save(sub, str(path))
        heads = {"path": path, "inputs": [io_spec("feats", ["batch", *feat_shape])],
                 "outputs": [io_spec(n, parts[n]["outputs"][0]["shape"]) for n in merged],  # type: ignore[index]
                 "parts": merged}
    return parts, fused, heads
