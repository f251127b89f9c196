"""Reading, verifying and packing a bundle on disk (a folder or one ``.tar``).

Everything a reader must check before trusting a bundle, in order: the manifest's
signature (:mod:`fedcoe_edge.bundle_sig`), its schema and version
(:mod:`fedcoe_edge.bundle_format`), then every listed file's sha256. Used by the device
runtime (:mod:`fedcoe_edge.runtime`) to load a bundle and by the exporter to check the one
it wrote before it replaces anything. No torch, no onnxruntime.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcoe_edge.bundle_format import (
    MANIFEST_NAME,
    file_owners,
    listed_files,
    safe_relpath,
    sha256_hex,
    validate_manifest,
)
from fedcoe_edge.bundle_sig import BundleKeys, verify_manifest
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import BundleError


@dataclass
class BundleContents:
    """A verified bundle in memory: manifest, its config, the bytes of every listed file."""

    manifest: dict[str, Any]
    cfg: ModelConfig
    files: dict[str, bytes]
    root: Path | None  # the folder it came from; None for a .tar (swaps then stay in memory)


def _read_tar(path: Path, check_manifest: Callable[[bytes], Any]) -> dict[str, bytes]:
    """Every regular file of a ``.tar`` bundle; ``check_manifest(manifest bytes)`` runs
    before any other member's bytes are read (a bad signature reads no part)."""
    import tarfile  # only for .tar bundles: its compression modules cost RAM on a device

    out: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            members = []
            for member in tar.getmembers():  # headers only
                if member.isdir():
                    continue
                if not member.isfile():
                    raise BundleError(f"bundle {path}: member {member.name!r} is not a regular file")
                name = safe_relpath(member.name.removeprefix("./"), f"bundle {path}")
                members.append((name, member))
            members.sort(key=lambda nm: nm[0] != MANIFEST_NAME)  # the manifest first
            if not members or members[0][0] != MANIFEST_NAME:
                raise BundleError(f"bundle {path}: archive has no {MANIFEST_NAME}")
            for name, member in members:
                fobj = tar.extractfile(member)
                if fobj is None:  # pragma: no cover - isfile() members always have data
                    raise BundleError(f"bundle {path}: cannot read member {name!r}")
                out[name] = fobj.read()
                if name == MANIFEST_NAME:
                    check_manifest(out[name])
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"bundle {path}: unreadable tar archive: {exc}") from None
    return out


def _parse_manifest(raw: bytes, root: Path, keys: BundleKeys | None) -> dict[str, Any]:
    """The manifest's JSON, its signature verified (before anything in it is used)."""
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST_NAME} is not valid JSON: {exc}") from None
    verify_manifest(manifest, keys, f"bundle {root}")
    return manifest


def read_bundle(path: str | os.PathLike[str],
                keep: Callable[[Mapping[str, Any]], set[str]] | None = None, *,
                keys: BundleKeys | None = None) -> BundleContents:
    """Read and verify a bundle folder or ``.tar``: signature, schema, version, presence, hashes.

    The manifest's signature is checked first, against ``keys`` (given a key, an unsigned
    manifest is refused), before anything in it is used or any part file is opened.

    Nothing is handed to onnxruntime here; a caller gets either a fully verified bundle or
    one BundleError naming the first problem (the part and the file). ``keep(manifest)``
    names the files whose bytes the caller needs: every file is still checked, the others
    are dropped once hashed (a runtime need not hold fp32 copies it will not load).
    """
    root = Path(path)
    if root.is_dir():
        mpath = root / MANIFEST_NAME
        if not mpath.is_file():
            raise BundleError(f"bundle {root}: no {MANIFEST_NAME}")
        manifest = _parse_manifest(mpath.read_bytes(), root, keys)
        tar_files: dict[str, bytes] | None = None
    elif root.is_file():
        tar_files = _read_tar(root, lambda raw: _parse_manifest(raw, root, keys))
        manifest = json.loads(tar_files[MANIFEST_NAME])  # verified as it was read
    else:
        raise BundleError(f"bundle {root}: no such folder or .tar file")
    cfg = validate_manifest(manifest)
    owners = file_owners(manifest)
    wanted = keep(manifest) if keep is not None else None
    files: dict[str, bytes] = {}
    for rel, digest in listed_files(manifest).items():
        if tar_files is not None:
            if rel not in tar_files:
                raise BundleError(f"bundle {root}: {owners[rel]} file {rel} is missing")
            data = tar_files[rel]
        else:
            fpath = root / rel
            if not fpath.is_file():
                raise BundleError(f"bundle {root}: {owners[rel]} file {rel} is missing")
            data = fpath.read_bytes()
        actual = sha256_hex(data)
        if actual != digest:
            raise BundleError(f"bundle {root}: {owners[rel]} file {rel} fails its sha256 check "
                              f"(manifest {digest[:12]}..., file {actual[:12]}...)")
        if wanted is None or rel in wanted:
            files[rel] = data
        del data
    return BundleContents(manifest, cfg, files, root if tar_files is None else None)


def pack_tar(folder: str | os.PathLike[str], tar_path: str | os.PathLike[str]) -> Path:
    """Write a verified bundle folder as one uncompressed ``.tar`` (manifest first)."""
    import tarfile

    contents = read_bundle(folder)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        items = [(MANIFEST_NAME, (Path(folder) / MANIFEST_NAME).read_bytes())]
        items += sorted(contents.files.items())
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    out = Path(tar_path)
    from fedcoe_edge.io import atomic_write_bytes  # tempfile: only when writing

    atomic_write_bytes(out, buf.getvalue())
    return out
