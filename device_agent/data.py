"""A device's own data: an ``.npz``, a folder of images, or a shipped dataset for demos.

Whatever the source, the agent sees a :class:`~fedcoe_edge.strategies.ClientData`
(float32 inputs, int64 labels, a 75/25 train/test split by default), the same type the
simulator hands to ``client_update`` (docs/design.md, section 5).

Labels must mean the same class on every device. An image folder's labels index the
federation's class list (``[federation] classes`` on the coordinator, sent in the welcome,
or ``[data] classes`` here), never "whatever sorts first on this device".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.config import DataSettings
from fedcoe_edge.data.loaders import check_xy as _check
from fedcoe_edge.data.loaders import npz_splits, read_npz
from fedcoe_edge.errors import DataError
from fedcoe_edge.strategies import ClientData


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> ClientData:
    """Shuffle with ``seed`` and cut off ``test_fraction`` as the local test split."""
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) - max(1, int(round(test_fraction * len(y)))) if len(y) > 1 else len(y)
    tr, te = np.sort(order[:cut]), np.sort(order[cut:])
    return ClientData(x[tr], y[tr], x[te], y[te])


def load_npz(path: Path, settings: DataSettings) -> ClientData:
    """``x_train, y_train[, x_test, y_test]`` or ``x[, y]`` (no labels: a cold-start device)."""
    arrays = read_npz(path)  # the reader `fedcoe simulate --dataset npz:` uses
    splits = npz_splits(arrays, path)
    if splits is not None:
        xtr, ytr, xte, yte = splits
        if xte is None or yte is None:
            xte, yte = xtr[:0], ytr[:0]
        return ClientData(xtr, ytr, xte, yte)
    if "x" not in arrays:
        raise DataError(f"{path}: expected arrays x_train/y_train or x[/y], found {sorted(arrays)}")
    x = arrays["x"]
    if "y" not in arrays:  # unlabeled: everything is (unlabeled) test data for cold start
        x, _ = _check(x, np.zeros(len(x), dtype=np.int64), str(path))
        return ClientData(x[:0], np.zeros(0, np.int64), x, np.full(len(x), -1, dtype=np.int64))
    x, y = _check(x, arrays["y"], str(path))
    return split(x, y, settings.test_fraction, settings.seed)


@dataclass
class LocalData:
    """A device's data plus the class names its labels stand for (image folders: the folder
    names in label order; other sources: None, labels are already the federation's)."""

    data: ClientData
    classes: list[str] | None = None


def load_image_folder(root: Path, settings: DataSettings,
                      classes: Sequence[str] | None = None) -> ClientData:
    """``root/<class>/<image>``: label i is ``classes[i]`` (the federation's list, else
    ``settings.classes``, else the sorted folder names present here). Reads through the same
    loader as ``fedcoe simulate --dataset folder:`` so both see the same pixels."""
    return load_image_folder_named(root, settings, classes).data


def load_image_folder_named(root: Path, settings: DataSettings,
                            classes: Sequence[str] | None = None) -> LocalData:
    from fedcoe_edge.data.loaders import folder_classes
    from fedcoe_edge.data.loaders import load_image_folder as read_folder

    if len(settings.image_shape) != 3 or settings.image_shape[0] not in (1, 3):
        raise DataError(f"[data] image_shape must be [C, H, W] with C 1 or 3, got {settings.image_shape}")
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    names = list(classes or settings.classes or folder_classes(root))
    if not names:
        raise DataError(f"{root}: no class sub-folders")
    c, h, w = settings.image_shape
    x, y, names = read_folder(root, size=(h, w), grayscale=c == 1, classes=names)
    return LocalData(split(x, y, settings.test_fraction, settings.seed), names)


def relabel(local: LocalData, classes: Sequence[str], where: str) -> ClientData:
    """The same images with labels re-indexed into the federation's ``classes``; a class this
    device holds that the federation does not know is a DataError naming it."""
    if local.classes is None or list(local.classes) == list(classes):
        return local.data
    unknown = [c for i, c in enumerate(local.classes)
               if c not in classes and (np.any(local.data.y_train == i) or np.any(local.data.y_test == i))]
    if unknown:
        raise DataError(f"{where}: class folder(s) {', '.join(unknown)} not in the federation's class "
                        f"list ({', '.join(classes)})")
    table = np.array([list(classes).index(c) if c in classes else -1 for c in local.classes], np.int64)
    d = local.data
    return ClientData(d.x_train, table[d.y_train], d.x_test,
                      np.where(d.y_test >= 0, table[np.maximum(d.y_test, 0)], d.y_test),
                      x_pool=d.x_pool)


def check_labels(data: ClientData, num_classes: int, where: str) -> None:
    """Every label must be a class of the federation's model: a label >= num_classes would
    otherwise be an IndexError deep in the loss, on this device only."""
    top = max([int(y.max()) for y in (data.y_train, data.y_test) if len(y)], default=-1)
    if top >= num_classes:
        raise DataError(f"{where}: labels go up to {top} but the federation's model has "
                        f"{num_classes} classes (0..{num_classes - 1}); give the federation a "
                        f"class list or fix the data")


def load_demo(settings: DataSettings) -> ClientData:
    """One client of the demo federation: the same split the simulator and coordinator build."""
    from fedcoe_edge.data import make_federation

    fed = make_federation(settings.dataset, settings.partition, settings.num_clients,
                          settings.new_clients, settings.seed, settings.alpha, settings.min_samples)
    pool = {**fed.clients, **fed.new_clients}
    if settings.client not in pool:
        raise DataError(f"[data] client {settings.client!r} not in the {settings.dataset} federation "
                        f"(known: {', '.join(sorted(pool))})")
    return pool[settings.client]


def load_data(settings: DataSettings) -> ClientData:
    """Dispatch on whichever source the config names."""
    return load_local(settings).data


def load_local(settings: DataSettings) -> LocalData:
    """:func:`load_data` plus the class names of an image folder's labels."""
    if settings.npz:
        return LocalData(load_npz(Path(settings.npz), settings))
    if settings.image_folder:
        return load_image_folder_named(Path(settings.image_folder), settings)
    return LocalData(load_demo(settings))
