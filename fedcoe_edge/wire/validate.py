"""The schema gate every received update passes before a strategy sees it.

Part of :mod:`fedcoe_edge.wire`: keys, shapes, dtypes, finite values and a norm bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcoe_edge.errors import ValidationError

# The default bound on the L2 norm of an update's change (new - sent, all float tensors): the
# coordinator's ``federation.norm_bound`` (coordinator/config.py, which range-checks it) and the
# Ray backend's answer check start from this one value.
DEFAULT_NORM_BOUND = 1e4


def validate_update(
    params: Mapping[str, np.ndarray],
    reference_shapes_dtypes: Mapping[str, tuple[tuple[int, ...], Any]],
    norm_bound: float | Mapping[str, float] | None = None,
) -> None:
    """Check a received update before a strategy sees it.

    ``reference_shapes_dtypes`` maps each expected tensor name to ``(shape, dtype)``.
    ``norm_bound`` is either one bound on the L2 norm of the whole update (float tensors
    together) or a per-tensor mapping. Raises :class:`ValidationError` naming the tensor.
    """
    missing = sorted(set(reference_shapes_dtypes) - set(params))
    if missing:
        raise ValidationError(
            f"update: tensor {missing[0]!r} missing ({len(missing)} missing in all)"
        )
    extra = sorted(set(params) - set(reference_shapes_dtypes))
    if extra:
        raise ValidationError(f"update: unexpected tensor {extra[0]!r}")
    sq_total = 0.0
    largest = ("", -1.0)
    for name, (shape, dtype) in reference_shapes_dtypes.items():
        arr = params[name]
        if not isinstance(arr, np.ndarray):
            raise ValidationError(f"update: tensor {name!r} is {type(arr).__name__}, not an array")
        if tuple(arr.shape) != tuple(shape):
            raise ValidationError(
                f"update: tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}"
            )
        if arr.dtype != np.dtype(dtype):
            raise ValidationError(
                f"update: tensor {name!r} has dtype {arr.dtype}, expected {np.dtype(dtype)}"
            )
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise ValidationError(f"update: tensor {name!r} has {bad} non-finite value(s)")
            if norm_bound is None:
                continue  # no bound: the norms are not needed (half the cost per update)
            sq = float(np.sum(np.square(arr, dtype=np.float64)))
            sq_total += sq
            if sq > largest[1]:
                largest = (name, sq)
            if isinstance(norm_bound, Mapping) and name in norm_bound:
                n = math.sqrt(sq)
                if n > norm_bound[name]:
                    raise ValidationError(
                        f"update: tensor {name!r} L2 norm {n:.4g} exceeds bound {norm_bound[name]:.4g}"
                    )
    if isinstance(norm_bound, int | float) and not isinstance(norm_bound, bool):
        total = math.sqrt(sq_total)
        if total > norm_bound:
            raise ValidationError(
                f"update: L2 norm {total:.4g} exceeds bound {norm_bound:.4g} "
                f"(largest tensor {largest[0]!r}, norm {math.sqrt(largest[1]):.4g})"
            )


def validate_change(params: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray],
                    norm_bound: float) -> None:
    """The check every answer to a task passes (the coordinator's upload check, the Ray
    backend's): exactly the tensors ``sent`` with their shapes and dtypes, finite values, and
    the L2 norm of the change a client made (``params - sent`` over the float tensors) within
    ``norm_bound``: the bound is on what a device changed, not on the weights themselves."""
    ref = {k: (tuple(v.shape), v.dtype) for k, v in sent.items()}
    validate_update(params, ref)
    delta = {k: (v - sent[k]).astype(v.dtype, copy=False) for k, v in params.items()
             if np.issubdtype(v.dtype, np.floating)}
    try:
        validate_update(delta, {k: ref[k] for k in delta}, norm_bound)
    except ValidationError as exc:
        raise ValidationError(str(exc).replace("update:", "update delta:", 1)) from None
