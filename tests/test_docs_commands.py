"""The commands the docs show are commands the CLI takes, and the README's provisioning step
runs as written: docs that drift from the code fail here, not on a user's Pi."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import tomllib

from fedcoe_edge.cli import _subparsers, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/deploy.md", "docs/bundle.md", "docs/daemons.md", "deploy/mosquitto/README.md",
        "docs/quickstart.md", "docs/api.md", "docs/design.md", "docs/protocol.md", "docs/benchmarks.md"]


def fedcoe_commands(text: str, spans: bool = False) -> list[list[str]]:
    """Every ``fedcoe SUBCOMMAND ...`` invocation in the code blocks and spans of ``text``
    (continuation lines joined, optional ``[--flag]`` parts and comments dropped)."""
    out = []
    if spans:  # inline `fedcoe ...` in prose: often a fragment, so only its flags are checked
        blocks = [m for m in re.findall(r"(?<!`)`(fedcoe [^`]+)`", text) if "\n" not in m]
    else:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split(" #")[0])
            # "fedcoe simulate: error: ..." is the CLI's output quoted in a doc, not a command
            m = re.search(r"(?:^|[\s/])fedcoe (\w[\w-]*)(?![\w:-])(.*)$", line)
            if m and not line.lstrip().startswith("#"):
                out.append([m.group(1), *shlex.split(m.group(2).split("|")[0].split("&&")[0])])
    return out


@pytest.mark.parametrize("doc", DOCS)
def test_every_documented_command_parses(doc: str) -> None:
    parser = build_parser()
    subs = _subparsers(parser)
    commands = fedcoe_commands((ROOT / doc).read_text())
    for argv in commands:
        assert argv[0] in subs, (doc, argv)
        args, extra = parser.parse_known_args(argv)
        assert not extra, (doc, argv, extra)
        assert args.command == argv[0]
    for argv in fedcoe_commands((ROOT / doc).read_text(), spans=True):
        assert argv[0] in subs, (doc, argv)
        known = {o for a in subs[argv[0]]._actions for o in a.option_strings}
        flags = [t.split("=")[0] for t in argv[1:] if t.startswith("--")]
        assert set(flags) <= known, (doc, argv)


def test_readme_init_step_runs_as_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own federation"):readme.index("## Reports")]
    inits = [c for c in fedcoe_commands(section) if c[0] == "init"]
    assert len(inits) == 1
    argv = [str(tmp_path / a) if a == "myfed" else a for a in inits[0]]
    assert main(argv) == 0
    capsys.readouterr()
    fed = tmp_path / "myfed"
    coord = tomllib.loads((fed / "coordinator" / "coordinator.toml").read_text())
    assert coord["federation"]["classes"] == ["cat", "dog", "bird"]
    assert coord["model"]["input_shape"] == [3, 32, 32] and coord["broker"]["host"] == "192.168.1.10"
    for dev in ("pi-a", "pi-b", "pi-c"):
        agent = tomllib.loads((fed / "devices" / dev / "agent.toml").read_text())
        assert agent["data"]["image_folder"] == "data" and agent["data"]["image_shape"] == [3, 32, 32]
    # the paths the README names exist
    for rel in ("broker/mosquitto.conf", "coordinator/coordinator.toml", "devices/pi-a/agent.toml"):
        assert (fed / rel).is_file(), rel
    from coordinator.config import load_config as load_coordinator
    from device_agent.config import load_config as load_agent

    load_coordinator(fed / "coordinator" / "coordinator.toml", {})
    load_agent(fed / "devices" / "pi-a" / "agent.toml", {})


def test_deploy_docs_match_the_code() -> None:
    for unit in ("fedcoe-agent.service", "fedcoe-coordinator.service"):
        text = (ROOT / "deploy" / "systemd" / unit).read_text()
        assert "RestartPreventExitStatus=2" in text and "Restart=always" not in text
    mq = (ROOT / "deploy" / "mosquitto" / "README.md").read_text()
    assert "ca_certs" not in mq and "ca_file" in mq and "32 chunks" not in mq
    for name in ("agent.toml", "coordinator.toml"):
        assert "window = 16" in (ROOT / "deploy" / name).read_text()
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for word in ("useradd", "python3 -m venv", "RestartPreventExitStatus=2", "Jetson", "keygen"):
        assert word in deploy, word
