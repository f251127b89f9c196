"""FedCoE trains with its defaults on a user's own image folder, and a run that diverges or
stays at chance says so, naming the round and the client (docs/design.md, "Stability")."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from PIL import Image

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data import make_federation
from fedcoe_edge.data.datasets import load_digits
from fedcoe_edge.health import at_chance, chance_warning, loss_warning, update_warning
from fedcoe_edge.simulation import SimulationConfig, fit_model_to_data, run_one


def write_digit_folder(root, per_class: int = 40) -> None:
    """Digits as 28x28 grey PNGs in one sub-folder per class: a user's own image folder."""
    x, y = load_digits()
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(y == c)[:per_class]):
            img = Image.fromarray((x[idx, 0] * 255).astype(np.uint8)).resize((28, 28))
            img.save(root / f"class_{c}" / f"{i}.png")


def test_fedcoe_defaults_train_on_an_image_folder(tmp_path):
    """Default [train] knobs, RGB 32x32 images from PNG files: well above chance (0.1).

    The same folder at the same learning rate gave chance accuracy before gradient
    clipping and residual local experts (docs/design.md, "Stability")."""
    write_digit_folder(tmp_path / "imgs")
    fed = make_federation(f"folder:{tmp_path / 'imgs'}", "dirichlet", num_clients=4,
                          num_new_clients=1, seed=0, alpha=0.5, min_samples=20)
    assert fed.input_shape == (3, 32, 32)
    cfg = SimulationConfig(rounds=8, eval_every=8, model=ModelConfig(expert_hidden=16), train=TrainConfig())
    cfg.model = fit_model_to_data(cfg.model, fed)
    m = run_one("fedcoe", fed, cfg, seed=0).metrics
    assert m["global_acc"] > 0.3, m  # 3x chance after 8 rounds of 4 small clients
    assert m["personalized_acc"] > 0.6, m


def test_loss_warning_names_round_and_client():
    assert loss_warning(3, "7", {"train_loss": 0.5}) is None
    assert loss_warning(3, "7", {}) is None
    line = loss_warning(3, "7", {"train_loss": float("nan")})
    assert line is not None and "round 3" in line and "client 7" in line and "nan" in line
    assert "round 4 client a" in (loss_warning(4, "a", {"train_loss": float("inf")}) or "")
    assert update_warning(2, "b", {"w": np.ones(3, np.float32)}) is None
    bad = update_warning(2, "b", {"w": np.ones(3, np.float32), "v": np.array([1.0, np.nan])})
    assert bad is not None and "round 2 client b" in bad and "v" in bad


def test_chance_warning_after_grace_rounds():
    assert at_chance(0.12, 10) and not at_chance(0.3, 10) and not at_chance(math.nan, 10)
    assert chance_warning(2, "global model", 0.1, 10) is None  # too early to call
    line = chance_warning(6, "global model", 0.1, 10)
    assert line is not None and "round 6 global model" in line and "chance" in line
    assert chance_warning(6, "global model", 0.8, 10) is None


def test_simulator_warns_when_training_diverges(caplog):
    """An absurd learning rate with clipping off: the loss goes non-finite, and the log says
    which round and which client instead of reporting numbers silently."""
    fed = make_federation("digits", "dirichlet", num_clients=3, num_new_clients=0, seed=0, alpha=1.0)
    cfg = SimulationConfig(rounds=6, eval_every=1, model=ModelConfig(expert_hidden=8),
                           train=TrainConfig(lr=1e12, clip_grad_norm=0.0, local_epochs=1))
    cfg.model = fit_model_to_data(cfg.model, fed)
    with caplog.at_level(logging.WARNING, logger="fedcoe_edge.simulation"):
        run_one("fedavg", fed, cfg, seed=0)
    text = caplog.text
    assert "client 0: update" in text and "non-finite" in text
    assert "at chance" in text


@pytest.mark.parametrize("value", [-1.0])
def test_clip_and_balance_knobs_are_validated(value):
    from fedcoe_edge.errors import ConfigError

    with pytest.raises(ConfigError, match="clip_grad_norm"):
        TrainConfig(clip_grad_norm=value)
    with pytest.raises(ConfigError, match="capacity_slack"):
        TrainConfig(capacity_slack=0.5)


def test_quantizer_info_lines_are_muted_unless_verbose():
    """onnxruntime's quantizer logs INFO through the root logger; the CLI's filter drops it
    (warnings pass), so a bundle build does not print thousands of lines."""
    from fedcoe_edge.cli import QuietThirdParty

    f = QuietThirdParty()

    def rec(level: int, path: str, name: str = "root") -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "msg", None, None)

    assert not f.filter(rec(logging.INFO, "/x/site-packages/onnxruntime/quantization/onnx_quantizer.py"))
    assert not f.filter(rec(logging.INFO, "/x/y.py", name="onnxscript.optimizer"))
    assert f.filter(rec(logging.WARNING, "/x/site-packages/onnxruntime/quantization/onnx_quantizer.py"))
    assert f.filter(rec(logging.INFO, "/work/fedcoe_edge/simulation.py", name="fedcoe_edge.simulation"))


def test_simulate_reads_a_folder_at_the_models_input_shape(tmp_path):
    """``[model] input_shape = [1, 28, 28]`` makes ``simulate --dataset folder:`` read grey
    28x28 images, the shape a device agent with that image_shape reads the same files at."""
    import json

    from fedcoe_edge.cli import main

    write_digit_folder(tmp_path / "imgs", per_class=25)
    (tmp_path / "m.toml").write_text("[model]\ninput_shape = [1, 28, 28]\nexpert_hidden = 8\n")
    out = tmp_path / "out"
    rc = main(["simulate", "--dataset", f"folder:{tmp_path / 'imgs'}", "--clients", "3",
               "--new-clients", "1", "--rounds", "1", "--algorithms", "fedavg", "--no-progress",
               "--config", str(tmp_path / "m.toml"), "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["model"]["input_shape"] == [1, 28, 28]
    assert list(doc["config"]["image_shape"]) == [1, 28, 28]
    fed = make_federation(f"folder:{tmp_path / 'imgs'}", "dirichlet", 3, 1, 0, 0.5,
                          image_shape=(1, 28, 28))
    assert fed.input_shape == (1, 28, 28)
    with pytest.raises(Exception, match="C 1 or 3"):
        make_federation(f"folder:{tmp_path / 'imgs'}", "dirichlet", 3, 1, 0, 0.5, image_shape=(2, 28, 28))


def test_local_only_is_not_called_stuck_at_chance(caplog):
    """Local-only has no global model: its chance-level global accuracy is by design, so the
    simulator does not warn about it."""
    fed = make_federation("digits", "dirichlet", num_clients=3, num_new_clients=0, seed=0, alpha=1.0)
    cfg = SimulationConfig(rounds=6, eval_every=6, model=ModelConfig(expert_hidden=8),
                           train=TrainConfig(local_epochs=1))
    cfg.model = fit_model_to_data(cfg.model, fed)
    with caplog.at_level(logging.WARNING, logger="fedcoe_edge.simulation"):
        run_one("local", fed, cfg, seed=0)
    assert "global model" not in caplog.text
