"""Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747) read from its gzipped IDX files.

Debian's package ``dataset-fashion-mnist`` (MIT) installs the four original files under
``/usr/share/datasets/fashion-mnist``; nothing here downloads. The reader uses gzip and numpy
only and checks every header field before trusting the payload, because a half-copied or
mislabelled file would otherwise turn into silently wrong training data: magic number (2049
labels, 2051 images), dimensions, payload length, label range and that image and label counts
agree.

The official split is kept: 60,000 training and 10,000 test images of 28x28, 10 classes. The
federation builder partitions the training split over clients and evaluates on the test split.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

from fedcoe_edge.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FEDCOE_FMNIST_DIR"
LABEL_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
IMAGE_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
IMAGE_SIZE = (28, 28)
NUM_CLASSES = 10
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                "Shirt", "Sneaker", "Bag", "Ankle boot")
HINT = "install Debian's package dataset-fashion-mnist or pass --data-dir / set FEDCOE_FMNIST_DIR"


def _fail(path: Path, what: str) -> DataError:
    """One-line error naming the file and how to get a good copy, as the CLI prints it."""
    return DataError(f"Fashion-MNIST file {path}: {what}; {HINT}")


def fmnist_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the files are: the argument, else ``$FEDCOE_FMNIST_DIR``, else Debian's path."""
    if data_dir:
        return Path(data_dir)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise _fail(path, "not found")
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; EOF = truncated
        raise _fail(path, f"unreadable or truncated gzip ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None


def _parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The payload of one IDX file as uint8 with its header's shape, after checking the header."""
    raw = _read_gz(path)
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _fail(path, f"{len(raw)} bytes, shorter than the {header_len}-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise _fail(path, f"bad magic number {found} (expected {magic})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != IMAGE_SIZE:
        raise _fail(path, f"images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = int(np.prod(dims))
    payload = len(raw) - header_len
    if payload != expected:
        raise _fail(path, f"payload is {payload} bytes but the header {list(dims)} says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx_labels(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX1 label file -> int64 (N,) with every value in 0..9."""
    path = Path(path)
    labels = _parse_idx(path, LABEL_MAGIC, 1)
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise _fail(path, f"label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def read_idx_images(path: str | os.PathLike[str]) -> np.ndarray:
    """An IDX3 image file -> float32 (N, 1, 28, 28) scaled to [0, 1]."""
    images = _parse_idx(Path(path), IMAGE_MAGIC, 3)
    return (images.astype(np.float32) / 255.0)[:, None, :, :]


def load_split(split: str, data_dir: str | os.PathLike[str] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """One official split (``train`` or ``test``) as (x, y); counts must agree."""
    root = fmnist_dir(data_dir)
    image_name, label_name = FILES[split]
    y = read_idx_labels(root / label_name)
    x = read_idx_images(root / image_name)
    if len(x) != len(y):
        raise _fail(root / image_name, f"{len(x)} images but {root / label_name} has {len(y)} labels")
    return x, y


def load_fmnist(data_dir: str | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((x_train, y_train), (x_test, y_test))``: x float32 (N, 1, 28, 28) in [0, 1], y int64.

    ``data_dir`` overrides ``$FEDCOE_FMNIST_DIR``, which overrides Debian's install path.
    """
    return load_split("train", data_dir), load_split("test", data_dir)
