"""``fedcoe heterogeneity``: how non-IID is a federation, and should it personalise?

Builds the federation the simulator would (same dataset, partition, seed), measures the
clients' label distributions (docs/design.md section 6, ``fedcoe_edge.heterogeneity``), writes the
JSON report and a heat-map PNG, and prints the recommendation with its evidence.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedcoe_edge.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heterogeneity",
        help="measure label heterogeneity across clients and recommend FedAvg or FedCoE",
        description="Partition a dataset as the simulator would and report per-client total "
                    "variation (= EMD over labels), Jensen-Shannon distance and smoothed KL to "
                    "the population, the mean pairwise JS distance, a heat map of client label "
                    "distributions, and a recommendation (dual-level-moe or fedavg) with the "
                    "threshold and evidence it used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits",
                   help="digits, digits-shift, fmnist, synthetic, synthetic(a,b), synthetic-iid, "
                        "cifar10:PATH, folder:PATH")
    p.add_argument("--data-fraction", type=float, default=1.0,
                   help="stratified share of the training pool partitioned over clients, in (0, 1]; "
                        "e.g. 0.1 = 6,000 fmnist training images")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of a dataset read from disk (fmnist; default $FEDCOE_FMNIST_DIR, "
                        "else /usr/share/datasets/fashion-mnist)")
    p.add_argument("--partition", default="dirichlet",
                   help="dirichlet, iid, shards, quantity, or natural (synthetic)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet / quantity concentration")
    p.add_argument("--clients", type=int, default=20, help="training clients")
    p.add_argument("--shards-per-client", type=int, default=2, help="c of the shards partition")
    p.add_argument("--min-samples", type=int, default=20, help="minimum samples per client")
    p.add_argument("--seed", type=int, default=0, help="partition seed")
    p.add_argument("--threshold", type=float, default=None,
                   help="excess mean pairwise JS above which to recommend dual-level-moe "
                        "(default: the module's)")
    p.add_argument("--json", type=Path, required=True, help="where to write the JSON report")
    p.add_argument("--png", type=Path, default=None, help="heat map (default: JSON path .png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcoe_edge.data import make_federation
    from fedcoe_edge.data.federation import check_data_fraction
    from fedcoe_edge.heterogeneity import DEFAULT_THRESHOLD, analyse_labels, plot_heatmap
    from fedcoe_edge.io import atomic_write_text

    if args.clients < 2:
        raise ConfigError(f"--clients must be >= 2 to compare clients, got {args.clients}")
    if args.json.exists() and args.json.is_dir():
        raise ConfigError(f"--json {args.json} is a folder; give a file path")
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    if threshold < 0:
        raise ConfigError(f"--threshold must be >= 0, got {threshold}")
    check_data_fraction(args.data_fraction, "--data-fraction")
    fed = make_federation(args.dataset, args.partition, args.clients, 0, args.seed, args.alpha,
                          args.min_samples, shards_per_client=args.shards_per_client,
                          data_fraction=args.data_fraction,
                          data_dir=None if args.data_dir is None else str(args.data_dir))
    # a client's whole label distribution: every split it holds
    labels = {cid: np.concatenate([d.y_train, d.y_val, d.y_test]) for cid, d in fed.clients.items()}
    report = analyse_labels(labels, fed.num_classes, threshold, args.seed)
    report["federation"] = {"dataset": args.dataset, "partition": args.partition,
                            "alpha": args.alpha, "clients": args.clients, "seed": args.seed,
                            "min_samples": args.min_samples, "data_fraction": args.data_fraction}
    png = args.png or args.json.with_suffix(".png")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    plot_heatmap(report, png, title=f"{args.dataset} / {args.partition}"
                                    f"{' alpha=' + str(args.alpha) if args.partition in ('dirichlet', 'quantity') else ''}"
                                    f": {report['recommendation']}")
    ev = report["evidence"]
    print(f"mean TV {report['mean_tv']:.3f}, mean pairwise JS {report['mean_pairwise_js']:.3f} "
          f"(IID baseline {ev['iid_baseline_js']:.3f}, excess {ev['excess_js']:.3f}, "
          f"threshold {ev['threshold']}): recommend {report['recommendation']}")
    print(f"wrote {args.json} and {png}")
    return 0
