"""A device's own data: an ``.npz``, a folder of images, or a shipped dataset for demos.

Whatever the source, the agent sees a :class:`~fedcoe_edge.strategies.ClientData`
(float32 inputs, int64 labels, a 75/25 train/test split by default), the same type the
simulator hands to ``client_update`` (docs/design.md, section 5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.config import DataSettings
from fedcoe_edge.errors import DataError
from fedcoe_edge.strategies import ClientData

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm")


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> ClientData:
    """Shuffle with ``seed`` and cut off ``test_fraction`` as the local test split."""
    order = np.random.default_rng(seed).permutation(len(y))
    cut = len(y) - max(1, int(round(test_fraction * len(y)))) if len(y) > 1 else len(y)
    tr, te = np.sort(order[:cut]), np.sort(order[cut:])
    return ClientData(x[tr], y[tr], x[te], y[te])


def _check(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2:
        raise DataError(f"{where}: inputs must be (N, ...) with N samples, got shape {list(x.shape)}")
    if len(y) != len(x):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{where}: labels must be non-negative integers")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"{where}: inputs contain non-finite values")
    return x, y.astype(np.int64)


def load_npz(path: Path, settings: DataSettings) -> ClientData:
    """``x_train, y_train[, x_test, y_test]`` or ``x[, y]`` (no labels: a cold-start device)."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    if "x_train" in arrays:
        if "y_train" not in arrays:
            raise DataError(f"{path}: has x_train but no y_train")
        xtr, ytr = _check(arrays["x_train"], arrays["y_train"], f"{path} train")
        if "x_test" in arrays and "y_test" in arrays:
            xte, yte = _check(arrays["x_test"], arrays["y_test"], f"{path} test")
        else:
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


def load_image_folder(root: Path, settings: DataSettings) -> ClientData:
    """``root/<class>/<image>``: classes in sorted order become labels 0..C-1."""
    from PIL import Image

    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 1:
        raise DataError(f"{root}: no class sub-folders")
    if len(settings.image_shape) != 3 or settings.image_shape[0] not in (1, 3):
        raise DataError(f"[data] image_shape must be [C, H, W] with C 1 or 3, got {settings.image_shape}")
    c, h, w = settings.image_shape
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if c == 1 else "RGB").resize((w, h))
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except OSError as exc:
                raise DataError(f"{f}: unreadable image ({exc})") from None
            xs.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return split(np.stack(xs), np.array(ys, dtype=np.int64), settings.test_fraction, settings.seed)


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
    if settings.npz:
        return load_npz(Path(settings.npz), settings)
    if settings.image_folder:
        return load_image_folder(Path(settings.image_folder), settings)
    return load_demo(settings)
