"""``flwr run`` of examples/flower_app, unchanged, on Flower's two engines (docs/engines.md,
"Flower"): the Simulation Engine (a SuperLink with ``--simulation``, Ray underneath) and the
Deployment Engine (a SuperLink and two SuperNodes on loopback). Both are minutes of wall time
on a small machine (Ray's start, a ClientApp process per message), so both are slow tests.

The SuperLink, SuperNodes and ``flwr run`` are started with the commands docs/engines.md
prints; the only additions are loopback ports, a private FLWR_HOME, and no dependency
installation at run time (this checkout is what is tested).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

pytest.importorskip("flwr")

import fedcoe_edge.simulation as simulation  # noqa: E402
from fedcoe_edge.checkpoint import load_arrays_file  # noqa: E402
from fedcoe_edge.flower import flower_run  # noqa: E402
from fedcoe_edge.flower.apps import RESULTS_FILE, STATE_FILE, federation_of  # noqa: E402
from fedcoe_edge.strategies.base import Strategy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def example_run_config() -> dict[str, Any]:
    """[tool.flwr.app.config] of the example, flattened as Flower flattens it."""
    from flwr.common.config import flatten_dict

    doc = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    return dict(flatten_dict(doc["tool"]["flwr"]["app"]["config"]))


def flwr_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


@contextmanager
def started(cmds: list[tuple[list[str], dict[str, str]]], logs: Path) -> Iterator[None]:
    """Start each (command, environment), its output to ``logs``/NAME.log; stop them all, by
    pid, on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for cmd, env in cmds:
            out = (logs / f"{Path(cmd[0]).name}-{len(procs)}.log").open("w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def connection(home: Path, port: int) -> str:
    """A SuperLink connection in FLWR_HOME/config.toml (docs/engines.md, "Flower")."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedcoe"\n\n[superlink.fedcoe]\naddress = "127.0.0.1:{port}"\n'
        f"insecure = true\n")
    return "fedcoe"


def wait_listening(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def flwr_run(env: dict[str, str], conn: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "flwr"), "run", str(EXAMPLE), conn, "--stream",
           "--run-config", f"out-dir='{out}'", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540, cwd=ROOT)


def simulated(run_config: dict[str, Any]) -> tuple[list[float], Strategy]:
    """global_acc per round and the strategy of the in-process simulator, same knobs."""
    run = flower_run(run_config)
    fed = federation_of(run)
    res = simulation.run_one(run.algorithm, fed, run.sim, run.seed)
    return [p["global_acc"] for p in res.curve], res.strategy


def check_equal(out: Path, run_config: dict[str, Any]) -> None:
    import json

    doc = json.loads((out / RESULTS_FILE).read_text())
    accs, strategy = simulated(run_config)
    assert [r["failures"] for r in doc["rounds"]] == [0] * len(accs)
    assert [r["global_acc"] for r in doc["rounds"]] == pytest.approx(accs)
    state = load_arrays_file(out / STATE_FILE)
    assert set(state) == set(strategy.global_state)
    for name, value in state.items():
        np.testing.assert_allclose(value, strategy.global_state[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_flwr_run_on_the_simulation_engine_equals_fedcoe_simulate(tmp_path: Path) -> None:
    port = free_port()
    env = flwr_env(tmp_path / "flwr")
    conn = connection(tmp_path / "flwr", port)
    link = [str(BIN / "flower-superlink"), "--simulation", "--insecure", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    cfg = example_run_config()
    with started([(link, env)], tmp_path):
        wait_listening(port)
        proc = flwr_run(env, conn, tmp_path / "out", "--federation-config",
                        f"num-supernodes={cfg['clients']}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_equal(tmp_path / "out", cfg)


def test_flwr_run_on_the_deployment_engine_with_two_supernodes(tmp_path: Path) -> None:
    port = free_port()
    env = flwr_env(tmp_path / "flwr")
    conn = connection(tmp_path / "flwr", port)
    link = [str(BIN / "flower-superlink"), "--insecure", "--port", str(port),
            "--disable-runtime-dependency-installation"]
    # each SuperNode a machine of its own: its own FLWR_HOME, its own ClientApp port
    nodes = [([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
               "--port", str(free_port()), "--node-config", f"partition-id={i} num-partitions=2"],
              flwr_env(tmp_path / f"node{i}")) for i in range(2)]
    cfg = {**example_run_config(), "clients": 2, "num-server-rounds": 2}
    with started([(link, env), *nodes], tmp_path):
        wait_listening(port)
        proc = flwr_run(env, conn, tmp_path / "out", "--run-config", "clients=2 num-server-rounds=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_equal(tmp_path / "out", cfg)
