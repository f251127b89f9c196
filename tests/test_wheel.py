"""The wheel ``make wheel`` writes is the one a Raspberry Pi installs (docs/deploy.md,
"Getting the package onto a device"): built here from the tracked files, it must hold every
module and data file of every package, import from itself alone, and declare extras that keep
torch off a runtime device. Also the Makefile's apt-get helper for a non-root user.

The build is the ``built_dist`` fixture (tests/conftest.py): ``python -m build`` as ``make
wheel`` runs it, the wheel made from the sdist, so a file the sdist drops is missing from the
wheel too.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what `packages.find` includes (pyproject.toml); results/ is the repository's reports
PACKAGES = ("fedcoe_edge", "coordinator", "device_agent", "export", "benchmarks")
NOT_INSTALLED = ("benchmarks/results/",)
# runtime packages: installed code there must not reach outside its own package for a file
RUNTIME_PACKAGES = ("fedcoe_edge", "coordinator", "device_agent", "export")


def package_files(files: list[str]) -> set[str]:
    return {f for f in files if f.startswith(tuple(p + "/" for p in PACKAGES))
            and not f.startswith(NOT_INSTALLED) and "__pycache__" not in f}


def test_the_wheel_holds_every_module_and_data_file(built_dist: tuple[Path, Path, list[str]]) -> None:
    wheel, _, files = built_dist
    names = set(zipfile.ZipFile(wheel).namelist())
    payload = {n for n in names if ".dist-info/" not in n}
    want = package_files(files)
    assert want - payload == set(), "in the source tree, not in the wheel"
    assert payload - want == set(), "in the wheel, not a tracked package file"
    # every package folder of the tree is a package in the wheel
    for init in (f for f in want if f.endswith("/__init__.py")):
        assert init in names
    assert not any(n.startswith(NOT_INSTALLED) for n in names)


def test_the_sdist_is_a_source_release(built_dist: tuple[Path, Path, list[str]]) -> None:
    """Beside the packages, the sdist carries what a device's operator installs by hand:
    the systemd units, the Mosquitto and config templates, the docs and the examples."""
    _, sdist, files = built_dist
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for rel in files:
        if rel.startswith(("deploy/", "docs/", "examples/")) or rel in package_files(files):
            assert rel in names, rel
    assert top.startswith("fedcoe_edge-") and "Makefile" in names and "pyproject.toml" in names


def test_wheel_metadata_keeps_torch_off_a_runtime_device(built_dist: tuple[Path, Path, list[str]]) -> None:
    wheel, _, _ = built_dist
    z = zipfile.ZipFile(wheel)
    info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.parser.Parser().parsestr(z.read(info).decode())
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"runtime", "train", "dev"} <= extras
    reqs: dict[str, set[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        name = re.match(r"[A-Za-z0-9_.-]+", line)
        assert name is not None, line
        extra = re.search(r"""extra == ["']([^"']+)["']""", line)
        reqs.setdefault(extra.group(1) if extra else "", set()).add(name.group(0).lower())
    base, runtime, train = reqs[""], reqs["runtime"], reqs["train"]
    assert {"numpy", "onnxruntime", "safetensors", "paho-mqtt", "psutil", "tomli"} <= base
    # what `pip install WHEEL[runtime]` pulls: no torch, nor the exporter's or trainer's stack
    heavy = {"torch", "onnx", "onnxscript", "scikit-learn", "scipy", "matplotlib"}
    assert not (base | runtime) & heavy, (base | runtime) & heavy
    assert "pillow" in runtime and heavy <= train
    assert meta["Name"] == "fedcoe-edge" and meta["Requires-Python"] == ">=3.10"
    entry = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "fedcoe = fedcoe_edge.cli:main" in z.read(entry).decode()


IMPORT_ALL = r"""
import importlib, json, sys
root, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, root)
for name in names:
    importlib.import_module(name)
from fedcoe_edge.cli import _subparsers, build_parser
outside = sorted(m.__name__ for m in list(sys.modules.values())
                 if (m.__name__.split(".")[0] in {"fedcoe_edge", "coordinator", "device_agent",
                                                   "export", "benchmarks"})
                 and not (getattr(m, "__file__", None) or root).startswith(root))
print(json.dumps({"outside": outside, "commands": sorted(_subparsers(build_parser()))}))
"""


def test_every_module_imports_from_the_wheel_alone(built_dist: tuple[Path, Path, list[str]],
                                                   tmp_path: Path) -> None:
    """Unpacked, the wheel's modules import from its own files: a module that needs one the
    wheel lacks would be found in this checkout instead, and is named here."""
    import json

    wheel, _, _ = built_dist
    root = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(root)
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__")
                     for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", IMPORT_ALL, str(root), *modules],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout.strip().splitlines()[-1])
    assert doc["outside"] == []
    assert {"agent", "coordinator", "export", "init", "predict", "simulate", "status"} <= set(doc["commands"])


def test_installed_code_opens_no_file_outside_its_package() -> None:
    """A runtime module that reads a file relative to ``__file__`` above its own package
    (a repository file such as ``deploy/...``) would work here and fail on a device."""
    for pkg in RUNTIME_PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            text = path.read_text()
            for m in re.finditer(r"__file__[^\n]*", text):
                line = m.group(0)
                assert not re.search(r"parents\[\d\]|parent\.parent", line), (path, line)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path sits under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="fedcoe-apt-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def apt_install(tmp_path: Path, uid: int, tools: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/apt-install.sh as user ``uid``, with PATH holding only the given tools (a
    name -> script body; "" links the system's own)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        target = bin_dir / name
        if body:
            target.write_text("#!/bin/sh\n" + body)
            target.chmod(0o755)
        else:
            found = shutil.which(name)
            assert found is not None, name
            target.symlink_to(found)
    bin_dir.chmod(0o755)
    script = tmp_path / "apt-install.sh"
    shutil.copy(ROOT / "deploy" / "apt-install.sh", script)
    script.chmod(0o755)
    cmd = ["sh", str(script), "mosquitto"]
    if uid != os.geteuid():
        cmd = [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={uid}",
               "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": str(bin_dir), "HOME": str(tmp_path)})


def test_apt_install_as_a_user_without_sudo_names_the_command(open_dir: Path) -> None:
    """Not root and no sudo: one line with the command to run as root, exit 2, and apt-get is
    never called (it would fail half-way for a non-root user)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("switching to an unprivileged user needs root and setpriv")
    called = open_dir / "called"
    res = apt_install(open_dir, 65534, {"sh": "", "id": "", "apt-get": f"touch {called}\n"})
    assert res.returncode == 2, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get update && apt-get install -y mosquitto" in lines[0]
    assert not called.exists()


def test_apt_install_as_a_user_with_sudo_goes_through_sudo(open_dir: Path) -> None:
    """Not root, sudo present: both apt-get steps run through sudo. sudo itself cannot run in
    a test (it asks for a password), so a stand-in records what it was asked to run."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("switching to an unprivileged user needs root and setpriv")
    log = open_dir / "sudo.log"
    log.write_text("")
    log.chmod(0o666)
    res = apt_install(open_dir, 65534, {"sh": "", "id": "", "apt-get": "exit 1\n",
                                        "sudo": f'echo "$*" >> {log}\n'})
    assert res.returncode == 0, res
    assert log.read_text().splitlines() == [
        "apt-get update -qq",
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto"]


def test_apt_install_without_apt_get_says_so(open_dir: Path) -> None:
    res = apt_install(open_dir, os.geteuid(), {"sh": "", "id": ""})
    assert res.returncode == 2 and "apt-get not found" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
