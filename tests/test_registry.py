"""Your own trunk, expert and dataset: registered by name or named by import path, checked
when built, exported and run on the device runtime with no project code change."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fedcoe_edge as fe
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.model import DualLevelMoE
from fedcoe_edge.registry import EXPERTS, TRUNKS, RegistryError


class TinyConvTrunk(nn.Module):
    """(B, 1, 8, 8) -> (B, 12): a conv, a pool and a flatten."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))).mean((2, 3))


def tiny_trunk(input_shape: tuple[int, ...]) -> nn.Module:
    return TinyConvTrunk()


@pytest.fixture
def registered() -> Iterator[None]:
    """Registers 'tiny' (trunk) and 'wide' (expert) for one test, then removes them."""
    fe.register_trunk("tiny", tiny_trunk)
    fe.register_expert("wide", lambda feat, hidden, classes: nn.Sequential(
        nn.Flatten(), nn.Linear(int(np.prod(feat)), 2 * hidden), nn.ReLU(),
        nn.Linear(2 * hidden, classes)))
    yield
    TRUNKS.unregister("tiny")
    EXPERTS.unregister("wide")


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real importable package ``usermodels`` with a trunk factory and two bad factories."""
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def trunk8(input_shape):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())

        def conv_bn(input_shape):
            return nn.Sequential(nn.Conv2d(input_shape[0], 8, 3, padding=1), nn.BatchNorm2d(8),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def not_a_module(input_shape):
            return "a string"

        def expert_for_32(feat_shape, hidden, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(32, num_classes))

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usermodels.nets"
    for mod in ("usermodels.nets", "usermodels"):
        sys.modules.pop(mod, None)


def digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()


def test_builtins_are_registered_through_the_same_registry() -> None:
    assert {"identity", "mobilenet_v3_small"} <= set(fe.TRUNKS)
    assert {"mlp", "cnn"} <= set(fe.EXPERTS)
    assert {"digits", "fmnist", "synthetic"} <= set(fe.DATASETS)
    assert all(TRUNKS.is_builtin(n) for n in ("identity", "mobilenet_v3_small"))


def test_default_model_is_bit_identical_to_the_pre_registry_build() -> None:
    """The digest of ModelConfig()'s state_dict at seed 0, recorded before the registry: the
    built-ins create the same parameters, with the same names, in the same order."""
    torch.manual_seed(0)
    model = DualLevelMoE(ModelConfig())
    names = list(model.state_dict())
    assert names[:4] == ["global.shared.conv1.weight", "global.shared.conv1.bias",
                         "global.shared.conv2.weight", "global.shared.conv2.bias"]
    assert len(names) == 40
    assert digest(model)[:16] == "fb115f1e636bc69c"


def test_registered_trunk_builds_with_measured_feature_shape(registered: None) -> None:
    cfg = ModelConfig(trunk="tiny", expert_kind="wide", input_shape=(1, 8, 8))
    torch.manual_seed(0)
    model = DualLevelMoE(cfg)
    assert model.global_part.feat_shape == (12,)
    assert model.global_part.trunk.training  # the build-time probe restored the mode
    bn = model.global_part.trunk.bn
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_batches_tracked is not None
    assert bn.running_mean is not None
    assert int(bn.num_batches_tracked) == 0 and torch.all(bn.running_mean == 0)  # probe left no trace
    out = model(torch.rand(5, 1, 8, 8))
    assert out.log_probs.shape == (5, 10)


def test_name_registered_twice_is_a_registry_error(registered: None) -> None:
    with pytest.raises(RegistryError, match="'tiny' is already registered"):
        fe.register_trunk("tiny", tiny_trunk)
    with pytest.raises(RegistryError, match="built in"):
        fe.register_trunk("identity", tiny_trunk, replace=True)
    fe.register_trunk("tiny", tiny_trunk, replace=True)  # an explicit override is fine
    fe.register_dataset("twice", lambda seed: (np.zeros((4, 2)), np.zeros(4, int)))
    try:
        with pytest.raises(RegistryError, match="dataset 'twice' is already registered"):
            fe.register_dataset("twice", lambda seed: (np.zeros((4, 2)), np.zeros(4, int)))
    finally:
        fe.DATASETS.unregister("twice")
    assert issubclass(RegistryError, ConfigError)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"model.trunk must be identity\|mobilenet_v3_small"):
        ModelConfig(trunk="resnet99")
    with pytest.raises(ConfigError, match=r"model.expert_kind must be cnn\|mlp"):
        ModelConfig(expert_kind="transformer")


def test_import_path_trunk_from_toml_style_config(user_package: str) -> None:
    cfg = ModelConfig.from_dict({"trunk": f"{user_package}:trunk8", "expert_kind": "mlp",
                                 "input_shape": [1, 8, 8]})
    model = DualLevelMoE(cfg)
    assert model.global_part.feat_shape == (16,)


@pytest.mark.parametrize("spec, match", [
    ("nosuchpkg.models:net", "cannot import module 'nosuchpkg.models'"),
    ("{pkg}:missing", "has no attribute 'missing'"),
    ("{pkg}:NOT_CALLABLE", "is a int, not a callable factory"),
])
def test_unresolvable_import_path_is_one_line(user_package: str, spec: str, match: str) -> None:
    with pytest.raises(RegistryError, match=match) as info:
        ModelConfig(trunk=spec.format(pkg=user_package), expert_kind="mlp")
    assert "\n" not in str(info.value)


def test_factory_returning_a_non_module(user_package: str) -> None:
    cfg = ModelConfig(trunk=f"{user_package}:not_a_module", expert_kind="mlp")
    with pytest.raises(RegistryError, match="returned a str, not a torch.nn.Module"):
        DualLevelMoE(cfg)


def test_width_mismatch_between_trunk_and_experts(user_package: str) -> None:
    fe.register_expert("fixed32", f"{user_package}:expert_for_32")
    try:
        cfg = ModelConfig(trunk=f"{user_package}:trunk8", expert_kind="fixed32")
        with pytest.raises(RegistryError, match=r"expert 'fixed32' does not accept trunk "
                                                r"'usermodels.nets:trunk8''s features of shape \[16\]"):
            DualLevelMoE(cfg)
    finally:
        EXPERTS.unregister("fixed32")


def test_input_shape_the_trunk_cannot_take(user_package: str) -> None:
    cfg = ModelConfig(trunk=f"{user_package}:trunk8", expert_kind="mlp", input_shape=(3, 8, 8))
    with pytest.raises(RegistryError, match=r"does not accept inputs of model.input_shape \[3, 8, 8\]"):
        DualLevelMoE(cfg)


def test_expert_with_wrong_logit_shape(registered: None) -> None:
    fe.register_expert("short", lambda feat, hidden, classes: nn.Linear(int(np.prod(feat)), classes - 1))
    try:
        with pytest.raises(RegistryError, match=r"logits \(B, num_classes\) = \(B, 10\).*\[2, 9\]"):
            DualLevelMoE(ModelConfig(trunk="tiny", expert_kind="short"))
    finally:
        EXPERTS.unregister("short")


def test_cli_exits_2_with_one_line_on_a_bad_import_path(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fedcoe_edge.cli import main

    cfg = tmp_path / "model.toml"
    cfg.write_text('[model]\ntrunk = "nosuchpkg.models:resnet8"\nexpert_kind = "mlp"\n')
    code = main(["simulate", "--dataset", "digits", "--config", str(cfg), "--rounds", "1",
                 "--clients", "2", "--new-clients", "0", "--out", str(tmp_path / "run"),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "cannot import module 'nosuchpkg.models'" in err
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_own_trunk_exports_and_runs_on_the_runtime(tmp_path: Path, registered: None) -> None:
    """The ONNX graph carries the trunk: the manifest names it, and MoESession (no registry
    entry needed) gives the torch model's probabilities."""
    from export.bundle import build_bundle
    from fedcoe_edge.runtime import MoESession, read_bundle
    from fedcoe_edge.training import predict_probs

    cfg = ModelConfig(trunk="tiny", expert_kind="mlp", expert_hidden=16, input_shape=(1, 8, 8))
    torch.manual_seed(0)
    model = DualLevelMoE(cfg)
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    manifest = build_bundle(model, tmp_path / "b", calibration=x, include_fused=False,
                            include_heads=False)
    assert manifest["model"]["trunk"] == "tiny" and "trunk" in manifest["parts"]
    assert manifest["feat_shape"] == [12]
    TRUNKS.unregister("tiny")  # the device knows nothing of the user's trunk
    try:
        read_bundle(tmp_path / "b")
        probs = MoESession(tmp_path / "b", precision="fp32").predict(x)
    finally:
        fe.register_trunk("tiny", tiny_trunk)
    np.testing.assert_allclose(probs, predict_probs(model, x), atol=1e-4)


# --- datasets ---------------------------------------------------------------------------


def test_registered_dataset_feeds_a_federation() -> None:
    rng = np.random.default_rng(0)

    def blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(3), 40)
        return rng.normal(y[:, None], 0.3, (120, 5)).astype(np.float32), y

    fe.register_dataset("blobs", blobs)
    try:
        fed = fe.make_federation("blobs", "iid", 3, 0, 0, min_samples=5)
        assert fed.input_shape == (5,) and fed.num_classes == 3
        # a device agent's [data] dataset reads the same registry (one client of the federation)
        from device_agent.config import DataSettings
        from device_agent.data import load_data

        data = load_data(DataSettings(dataset="blobs", client="1", partition="iid", num_clients=3,
                                      new_clients=0, min_samples=5))
        assert data.x_train.shape[1:] == (5,) and data.num_train > 0
    finally:
        fe.DATASETS.unregister("blobs")


def test_bad_dataset_loader_output_is_one_line() -> None:
    fe.register_dataset("ragged", lambda seed: (np.zeros((4, 2)), np.zeros(3, int)))
    fe.register_dataset("notuple", lambda seed: np.zeros((4, 2)))
    try:
        with pytest.raises(DataError, match="dataset 'ragged': 4 inputs but 3 labels"):
            fe.load_dataset("ragged")
        with pytest.raises(RegistryError, match=r"dataset 'notuple': the loader must return \(x, y\)"):
            fe.load_dataset("notuple")
    finally:
        fe.DATASETS.unregister("ragged")
        fe.DATASETS.unregister("notuple")


def test_npz_pool_is_the_arrays_a_device_agent_reads(tmp_path: Path) -> None:
    from device_agent.config import DataSettings
    from device_agent.data import load_npz

    rng = np.random.default_rng(1)
    xtr, ytr = rng.random((30, 1, 4, 4), dtype=np.float32), rng.integers(0, 3, 30)
    xte, yte = rng.random((10, 1, 4, 4), dtype=np.float32), rng.integers(0, 3, 10)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    x, y = fe.load_dataset(f"npz:{path}")
    agent = load_npz(path, DataSettings(npz=str(path)))
    np.testing.assert_array_equal(x, np.concatenate([agent.x_train, agent.x_test]))
    np.testing.assert_array_equal(y, np.concatenate([agent.y_train, agent.y_test]))


def test_corrupt_files_are_refused_by_path(tmp_path: Path) -> None:
    from PIL import Image

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=f"{bad}: not a readable .npz"):
        fe.load_dataset(f"npz:{bad}")
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("L", (8, 8), 30).save(root / cls / "ok.png")
    (root / "b" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError, match=f"cannot read image {root / 'b' / 'broken.png'}"):
        fe.load_dataset(f"folder:{root}", image_shape=(1, 8, 8))


def test_cli_simulate_export_predict_with_an_import_path_trunk(
        tmp_path: Path, user_package: str, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/quickstart.md step 3 through the CLI: a BatchNorm trunk named in TOML by import
    path; its checkpoint (0-d num_batches_tracked included) reloads, exports and predicts."""
    from fedcoe_edge.cli import main

    cfg = tmp_path / "model.toml"
    cfg.write_text(f'[model]\ntrunk = "{user_package}:conv_bn"\nexpert_kind = "mlp"\n'
                   f'expert_hidden = 16\n')
    run = tmp_path / "run"
    assert main(["simulate", "--dataset", "digits", "--config", str(cfg), "--rounds", "1",
                 "--clients", "2", "--new-clients", "0", "--algorithms", "fedcoe",
                 "--out", str(run), "--no-progress"]) == 0
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint-dir", str(run / "checkpoints"), "--client", "0",
                 "--out", str(bundle), "--quantize", "fp32", "--no-fused"]) == 0
    x, _ = fe.load_dataset("digits")
    np.save(tmp_path / "x.npy", x[:3])
    capsys.readouterr()
    assert main(["predict", "--bundle", str(bundle), "--input", str(tmp_path / "x.npy")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3
