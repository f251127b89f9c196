"""Partitioners: split sample indices over clients (docs/design.md, section 5).

* ``dirichlet``: label skew as in Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (arXiv 1909.06335), with the minimum-size
  resampling loop of PFLlib / FL-bench: draw again until every client holds ``min_samples``,
  and fail with the numbers when that is out of reach.
* ``iid``: a uniform random split into near-equal parts (the homogeneous control).
* ``shards``: the pathological split of McMahan et al. (AISTATS 2017): sort by label, cut into
  ``num_clients * shards_per_client`` equal shards, deal each client ``shards_per_client``.
* ``quantity``: quantity skew of Li et al., "Federated Learning on Non-IID Data Silos"
  (NIID-Bench, ICDE 2022): client sizes ~ Dir(alpha) on top of the minimum, labels IID.

Every partitioner returns disjoint index arrays that cover all samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcoe_edge.errors import DataError


@dataclass(frozen=True)
class PartitionSpec:
    """How to split: which partitioner and its knobs."""

    name: str = "dirichlet"
    alpha: float = 0.5  # Dirichlet concentration; smaller = more skewed
    min_samples: int = 20  # every client gets at least this many samples
    max_tries: int = 2000  # resampling budget before giving up with a DataError
    shards_per_client: int = 2  # ``shards``: label shards dealt to each client


Partitioner = Callable[[np.ndarray, int, np.random.Generator, PartitionSpec], list[np.ndarray]]


def check_capacity(num_samples: int, num_clients: int, min_samples: int) -> None:
    if num_clients < 1:
        raise DataError(f"need at least 1 client, got {num_clients}")
    if num_clients * min_samples > num_samples:
        raise DataError(
            f"cannot give {num_clients} clients {min_samples} samples each: only {num_samples} "
            f"samples to partition (max clients at this minimum: {num_samples // max(min_samples, 1)})"
        )


def dirichlet_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                        spec: PartitionSpec) -> list[np.ndarray]:
    """Per class, split its samples over clients with proportions ~ Dir(alpha).

    Clients already holding more than N / num_clients samples get no more of the next class
    (the usual balancing trick), which keeps retries rare even at alpha = 0.1.
    """
    if not spec.alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {spec.alpha}")
    check_capacity(len(labels), num_clients, spec.min_samples)
    classes = np.unique(labels)
    cap = len(labels) / num_clients
    for _ in range(spec.max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, spec.alpha))
            p = p * np.array([len(part) < cap for part in parts])
            if p.sum() <= 0:
                p = np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= spec.min_samples:
            return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]
    raise DataError(
        f"dirichlet(alpha={spec.alpha}) could not give all {num_clients} clients >= "
        f"{spec.min_samples} samples from {len(labels)} in {spec.max_tries} draws; "
        f"use fewer clients, a larger alpha or a smaller minimum"
    )


def iid_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                  spec: PartitionSpec) -> list[np.ndarray]:
    """A uniform random split into near-equal parts (sizes differ by at most one)."""
    check_capacity(len(labels), num_clients, spec.min_samples)
    return [np.sort(part) for part in np.array_split(rng.permutation(len(labels)), num_clients)]


def shards_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                     spec: PartitionSpec) -> list[np.ndarray]:
    """McMahan's pathological split: each client holds ``shards_per_client`` label-sorted shards,
    so it sees at most that many classes. Leftover samples (N mod shards) go one each to the
    first clients, so nothing is dropped."""
    c = spec.shards_per_client
    if c < 1:
        raise DataError(f"shards_per_client must be >= 1, got {c}")
    check_capacity(len(labels), num_clients, spec.min_samples)
    num_shards = num_clients * c
    shard_size = len(labels) // num_shards
    if shard_size * c < spec.min_samples:
        raise DataError(
            f"shards: {len(labels)} samples in {num_shards} shards ({num_clients} clients x {c}) "
            f"give {shard_size * c} samples per client, below the minimum {spec.min_samples}"
        )
    # stable sort by label with a random order inside each class
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    shards = [order[i * shard_size:(i + 1) * shard_size] for i in range(num_shards)]
    leftover = order[num_shards * shard_size:]
    deal = rng.permutation(num_shards).reshape(num_clients, c)
    parts = [np.concatenate([shards[s] for s in row]) for row in deal]
    for i, idx in enumerate(leftover):
        parts[i % num_clients] = np.append(parts[i % num_clients], idx)
    return [np.sort(p.astype(np.int64)) for p in parts]


def quantity_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator,
                       spec: PartitionSpec) -> list[np.ndarray]:
    """Quantity skew: every client gets ``min_samples`` plus a Dir(alpha) share of the rest.

    No resampling is needed: the minimum is dealt first, so the only impossible case is too
    few samples for the minimum, which ``check_capacity`` reports with the numbers.
    """
    if not spec.alpha > 0:
        raise DataError(f"quantity alpha must be > 0, got {spec.alpha}")
    check_capacity(len(labels), num_clients, spec.min_samples)
    spare = len(labels) - num_clients * spec.min_samples
    extra = np.floor(rng.dirichlet(np.full(num_clients, spec.alpha)) * spare).astype(np.int64)
    extra[: spare - int(extra.sum())] += 1  # hand out the rounding remainder
    sizes = spec.min_samples + extra
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(len(labels)), cuts)]


PARTITIONERS: dict[str, Partitioner] = {
    "dirichlet": dirichlet_partition,
    "iid": iid_partition,
    "shards": shards_partition,
    "quantity": quantity_partition,
}
