"""Multiply-accumulate (MAC) and parameter counting with forward hooks.

Counts the multiply-adds of the layers that carry the arithmetic of a convolutional net:
``Conv{1,2,3}d`` (``C_out * H_out * W_out * C_in/groups * prod(kernel)`` per sample),
``ConvTranspose{1,2,3}d``, ``Linear`` (``in * out`` per output row) and ``Bilinear``.
Elementwise ops (activations, BatchNorm, residual adds, pooling,
SE scaling) are excluded, which is the convention of the MobileNet papers
(Sandler et al. 2018, arXiv 1801.04381; Howard et al. 2019, arXiv 1905.02244) and of
torchvision's published figures: 300.8M (V2), 56.5M (V3-Small), 216.6M (V3-Large) MACs at
224x224. A FLOP is two MACs; the benchmark suite reports achieved GFLOP/s as
``2 * MACs * batch / seconds``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedcoe_edge.errors import ConfigError

__all__ = ["ModelCost", "count_macs", "count_params", "model_cost"]


@dataclass
class ModelCost:
    """Per-sample MACs of one forward pass, and the parameter count."""

    macs: int
    params: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """Floating-point operations: one multiply and one add per MAC."""
        return 2 * self.macs


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
) -> ModelCost:
    """Run one forward pass in eval mode and sum the MACs per sample.

    Give ``input_shape`` for a single image tensor (batch dimension included, e.g.
    ``(1, 3, 224, 224)``) or ``inputs`` for anything else. The result is per sample: the
    count is divided by the batch size, so any batch gives the same figure.
    """
    if (input_shape is None) == (inputs is None):
        raise ConfigError("count_macs: give exactly one of input_shape or inputs")
    if inputs is None:
        assert input_shape is not None
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ConfigError(
                f"count_macs: input_shape must be (batch, ...) with positive sizes, got {shape}"
            )
        inputs = torch.zeros(shape)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    batch = int(args[0].shape[0]) if args[0].dim() > 0 else 1
    if batch < 1:
        raise ConfigError("count_macs: the first input has an empty batch dimension")

    per_layer: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                kernel = 1
                for k in module.kernel_size:
                    kernel *= int(k)
                macs = int(inp[0].numel()) * (module.out_channels // module.groups) * kernel
            elif isinstance(module, nn.modules.conv._ConvNd):
                kernel = 1
                for k in module.kernel_size:
                    kernel *= int(k)
                macs = int(out.numel()) * (module.in_channels // module.groups) * kernel
            elif isinstance(module, nn.Linear):
                macs = int(out.numel()) * module.in_features
            elif isinstance(module, nn.Bilinear):
                macs = int(out.numel()) * module.in1_features * module.in2_features
            else:  # pragma: no cover - only registered for the types above
                return
            per_layer[name] = per_layer.get(name, 0) + macs

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)):
            handles.append(module.register_forward_hook(make_hook(name or type(module).__name__)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per_sample = {k: v // batch for k, v in per_layer.items()}
    return ModelCost(
        macs=sum(per_layer.values()) // batch, params=count_params(model), per_layer=per_sample
    )


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> ModelCost:
    """Shorthand for :func:`count_macs` with an input shape."""
    return count_macs(model, input_shape=input_shape)
