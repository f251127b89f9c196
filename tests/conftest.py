"""Shared pytest fixtures. Tests keep torch to one thread: the machine has two cores."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


# --- Mosquitto fixtures (wire/transport engineer) ---

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


def _require_mosquitto() -> None:
    from fedcoe_edge.broker import find_mosquitto
    from fedcoe_edge.errors import ConfigError

    try:
        find_mosquitto()
    except ConfigError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def mosquitto_broker() -> Iterator[Any]:
    """A private Mosquitto on a free 127.0.0.1 port, default limits, no persistence."""
    from fedcoe_edge.broker import MosquittoBroker

    _require_mosquitto()
    with MosquittoBroker() as broker:
        yield broker


@pytest.fixture
def make_mosquitto() -> Iterator[Callable[..., Any]]:
    """Factory: ``make_mosquitto(max_packet_size=65536, ...)`` -> started MosquittoBroker,
    closed at teardown."""
    from fedcoe_edge.broker import MosquittoBroker

    _require_mosquitto()
    brokers: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        b = MosquittoBroker(**kwargs)
        brokers.append(b)
        b.start()
        return b

    yield make
    for b in brokers:
        b.close()


# --- export / runtime ------------------------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_moe():
    """A small DualLevelMoE trained for a few epochs on digits: (model, x_train, y_train, x_test, y_test).

    Trained, not random, so int8 agreement and accuracy are measured on a real decision surface.
    """
    import numpy as np

    from fedcoe_edge.config import ModelConfig, TrainConfig
    from fedcoe_edge.data.datasets import load_dataset
    from fedcoe_edge.training import build_model, run_epochs

    x, y = load_dataset("digits", 0)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order].astype(np.int64)
    cfg = ModelConfig(expert_kind="mlp", expert_hidden=32, num_global_experts=4, top_k=2,
                      num_local_experts=1)
    model = build_model(cfg, 0)

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model(xb)
        nll = torch.nn.functional.nll_loss
        return nll(out.log_probs, yb) + 0.5 * nll(out.global_log_probs, yb)

    run_epochs(model, list(model.parameters()), x[:1300], y[:1300], TrainConfig(lr=0.05), 6,
               np.random.default_rng(0), loss)
    model.eval()
    return model, x[:1300], y[:1300], x[1300:], y[1300:]


@pytest.fixture(scope="session")
def digits_bundle(digits_moe, tmp_path_factory):
    """An int8 (auto) bundle of ``digits_moe`` holding all K experts, with fp32 copies and fused graph.

    Exported once per test run, not once per xdist worker: the first worker to get here
    builds it under a file lock in the folder the workers' temporary folders share, and
    each worker gets its own copy (its own parent folder, as before). ``digits_moe`` is
    seeded and single-threaded, so every worker trains the model the bundle came from."""
    import fcntl
    import os
    import shutil

    from export.bundle import build_bundle, calibration_sample

    model, x_train = digits_moe[0], digits_moe[1]
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    built = shared / "digits_bundle_shared"
    with open(shared / "digits_bundle.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (built / "manifest.json").is_file():
            build_bundle(model, built, calibration=calibration_sample(x_train, 128))
    out = tmp_path_factory.mktemp("bundle") / "digits"
    shutil.copytree(built, out)
    return out


@pytest.fixture
def tie_bundle(tmp_path: Path) -> tuple[Path, Any]:
    """An fp32 bundle (4 MLP experts, top-2, no local level) whose gate is all zeros, and 5
    inputs: every expert gets the same probability, so only the top-k tie rule routes
    (tests/test_runtime.py and tests/test_fused_runtime.py check both runtime paths on it)."""
    import numpy as np

    from export.bundle import build_bundle
    from export.quantize import QuantizeOptions, QuantMode
    from fedcoe_edge.config import ModelConfig
    from fedcoe_edge.training import build_model

    cfg = ModelConfig(expert_kind="mlp", expert_hidden=8, num_global_experts=4, top_k=2,
                      num_local_experts=0)
    model = build_model(cfg, 1).eval()
    with torch.no_grad():
        for p in model.global_part.gate.parameters():
            p.zero_()
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    build_bundle(model, tmp_path / "tie", calibration=x, options=QuantizeOptions(mode=QuantMode.FP32))
    return tmp_path / "tie", x


# --- deployments as `fedcoe init` writes them (tests/test_deploy_e2e.py, test_shards_e2e.py) ---
@pytest.fixture
def init_broker_tools() -> None:
    """Skip unless Mosquitto and ``mosquitto_passwd`` are installed: ``fedcoe init`` hashes
    its broker passwords with the latter, and a broker started from its files needs both."""
    import shutil

    _require_mosquitto()
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("needs mosquitto_passwd (fedcoe init hashes the broker passwords with it)")


@pytest.fixture(scope="session")
def digits_npz() -> Callable[..., None]:
    """``digits_npz(path, part, parts, per_device=60)``: a device's own ``.npz``, a disjoint
    slice of the shipped 8x8 digits split 75/25 (what ``fedcoe init --data local.npz``
    points each device at)."""
    import numpy as np

    from fedcoe_edge.data.datasets import load_dataset

    x, y = load_dataset("digits", 0)
    order = np.random.default_rng(0).permutation(len(y))

    def write(path: Any, part: int, parts: int, per_device: int = 60) -> None:
        from pathlib import Path

        idx = order[part::parts][:per_device]
        xs, ys = x[idx].astype(np.float32), y[idx].astype(np.int64)
        cut = len(idx) * 3 // 4
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x_train=xs[:cut], y_train=ys[:cut], x_test=xs[cut:], y_test=ys[cut:])

    return write


# --- the wheel a device installs (tests/test_wheel.py, test_runtime_profile.py) ---
@pytest.fixture(scope="session")
def built_dist(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``(wheel, sdist, tracked files)``: ``python -m build`` as ``make wheel`` runs it (the
    sdist, then the wheel from the sdist) on a copy of the checkout's tracked files, so the
    checkout gets no build/ or egg-info and an uncommitted file cannot hide a missing one.
    Without build isolation: the same setuptools backend and configuration, from this venv
    instead of the package index, so it runs offline."""
    import importlib.util
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import tomllib

    if importlib.util.find_spec("build") is None:  # a dev dependency: missing is a setup fault
        pytest.fail("`build` is not installed: it is in the dev extra, run `make setup`")
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs a git checkout (the wheel is built from its tracked files)")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True)
    files = [f for f in out.stdout.decode().split("\0") if f and (root / f).is_file()]
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist = tmp / "src", tmp / "dist"
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, src / rel)
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    wheel = dist / f"fedcoe_edge-{version}-py3-none-any.whl"
    sdist = dist / f"fedcoe_edge-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist.iterdir())
    return wheel, sdist, files


# --- suite layout: slow tests, parallel workers (test-suite engineer) ----------------
# `make test` runs the suite on one pytest-xdist worker per core (`-n auto --dist loadgroup`);
# `make test-all` then runs the tests marked `slow`, one at a time (README, "Tests"). Each
# test already gets its own broker (a free loopback port) and its own tmp_path, so tests may
# run side by side; what cannot be split is a module-scoped fixture, built once per worker
# that runs one of its tests, so such a file is kept on one worker (below).


import functools  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402


def _runs_slow(config: pytest.Config) -> bool:
    """True when the ``-m`` expression names ``slow`` (``make test-all``, ``make test-hostile``)."""
    return "slow" in (config.getoption("markexpr") or "")


# Files whose tests took longest in `make test` (seconds of test time per file, measured
# with `--durations=0`: the files above 40 s on a loaded machine), longest first. They are
# handed out first so that the short unit tests fill the end of the run on both workers; a
# long test handed out last would run alone on one worker while the other idles. A file not
# listed keeps its place in collection order after these; a stale list costs wall time,
# never a test.
LONG_FIRST = (
    "tests/test_export.py",
    "tests/test_camera_int8.py",
    "tests/test_runtime.py",
    "tests/test_accuracy_bench.py",
    "tests/test_coordinator.py",
    "tests/test_examples.py",
    "tests/test_flower.py",
    "tests/test_registry.py",
    "tests/test_coordinator_strategies.py",
    "tests/test_coordinator_bounds.py",
    "tests/test_federation_mqtt.py",
    "tests/test_logs.py",
    "tests/test_rollback.py",
    "tests/test_agent.py",
    "tests/test_ray_backend.py",
    "tests/test_runtime_profile.py",
    "tests/test_bundle_sig.py",
    "tests/test_bench_smoke.py",
    "tests/test_conformance.py",
    "tests/test_fused_runtime.py",
    "tests/test_reconnect.py",
    "tests/test_export_cold.py",
    "tests/test_docs_api.py",
    "tests/test_cli_help.py",
    "tests/test_transport_mqtt.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests unless the ``-m`` expression asks for them; put the files of
    ``LONG_FIRST`` first (each file's tests stay together and in order, so a module-scoped
    fixture is still built once on a serial run).

    ``slow`` marks suites that take minutes of wall time (e.g. sustained attacks, a fresh
    venv from the package index): they are skipped naming the target that runs them, not
    deselected, so ``-ra`` lists what `make test` left to `make test-all`.
    """
    rank = {f: i for i, f in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
    if _runs_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run `make test-all` (pytest -m slow)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


_SHARED_SCOPE = re.compile(r"""scope\s*=\s*["'](module|class|package)["']""")


@functools.cache
def _shares_module_fixture(path: Path) -> bool:
    """True when the test file defines a module-, class- or package-scoped fixture."""
    try:
        return bool(_SHARED_SCOPE.search(path.read_text(errors="replace")))
    except OSError:
        return False


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: one test at a time to whichever worker is free, except that a
    file defining a module-scoped fixture (a trained model, an exported bundle) goes whole to
    one worker, so the fixture is built once, not once per worker; the longest files first.

    The grouping is by file, decided here in the controller (which collects nothing), because
    xdist's own ``xdist_group`` marks do not reach the node ids under pytest 9 (xdist 3.8
    still writes ``item._nodeid``). Session fixtures are built once per worker either way.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # hand the work out in collection order (``LONG_FIRST`` first, above), not xdist's
    # default of the groups with the most tests first: a count says nothing about time
    config.option.loadscopereorder = False

    root = config.rootpath

    class FileFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if _shares_module_fixture(root / path) else nodeid

    return FileFixtureScheduling(config, log)
