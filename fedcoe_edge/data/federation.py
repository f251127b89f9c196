"""Build a federation following the evaluation protocol of docs/design.md section 5 (PFLlib /
FL-bench conventions):

1. the global test set: a dataset's official test split when it ships one (``fmnist``: all
   10,000 images), else a class-balanced hold-out taken first;
2. optionally a stratified ``data_fraction`` of what is left (the pool), so a slow machine can
   run a smaller federation with the same class mix;
3. the pool is partitioned over training clients and new (cold-start) clients;
4. each training client splits 60/15/25 into train/validation/test (``val_fraction``,
   ``client_test_fraction``), with at least one validation and one test sample, so choices
   tuned on a client never touch the numbers it reports; a new (cold-start) client's data
   splits into an unlabelled pool (``cold_pool_fraction``, 30%) and a test split: cold start
   chooses its experts from the pool and is scored on the test split only.

Per-user datasets (FedProx's Synthetic) take the ``natural`` partition: each user is a
client, the global test set is ``test_fraction`` of every training user's samples. Feature-
shifted datasets (``digits-shift``) get one camera per client after the label partition.

Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcoe_edge.data.client import ClientData
from fedcoe_edge.data.datasets import SHIFTED_DATASETS, load_dataset_splits
from fedcoe_edge.data.partition import PARTITIONERS, PartitionSpec
from fedcoe_edge.errors import ConfigError, DataError


@dataclass
class Federation:
    """Everything a simulation needs: clients' splits, new clients, the global test set."""

    clients: dict[str, ClientData]  # training clients, id -> data
    new_clients: dict[str, ClientData]  # cold-start clients: x_pool (unlabelled) + x_test/y_test
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


def check_data_fraction(fraction: float, what: str = "data fraction") -> None:
    """ConfigError (one line) unless the share of a dataset to use is in (0, 1]; ``what`` names
    it as the caller's user knows it (e.g. ``--data-fraction``). The one place for this range."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"{what} must be in (0, 1], got {fraction}")


def check_fractions(val_fraction: float, client_test_fraction: float,
                    data_fraction: float = 1.0) -> None:
    """ConfigError (one line) for split fractions that cannot leave a client any training data."""
    check_data_fraction(data_fraction)
    if not 0 < val_fraction < 1 or not 0 < client_test_fraction < 1:
        raise ConfigError(f"client validation and test fractions must be in (0, 1), got "
                          f"{val_fraction} and {client_test_fraction}")
    if val_fraction + client_test_fraction >= 1:
        raise ConfigError(f"client validation + test fractions must be < 1 to leave training data, "
                          f"got {val_fraction} + {client_test_fraction}")


def stratified_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of ``fraction`` of every class (at least one each), so a smaller run
    keeps the class mix and every class the full data has."""
    if fraction >= 1:
        return np.arange(len(labels))
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        picked.append(rng.choice(members, k, replace=False))
    return np.sort(np.concatenate(picked))


def split_train_val_test(idx: np.ndarray, rng: np.random.Generator, client: str,
                         val_fraction: float = 0.15, test_fraction: float = 0.25
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle ``idx`` and cut it into sorted (train, validation, test) index arrays.

    Validation and test get at least one sample each and training keeps at least one; a
    client too small for that is a DataError naming it, because a split with an empty test
    set would silently drop the client from the personalised accuracy.
    """
    n = len(idx)
    n_val = max(1, int(round(val_fraction * n)))
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_val - n_test < 1:
        raise DataError(f"client {client} has {n} samples, too few for a train/validation/test "
                        f"split with at least 1 each ({n_val} validation + {n_test} test asked); "
                        f"raise the minimum samples per client")
    order = rng.permutation(idx)
    n_train = n - n_val - n_test
    return (np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]),
            np.sort(order[n_train + n_val:]))


COLD_POOL_FRACTION = 0.3  # share of a new client's data that is its unlabelled pool


def check_pool_fraction(fraction: float) -> None:
    """ConfigError (one line) unless a new client's pool share leaves it a test split."""
    if not 0 < fraction < 1:
        raise ConfigError(f"cold-start pool fraction must be in (0, 1), got {fraction}")


def split_new_client(x: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator,
                     client: str, pool_fraction: float = COLD_POOL_FRACTION) -> ClientData:
    """A new (cold-start) client: ``pool_fraction`` of ``idx`` is its unlabelled pool (the
    inputs cold start may route to choose its experts), the rest its test split (the inputs
    it is scored on), disjoint, at least one each. No training or validation data: it
    joins after training. A client too small for that is a DataError naming it."""
    n = len(idx)
    n_pool = max(1, int(round(pool_fraction * n)))
    if n - n_pool < 1:
        raise DataError(f"new client {client} has {n} samples, too few for an unlabelled pool "
                        f"and a test split with at least 1 each; raise the minimum samples per client")
    order = rng.permutation(idx)
    pool, test = np.sort(order[:n_pool]), np.sort(order[n_pool:])
    return ClientData(x[:0], y[:0], x[test], y[test], x_pool=x[pool])


def split_client(x: np.ndarray, y: np.ndarray, idx: np.ndarray, rng: np.random.Generator,
                 client: str, val_fraction: float, test_fraction: float) -> ClientData:
    tr, va, te = split_train_val_test(idx, rng, client, val_fraction, test_fraction)
    return ClientData(x[tr], y[tr], x[te], y[te], x[va], y[va])


def make_user_federation(users: list[tuple[np.ndarray, np.ndarray]], num_clients: int,
                         num_new_clients: int, seed: int, min_samples: int = 20,
                         test_fraction: float = 0.15, meta: dict[str, object] | None = None,
                         *, val_fraction: float = 0.15, client_test_fraction: float = 0.25,
                         cold_pool_fraction: float = COLD_POOL_FRACTION) -> Federation:
    """Whole users as clients: the first ``num_clients`` train, the rest are new clients.

    The global test set is ``test_fraction`` of each training user's samples (the pooled
    population); what is left of a user splits into train/validation/test by ``val_fraction``
    and ``client_test_fraction``. A user below ``min_samples`` is a DataError naming it.
    """
    check_fractions(val_fraction, client_test_fraction)
    check_pool_fraction(cold_pool_fraction)
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
        clients[str(i)] = split_client(ux, uy, order[cut:], rng, str(i), val_fraction,
                                       client_test_fraction)
    new_clients: dict[str, ClientData] = {}
    pool_rng = np.random.default_rng([seed, 4])  # its own stream: training clients unchanged
    for j, (ux, uy) in enumerate(users[num_clients:]):
        new_clients[f"new{j}"] = split_new_client(ux, uy, np.arange(len(uy)), pool_rng, f"new{j}",
                                                  cold_pool_fraction)
    x_test, y_test = np.concatenate(test_x), np.concatenate(test_y)
    num_classes = int(max(int(u[1].max()) for u in users if len(u[1])) + 1)
    info: dict[str, object] = {"partition": "natural", "seed": seed, "min_samples": min_samples,
                               "global_test_size": int(len(y_test)), "global_test": "per-user share",
                               "val_fraction": val_fraction,
                               "client_test_fraction": client_test_fraction,
                               "cold_pool_fraction": cold_pool_fraction,
                               "user_sizes": [int(len(u[1])) for u in users]}
    info.update(meta or {})
    return Federation(clients, new_clients, x_test, y_test, tuple(x_test.shape[1:]), num_classes,
                      meta=info)


def make_federation(dataset: str = "digits", partition: str = "dirichlet", num_clients: int = 20,
                    num_new_clients: int = 4, seed: int = 0, alpha: float = 0.5,
                    min_samples: int = 20, test_fraction: float = 0.15,
                    x: np.ndarray | None = None, y: np.ndarray | None = None,
                    shards_per_client: int = 2, shift_strength: float = 1.0, *,
                    data_fraction: float = 1.0, data_dir: str | None = None,
                    val_fraction: float = 0.15, client_test_fraction: float = 0.25,
                    image_shape: tuple[int, ...] | None = None,
                    cold_pool_fraction: float = COLD_POOL_FRACTION) -> Federation:
    """Hold out, partition and split a dataset; pass ``x``/``y`` to use arrays you already have.

    ``partition="natural"`` takes a per-user dataset's users as clients (synthetic only);
    ``shards_per_client`` is the ``shards`` partitioner's c; ``shift_strength`` scales the
    cameras of ``digits-shift``. ``test_fraction`` sizes the global hold-out of a dataset
    without an official test split; ``val_fraction`` / ``client_test_fraction`` split each
    training client; ``cold_pool_fraction`` of each new client is its unlabelled pool, the
    rest its test split. ``data_fraction`` in (0, 1] keeps a stratified share of the pool before
    partitioning (the global test set is never shrunk, so accuracies stay comparable);
    ``data_dir`` locates a dataset read from disk (``fmnist``), others ignore it.
    """
    if num_new_clients < 0:
        raise ConfigError(f"new clients must be >= 0, got {num_new_clients}")
    if num_clients < 1:
        raise ConfigError(f"need at least 1 client, got {num_clients}")
    check_fractions(val_fraction, client_test_fraction, data_fraction)
    check_pool_fraction(cold_pool_fraction)
    if partition == "natural":
        from fedcoe_edge.data.synthetic import load_synthetic_users, parse_synthetic_name

        if parse_synthetic_name(dataset) is None:
            raise ConfigError(f"partition 'natural' needs a per-user dataset (synthetic, "
                              f"synthetic(a,b), synthetic-iid), got {dataset!r}")
        if data_fraction != 1:
            raise ConfigError(f"data fraction {data_fraction} does not apply to the natural "
                              f"partition (whole users are clients); use 1")
        users = load_synthetic_users(dataset, num_clients + num_new_clients, seed)
        return make_user_federation(users, num_clients, num_new_clients, seed, min_samples,
                                    test_fraction, meta={"dataset": dataset},
                                    val_fraction=val_fraction,
                                    client_test_fraction=client_test_fraction,
                                    cold_pool_fraction=cold_pool_fraction)
    if partition not in PARTITIONERS:
        raise ConfigError(f"unknown partition {partition!r}; known: "
                          f"{', '.join(sorted([*PARTITIONERS, 'natural']))}")
    if partition in ("dirichlet", "quantity") and not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    official: tuple[np.ndarray, np.ndarray] | None = None
    if x is None or y is None:
        (x, y), official = load_dataset_splits(dataset, seed, data_dir, image_shape)
    rng = np.random.default_rng(seed)
    if official is None:
        test_idx = balanced_holdout(y, test_fraction, rng)
        rest = np.setdiff1d(np.arange(len(y)), test_idx)
        x_global, y_global = x[test_idx], y[test_idx]
        global_kind = "balanced hold-out"
    else:  # the official test split, whole: the pool is the whole training split
        rest = np.arange(len(y))
        x_global, y_global = official
        global_kind = "official test split"
    # its own stream, so data_fraction=1 leaves the partition of earlier versions unchanged
    rest = rest[stratified_subset(y[rest], data_fraction, np.random.default_rng([seed, 3]))]
    spec = PartitionSpec(partition, alpha, min_samples, shards_per_client=shards_per_client)
    total = num_clients + num_new_clients
    parts = PARTITIONERS[partition](y[rest], total, rng, spec)
    if len(parts) != total:
        raise DataError(f"partitioner {partition!r} returned {len(parts)} parts for {total} clients")
    clients: dict[str, ClientData] = {}
    for i, part in enumerate(parts[:num_clients]):
        clients[str(i)] = split_client(x, y, rest[part], rng, str(i), val_fraction,
                                       client_test_fraction)
    new_clients: dict[str, ClientData] = {}
    pool_rng = np.random.default_rng([seed, 4])  # its own stream: training clients unchanged
    for j, part in enumerate(parts[num_clients:]):
        new_clients[f"new{j}"] = split_new_client(x, y, rest[part], pool_rng, f"new{j}",
                                                  cold_pool_fraction)
    meta: dict[str, object] = {"dataset": dataset, "partition": partition, "alpha": alpha,
                               "seed": seed, "min_samples": min_samples,
                               "global_test_size": int(len(y_global)), "global_test": global_kind,
                               "data_fraction": data_fraction, "pool_size": int(len(rest)),
                               "val_fraction": val_fraction,
                               "client_test_fraction": client_test_fraction,
                               "cold_pool_fraction": cold_pool_fraction}
    if dataset in SHIFTED_DATASETS:
        from fedcoe_edge.data.shift import apply_random_cameras, shift_clients

        # its own stream, so digits-shift has the same label partition as digits for a seed
        shift_rng = np.random.default_rng([seed, 2])
        meta["cameras"] = shift_clients({**clients, **new_clients}, shift_rng, shift_strength)
        x_global = apply_random_cameras(x_global, shift_rng, shift_strength)
    if partition == "shards":
        meta["shards_per_client"] = shards_per_client
    num_classes = int(max(int(y.max()), int(y_global.max()) if len(y_global) else 0)) + 1
    return Federation(clients, new_clients, x_global, y_global, tuple(x.shape[1:]), num_classes,
                      meta=meta)
