"""Weight codec: named numpy arrays as safetensors bytes, never pickle.

Part of :mod:`fedcoe_edge.wire`: what experts and updates travel as, and the strict parse
a receiver does before anything else reads the bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np
import safetensors.numpy as st_numpy
from safetensors import SafetensorError

from fedcoe_edge.errors import WireError

_CODEC_DTYPES = frozenset(
    np.dtype(t)
    for t in (
        np.float16, np.float32, np.float64,
        np.int8, np.int16, np.int32, np.int64,
        np.uint8, np.uint16, np.uint32, np.uint64,
        np.bool_,
    )
)  # fmt: skip


def encode_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialize named arrays to safetensors bytes (data only: nothing executable)."""
    prepared: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if not isinstance(name, str) or not name:
            raise WireError(f"encode_tensors: tensor names must be non-empty strings, got {name!r}")
        if not isinstance(arr, np.ndarray):
            raise WireError(
                f"encode_tensors: tensor {name!r} is {type(arr).__name__}, not a numpy array"
            )
        if arr.dtype not in _CODEC_DTYPES:
            raise WireError(f"encode_tensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        # safetensors reads raw memory from the data pointer: it must be contiguous.
        prepared[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    meta = None
    if metadata is not None:
        meta = {}
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise WireError("encode_tensors: metadata keys and values must be strings")
            meta[k] = v
    return st_numpy.save(prepared, metadata=meta)


def decode_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into writable arrays; malformed input raises WireError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"decode_tensors: expected bytes, got {type(data).__name__}")
    try:
        loaded = st_numpy.load(bytes(data))
    except (SafetensorError, KeyError, ValueError) as exc:
        raise WireError(f"decode_tensors: not a valid safetensors payload ({exc})") from None
    out: dict[str, np.ndarray] = {}
    for name, arr in loaded.items():
        if arr.dtype not in _CODEC_DTYPES:
            raise WireError(f"decode_tensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        out[name] = arr.copy()  # frombuffer views are read-only and pin the whole payload
    return out


def decode_tensor_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors payload (empty when absent)."""
    if len(data) < 8:
        raise WireError("decode_tensor_metadata: payload shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8 or n > 100 * 1024 * 1024:
        raise WireError(f"decode_tensor_metadata: header length {n} exceeds payload size")
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"decode_tensor_metadata: header is not JSON ({exc})") from None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise WireError("decode_tensor_metadata: __metadata__ must map strings to strings")
    return dict(meta)
