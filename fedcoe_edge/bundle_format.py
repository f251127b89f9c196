"""The FedCoE bundle format: file names, format version, manifest schema and its validation.

One definition for both sides of a bundle (docs/design.md, section 7; the layout is in
docs/bundle.md): the exporter (:mod:`export.bundle`) writes what is defined here, and the
device (:mod:`fedcoe_edge.bundle_io`, :mod:`fedcoe_edge.runtime`) refuses whatever does not
validate against it. Imports neither torch nor onnxruntime, so both sides can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from fedcoe_edge.bundle_sig import sha256 as _sha256
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import BundleError, ConfigError

BUNDLE_FORMAT = "fedcoe-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUANTIZATIONS = ("fp32", "static_int8", "dynamic_int8", "unknown")
# the release fields (docs/bundle.md, "Versions and rollback"): which federation the bundle
# belongs to and how new its model is. Both sit in the manifest, so a signature covers them.
FEDERATION_FIELD = "federation"
VERSION_FIELD = "version"


class RollbackError(BundleError):
    """A bundle older than the reader's minimum version, or of another federation: a signed
    bundle that is genuine but must not replace what the reader already runs."""


def release_of(manifest: Mapping[str, Any]) -> tuple[str | None, int]:
    """The manifest's (federation, version); a manifest written before the release fields
    existed is (None, 0): older than anything versioned, of no federation."""
    fed = manifest.get(FEDERATION_FIELD)
    version = manifest.get(VERSION_FIELD, 0)
    if fed is not None and (not isinstance(fed, str) or not fed):
        raise BundleError(f"manifest: {FEDERATION_FIELD} must be a non-empty string or null, "
                          f"got {fed!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BundleError(f"manifest: {VERSION_FIELD} must be an int >= 0, got {version!r}")
    return fed, version


def check_release(manifest: Mapping[str, Any], where: str, *, min_version: int = 0,
                  federation: str | None = None, floor_from: str = "this reader's minimum") -> None:
    """Refuse a rollback or a bundle of another federation (one :class:`RollbackError`).

    Runs right after the signature check and before any part file is read. A signature
    alone cannot stop a rollback: an old bundle signed with the same key is still genuine,
    so the reader has to know the lowest version it may accept (``min_version``; an agent's
    is the highest it accepted before) and which federation it belongs to. ``floor_from``
    names where ``min_version`` came from, for the refusal.
    """
    fed, version = release_of(manifest)
    if federation is not None and fed != federation:
        named = "names no federation" if fed is None else f"is of federation {fed!r}"
        raise RollbackError(f"{where}: bundle {named}, this reader accepts federation "
                            f"{federation!r} only")
    if version < min_version:
        raise RollbackError(f"{where}: bundle version {version} is older than version "
                            f"{min_version} ({floor_from}): refused as a rollback")

def class_names_of(manifest: Mapping[str, Any], num_classes: int) -> list[str] | None:
    """The federation's class names carried in the manifest's meta (label i = names[i]), or
    None when the bundle has none or a list that does not fit the model's output."""
    names = (manifest.get("meta") or {}).get("classes")
    if (isinstance(names, list) and len(names) == num_classes
            and all(isinstance(n, str) for n in names)):
        return list(names)
    return None


def sha256_hex(data: bytes) -> str:
    return _sha256(data).hexdigest()


def sha256_fd(fd: int) -> str:
    """Hex sha256 of an open file, read to its end 1 MiB at a time: a reader hashes the very
    descriptor it then hands on, so what was checked is what gets loaded."""
    digest = _sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def part_names(cfg: ModelConfig, held: Sequence[int]) -> list[str]:
    """The parts a bundle for ``cfg`` holding global experts ``held`` must contain, in run order."""
    names = [] if cfg.trunk == "identity" else ["trunk"]
    names.append("global_gate")
    if cfg.shared_expert:
        names.append("expert_shared")
    names += [f"expert_g{k}" for k in sorted(held)]
    if cfg.num_local_experts > 0:
        names.append("local_gate")
        names += [f"expert_l{j}" for j in range(cfg.num_local_experts)]
    return names


def feat_shape_of(manifest: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in manifest["feat_shape"])


def safe_relpath(name: Any, where: str) -> str:
    """A bundle-relative POSIX path with no absolute part or '..' (no escaping the bundle)."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"{where}: file name must be a non-empty string, got {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        raise BundleError(f"{where}: file name {name!r} escapes the bundle")
    return str(p)


def _req(d: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, Mapping) or key not in d:
        raise BundleError(f"manifest: {where} is missing {key!r}")
    value = d[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise BundleError(f"manifest: {where}.{key} has the wrong type ({type(value).__name__})")
    return value


def _check_file_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, Mapping):
        raise BundleError(f"manifest: {where} must be an object")
    safe_relpath(_req(entry, "file", str, where), where)
    digest = _req(entry, "sha256", str, where)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BundleError(f"manifest: {where}.sha256 is not a lowercase sha256 hex digest")
    _req(entry, "bytes", int, where)


def _check_io(specs: Any, where: str) -> None:
    if not isinstance(specs, list) or not specs:
        raise BundleError(f"manifest: {where} must be a non-empty list")
    for i, spec in enumerate(specs):
        _req(spec, "name", str, f"{where}[{i}]")
        _req(spec, "shape", list, f"{where}[{i}]")
        _req(spec, "dtype", str, f"{where}[{i}]")


def validate_manifest(manifest: Any) -> ModelConfig:
    """Schema, version and consistency checks; returns the bundle's ModelConfig."""
    if not isinstance(manifest, dict):
        raise BundleError("manifest: top level must be a JSON object")
    fmt = manifest.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"manifest: format is {fmt!r}, expected {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"manifest: unknown format_version {version!r} "
                          f"(this runtime reads version {FORMAT_VERSION})")
    try:
        cfg = ModelConfig.from_dict(_req(manifest, "model", dict, "top level"), check_names=False)
    except (ConfigError, TypeError) as exc:
        raise BundleError(f"manifest: invalid model config: {exc}") from None
    for key, want in (("num_global_experts", cfg.num_global_experts),
                      ("num_local_experts", cfg.num_local_experts), ("top_k", cfg.top_k)):
        got = _req(manifest, key, int, "top level")
        if got != want:
            raise BundleError(f"manifest: {key}={got} disagrees with the model config ({want})")
    _req(manifest, "opset", int, "top level")
    release_of(manifest)
    feat = _req(manifest, "feat_shape", list, "top level")
    if not feat or not all(isinstance(d, int) and d > 0 for d in feat):
        raise BundleError(f"manifest: feat_shape must be positive ints, got {feat!r}")
    held = _req(manifest, "held_experts", list, "top level")
    if (not held or len(set(held)) != len(held)
            or not all(isinstance(k, int) and 0 <= k < cfg.num_global_experts for k in held)):
        raise BundleError(f"manifest: held_experts must be distinct ids in [0, "
                          f"{cfg.num_global_experts}), got {held!r}")
    parts = _req(manifest, "parts", dict, "top level")
    expected = part_names(cfg, held)
    missing = [n for n in expected if n not in parts]
    extra = sorted(set(parts) - set(expected))
    if missing or extra:
        raise BundleError(f"manifest: parts do not match the model (missing {missing}, "
                          f"unexpected {extra})")
    for name in expected:
        part = parts[name]
        _check_file_entry(part, f"parts.{name}")
        q = _req(part, "quantization", str, f"parts.{name}")
        if q not in QUANTIZATIONS:
            raise BundleError(f"manifest: parts.{name}.quantization {q!r} not in {QUANTIZATIONS}")
        _check_io(part.get("inputs"), f"parts.{name}.inputs")
        _check_io(part.get("outputs"), f"parts.{name}.outputs")
        if part.get("fp32") is not None:
            _check_file_entry(part["fp32"], f"parts.{name}.fp32")
    heads = manifest.get("heads")
    if heads is not None:
        _check_file_entry(heads, "heads")
        _check_io(heads.get("inputs"), "heads.inputs")
        _check_io(heads.get("outputs"), "heads.outputs")
        merged = heads.get("parts")
        always = [n for n in expected if n != "trunk" and not n.startswith("expert_g")]
        if merged != always:
            raise BundleError(f"manifest: heads.parts must be the always-on parts {always}, "
                              f"got {merged!r}")
        if [o["name"] for o in heads["outputs"]] != merged:
            raise BundleError("manifest: heads.outputs must be named after heads.parts, in order")
        if heads.get("fp32") is not None:
            _check_file_entry(heads["fp32"], "heads.fp32")
    fused = manifest.get("fused")
    if fused is not None:
        _check_file_entry(fused, "fused")
        _check_io(fused.get("inputs"), "fused.inputs")
        _check_io(fused.get("outputs"), "fused.outputs")
    return cfg


def listed_files(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Every file the manifest lists -> its expected sha256."""
    files: dict[str, str] = {}
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for name, part in manifest["parts"].items():
        entries.append((f"parts.{name}", part))
        if part.get("fp32") is not None:
            entries.append((f"parts.{name}.fp32", part["fp32"]))
    heads = manifest.get("heads")
    if heads is not None:
        entries.append(("heads", heads))
        if heads.get("fp32") is not None:
            entries.append(("heads.fp32", heads["fp32"]))
    if manifest.get("fused") is not None:
        entries.append(("fused", manifest["fused"]))
    for _, entry in entries:
        files[safe_relpath(entry["file"], "manifest")] = entry["sha256"]
    return files


def file_owners(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Every listed file -> what it is, for error messages (\"part 'expert_g1'\", ...)."""
    owners: dict[str, str] = {}
    for name, part in manifest["parts"].items():
        owners[part["file"]] = f"part '{name}'"
        if part.get("fp32") is not None:
            owners.setdefault(part["fp32"]["file"], f"part '{name}' (fp32)")
    heads = manifest.get("heads")
    if heads is not None:
        owners[heads["file"]] = "merged heads"
        if heads.get("fp32") is not None:
            owners.setdefault(heads["fp32"]["file"], "merged heads (fp32)")
    if manifest.get("fused") is not None:
        owners[manifest["fused"]["file"]] = "fused graph"
    return owners
