"""The scripts in examples/ run as a user runs them (a subprocess, from the repository root)
on small data, and do what their docstrings say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=540)


def test_own_image_folder_and_trunk_simulate_export_predict(tmp_path: Path) -> None:
    proc = run_example("own_model_folder.py", "--out", str(tmp_path), "--rounds", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "example.json").read_text())
    assert result["parts"][0] == "trunk"  # the user's trunk travels in the bundle
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["trunk"] == "small_conv" and manifest["feat_shape"] == [16]
    assert result["classes"] == ["blob", "hstripes", "vstripes"]
    assert result["agreement"] >= 0.95  # the device runtime predicts what torch predicts
    assert result["runtime_global_acc"] > 0.6  # three classes: chance is 0.33
    assert "device runtime on all 120 images" in proc.stdout


def test_own_image_folder_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    (tmp_path / "imgs" / "only_one_class").mkdir(parents=True)
    proc = run_example("own_model_folder.py", "--out", str(tmp_path / "out"),
                       "--images", str(tmp_path / "imgs"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
@pytest.mark.integration
def test_coordinator_and_two_agents_on_own_data(tmp_path: Path, mosquitto_broker: Any) -> None:
    proc = run_example("own_data_federation.py", "--out", str(tmp_path), "--rounds", "2",
                       "--broker-port", str(mosquitto_broker.port))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "example.json").read_text())
    assert [r["accepted"] for r in result["rounds"]] == [2, 2]
    assert set(result["devices"]) == {"cam-a", "cam-b"}
    for dev in result["devices"].values():
        assert dev["rounds_done"][-1] == 2
        assert dev["accuracy"] > 0.5  # chance is about 0.33 on three classes
    assert (tmp_path / "cam-a" / "state" / "bundle" / "manifest.json").is_file()
