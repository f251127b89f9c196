"""Build a FedCoE device bundle: per-part ONNX files (int8 or fp32), fp32 copies, manifest.

Layout (docs/design.md section 7; the format is described in docs/bundle.md)::

    BUNDLE/manifest.json          format, version, opset, ModelConfig, K, M, top-k, parts
    BUNDLE/<part>.onnx            the deployed files (int8 when quantized)
    BUNDLE/fp32/<part>.onnx       fp32 parity copies (optional)
    BUNDLE/heads.onnx             the always-on parts as one graph (optional, faster runtime)
    BUNDLE/fused_dense.onnx       the dense single graph, fp32 (optional, for comparison)

The folder is assembled next to its destination and renamed into place, so a reader never
sees half a bundle; the manifest is written last inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.onnx_export import OPSET, export_bundle_graphs
from export.quantize import QuantizeOptions, QuantMode, quantize_part
from fedcoe_edge.bundle_format import (
    BUNDLE_FORMAT,
    FEDERATION_FIELD,
    FORMAT_VERSION,
    MANIFEST_NAME,
    VERSION_FIELD,
    sha256_hex,
)
from fedcoe_edge.bundle_io import pack_tar, read_bundle
from fedcoe_edge.bundle_sig import BundleKeys, sign_manifest
from fedcoe_edge.errors import BundleError, ConfigError
from fedcoe_edge.io import atomic_write_text
from fedcoe_edge.model import DualLevelMoE


def calibration_sample(x: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` distinct samples of ``x``, chosen reproducibly."""
    if len(x) == 0:
        raise ConfigError("calibration: the device has no training samples")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def _file_entry(root: Path, rel: str) -> dict[str, Any]:
    data = (root / rel).read_bytes()
    return {"file": rel, "sha256": sha256_hex(data), "bytes": len(data)}


def _prepare_destination(out: Path) -> None:
    """Refuse to replace anything that is not an earlier bundle (or empty)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / MANIFEST_NAME).is_file())):
        raise ConfigError(f"bundle output {out} exists and is not a bundle folder; "
                          "choose another path")


def build_bundle(model: DualLevelMoE, out: str | os.PathLike[str], *, calibration: np.ndarray,
                 held: Sequence[int] | None = None, options: QuantizeOptions | None = None,
                 include_fp32: bool = True, include_fused: bool = True, include_heads: bool = True,
                 meta: Mapping[str, Any] | None = None, opset: int = OPSET,
                 keys: BundleKeys | None = None, federation: str | None = None,
                 version: int = 0) -> dict[str, Any]:
    """Export, quantize and write a bundle for ``model``; returns the manifest.

    ``keys``: sign the manifest (HMAC with the device's federation key, or Ed25519 with a
    vendor's private key; docs/design.md, "Signed bundles"); None writes it unsigned.
    ``federation`` and ``version`` (the global model version the weights come from) are
    written into the manifest, so the signature covers them: a reader refuses another
    federation's bundle and, told a minimum, an older one (docs/bundle.md, "Versions and
    rollback").
    ``held``: the global experts the device gets (default all K). ``calibration``: samples of
    the device's own inputs, shape (N, *input_shape), used for static int8 and to choose a
    mode per part under ``QuantMode.AUTO``. ``include_heads``: also write ``heads.onnx``, the
    always-on parts (gates, shared and local experts) as one graph, which the runtime runs
    in one call instead of one per part (the separate files stay for parity and tools).
    """
    opts = options or QuantizeOptions()
    cfg = model.cfg
    held_ids = sorted(set(range(cfg.num_global_experts) if held is None else held))
    if not held_ids or any(not 0 <= k < cfg.num_global_experts for k in held_ids):
        raise ConfigError(f"held experts must be ids in [0, {cfg.num_global_experts}), got {held}")
    calib = np.ascontiguousarray(calibration, dtype=np.float32)
    if (calib.ndim != 1 + len(cfg.input_shape) or tuple(calib.shape[1:]) != cfg.input_shape
            or len(calib) == 0):
        raise ConfigError(f"calibration data must have shape (N, {', '.join(map(str, cfg.input_shape))}),"
                          f" got {calib.shape}")
    if federation is not None and (not isinstance(federation, str) or not federation):
        raise ConfigError(f"bundle federation must be a non-empty string, got {federation!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigError(f"bundle version must be an int >= 0, got {version!r}")
    out_dir = Path(out)
    _prepare_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    modes = {m: m.training for m in model.modules()}  # a training caller gets its modes back
    model.eval()
    try:
        with torch.no_grad():
            feats_calib = model.global_part.trunk(torch.from_numpy(calib)).numpy()
        return _build(model, out_dir, calib, feats_calib, held_ids, opts, include_fp32,
                      include_fused, include_heads, meta, opset, keys, (federation, version))
    finally:
        for m, mode in modes.items():
            m.training = mode


def _build(model: DualLevelMoE, out_dir: Path, calib: np.ndarray, feats_calib: np.ndarray,
           held_ids: list[int], opts: QuantizeOptions, include_fp32: bool, include_fused: bool,
           include_heads: bool, meta: Mapping[str, Any] | None, opset: int,
           keys: BundleKeys | None = None,
           release: tuple[str | None, int] = (None, 0)) -> dict[str, Any]:
    cfg = model.cfg
    quantized = opts.mode is not QuantMode.FP32
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        exported, fused_info, heads_info = export_bundle_graphs(
            model, work / "fp32", held_ids, include_fused=include_fused,
            include_heads=include_heads, opset=opset)
        parts: dict[str, dict[str, Any]] = {}
        to_write = dict(exported)
        if heads_info is not None:
            to_write["heads"] = heads_info
        for name, info in to_write.items():
            src = Path(str(info["path"]))
            rel = f"{name}.onnx"
            if quantized:
                inp = "x" if name == "trunk" else "feats"
                data = calib if name == "trunk" else feats_calib
                result = quantize_part(src, work / rel, inp, data, opts)
                entry = {**_file_entry(work, rel), "quantization": result.mode.value,
                         "quant_detail": result.to_dict()}
                entry["fp32"] = _file_entry(work, f"fp32/{rel}") if include_fp32 else None
            else:
                shutil.move(str(src), str(work / rel))
                entry = {**_file_entry(work, rel), "quantization": "fp32"}
                entry["fp32"] = {k: entry[k] for k in ("file", "sha256", "bytes")}
            parts[name] = {**entry, "inputs": info["inputs"], "outputs": info["outputs"]}
        heads = parts.pop("heads", None)
        if heads is not None:
            heads["parts"] = list(heads_info["parts"])  # type: ignore[index, arg-type]
        fused = None
        if fused_info is not None:
            shutil.move(str(fused_info["path"]), str(work / "fused_dense.onnx"))
            fused = {**_file_entry(work, "fused_dense.onnx"), "quantization": "fp32",
                     "inputs": fused_info["inputs"], "outputs": fused_info["outputs"],
                     "top_k": cfg.top_k}
        if not quantized or not include_fp32:
            shutil.rmtree(work / "fp32", ignore_errors=True)
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "created_by": "fedcoe-edge export",
            FEDERATION_FIELD: release[0],
            VERSION_FIELD: release[1],
            "opset": opset,
            "onnx_exporter": f"torch {torch.__version__} (torch.export / dynamo)",
            "model": cfg.to_dict(),
            "num_global_experts": cfg.num_global_experts,
            "num_local_experts": cfg.num_local_experts,
            "top_k": cfg.top_k,
            "input": {"name": "x", "shape": ["batch", *cfg.input_shape], "dtype": "float32"},
            "feat_shape": list(model.global_part.feat_shape),
            "held_experts": held_ids,
            "gate_outputs": "logits",
            "quantization": {**opts.to_dict(), "calibration_samples_used": int(len(calib))},
            "parts": parts,
            "heads": heads,
            "fused": fused,
            "meta": dict(meta or {}),
        }
        if keys is not None and keys.can_sign:
            manifest = sign_manifest(manifest, keys)
        atomic_write_text(work / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        read_bundle(work, keys=_verifier(keys))  # it must verify before it replaces anything
        _swap_into_place(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _verifier(keys: BundleKeys | None) -> BundleKeys | None:
    """The keys that verify what ``keys`` signs (a vendor's public half for Ed25519)."""
    if keys is None or keys.ed25519_private is None:
        return keys
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = ed25519.Ed25519PrivateKey.from_private_bytes(keys.ed25519_private).public_key()
    return BundleKeys(ed25519_public=public.public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw))


def _swap_into_place(work: Path, out_dir: Path) -> None:
    """Rename the finished folder over ``out_dir`` (an older bundle is removed after)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(work, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_tar(folder: str | os.PathLike[str], tar_path: str | os.PathLike[str] | None = None) -> Path:
    """The bundle as one ``.tar`` (default: next to the folder, ``<folder>.tar``)."""
    src = Path(folder)
    if not (src / MANIFEST_NAME).is_file():
        raise BundleError(f"{src} is not a bundle folder (no {MANIFEST_NAME})")
    return pack_tar(src, tar_path if tar_path is not None else src.with_name(src.name + ".tar"))


def bundle_sizes(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per part: deployed bytes, fp32 bytes (when known) and the quantization kept."""
    sizes: dict[str, dict[str, Any]] = {}
    for name, part in manifest["parts"].items():
        fp32 = part.get("fp32")
        sizes[name] = {"deployed_bytes": int(part["bytes"]), "quantization": part["quantization"],
                       "fp32_bytes": int(fp32["bytes"]) if fp32 else None}
    return sizes
