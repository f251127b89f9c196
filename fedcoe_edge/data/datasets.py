"""Datasets that need no download. Each loader returns ``(x, y, input_shape)`` with x float32
(N, *input_shape) and y int64 (N,).

scikit-learn's digits (Alpaydin & Kaynak, UCI 1998) ships with scikit-learn: 1,797 8x8
grey-level images of handwritten digits, 10 classes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcoe_edge.errors import ConfigError

Loader = Callable[[int], tuple[np.ndarray, np.ndarray]]


def load_digits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits as (N, 1, 8, 8) floats in [0, 1] and labels 0..9 (seed unused: the data is fixed)."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 8, 8) -> (N, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


DATASETS: dict[str, Loader] = {
    "digits": load_digits,
}


def load_dataset(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load a registered dataset by name; an unknown name lists the known ones."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}") from None
    return loader(seed)
