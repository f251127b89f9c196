"""MobileNet baselines match the published sizes, and our MAC counter the published costs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedcoe_edge.errors import ConfigError
from fedcoe_edge.flops import count_macs, count_params
from fedcoe_edge.mobilenet import (
    mobilenet_v2,
    mobilenet_v3_large,
    mobilenet_v3_small,
    mobilenet_v3_small_trunk,
)

torch.set_num_threads(1)

# (builder, published params, published MACs at 224x224) from the papers / torchvision.
PUBLISHED: list[tuple[Callable[[], nn.Module], int, float]] = [
    (mobilenet_v2, 3_504_872, 300.8e6),
    (mobilenet_v3_small, 2_542_856, 56.5e6),
    (mobilenet_v3_large, 5_483_032, 216.6e6),
]
IDS = ["v2", "v3_small", "v3_large"]


@pytest.mark.parametrize(("build", "params", "macs"), PUBLISHED, ids=IDS)
def test_parameter_counts_are_exact(
    build: Callable[[], nn.Module], params: int, macs: float
) -> None:
    model = build()
    assert count_params(model) == params
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize(("build", "params", "macs"), PUBLISHED, ids=IDS)
def test_macs_match_published_within_one_percent(
    build: Callable[[], nn.Module], params: int, macs: float
) -> None:
    cost = count_macs(build(), (1, 3, 224, 224))
    assert abs(cost.macs - macs) / macs < 0.01
    assert cost.params == params
    assert cost.flops == 2 * cost.macs


def test_mac_counter_agrees_with_torch_flop_counter() -> None:
    """An independent count (torch's dispatch-level counter) gives exactly 2 FLOPs per MAC."""
    model = mobilenet_v3_small().eval()
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert counter.get_total_flops() == 2 * count_macs(model, inputs=x).macs


def test_macs_are_per_sample_and_scale_with_resolution() -> None:
    model = mobilenet_v2()
    one = count_macs(model, (1, 3, 224, 224)).macs
    assert count_macs(model, (3, 3, 224, 224)).macs == one
    small = count_macs(model, (1, 3, 32, 32)).macs
    # Convolutions scale with pixels (49x fewer), the classifier does not.
    assert one / 60 < small < one / 30


def test_mac_counter_counts_a_hand_computed_net() -> None:
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*4*4 outputs * 3*9 = 3456
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # 8*4*4 * 1*9 = 1152
        nn.Flatten(),
        nn.Linear(128, 10),  # 1280
    )
    cost = count_macs(net, (2, 3, 4, 4))
    assert cost.macs == 3456 + 1152 + 1280
    assert cost.per_layer == {"0": 3456, "1": 1152, "3": 1280}


def test_mac_counter_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        count_macs(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="input_shape"):
        count_macs(nn.Linear(2, 2), (0, 2))


def test_count_macs_restores_training_mode() -> None:
    model = mobilenet_v3_small().train()
    count_macs(model, (1, 3, 32, 32))
    assert model.training


@pytest.mark.parametrize("build", [b for b, _, _ in PUBLISHED], ids=IDS)
@pytest.mark.parametrize("size", [224, 32])
def test_output_shapes(build: Callable[[], nn.Module], size: int) -> None:
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 1000)
    assert torch.isfinite(out).all()


def test_num_classes_changes_only_the_head() -> None:
    base = count_params(mobilenet_v3_small())
    ten = mobilenet_v3_small(num_classes=10)
    assert count_params(ten) == base - (1024 + 1) * 990
    with torch.no_grad():
        assert ten.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="num_classes"):
        mobilenet_v2(num_classes=0)


@pytest.mark.parametrize("size", [224, 32])
def test_trunk_shape(size: int) -> None:
    trunk = mobilenet_v3_small_trunk().eval()
    assert trunk.out_features == 576
    with torch.no_grad():
        feats = trunk(torch.randn(3, 3, size, size))
    assert feats.shape == (3, 576)
    assert torch.isfinite(feats).all()


def test_trunk_is_the_small_net_without_its_classifier() -> None:
    trunk = mobilenet_v3_small_trunk()
    classifier = (576 * 1024 + 1024) + (1024 * 1000 + 1000)
    assert count_params(trunk) == 2_542_856 - classifier
    assert [type(m) for m in trunk.features.modules()] == [
        type(m) for m in mobilenet_v3_small().features.modules()
    ]


def test_trunk_trains_end_to_end() -> None:
    trunk = mobilenet_v3_small_trunk().train()
    head = nn.Linear(trunk.out_features, 4)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(head(trunk(x)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    stem = trunk.features[0]
    assert isinstance(stem, nn.Sequential) and isinstance(stem[0], nn.Conv2d)
    first = stem[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_trunk_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"MobileNetV3Trunk.*\(B, 3, H, W\)"):
        mobilenet_v3_small_trunk()(torch.randn(1, 1, 32, 32))
