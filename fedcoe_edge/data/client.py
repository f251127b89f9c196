"""A client's own data splits: the unit every data source produces and every strategy consumes.

It lives in the data layer so that datasets, partitioners and distribution shifts can build it
without importing the strategy contract (``fedcoe_edge.strategies.base`` re-exports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _empty_x() -> np.ndarray:
    return np.zeros((0,), dtype=np.float32)


def _empty_y() -> np.ndarray:
    return np.zeros((0,), dtype=np.int64)


@dataclass
class ClientData:
    """A client's own data. ``x_*`` are float32 (N, *input_shape), ``y_*`` int64 (N,).

    The validation split (``x_val``/``y_val``) is for choices made on the client (early
    stopping, picking a personalisation step) so that the test split stays unseen. It comes
    last and defaults to empty, so data sources without one (a device's ``.npz``) still build
    a ``ClientData(x_train, y_train, x_test, y_test)``; the empty default takes the sample
    shape and dtype of ``x_train`` so code can concatenate it with the other splits.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_val: np.ndarray = field(default_factory=_empty_x)
    y_val: np.ndarray = field(default_factory=_empty_y)
    # unlabelled inputs a new (cold-start) device may look at before it predicts, disjoint
    # from its test split: cold start picks its experts from these, never from the inputs it
    # is scored on (docs/design.md, "Cold start")
    x_pool: np.ndarray = field(default_factory=_empty_x)

    def __post_init__(self) -> None:
        if len(self.x_val) == 0 and self.x_val.shape[1:] != self.x_train.shape[1:]:
            self.x_val = np.zeros((0, *self.x_train.shape[1:]), dtype=self.x_train.dtype)
        if len(self.x_pool) == 0 and self.x_pool.shape[1:] != self.x_train.shape[1:]:
            self.x_pool = np.zeros((0, *self.x_train.shape[1:]), dtype=self.x_train.dtype)

    @property
    def num_train(self) -> int:
        return int(len(self.y_train))

    @property
    def num_val(self) -> int:
        return int(len(self.y_val))
