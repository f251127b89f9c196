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
        "docs/quickstart.md", "docs/api.md", "docs/design.md", "docs/protocol.md", "docs/benchmarks.md", "docs/engines.md"]


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
        # a command with actions of its own (`fedcoe devices add ...`): theirs count too
        parsers = [subs[argv[0]], *_subparsers(subs[argv[0]]).values()]
        known = {o for p in parsers for a in p._actions for o in a.option_strings}
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


# --- shell lines the docs print: run as written where that is quick, else checked ----------

INSTALL_DOCS = ("README.md", "docs/quickstart.md", "docs/deploy.md")


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def doc_block(doc: str, needle: str, lang: str = "bash") -> str:
    """The one ``lang`` code block of ``doc`` that contains ``needle``."""
    found = [b for b in code_blocks((ROOT / doc).read_text(), lang) if needle in b]
    assert len(found) == 1, (doc, needle, len(found))
    return found[0]


def heredoc(block: str) -> str:
    """The Python source of the block's ``python - ... <<'EOF'`` step."""
    m = re.search(r"^python - [^\n]*<<'EOF'\n(.*?)^EOF$", block, flags=re.S | re.M)
    assert m is not None, block
    return m.group(1)


def shell_env(**extra: str) -> dict[str, str]:
    """This venv's ``python`` and ``fedcoe`` first on PATH, as with the venv activated."""
    import os
    import sys

    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "fedcoe").is_file(), f"no fedcoe entry point in {bin_dir}: run `make setup`"
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **extra}


def write_image(path: Path, size: tuple[int, int], seed: int, tint: int | None = None) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if tint is not None:  # one colour channel stands out: a class a small model can learn
        a[..., tint] = 200 + a[..., tint] % 56
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def loader_input(image: Path, shape: list[int], tmp: Path) -> object:
    """What the agent's image-folder loader makes of ``image`` for a model of ``shape``."""
    import shutil

    from fedcoe_edge.data.loaders import load_image_folder

    root = tmp / "loader"
    (root / "x").mkdir(parents=True)
    shutil.copy(image, root / "x" / image.name)
    c, h, w = shape
    x, _, _ = load_image_folder(root, size=(h, w), grayscale=c == 1, classes=["x"])
    return x[0]


def test_readme_predict_step_runs_as_written(digits_bundle: Path, tmp_path: Path) -> None:
    """README's image -> x.npy -> ``fedcoe predict`` lines, in a device folder holding a real
    bundle whose model is not 3x32x32: the input takes the bundle's own shape, with exactly
    the pixels the agent's loader gives the same image."""
    import json
    import shutil
    import subprocess

    import numpy as np

    block = doc_block("README.md", "fedcoe predict --bundle state/bundle --input x.npy")
    dev = tmp_path / "pi-a"
    shutil.copytree(digits_bundle, dev / "state" / "bundle")
    write_image(dev / "cat.jpg", (37, 23), seed=1)
    res = subprocess.run(["bash", "-e", "-c", block], cwd=dev, capture_output=True, text=True,
                         timeout=300, env=shell_env())
    assert res.returncode == 0, res.stderr[-3000:]
    shape = json.loads((dev / "state" / "bundle" / "manifest.json").read_text())["model"]["input_shape"]
    assert shape != [3, 32, 32]
    x = np.load(dev / "x.npy")
    assert x.dtype == np.float32 and list(x.shape) == shape
    np.testing.assert_array_equal(x, loader_input(dev / "cat.jpg", shape, tmp_path))
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("0\t"), res.stdout


@pytest.mark.parametrize("shape", [[3, 20, 24], [1, 28, 28]])
def test_the_image_step_follows_the_manifest_shape(shape: list[int], tmp_path: Path) -> None:
    """The same Python step (README and quickstart print one text) for an RGB non-square and
    a greyscale model: channels, height and width all come from ``manifest.json``."""
    import json
    import subprocess
    import sys

    import numpy as np

    readme = heredoc(doc_block("README.md", "fedcoe predict --bundle state/bundle --input x.npy"))
    quick = heredoc(doc_block("docs/quickstart.md", "fedcoe predict --bundle runs/mine/bundle"))
    assert quick == readme.replace("state/bundle", "runs/mine/bundle")
    (tmp_path / "state" / "bundle").mkdir(parents=True)
    (tmp_path / "state" / "bundle" / "manifest.json").write_text(
        json.dumps({"model": {"input_shape": shape}}))
    write_image(tmp_path / "img.png", (41, 17), seed=2)
    res = subprocess.run([sys.executable, "-", "img.png"], input=readme, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    x = np.load(tmp_path / "x.npy")
    assert list(x.shape) == shape and x.dtype == np.float32
    np.testing.assert_array_equal(x, loader_input(tmp_path / "img.png", shape, tmp_path))


@pytest.mark.slow
def test_quickstart_step_3_runs_as_written(tmp_path: Path) -> None:
    """Quickstart step 3 as printed: its trunk module and ``model.toml``, an image folder of
    three classes, then simulate, export (which must import the trunk: hence ``PYTHONPATH=.``),
    the image step and predict. About a minute on one core: ``make test-all`` runs it."""
    import subprocess

    import numpy as np

    text = (ROOT / "docs" / "quickstart.md").read_text()
    module = doc_block("docs/quickstart.md", "def resnet8", lang="python")
    assert module.startswith("# mymodels/nets.py\n")
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mymodels" / "nets.py").write_text(module)
    assert "and name it by import path in a TOML file (`model.toml`)" in text
    (tmp_path / "model.toml").write_text(doc_block("docs/quickstart.md", "[model]", lang="toml"))
    for k, cls in enumerate(["cat", "dog", "bird"]):
        for i in range(30):
            write_image(tmp_path / "photos" / cls / f"{i}.jpg", (48, 40), seed=10 * k + i, tint=k)
    block = doc_block("docs/quickstart.md", "fedcoe simulate --dataset folder:photos")
    res = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env=shell_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs" / "mine" / "bundle" / "manifest.json").is_file()
    assert np.load(tmp_path / "x.npy").shape == (3, 32, 32)
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("0\t") and lines[-1].split("\t")[1] in {"cat", "dog", "bird", "class 0", "class 1", "class 2"}


def test_install_lines_name_the_wheel_make_wheel_builds() -> None:
    """No doc installs from a package index this project is not on, or clones a placeholder;
    every wheel and sdist a doc names is the file ``make wheel`` writes for this version, and
    every extra it asks for exists."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version, extras = project["version"], set(project["optional-dependencies"])
    wheel, sdist = f"fedcoe_edge-{version}-py3-none-any.whl", f"fedcoe_edge-{version}.tar.gz"
    seen_extras: set[str] = set()
    for doc in (*INSTALL_DOCS, "docs/daemons.md"):
        text = (ROOT / doc).read_text()
        assert not re.search(r"pip install[^\n`]*\bfedcoe-edge\b", text), doc
        assert "example.invalid" not in text and "<this repository>" not in text, doc
        for name in re.findall(r"fedcoe_edge-[\w.-]+?\.whl", text):
            assert name == wheel, (doc, name)
        for name in re.findall(r"fedcoe_edge-[\w.-]+?\.tar\.gz", text):
            assert name == sdist, (doc, name)
        for extra in re.findall(r"\.whl\[(\w+)\]", text):
            assert extra in extras, (doc, extra)
            seen_extras.add(extra)
        # quoted, so that the shell does not read [extra] as a glob
        for m in re.finditer(r"pip install ([^\s]*\.whl\[\w+\][^\s]*)", text):
            assert m.group(1)[0] in "'\"", (doc, m.group(0))
    assert {"runtime", "train"} <= seen_extras
    deploy = (ROOT / "docs" / "deploy.md").read_text()
    for step in ("make wheel", f"scp dist/{wheel}", "python3 -m venv", f"'./{wheel}[runtime]'",
                 "deploy/systemd/fedcoe-agent.service"):
        assert step in deploy, step


def test_make_targets_and_deploy_files_the_docs_name_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    for doc in INSTALL_DOCS:
        text = (ROOT / doc).read_text()
        for block in code_blocks(text, "bash"):
            for target in re.findall(r"^make ([\w-]+)", block, flags=re.M):
                assert target in targets, (doc, target)
        for rel in set(re.findall(r"\bdeploy/[\w./@-]*[\w@]", text)):
            assert (ROOT / rel).exists(), (doc, rel)
