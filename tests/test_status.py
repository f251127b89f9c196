"""``fedcoe status`` (docs/daemons.md, "Status"): what it prints is what the coordinator's
round log holds, read while the coordinator runs (without blocking its writes) and after it
stopped."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.harness import EmbeddedFederation
from coordinator.statelock import StateLock
from fedcoe_edge.cli import main
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.transport import MemoryBroker


def small(devices: int) -> dict[str, Any]:
    """Test-sized knobs, named (the harness may default to the daemons' own): narrow
    experts, one local epoch, no int8 bundle rebuild on the devices."""
    return {"model": ModelConfig(expert_hidden=16), "train": TrainConfig(local_epochs=1),
            "federation": "test",
            "device_overrides": {d: {"bundle": "off"} for d in [*map(str, range(devices)), "new0"]}}


def memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["status", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_live_and_after_the_coordinator_stopped(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=2, rounds=2, **small(2))
    state = tmp_path / "coordinator"
    fed.start()
    try:
        c = fed.coordinator
        assert c is not None
        fed.wait(lambda: c.round >= 1 and not c.round_open or c.round >= 2, 90, "round 1 closed")
        # a writer holding an open write transaction (as the daemon does mid-batch) does not
        # block the read-only reader, and the reader sees the last committed state
        writer = sqlite3.connect(state / "coordinator.sqlite", timeout=10)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE devices SET tier='uncommitted'")
        t0 = time.monotonic()
        live = status_json(capsys, "--state-dir", str(state))
        assert time.monotonic() - t0 < 5
        writer.execute("ROLLBACK")
        writer.close()
        assert all(d["tier"] != "uncommitted" for d in live["devices"])
        assert live["round"] >= 1 and {d["id"] for d in live["devices"]} == {"0", "1"}
        assert all(d["online"] for d in live["devices"])
        fed.wait_rounds(120)
        store_rows = {r: c.store.round_summary(r) for r in (1, 2)}
    finally:
        fed.stop()

    after = status_json(capsys, "--state-dir", str(state))
    assert after["schema"] == 1 and after["round"] == 2 and after["state"] == "between rounds"
    assert [r["round"] for r in after["round_log"]] == [1, 2]
    for row in after["round_log"]:
        want = store_rows[row["round"]]
        for key in ("state", "selected", "accepted", "failed", "rejected", "applied",
                    "global_acc", "personalized_acc", "bytes_up", "bytes_down", "bytes_refresh",
                    "bytes_full"):
            assert row[key] == want[key], (key, row, want)
        assert row["accepted"] == 2 and row["bytes_up"] > 0 and row["global_acc"] is not None
    assert after["accuracy"] == [{"round": r["round"], "global": r["global_acc"],
                                  "personalized": r["personalized_acc"]}
                                 for r in after["round_log"]]
    for d in after["devices"]:
        assert d["last_round"] == 2 and d["bytes_up"] > 0 and d["bytes_down"] > 0
        assert d["accuracy_kind"] == "personal" and d["accuracy_round"] == 2
        assert 0.0 <= d["accuracy"] <= 1.0
        assert d["last_seen"][:4].isdigit() and d["last_seen"][10] == "T"
    assert after["coordinator"]["running"] is False

    # --config: the federation's round count makes the state "finished"
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(f"[federation]\nid = 'test'\nrounds = 2\nstate_dir = '{state}'\n"
                   f"[security]\nsecret = '{'ab' * 32}'\n")
    with StateLock(state):  # a running coordinator holds the folder's lock
        doc = status_json(capsys, "--config", str(cfg))
    assert doc["state"] == "finished" and doc["rounds"] == 2 and doc["federation"] == "test"
    assert doc["coordinator"]["running"] is True and doc["coordinator"]["pid"] == os.getpid()

    assert main(["status", "--state-dir", str(state)]) == 0
    text = capsys.readouterr().out
    assert "round 2: between rounds" in text and "devices: 0 online of 2" in text
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("round  state"))
    assert lines[head + 2].split()[:4] == ["1", "closed", "2", "2"]


def test_status_of_a_folder_without_a_database_is_one_line(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no coordinator.sqlite in" in err[0], err
