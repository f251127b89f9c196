"""Model shapes, top-k routing, the global/local state split, losses."""

import dataclasses

import pytest
import torch

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.losses import fedcoe_loss, load_balance_loss, routing_consistency
from fedcoe_edge.model import DualLevelMoE, topk_routing


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_forward_shapes_and_probabilities(kind):
    cfg = ModelConfig(expert_kind=kind, num_global_experts=4, top_k=2, num_local_experts=2)
    model = DualLevelMoE(cfg).eval()
    out = model(torch.rand(5, 1, 8, 8))
    assert out.log_probs.shape == (5, 10)
    assert out.global_log_probs.shape == (5, 10)
    assert out.gate_probs.shape == (5, 4)
    assert out.local_gate_probs.shape == (5, 3)
    torch.testing.assert_close(out.log_probs.exp().sum(-1), torch.ones(5))
    torch.testing.assert_close(out.global_log_probs.exp().sum(-1), torch.ones(5))
    # exactly top_k experts carry weight per input
    assert ((out.routing > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.routing.sum(-1), torch.ones(5))


def test_topk_routing_keeps_largest_and_renormalises():
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1]])
    torch.testing.assert_close(topk_routing(probs, 2), torch.tensor([[0.0, 0.75, 0.25, 0.0]]))
    torch.testing.assert_close(topk_routing(probs, 4), probs)
    ties = torch.full((1, 4), 0.25)
    torch.testing.assert_close(topk_routing(ties, 2), torch.tensor([[0.5, 0.5, 0.0, 0.0]]))


def test_expert_mask_restricts_routing():
    model = DualLevelMoE(ModelConfig(num_global_experts=4, top_k=2)).eval()
    mask = torch.tensor([False, True, False, True])
    out = model(torch.rand(8, 1, 8, 8), expert_mask=mask)
    assert (out.routing[:, [0, 2]] == 0).all()


def test_state_dict_split_is_clean_and_stable():
    cfg = ModelConfig(expert_kind="mlp", num_global_experts=3, num_local_experts=2)
    model = DualLevelMoE(cfg)
    keys = list(model.state_dict())
    assert all(k.startswith(("global.", "local.")) for k in keys)
    assert set(model.global_state()) | set(model.local_state()) == set(keys)
    assert "global.experts.2.fc1.weight" in keys
    assert "global.shared.fc2.bias" in keys
    assert "global.gate.net.weight" in keys
    assert "local.experts.1.fc1.weight" in keys
    assert "local.gate.net.weight" in keys
    assert not any(k.startswith("local.") for k in model.global_state())


def test_tier_sizes_local_experts():
    small = DualLevelMoE(ModelConfig(expert_kind="mlp", tier="small")).local_state()["local.experts.0.fc1.weight"]
    large = DualLevelMoE(ModelConfig(expert_kind="mlp", tier="large")).local_state()["local.experts.0.fc1.weight"]
    assert small.shape[0] * 4 == large.shape[0]


def test_no_local_experts_means_global_path_only():
    model = DualLevelMoE(ModelConfig(num_local_experts=0)).eval()
    out = model(torch.rand(3, 1, 8, 8))
    torch.testing.assert_close(out.log_probs, out.global_log_probs)


@pytest.mark.parametrize("bad", [{"top_k": 5}, {"num_classes": 1}, {"tier": "huge"},
                                 {"expert_kind": "rnn"}, {"input_shape": (0, 8)}])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ConfigError):
        dataclasses.replace(ModelConfig(num_global_experts=4), **bad)


def test_losses_behave():
    uniform = torch.full((4, 4), 0.25)
    assert float(load_balance_loss(uniform)) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 4)
    assert float(load_balance_loss(collapsed)) == pytest.approx(4.0)
    # over the 2 experts a client holds: even use of both is 1, all on one is 2
    held = torch.tensor([True, True, False, False])
    assert float(load_balance_loss(torch.tensor([[0.5, 0.5, 0, 0]] * 4), held)) == pytest.approx(1.0)
    assert float(load_balance_loss(torch.tensor([[1.0, 0, 0, 0]] * 4), held)) == pytest.approx(2.0)
    # the gradient does not vanish when m == top_k (the Switch loss's did)
    logits = torch.tensor([[2.0, 0.0, 0, 0]] * 4, requires_grad=True)
    probs = logits.masked_fill(~held, float("-inf")).softmax(-1)
    load_balance_loss(probs, held).backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 1e-3
    logits = torch.zeros(2, 4)
    assert float(routing_consistency(logits, torch.tensor([True, True, False, False]))) == pytest.approx(
        torch.log(torch.tensor(2.0)).item())
    assert float(routing_consistency(logits, None)) == 0.0
    model = DualLevelMoE(ModelConfig(expert_kind="mlp"))
    out = model(torch.rand(6, 1, 8, 8))
    parts = fedcoe_loss(out, torch.randint(0, 10, (6,)), TrainConfig())
    parts.total.backward()
    assert model.global_part.gate.net.weight.grad is not None
    assert model.local_part.experts[0].fc1.weight.grad is not None
