"""``fedcoe pretrain-trunk`` / ``fedcoe_edge.pretrain``: the coordinator pretrains the trunk on a
public dataset and writes one hash-named safetensors file the federation's model loads.

Real files throughout: small Fashion-MNIST IDX files written here (as tests/test_fmnist.py
writes them), one epoch at 16x16, the file loaded back through the model's own hash check."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest

from fedcoe_edge.cli import main
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.data.fmnist import FILES
from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.pretrain import (
    PretrainOptions,
    batch_bounds,
    pretrain_trunk_file,
    to_camera,
)

SIZE = 16
TINY = dict(dataset="fmnist", size=SIZE, epochs=1, public_fraction=0.5, batch_size=16)


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    """An IDX .gz file as Fashion-MNIST ships them (tests/test_fmnist.py writes the same)."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def fm_dir(tmp_path: Path) -> Path:
    """120 train + 20 test random 28x28 images, labels cycling 0..9."""
    root, rng = tmp_path / "fm", np.random.default_rng(0)
    root.mkdir()
    for split, n in (("train", 120), ("test", 20)):
        images, labels = FILES[split]
        write_idx(root / images, rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(root / labels, np.arange(n) % 10, 2049)
    return root


def test_writes_a_trunk_the_model_loads_and_is_reproducible(fm_dir: Path, tmp_path: Path) -> None:
    opts = PretrainOptions(**TINY, data_dir=str(fm_dir))  # type: ignore[arg-type]
    res = pretrain_trunk_file(tmp_path / "a" / "trunk.safetensors", opts)
    data = res.path.read_bytes()
    assert res.sha256 == hashlib.sha256(data).hexdigest() and res.bytes == len(data)
    # half of 120 (6 per class); one per class held out (a stratified tenth, at least one)
    assert res.samples == 50 and res.val_samples == 10
    assert res.val_acc is not None and 0.0 <= res.val_acc <= 1.0
    assert len(res.history) == 1
    assert res.config_lines() == [f'trunk_weights = "{res.path}"', f'trunk_sha256 = "{res.sha256}"']
    assert not [p for p in res.path.parent.iterdir() if p != res.path]  # no temp file left
    # the federation's model loads it through its own hash and shape check
    from safetensors.numpy import load

    from fedcoe_edge.config import TrainConfig
    from fedcoe_edge.strategies import make_strategy
    from fedcoe_edge.trunk import TRUNK_PREFIX

    cfg = ModelConfig(input_shape=(3, SIZE, SIZE), trunk="mobilenet_v3_small", expert_kind="mlp",
                      expert_hidden=8, num_global_experts=2, num_local_experts=1,
                      trunk_mode="frozen", trunk_weights=str(res.path), trunk_sha256=res.sha256)
    state = make_strategy("fedcoe", cfg, TrainConfig()).initialize()

    saved = load(data)
    assert set(saved) == {k for k in state if k.startswith(TRUNK_PREFIX)}
    for k, v in saved.items():
        np.testing.assert_array_equal(state[k], v, err_msg=k)
    # same options, same seed: the same bytes; another seed: another trunk
    again = pretrain_trunk_file(tmp_path / "b.safetensors", opts)
    assert again.sha256 == res.sha256
    other = pretrain_trunk_file(tmp_path / "c.safetensors",
                                PretrainOptions(**TINY, data_dir=str(fm_dir), seed=1))  # type: ignore[arg-type]
    assert other.sha256 != res.sha256


def test_cli_prints_the_config_lines(fm_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "trunk.safetensors"
    rc = main(["pretrain-trunk", "--data-dir", str(fm_dir), "--size", str(SIZE), "--epochs", "1",
               "--public-fraction", "0.5", "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert f'trunk_weights = "{out}"' in text.splitlines()
    assert f'trunk_sha256 = "{digest}"' in text.splitlines()
    assert "held-out" in text and f"input_shape = [3, {SIZE}, {SIZE}]" in text


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--data-dir", "{missing}"], "not found"),
    (["--dataset", "synthetic"], "a trunk is pretrained on images"),
    (["--size", "4"], "size must be an integer in 8..1024"),
    (["--epochs", "0"], "epochs must be an integer >= 1"),
    (["--batch-size", "1"], "batch size must be an integer >= 2"),
    (["--public-fraction", "0"], "public fraction must be in (0, 1]"),
    (["--val-fraction", "1"], "validation fraction must be in (0, 1)"),
    (["--lr", "-1"], "learning rate must be > 0"),
    (["--public-fraction", "0.02"], "raise the public fraction"),
    (["--out", "{dir}"], "is a folder"),
    (["--out", "{dir}/trunk.bin"], "must end in .safetensors"),
    (["--out", "{file}/sub/trunk.safetensors"], "is not a folder"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
        fm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
        message: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "plain").write_text("x")
    argv = [a.replace("{missing}", str(tmp_path / "absent")).replace("{dir}", str(work))
            .replace("{file}", str(work / "plain")) for a in argv]
    base = ["pretrain-trunk", "--data-dir", str(fm_dir), "--size", str(SIZE), "--epochs", "1",
            "--no-progress", "--out", str(work / "trunk.safetensors")]
    rc = main(base + argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("fedcoe pretrain-trunk: error:"), err
    assert message in err
    assert sorted(p.name for p in work.iterdir()) == ["plain"]  # nothing half-written


def test_options_are_checked_before_any_data_is_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochs"):
        pretrain_trunk_file(tmp_path / "t.safetensors",
                            PretrainOptions(epochs=0, data_dir=str(tmp_path / "absent")))
    with pytest.raises(DataError):  # the options are fine: now the data is missing
        pretrain_trunk_file(tmp_path / "t.safetensors",
                            PretrainOptions(data_dir=str(tmp_path / "absent")))
    assert not list(tmp_path.iterdir())


def test_batches_never_end_with_a_single_image() -> None:
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert batch_bounds(9, 4) == [(0, 4), (4, 9)]  # 1 image left: joins the batch before
    assert batch_bounds(1, 4) == [(0, 1)]
    assert batch_bounds(8, 4) == [(0, 4), (4, 8)]


def test_to_camera_takes_grey_and_rgb() -> None:
    grey = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    cam = to_camera(grey, 16)
    assert cam.shape == (2, 3, 16, 16)
    assert np.array_equal(cam[:, 0], cam[:, 2])
    rgb = np.random.default_rng(1).random((2, 3, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(to_camera(rgb, 16), rgb)  # already that size: unchanged
    with pytest.raises(ValueError, match="expected"):
        to_camera(np.zeros((2, 2, 8, 8), np.float32), 16)


def test_the_camera_benchmark_trains_with_the_library() -> None:
    import benchmarks.camera_accuracy as bench
    import fedcoe_edge.pretrain as lib

    assert bench.pretrain_trunk is lib.pretrain_trunk and bench.to_camera is lib.to_camera
