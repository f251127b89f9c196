"""Bundles cannot be rolled back: a signed federation id and version, a reader's minimum
(``--min-version``), an agent's persisted high-water mark, and a warning for a bundle no key
authenticated (docs/bundle.md, "Versions and rollback").

The attack: a device runs a bundle of version 10; an older bundle (version 2, a worse model)
signed with the same device key is put back in its place. Its signature verifies: only the
version tells them apart.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import AgentConfig, DataSettings, DeviceSettings
from device_agent.daemon import BUNDLE_FLOOR_FILE, DeviceAgent
from export.bundle import build_bundle
from export.quantize import QuantizeOptions, QuantMode
from fedcoe_edge.bundle_format import RollbackError
from fedcoe_edge.bundle_io import ReleaseCheck, VersionFloor
from fedcoe_edge.bundle_sig import BundleKeys, canonical_bytes, sign_manifest, verify_manifest
from fedcoe_edge.cli import main as fedcoe
from fedcoe_edge.errors import BundleError, ConfigError
from fedcoe_edge.onnx_heads import global_part_graphs
from fedcoe_edge.runtime import MoESession
from fedcoe_edge.training import build_model

REPO = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
FED = "plant-a"


@pytest.fixture(scope="module")
def bundles(digits_moe, tmp_path_factory) -> dict[str, Path]:
    """Signed with one key: v10 (the trained model); v2 (as after 2 rounds), v11 (newer)
    and a v10 of another federation; plus an unsigned v10. All but v10 are v10's files under
    a manifest re-signed as their exporter would write it: only the signed version and
    federation decide what these tests check, never the weights, and one export is ~3 CPU-s
    (the untrained v2 used to be a second export)."""
    model, x_train = digits_moe[0], digits_moe[1]
    root = tmp_path_factory.mktemp("rollback")
    out = {"v10": root / "v10"}
    build_bundle(model, out["v10"], calibration=x_train[:32], include_fused=False,
                 options=QuantizeOptions(mode=QuantMode.FP32), keys=BundleKeys(hmac_key=KEY),
                 federation=FED, version=10)
    for name, change, keys in (("v2", {"version": 2}, BundleKeys(hmac_key=KEY)),
                               ("v11", {"version": 11}, BundleKeys(hmac_key=KEY)),
                               ("other-fed", {"federation": "plant-b"}, BundleKeys(hmac_key=KEY)),
                               ("unsigned", {}, None)):
        out[name] = root / name
        shutil.copytree(out["v10"], out[name])
        doc = {k: v for k, v in json.loads((out["v10"] / "manifest.json").read_text()).items()
               if k != "signature"}
        doc.update(change)
        (out[name] / "manifest.json").write_text(
            json.dumps(sign_manifest(doc, keys) if keys else doc))
    return out


def put_in_place(src: Path, dst: Path) -> None:
    """What the attacker does: replace the device's bundle folder with another."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "device.key"
    path.write_text(KEY.hex() + "\n")
    return path


@pytest.fixture
def x_file(digits_moe, tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, digits_moe[3][:4])
    return path


def predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str]]:
    rc = fedcoe(["predict", *args])
    out, err = capsys.readouterr()
    return rc, out.splitlines(), err.splitlines()


def test_the_manifest_signs_federation_and_version(bundles: dict[str, Path]) -> None:
    doc = json.loads((bundles["v10"] / "manifest.json").read_text())
    assert (doc["federation"], doc["version"]) == (FED, 10)
    sess = MoESession(bundles["v10"], keys=BundleKeys(hmac_key=KEY))
    assert (sess.federation, sess.version, sess.verified_by) == (FED, 10, "hmac-sha256")
    # raising the version of an old bundle is an edit the signature catches
    doc2 = json.loads((bundles["v2"] / "manifest.json").read_text())
    doc2["version"] = 10
    doc2["signature"]["manifest_sha256"] = hashlib.sha256(canonical_bytes(doc2)).hexdigest()
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_manifest(doc2, BundleKeys(hmac_key=KEY), "forged")


def test_predict_min_version_refuses_the_older_bundle_put_back(
        bundles: dict[str, Path], tmp_path: Path, key_file: Path, x_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    device = tmp_path / "bundle"
    put_in_place(bundles["v10"], device)
    common = ["--bundle", str(device), "--input", str(x_file), "--key-file", str(key_file),
              "--min-version", "10", "--federation", FED]
    rc, out, err = predict(capsys, *common)
    assert rc == 0 and len(out) == 4 and err == []
    put_in_place(bundles["v2"], device)  # genuine, signed with the same key: the rollback
    rc, out, err = predict(capsys, *common)
    assert rc == 2 and out == []
    assert len(err) == 1 and "version 2 is older than version 10 (--min-version)" in err[0], err
    assert "rollback" in err[0]
    put_in_place(bundles["v11"], device)
    assert predict(capsys, *common)[0] == 0


def test_predict_refuses_another_federations_bundle(
        bundles: dict[str, Path], tmp_path: Path, key_file: Path, x_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = predict(capsys, "--bundle", str(bundles["other-fed"]), "--input", str(x_file),
                           "--key-file", str(key_file), "--federation", FED)
    assert rc == 2 and out == []
    assert len(err) == 1 and "federation 'plant-b'" in err[0] and repr(FED) in err[0], err
    # a bundle that names no federation (re-signed with the key) is not any federation's
    unnamed = tmp_path / "unnamed"
    put_in_place(bundles["v10"], unnamed)
    doc = json.loads((unnamed / "manifest.json").read_text())
    doc["federation"] = None
    (unnamed / "manifest.json").write_text(json.dumps(sign_manifest(doc, BundleKeys(hmac_key=KEY))))
    with pytest.raises(RollbackError, match="names no federation"):
        MoESession(unnamed, keys=BundleKeys(hmac_key=KEY), release=ReleaseCheck(federation=FED))
    MoESession(unnamed, keys=BundleKeys(hmac_key=KEY))  # none asked for: accepted


@pytest.mark.parametrize("cli", ["fedcoe predict", "python -m fedcoe_edge.runtime"])
def test_unauthenticated_bundle_warns_once_on_stderr(bundles: dict[str, Path], tmp_path: Path,
                                                     x_file: Path, key_file: Path, cli: str) -> None:
    """Without a key nothing proves who wrote the manifest: say so, once, and still predict.
    The case it covers: a re-hashed manifest with top_k changed runs silently."""
    tampered = tmp_path / "tampered"
    put_in_place(bundles["v10"], tampered)
    doc = json.loads((tampered / "manifest.json").read_text())
    doc["top_k"] = doc["model"]["top_k"] = 1
    doc["signature"]["manifest_sha256"] = hashlib.sha256(canonical_bytes(doc)).hexdigest()
    (tampered / "manifest.json").write_text(json.dumps(doc))

    def run(bundle: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = ([sys.executable, "-m", "fedcoe_edge.cli", "predict", "--bundle", str(bundle),
                "--input", str(x_file)] if cli == "fedcoe predict"
               else [sys.executable, "-m", "fedcoe_edge.runtime", str(bundle), str(x_file)])
        return subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    for bundle, how in ((bundles["unsigned"], "unsigned"), (tampered, "no key was given")):
        res = run(bundle)
        assert res.returncode == 0 and len(res.stdout.splitlines()) == 4, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "unauthenticated" in lines[0] and how in lines[0] and str(bundle) in lines[0]
    res = run(bundles["v10"], "--key-file", str(key_file))
    assert res.returncode == 0 and res.stderr == ""


def agent_for(state: Path, bundle: Path) -> DeviceAgent:
    device = DeviceSettings(id="cam1", federation=FED, role="cold", state_dir=str(state),
                            engine="onnx", bundle_path=str(bundle), heartbeat_s=0)
    # never started: no broker connection is made (only the welcome's bundle path runs)
    return DeviceAgent(AgentConfig(device=device, key=KEY, data=DataSettings(dataset="digits")))


def welcome(agent: DeviceAgent, model_cfg: Any) -> None:
    """The welcome's bundle acceptance, as the onnx engine runs it (no broker needed: the
    agent has not connected, so its messages go nowhere)."""
    agent._welcome_onnx({"algorithm": "fedcoe", "bc_key": "00" * 32, "version": 12,
                         "round": 12, "model": model_cfg.to_dict()}, model_cfg)


def test_agent_refuses_a_rollback_by_its_persisted_high_water_mark(
        bundles: dict[str, Path], digits_moe, tmp_path: Path) -> None:
    cfg = digits_moe[0].cfg
    state, bundle = tmp_path / "state", tmp_path / "bundle"
    put_in_place(bundles["v10"], bundle)
    agent = agent_for(state, bundle)
    welcome(agent, cfg)
    assert agent.refused is None and agent.session is not None and agent.session.version == 10
    floor = json.loads((state / BUNDLE_FLOOR_FILE).read_text())
    assert floor == {"federation": FED, "version": 10}

    put_in_place(bundles["v2"], bundle)  # the rollback, then the agent restarts
    for _ in range(2):
        restarted = agent_for(state, bundle)
        welcome(restarted, cfg)
        assert restarted.session is None and restarted.refused is not None
        assert "version 2 is older than version 10" in restarted.refused
        assert str(state / BUNDLE_FLOOR_FILE) in restarted.refused
        assert "\n" not in restarted.refused
        assert VersionFloor(state / BUNDLE_FLOOR_FILE).read() == (FED, 10)  # not lowered

    put_in_place(bundles["other-fed"], bundle)
    other = agent_for(state, bundle)
    welcome(other, cfg)
    assert other.refused is not None and "federation 'plant-b'" in other.refused

    put_in_place(bundles["v11"], bundle)
    newer = agent_for(state, bundle)
    welcome(newer, cfg)
    assert newer.refused is None and VersionFloor(state / BUNDLE_FLOOR_FILE).read() == (FED, 11)


def test_swaps_raise_the_version_and_never_lower_it(bundles: dict[str, Path], digits_moe,
                                                   tmp_path: Path) -> None:
    """A cold device swaps parts of model version V into its bundle: the signed manifest
    says V afterwards, the agent's floor follows, and a part of an older version is refused."""
    model = digits_moe[0]
    bundle = tmp_path / "bundle"
    put_in_place(bundles["v10"], bundle)
    agent = agent_for(tmp_path / "state", bundle)
    agent.session = agent.open_bundle()
    params = {k: v.numpy() for k, v in build_model(model.cfg, 5).global_state().items()
              if k.startswith("global.gate.")}
    graph = global_part_graphs(model.cfg, agent.session.feat_shape, params)["global_gate"]
    with pytest.raises(RollbackError, match="older than the bundle's version 10"):
        agent.session.swap_part("global_gate", graph, quantization="fp32", version=9)
    agent._swap_into_bundle(params, 14)
    assert MoESession(bundle, keys=BundleKeys(hmac_key=KEY)).version == 14
    assert VersionFloor(tmp_path / "state" / BUNDLE_FLOOR_FILE).read() == (FED, 14)


def test_a_training_agent_never_rebuilds_an_older_bundle(bundles: dict[str, Path], digits_moe,
                                                         tmp_path: Path) -> None:
    """The torch agent's own rebuild (after a round) signs the global version it received and
    raises the floor; a rebuild from an older version (a coordinator restored from an old
    checkpoint) is not written, and the heartbeat's bundle status says why."""
    from types import SimpleNamespace

    from fedcoe_edge.data.client import ClientData

    model, x_train, y_train, x_test, y_test = digits_moe
    state = tmp_path / "state"
    device = DeviceSettings(id="cam1", federation=FED, state_dir=str(state), heartbeat_s=0)
    agent = DeviceAgent(AgentConfig(device=device, key=KEY, data=DataSettings(dataset="digits")),
                        data=ClientData(x_train[:64], y_train[:64], x_test, y_test))
    agent.strategy = SimpleNamespace(model=model)  # type: ignore[assignment]
    params = {k: v.numpy() for k, v in model.global_state().items()}
    agent._rebuild_bundle(params, [0, 1, 2, 3], 12, 12)
    assert agent.bundle_status == {"round": 12, "ok": True, "error": None}
    built = MoESession(state / "bundle", keys=BundleKeys(hmac_key=KEY),
                       release=ReleaseCheck(min_version=12, federation=FED))
    assert (built.version, built.federation) == (12, FED)
    assert VersionFloor(state / BUNDLE_FLOOR_FILE).read() == (FED, 12)
    before = (state / "bundle" / "manifest.json").read_bytes()
    agent._rebuild_bundle(params, [0, 1, 2, 3], 3, 3)
    assert agent.bundle_status is not None and not agent.bundle_status["ok"]
    assert "version 3 is older than version 12" in agent.bundle_status["error"]
    assert (state / "bundle" / "manifest.json").read_bytes() == before


def test_version_floor_file_is_strict(tmp_path: Path, bundles: dict[str, Path]) -> None:
    path = tmp_path / BUNDLE_FLOOR_FILE
    floor = VersionFloor(path)
    assert floor.read() == (None, 0)
    v10 = json.loads((bundles["v10"] / "manifest.json").read_text())
    v2 = json.loads((bundles["v2"] / "manifest.json").read_text())
    assert floor.record(v10) == 10 and floor.record(v2) == 10  # never lowered
    assert floor.read() == (FED, 10)
    with pytest.raises(RollbackError, match="federation 'plant-b'"):
        floor.record({**v10, "federation": "plant-b"})
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable.*remove it"):
        floor.check(FED)
    with pytest.raises(ConfigError, match="minimum bundle version must be an int >= 0"):
        ReleaseCheck(min_version=-1)
