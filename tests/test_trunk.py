"""Trunk modes: a pretrained trunk from a local file (hash and shapes checked), frozen (not
trained, not exchanged), local-finetune (trained, kept on the device); default unchanged."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.strategies import ClientData, ClientTask, make_strategy
from fedcoe_edge.strategies.fedcoe import FedCoE
from fedcoe_edge.training import build_model, to_arrays
from fedcoe_edge.trunk import TRUNK_PREFIX

CAM: dict[str, Any] = dict(input_shape=(3, 32, 32), trunk="mobilenet_v3_small", expert_kind="mlp",
           expert_hidden=16, num_global_experts=4, num_local_experts=1)
TRAIN = TrainConfig(local_epochs=1, batch_size=8, experts_per_client=2)


def trunk_file(tmp_path: Path, seed: int = 5,
               change: Callable[[dict[str, np.ndarray]], object] | None = None) -> tuple[str, str]:
    """A 'pretrained' trunk (the trunk of a model built from ``seed``) as safetensors."""
    model = build_model(ModelConfig(**CAM), seed)
    arrays = {k: v for k, v in to_arrays(model.state_dict()).items() if k.startswith(TRUNK_PREFIX)}
    if change is not None:
        change(arrays)
    path = tmp_path / f"trunk{seed}.safetensors"
    save_file(arrays, str(path))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def data(n: int = 16) -> ClientData:
    rng = np.random.default_rng(0)
    x = rng.random((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int64)
    return ClientData(x, y, x[:4], y[:4])


def trunk_of(state: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    assert state is not None
    return {k: v for k, v in state.items() if k.startswith(TRUNK_PREFIX)}


def fedcoe(cfg: ModelConfig) -> FedCoE:
    """``make_strategy("fedcoe", ...)``, typed as what it builds (the tests use its own methods)."""
    s = make_strategy("fedcoe", cfg, TRAIN)
    assert isinstance(s, FedCoE)
    return s


def test_default_config_and_exchange_unchanged() -> None:
    d = ModelConfig().to_dict()
    assert not any(k.startswith("trunk_") for k in d)  # cache keys and manifests as before
    s = fedcoe(ModelConfig(**CAM))
    state = s.initialize()
    assert set(s.params_for([0])) >= set(trunk_of(state))


def test_pretrained_trunk_is_loaded_after_its_hash_and_shapes_check(tmp_path: Path) -> None:
    path, digest = trunk_file(tmp_path)
    s = make_strategy("fedcoe", ModelConfig(**CAM, trunk_weights=path, trunk_sha256=digest), TRAIN)
    want = trunk_of(to_arrays(build_model(ModelConfig(**CAM), 5).state_dict()))
    got = trunk_of(s.initialize())
    assert sorted(got) == sorted(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    bad: list[tuple[dict[str, Any], str]] = [
        (dict(trunk_weights=path, trunk_sha256="0" * 64), "differs from model.trunk_sha256"),
        (dict(trunk_weights=str(tmp_path / "absent"), trunk_sha256=digest), "unreadable"),
        (dict(trunk_weights=path), "go together"),
    ]
    first = next(iter(want))
    wide, wide_digest = trunk_file(tmp_path, 6, lambda a: a.update({first: np.zeros((2, 2), np.float32)}))
    short, short_digest = trunk_file(tmp_path, 7, lambda a: a.pop(first))
    bad += [(dict(trunk_weights=wide, trunk_sha256=wide_digest), f"tensor '{first[len(TRUNK_PREFIX):]}' has shape"),
            (dict(trunk_weights=short, trunk_sha256=short_digest), "names do not match")]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            make_strategy("fedcoe", ModelConfig(**CAM, **extra), TRAIN)
    with pytest.raises(ConfigError, match="need a real trunk"):
        ModelConfig(trunk_mode="frozen")
    with pytest.raises(ConfigError, match="implemented for fedcoe"):
        make_strategy("fedavg", ModelConfig(**CAM, trunk_mode="frozen"), TRAIN)


def test_frozen_trunk_is_neither_trained_nor_exchanged(tmp_path: Path) -> None:
    path, digest = trunk_file(tmp_path)
    cfg = ModelConfig(**CAM, trunk_mode="frozen", trunk_weights=path, trunk_sha256=digest)
    s = fedcoe(cfg)
    state = s.initialize()
    trunk0 = trunk_of(state)
    sent = s.params_for([0, 1])
    assert trunk0 and not trunk_of(sent)  # not sent: the device holds the same file
    result, local = s.client_update(ClientTask("0", 1, sent, [0, 1]), None, data())
    assert not trunk_of(result.params) and not trunk_of(local)
    after = trunk_of(to_arrays(s.model.state_dict()))  # weights and BatchNorm statistics
    assert all(np.array_equal(after[k], trunk0[k]) for k in trunk0)
    new = s.aggregate_round(1, [result], [])
    assert all(np.array_equal(new[k], trunk0[k]) for k in trunk0)
    full = fedcoe(ModelConfig(**CAM))
    full.initialize()
    bytes_frozen = sum(v.nbytes for v in sent.values())
    bytes_full = sum(v.nbytes for v in full.params_for([0, 1]).values())
    assert bytes_frozen < 0.5 * bytes_full


def test_local_finetune_trains_the_trunk_and_keeps_it_on_the_device(tmp_path: Path) -> None:
    path, digest = trunk_file(tmp_path)
    cfg = ModelConfig(**CAM, trunk_mode="local-finetune", trunk_weights=path, trunk_sha256=digest)
    s = fedcoe(cfg)
    trunk0 = trunk_of(s.initialize())
    fresh = s.fresh_local_state("0")
    assert all(np.array_equal(fresh[k], trunk0[k]) for k in trunk0)  # starts pretrained
    sent = s.params_for([0, 1])
    assert not trunk_of(sent)
    result, local = s.client_update(ClientTask("0", 1, sent, [0, 1]), None, data())
    assert not trunk_of(result.params)
    mine = trunk_of(local)
    assert sorted(mine) == sorted(trunk0)
    assert any(not np.array_equal(mine[k], trunk0[k]) for k in trunk0)  # fine-tuned here
    new = s.aggregate_round(1, [result], [])
    assert all(np.array_equal(new[k], trunk0[k]) for k in trunk0)  # never averaged
