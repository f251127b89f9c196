"""Trunk handling: pretrained weights from a local file, frozen or privately fine-tuned.

On the camera-size model the MobileNetV3-Small trunk is most of what a device would train
and send each round (docs/design.md, "Trunk modes"). ``ModelConfig.trunk_mode`` decides:

* ``federated`` (default): trained on every device and averaged like the gate, as always;
* ``frozen``: never trained, never exchanged; it stays in eval mode (BatchNorm statistics
  fixed) so every device computes the same features as the coordinator;
* ``local-finetune``: trained on each device and kept there with the private level.

``trunk_weights`` names a safetensors file of pretrained trunk weights (e.g. a trunk the
coordinator pretrained on a public dataset and shipped once with the device image or its
bundle); it is loaded only after its sha256 matches ``trunk_sha256``, and its names and
shapes must be exactly the trunk's. No download, no pickle.
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import ConfigError

TRUNK_PREFIX = "global.trunk."


def exchanged(cfg: ModelConfig, name: str) -> bool:
    """Whether the state entry ``name`` travels between devices and the coordinator."""
    return cfg.trunk_mode == "federated" or not name.startswith(TRUNK_PREFIX)


def kept_locally(cfg: ModelConfig, name: str) -> bool:
    """Whether ``name`` is part of a device's private state (the local level, and the trunk
    under ``local-finetune``)."""
    return name.startswith("local.") or (cfg.trunk_mode == "local-finetune"
                                         and name.startswith(TRUNK_PREFIX))


def read_trunk_file(cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The pretrained trunk's arrays, names without the ``global.trunk.`` prefix; the file's
    sha256 is checked before it is parsed."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(cfg.trunk_weights)
    where = f"model.trunk_weights {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: unreadable: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != cfg.trunk_sha256:
        raise ConfigError(f"{where}: sha256 {digest[:12]}... differs from model.trunk_sha256 "
                          f"{cfg.trunk_sha256[:12]}... (not the trunk this federation uses)")
    try:
        arrays = load(data)
    except (SafetensorError, ValueError) as exc:
        raise ConfigError(f"{where}: not a safetensors file: {exc}") from None
    return {k.removeprefix(TRUNK_PREFIX): v for k, v in arrays.items()}


def load_trunk_weights(trunk: Any, cfg: ModelConfig) -> None:
    """Copy the pretrained file into ``trunk`` (a torch module); names and shapes must match
    exactly, checked for every tensor before any is copied."""
    import torch

    arrays = read_trunk_file(cfg)
    own = trunk.state_dict()
    where = f"model.trunk_weights {cfg.trunk_weights}"
    missing, extra = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
    if missing or extra:
        raise ConfigError(f"{where}: names do not match the {cfg.trunk} trunk (missing "
                          f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                          f"{extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name, value in arrays.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise ConfigError(f"{where}: tensor {name!r} has shape {list(value.shape)}, the "
                              f"{cfg.trunk} trunk's is {list(own[name].shape)}")
    with torch.no_grad():
        for name, value in arrays.items():
            own[name].copy_(torch.from_numpy(np.asarray(value)).to(own[name].dtype))


def _stay_in_eval(self: Any, mode: bool = True) -> Any:
    """``train()`` of a frozen trunk: it stays in eval mode (fixed BatchNorm statistics)."""
    type(self).train(self, False)
    return self


def freeze(trunk: Any) -> None:
    """No gradients and eval mode for good, whatever the model around it is set to."""
    for p in trunk.parameters():
        p.requires_grad_(False)
    trunk.train = types.MethodType(_stay_in_eval, trunk)
    trunk.eval()


def prepare_trunk(model: Any, cfg: ModelConfig) -> None:
    """Apply ``cfg``'s trunk options to a freshly built DualLevelMoE (no-op by default)."""
    trunk = model.global_part.trunk
    if cfg.trunk_weights:
        load_trunk_weights(trunk, cfg)
    if cfg.trunk_mode == "frozen":
        freeze(trunk)
        from fedcoe_edge.feature_cache import install_cache  # features computed once per sample

        install_cache(trunk, cfg.trunk_cache_mb << 20)
