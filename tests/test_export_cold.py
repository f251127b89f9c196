"""``fedcoe export --cold`` (docs/daemons.md, "A cold device's starter bundle"): the
coordinator's checkpoint alone (no client's private file) gives a signed starter bundle of
the federation's model, and a cold inference-only device starts from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.harness import DEMO_SECRET, EmbeddedFederation
from device_agent.daemon import DeviceAgent
from fedcoe_edge.bundle_io import ReleaseCheck
from fedcoe_edge.bundle_sig import BundleKeys
from fedcoe_edge.cli import main
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import FedCoEError
from fedcoe_edge.protocol import device_key
from fedcoe_edge.runtime import MoESession
from fedcoe_edge.training import accuracy
from fedcoe_edge.transport import MemoryBroker


def small(devices: int) -> dict[str, Any]:
    """Test-sized knobs, named (the harness may default to the daemons' own): narrow
    experts, one local epoch, no int8 bundle rebuild on the devices."""
    return {"model": ModelConfig(expert_hidden=16), "train": TrainConfig(local_epochs=1),
            "federation": "test",
            "device_overrides": {d: {"bundle": "off"} for d in [*map(str, range(devices)), "new0"]}}


def test_a_cold_device_starts_from_a_bundle_exported_from_the_coordinator_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broker = MemoryBroker()

    def factory(cid: str, will: Any, birth: Any) -> Any:
        return broker.client(cid, will=will, birth=birth)

    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, **small(3))
    fed.start()
    try:
        fed.wait_rounds(120)
        c = fed.coordinator
        assert c is not None
        # the training devices are done: close them (finishing any bundle rebuild in hand),
        # so this process runs one torch.export at a time, which torch requires
        for dev in list(fed.agents):
            fed.agents.pop(dev).close()
        ckpt = tmp_path / "coordinator" / "checkpoint"
        assert not list(ckpt.glob("client_*.safetensors"))  # the coordinator holds no private level
        key = device_key(DEMO_SECRET, "new0")
        (tmp_path / "device.key").write_text(key.hex() + "\n")
        out = tmp_path / "starter"
        rc = main(["export", "--checkpoint-dir", str(ckpt), "--cold", "--out", str(out),
                   "--sign-key-file", str(tmp_path / "device.key"), "--federation", "test",
                   "--no-fused", "--report", str(tmp_path / "report.json")])
        assert rc == 0, capsys.readouterr().err
        version = json.loads((ckpt / "model.json").read_text())["version"]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["federation"] == "test" and manifest["version"] == version >= 1
        assert manifest["meta"]["role"] == "cold"
        k = c.strategy.model_cfg.num_global_experts
        assert sorted(manifest["held_experts"]) == list(range(k))
        assert manifest["quantization"]["mode"] == "fp32"  # no device data to calibrate int8 on
        # signed like every bundle: with the device's key, naming federation and version
        MoESession(out, keys=BundleKeys(hmac_key=key),
                   release=ReleaseCheck(min_version=version, federation="test"))
        with pytest.raises(FedCoEError):
            MoESession(out, keys=BundleKeys(hmac_key=b"x" * 32))
        assert json.loads((tmp_path / "report.json").read_text())["eval_data"] == "random inputs"

        # the docs' promise: a cold device on the onnx engine starts from it
        cfg = fed.agent_config("new0", "new0", role="cold")
        cfg.device.engine = "onnx"
        cfg.device.bundle_path = str(out)
        cold = DeviceAgent(cfg, factory)
        fed.agents["new0"] = cold
        cold.start()
        fed.wait(cold.cold_ready.is_set, 90, "cold start")
        fed.wait(lambda: bool(c.store.evals("cold")), 30, "cold eval")
        assert cold.refused is None
        x, y = cold.data.x_test, cold.data.y_test
        row = c.store.evals("cold")[0]
        want = accuracy(c.strategy.predict_cold(x, x_unlabeled=cold.data.x_pool), y)
        assert abs(row["correct"] / row["total"] - want) <= 1 / row["total"]
        assert np.isfinite(want)
    finally:
        fed.stop()


def test_export_without_client_or_cold_is_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --client ID" in err[0] and "--cold" in err[0], err
