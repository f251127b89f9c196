"""benchmarks/agent_memory.py: the runtime-profile probe really runs without torch and reports
a peak, and processes are sorted into roles by their config, not by their names."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.agent_memory import classify, runtime_probe, vm_hwm_mb


def test_runtime_probe_predicts_without_torch(digits_bundle: Path, tmp_path: Path) -> None:
    """The probe exits non-zero if torch got imported or predict failed; its peak is the
    child's own, below this test process's (which holds torch)."""
    peak = runtime_probe(digits_bundle, tmp_path)
    mine = vm_hwm_mb(os.getpid())
    assert mine is not None and 0 < peak < mine


def test_classify_reads_each_agents_role_from_its_config(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('[device]\nid = "a"\n')  # role defaults to train
    (tmp_path / "b.toml").write_text('[device]\nid = "b"\nrole = "cold"\n')
    (tmp_path / "c.toml").write_text('[device]\nid = "c"\nrole = "train"\n')
    py = ["python", "-m", "fedcoe_edge.cli"]
    seen = {1: ([*py, "agent", "--config", "a.toml"], 400.0),
            2: ([*py, "agent", "--config", "b.toml"], 300.0),
            3: ([*py, "agent", "--config", "c.toml"], 420.5),
            4: ([*py, "coordinator", "--config", "x.toml"], 350.0),
            5: (["mosquitto", "-c", "m.conf"], 9.0),
            6: ([*py, "demo", "--out", "x"], 40.0)}
    assert classify(seen, tmp_path) == {"train": 420.5, "cold": 300.0, "coordinator": 350.0}
