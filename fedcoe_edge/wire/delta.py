"""int8 weight deltas: an update as one int8 code per element against a base both sides hold.

Part of :mod:`fedcoe_edge.wire`: one float32 scale per tensor (error at most half a step),
integer and bool tensors carried verbatim; the result is encoded by :mod:`.codec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedcoe_edge.errors import ValidationError, WireError

# Payload keys of a compressed delta: "q:<name>" int8 codes, "s:<name>" float32 scale,
# "r:<name>" the new value verbatim (integer/bool tensors). The prefix is fixed-length,
# so any tensor name (dots, slashes, colons) maps back unambiguously.
_Q, _S, _R = "q:", "s:", "r:"
_DELTA_FORMAT_KEY = "fedcoe.delta"
_DELTA_FORMAT = "int8-per-tensor-v1"


def is_compressed_delta(payload: Mapping[str, np.ndarray]) -> bool:
    """True when every key carries a compressed-delta prefix (vs. plain weights)."""
    return bool(payload) and all(k[:2] in (_Q, _S, _R) for k in payload)


def compress_delta(
    new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Encode ``new`` as an int8 delta against ``base`` (what both sides already hold).

    Float tensors: ``d = new - base`` in float32, ``scale = max|d| / 127``,
    ``q = round(d / scale)`` as int8. Per element, the reconstruction error is at most
    ``scale / 2`` (= ``max|d| / 254``) plus float32 rounding of ``base + q*scale``.
    Integer and bool tensors are carried verbatim (lossless). The result is a plain
    tensor dict: feed it to :func:`encode_tensors`.
    """
    _same_keys_and_shapes(new, base, "compress_delta")
    out: dict[str, np.ndarray] = {}
    for name, n in new.items():
        b = base[name]
        if np.issubdtype(n.dtype, np.floating):
            d = n.astype(np.float32) - b.astype(np.float32)
            if not np.all(np.isfinite(d)):
                raise ValidationError(f"compress_delta: tensor {name!r} has non-finite values")
            amax = float(np.max(np.abs(d))) if d.size else 0.0
            scale = np.float32(amax / 127.0)
            if scale > 0:
                q = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
            else:
                q = np.zeros(d.shape, dtype=np.int8)
            out[_Q + name] = q
            out[_S + name] = np.array([scale], dtype=np.float32)
        else:
            out[_R + name] = n.copy(order="C")
    return out


def compressed_delta_metadata() -> dict[str, str]:
    """Metadata to pass to :func:`encode_tensors` so receivers can tell the format."""
    return {_DELTA_FORMAT_KEY: _DELTA_FORMAT}


def decompress_delta(
    payload: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Rebuild full tensors from :func:`compress_delta` output and the same ``base``.

    Each result has the base tensor's dtype. A payload that does not cover exactly the
    base keys, or whose shapes/dtypes disagree, raises :class:`ValidationError` naming
    the tensor; a structurally malformed payload raises :class:`WireError`.
    """
    names: set[str] = set()
    for key in payload:
        prefix, name = key[:2], key[2:]
        if prefix not in (_Q, _S, _R) or not name:
            raise WireError(f"decompress_delta: unexpected payload key {key!r}")
        if prefix != _S:
            if name in names:
                raise WireError(f"decompress_delta: tensor {name!r} appears twice")
            names.add(name)
    missing = sorted(set(base) - names)
    if missing:
        raise ValidationError(f"decompress_delta: tensor {missing[0]!r} missing from the update")
    extra = sorted(names - set(base))
    if extra:
        raise ValidationError(f"decompress_delta: unexpected tensor {extra[0]!r} (not in base)")
    out: dict[str, np.ndarray] = {}
    for name, b in base.items():
        if _R + name in payload:
            r = payload[_R + name]
            if r.shape != b.shape or r.dtype != b.dtype:
                raise ValidationError(
                    f"decompress_delta: tensor {name!r} is {r.dtype}{list(r.shape)}, expected {b.dtype}{list(b.shape)}"
                )
            out[name] = np.array(r, copy=True)
            continue
        q = payload[_Q + name]
        s = payload.get(_S + name)
        if s is None or s.shape != (1,) or s.dtype != np.float32:
            raise WireError(f"decompress_delta: tensor {name!r} lacks a float32 scale of shape [1]")
        if q.dtype != np.int8:
            raise WireError(f"decompress_delta: tensor {name!r} codes are {q.dtype}, expected int8")
        if q.shape != b.shape:
            raise ValidationError(
                f"decompress_delta: tensor {name!r} has shape {list(q.shape)}, expected {list(b.shape)}"
            )
        if not np.issubdtype(b.dtype, np.floating):
            raise ValidationError(
                f"decompress_delta: tensor {name!r} is int8-coded but base is {b.dtype}"
            )
        scale = float(s[0])
        if not math.isfinite(scale) or scale < 0:
            raise ValidationError(f"decompress_delta: tensor {name!r} has invalid scale {scale}")
        rebuilt = b.astype(np.float32) + q.astype(np.float32) * np.float32(scale)
        out[name] = rebuilt.astype(b.dtype)
    return out


def _same_keys_and_shapes(
    new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], where: str
) -> None:
    missing = sorted(set(base) - set(new))
    if missing:
        raise ValidationError(f"{where}: tensor {missing[0]!r} missing from new weights")
    extra = sorted(set(new) - set(base))
    if extra:
        raise ValidationError(f"{where}: tensor {extra[0]!r} not in base")
    for name, n in new.items():
        b = base[name]
        if n.shape != b.shape:
            raise ValidationError(
                f"{where}: tensor {name!r} has shape {list(n.shape)}, base {list(b.shape)}"
            )
        if n.dtype != b.dtype:
            raise ValidationError(f"{where}: tensor {name!r} is {n.dtype}, base is {b.dtype}")
