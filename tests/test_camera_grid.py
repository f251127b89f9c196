"""The camera grid (benchmarks/camera_grid.py): bit-for-bit reruns, bad input before any
training, the fixed cameras and the report's stability figure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import camera_grid as cg
from fedcoe_edge.errors import ConfigError, DataError


def _trunk_file(path: Path, seed: int = 0) -> cg.Trunk:
    """A randomly initialised V3-Small trunk saved as the grid saves a pretrained one."""
    import torch
    from safetensors.torch import save

    from fedcoe_edge.mobilenet import mobilenet_v3_small_trunk
    from fedcoe_edge.trunk import TRUNK_PREFIX

    torch.manual_seed(seed)
    trunk = mobilenet_v3_small_trunk().eval()
    data = save({TRUNK_PREFIX + k: v.contiguous() for k, v in trunk.state_dict().items()})
    path.write_bytes(data)
    return cg.Trunk(str(path), hashlib.sha256(data).hexdigest())


TINY = cg.Prep(clients=4, new_clients=1, min_samples=10, test_samples=100)


def _tiny_run(tmp: Path, trunk: cg.Trunk, algorithm: str) -> dict:
    grid = cg.CamGrid(["cam-dir0.5-1"], [algorithm], [0], 2, trunk, TINY)
    rec = cg.run_job(grid, "cam-dir0.5-1", algorithm, 0, str(tmp / "features"))
    rec.pop("cpu_s")
    rec["metrics"].pop("wall_s")
    return rec


def test_tiny_grid_is_bit_for_bit_reproducible(tmp_path: Path) -> None:
    """Same code + seed + machine: the same features (recomputed from scratch in a second
    cache folder) and the same record, every float equal."""
    import torch

    trunk = _trunk_file(tmp_path / "trunk.safetensors")
    threads = torch.get_num_threads()
    a = _tiny_run(tmp_path / "a", trunk, "fedcoe")
    assert torch.get_num_threads() == threads  # the test process gets its settings back
    assert not torch.are_deterministic_algorithms_enabled()
    b = _tiny_run(tmp_path / "b", trunk, "fedcoe")
    fa = sorted((tmp_path / "a" / "features").glob("*.npz"))
    fb = sorted((tmp_path / "b" / "features").glob("*.npz"))
    assert [p.name for p in fa] == [p.name for p in fb] and len(fa) == 1
    with np.load(fa[0]) as za, np.load(fb[0]) as zb:
        assert za.files == zb.files
        for k in za.files:
            assert np.array_equal(za[k], zb[k]), k
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert len(a["curve"]) == 2 and 0.0 <= a["metrics"]["global_acc"] <= 1.0


def test_trunk_hash_mismatch_exits_2_before_training(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    trunk = _trunk_file(tmp_path / "trunk.safetensors")
    rc = cg.main(["--quick", "--trunk", trunk.file, "--trunk-sha256", "0" * 64,
                  "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and trunk.file in err[0] and "sha256" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_client_without_training_sample_exits_2_naming_it(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    """54 images over 24 clients at Dirichlet(0.05), no minimum: some client cannot keep a
    training sample; one line names it and nothing is trained or written."""
    rc = cg.main(["--phase", "grid", "--settings", "cam-dir0.05-0.1", "--min-samples", "0",
                  "--algorithms", "fedcoe,fedavg",
                  "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "client" in err[0] and "cam-dir0.05-0.1" in err[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_split_names_the_client_with_no_training_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """A split that leaves a client nothing to train on is refused by name (here a splitter
    that puts every sample in validation/test)."""
    import fedcoe_edge.data.federation as federation

    def starve(idx: np.ndarray, rng: np.random.Generator, client: str, *a: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return idx[:0], idx[:1], idx[1:]

    monkeypatch.setattr(federation, "split_train_val_test", starve)
    with pytest.raises(DataError, match="client 0 has no training sample"):
        cg.split_setting(cg.parse_setting("cam-dir0.5-1"), 0, TINY)


def test_setting_names() -> None:
    s = cg.parse_setting("cam-dir0.1-100")
    assert (s.alpha, s.pct, s.fraction) == (0.1, 100.0, 1.0)
    for bad in ("cam-dir0-10", "cam-dir0.1-0", "cam-dir0.1-101", "dir0.1-10", "cam-dir0.1.2-10"):
        with pytest.raises(ConfigError, match="cam-dir"):
            cg.parse_setting(bad)


def test_cameras_are_fixed_per_client() -> None:
    """Client i's camera does not depend on how many clients there are (nor on the run seed,
    which it never sees), and different clients get different cameras."""
    a = cg.camera_params(24, cg.CAMERA_SEED, 1.0)
    b = cg.camera_params(5, cg.CAMERA_SEED, 1.0)
    assert a[:5] == b
    assert len({c.to_dict()["angle"] for c in a}) == 24


def test_stability_is_std_of_the_last_rounds() -> None:
    curve = [{"round": float(r), "global_acc": 0.0 if r <= 5 else (0.5 if r % 2 else 0.7)}
             for r in range(1, 31)]
    rec = {"curve": curve}
    assert cg.stability(rec) == pytest.approx(0.1)  # last 20 rounds alternate 0.5 / 0.7
    assert cg.stability({"curve": curve[:1]}) is None
