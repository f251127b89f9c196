"""MobileNetV2 and MobileNetV3 in plain torch (torchvision is not available here).

The architectures follow the papers and torchvision's reference layout exactly, so that
parameter counts match the published ones at 1000 classes:

* MobileNetV2-1.0: Sandler et al., "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", CVPR 2018 (arXiv 1801.04381): 3,504,872 parameters, ~300.8M MACs.
* MobileNetV3-Small / -Large: Howard et al., "Searching for MobileNetV3", ICCV 2019
  (arXiv 1905.02244): 2,542,856 / 5,483,032 parameters, ~56.5M / ~216.6M MACs.

They are the latency/memory baselines of the benchmark suite (docs/design.md, section 9), and
:func:`mobilenet_v3_small_trunk` is the shared feature extractor of the FedCoE model for
camera-size inputs (docs/design.md, section 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedcoe_edge.errors import ConfigError

__all__ = [
    "MobileNetV2",
    "MobileNetV3",
    "MobileNetV3Trunk",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "mobilenet_v3_small_trunk",
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` (the papers' rule, never -10%)."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _check_classes(num_classes: int, where: str) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"{where}: num_classes must be a positive int, got {num_classes!r}")


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + optional activation: the building block of both nets."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Callable[[], nn.Module] | None = nn.ReLU6,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)
        self.out_channels = out_ch


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidualV2(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 project."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), from the V2 paper, Table 2.
_V2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier; 1.0 is the published 3.5M-parameter model."""

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        _check_classes(num_classes, "MobileNetV2")
        if not width_mult > 0:
            raise ConfigError(f"MobileNetV2: width_mult must be > 0, got {width_mult!r}")
        in_ch = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [ConvBNAct(3, in_ch, stride=2)]
        for t, c, n, s in _V2_SETTINGS:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidualV2(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        layers.append(ConvBNAct(in_ch, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# --------------------------------------------------------------------------- MobileNetV3


class SqueezeExcitation(nn.Module):
    """SE block of MobileNetV3: pool, 1x1 reduce (ReLU), 1x1 expand, hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.relu(self.fc1(self.avgpool(x)))))
        return x * scale


@dataclass(frozen=True)
class BlockSpec:
    """One MobileNetV3 bottleneck row (V3 paper, Tables 1 and 2)."""

    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    use_se: bool
    hard_swish: bool
    stride: int


_V3_SMALL: tuple[BlockSpec, ...] = (
    BlockSpec(16, 3, 16, 16, True, False, 2),
    BlockSpec(16, 3, 72, 24, False, False, 2),
    BlockSpec(24, 3, 88, 24, False, False, 1),
    BlockSpec(24, 5, 96, 40, True, True, 2),
    BlockSpec(40, 5, 240, 40, True, True, 1),
    BlockSpec(40, 5, 240, 40, True, True, 1),
    BlockSpec(40, 5, 120, 48, True, True, 1),
    BlockSpec(48, 5, 144, 48, True, True, 1),
    BlockSpec(48, 5, 288, 96, True, True, 2),
    BlockSpec(96, 5, 576, 96, True, True, 1),
    BlockSpec(96, 5, 576, 96, True, True, 1),
)

_V3_LARGE: tuple[BlockSpec, ...] = (
    BlockSpec(16, 3, 16, 16, False, False, 1),
    BlockSpec(16, 3, 64, 24, False, False, 2),
    BlockSpec(24, 3, 72, 24, False, False, 1),
    BlockSpec(24, 5, 72, 40, True, False, 2),
    BlockSpec(40, 5, 120, 40, True, False, 1),
    BlockSpec(40, 5, 120, 40, True, False, 1),
    BlockSpec(40, 3, 240, 80, False, True, 2),
    BlockSpec(80, 3, 200, 80, False, True, 1),
    BlockSpec(80, 3, 184, 80, False, True, 1),
    BlockSpec(80, 3, 184, 80, False, True, 1),
    BlockSpec(80, 3, 480, 112, True, True, 1),
    BlockSpec(112, 3, 672, 112, True, True, 1),
    BlockSpec(112, 5, 672, 160, True, True, 2),
    BlockSpec(160, 5, 960, 160, True, True, 1),
    BlockSpec(160, 5, 960, 160, True, True, 1),
)

# BatchNorm settings of the TF reference implementation, which torchvision copies.
_V3_BN: dict[str, Any] = {"bn_eps": 1e-3, "bn_momentum": 0.01}


class InvertedResidualV3(nn.Module):
    """MobileNetV3 bneck: optional 1x1 expand, depthwise, optional SE, linear 1x1 project."""

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        act: Callable[[], nn.Module] = nn.Hardswish if spec.hard_swish else nn.ReLU
        self.use_residual = spec.stride == 1 and spec.in_ch == spec.out_ch
        layers: list[nn.Module] = []
        if spec.expanded != spec.in_ch:
            layers.append(ConvBNAct(spec.in_ch, spec.expanded, 1, activation=act, **_V3_BN))
        layers.append(
            ConvBNAct(
                spec.expanded,
                spec.expanded,
                spec.kernel,
                spec.stride,
                groups=spec.expanded,
                activation=act,
                **_V3_BN,
            )
        )
        if spec.use_se:
            layers.append(SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4)))
        layers.append(ConvBNAct(spec.expanded, spec.out_ch, 1, activation=None, **_V3_BN))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.block(x)
        return self.block(x)


def _v3_features(specs: Sequence[BlockSpec]) -> tuple[nn.Sequential, int]:
    """Stem, bottlenecks and the final 1x1 conv (6x the last bottleneck's width)."""
    layers: list[nn.Module] = [
        ConvBNAct(3, specs[0].in_ch, 3, 2, activation=nn.Hardswish, **_V3_BN)
    ]
    layers += [InvertedResidualV3(spec) for spec in specs]
    last_in = specs[-1].out_ch
    last_out = 6 * last_in
    layers.append(ConvBNAct(last_in, last_out, 1, activation=nn.Hardswish, **_V3_BN))
    return nn.Sequential(*layers), last_out


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier; build it with :func:`mobilenet_v3_small` or ``_large``."""

    def __init__(
        self,
        specs: Sequence[BlockSpec],
        last_channel: int,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        _check_classes(num_classes, "MobileNetV3")
        self.features, feat_ch = _v3_features(specs)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(feat_ch, last_channel),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(last_channel, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3Trunk(nn.Module):
    """V3-Small feature extractor + global average pool: ``(B, 3, H, W) -> (B, 576)``.

    The FedCoE model shares it across all experts for camera-size inputs; any H, W >= 1
    works because the pool is adaptive (32x32 ends at 1x1 after the 32x downsampling).
    """

    out_features: int

    def __init__(self) -> None:
        super().__init__()
        self.features, self.out_features = _v3_features(_V3_SMALL)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"MobileNetV3Trunk.forward: expected input (B, 3, H, W), got {tuple(x.shape)}"
            )
        return torch.flatten(self.avgpool(self.features(x)), 1)


def _init_weights(model: nn.Module) -> None:
    """torchvision's initialisation, so untrained baselines behave like the reference."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (3,504,872 parameters at 1000 classes, width 1.0)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Small (2,542,856 parameters at 1000 classes)."""
    return MobileNetV3(_V3_SMALL, last_channel=1024, num_classes=num_classes)


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large (5,483,032 parameters at 1000 classes)."""
    return MobileNetV3(_V3_LARGE, last_channel=1280, num_classes=num_classes)


def mobilenet_v3_small_trunk() -> MobileNetV3Trunk:
    """The shared FedCoE trunk: V3-Small features + global pool, ``out_features = 576``."""
    return MobileNetV3Trunk()
