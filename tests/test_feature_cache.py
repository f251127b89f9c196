"""The frozen trunk's feature cache: same training up to rounding, hits counted, budget kept,
invalidated by new weights, never on a trunk that trains, out of the way of hooks."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fedcoe_edge.config import DEFAULT_TRUNK_CACHE_MB, ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.feature_cache import ENTRY_OVERHEAD_BYTES, FeatureCache, cache_of, install_cache
from fedcoe_edge.flops import count_macs
from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.strategies import ClientData, ClientTask, make_strategy
from fedcoe_edge.strategies.fedcoe import FedCoE
from fedcoe_edge.training import build_model, load_arrays, run_epochs, to_arrays
from fedcoe_edge.trunk import TRUNK_PREFIX, prepare_trunk

CAM: dict[str, Any] = dict(input_shape=(3, 32, 32), trunk="mobilenet_v3_small", expert_kind="mlp",
                           expert_hidden=16, num_global_experts=4, num_local_experts=1)
N = 12
FEATURES = 576  # V3-Small trunk output width


@pytest.fixture(scope="module", autouse=True)
def calibrated_trunk(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 'pretrained' trunk: BatchNorm statistics measured on data, so its features are O(1)
    (a fresh trunk in eval mode gives ~1e-9, which any tolerance would call equal). Every
    model in this file loads it from its file (hash-checked, as a device would)."""
    model = build_model(ModelConfig(**CAM), 5)
    trunk = model.global_part.trunk
    for m in trunk.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative: the statistics of the one batch below
    trunk.train()
    with torch.no_grad():
        trunk(torch.from_numpy(samples(32, seed=1)[0]))
    arrays = {k: v for k, v in to_arrays(model.state_dict()).items() if k.startswith(TRUNK_PREFIX)}
    path = tmp_path_factory.mktemp("trunk") / "trunk.safetensors"
    save_file(arrays, str(path))
    CAM.update(trunk_weights=str(path), trunk_sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def samples(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 3, 32, 32), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)


def frozen_model(cache_mb: int = DEFAULT_TRUNK_CACHE_MB, mode: str = "frozen") -> DualLevelMoE:
    cfg = ModelConfig(**CAM, trunk_mode=mode, trunk_cache_mb=cache_mb)  # type: ignore[arg-type]
    model = build_model(cfg, 3)
    prepare_trunk(model, cfg)
    return model


def train_epoch(model: DualLevelMoE, x: np.ndarray, y: np.ndarray, epoch: int) -> None:
    """One epoch of run_epochs over everything but the trunk (as client_update trains)."""
    params = [p for n, p in model.named_parameters() if not n.startswith(TRUNK_PREFIX)]

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.nll_loss(model(xb).log_probs, yb)

    run_epochs(model, params, x, y, TrainConfig(batch_size=4), 1, np.random.default_rng(epoch), loss)


def test_config_default_range_and_serialisation() -> None:
    assert ModelConfig().trunk_cache_mb == DEFAULT_TRUNK_CACHE_MB
    assert "trunk_cache_mb" not in ModelConfig(**CAM).to_dict()
    with torch.no_grad():
        feats = frozen_model().global_part.trunk(torch.from_numpy(samples(4)[0]))
    assert float(feats.abs().mean()) > 0.05  # cache keys as before
    cfg = ModelConfig(**CAM, trunk_mode="frozen", trunk_cache_mb=64)
    assert ModelConfig.from_dict(cfg.to_dict()).trunk_cache_mb == 64
    for bad in (-1, 1.5, True, "256", (1 << 20) + 1):
        with pytest.raises(ConfigError, match="model.trunk_cache_mb must be an integer"):
            ModelConfig(**CAM, trunk_cache_mb=bad)  # type: ignore[arg-type]


def test_second_epoch_runs_the_trunk_on_no_sample() -> None:
    x, y = samples()
    model = frozen_model()
    cache = cache_of(model.global_part.trunk)
    assert cache is not None and len(cache) == 0
    train_epoch(model, x, y, 0)
    assert (cache.stats.misses, cache.stats.hits, len(cache)) == (N, 0, N)
    train_epoch(model, x, y, 1)
    assert (cache.stats.misses, cache.stats.hits) == (N, N)  # the trunk ran on 0 samples
    assert cache.stats.bypassed == 0 and cache.stats.invalidations == 0


def test_training_with_and_without_the_cache_agrees_up_to_rounding() -> None:
    x, y = samples(16)
    states = []
    for cache_mb in (DEFAULT_TRUNK_CACHE_MB, 0):
        s = make_strategy("fedcoe", ModelConfig(**CAM, trunk_mode="frozen", trunk_cache_mb=cache_mb),
                          TrainConfig(local_epochs=2, batch_size=4, experts_per_client=2))
        assert isinstance(s, FedCoE)
        sent = s.params_for([0, 1])
        state = None
        for rnd in (1, 2):  # two rounds of two epochs: the second round is all hits
            result, state = s.client_update(ClientTask("0", rnd, sent, [0, 1]), state,
                                            ClientData(x, y, x[:4], y[:4]))
            sent = {**sent, **result.params}
        cache = cache_of(s.model.global_part.trunk)
        assert (cache is not None) == (cache_mb > 0)
        if cache is not None:
            assert cache.stats.misses == 16 and cache.stats.hits >= 4 * 16
        states.append(to_arrays(s.model.state_dict()))
    cached, plain = states
    assert sorted(cached) == sorted(plain)
    moved = build_model(ModelConfig(**{**CAM, "trunk_weights": "", "trunk_sha256": ""}), 0).state_dict()
    assert any(not np.allclose(plain[k], moved[k].numpy()) for k in plain)  # training happened
    for k in plain:
        np.testing.assert_allclose(cached[k], plain[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_budget_is_respected_least_recently_used_go_first() -> None:
    x, _ = samples()
    model = frozen_model()
    trunk = model.global_part.trunk
    entry = FEATURES * 4 + ENTRY_OVERHEAD_BYTES
    cache = install_cache(trunk, 5 * entry + entry // 2)  # room for 5 samples
    assert cache is not None
    xt = torch.from_numpy(x)
    with torch.no_grad():
        out = trunk(xt)
        assert len(cache) == 5 and cache.used_bytes <= cache.budget_bytes
        assert cache.stats.evictions == N - 5
        again = trunk(xt[N - 5:])  # the last five are the ones kept
        assert cache.stats.hits == 5
        torch.testing.assert_close(again, out[N - 5:])
        assert trunk(xt[:0]).shape == (0, FEATURES)  # an empty batch runs as it would uncached
        install_cache(trunk, 0)
        assert cache_of(trunk) is None
        torch.testing.assert_close(trunk(xt), out, rtol=1e-5, atol=1e-6)  # mixed batches: same
    tiny = FeatureCache(entry - 1)  # an entry larger than the budget is not kept
    tiny.store(("float32", (1,), b"k"), torch.zeros(FEATURES))
    assert len(tiny) == 0 and tiny.used_bytes == 0


def test_mixed_hits_and_misses_give_the_uncached_features() -> None:
    x, _ = samples()
    model, plain = frozen_model(), frozen_model(0)
    trunk = model.global_part.trunk
    xt = torch.from_numpy(x)
    with torch.no_grad():
        trunk(xt[::2])  # half cached
        mixed = trunk(xt)
        want = plain.global_part.trunk(xt)
    cache = cache_of(trunk)
    assert cache is not None and cache.stats.hits == N // 2
    torch.testing.assert_close(mixed, want, rtol=1e-5, atol=1e-6)


def test_new_trunk_weights_invalidate_the_same_weights_do_not() -> None:
    x, _ = samples()
    model = frozen_model()
    trunk = model.global_part.trunk
    cache = cache_of(trunk)
    assert cache is not None
    xt = torch.from_numpy(x)
    state = to_arrays(model.state_dict())
    with torch.no_grad():
        first = trunk(xt)
        load_arrays(model, state)  # evaluation reloads the same global state: cache kept
        trunk(xt)
        assert (cache.stats.misses, cache.stats.hits, cache.stats.invalidations) == (N, N, 0)
        other = {k: v * 1.5 for k, v in state.items() if k.startswith(TRUNK_PREFIX)}
        load_arrays(model, other)
        changed = trunk(xt)
        assert cache.stats.invalidations == 1 and cache.stats.misses == 2 * N
        assert not torch.allclose(changed, first, rtol=1e-2, atol=0)
        fresh = frozen_model(0)
        load_arrays(fresh, other)
        torch.testing.assert_close(changed, fresh.global_part.trunk(xt))


@pytest.mark.parametrize("mode", ["federated", "local-finetune"])
def test_a_trunk_that_trains_never_caches(mode: str) -> None:
    model = frozen_model(mode=mode)
    assert cache_of(model.global_part.trunk) is None
    s = make_strategy("fedcoe", ModelConfig(**{**CAM, "trunk_mode": mode}), TrainConfig())  # type: ignore[arg-type]
    assert isinstance(s, FedCoE) and cache_of(s.model.global_part.trunk) is None


def test_the_cache_stands_aside_for_gradients_and_hooks() -> None:
    x, _ = samples(4)
    model, plain = frozen_model(), frozen_model(0)
    trunk = model.global_part.trunk
    cache = cache_of(trunk)
    assert cache is not None
    xt = torch.from_numpy(x)
    weight = next(trunk.parameters())
    weight.requires_grad_(True)  # gradients wanted through the trunk: not cached
    out = trunk(xt)
    assert out.requires_grad and len(cache) == 0 and cache.stats.bypassed == 4
    weight.requires_grad_(False)
    want = count_macs(plain.global_part.trunk, inputs=xt).macs
    with torch.no_grad():
        trunk(xt)  # cached now; count_macs hooks the trunk, so it still runs
    assert count_macs(trunk, inputs=xt).macs == want > 0
    copied = cache_of(copy.deepcopy(model).global_part.trunk)
    assert len(cache) == 4 and copied is not None and len(copied) == 0  # copies start empty
