"""Fashion-MNIST: the IDX reader, the official-test-split federation, data_fraction, and the
per-client train/validation/test split. Small IDX files are written here, so nothing depends
on the Debian package except the one test that checks the real counts."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.cli import main
from fedcoe_edge.data import make_federation
from fedcoe_edge.data.datasets import load_dataset
from fedcoe_edge.data.federation import stratified_subset
from fedcoe_edge.data.fmnist import CLASS_NAMES, DEFAULT_DIR, ENV_VAR, FILES, load_fmnist
from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.strategies.base import ClientData

N_TRAIN, N_TEST = 200, 50


def idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    path.write_bytes(gzip.compress(idx_bytes(arr, magic)))


def write_fmnist(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> Path:
    """Four small IDX .gz files: random images, labels cycling 0..9."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = FILES[split]
        write_idx(root / images, rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / labels, np.arange(n) % 10, 2049)
    return root


@pytest.fixture
def fm_dir(tmp_path: Path) -> Path:
    return write_fmnist(tmp_path / "fm")


def test_shapes_dtypes_scaling(fm_dir: Path) -> None:
    (x, y), (xt, yt) = load_fmnist(str(fm_dir))
    assert x.shape == (N_TRAIN, 1, 28, 28) and xt.shape == (N_TEST, 1, 28, 28)
    assert x.dtype == xt.dtype == np.float32 and y.dtype == yt.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    raw = gzip.decompress((fm_dir / FILES["train"][0]).read_bytes())[16:]
    assert np.allclose(x.ravel(), np.frombuffer(raw, np.uint8) / 255.0)
    assert np.array_equal(y, np.arange(N_TRAIN) % 10)
    assert len(CLASS_NAMES) == 10 and CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"


def test_env_var_and_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_dir = write_fmnist(tmp_path / "env", n_train=30, n_test=10)
    arg_dir = write_fmnist(tmp_path / "arg", n_train=40, n_test=20)
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert len(load_fmnist()[0][1]) == 30  # environment variable
    assert len(load_fmnist(str(arg_dir))[0][1]) == 40  # the argument wins
    assert len(load_dataset("fmnist", data_dir=str(arg_dir))[1]) == 40  # the training split
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr("fedcoe_edge.data.fmnist.DEFAULT_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="nowhere"):
        load_fmnist()


def one_line(exc: pytest.ExceptionInfo[DataError], path: Path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg and ENV_VAR in msg
    return msg


def test_missing_file(fm_dir: Path) -> None:
    target = fm_dir / FILES["test"][1]
    target.unlink()
    with pytest.raises(DataError) as exc:
        load_fmnist(str(fm_dir))
    assert "not found" in one_line(exc, target)


def test_truncated_gzip(fm_dir: Path) -> None:
    target = fm_dir / FILES["train"][0]
    blob = target.read_bytes()
    target.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        load_fmnist(str(fm_dir))
    assert "truncated" in one_line(exc, target)


def test_not_gzip(fm_dir: Path) -> None:
    target = fm_dir / FILES["train"][1]
    target.write_bytes(b"this is not gzip at all")
    with pytest.raises(DataError) as exc:
        load_fmnist(str(fm_dir))
    one_line(exc, target)


def test_bad_magic(fm_dir: Path) -> None:
    target = fm_dir / FILES["train"][1]
    write_idx(target, np.arange(N_TRAIN) % 10, 2051)  # an image magic on a label file
    with pytest.raises(DataError) as exc:
        load_fmnist(str(fm_dir))
    assert "magic" in one_line(exc, target)


def test_payload_shorter_than_header_says(fm_dir: Path) -> None:
    target = fm_dir / FILES["train"][0]
    blob = idx_bytes(np.zeros((N_TRAIN, 28, 28)), 2051)
    target.write_bytes(gzip.compress(blob[:-28]))  # valid gzip, one row of pixels short
    with pytest.raises(DataError) as exc:
        load_fmnist(str(fm_dir))
    assert "payload" in one_line(exc, target)


def test_bad_labels_dims_and_counts(fm_dir: Path) -> None:
    labels = fm_dir / FILES["train"][1]
    write_idx(labels, np.full(N_TRAIN, 10), 2049)
    with pytest.raises(DataError, match="label 10 out of range") as exc:
        load_fmnist(str(fm_dir))
    one_line(exc, labels)
    write_idx(labels, np.arange(N_TRAIN - 1) % 10, 2049)
    with pytest.raises(DataError, match="200 images but .* has 199 labels"):
        load_fmnist(str(fm_dir))
    images = fm_dir / FILES["test"][0]
    write_idx(labels, np.arange(N_TRAIN) % 10, 2049)
    write_idx(images, np.zeros((N_TEST, 32, 32)), 2051)
    with pytest.raises(DataError, match="32x32"):
        load_fmnist(str(fm_dir))


# --- federation ------------------------------------------------------------------------------
def test_federation_uses_official_test_split(fm_dir: Path) -> None:
    (x, y), (xt, yt) = load_fmnist(str(fm_dir))
    fed = make_federation("fmnist", "iid", num_clients=4, num_new_clients=1, seed=0,
                          min_samples=10, data_dir=str(fm_dir))
    assert np.array_equal(fed.x_global_test, xt) and np.array_equal(fed.y_global_test, yt)
    assert fed.input_shape == (1, 28, 28) and fed.num_classes == 10
    assert fed.meta["global_test"] == "official test split" and fed.meta["global_test_size"] == N_TEST
    # the whole training split is partitioned, nothing of it held out
    held = [d.y_train for d in fed.clients.values()] + [d.y_val for d in fed.clients.values()]
    held += [d.y_test for d in fed.clients.values()] + [d.y_test for d in fed.new_clients.values()]
    # ... the new clients' unlabelled pools included (docs/design.md, "Cold start")
    pools = sum(len(d.x_pool) for d in fed.new_clients.values())
    assert pools > 0 and sum(len(h) for h in held) + pools == N_TRAIN
    labelled = np.bincount(np.concatenate(held), minlength=10)
    assert np.all(labelled <= np.bincount(y, minlength=10)) and labelled.sum() == N_TRAIN - pools


def test_every_client_has_disjoint_train_val_test(fm_dir: Path) -> None:
    fed = make_federation("fmnist", "dirichlet", num_clients=5, num_new_clients=1, seed=2,
                          alpha=1.0, min_samples=10, data_dir=str(fm_dir))
    for data in fed.clients.values():
        assert data.num_val >= 1 and len(data.y_test) >= 1 and data.num_train >= 1
        assert data.x_val.shape == (len(data.y_val), 1, 28, 28) and data.x_val.dtype == np.float32
        rows = {r.tobytes() for r in np.concatenate([data.x_train, data.x_val, data.x_test])}
        assert len(rows) == len(data.y_train) + len(data.y_val) + len(data.y_test)  # disjoint
    for data in fed.new_clients.values():
        assert data.num_train == 0 and data.num_val == 0 and len(data.y_test) >= 10


def test_data_fraction_is_stratified_and_deterministic(fm_dir: Path) -> None:
    kw: dict[str, Any] = dict(num_clients=3, num_new_clients=0, min_samples=5, data_dir=str(fm_dir))
    fed = make_federation("fmnist", "iid", seed=1, data_fraction=0.5, **kw)
    labels = np.concatenate([np.concatenate([d.y_train, d.y_val, d.y_test]) for d in fed.clients.values()])
    assert fed.meta["pool_size"] == len(labels) == N_TRAIN // 2
    assert np.bincount(labels, minlength=10).tolist() == [10] * 10  # 20 per class -> 10
    assert len(fed.y_global_test) == N_TEST  # never subsampled
    again = make_federation("fmnist", "iid", seed=1, data_fraction=0.5, **kw)
    for cid in fed.clients:
        assert np.array_equal(fed.clients[cid].x_train, again.clients[cid].x_train)
    other = make_federation("fmnist", "iid", seed=2, data_fraction=0.5, **kw)
    pool = lambda f: {r.tobytes() for d in f.clients.values() for r in d.x_train}  # noqa: E731
    assert pool(fed) != pool(other)


def test_stratified_subset_keeps_every_class() -> None:
    labels = np.array([0] * 90 + [1] * 9 + [2])
    picked = stratified_subset(labels, 0.1, np.random.default_rng(0))
    assert np.bincount(labels[picked]).tolist() == [9, 1, 1]
    assert np.array_equal(stratified_subset(labels, 1.0, np.random.default_rng(0)), np.arange(100))


def test_data_fraction_on_digits_keeps_the_holdout() -> None:
    full = make_federation("digits", "iid", num_clients=4, num_new_clients=0, seed=0)
    half = make_federation("digits", "iid", num_clients=4, num_new_clients=0, seed=0, data_fraction=0.5)
    assert np.array_equal(full.y_global_test, half.y_global_test)
    half_pool, full_pool = half.meta["pool_size"], full.meta["pool_size"]
    assert isinstance(half_pool, int) and isinstance(full_pool, int)
    assert abs(half_pool - full_pool / 2) <= 10


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_bad_data_fraction(fm_dir: Path, fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"data fraction must be in \(0, 1\]"):
        make_federation("fmnist", "iid", num_clients=2, data_fraction=fraction, data_dir=str(fm_dir))


def test_bad_client_fractions() -> None:
    with pytest.raises(ConfigError, match="< 1"):
        make_federation("digits", num_clients=2, val_fraction=0.5, client_test_fraction=0.5)
    with pytest.raises(ConfigError, match=r"\(0, 1\)"):
        make_federation("digits", num_clients=2, val_fraction=0.0)


def test_client_too_small_for_val_and_test() -> None:
    x = np.zeros((20, 1, 2, 2), np.float32)
    y = np.arange(20, dtype=np.int64) % 10
    with pytest.raises(DataError, match=r"^client \d+ has 2 samples, too few") as exc:
        make_federation("digits", "iid", num_clients=8, num_new_clients=0, seed=0, min_samples=1,
                        test_fraction=0.1, x=x, y=y)
    assert "\n" not in str(exc.value)


def test_natural_federation_has_val_and_test() -> None:
    fed = make_federation("synthetic", "natural", num_clients=4, num_new_clients=1, seed=0)
    assert all(d.num_val >= 1 and len(d.y_test) >= 1 for d in fed.clients.values())
    with pytest.raises(ConfigError, match="natural"):
        make_federation("synthetic", "natural", num_clients=4, data_fraction=0.5)


def test_client_data_without_val_still_builds() -> None:
    d = ClientData(np.zeros((3, 1, 8, 8), np.float32), np.zeros(3, np.int64),
                   np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.int64))
    assert d.num_val == 0 and d.x_val.shape == (0, 1, 8, 8) and d.y_val.dtype == np.int64
    assert np.concatenate([d.x_train, d.x_val]).shape == (3, 1, 8, 8)


def test_unknown_dataset_lists_fmnist() -> None:
    with pytest.raises(ConfigError, match="fmnist"):
        load_dataset("nope")


# --- CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["simulate", "heterogeneity"])
@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_cli_bad_fraction(tmp_path: Path, fm_dir: Path, capsys: pytest.CaptureFixture[str],
                          cmd: str, fraction: str) -> None:
    out = tmp_path / "out"
    tail = (["--rounds", "1", "--no-progress", "--out", str(out)] if cmd == "simulate"
            else ["--json", str(out / "h.json")])
    rc = main([cmd, "--dataset", "fmnist", "--data-dir", str(fm_dir), "--data-fraction", fraction,
               *tail])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--data-fraction must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_missing_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["simulate", "--dataset", "fmnist", "--data-dir", str(tmp_path / "absent"),
               "--rounds", "1", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "absent") in err and "dataset-fashion-mnist" in err
    assert not out.exists()


def test_heterogeneity_on_fmnist(tmp_path: Path, fm_dir: Path) -> None:
    report = tmp_path / "h.json"
    assert main(["heterogeneity", "--dataset", "fmnist", "--data-dir", str(fm_dir), "--clients", "4",
                 "--partition", "iid", "--min-samples", "10", "--data-fraction", "0.5",
                 "--json", str(report)]) == 0
    assert report.is_file()


# --- the real files, when Debian's package is installed ---------------------------------------
@pytest.mark.skipif(not (Path(DEFAULT_DIR) / FILES["train"][0]).is_file(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_counts() -> None:
    (x, y), (xt, yt) = load_fmnist(DEFAULT_DIR)
    assert x.shape == (60_000, 1, 28, 28) and xt.shape == (10_000, 1, 28, 28)
    assert np.bincount(y).tolist() == [6_000] * 10 and np.bincount(yt).tolist() == [1_000] * 10
    fed = make_federation("fmnist", "dirichlet", num_clients=10, num_new_clients=2, seed=0,
                          data_fraction=0.1, data_dir=DEFAULT_DIR)
    assert fed.meta["pool_size"] == 6_000 and len(fed.y_global_test) == 10_000
