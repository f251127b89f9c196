"""Datasets that need no download. Each loader returns ``(x, y)`` with x float32
(N, *input_shape) and y int64 (N,).

* ``digits``: scikit-learn's digits (Alpaydin & Kaynak, UCI 1998), shipped with scikit-learn:
  1,797 8x8 grey-level images of handwritten digits, 10 classes.
* ``digits-shift``: the same images; the federation builder gives each client its own fixed
  "camera" (``shift.py``) on top of the label partition.
* ``synthetic`` / ``synthetic(a,b)`` / ``synthetic-iid``: FedProx's Synthetic(alpha, beta)
  (``synthetic.py``), per-user by construction; pooled here over 30 users (FedProx's count),
  split per user by the federation builder's ``natural`` partition.
* ``fmnist``: Fashion-MNIST (``fmnist.py``) from Debian's ``dataset-fashion-mnist`` or a
  folder the user names: 60,000 + 10,000 28x28 grey-level images, 10 classes. It has an
  official test split, so ``load_dataset`` returns the training split and
  ``load_dataset_splits`` returns both; the federation builder evaluates on the official test
  split rather than holding out part of the pool.
* ``cifar10:PATH``, ``folder:PATH`` and ``npz:PATH``: data the user has on disk
  (``loaders.py``); a device agent reads image folders and ``.npz`` files through the same
  functions, so simulated and deployed devices see the same arrays.
* the user's own: ``fe.register_dataset(name, loader)`` or an import path
  ``"package.module:loader"``, through the registry the built-ins above are in
  (:mod:`fedcoe_edge.registry`; docs/design.md, "Your own model and data").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.registry import DATASETS, RegistryError, is_import_path

Arrays2 = tuple[np.ndarray, np.ndarray]
SplitLoader = Callable[[str | None], tuple[Arrays2, Arrays2]]


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


def load_fmnist_train(seed: int = 0, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's official training split (seed unused: the data is fixed)."""
    from fedcoe_edge.data.fmnist import load_split

    return load_split("train", data_dir)


def load_fmnist_splits(data_dir: str | None = None) -> tuple[Arrays2, Arrays2]:
    from fedcoe_edge.data.fmnist import load_fmnist

    return load_fmnist(data_dir)


# DATASETS (fedcoe_edge.registry) holds the built-ins above by import path: "digits",
# "digits-shift" (a shift per client: make_federation), "fmnist" (the training split; see
# SPLIT_DATASETS), "synthetic"

# datasets with an official (train, test) split: the federation partitions the train split
# and uses the whole test split as the global test set, so results compare with the literature
SPLIT_DATASETS: dict[str, SplitLoader] = {
    "fmnist": load_fmnist_splits,
}

# datasets read from disk: their loaders also take ``data_dir`` (None: the default location)
DISK_LOADERS: dict[str, Callable[[int, str | None], Arrays2]] = {
    "fmnist": load_fmnist_train,
}

# datasets whose images get a per-client camera in make_federation
SHIFTED_DATASETS = frozenset({"digits-shift"})


def load_dataset_splits(name: str, seed: int = 0, data_dir: str | None = None,
                        image_shape: tuple[int, ...] | None = None) -> tuple[Arrays2, Arrays2 | None]:
    """``(pool, official_test)``: the data to partition and, for a dataset that ships a test
    split, that split (None otherwise, and the caller holds out its own)."""
    if name in SPLIT_DATASETS:
        train, test = SPLIT_DATASETS[name](data_dir)
        return train, test
    return load_dataset(name, seed, data_dir, image_shape), None


def load_dataset(name: str, seed: int = 0, data_dir: str | None = None,
                 image_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a registered dataset by name; an unknown name lists the known ones.

    ``cifar10:PATH`` reads CIFAR-10 python batches, ``folder:PATH`` an image folder (class
    per sub-folder; 3x32x32 RGB, or ``image_shape`` (C, H, W) with C 1 for grey, the shape a
    device agent's ``image_shape`` gives the same files) and ``npz:PATH`` an ``.npz`` (its
    train and test arrays pooled) from a local path; ``synthetic(a,b)`` pools 30 FedProx users.
    A registered name or an import path ``module:loader`` calls ``loader(seed)``; what it
    returns is checked (shapes, integer labels, finite inputs) before anything uses it.
    ``data_dir`` locates a dataset read from disk (``fmnist``); the others ignore it. For a
    dataset with an official test split this returns the training split.
    """
    if name.startswith("cifar10:"):
        from fedcoe_edge.data.loaders import load_cifar10_batches

        return load_cifar10_batches(name.split(":", 1)[1])
    if name.startswith("folder:"):
        from fedcoe_edge.data.loaders import load_image_folder

        if image_shape is None:
            x, y, _ = load_image_folder(name.split(":", 1)[1])
            return x, y
        if len(image_shape) != 3 or image_shape[0] not in (1, 3):
            raise ConfigError(f"an image folder needs an input shape (C, H, W) with C 1 or 3, "
                              f"got {tuple(image_shape)}")
        c, h, w = (int(d) for d in image_shape)
        x, y, _ = load_image_folder(name.split(":", 1)[1], size=(h, w), grayscale=c == 1)
        return x, y
    if name.startswith("npz:"):
        from fedcoe_edge.data.loaders import load_npz_pool

        return load_npz_pool(name.split(":", 1)[1])
    if name.startswith("synthetic") and name not in DATASETS:
        from fedcoe_edge.data.synthetic import load_synthetic_users

        users = load_synthetic_users(name, 30, seed)
        return np.concatenate([u[0] for u in users]), np.concatenate([u[1] for u in users])
    if name not in DATASETS and not is_import_path(name):
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}, "
                          f"synthetic(a,b), synthetic-iid, cifar10:PATH, folder:PATH, npz:PATH, "
                          f"or an import path 'module:loader'")
    if name in DISK_LOADERS:
        return DISK_LOADERS[name](seed, data_dir)
    loader = DATASETS.resolve(name)
    if DATASETS.is_builtin(name):
        return loader(seed)
    try:
        out = loader(seed)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # the user's loader: one line naming it, not a traceback
        raise DataError(f"dataset {name!r}: the loader raised {type(exc).__name__}: {exc}") from None
    return checked_arrays(out, f"dataset {name!r}")


def checked_arrays(out: object, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A loader's ``(x, y)`` as float32 (N, ...) and int64 (N,), or a one-line error."""
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise RegistryError(f"{where}: the loader must return (x, y), got {type(out).__name__}")
    from fedcoe_edge.data.loaders import check_xy

    return check_xy(np.asarray(out[0]), np.asarray(out[1]), where)
