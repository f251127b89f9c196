"""``fedcoe demo``: broker, coordinator and agents as real processes; a clean stop at the
end and on SIGTERM (what Ctrl-C or systemd sends)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from fedcoe_edge.broker import find_mosquitto
from fedcoe_edge.errors import ConfigError

pytestmark = pytest.mark.integration

KEYS = ("rounds_completed", "final_global_acc", "final_global_acc_device_splits",
        "final_personalized_acc", "cold_start_acc",
        "bytes_up_total", "bytes_down_total", "bytes_full_exchange_equivalent")


@pytest.fixture(autouse=True)
def _need_mosquitto() -> None:
    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))


def demo_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedcoe_edge.cli", "demo", "--out", str(out), "--devices", "3",
            "--bundle", "off", *extra]


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_demo_runs_rounds_and_a_cold_device_then_stops_everything(tmp_path: Path) -> None:
    out, js = tmp_path / "demo", tmp_path / "demo.json"
    proc = subprocess.run(demo_cmd(out, "--rounds", "2", "--json", str(js)), capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(js.read_text())
    assert all(doc[k] is not None for k in KEYS)
    assert doc["rounds_completed"] == 2 and len(doc["rounds"]) == 2
    assert 0 <= doc["cold_start_acc"] <= 1 and 0 < doc["final_personalized_acc"] <= 1
    assert doc["bytes_up_total"] < 0.5 * doc["bytes_full_exchange_equivalent"]
    assert doc["rejected_total"] == 0 and doc["failed_total"] == 0
    assert "| 1 | 3 | 3 | 0 | 0 |" in proc.stdout and "| 2 | 3 | 3 | 0 | 0 |" in proc.stdout
    assert "| cold_start_acc |" in proc.stdout
    for name in ("coordinator", "dev0", "dev1", "dev2", "dev3"):
        log = (out / "logs" / f"{name}.log").read_text()
        assert "Traceback" not in log, name
    assert "signal 15: stopping" in (out / "logs" / "coordinator.log").read_text()
    # every device kept its private level on disk
    assert all((out / "devices" / f"dev{i}" / "local.safetensors").is_file() for i in range(3))


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_demo_stops_every_process_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.Popen(demo_cmd(out, "--rounds", "50"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the first round closed
            if line.startswith("| 1 |"):
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 5  # mosquitto, coordinator, three agents
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert "interrupted; stopping every process" in (proc.stderr.read() if proc.stderr else "")
    assert not any(p.is_running() for p in children)


def test_demo_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    proc = subprocess.run(demo_cmd(tmp_path), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not empty and not a previous demo folder" in proc.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bundle_check_scores_the_devices_own_signed_bundle(tmp_path: Path, digits_bundle: Path) -> None:
    """The demo's last step: a device's bundle, opened with that device's key, scored on the
    device's own test split (the split the agent trains on), beside the accuracy its torch
    model reported; a bundle the key does not verify is refused, never scored."""
    import argparse
    import shutil

    from benchmarks.demo import Demo, bundle_check
    from device_agent.config import DataSettings
    from device_agent.data import load_demo
    from fedcoe_edge.bundle_sig import BundleKeys, sign_manifest
    from fedcoe_edge.errors import BundleError
    from fedcoe_edge.runtime import MoESession

    key = bytes(range(32))
    state = tmp_path / "devices" / "dev1"
    shutil.copytree(digits_bundle, state / "bundle")
    manifest = state / "bundle" / "manifest.json"
    manifest.write_text(json.dumps(sign_manifest(json.loads(manifest.read_text()),
                                                 BundleKeys(hmac_key=key))))
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "dev1.key").write_text(key.hex() + "\n")
    (state / "local.safetensors").write_bytes(b"x" * 1000)
    args = argparse.Namespace(out=tmp_path, rounds=3, devices=3, alpha=0.5, seed=0, timeout=1.0)

    class Store:  # the coordinator's evals table: dev1's torch model scored 7/10 in round 3
        def evals(self, kind: str) -> list[dict[str, Any]]:
            return [{"device": "dev1", "round": 3, "correct": 7, "total": 10}] if kind == "personal" else []

    got = bundle_check(Demo(args), Store(), "dev1")
    data = load_demo(DataSettings(dataset="digits", client="1", num_clients=3))
    want = float((MoESession(digits_bundle).predict(data.x_test).argmax(1) == data.y_test).mean())
    assert got["int8_acc"] == want and got["test_samples"] == len(data.y_test) > 0
    assert got["torch_acc"] == 0.7 and got["verified_by"] == "hmac-sha256"
    assert got["fp32_weights_bytes"] == 1000
    assert got["bundle_bytes"] == sum(f.stat().st_size for f in (state / "bundle").iterdir() if f.is_file())
    (tmp_path / "keys" / "dev1.key").write_text(bytes(range(1, 33)).hex() + "\n")
    with pytest.raises(BundleError, match="signature does not verify"):
        bundle_check(Demo(args), Store(), "dev1")
