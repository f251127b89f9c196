"""Datasets and partitions: Synthetic(alpha, beta), digits-shift, iid/shards/quantity,
and the local-file loaders (on files these tests write)."""

import pickle

import numpy as np
import pytest

from fedcoe_edge.data import make_federation
from fedcoe_edge.data.datasets import load_dataset
from fedcoe_edge.data.loaders import load_cifar10_batches, load_image_folder
from fedcoe_edge.data.partition import (
    PartitionSpec,
    iid_partition,
    quantity_partition,
    shards_partition,
)
from fedcoe_edge.data.shift import Camera, apply_camera
from fedcoe_edge.data.synthetic import parse_synthetic_name, synthetic_users
from fedcoe_edge.errors import ConfigError, DataError

LABELS = np.repeat(np.arange(10), 100)


# --- FedProx Synthetic -----------------------------------------------------------------------
def test_synthetic_shapes_sizes_and_determinism():
    users = synthetic_users(30, 1.0, 1.0, seed=0)
    assert len(users) == 30
    for x, y in users:
        assert x.shape[1] == 60 and x.dtype == np.float32 and y.dtype == np.int64
        assert len(x) == len(y) >= 50 and y.min() >= 0 and y.max() <= 9
    again = synthetic_users(30, 1.0, 1.0, seed=0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(users, again, strict=True))
    other = synthetic_users(30, 1.0, 1.0, seed=1)
    assert not np.array_equal(users[0][0][:5], other[0][0][:5])


def test_synthetic_lognormal_sizes():
    sizes = np.array([len(y) for _, y in synthetic_users(200, 0.0, 0.0, seed=3)])
    logs = np.log(np.maximum(sizes - 50, 1))  # sizes = int(lognormal(4, 2)) + 50
    assert abs(np.median(logs) - 4.0) < 0.5
    assert 1.4 < logs.std() < 2.6


def test_synthetic_feature_covariance_is_j_pow_minus_1_2():
    users = synthetic_users(40, 1.0, 1.0, seed=0)
    x, _ = max(users, key=lambda u: len(u[1]))
    assert len(x) > 500
    var = x.astype(np.float64).var(0)
    expected = np.arange(1, 61, dtype=np.float64) ** -1.2
    np.testing.assert_allclose(var[:10], expected[:10], rtol=0.25)


def test_synthetic_beta_controls_input_shift():
    def spread(beta):
        return np.var([x.mean() for x, _ in synthetic_users(100, 0.0, beta, seed=2)])
    assert spread(0.0) < 0.1 < 0.5 < spread(1.0)  # var of user means: 1/60 vs beta^2 + 1/60


def test_synthetic_labels_are_a_linear_argmax_per_user():
    """y = argmax(W_k^T x + b_k): within one user the classes are linearly separable."""
    from sklearn.linear_model import LogisticRegression

    users = synthetic_users(12, 1.0, 1.0, seed=0)
    x, y = sorted(users, key=lambda u: len(u[1]))[6]  # a mid-sized user
    assert len(np.unique(y)) >= 2
    fit = LogisticRegression(C=1e4, max_iter=3000).fit(x, y)
    assert fit.score(x, y) > 0.97


def test_synthetic_names():
    assert parse_synthetic_name("synthetic") == (1.0, 1.0, False)
    assert parse_synthetic_name("synthetic(0.5,0.5)") == (0.5, 0.5, False)
    assert parse_synthetic_name("synthetic-iid") == (0.0, 0.0, True)
    assert parse_synthetic_name("digits") is None


def test_natural_federation_is_one_user_per_client():
    fed = make_federation("synthetic(1,1)", "natural", num_clients=6, num_new_clients=2, seed=0)
    users = synthetic_users(8, 1.0, 1.0, seed=0)
    assert len(fed.clients) == 6 and len(fed.new_clients) == 2 and fed.input_shape == (60,)
    for i, data in enumerate(fed.clients.values()):
        n_client = len(data.y_train) + len(data.y_val) + len(data.y_test)
        assert n_client < len(users[i][1])  # the rest went to the global test set
        assert len(data.y_val) >= 1 and len(data.y_test) >= 1
    total_train_users = sum(len(u[1]) for u in users[:6])
    held = sum(len(d.y_train) + len(d.y_val) + len(d.y_test) for d in fed.clients.values())
    assert held + len(fed.y_global_test) == total_train_users
    new = fed.new_clients["new1"]
    # a new user is an unlabelled pool (30%) and a test split, together the whole user
    assert len(new.y_train) == 0 and len(new.x_pool) + len(new.y_test) == len(users[7][1])
    assert len(new.x_pool) == round(0.3 * len(users[7][1]))
    with pytest.raises(ConfigError, match="natural"):
        make_federation("digits", "natural", num_clients=4)


# --- partitioners ----------------------------------------------------------------------------
def assert_disjoint_complete(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n == len(np.unique(joined))


def test_iid_partition():
    parts = iid_partition(LABELS, 7, np.random.default_rng(0), PartitionSpec(min_samples=10))
    assert_disjoint_complete(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(np.unique(LABELS[p])) >= 8 for p in parts)


def test_shards_partition_limits_classes():
    parts = shards_partition(LABELS, 10, np.random.default_rng(0),
                             PartitionSpec(min_samples=10, shards_per_client=2))
    assert_disjoint_complete(parts, len(LABELS))
    assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    with pytest.raises(DataError, match="80 shards .* give 24 samples per client, below the minimum 25"):
        shards_partition(LABELS, 40, np.random.default_rng(0),
                         PartitionSpec(min_samples=25, shards_per_client=2))


def test_shards_leftover_is_kept():
    labels = np.repeat(np.arange(3), 11)  # 33 samples, 4 shards of 8 + 1 leftover
    parts = shards_partition(labels, 2, np.random.default_rng(0), PartitionSpec(min_samples=1))
    assert_disjoint_complete(parts, 33)


def test_quantity_partition_skews_sizes_not_labels():
    parts = quantity_partition(LABELS, 10, np.random.default_rng(1), PartitionSpec(alpha=0.5, min_samples=25))
    assert_disjoint_complete(parts, len(LABELS))
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 25 and sizes.max() > 3 * sizes.min()
    big = parts[int(sizes.argmax())]
    assert len(np.unique(LABELS[big])) == 10
    with pytest.raises(DataError, match="cannot give 10 clients 101 samples"):
        quantity_partition(LABELS, 10, np.random.default_rng(0), PartitionSpec(min_samples=101))


@pytest.mark.parametrize("partition", ["iid", "shards", "quantity"])
def test_federation_with_new_partitions(partition):
    fed = make_federation("digits", partition, num_clients=8, num_new_clients=1, seed=0, alpha=1.0)
    assert len(fed.clients) == 8 and all(len(d.y_train) + len(d.y_test) >= 20 for d in fed.clients.values())
    with pytest.raises(DataError, match="cannot give 100 clients"):
        make_federation("digits", partition, num_clients=100, num_new_clients=0, seed=0, alpha=1.0)


# --- digits-shift ----------------------------------------------------------------------------
def test_digits_shift_same_labels_new_cameras():
    plain = make_federation("digits", "dirichlet", num_clients=5, num_new_clients=1, seed=4)
    shifted = make_federation("digits-shift", "dirichlet", num_clients=5, num_new_clients=1, seed=4)
    cams = shifted.meta["cameras"]
    assert set(cams) == {"0", "1", "2", "3", "4", "new0"}
    assert len({c["angle"] for c in cams.values()}) == 6  # every client its own camera
    for cid in plain.clients:
        a, b = plain.clients[cid], shifted.clients[cid]
        assert np.array_equal(a.y_train, b.y_train)  # label partition unchanged
        assert not np.allclose(a.x_train, b.x_train)
        assert b.x_train.min() >= 0 and b.x_train.max() <= 1 and b.x_train.dtype == np.float32
    assert np.array_equal(plain.y_global_test, shifted.y_global_test)
    assert not np.allclose(plain.x_global_test, shifted.x_global_test)
    again = make_federation("digits-shift", "dirichlet", num_clients=5, num_new_clients=1, seed=4)
    assert np.array_equal(again.clients["2"].x_test, shifted.clients["2"].x_test)


def test_camera_is_the_transformation_it_says():
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 1:7, 3:5] = 1.0  # a vertical bar
    rng = np.random.default_rng(0)
    rotated = apply_camera(x, Camera(90, 1.0, 0.0, 0.0, 0.0), rng)
    np.testing.assert_allclose(rotated[0, 0], np.rot90(x[0, 0]), atol=1e-5)  # 90 deg turns the bar
    dim = apply_camera(x, Camera(0, 0.5, 0.1, 0.0, 0.0), rng)
    np.testing.assert_allclose(dim, x * 0.5 + 0.1, atol=1e-6)
    noisy = apply_camera(x, Camera(0, 1.0, 0.0, 0.0, 0.1), rng)
    assert 0.03 < float(np.abs(noisy - x).mean()) < 0.1


# --- local-file loaders ----------------------------------------------------------------------
def write_cifar(root, n=4):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[0, :] = k  # a marker per file
        with open(root / name, "wb") as fh:
            pickle.dump({b"data": data, b"labels": [(k + i) % 10 for i in range(n)]}, fh)


def test_cifar10_batches(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    write_cifar(root)
    x, y = load_cifar10_batches(root)
    assert x.shape == (24, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(x[4, 0, 0, 0], 1 / 255)  # second file's marker, in file order
    xt, yt = load_cifar10_batches(root, train=False)
    assert len(yt) == 4 and yt.tolist() == [5, 6, 7, 8]
    x2, _ = load_dataset(f"cifar10:{root}")
    assert np.array_equal(x2, x)


def test_cifar10_bad_files(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10_batches(root)
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10_batches(root)
    with open(root / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match="3072"):
        load_cifar10_batches(root)
    with pytest.raises(DataError, match="not found"):
        load_cifar10_batches(tmp_path / "missing")


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 40), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 12, 3), value + i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    x, y, classes = load_image_folder(tmp_path, size=(8, 8))
    assert classes == ["cat", "dog"] and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x.shape == (6, 3, 8, 8)
    np.testing.assert_allclose(x[0], 40 / 255, atol=1e-6)
    np.testing.assert_allclose(x[5], 202 / 255, atol=1e-6)
    g, _, _ = load_image_folder(tmp_path, size=(4, 4), grayscale=True)
    assert g.shape == (6, 1, 4, 4)
    xs, ys = load_dataset(f"folder:{tmp_path}")
    assert xs.shape == (6, 3, 32, 32) and len(ys) == 6


def test_image_folder_errors(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="at least 2 class"):
        load_image_folder(tmp_path)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path)
    (tmp_path / "a" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read image"):
        load_image_folder(tmp_path)
