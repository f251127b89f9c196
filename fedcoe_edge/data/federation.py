"""Build a federation following the evaluation protocol of design section 5 (PFLlib /
FL-bench conventions):

1. a class-balanced global test set is held out first;
2. the rest is partitioned over training clients and new (cold-start) clients;
3. each training client splits 75/25 into train/test; a new client's data is all test.

Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcoe_edge.data.datasets import load_dataset
from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec
from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.strategies.base import ClientData


@dataclass
class Federation:
    """Everything a simulation needs: clients' splits, new clients, the global test set."""

    clients: dict[str, ClientData]  # training clients, id -> data
    new_clients: dict[str, ClientData]  # cold-start clients: all their data is x_test/y_test
    x_global_test: np.ndarray
    y_global_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    meta: dict[str, object] = field(default_factory=dict)


def balanced_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of a test set with the same count per class: ``fraction`` of the rarest class."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = max(1, int(fraction * counts.min()))
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in classes]))


def split_train_test(idx: np.ndarray, rng: np.random.Generator, train_fraction: float = 0.75
                     ) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(idx)
    cut = max(1, min(len(order) - 1, int(round(train_fraction * len(order)))))
    return np.sort(order[:cut]), np.sort(order[cut:])


def make_federation(dataset: str = "digits", partition: str = "dirichlet", num_clients: int = 20,
                    num_new_clients: int = 4, seed: int = 0, alpha: float = 0.5,
                    min_samples: int = 20, test_fraction: float = 0.15,
                    x: np.ndarray | None = None, y: np.ndarray | None = None) -> Federation:
    """Hold out, partition and split a dataset; pass ``x``/``y`` to use arrays you already have."""
    if partition not in PARTITIONERS:
        raise ConfigError(f"unknown partition {partition!r}; known: {', '.join(sorted(PARTITIONERS))}")
    if num_new_clients < 0:
        raise ConfigError(f"new clients must be >= 0, got {num_new_clients}")
    if partition == "dirichlet" and not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if x is None or y is None:
        x, y = load_dataset(dataset, seed)
    rng = np.random.default_rng(seed)
    test_idx = balanced_holdout(y, test_fraction, rng)
    rest = np.setdiff1d(np.arange(len(y)), test_idx)
    spec = PartitionSpec(partition, alpha, min_samples)
    total = num_clients + num_new_clients
    parts = PARTITIONERS[partition](y[rest], total, rng, spec)
    if len(parts) != total:
        raise DataError(f"partitioner {partition!r} returned {len(parts)} parts for {total} clients")
    clients: dict[str, ClientData] = {}
    for i, part in enumerate(parts[:num_clients]):
        tr, te = split_train_test(rest[part], rng)
        clients[str(i)] = ClientData(x[tr], y[tr], x[te], y[te])
    new_clients: dict[str, ClientData] = {}
    empty_x = np.zeros((0, *x.shape[1:]), dtype=x.dtype)
    empty_y = np.zeros((0,), dtype=y.dtype)
    for j, part in enumerate(parts[num_clients:]):
        idx = rest[part]
        new_clients[f"new{j}"] = ClientData(empty_x, empty_y, x[idx], y[idx])
    return Federation(clients, new_clients, x[test_idx], y[test_idx], tuple(x.shape[1:]),
                      int(y.max()) + 1,
                      meta={"dataset": dataset, "partition": partition, "alpha": alpha,
                            "seed": seed, "min_samples": min_samples,
                            "global_test_size": int(len(test_idx))})
