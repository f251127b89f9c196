"""Pretraining the MobileNetV3-Small trunk at the coordinator, on data it may hold.

A frozen trunk (``ModelConfig.trunk_mode = "frozen"``, :mod:`fedcoe_edge.trunk`) is only as
good as its pretraining. The coordinator may hold a public dataset (none of the devices'
private data): it trains the trunk plus a linear classifier on a slice of it, fixes the
BatchNorm statistics exactly over that slice (a frozen trunk runs in eval mode on every
device, so those statistics *are* the trunk), and writes the trunk as one safetensors file
whose sha256 the federation's model names (``trunk_weights`` / ``trunk_sha256``). The file
is then shipped once, hash-checked, to every device that lacks it (docs/daemons.md,
"Pretrained trunk").

* :func:`pretrain_trunk_file`: the verb behind ``fedcoe pretrain-trunk``: dataset in, file
  out; every option and the output path are checked before any work, the file is written
  atomically, and the result carries its sha256 and the held-out accuracy (trunk + linear
  head in eval mode, as a frozen trunk runs, on public images kept out of the fit).
* :func:`pretrain_trunk`: the same training on arrays the caller already split
  (``benchmarks/camera_accuracy.py`` calls it with its public slice).

Images are fed as a camera model sees them (:func:`to_camera`): upsampled bilinearly to
``size`` x ``size``, a grey channel repeated to R, G and B, values in [0, 1]. No download:
the dataset is one the library reads from disk or ships (``load_dataset``).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.errors import ConfigError, DataError

SIZE_RANGE = (8, 1024)  # input side in px; V3-Small downsamples 32x (a 1x1 map at 32)
PUBLIC_SEED, HOLDOUT_SEED, ORDER_SEED = 11, 14, 21  # rng streams: [seed, stream]


class Optimizer(str, Enum):
    """SGD with Nesterov momentum (the benchmark's); Adam gets further in a few steps."""

    SGD = "sgd"
    ADAM = "adam"


@dataclass(frozen=True)
class PretrainOptions:
    """What :func:`pretrain_trunk_file` trains on and how.

    ``public_fraction`` of the dataset's (training) split, stratified, is the coordinator's
    public slice; ``val_fraction`` of that slice is kept out of the fit and scores the result.
    The same ``seed`` and fractions cut Fashion-MNIST exactly as the camera benchmark does,
    so ``fedcoe pretrain-trunk`` with its settings writes the same file."""

    dataset: str = "fmnist"
    data_dir: str | None = None
    size: int = 64
    epochs: int = 3
    public_fraction: float = 0.1
    val_fraction: float = 0.1
    lr: float = 0.05
    batch_size: int = 64
    optimizer: Optimizer = Optimizer.SGD
    seed: int = 0

    def validate(self) -> None:
        """One ConfigError line for the first bad option (before any data is read)."""
        lo, hi = SIZE_RANGE
        if not _is_int(self.size) or not lo <= self.size <= hi:
            raise ConfigError(f"size must be an integer in {lo}..{hi} px, got {self.size!r}")
        if not _is_int(self.epochs) or self.epochs < 1:
            raise ConfigError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not _is_int(self.batch_size) or self.batch_size < 2:
            raise ConfigError(f"batch size must be an integer >= 2 (BatchNorm needs two "
                              f"images), got {self.batch_size!r}")
        if not 0 < self.public_fraction <= 1:
            raise ConfigError(f"public fraction must be in (0, 1], got {self.public_fraction}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"validation fraction must be in (0, 1), got {self.val_fraction}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        Optimizer(self.optimizer)  # a typo'd string is a ValueError here, not mid-run


@dataclass
class PretrainResult:
    """The written trunk file and how it was made."""

    path: Path
    sha256: str
    bytes: int
    samples: int  # images fitted
    val_samples: int  # held-out public images scored
    val_acc: float | None  # trunk + linear head, eval mode, on those images
    epochs: int
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0

    def config_lines(self) -> list[str]:
        """The two lines of the coordinator's ``[model]`` section that name this trunk."""
        return [f'trunk_weights = "{self.path}"', f'trunk_sha256 = "{self.sha256}"']

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


# ------------------------------------------------------------------------------- data


def to_camera(x: np.ndarray, size: int, chunk: int = 2048) -> np.ndarray:
    """(N, C, H, W) images in [0, 1], C 1 or 3 -> (N, 3, size, size) float32: bilinear
    resizing, a grey channel repeated as R, G and B (what a camera model is fed)."""
    import torch
    import torch.nn.functional as F

    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_camera: expected (N, 1 or 3, H, W), got {x.shape}")
    out = np.empty((len(x), 3, size, size), dtype=np.float32)
    for start in range(0, len(x), chunk):
        part = torch.from_numpy(np.ascontiguousarray(x[start:start + chunk], dtype=np.float32))
        if part.shape[-1] != size or part.shape[-2] != size:
            part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False)
        out[start:start + chunk] = part.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).numpy()
    return out


def public_indices(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of the coordinator's public slice: ``fraction`` of every class."""
    from fedcoe_edge.data.federation import stratified_subset

    return stratified_subset(y, fraction, np.random.default_rng([seed, PUBLIC_SEED]))


def holdout_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, val)`` positions in ``y``: ``fraction`` of every class scores, the rest fits."""
    from fedcoe_edge.data.federation import stratified_subset

    val = stratified_subset(y, fraction, np.random.default_rng([seed, HOLDOUT_SEED]))
    return np.setdiff1d(np.arange(len(y)), val), val


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each batch; a last batch of one image joins the one before (a
    BatchNorm in training mode cannot normalize one image whose map is 1x1)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def load_images(dataset: str, data_dir: str | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's (training) images and labels, checked to be images a camera model
    can be fed: (N, 1 or 3, H, W) in [0, 1] with at least two classes."""
    from fedcoe_edge.data.datasets import load_dataset

    x, y = load_dataset(dataset, seed, data_dir)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"dataset {dataset!r} has samples of shape {list(x.shape[1:])}; a trunk "
                        f"is pretrained on images (C, H, W) with C 1 or 3")
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise DataError(f"dataset {dataset!r} needs images of at least two classes, got "
                        f"{len(np.unique(y))} class(es) in {len(y)} images")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise DataError(f"dataset {dataset!r}: pixel values must be in [0, 1], got "
                        f"{float(x.min()):.3g}..{float(x.max()):.3g}")
    return x, np.asarray(y, dtype=np.int64)


def check_out_path(out: Path) -> None:
    """The trunk file can be written at ``out`` (checked before any work): not a folder,
    and the nearest existing folder above it is writable."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path (e.g. {out}/trunk.safetensors)")
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the trunk file must end in .safetensors")
    parent = out.parent.absolute()
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is not a folder")
    try:  # a real write (nameless, gone on close): permission bits say nothing to root
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write in {parent}: {exc.strerror or exc}") from None


# ------------------------------------------------------------------------------ training


def recalibrate_batchnorm(trunk: Any, x: np.ndarray, size: int, batch: int = 256) -> None:
    """Recompute every BatchNorm's running statistics as the exact mean over ``x`` (one
    forward pass in training mode, no gradient), then leave the trunk in eval mode.

    A frozen trunk runs in eval mode on every device, so these statistics *are* the trunk:
    after a short pretraining the exponential averages (V3's momentum is 0.01) still carry
    their initial values, and eval-mode features would differ from those it learned with."""
    import torch

    bns = [m for m in trunk.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    trunk.train()
    with torch.no_grad():
        for start, end in batch_bounds(len(x), batch):
            trunk(torch.from_numpy(to_camera(x[start:end], size)))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    trunk.eval()


def _quiet(_msg: str) -> None:
    pass


def pretrain_trunk(x: np.ndarray, y: np.ndarray, size: int, epochs: int, out: Path,
                   seed: int = 0, lr: float = 0.05, batch_size: int = 64,
                   x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                   optimizer: str = "sgd", log: Callable[[str], None] = _quiet,
                   progress: bool = False) -> dict[str, Any]:
    """Train the V3-Small trunk + a linear classifier on ``x``, ``y`` (images in [0, 1],
    resized per batch) and write the trunk atomically as ``out`` (safetensors, names as in
    the model's state dict). Returns the file's sha256 and the training figures.

    SGD with momentum (``optimizer="adam"``: Adam) and a cosine learning rate, then exact
    BatchNorm statistics over the training images (:func:`recalibrate_batchnorm`).
    ``x_val`` / ``y_val`` (public images kept out of pretraining) score trunk + head in eval
    mode, as a frozen trunk runs. ``progress``: a progress bar over the steps (stderr)."""
    import sys

    import torch
    from safetensors.torch import save
    from tqdm.auto import tqdm

    from fedcoe_edge.io import atomic_write_bytes
    from fedcoe_edge.mobilenet import mobilenet_v3_small_trunk
    from fedcoe_edge.trunk import TRUNK_PREFIX

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        trunk = mobilenet_v3_small_trunk()
        head = torch.nn.Linear(trunk.out_features, int(y.max()) + 1)
    finally:
        torch.random.set_rng_state(gen_state)
    params = [*trunk.parameters(), *head.parameters()]
    opt: torch.optim.Optimizer
    if Optimizer(optimizer) is Optimizer.ADAM:
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    bounds = batch_bounds(len(y), batch_size)
    steps = epochs * len(bounds)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    rng = np.random.default_rng([seed, ORDER_SEED])
    history = []
    t0 = time.perf_counter()
    trunk.train()
    with tqdm(total=steps, desc="pretrain trunk", unit="step", disable=not progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            order = rng.permutation(len(y))
            loss_sum, correct = 0.0, 0
            for start, end in bounds:
                idx = order[start:end]
                xb = torch.from_numpy(to_camera(x[idx], size))
                yb = torch.from_numpy(y[idx])
                logits = head(trunk(xb))
                loss = torch.nn.functional.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}", refresh=False)
            history.append({"epoch": epoch + 1, "loss": loss_sum / len(y),
                            "train_acc": correct / len(y)})
            log(f"pretrain epoch {epoch + 1}/{epochs}: loss {history[-1]['loss']:.3f}, "
                f"train acc {history[-1]['train_acc']:.3f} ({time.perf_counter() - t0:.0f} s)")
    recalibrate_batchnorm(trunk, x, size)
    val_acc = None
    if x_val is not None and y_val is not None and len(y_val):
        with torch.no_grad():
            pred = np.concatenate([head(trunk(torch.from_numpy(to_camera(x_val[i:i + 256], size))))
                                   .argmax(1).numpy() for i in range(0, len(y_val), 256)])
        val_acc = float((pred == y_val).mean())
        log(f"pretrained trunk + linear head, eval mode: {val_acc:.3f} on {len(y_val)} held-out "
            "public images")
    data = save({TRUNK_PREFIX + k: v.detach().contiguous() for k, v in trunk.state_dict().items()})
    atomic_write_bytes(Path(out), data)
    digest = hashlib.sha256(data).hexdigest()
    return {"file": str(out), "sha256": digest, "bytes": len(data), "epochs": epochs,
            "samples": int(len(y)), "val_samples": 0 if y_val is None else int(len(y_val)),
            "val_acc": val_acc, "lr": lr, "optimizer": str(Optimizer(optimizer).value),
            "batch_size": batch_size, "history": history, "wall_s": time.perf_counter() - t0}


def pretrain_trunk_file(out: Path, options: PretrainOptions | None = None, *,
                        progress: bool = False,
                        log: Callable[[str], None] = _quiet) -> PretrainResult:
    """Pretrain the trunk on ``options.dataset``'s public slice and write it to ``out``.

    Options and ``out`` are checked first, then the data (readable, images, two classes,
    enough images per class for a held-out part): on any of those errors nothing is
    written. The file appears at ``out`` whole or not at all (temp file + rename)."""
    opts = options or PretrainOptions()
    opts.validate()
    out = Path(out)
    check_out_path(out)
    x, y = load_images(opts.dataset, opts.data_dir, opts.seed)
    public = public_indices(y, opts.public_fraction, opts.seed)
    xp, yp = x[public], y[public]
    fit, val = holdout_split(yp, opts.val_fraction, opts.seed)
    if len(fit) < 2 or len(np.unique(yp[fit])) < 2:
        raise DataError(f"dataset {opts.dataset!r}: the public slice ({len(public)} images at "
                        f"public fraction {opts.public_fraction}) leaves {len(fit)} to fit once "
                        f"{len(val)} are held out; raise the public fraction")
    log(f"pretraining on {len(fit):,} public {opts.dataset} images ({len(val):,} held out) at "
        f"{opts.size}x{opts.size}, {opts.epochs} epoch(s)")
    pre = pretrain_trunk(xp[fit], yp[fit], opts.size, opts.epochs, out, seed=opts.seed,
                         lr=opts.lr, batch_size=opts.batch_size, x_val=xp[val], y_val=yp[val],
                         optimizer=Optimizer(opts.optimizer).value, log=log, progress=progress)
    return PretrainResult(path=out, sha256=pre["sha256"], bytes=pre["bytes"],
                          samples=pre["samples"], val_samples=pre["val_samples"],
                          val_acc=pre["val_acc"], epochs=opts.epochs, history=pre["history"],
                          wall_s=pre["wall_s"])
