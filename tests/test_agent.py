"""Device agent: configuration, its own data (npz, image folder, demo dataset), the private
level on disk that never travels, and the cold-start path of a late device."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from device_agent.config import DataSettings, load_config
from device_agent.daemon import AgentHooks, DeviceAgent
from device_agent.data import load_data, load_image_folder, load_npz
from fedcoe_edge.checkpoint import load_arrays_file
from fedcoe_edge.cli import main as fedcoe_main
from fedcoe_edge.data import make_federation
from fedcoe_edge.errors import ConfigError, DataError
from fedcoe_edge.protocol import device_key
from fedcoe_edge.training import accuracy
from fedcoe_edge.transport import MemoryBroker

SECRET_HEX = DEMO_SECRET.hex()


def memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


# --- configuration ----------------------------------------------------------------------
def test_agent_config_derives_its_key_and_takes_env_overrides(tmp_path: Path) -> None:
    (tmp_path / "secret.hex").write_text(SECRET_HEX + "\n")
    (tmp_path / "agent.toml").write_text("""
[device]
id = "pi-1"
tier = "small"
[security]
secret_file = "secret.hex"
[data]
npz = "data/mine.npz"
""")
    cfg = load_config(tmp_path / "agent.toml", {"FEDCOE_DEVICE_ID": "pi-7", "FEDCOE_BROKER_HOST": "10.0.0.2",
                                                "FEDCOE_DEVICE_COMPRESS_UPLOADS": "false"})
    assert cfg.device.id == "pi-7" and cfg.broker.host == "10.0.0.2"
    assert cfg.device.compress_uploads is False
    assert cfg.key == device_key(DEMO_SECRET, "pi-7")  # per-device key from the federation secret
    assert cfg.state_dir == tmp_path / "state" / "pi-7"
    assert cfg.data.npz == str(tmp_path / "data" / "mine.npz")


@pytest.mark.parametrize(("text", "match"), [
    ("[device]\nid = 'a'\n[data]\ndataset = 'digits'\n", r"\[security\] needs key"),
    ("[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'digits'\n", r"\[device\] id is required"),
    ("[device]\nid = 'a/b'\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'digits'\n", "must match"),
    ("[device]\nid = 'a'\n[security]\nkey = 'abcd'\n[data]\ndataset = 'digits'\n", "at least 16 bytes"),
    ("[device]\nid = 'a'\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\n", "exactly one of npz"),
    ("[device]\nid = 'a'\nrole = 'boss'\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'd'\n",
     "role must be train|cold"),
    ("[device]\nid = 'a'\nbundle = 'x'\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'd'\n",
     "bundle must be every|final|off"),
    ("[device]\nid = 'a'\n[broker]\ntls = true\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'd'\n",
     r"\[broker\].tls needs ca_file"),
    ("[device]\nid = 'a'\nchunk_size = 1023\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'd'\n",
     r"\[device\] chunk_size must be in 1 KiB..16 MiB, got 1023"),
    ("[device]\nid = 'a'\nwindow = 0\n[security]\nkey = '" + "ab" * 16 + "'\n[data]\ndataset = 'd'\n",
     r"\[device\] window must be an integer in 1..256, got 0"),
])
def test_bad_agent_config(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "agent.toml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "agent.toml", {})


# --- data -------------------------------------------------------------------------------
def test_npz_sources(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((40, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 40)
    np.savez(tmp_path / "split.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    d = load_npz(tmp_path / "split.npz", DataSettings())
    assert (d.num_train, len(d.y_test)) == (30, 10) and d.y_train.dtype == np.int64
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    d = load_npz(tmp_path / "xy.npz", DataSettings(test_fraction=0.25))
    assert (d.num_train, len(d.y_test)) == (30, 10)
    np.testing.assert_array_equal(np.sort(np.concatenate([d.y_train, d.y_test])), np.sort(y))
    np.savez(tmp_path / "unlabeled.npz", x=x)
    d = load_npz(tmp_path / "unlabeled.npz", DataSettings())
    assert d.num_train == 0 and len(d.x_test) == 40 and (d.y_test == -1).all()
    np.savez(tmp_path / "bad.npz", x=x, y=y[:5])
    with pytest.raises(DataError, match="40 inputs but 5 labels"):
        load_npz(tmp_path / "bad.npz", DataSettings())
    np.savez(tmp_path / "nan.npz", x=np.full((4, 2), np.nan, np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="non-finite"):
        load_npz(tmp_path / "nan.npz", DataSettings())
    with pytest.raises(DataError, match="data file not found"):
        load_npz(tmp_path / "none.npz", DataSettings())


def test_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    d = load_image_folder(tmp_path, DataSettings(image_shape=[1, 8, 8], test_fraction=0.25))
    assert d.x_train.shape == (6, 1, 8, 8) and d.x_train.dtype == np.float32
    assert d.x_train.min() >= 0 and d.x_train.max() <= 1
    assert sorted(np.concatenate([d.y_train, d.y_test]).tolist()) == [0] * 4 + [1] * 4
    (tmp_path / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path, DataSettings())


def test_demo_dataset_client_is_the_simulators_split() -> None:
    d = load_data(DataSettings(dataset="digits", client="2", num_clients=4, new_clients=1))
    fed = make_federation("digits", "dirichlet", 4, 1, 0, 0.5, 20)
    np.testing.assert_array_equal(d.x_train, fed.clients["2"].x_train)
    cold = load_data(DataSettings(dataset="digits", client="new0", num_clients=4, new_clients=1))
    assert cold.num_train == 0 and len(cold.x_test) == len(fed.new_clients["new0"].x_test)
    with pytest.raises(DataError, match="client '9' not in the digits federation"):
        load_data(DataSettings(dataset="digits", client="9", num_clients=4))


# --- the agent in a federation ---------------------------------------------------------
def test_private_level_stays_on_disk_and_survives_a_restart(tmp_path: Path) -> None:
    factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, heartbeat_s=0.2, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        agent = fed.agents["1"]
        local = agent.local_state
        assert local is not None
        c = fed.coordinator
        assert c is not None

        def beat() -> dict[str, Any]:
            row = [d for d in c.store.devices() if d["id"] == "1"][0]
            return json.loads(row["telemetry"]) if row["telemetry"] else {}
        fed.wait(lambda: beat().get("rounds_done") == 2, 30, "heartbeat after round 2")
        telemetry = beat()
    finally:
        fed.stop()
    assert telemetry["rss_mb"] > 0 and telemetry["load"] >= 0
    on_disk = load_arrays_file(tmp_path / "1" / "local.safetensors")
    assert on_disk and all(k.startswith("local.") for k in on_disk)
    for k, v in local.items():
        np.testing.assert_array_equal(on_disk[k], v)
    # what the coordinator received holds no private tensor
    for path in (tmp_path / "coordinator" / "rounds").glob("*/update_*.safetensors"):
        names = load_arrays_file(path)
        assert names and not any(k.startswith("local.") for k in names), path
    # a restarted agent picks its private level up again
    again = DeviceAgent(fed.agent_config("1", "1"), memory_factory())
    again.start()
    try:
        assert again.local_state is not None
        for k, v in local.items():
            np.testing.assert_array_equal(again.local_state[k], v)
    finally:
        again.close()


def cold_start(tmp_path: Path, bundle: str) -> dict[str, Any]:
    """Two rounds with three devices, then a late device joins cold."""
    factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        cfg = fed.agent_config("new0", "new0", role="cold")
        cfg.device.bundle = bundle
        cold = DeviceAgent(cfg, factory)
        fed.agents["new0"] = cold
        cold.start()
        fed.wait(cold.cold_ready.is_set, 60, "cold start")
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: bool(c.store.evals("cold")), 30, "cold eval")
        if bundle != "off":
            fed.wait(lambda: (tmp_path / "new0" / "bundle" / "manifest.json").is_file()
                     or cold.bundle_error is not None, 120, "bundle")
            assert cold.bundle_error is None, f"bundle rebuild failed: {cold.bundle_error}"
        x, pool = cold.data.x_test, cold.data.x_pool  # experts from the pool, scored on x
        return {"agent": cold, "eval": c.store.evals("cold")[0], "traffic": c.store.traffic(),
                "want_acc": accuracy(c.strategy.predict_cold(x, x_unlabeled=pool), cold.data.y_test),
                "want_ids": c.strategy.cold_start_experts(pool),  # type: ignore[attr-defined]
                "torch_classes": c.strategy.predict_cold(x[:20], x_unlabeled=pool).argmax(1), "x": x}
    finally:
        fed.stop()


def test_late_device_takes_the_cold_start_path(tmp_path: Path) -> None:
    """Gate first, routing prior on its own data, only the experts that carry most of it
    (the strategy's choice, at least top_k), predict at once (no gradient step): exactly the
    accuracy of the strategy's own cold-start evaluation."""
    r = cold_start(tmp_path, "off")
    cold, row, ids = r["agent"], r["eval"], r["want_ids"]
    assert row["device"] == "new0" and row["correct"] / row["total"] == r["want_acc"]
    assert cold.held_ids == ids and 2 <= len(ids) <= 4
    assert not any(k.startswith("global.experts.") and int(k.split(".")[2]) not in ids
                   for k in cold.held)
    assert r["traffic"][("down", "gate")] < r["traffic"][("down", "cold")]
    assert cold.rounds_done == [] and cold.local_state is None  # never trained


def test_cold_device_bundle_runs_with_fedcoe_predict(tmp_path: Path) -> None:
    pytest.importorskip("export.bundle")
    pytest.importorskip("fedcoe_edge.runtime")
    import contextlib
    import io

    r = cold_start(tmp_path, "final")
    bundle = tmp_path / "new0" / "bundle"
    assert json.loads((bundle / "manifest.json").read_text())["held_experts"] == r["want_ids"]
    np.save(tmp_path / "x.npy", r["x"][:20])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = fedcoe_main(["predict", "--bundle", str(bundle), "--input", str(tmp_path / "x.npy"),
                          "--global-only", "--json"])
    assert rc == 0
    classes = np.array(json.loads(buf.getvalue())["classes"])
    assert (classes == r["torch_classes"]).mean() >= 0.9  # the int8 bundle agrees with torch


def test_deploy_example_config_parses() -> None:
    path = Path(__file__).resolve().parents[1] / "deploy" / "agent.toml"
    cfg = load_config(path, {"FEDCOE_SECURITY_KEY_FILE": "", "FEDCOE_SECURITY_KEY": "ab" * 16})
    assert cfg.device.id == "pi-17" and cfg.broker.tls and cfg.device.compress_uploads


def test_device_restart_before_its_upload_resends_the_same_update(tmp_path: Path) -> None:
    """A device that trained round 2 and died before uploading comes back, restores the
    update and private level it saved in one atomic file, and re-sends that update instead
    of training twice: the federation ends exactly where an uninterrupted one does."""
    # batch aggregation: compared bit for bit, and streamed sums depend on the arrival order
    want = EmbeddedFederation(tmp_path / "ref", memory_factory(), devices=3, rounds=3,
                              aggregation="batch", **small()).final_state(90)

    died = threading.Event()

    def die_before_upload(agent: DeviceAgent, rnd: int) -> bool:
        if rnd == 2 and not died.is_set():
            died.set()
            return False
        return True

    factory = memory_factory()
    fed = EmbeddedFederation(tmp_path / "run", factory, devices=3, rounds=3, aggregation="batch",
                             hooks={"1": AgentHooks(before_upload=die_before_upload)}, **small())
    fed.start()
    try:
        fed.wait(died.is_set, 60, "device 1 trained round 2")
        old = fed.agents["1"]
        old.close()
        saved = load_arrays_file(tmp_path / "run" / "1" / "round_result.safetensors")
        assert any(k.startswith("up/") for k in saved) and any(k.startswith("local/") for k in saved)
        back = DeviceAgent(fed.agent_config("1", "1"), factory)
        assert back.last_result is None
        back.start()
        assert back.last_result is not None and back.last_result[0] == 2
        fed.agents["1"] = back
        fed.wait_rounds(90)
        c = fed.coordinator
        assert c is not None
        got = dict(c.strategy.global_state)
        accepted = [c.store.round_summary(r)["accepted"] for r in (1, 2, 3)]
        rejected = c.store.events(kind="rejected")
    finally:
        fed.stop()
    assert accepted == [3, 3, 3] and rejected == []
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_label_histogram_leaves_the_device_only_if_allowed(tmp_path: Path) -> None:
    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=2, rounds=1,
                             device_overrides={"1": {"share_label_histogram": True, "tier": "large"}}, **small())
    fed.start()
    try:
        fed.wait_rounds(60)
        rows = {d["id"]: d for d in fed.coordinator.store.devices()}  # type: ignore[union-attr]
        hist = np.bincount(fed.agents["1"].data.y_train).tolist()
    finally:
        fed.stop()
    assert rows["0"]["label_hist"] is None and json.loads(rows["1"]["label_hist"]) == hist
    assert (rows["0"]["tier"], rows["1"]["tier"]) == ("medium", "large")
    assert json.loads(rows["1"]["capabilities"])["num_samples"] == sum(hist)


def test_bundle_rebuilds_are_reported_through_the_coordinator(tmp_path: Path) -> None:
    """A rebuild's outcome travels in a heartbeat sent at once (not only every heartbeat_s),
    the coordinator keeps it as the device's telemetry, and `fedcoe demo` reads it there."""
    from benchmarks.demo import bundle_status

    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=2, rounds=1, heartbeat_s=3600, **small())
    fed.start()
    try:
        fed.wait_rounds(90)
        c = fed.coordinator
        assert c is not None
        fed.agents["0"]._bundle_done(1, True, None)
        fed.agents["1"]._bundle_done(1, False, "OSError: " + "x" * 500)
        fed.wait(lambda: len(bundle_status(c.store)) == 2, 30, "both statuses at the coordinator")
        got = bundle_status(c.store)
    finally:
        fed.stop()
    assert got["0"] == {"round": 1, "ok": True, "error": None}
    assert got["1"]["ok"] is False and got["1"]["error"].startswith("OSError: x")
    assert len(got["1"]["error"]) == 200  # bounded: a device cannot fill the store with it
