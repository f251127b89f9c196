"""Checkpoints as safetensors files plus a JSON description; never pickle.

Layout of ``DIR/checkpoints/<algorithm>/``:

* ``model.json``: the network's ModelConfig, algorithm, seed, global version, metadata;
* ``global.safetensors``: the global state (``global.*`` names);
* ``client_<id>.safetensors``: one client's private state (``local.*`` names), if any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import DataError
from fedcoe_edge.io import atomic_write_bytes, atomic_write_text
from fedcoe_edge.strategies.base import Arrays, Strategy


def save_arrays(path: Path, arrays: Arrays, metadata: dict[str, str] | None = None) -> None:
    data = st_save({k: np.require(v, requirements="C") for k, v in arrays.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_arrays_file(path: Path) -> Arrays:
    """Read a safetensors file; a missing or corrupt file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint file not found: {path}")
    try:
        return dict(st_load(path.read_bytes()))
    except (SafetensorError, ValueError) as exc:
        raise DataError(f"corrupt safetensors file {path}: {exc}") from None


def save_run_checkpoints(folder: Path, strategy: Strategy, local_states: dict[str, Arrays | None],
                         meta: dict[str, Any]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_arrays(folder / "global.safetensors", strategy.global_state)
    for cid, state in local_states.items():
        if state:
            save_arrays(folder / f"client_{cid}.safetensors", state)
    doc = {"model": strategy.network_cfg.to_dict(), "version": strategy.version,
           "clients": sorted(c for c, s in local_states.items() if s), **meta}
    affinity = getattr(strategy, "affinity", None)
    if affinity:
        doc["affinity"] = {c: np.asarray(r).round(6).tolist() for c, r in sorted(affinity.items())}
    assignment = getattr(strategy, "assignment", None)
    if assignment:  # the experts each client holds (what its local level was trained with)
        doc["experts"] = {c: [int(k) for k in ids] for c, ids in sorted(assignment.items())}
    atomic_write_text(folder / "model.json", json.dumps(doc, indent=2) + "\n")


def load_checkpoint(folder: Path, client_id: str | None = None) -> tuple[ModelConfig, Arrays, Arrays | None, dict]:
    """ModelConfig, global state, the client's local state (if asked and present), model.json."""
    folder = Path(folder)
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise DataError(f"no model.json in checkpoint folder {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable {meta_path}: {exc}") from None
    global_state = load_arrays_file(folder / "global.safetensors")
    local = None
    if client_id is not None:
        local = load_arrays_file(folder / f"client_{client_id}.safetensors")
    return cfg, global_state, local, meta
