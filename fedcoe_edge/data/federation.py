"""Build a federation following the evaluation protocol of design section 5 (PFLlib /
FL-bench conventions):

1. a class-balanced global test set is held out first;
2. the rest is partitioned over training clients and new (cold-start) clients;
3. each training client splits 75/25 into train/test; a new client's data is all test.

Per-user datasets (FedProx's Synthetic) take the ``natural`` partition: each user is a
client, the global test set is ``test_fraction`` of every training user's samples. Feature-
shifted datasets (``digits-shift``) get one camera per client after the label partition.

Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcoe_edge.data.datasets import SHIFTED_DATASETS, load_dataset
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


def make_user_federation(users: list[tuple[np.ndarray, np.ndarray]], num_clients: int,
                         num_new_clients: int, seed: int, min_samples: int = 20,
                         test_fraction: float = 0.15, meta: dict[str, object] | None = None
                         ) -> Federation:
    """Whole users as clients: the first ``num_clients`` train, the rest are new clients.

    The global test set is ``test_fraction`` of each training user's samples (the pooled
    population); what is left of a user splits 75/25. A user below ``min_samples`` is a
    DataError naming it.
    """
    if len(users) != num_clients + num_new_clients:
        raise DataError(f"need {num_clients + num_new_clients} users, got {len(users)}")
    small = [(i, len(u[1])) for i, u in enumerate(users) if len(u[1]) < min_samples]
    if small:
        raise DataError(f"user {small[0][0]} has {small[0][1]} samples, below the minimum {min_samples}")
    rng = np.random.default_rng([seed, 1])
    clients: dict[str, ClientData] = {}
    test_x, test_y = [], []
    for i, (ux, uy) in enumerate(users[:num_clients]):
        order = rng.permutation(len(uy))
        cut = max(1, int(round(test_fraction * len(uy))))
        test_x.append(ux[order[:cut]])
        test_y.append(uy[order[:cut]])
        tr, te = split_train_test(order[cut:], rng)
        clients[str(i)] = ClientData(ux[tr], uy[tr], ux[te], uy[te])
    new_clients: dict[str, ClientData] = {}
    for j, (ux, uy) in enumerate(users[num_clients:]):
        new_clients[f"new{j}"] = ClientData(ux[:0], uy[:0], ux, uy)
    x_test, y_test = np.concatenate(test_x), np.concatenate(test_y)
    num_classes = int(max(int(u[1].max()) for u in users if len(u[1])) + 1)
    info: dict[str, object] = {"partition": "natural", "seed": seed, "min_samples": min_samples,
                               "global_test_size": int(len(y_test)),
                               "user_sizes": [int(len(u[1])) for u in users]}
    info.update(meta or {})
    return Federation(clients, new_clients, x_test, y_test, tuple(x_test.shape[1:]), num_classes,
                      meta=info)


def make_federation(dataset: str = "digits", partition: str = "dirichlet", num_clients: int = 20,
                    num_new_clients: int = 4, seed: int = 0, alpha: float = 0.5,
                    min_samples: int = 20, test_fraction: float = 0.15,
                    x: np.ndarray | None = None, y: np.ndarray | None = None,
                    shards_per_client: int = 2, shift_strength: float = 1.0) -> Federation:
    """Hold out, partition and split a dataset; pass ``x``/``y`` to use arrays you already have.

    ``partition="natural"`` takes a per-user dataset's users as clients (synthetic only);
    ``shards_per_client`` is the ``shards`` partitioner's c; ``shift_strength`` scales the
    cameras of ``digits-shift``.
    """
    if num_new_clients < 0:
        raise ConfigError(f"new clients must be >= 0, got {num_new_clients}")
    if num_clients < 1:
        raise ConfigError(f"need at least 1 client, got {num_clients}")
    if partition == "natural":
        from fedcoe_edge.data.synthetic import load_synthetic_users, parse_synthetic_name

        if parse_synthetic_name(dataset) is None:
            raise ConfigError(f"partition 'natural' needs a per-user dataset (synthetic, "
                              f"synthetic(a,b), synthetic-iid), got {dataset!r}")
        users = load_synthetic_users(dataset, num_clients + num_new_clients, seed)
        return make_user_federation(users, num_clients, num_new_clients, seed, min_samples,
                                    test_fraction, meta={"dataset": dataset})
    if partition not in PARTITIONERS:
        raise ConfigError(f"unknown partition {partition!r}; known: "
                          f"{', '.join(sorted([*PARTITIONERS, 'natural']))}")
    if partition in ("dirichlet", "quantity") and not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if x is None or y is None:
        x, y = load_dataset(dataset, seed)
    rng = np.random.default_rng(seed)
    test_idx = balanced_holdout(y, test_fraction, rng)
    rest = np.setdiff1d(np.arange(len(y)), test_idx)
    spec = PartitionSpec(partition, alpha, min_samples, shards_per_client=shards_per_client)
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
    meta: dict[str, object] = {"dataset": dataset, "partition": partition, "alpha": alpha,
                               "seed": seed, "min_samples": min_samples,
                               "global_test_size": int(len(test_idx))}
    x_global = x[test_idx]
    if dataset in SHIFTED_DATASETS:
        from fedcoe_edge.data.shift import apply_random_cameras, shift_clients

        # its own stream, so digits-shift has the same label partition as digits for a seed
        shift_rng = np.random.default_rng([seed, 2])
        meta["cameras"] = shift_clients({**clients, **new_clients}, shift_rng, shift_strength)
        x_global = apply_random_cameras(x_global, shift_rng, shift_strength)
    if partition == "shards":
        meta["shards_per_client"] = shards_per_client
    return Federation(clients, new_clients, x_global, y[test_idx], tuple(x.shape[1:]),
                      int(y.max()) + 1, meta=meta)
