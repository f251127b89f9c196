"""The runtime install profile (no torch): head graphs from numpy, swaps into a signed bundle,
the inference-only agent, the refusal to train, and the CLI importing no torch.

The fresh-venv install of the profile itself is ``test_runtime_profile_venv`` (slow, run by
``make test-runtime-profile``)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from device_agent import daemon as agent_daemon
from device_agent.daemon import DeviceAgent
from export.bundle import build_bundle
from export.quantize import QuantizeOptions, QuantMode
from fedcoe_edge.bundle_sig import BundleKeys
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.onnx_heads import global_part_graphs
from fedcoe_edge.protocol import device_key
from fedcoe_edge.runtime import MoESession
from fedcoe_edge.training import accuracy, build_model
from fedcoe_edge.transport import MemoryBroker

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cfg", [
    ModelConfig(expert_kind="mlp", expert_hidden=32),
    ModelConfig(expert_kind="cnn", expert_hidden=16),
    ModelConfig(input_shape=(1, 28, 28), expert_kind="cnn", gate_hidden=8, shared_expert=False),
], ids=["mlp", "cnn-8px", "cnn-28px-hidden-gate"])
def test_head_graphs_from_numpy_equal_torch(cfg: ModelConfig) -> None:
    model = build_model(cfg, 0).eval()
    params = {k: v.numpy() for k, v in model.global_state().items()}
    graphs = global_part_graphs(cfg, model.global_part.feat_shape, params)
    g = model.global_part
    want = {"global_gate": g.gate, **({"expert_shared": g.shared} if g.shared is not None else {}),
            **{f"expert_g{k}": e for k, e in enumerate(g.experts)}}
    assert sorted(graphs) == sorted(want)
    x = np.random.default_rng(0).random((6, *cfg.input_shape), dtype=np.float32)
    for name, data in graphs.items():
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = want[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(sess.run(None, {"feats": x})[0], ref, atol=1e-5)


def test_swapping_the_gate_out_of_merged_heads(digits_moe, tmp_path: Path) -> None:
    """Gate, shared expert and an expert replaced from numpy weights: the bundle drops its
    merged heads, stays signed, and predicts what torch predicts with the new weights."""
    model, x_train, _, x_test, _ = digits_moe
    out = tmp_path / "b"
    key = BundleKeys(hmac_key=b"k" * 32)
    build_bundle(model, out, calibration=x_train[:32], options=QuantizeOptions(mode=QuantMode.FP32),
                 include_fused=False, keys=key)
    other = build_model(model.cfg, 3).eval()
    params = {k: v.numpy() for k, v in other.global_state().items()
              if not k.startswith(("global.experts.0.", "global.experts.1.", "global.experts.2."))}
    sess = MoESession(out, keys=key)
    assert sess.manifest["heads"] is not None
    for name, graph in global_part_graphs(model.cfg, sess.feat_shape, params).items():
        sess.swap_part(name, graph, quantization="fp32")
    assert sess.manifest["heads"] is None and not (out / "heads.onnx").exists()
    patched = build_model(model.cfg, 0).eval()
    patched.load_state_dict(model.state_dict())
    patched.load_state_dict({**patched.state_dict(), **{k: torch.from_numpy(v) for k, v in params.items()}})
    with torch.no_grad():
        ref = patched(torch.from_numpy(x_test)).log_probs.exp().numpy()
    np.testing.assert_allclose(sess.predict(x_test), ref, atol=1e-5)
    np.testing.assert_allclose(MoESession(out, keys=key).predict(x_test), ref, atol=1e-5)


def _memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def test_inference_agent_cold_starts_through_its_bundle(tmp_path: Path) -> None:
    """A cold device on the onnx engine: gate swapped into its (signed, stale) bundle, routing
    prior from MoESession, its top-m experts downloaded and swapped in, then the same
    accuracy as the coordinator's own torch cold-start evaluation. Declines: an unsigned
    bundle, and a train-role device without torch."""
    factory = _memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        c = fed.coordinator
        assert c is not None
        # the device image ships a bundle of this federation's model (stale weights), signed
        # with the device's key; an unsigned copy is refused
        shipped = build_model(c.strategy.model_cfg, 42).eval()
        x_cal = np.random.default_rng(0).random((16, *c.strategy.model_cfg.input_shape),
                                                dtype=np.float32)
        key = device_key(DEMO_SECRET, "new0")
        cfg = fed.agent_config("new0", "new0", role="cold")
        cfg.device.engine = "onnx"
        build_bundle(shipped, tmp_path / "unsigned", calibration=x_cal,
                     options=QuantizeOptions(mode=QuantMode.FP32), include_fused=False)
        cfg.device.bundle_path = str(tmp_path / "unsigned")
        refused = DeviceAgent(cfg, factory)
        refused.start()
        fed.wait(lambda: refused.refused is not None, 30, "decline")
        refused.close()
        assert "manifest is unsigned" in str(refused.refused)

        cfg = fed.agent_config("new0", "new0", role="cold")
        cfg.device.engine = "onnx"
        cfg.device.bundle_path = str(tmp_path / "shipped")
        build_bundle(shipped, cfg.device.bundle_path, calibration=x_cal,
                     options=QuantizeOptions(mode=QuantMode.FP32), include_fused=False,
                     keys=BundleKeys(hmac_key=key), federation=cfg.device.federation)
        cold = DeviceAgent(cfg, factory)
        fed.agents["new0"] = cold
        cold.start()
        fed.wait(cold.cold_ready.is_set, 60, "cold start")
        fed.wait(lambda: bool(c.store.evals("cold")), 30, "cold eval")
        x, y = cold.data.x_test, cold.data.y_test
        row = c.store.evals("cold")[0]
        assert cold.engine == "onnx" and cold.strategy is None  # no torch model was built
        pool = cold.data.x_pool  # the experts come from the unlabelled pool, never from x
        assert len(pool) and cold.held_ids == c.strategy.cold_start_experts(pool)  # type: ignore[attr-defined]
        want = accuracy(c.strategy.predict_cold(x, x_unlabeled=pool), y)
        assert abs(row["correct"] / row["total"] - want) <= 1 / row["total"]
        # the updated bundle verifies with the device key and predicts like torch
        sess = MoESession(cfg.device.bundle_path, keys=BundleKeys(hmac_key=key))
        torch_p = c.strategy.predict_cold(x, x_unlabeled=pool)
        onnx_p = sess.predict(x, expert_mask=cold.held_ids, use_local=False)
        assert (onnx_p.argmax(1) == torch_p.argmax(1)).mean() >= 0.99
        assert np.abs(onnx_p - torch_p).max() < 1e-4
    finally:
        fed.stop()


def test_runtime_profile_agent_asked_to_train_declines(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_daemon, "torch_installed", lambda: False)
    factory = _memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=1, rounds=1, **small())
    fed.start_coordinator()
    try:
        agent = fed.add_agent("0", "0")
        assert agent.engine == "onnx"
        fed.wait(lambda: agent.refused is not None, 30, "decline")
        assert agent.refused == agent_daemon.NO_TORCH
        assert agent.strategy is None and not (tmp_path / "0" / "round_result.safetensors").exists()
    finally:
        fed.stop()


def test_onnx_engine_cannot_be_configured_to_train(tmp_path: Path) -> None:
    from device_agent.config import config_from_doc

    doc = {"device": {"id": "d1", "role": "train", "engine": "onnx"},
           "security": {"key": "ab" * 16}, "data": {"dataset": "digits"}}
    with pytest.raises(ConfigError, match='engine = "onnx" only predicts'):
        config_from_doc(doc, "agent.toml", tmp_path)


def test_cli_predict_and_agent_import_no_torch(digits_bundle: Path, digits_moe) -> None:
    """``fedcoe predict`` runs and ``fedcoe agent`` loads with torch unimportable."""
    np.save(digits_bundle.parent / "x.npy", digits_moe[3][:4])
    code = (
        "import sys\nsys.modules['torch'] = None\n"
        "from fedcoe_edge.cli import main\n"
        f"rc = main(['predict', '--bundle', {str(digits_bundle)!r}, '--input', "
        f"{str(digits_bundle.parent / 'x.npy')!r}])\n"
        "import device_agent.cli, device_agent.daemon, device_agent.data\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "sys.exit(rc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.strip().splitlines()) == 4
    # a command of the train profile says what to install, in one line
    code = ("import sys\nsys.modules['torch'] = None\nfrom fedcoe_edge.cli import main\n"
            "sys.exit(main(['simulate', '--dataset', 'digits', '--rounds', '1', '--no-progress', "
            f"'--out', {str(digits_bundle.parent / 'sim')!r}]))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "needs the train install profile" in res.stderr


# --- the install profile itself -----------------------------------------------------------

RUNTIME_CHECK = """
import importlib.util, json, sys
import numpy as np
assert importlib.util.find_spec("torch") is None, "torch is installed"
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("import torch worked")
from fedcoe_edge.cli import main
sys.exit(main(["predict", "--bundle", sys.argv[1], "--input", sys.argv[2], "--json",
               "--key-file", sys.argv[3]]))
"""


@pytest.mark.slow
def test_runtime_profile_venv(digits_moe, built_dist, tmp_path: Path,
                              request: pytest.FixtureRequest) -> None:
    """The wheel ``make wheel`` builds, installed into a fresh venv with docs/deploy.md's own
    ``pip install './WHEEL[runtime]'`` line (the runtime profile): torch is absent and
    ``fedcoe predict`` classifies with a signed bundle exactly as this install does.

    Runs only under ``-m slow`` (``make test-runtime-profile``): it needs the package index
    and 20-60 s, which ``make test`` on a two-core machine does not spend."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("installs into a fresh venv: run `make test-runtime-profile` (pytest -m slow)")
    model, x_train, _, x_test, _ = digits_moe
    bundle = tmp_path / "bundle"
    key = b"\x07" * 32
    build_bundle(model, bundle, calibration=x_train[:64], keys=BundleKeys(hmac_key=key))
    (tmp_path / "k.hex").write_text(key.hex())
    np.save(tmp_path / "x.npy", x_test[:8])
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    wheel = built_dist[0]
    deploy = (REPO / "docs" / "deploy.md").read_text()
    line = next(s for s in deploy.splitlines() if "pip install './fedcoe_edge-" in s
                and "[runtime]'" in s and not s.lstrip().startswith("#"))
    spec = shlex.split(line.split("pip install", 1)[1])
    assert spec == [f"./{wheel.name}[runtime]"], line  # the file `make wheel` writes
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)  # the venv's own install, never this checkout
    res = subprocess.run([str(py), "-m", "pip", "install", "--quiet", *spec],
                         capture_output=True, text=True, timeout=900, env=env, cwd=wheel.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([str(py), "-c", "import PIL, fedcoe_edge; print(fedcoe_edge.__file__)"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert res.returncode == 0 and str(env_dir) in res.stdout, res.stderr  # [runtime]: Pillow
    res = subprocess.run([str(py), "-c", RUNTIME_CHECK, str(bundle), str(tmp_path / "x.npy"),
                          str(tmp_path / "k.hex")], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)["classes"]
    assert got == MoESession(bundle).predict(x_test[:8]).argmax(1).tolist()
    # and asked to train, the agent of this install refuses: its config check is one line
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text('[device]\nid = "d1"\nrole = "train"\nengine = "onnx"\n'
                          '[security]\nkey = "' + "ab" * 16 + '"\n[data]\nnpz = "x.npz"\n')
    res = subprocess.run([str(env_dir / "bin" / "fedcoe"), "agent", "--config", str(agent_toml)],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert 'engine = "onnx" only predicts' in res.stderr
