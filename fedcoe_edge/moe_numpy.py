"""The numpy maths of the device runtime, mirroring :mod:`fedcoe_edge.model` (no torch).

Softmax in float64 and top-k routing that breaks ties as ONNX TopK does; used by
:class:`fedcoe_edge.runtime.MoESession` around its onnxruntime sessions.
"""

from __future__ import annotations

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    # after subtracting the row max the sum is >= 1 (the max term is exp(0)), so the log is
    # finite: no np.errstate needed (entering one costs as much as the maths at batch 1)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def topk_routing(probs: np.ndarray, k: int) -> np.ndarray:
    """Each row's top-k probabilities renormalised; ties go to the lower index (ONNX TopK).

    Matches :func:`fedcoe_edge.model.topk_routing` except on exact ties, where torch's CPU
    topk picks an arbitrary (often the higher) index.
    """
    n = probs.shape[-1]
    if k >= n:
        return probs
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # stable: lower index first
    rows = np.arange(probs.shape[0])[:, None]
    weights = np.zeros_like(probs)
    weights[rows, order] = probs[rows, order]
    return weights / np.maximum(weights.sum(-1, keepdims=True), 1e-12)
