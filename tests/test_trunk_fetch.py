"""A pretrained trunk shipped once over MQTT, hash-checked (docs/daemons.md, "Pretrained trunk").

The coordinator pretrains a MobileNetV3-Small trunk (``fedcoe_edge.pretrain``, digits at
32x32, one epoch) and names it in its model, frozen. Devices hold no trunk file: each
fetches it once from the coordinator over a real Mosquitto (the chunked, signed download
path), checks its sha256 against the federation's, saves it in its state folder and trains;
rounds move no trunk tensor (tasks and updates stored by the coordinator name none); a
restarted device reuses its copy without a second download; a cold device fetches it as
well; a device whose own trunk file is not the federation's declines. The device's refusal
of a downloaded file with another hash is driven directly (a coordinator never serves one:
it checks the file before sending).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from coordinator.config import CoordinatorConfig, EvalSettings
from coordinator.harness import DEMO_SECRET, EmbeddedFederation
from device_agent.config import AgentConfig, DataSettings, DeviceSettings
from device_agent.daemon import TRUNK_FILE, DeviceAgent
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data.datasets import load_digits
from fedcoe_edge.pretrain import PretrainOptions, pretrain_trunk_file, to_camera
from fedcoe_edge.protocol import BrokerSettings, device_key, mqtt_factory
from fedcoe_edge.strategies import ClientData
from fedcoe_edge.trunk import TRUNK_PREFIX
from fedcoe_edge.wire import TransferManifest

SIZE = 32


@pytest.fixture(scope="module")
def trunks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The federation's pretrained trunk and another one (a different seed)."""
    root = tmp_path_factory.mktemp("trunks")
    opts = PretrainOptions(dataset="digits", size=SIZE, epochs=1, public_fraction=0.2,
                           batch_size=32)
    good = pretrain_trunk_file(root / "trunk.safetensors", opts)
    other = pretrain_trunk_file(root / "other.safetensors", replace(opts, seed=1))
    return {"path": good.path, "sha256": good.sha256, "bytes": good.bytes, "other": other.path}


def camera_model(trunks: dict[str, Any]) -> ModelConfig:
    return ModelConfig(input_shape=(3, SIZE, SIZE), trunk="mobilenet_v3_small", trunk_mode="frozen",
                       trunk_weights=str(trunks["path"]), trunk_sha256=trunks["sha256"],
                       expert_kind="mlp", expert_hidden=16, num_global_experts=4, top_k=2,
                       num_local_experts=1)


def camera_npz(root: Path, clients: int) -> list[Path]:
    """Digits at 32x32 RGB, a disjoint slice of 90 images per client (60 train, 30 test)."""
    x, y = load_digits()
    order = np.random.default_rng(0).permutation(len(y))
    paths = []
    for c in range(clients):
        idx = order[c * 90:(c + 1) * 90]
        cam = to_camera(x[idx], SIZE)
        path = root / f"client{c}.npz"
        np.savez(path, x_train=cam[:60], y_train=y[idx[:60]], x_test=cam[60:], y_test=y[idx[60:]])
        paths.append(path)
    return paths


@dataclass
class CameraFederation(EmbeddedFederation):
    """The embedded federation on camera-size npz data, no coordinator-side evaluation."""

    npz: list[Path] | None = None

    def coordinator_config(self) -> CoordinatorConfig:
        return replace(super().coordinator_config(), eval=EvalSettings())

    def agent_config(self, dev: str, client: str, role: str = "train") -> AgentConfig:
        assert self.npz is not None
        cfg = super().agent_config(dev, client, role)
        return replace(cfg, data=DataSettings(npz=str(self.npz[int(client)])))


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def test_devices_fetch_the_trunk_once_and_rounds_carry_no_trunk(
        tmp_path: Path, make_mosquitto: Any, trunks: dict[str, Any]) -> None:
    broker = make_mosquitto()
    fed = CameraFederation(tmp_path, mqtt_factory(BrokerSettings(port=broker.port)), devices=2,
                           rounds=2, deadline_s=60.0, model=camera_model(trunks),
                           train=TrainConfig(local_epochs=1, batch_size=16),
                           npz=camera_npz(tmp_path, 3), bundle="off")
    fed.start()
    try:
        fed.wait_rounds(120)
        c = fed.coordinator
        assert c is not None
        rows = [c.store.round_summary(r) for r in (1, 2)]
        assert [r["accepted"] for r in rows] == [2, 2]
        # each device fetched the file once and holds exactly the federation's trunk
        assert c.store.traffic().get(("down", "trunk")) == 2 * trunks["bytes"]
        for dev in ("0", "1"):
            held = tmp_path / dev / TRUNK_FILE
            assert hashlib.sha256(held.read_bytes()).hexdigest() == trunks["sha256"]
        # no trunk tensor in any task or update the coordinator stored ...
        stored = sorted((tmp_path / "coordinator" / "rounds").rglob("*.safetensors"))
        assert any(p.name.startswith("task_") for p in stored) and len(stored) >= 4
        for p in stored:
            names = tensor_names(p)
            assert names and not [n for n in names if TRUNK_PREFIX in n], p
        # ... and a round's traffic is a small fraction of the trunk file
        print(f"trunk file {trunks['bytes']} bytes, fetched once per device; per device and "
              f"round: down {[r['bytes_down'] // 2 for r in rows]}, up "
              f"{[r['bytes_up'] // 2 for r in rows]} bytes")
        for r in rows:
            assert 0 < r["bytes_down"] / 2 < trunks["bytes"] / 10
            assert 0 < r["bytes_up"] / 2 < trunks["bytes"] / 10

        # a restarted device reuses its copy: no second download
        fed.agents["0"].close()
        again = fed.add_agent("0", "0")
        fed.wait(lambda: again.strategy is not None, 30, "restarted device joined")
        assert c.store.traffic().get(("down", "trunk")) == 2 * trunks["bytes"]

        # a cold device (torch engine) fetches the trunk too, then the gate and its experts
        cold = fed.add_agent("5", "2", role="cold")
        fed.wait(cold.cold_ready.is_set, 60, "cold device ready")
        assert c.store.traffic().get(("down", "trunk")) == 3 * trunks["bytes"]

        # a device whose own trunk file is not the federation's declines, never trains
        fed.device_overrides["9"] = {"trunk_weights": str(trunks["other"])}
        bad = fed.add_agent("9", "2")
        fed.wait(lambda: bad.refused is not None, 30, "device with a wrong trunk declined")
        assert "differs from model.trunk_sha256" in (bad.refused or "")
        fed.wait(lambda: any(e["device"] == "9" for e in c.store.events(kind="decline")), 30,
                 "decline recorded")
        assert bad.strategy is None and not (tmp_path / "9" / TRUNK_FILE).exists()
    finally:
        fed.stop()


def welcome(model: ModelConfig) -> dict[str, Any]:
    return {"algorithm": "fedcoe", "seed": 0, "model": model.to_dict(),
            "train": TrainConfig().to_dict(), "bc_key": "00" * 32, "version": 0, "round": 0,
            "rounds": 1, "round_open": False, "classes": []}


def offline_agent(root: Path, npz: Path) -> DeviceAgent:
    """A device agent that is not connected: its handlers run as the worker would run them."""
    x = np.load(npz)
    data = ClientData(x["x_train"], x["y_train"], x["x_test"], x["y_test"])
    cfg = AgentConfig(device=DeviceSettings(id="d", federation="test", state_dir=str(root),
                                            bundle="off"),
                      key=device_key(DEMO_SECRET, "d"), data=DataSettings(npz=str(npz)))
    return DeviceAgent(cfg, data=data)


def test_a_downloaded_trunk_with_another_hash_is_refused(tmp_path: Path,
                                                         trunks: dict[str, Any]) -> None:
    model = camera_model(trunks)
    npz = camera_npz(tmp_path, 1)[0]
    agent = offline_agent(tmp_path / "dev", npz)
    agent._handle_welcome(welcome(model))
    assert agent.strategy is None and agent._trunk_wait is not None  # asked for the trunk
    wrong = Path(trunks["other"]).read_bytes()
    manifest = TransferManifest.for_payload(wrong, expert_ids=[], base_version=0)
    agent._handle_model({"purpose": "trunk", "round": 0}, manifest, wrong)
    assert agent.refused is not None and "not the federation's model.trunk_sha256" in agent.refused
    assert agent.strategy is None and not (tmp_path / "dev" / TRUNK_FILE).exists()

    # the right file is saved and used; a restarted agent finds it and asks for nothing
    good = Path(trunks["path"]).read_bytes()
    agent = offline_agent(tmp_path / "dev", npz)
    agent._handle_welcome(welcome(model))
    agent._handle_model({"purpose": "trunk", "round": 0},
                        TransferManifest.for_payload(good, expert_ids=[], base_version=0), good)
    assert agent.refused is None and agent.strategy is not None
    assert (tmp_path / "dev" / TRUNK_FILE).read_bytes() == good
    restarted = offline_agent(tmp_path / "dev", npz)
    restarted._handle_welcome(welcome(model))
    assert restarted.strategy is not None and restarted._trunk_wait is None
    assert not restarted._requests
    # a stale copy (another federation's trunk) is fetched again, not used
    (tmp_path / "dev" / TRUNK_FILE).write_bytes(wrong)
    stale = offline_agent(tmp_path / "dev", npz)
    stale._handle_welcome(welcome(model))
    assert stale.strategy is None and stale._trunk_wait is not None


def test_the_coordinator_serves_only_the_federations_trunk(tmp_path: Path,
                                                            trunks: dict[str, Any]) -> None:
    """What a trunk fetch is answered with: the file's own bytes (its manifest's sha256 is
    the federation's); a file replaced on disk after start is refused, never served."""
    from coordinator.daemon import Coordinator
    from fedcoe_edge.errors import ConfigError, ValidationError

    mine = tmp_path / "trunk.safetensors"
    mine.write_bytes(Path(trunks["path"]).read_bytes())
    model = replace(camera_model(trunks), trunk_weights=str(mine))
    fed = CameraFederation(tmp_path / "a", mqtt_factory(BrokerSettings()), model=model, bundle="off")
    c = Coordinator(fed.coordinator_config())
    try:
        data, manifest = c._trunk_payload()
        assert data == mine.read_bytes() and manifest.sha256 == trunks["sha256"]
    finally:
        c.close()
    c = Coordinator(replace(fed, root=tmp_path / "b").coordinator_config())
    try:
        mine.write_bytes(Path(trunks["other"]).read_bytes())  # replaced after the start
        with pytest.raises(ConfigError, match="not the federation's"):
            c._trunk_payload()
    finally:
        c.close()
    plain = CameraFederation(tmp_path / "c", mqtt_factory(BrokerSettings()),
                             model=replace(model, trunk_mode="federated", trunk_weights="",
                                           trunk_sha256=""), bundle="off")
    c = Coordinator(plain.coordinator_config())
    try:
        with pytest.raises(ValidationError, match="names no pretrained trunk"):
            c._trunk_payload()
    finally:
        c.close()


def test_a_device_gets_the_trunk_a_bounded_number_of_times(tmp_path: Path,
                                                          trunks: dict[str, Any]) -> None:
    """A device re-fetching the trunk in a loop is refused after TRUNK_FETCH_MAX downloads
    in the window (the general fetch rate alone would let it pull the file every 10 s);
    other devices are unaffected; the count survives a restart of the coordinator (it is
    in the store), and rows older than the window are pruned."""
    import coordinator.daemon as daemon
    from coordinator.daemon import TRUNK_FETCH_MAX, Coordinator
    from fedcoe_edge.errors import ValidationError

    fed = CameraFederation(tmp_path / "a", mqtt_factory(BrokerSettings()), model=camera_model(trunks), bundle="off")
    c = Coordinator(fed.coordinator_config())
    try:
        for _ in range(TRUNK_FETCH_MAX):
            c._count_trunk_fetch("dev-0")
        with pytest.raises(ValidationError, match=f"at most {TRUNK_FETCH_MAX}"):
            c._count_trunk_fetch("dev-0")
        c._count_trunk_fetch("dev-1")  # another device still gets its download
    finally:
        c.close()
    c = Coordinator(fed.coordinator_config())  # a restart does not reset the count
    try:
        with pytest.raises(ValidationError, match=f"at most {TRUNK_FETCH_MAX}"):
            c._count_trunk_fetch("dev-0")
        # downloads older than the window no longer count, and the schedule prunes them
        c.store._exec("UPDATE trunk_fetches SET ts = ts - ? WHERE device='dev-0'",
                      (daemon.TRUNK_FETCH_WINDOW_S + 1,))
        c._count_trunk_fetch("dev-0")
        c._prune()
        left = c.store._rows("SELECT device, COUNT(*) AS n FROM trunk_fetches GROUP BY device")
        assert {r["device"]: r["n"] for r in left} == {"dev-0": 1, "dev-1": 1}
    finally:
        c.close()
