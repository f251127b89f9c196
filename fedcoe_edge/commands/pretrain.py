"""``fedcoe pretrain-trunk``: the coordinator pretrains a trunk on data it may hold.

Runs :func:`fedcoe_edge.pretrain.pretrain_trunk_file` (MobileNetV3-Small + a linear head on a
public slice of a dataset, exact BatchNorm statistics, held-out eval-mode accuracy), writes
the trunk file atomically and prints the two lines that name it in the coordinator's
``[model]`` section. Devices that lack the file fetch it once from the coordinator,
hash-checked (docs/daemons.md, "Pretrained trunk").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedcoe_edge.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from fedcoe_edge.pretrain import SIZE_RANGE, Optimizer, PretrainOptions

    d = PretrainOptions()
    p = sub.add_parser(
        "pretrain-trunk",
        help="pretrain the MobileNetV3-Small trunk on a public dataset the coordinator holds",
        description="Train the MobileNetV3-Small trunk plus a linear classifier on a public "
                    "slice of DATASET (images resized to SIZE x SIZE, grey repeated to RGB), "
                    "fix its BatchNorm statistics over that slice, score trunk + head in eval "
                    "mode on held-out public images, and write the trunk as a safetensors file "
                    "(atomically). Prints the trunk_weights / trunk_sha256 lines for the "
                    "coordinator's [model] section (use it with trunk = \"mobilenet_v3_small\", "
                    "trunk_mode = \"frozen\" and input_shape = [3, SIZE, SIZE]); devices without "
                    "the file fetch it from the coordinator once, hash-checked. With the "
                    "defaults it cuts Fashion-MNIST as benchmarks/camera_accuracy.py does.",
    )
    p.add_argument("--out", type=Path, required=True,
                   help="trunk file to write (.safetensors); replaced atomically if it exists")
    p.add_argument("--dataset", default=d.dataset,
                   help="fmnist (Debian's IDX files or --data-dir), digits, cifar10:PATH, "
                        "folder:PATH, npz:PATH or 'module:loader'; images in [0, 1]")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="Fashion-MNIST IDX folder (default $FEDCOE_FMNIST_DIR, else "
                        "/usr/share/datasets/fashion-mnist)")
    p.add_argument("--size", type=int, default=d.size,
                   help=f"input side in px, {SIZE_RANGE[0]}..{SIZE_RANGE[1]}: the model's "
                        f"input_shape is [3, SIZE, SIZE]")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the public slice")
    p.add_argument("--public-fraction", type=float, default=d.public_fraction,
                   help="stratified share of the dataset's training split the coordinator "
                        "holds (fmnist 0.1 = 6,000 images)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the public slice held out to score the trunk")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine schedule)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step, >= 2")
    p.add_argument("--optimizer", choices=[o.value for o in Optimizer], default=d.optimizer.value,
                   help="sgd (Nesterov momentum, the benchmark's) or adam")
    p.add_argument("--seed", type=int, default=d.seed, help="slice, order and weight seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcoe_edge.pretrain import Optimizer, PretrainOptions, pretrain_trunk_file

    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    opts = PretrainOptions(dataset=args.dataset,
                           data_dir=None if args.data_dir is None else str(args.data_dir),
                           size=args.size, epochs=args.epochs, public_fraction=args.public_fraction,
                           val_fraction=args.val_fraction, lr=args.lr, batch_size=args.batch_size,
                           optimizer=Optimizer(args.optimizer), seed=args.seed)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = args.out.expanduser().absolute()
    res = pretrain_trunk_file(out, opts, progress=not args.no_progress)
    acc = "n/a" if res.val_acc is None else f"{100 * res.val_acc:.2f}%"
    print(f"wrote {res.path} ({res.bytes / 1e6:.2f} MB) in {res.wall_s:.0f}s: trained on "
          f"{res.samples:,} public {opts.dataset} images, {res.epochs} epoch(s); trunk + linear "
          f"head in eval mode scored {acc} on {res.val_samples:,} held-out images")
    print(f"# coordinator [model] (trunk = \"mobilenet_v3_small\", trunk_mode = \"frozen\", "
          f"input_shape = [3, {opts.size}, {opts.size}]):")
    for line in res.config_lines():
        print(line)
    return 0
