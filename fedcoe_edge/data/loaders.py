"""Loaders for datasets a user already has on disk. Nothing here downloads.

* CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009) in the
  "python version" the authors ship: ``data_batch_1..5`` and ``test_batch``, each a pickled
  dict with ``b"data"`` (N, 3072) uint8 and ``b"labels"``.
* An image folder: one sub-folder per class (labels index the federation's class list, or
  the sorted folder names without one), images in any format Pillow reads.
* An ``.npz``: ``x_train, y_train[, x_test, y_test]`` or ``x[, y]``, read without pickle.

The simulator (``folder:PATH``, ``npz:PATH``) and a device agent (``[data] image_folder``,
``[data] npz``) read through these functions. A file that cannot be read (a corrupt image,
a truncated ``.npz``) is refused: a DataError naming its path, never skipped silently, so
every copy of a dataset is read whole or not at all (docs/design.md, "Your own model and
data").

Security note: pickle runs code from the file it reads. It is used ONLY in
``load_cifar10_batches``, ONLY on a local path the operator names, because that is the format
CIFAR-10 ships in. Nothing received over the network is ever unpickled in this project
(weights travel as safetensors).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcoe_edge.errors import DataError

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch file -> (x float32 (N, 3, 32, 32) in [0, 1], y int64 (N,))."""
    try:
        with open(path, "rb") as fh:
            doc = pickle.load(fh, encoding="bytes")  # local CIFAR file only, see module note
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (expected a dict, got {type(doc).__name__})")
    data = doc.get(b"data", doc.get("data"))
    labels = doc.get(b"labels", doc.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch lacks 'data' or 'labels'")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and "
                        f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must be 0..9, got {labels.min()}..{labels.max()}")
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return x, labels


def load_cifar10_batches(root: str | Path, train: bool = True, test: bool = True
                         ) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from its extracted ``cifar-10-batches-py`` folder; all requested batches joined.

    A missing batch file is a DataError naming it (the whole set is expected, not a subset).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CIFAR-10 folder not found: {root}")
    names = (list(CIFAR_TRAIN) if train else []) + ([CIFAR_TEST] if test else [])
    if not names:
        raise DataError("load_cifar10_batches: ask for train and/or test batches")
    xs, ys = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 batch missing: {path}")
        x, y = read_cifar_batch(path)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def check_xy(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs (N, ...) finite float32 and N non-negative integer labels, or a DataError."""
    if x.ndim < 2:
        raise DataError(f"{where}: inputs must be (N, ...) with N samples, got shape {list(x.shape)}")
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be one integer per sample, got shape {list(y.shape)}")
    if len(y) != len(x):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers")
    try:
        x = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: inputs are not numbers ({exc})") from None
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: inputs contain non-finite values")
    return x, y.astype(np.int64)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (no pickle); a missing or unreadable file names its path."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    except Exception as exc:  # zipfile.BadZipFile and friends from a corrupt archive
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


NpzSplits = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def npz_splits(arrays: dict[str, np.ndarray], path: str | Path) -> NpzSplits | None:
    """The ``x_train/y_train`` form of an ``.npz``, checked: (x, y, x_test, y_test), the test
    pair None unless both are present; None when the file has no ``x_train``. The simulator's
    pool and a device's own split read it through this one function."""
    if "x_train" not in arrays:
        return None
    if "y_train" not in arrays:
        raise DataError(f"{path}: has x_train but no y_train")
    x, y = check_xy(arrays["x_train"], arrays["y_train"], f"{path} train")
    if "x_test" in arrays and "y_test" in arrays:
        xt, yt = check_xy(arrays["x_test"], arrays["y_test"], f"{path} test")
        return x, y, xt, yt
    return x, y, None, None


def load_npz_pool(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An ``.npz`` as one labelled pool for the simulator to partition: ``x_train/y_train``
    with ``x_test/y_test`` appended when present, or ``x/y``."""
    arrays = read_npz(path)
    splits = npz_splits(arrays, path)
    if splits is not None:
        x, y, xt, yt = splits
        if xt is not None and yt is not None:
            if xt.shape[1:] != x.shape[1:]:
                raise DataError(f"{path}: x_test samples {list(xt.shape[1:])} differ from x_train's "
                                f"{list(x.shape[1:])}")
            x, y = np.concatenate([x, xt]), np.concatenate([y, yt])
        return x, y
    if "x" in arrays and "y" in arrays:
        return check_xy(arrays["x"], arrays["y"], str(path))
    raise DataError(f"{path}: a simulated federation needs labelled arrays x_train/y_train or "
                    f"x/y, found {sorted(arrays)}")


def folder_classes(root: str | Path) -> list[str]:
    """Class sub-folders of ``root`` in sorted order (hidden folders skipped)."""
    return sorted(p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


def load_image_folder(root: str | Path, size: tuple[int, int] = (32, 32), grayscale: bool = False,
                      classes: Sequence[str] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images under ``root/<class>/`` -> (x float32 (N, C, H, W) in [0, 1], y int64, class names).

    Every image is converted to RGB (or L with ``grayscale``) and resized to ``size`` (H, W)
    with bilinear resampling: the simulator and the device agent both read folders here, so a
    model simulated on a folder sees the same pixels as the one deployed on it.

    ``classes``: the federation's class list. Label i is ``classes[i]`` whatever sub-folders
    this copy of the data happens to hold (a device may hold a few classes), so labels agree
    across devices; a sub-folder not in the list is a DataError naming it, and an empty or
    missing class folder is fine. Without it, the sorted sub-folder names are the classes
    (at least 2, each non-empty), which is only safe when every copy holds every class.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DataError(f"image folder {root}: reading images needs Pillow "
                        "(pip install pillow; the wheel's [runtime] extra carries it, docs/deploy.md)") from None

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    present = folder_classes(root)
    if classes is None:
        if len(present) < 2:
            raise DataError(f"{root}: need at least 2 class sub-folders, found {len(present)}")
        names = present
    else:
        names = list(classes)
        unknown = [c for c in present if c not in names]
        if unknown:
            raise DataError(f"{root}: class folder(s) {', '.join(unknown)} not in the federation's "
                            f"class list ({', '.join(names)})")
    index = {c: i for i, c in enumerate(names)}
    xs: list[np.ndarray] = []
    ys: list[int] = []
    h, w = size
    for cls in present:
        files = sorted(f for f in (root / cls).iterdir()
                       if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files and classes is None:
            raise DataError(f"{root / cls}: no images ({', '.join(IMAGE_SUFFIXES)})")
        for f in files:
            try:
                with Image.open(f) as src:
                    img = src.convert("L" if grayscale else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                    arr = np.asarray(img, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise DataError(f"cannot read image {f}: {exc}") from None
            xs.append(arr[None] if grayscale else arr.transpose(2, 0, 1))
            ys.append(index[cls])
    if not xs:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), names
