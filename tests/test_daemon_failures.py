"""Daemon failures that help: a device that cannot train declines (and the coordinator
drops it at once), labels go through the federation's class list, and every config error
is one line with exit 2."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.harness import EmbeddedFederation, small
from device_agent.config import DataSettings
from device_agent.daemon import DeviceAgent
from device_agent.data import LocalData, check_labels, load_image_folder_named, relabel
from fedcoe_edge.cli import main
from fedcoe_edge.errors import DataError
from fedcoe_edge.strategies import ClientData
from fedcoe_edge.transport import MemoryBroker

SECRET = "ab" * 32


def memory_factory() -> Any:
    broker = MemoryBroker()
    return lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def images(root: Path, classes: list[str], n: int = 4) -> None:
    from PIL import Image

    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(np.full((8, 8), 20 * i + j, np.uint8)).save(root / c / f"{j}.png")


def test_folder_labels_follow_the_class_list_not_the_folders_present(tmp_path: Path) -> None:
    images(tmp_path / "a", ["eight", "one"])
    images(tmp_path / "b", ["one", "two"])
    fed = ["one", "two", "eight"]
    s = DataSettings(image_shape=[1, 8, 8])
    for name, want in (("a", {0, 2}), ("b", {0, 1})):
        d = load_image_folder_named(tmp_path / name, s, fed).data
        assert set(np.concatenate([d.y_train, d.y_test]).tolist()) == want
    # without a list a device numbers its own folders; the welcome's list re-numbers them
    local = load_image_folder_named(tmp_path / "a", s)
    assert local.classes == ["eight", "one"]
    d = relabel(local, fed, "a")
    assert sorted(set(np.concatenate([d.y_train, d.y_test]).tolist())) == [0, 2]
    with pytest.raises(DataError, match="class folder.s. eight not in the federation's class list"):
        relabel(local, ["one", "two"], "a")
    with pytest.raises(DataError, match="not in the federation's class list"):
        load_image_folder_named(tmp_path / "a", s, ["one", "two"])


def test_labels_beyond_the_model_are_one_line() -> None:
    x = np.zeros((12, 1, 8, 8), np.float32)
    d = ClientData(x[:8], np.arange(8), x[8:], np.array([8, 9, 10, 11]))
    check_labels(d, 12, "here")
    with pytest.raises(DataError, match="labels go up to 11 but the federation's model has 10 classes"):
        check_labels(d, 10, "here")
    assert relabel(LocalData(d), ["a", "b"], "x") is d  # npz / shipped data: labels as stored


class SlowToWelcome(DeviceAgent):
    """Handles its welcome only once the round it was selected for is open, so the test
    sees a decline that arrives mid-round (the case where waiting out the deadline hurt)."""

    coordinator: Any = None

    def _handle_welcome(self, b: dict[str, Any]) -> None:
        c = self.coordinator
        end = threading.Event()
        while not (c.round_open and self.dev in c.tasks) and not self._stop.is_set():
            end.wait(0.05)
        super()._handle_welcome(b)


def test_a_device_whose_data_does_not_fit_declines_and_the_round_closes_without_it(tmp_path: Path) -> None:
    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=2, rounds=1, deadline_s=600.0, quorum=1, **small())
    coord = fed.start_coordinator()
    fed.add_agent("0", "0")
    x = np.zeros((10, 1, 4, 4), np.float32)  # the model expects (1, 8, 8)
    bad = SlowToWelcome(fed.agent_config("1", "1"), fed.factory,
                        data=ClientData(x[:8], np.zeros(8, np.int64), x[8:], np.zeros(2, np.int64)))
    bad.coordinator = coord
    fed.agents["1"] = bad
    bad.start()
    try:
        fed.wait(lambda: coord.finished, 300, "round 1 closed")  # far below the 600 s deadline
        events = coord.store.events()
    finally:
        fed.stop()
    assert bad.refused and "sample shape [1, 4, 4]" in bad.refused and "[1, 8, 8]" in bad.refused
    assert bad.rounds_done == [] and fed.agents["0"].rounds_done == [1]
    failures = [e for e in events if e["kind"] == "failure" and e["device"] == "1"]
    assert failures and failures[0]["reason"].startswith("device declined: device data has sample shape")
    assert any(e["kind"] == "decline" for e in events)
    assert "1" not in coord.online  # not selected again until it says hello with fixed data


def test_a_declined_agent_exits_2(tmp_path: Path) -> None:
    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=1, **small())
    x = np.zeros((4, 1, 8, 8), np.float32)
    agent = DeviceAgent(fed.agent_config("0", "0"), fed.factory,
                        data=ClientData(x, np.zeros(4, np.int64), x, np.zeros(4, np.int64)))
    agent.decline("labels go up to 11")
    assert agent.run() == 2


def test_a_model_this_device_cannot_import_is_declined_once(tmp_path: Path) -> None:
    """A welcome naming a trunk by an import path this device's venv lacks: one decline with
    the reason, not an error per welcome."""
    fed = EmbeddedFederation(tmp_path, memory_factory(), devices=1, **small())
    x = np.zeros((4, 1, 8, 8), np.float32)
    agent = DeviceAgent(fed.agent_config("0", "0"), fed.factory,
                        data=ClientData(x, np.zeros(4, np.int64), x, np.zeros(4, np.int64)))
    welcome = {"model": {"input_shape": [1, 8, 8], "trunk": "no_such_pkg_here.nets:resnet8",
                         "expert_kind": "mlp"}}
    agent._handle_welcome(welcome)
    assert agent.refused and "cannot be built here" in agent.refused
    assert "no_such_pkg_here" in agent.refused
    agent._handle_welcome(welcome)  # a second welcome is ignored: already declined
    assert agent.run() == 2


def agent_toml(tmp_path: Path, extra: str = "", broker: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f"[device]\nid = 'a'\n{extra}[broker]\n{broker}[security]\nkey = '{'ab' * 16}'\n"
                    "[data]\ndataset = 'digits'\n")
    return path


def coordinator_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(f"[security]\nsecret = '{SECRET}'\n{text}")
    return path


@pytest.mark.parametrize(("which", "text", "want"), [
    ("coordinator", "[train]\nlr = 'fast'\n", "[train] lr must be a number, got 'fast'"),
    ("coordinator", "[model]\nnum_classes = 2.5\n", "[model] num_classes must be an integer"),
    ("coordinator", "[federation]\nrounds = '3'\n", "[federation] rounds must be an integer"),
    ("coordinator", "[federation]\nexit_when_done = 1\n", "exit_when_done must be a boolean"),
    ("coordinator", "[federation]\nclasses = ['a', 'b']\n",
     "classes names 2 classes but [model] num_classes is 10"),
    ("coordinator", "[federation]\nclasses = ['a', 'a']\n", "names a more than once"),
    ("coordinator", "[broker]\ntls = true\nca_file = 'nope.crt'\n", "ca_file: "),
    ("agent", "window = 'big'\n", "[device] window must be an integer, got 'big'"),
    ("agent", "tls", "ca_file: "),
])
def test_config_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           which: str, text: str, want: str) -> None:
    if which == "coordinator":
        path = coordinator_toml(tmp_path, text)
    elif text == "tls":
        path = agent_toml(tmp_path, broker="tls = true\nca_file = 'missing/ca.crt'\n")
    else:
        path = agent_toml(tmp_path, extra=text)
    assert main([which, "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and want in err[0], err
    if "ca_file" in want:
        assert "not found (tls = true needs it)" in err[0]
