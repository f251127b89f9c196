"""``fedcoe simulate``: an in-process federation on a dataset that ships, several algorithms
and seeds, writing results.json, report.md, curves.png and checkpoints/."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError

log = logging.getLogger(__name__)

# what --algorithms accepts (fedcoe_edge.strategies.STRATEGIES; listed here so that --help
# does not import torch; a test keeps the two in step)
ALGORITHMS = ("fedcoe", "fedavg", "fedprox", "local", "fedavg-ft", "ditto", "fedrep", "mixture",
              "fedavg_prior", "fedala", "feddbe",
              "fedcoe-full", "fedcoe-noaffinity", "fedcoe-nocoord", "fedcoe-nolocal")


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def load_toml_sections(path: Path | None) -> dict[str, Any]:
    """Read an optional TOML config with [model] and [train] sections."""
    if path is None:
        return {}
    from fedcoe_edge.protocol import load_toml

    doc = load_toml(path)
    unknown = sorted(set(doc) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)} (expected [model], [train])")
    return doc


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")


# the share of Fashion-MNIST's training split `simulate` uses unless told (the accuracy grid's)
FMNIST_DEFAULT_FRACTION = 0.1


def folder_shape(dataset: str, model_section: dict[str, Any]) -> tuple[int, ...] | None:
    """The (C, H, W) an image folder is read at: ``[model] input_shape`` if the config gives
    one, else None (3x32x32 RGB)."""
    if not dataset.startswith("folder:") or "input_shape" not in model_section:
        return None
    return tuple(int(d) for d in model_section["input_shape"])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run an in-process federation and compare algorithms",
        description="Simulate a federation in one process: hold out a balanced global test set "
                    "(or use the dataset's official test split), "
                    "partition the rest non-IID over clients, train each algorithm for the given "
                    "rounds and seeds, and report global, personalized and cold-start accuracy "
                    "with bytes per client per round.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits",
                   help="digits, digits-shift, fmnist, synthetic, synthetic(a,b), synthetic-iid, "
                        "cifar10:PATH (the extracted cifar-10-batches-py folder), folder:PATH (one "
                        "sub-folder per class, read at [model] input_shape when --config gives "
                        "one, the shape an agent's image_shape reads, else as 3x32x32 RGB), npz:PATH "
                        "(x_train/y_train[/x_test/y_test] or x/y, pooled), or your own loader as "
                        "package.module:function (fmnist is evaluated on its official "
                        "10,000-image test split)")
    p.add_argument("--data-fraction", type=float, default=None,
                   help="stratified share of the training pool partitioned over clients, in (0, 1]; "
                        f"default {FMNIST_DEFAULT_FRACTION} for fmnist (6,000 training images, a few "
                        "minutes per algorithm on 2 cores; 1 = all 60,000), 1 for the others (the "
                        "global test set is never shrunk)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of a dataset read from disk (fmnist: the four IDX .gz files; "
                        "default $FEDCOE_FMNIST_DIR, else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--partition", default="dirichlet",
                   help="how labels are split over clients: dirichlet, iid, shards, quantity, or "
                        "natural (synthetic only)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more skew)")
    p.add_argument("--clients", type=int, default=20, help="training clients")
    p.add_argument("--new-clients", type=int, default=4, help="held-out clients for cold start")
    p.add_argument("--min-samples", type=int, default=20, help="minimum samples per client")
    p.add_argument("--rounds", type=int, default=30, help="federated rounds per run")
    p.add_argument("--local-epochs", type=int, default=None, help="override train.local_epochs")
    p.add_argument("--algorithms", type=csv_list, default=["fedcoe", "fedavg"],
                   help="comma-separated, from: " + ", ".join(ALGORITHMS))
    p.add_argument("--seeds", type=int_list, default=[0], help="comma-separated seeds")
    p.add_argument("--config", type=Path, default=None, help="TOML file with [model] and [train] sections")
    p.add_argument("--out", type=Path, default=Path("runs/simulate"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcoe_edge.data.federation import check_data_fraction
    from fedcoe_edge.simulation import (
        SimulationConfig,
        diagnostics_table,
        results_table,
        simulate,
        write_outputs,
    )

    check_out_dir(args.out)
    if args.data_fraction is None:
        args.data_fraction = FMNIST_DEFAULT_FRACTION if args.dataset == "fmnist" else 1.0
    check_data_fraction(args.data_fraction, "--data-fraction")  # before any data is read
    sections = load_toml_sections(args.config)
    train = TrainConfig.from_dict(sections.get("train", {}))
    if args.local_epochs is not None:
        train.local_epochs = args.local_epochs
        train.validate()
    cfg = SimulationConfig(dataset=args.dataset, partition=args.partition, alpha=args.alpha,
                           clients=args.clients, new_clients=args.new_clients, rounds=args.rounds,
                           algorithms=args.algorithms, seeds=args.seeds, min_samples=args.min_samples,
                           data_fraction=args.data_fraction,
                           data_dir=None if args.data_dir is None else str(args.data_dir),
                           # a folder is read at the model's input shape when [model] gives one,
                           # as a device agent reads it at its image_shape
                           image_shape=folder_shape(args.dataset, sections.get("model", {})),
                           model=ModelConfig.from_dict(sections.get("model", {})), train=train)
    cfg.validate()
    doc, runs = simulate(cfg, progress=not args.no_progress)
    write_outputs(args.out, doc, runs)
    print(results_table(doc))
    if doc.get("diagnostics"):
        print("\n" + "\n".join(diagnostics_table(doc["diagnostics"])))
    print(f"\nwrote {args.out}/results.json, report.md, curves.png, checkpoints/")
    return 0
