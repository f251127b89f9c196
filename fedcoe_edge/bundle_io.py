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
    RollbackError,
    check_release,
    file_owners,
    listed_files,
    release_of,
    safe_relpath,
    sha256_hex,
    validate_manifest,
)
from fedcoe_edge.bundle_sig import BundleKeys, verify_manifest
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import BundleError, ConfigError


@dataclass
class BundleContents:
    """A verified bundle in memory: manifest, its config, the bytes of every listed file."""

    manifest: dict[str, Any]
    cfg: ModelConfig
    files: dict[str, bytes]
    root: Path | None  # the folder it came from; None for a .tar (swaps then stay in memory)
    verified_by: str | None = None  # the signature algorithm that verified; None: unauthenticated


@dataclass(frozen=True)
class ReleaseCheck:
    """What a reader demands of a bundle's release fields besides its signature:
    ``min_version`` (refuse anything older: a rollback), ``federation`` (refuse another
    federation's or an unnamed bundle; None: any) and ``floor_from``, where the minimum
    came from, named in a refusal. See :func:`fedcoe_edge.bundle_format.check_release`."""

    min_version: int = 0
    federation: str | None = None
    floor_from: str = "this reader's minimum"

    def __post_init__(self) -> None:
        if (not isinstance(self.min_version, int) or isinstance(self.min_version, bool)
                or self.min_version < 0):
            raise ConfigError(f"minimum bundle version must be an int >= 0, got {self.min_version!r}")
        if self.federation is not None and (not isinstance(self.federation, str)
                                            or not self.federation):
            raise ConfigError(f"bundle federation must be a non-empty string, got {self.federation!r}")


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


def _parse_manifest(raw: bytes, root: Path, keys: BundleKeys | None,
                    release: ReleaseCheck | None) -> tuple[dict[str, Any], str | None]:
    """The manifest's JSON, its signature verified (before anything in it is used), then
    its release fields checked against ``release``; also the algorithm that verified it."""
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"bundle {root}: {MANIFEST_NAME} is not valid JSON: {exc}") from None
    alg = verify_manifest(manifest, keys, f"bundle {root}")
    if release is not None:
        check_release(manifest, f"bundle {root}", min_version=release.min_version,
                      federation=release.federation, floor_from=release.floor_from)
    return manifest, alg


def read_bundle(path: str | os.PathLike[str],
                keep: Callable[[Mapping[str, Any]], set[str]] | None = None, *,
                keys: BundleKeys | None = None,
                release: ReleaseCheck | None = None) -> BundleContents:
    """Read and verify a bundle folder or ``.tar``: signature, release, schema, presence, hashes.

    The manifest's signature is checked first, against ``keys`` (given a key, an unsigned
    manifest is refused), then its federation and version against ``release`` (a
    :class:`~fedcoe_edge.bundle_format.RollbackError` for an older or foreign bundle), before
    anything else in it is used or any part file is opened.

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
        manifest, alg = _parse_manifest(mpath.read_bytes(), root, keys, release)
        tar_files: dict[str, bytes] | None = None
    elif root.is_file():
        verified: list[str | None] = []
        tar_files = _read_tar(root, lambda raw: verified.append(
            _parse_manifest(raw, root, keys, release)[1]))
        manifest = json.loads(tar_files[MANIFEST_NAME])  # verified as it was read
        alg = verified[0]
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
    return BundleContents(manifest, cfg, files, root if tar_files is None else None, alg)


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


class VersionFloor:
    """The highest bundle version a device accepted, kept in one small JSON file in its state
    folder so that it survives restarts (docs/bundle.md, "Versions and rollback").

    A device refuses any bundle older than this, and a bundle of another federation than
    the one the floor was recorded for. The file is replaced atomically; it never goes
    down. A file that cannot be read is a ConfigError (refuse everything rather than
    forget the floor: deleting the file is the operator's explicit reset).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def read(self) -> tuple[str | None, int]:
        """(federation, version) accepted so far; (None, 0) before the first."""
        if not self.path.exists():
            return None, 0
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            fed, version = doc.get("federation"), doc["version"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"bundle version floor {self.path} is unreadable ({exc}); remove it "
                              "to accept bundles of any version again") from None
        if (not isinstance(version, int) or isinstance(version, bool) or version < 0
                or (fed is not None and not isinstance(fed, str))):
            raise ConfigError(f"bundle version floor {self.path} holds version {version!r}, "
                              f"federation {fed!r}; remove it to accept any version again")
        return fed, version

    def check(self, federation: str) -> ReleaseCheck:
        """What a bundle of ``federation`` must satisfy to be accepted now."""
        _, version = self.read()
        return ReleaseCheck(min_version=version, federation=federation,
                            floor_from=f"the highest this device accepted, kept in {self.path}")

    def record(self, manifest: Mapping[str, Any]) -> int:
        """Raise the floor to an accepted bundle's version (never lower it); returns it."""
        from fedcoe_edge.io import atomic_write_text  # tempfile: only when writing

        fed, version = release_of(manifest)
        old_fed, old = self.read()
        if old_fed is not None and fed != old_fed:
            raise RollbackError(f"bundle of federation {fed!r} recorded against the floor of "
                                f"federation {old_fed!r} in {self.path}")
        if version > old or not self.path.exists():
            atomic_write_text(self.path, json.dumps({"federation": fed, "version": version}) + "\n")
        return max(version, old)
