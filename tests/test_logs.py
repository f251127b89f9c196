"""Log lines (docs/daemons.md, "Logs"): an ISO 8601 date on every line, ``--log-format
json`` (one object per line), and the coordinator's summary line per round and per run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from benchmarks.demo import toml_text
from coordinator.harness import EmbeddedFederation
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.logsetup import IsoFormatter, JsonFormatter
from fedcoe_edge.transport import MemoryBroker

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def small(devices: int) -> dict[str, Any]:
    """Test-sized knobs, named (the harness may default to the daemons' own): narrow
    experts, one local epoch, no int8 bundle rebuild on the devices."""
    return {"model": ModelConfig(expert_hidden=16), "train": TrainConfig(local_epochs=1),
            "federation": "test",
            "device_overrides": {d: {"bundle": "off"} for d in [*map(str, range(devices)), "new0"]}}


def record(msg: str, *args: Any, **extra: Any) -> logging.LogRecord:
    r = logging.LogRecord("fedcoe.test", logging.INFO, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_text_lines_start_with_an_iso_date_and_json_lines_carry_the_fields() -> None:
    line = IsoFormatter().format(record("round %d", 3))
    assert ISO_LINE.match(line) and line.endswith("INFO fedcoe.test: round 3"), line
    doc = json.loads(JsonFormatter().format(record("round %d", 3, round=3, path=Path("/x"))))
    assert doc["msg"] == "round 3" and doc["level"] == "INFO" and doc["logger"] == "fedcoe.test"
    assert doc["round"] == 3 and doc["path"] == "/x"  # extra fields; non-JSON values as str
    assert datetime.fromisoformat(doc["ts"]).utcoffset() is not None


def spawn_coordinators(root: Path, port: int,
                       argvs: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> list[str]:
    """Run ``fedcoe BEFORE coordinator --config ... AFTER`` for each ``(BEFORE, AFTER)``, side
    by side (each its own federation id, config and state folder, so none takes another's
    broker session), until each logged its start; stop each with SIGTERM; their whole outputs.

    Side by side rather than one after another: each start is mostly the interpreter and
    torch loading, which the three can overlap."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for i, (before, after) in enumerate(argvs):
            cfg: dict[str, dict[str, Any]] = {
                "federation": {"id": f"logs{i}", "rounds": 1, "min_devices": 1,
                               "state_dir": f"state{i}"},
                "broker": {"host": "127.0.0.1", "port": port},
                "security": {"secret": "ab" * 32}}
            (root / f"coordinator{i}.toml").write_text(toml_text(cfg))
            out = root / f"state{i}.log"
            with out.open("wb") as f:
                procs.append((subprocess.Popen(
                    [sys.executable, "-m", "fedcoe_edge.cli", *before, "coordinator",
                     "--config", f"coordinator{i}.toml", *after], cwd=root, env=env,
                    stdout=f, stderr=subprocess.STDOUT), out))
        end = time.monotonic() + 120
        for p, out in procs:
            while "connected to" not in out.read_text() and time.monotonic() < end:
                assert p.poll() is None, out.read_text()
                time.sleep(0.2)
    finally:
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait(timeout=60)
    return [out.read_text() for _, out in procs]


@pytest.mark.integration
def test_the_coordinator_logs_iso_text_or_json_lines(tmp_path: Path, mosquitto_broker: Any) -> None:
    # plain; --log-format after the command, as an operator would write it in a unit file;
    # and before it, the global form
    plain, after, before = spawn_coordinators(tmp_path, mosquitto_broker.port, [
        ((), ()), ((), ("--log-format", "json")), (("--log-format=json",), ())])
    text = plain.splitlines()
    assert text and all(ISO_LINE.match(ln) for ln in text), text
    assert any("run summary: 0 round(s) closed" in ln for ln in text), text
    docs = [json.loads(ln) for ln in after.splitlines() if ln]  # every line is one JSON object
    assert docs and all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs)
    run = [d for d in docs if d.get("event") == "run_summary"]
    assert len(run) == 1 and run[0]["rounds"] == 0 and run[0]["seconds"] > 0, docs
    lines = before.splitlines()
    assert lines and all(json.loads(ln)["ts"] for ln in lines if ln)


def test_one_summary_line_per_round_and_one_per_run(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    fed = EmbeddedFederation(tmp_path, lambda c, w, b: broker.client(c, will=w, birth=b),
                             devices=2, rounds=2, **small(2))
    caplog.set_level(logging.INFO, logger="fedcoe.coordinator")
    fed.start()
    try:
        fed.wait_rounds(120)
        assert fed.coordinator is not None
        store = {r: fed.coordinator.store.round_summary(r) for r in (1, 2)}
    finally:
        fed.stop()
    rounds = [r for r in caplog.records if getattr(r, "event", None) == "round_summary"]
    assert [r.round for r in rounds] == [1, 2]  # type: ignore[attr-defined]
    for r in rounds:
        want = store[r.round]  # type: ignore[attr-defined]
        assert (r.accepted, r.failed, r.bytes_up, r.bytes_down) == (  # type: ignore[attr-defined]
            want["accepted"], want["failed"], want["bytes_up"], want["bytes_down"])
        assert r.accuracy == want["global_acc"] and r.seconds > 0  # type: ignore[attr-defined]
        assert r.getMessage().startswith(f"round {want['round']} summary: accepted 2, failed 0, "
                                         "mean accuracy ")
    runs = [r for r in caplog.records if getattr(r, "event", None) == "run_summary"]
    assert len(runs) == 1
    run = runs[0]
    assert (run.rounds, run.accepted, run.last_round) == (2, 4, 2)  # type: ignore[attr-defined]
    assert run.bytes_up == sum(s["bytes_up"] for s in store.values())  # type: ignore[attr-defined]
    assert run.accuracy == store[2]["global_acc"]  # type: ignore[attr-defined]
