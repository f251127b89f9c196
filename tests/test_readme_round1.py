"""README, "Your own federation": round 1 waits for every device ``fedcoe init`` named
(``min_devices``), so a device that stops on bad data before round 1 keeps it waiting, with
the coordinator's "waits for devices" line naming who is online; fixed and started again,
the device is counted and round 1 runs. The README says exactly this; here it runs as
written: ``fedcoe init``'s files, a Mosquitto from them, the coordinator, two agents and the
third device's ``fedcoe agent`` command."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.cli import main


def write_images(root: Path, classes: list[str], per_class: int = 10) -> None:
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8), 40 + 60 * k + i % 3, np.uint8)).save(root / c / f"{i}.png")


def wait_for(cond: Any, what: str, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


# slow: a multi-process deployment for tens of seconds; `make test-all` runs it (README, "Tests")
@pytest.mark.slow
def test_a_device_stopped_before_round_1_keeps_it_waiting(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, init_broker_tools: None) -> None:
    from coordinator.config import load_config as load_coordinator
    from coordinator.daemon import Coordinator
    from device_agent.config import load_config as load_agent
    from device_agent.daemon import DeviceAgent
    from fedcoe_edge.broker import MosquittoBroker, _free_port

    port = _free_port("127.0.0.1")
    out = tmp_path / "myfed"
    assert main(["init", str(out), "--names", "pi-a,pi-b,pi-c", "--classes", "cat,dog,bird",
                 "--image-shape", "1,8,8", "--port", str(port), "--rounds", "1"]) == 0
    write_images(out / "devices" / "pi-a" / "data", ["cat", "dog"])
    write_images(out / "devices" / "pi-b" / "data", ["dog", "bird"])
    write_images(out / "devices" / "pi-c" / "data", ["bird", "fish"])  # fish: not in the list
    conf = (out / "broker" / "mosquitto.conf").read_text()
    if os.geteuid() == 0:  # as root, mosquitto drops to user mosquitto, who cannot read 0600
        conf += "user root\n"
    # the wait line once a second instead of once a minute, so the test sees it; exit after
    # the run; everything else is what `init` wrote and the daemons' defaults
    env = {"FEDCOE_FEDERATION_WAIT_LOG_S": "1", "FEDCOE_FEDERATION_EXIT_WHEN_DONE": "true"}
    quiet = {"FEDCOE_DEVICE_BUNDLE": "off", "FEDCOE_DEVICE_HEARTBEAT_S": "0"}
    caplog.set_level(logging.INFO)
    with MosquittoBroker(port=port, config_text=conf, workdir=tmp_path / "mq"):
        coord = Coordinator(load_coordinator(out / "coordinator" / "coordinator.toml", env))
        assert coord.fed.min_devices == 3  # what `init` writes for three names
        t = threading.Thread(target=coord.run, daemon=True)
        t.start()
        agents: list[DeviceAgent] = []
        try:
            # pi-c, started as README step 3 does: one line naming the class, exit 2
            res = subprocess.run([sys.executable, "-m", "fedcoe_edge.cli", "agent", "--config",
                                  "agent.toml"], cwd=out / "devices" / "pi-c",
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 2, res.stderr
            last = res.stderr.strip().splitlines()[-1]  # after its one INFO start line
            assert last.startswith("fedcoe agent: error: ") and "class folder(s) fish" in last
            for dev in ("pi-a", "pi-b"):
                agents.append(DeviceAgent(load_agent(out / "devices" / dev / "agent.toml", quiet)))
                agents[-1].start()
            wait_for(lambda: "round 1 waits for devices: 2 online of 3 needed (pi-a,pi-b)"
                     in caplog.text, "the wait line")
            assert coord.round == 0 and not coord.round_open
            # fixed data, started again: counted, and round 1 runs with all three
            shutil.rmtree(out / "devices" / "pi-c" / "data" / "fish")
            agents.append(DeviceAgent(load_agent(out / "devices" / "pi-c" / "agent.toml", quiet)))
            agents[-1].start()
            t.join(timeout=300)
            assert not t.is_alive(), "round 1 did not run"
        finally:
            for a in agents:
                a.close()
            coord.stop()
            t.join(timeout=10)
    assert [a.rounds_done for a in agents] == [[1], [1], [1]]
