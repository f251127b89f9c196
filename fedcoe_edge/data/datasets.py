"""Datasets that need no download. Each loader returns ``(x, y)`` with x float32
(N, *input_shape) and y int64 (N,).

* ``digits``: scikit-learn's digits (Alpaydin & Kaynak, UCI 1998), shipped with scikit-learn:
  1,797 8x8 grey-level images of handwritten digits, 10 classes.
* ``digits-shift``: the same images; the federation builder gives each client its own fixed
  "camera" (``shift.py``) on top of the label partition.
* ``synthetic`` / ``synthetic(a,b)`` / ``synthetic-iid``: FedProx's Synthetic(alpha, beta)
  (``synthetic.py``), per-user by construction; pooled here over 30 users (FedProx's count),
  split per user by the federation builder's ``natural`` partition.
* ``cifar10:PATH`` and ``folder:PATH``: data the user has on disk (``loaders.py``).
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


def load_synthetic_pooled(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic(1, 1) over FedProx's 30 users, pooled (for label partitioners)."""
    from fedcoe_edge.data.synthetic import synthetic_users

    users = synthetic_users(30, 1.0, 1.0, seed)
    return np.concatenate([u[0] for u in users]), np.concatenate([u[1] for u in users])


DATASETS: dict[str, Loader] = {
    "digits": load_digits,
    "digits-shift": load_digits,  # the shift is per client, applied by make_federation
    "synthetic": load_synthetic_pooled,
}

# datasets whose images get a per-client camera in make_federation
SHIFTED_DATASETS = frozenset({"digits-shift"})


def load_dataset(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Load a registered dataset by name; an unknown name lists the known ones.

    ``cifar10:PATH`` reads CIFAR-10 python batches and ``folder:PATH`` an image folder (class
    per sub-folder, 32x32 RGB) from a local path; ``synthetic(a,b)`` pools 30 FedProx users.
    """
    if name.startswith("cifar10:"):
        from fedcoe_edge.data.loaders import load_cifar10_batches

        return load_cifar10_batches(name.split(":", 1)[1])
    if name.startswith("folder:"):
        from fedcoe_edge.data.loaders import load_image_folder

        x, y, _ = load_image_folder(name.split(":", 1)[1])
        return x, y
    if name.startswith("synthetic") and name not in DATASETS:
        from fedcoe_edge.data.synthetic import load_synthetic_users

        users = load_synthetic_users(name, 30, seed)
        return np.concatenate([u[0] for u in users]), np.concatenate([u[1] for u in users])
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}, "
                          f"synthetic(a,b), synthetic-iid, cifar10:PATH, folder:PATH") from None
    return loader(seed)
