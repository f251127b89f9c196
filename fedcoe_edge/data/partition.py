"""Label-skew partitioners: split sample indices over clients.

Dirichlet label skew as in Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification" (arXiv 1909.06335), with the minimum-size
resampling loop of PFLlib / FL-bench: draw again until every client holds ``min_samples``,
and fail with the numbers when that is out of reach.
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


PARTITIONERS: dict[str, Partitioner] = {
    "dirichlet": dirichlet_partition,
}
