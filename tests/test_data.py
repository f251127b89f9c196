"""Partitioner guarantees and the evaluation protocol's splits."""

import numpy as np
import pytest

from fedcoe_edge.data import make_federation
from fedcoe_edge.data.partition import PartitionSpec, dirichlet_partition
from fedcoe_edge.errors import ConfigError, DataError


@pytest.mark.parametrize("alpha", [0.1, 0.5, 10.0])
def test_dirichlet_disjoint_complete_and_minimum(alpha):
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 12, np.random.default_rng(0), PartitionSpec(alpha=alpha, min_samples=30))
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))
    assert min(len(p) for p in parts) >= 30


def test_dirichlet_is_deterministic_and_seed_dependent():
    labels = np.repeat(np.arange(10), 50)
    a = dirichlet_partition(labels, 5, np.random.default_rng(3), PartitionSpec(alpha=0.5))
    b = dirichlet_partition(labels, 5, np.random.default_rng(3), PartitionSpec(alpha=0.5))
    c = dirichlet_partition(labels, 5, np.random.default_rng(4), PartitionSpec(alpha=0.5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_gives_skewed_labels():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet_partition(labels, 10, np.random.default_rng(0), PartitionSpec(alpha=0.1, min_samples=10))
    classes_per_client = [len(np.unique(labels[p][np.bincount(labels[p]).argsort()[-3:]])) for p in parts]
    dominant_share = np.mean([np.bincount(labels[p]).max() / len(p) for p in parts])
    assert dominant_share > 0.5, classes_per_client


def test_impossible_minimum_names_the_numbers():
    labels = np.repeat(np.arange(2), 10)
    with pytest.raises(DataError, match="cannot give 5 clients 10 samples"):
        dirichlet_partition(labels, 5, np.random.default_rng(0), PartitionSpec(min_samples=10))
    with pytest.raises(DataError, match="draws"):
        dirichlet_partition(np.repeat(np.arange(10), 20), 10, np.random.default_rng(0),
                            PartitionSpec(alpha=0.001, min_samples=19, max_tries=20))


def test_federation_protocol():
    fed = make_federation("digits", "dirichlet", num_clients=10, num_new_clients=2, seed=1, alpha=0.5)
    counts = np.bincount(fed.y_global_test)
    assert len(set(counts.tolist())) == 1  # balanced global test set
    assert len(fed.clients) == 10 and len(fed.new_clients) == 2
    for data in fed.clients.values():
        n = len(data.y_train) + len(data.y_val) + len(data.y_test)
        assert n >= 20
        assert abs(len(data.y_train) - 0.60 * n) <= 2  # 60/15/25 train/validation/test
        assert abs(len(data.y_val) - 0.15 * n) <= 1 and abs(len(data.y_test) - 0.25 * n) <= 1
        assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
        assert data.x_val.dtype == np.float32 and data.y_val.dtype == np.int64
        assert data.x_val.shape[1:] == data.x_train.shape[1:]
    for data in fed.new_clients.values():
        assert len(data.y_train) == 0 and len(data.y_val) == 0 and len(data.y_test) >= 20
    again = make_federation("digits", "dirichlet", num_clients=10, num_new_clients=2, seed=1, alpha=0.5)
    assert np.array_equal(again.clients["3"].y_test, fed.clients["3"].y_test)


def test_federation_bad_input():
    with pytest.raises(ConfigError):
        make_federation(partition="nope")
    with pytest.raises(ConfigError):
        make_federation(dataset="nope")
    with pytest.raises(ConfigError):
        make_federation(alpha=0.0)
    with pytest.raises(DataError):
        make_federation(num_clients=400)


def test_data_layer_does_not_import_the_strategies():
    """Data sources build ``ClientData`` themselves: the data layer sits below the strategies."""
    import pkgutil
    import subprocess
    import sys

    import fedcoe_edge.data

    modules = [f"fedcoe_edge.data.{m.name}" for m in pkgutil.iter_modules(fedcoe_edge.data.__path__)]
    assert "fedcoe_edge.data.client" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('fedcoe_edge.strategies')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from fedcoe_edge.data import ClientData
    from fedcoe_edge.strategies.base import ClientData as Reexported
    assert Reexported is ClientData
