"""Simulations on Ray (docs/engines.md, "Ray"): the upload check on what a worker answers, bad
input in one line before anything starts, the encode / train / decode path against the
in-process simulator (fast, no cluster), and ``fedcoe simulate --backend ray`` plus the
accuracy grid's ``--ray-address`` on a real head and one worker node on loopback (slow)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

from fedcoe_edge import ray_backend
from fedcoe_edge.cli import main
from fedcoe_edge.errors import ConfigError, ValidationError, WireError
from fedcoe_edge.ray_backend import (
    DEFAULT_NORM_BOUND,
    RAY_RANGE,
    SIMULATION_ONLY,
    RayExecutor,
    check_backend,
    check_result,
    encode_result,
    require_ray,
    train_client,
)
from fedcoe_edge.strategies.base import ClientResult, ClientTask
from fedcoe_edge.wire import encode_tensors

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--clients", "2", "--new-clients", "0", "--rounds", "2",
        "--algorithms", "fedcoe,fedavg", "--local-epochs", "1", "--no-progress"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_error_line(err: str, *parts: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in err, err


# --- the upload check ---------------------------------------------------------------------------
def task_and_result(**change: Any) -> tuple[ClientTask, ClientResult]:
    sent: dict[str, np.ndarray] = {"w": np.zeros((2, 3), np.float32), "steps": np.array([4], np.int64)}
    task = ClientTask("3", 2, sent, [0, 1], {"version": 1})
    result = ClientResult("3", 2, 40, {"w": np.full((2, 3), 0.5, np.float32),
                                       "steps": np.array([4], np.int64)},
                          affinity=[0.25, 0.75], metrics={"train_loss": 0.7})
    for k, v in change.items():
        setattr(result, k, v)
    return task, result


def test_a_good_result_passes_the_check_unchanged() -> None:
    task, result = task_and_result()
    got = check_result(task, *encode_result(result), num_experts=2)
    assert (got.client_id, got.round, got.num_samples) == ("3", 2, 40)
    assert got.affinity == [0.25, 0.75] and got.metrics == {"train_loss": 0.7}
    for name, value in result.params.items():
        assert got.params[name].dtype == value.dtype
        np.testing.assert_array_equal(got.params[name], value)


@pytest.mark.parametrize(("change", "message"), [
    ({"round": 3}, "says client '3' round 3"),
    ({"client_id": "4"}, "says client '4' round 2"),
    ({"params": {"w": np.zeros((2, 3), np.float32)}}, "tensor 'steps' missing"),
    ({"params": {"w": np.zeros((2, 3), np.float32), "steps": np.array([4], np.int64),
                 "x": np.zeros(1, np.float32)}}, "unexpected tensor 'x'"),
    ({"params": {"w": np.zeros((3, 2), np.float32), "steps": np.array([4], np.int64)}},
     "has shape [3, 2], expected [2, 3]"),
    ({"params": {"w": np.zeros((2, 3), np.float64), "steps": np.array([4], np.int64)}},
     "has dtype float64, expected float32"),
    ({"params": {"w": np.array([[np.nan, 0, 0], [0, 0, 0]], np.float32),
                 "steps": np.array([4], np.int64)}}, "1 non-finite value"),
    ({"params": {"w": np.full((2, 3), 1e4, np.float32), "steps": np.array([4], np.int64)}},
     "update delta: L2 norm"),
    ({"num_samples": 0}, "num_samples 0 is not a count"),
    ({"affinity": [0.5]}, "affinity must be 2 finite non-negative numbers"),
    ({"affinity": [0.5, -0.1]}, "affinity must be 2 finite non-negative numbers"),
    ({"metrics": {"train_loss": float("nan")}}, "not valid JSON"),
])
def test_a_bad_result_is_refused_in_one_line(change: dict[str, Any], message: str) -> None:
    task, result = task_and_result(**change)
    with pytest.raises((ValidationError, WireError), match=None) as err:
        check_result(task, *encode_result(result), num_experts=2)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bytes_that_are_not_safetensors_are_refused() -> None:
    task, result = task_and_result()
    meta, _ = encode_result(result)
    with pytest.raises(WireError, match="not a valid safetensors payload"):
        check_result(task, meta, b"\x80\x04K\x01.", num_experts=2)  # a pickle is not data


def test_the_bounds_are_the_coordinators() -> None:
    """The Ray answer check and the coordinator's upload check read one bound, one table of
    simulation-only strategies and one message schema: a change to either reaches both."""
    from coordinator.config import FederationSettings
    from fedcoe_edge.strategies import SIMULATION_ONLY as LIBRARY_TABLE

    assert FederationSettings().norm_bound == DEFAULT_NORM_BOUND
    assert SIMULATION_ONLY is LIBRARY_TABLE and {"fedrep", "feddbe"} <= set(SIMULATION_ONLY)


# --- bad input: one line, exit 2, nothing started ------------------------------------------------
def test_ray_outside_the_tested_range_is_one_line() -> None:
    require_ray("2.55.1")
    for version in ("2.54.0", "2.56.0", "3.0.0", "nightly"):
        with pytest.raises(ConfigError, match=rf"ray {version} is outside the tested range ray{RAY_RANGE}"):
            require_ray(version)


@pytest.mark.parametrize(("backend", "address", "algorithms", "message"), [
    ("dask", None, [], "--backend 'dask': expected one of inprocess, ray"),
    ("inprocess", "127.0.0.1:6379", [], "--ray-address '127.0.0.1:6379' needs --backend ray"),
    ("ray", None, ["fedavg", "fedrep"], "algorithm 'fedrep' cannot run on --backend ray"),
])
def test_check_backend(backend: str, address: str | None, algorithms: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        check_backend(backend, address, algorithms)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def simulate_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, Path]:
    out = tmp_path / "out"
    rc = main(["simulate", *TINY, "--out", str(out), *args])
    return rc, capsys.readouterr().err, out


@pytest.mark.parametrize(("args", "message"), [
    (["--backend", "dask"], "--backend 'dask': expected one of inprocess, ray"),
    (["--ray-address", "127.0.0.1:6379"], "needs --backend ray"),
    (["--backend", "ray", "--ray-address", "headnode"], "expected HOST:PORT of a Ray head"),
    (["--backend", "ray", "--ray-address", "127.0.0.1:99999"], "expected HOST:PORT of a Ray head"),
])
def test_simulate_bad_backend_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          args: list[str], message: str) -> None:
    rc, err, out = simulate_cli(tmp_path, capsys, *args)
    assert rc == 2
    one_error_line(err, "fedcoe simulate: error:", message)
    assert not out.exists()


def test_simulate_on_a_ray_address_that_does_not_answer(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray")
    port = closed_port()
    t0 = time.monotonic()
    rc, err, out = simulate_cli(tmp_path, capsys, "--backend", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert rc == 2
    one_error_line(err, f"--ray-address 127.0.0.1:{port}: no Ray head answers there")
    assert time.monotonic() - t0 < 60  # not Ray's minute of retries: a refused port answers at once
    assert not out.exists() and not ray.is_initialized()


def test_simulate_refuses_ray_outside_the_range(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    ray = pytest.importorskip("ray")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.60.0" if name == "ray" else real(name))
    rc, err, out = simulate_cli(tmp_path, capsys, "--backend", "ray", "--ray-address", "127.0.0.1:6379")
    assert rc == 2
    one_error_line(err, f"ray 2.60.0 is outside the tested range ray{RAY_RANGE}")
    assert not out.exists() and not ray.is_initialized()


def test_accuracy_grid_on_a_ray_address_that_does_not_answer(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import accuracy

    port = closed_port()
    rc = accuracy.main(["--settings", "digits-dir0.1", "--algorithms", "fedavg", "--ablations", "",
                        "--seeds", "0", "--rounds", "1", "--untuned", "--no-progress",
                        "--out", str(tmp_path / "acc"), "--ray-address", f"127.0.0.1:{port}"])
    assert rc == 2
    one_error_line(capsys.readouterr().err, "benchmarks.accuracy: error:", "no Ray head answers there")
    assert not (tmp_path / "acc").exists()


def test_extras_pin_ray_and_keep_it_off_the_smaller_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in reqs}

    for profile in (project["dependencies"], extras["runtime"], extras["train"]):
        assert not names(profile) & {"flwr", "ray"}
    assert f"ray{RAY_RANGE}" in extras["ray"]
    assert "flwr" not in names(extras["ray"])


# --- the Ray path without Ray: encode, train on a "worker", decode and check ---------------------
class LoopbackExecutor(RayExecutor):
    """RayExecutor with each task run by ``train_client`` in this process (what a worker
    runs), so the encoding both ways and the check are exercised without a cluster."""

    def run_tasks(self, spec: str, calls: Sequence[tuple[str, bytes, bytes | None]]) -> list[Any]:
        ray_backend._WORKER_CACHE.clear()  # the worker rebuilds its federation from the spec
        return [train_client(spec, *call) for call in calls]


def states_of(algorithm: str, executor: Any) -> tuple[list[dict[str, np.ndarray]], Any]:
    import fedcoe_edge.simulation as simulation
    from fedcoe_edge.data import make_federation

    cfg = simulation.SimulationConfig(dataset="digits", clients=3, new_clients=0, rounds=2,
                                      algorithms=[algorithm], seeds=[0])
    cfg.model.expert_hidden, cfg.model.num_global_experts, cfg.model.top_k = 16, 4, 2
    cfg.train.local_epochs, cfg.train.experts_per_client = 1, 2
    fed = make_federation(cfg.dataset, cfg.partition, cfg.clients, cfg.new_clients, 0, cfg.alpha,
                          cfg.min_samples)
    cfg.model = simulation.fit_model_to_data(cfg.model, fed)
    states: list[dict[str, np.ndarray]] = []
    real = simulation.make_strategy
    built: list[Any] = []

    def catch(*a: Any, **kw: Any) -> Any:
        built.append(real(*a, **kw))
        return built[-1]

    simulation.make_strategy = catch  # type: ignore[assignment]
    try:
        run = simulation.run_one(algorithm, fed, cfg, 0, executor=None if executor is None else executor(cfg),
                                 on_round=lambda r, p: states.append(
                                     {k: v.copy() for k, v in built[0].global_state.items()}))
    finally:
        simulation.make_strategy = real  # type: ignore[assignment]
    return states, run


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as a Ray task of one CPU trains (``train_client``), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg", "local"])  # local: no tensors travel
@pytest.mark.usefixtures("one_thread")
def test_the_encoded_path_gives_the_simulators_states(algorithm: str) -> None:
    here, run_here = states_of(algorithm, None)
    there, run_there = states_of(algorithm, lambda cfg: LoopbackExecutor(ray_backend.data_settings(cfg)))
    assert len(here) == len(there) == 2
    for a, b in zip(here, there, strict=True):
        assert set(a) == set(b)
        for name in a:  # same process, same threads: bit for bit
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for cid, local in run_here.local_states.items():
        other = run_there.local_states[cid]
        assert (local is None) == (other is None)
        for name in local or {}:
            np.testing.assert_array_equal(local[name], other[name])  # type: ignore[index]
    assert run_here.curve == run_there.curve


@pytest.mark.usefixtures("one_thread")
def test_a_refused_answer_is_left_out_and_the_round_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Tampering(LoopbackExecutor):
        def run_tasks(self, spec: str, calls: Sequence[tuple[str, bytes, bytes | None]]) -> list[Any]:
            answers = super().run_tasks(spec, calls)
            meta, _, local = answers[0]
            answers[0] = (meta, encode_tensors({"w": np.zeros(1, np.float32)}), local)
            return answers

    made: list[Tampering] = []

    def executor(cfg: Any) -> Tampering:
        made.append(Tampering(ray_backend.data_settings(cfg)))
        return made[0]

    _, run = states_of("fedavg", executor)
    assert made[0].refused == 2  # the first client of each of the 2 rounds
    assert "update: tensor" in caplog.text and "missing" in caplog.text
    assert run.metrics["bytes_up_per_client_round"] > 0


@pytest.mark.usefixtures("one_thread")
def test_a_private_state_of_another_form_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """From round 2 a client's private state must keep the names, shapes and dtypes it had."""
    class Reshaping(LoopbackExecutor):
        def run_tasks(self, spec: str, calls: Sequence[tuple[str, bytes, bytes | None]]) -> list[Any]:
            answers = super().run_tasks(spec, calls)
            if calls[0][2] is not None:  # round 2: the first client had a state to send
                meta, params, _ = answers[0]
                answers[0] = (meta, params, encode_tensors({"x": np.zeros(1, np.float32)}))
            return answers

    made: list[Reshaping] = []

    def executor(cfg: Any) -> Reshaping:
        made.append(Reshaping(ray_backend.data_settings(cfg)))
        return made[0]

    states_of("local", executor)
    assert made[0].refused == 1
    assert "private state tensor" in caplog.text and "missing" in caplog.text


@pytest.mark.usefixtures("one_thread")
def test_a_worker_with_other_data_refuses_to_train() -> None:
    task = ClientTask("0", 1, {}, [], {})
    spec = ray_backend.RunSpec("local", 0, {"dataset": "digits", "partition": "dirichlet", "clients": 2,
                                            "new_clients": 0, "alpha": 0.5, "min_samples": 20,
                                            "data_fraction": 1.0, "data_dir": None, "image_shape": None},
                               {"input_shape": [1, 8, 8], "num_classes": 10}, {}).to_json()
    meta, params = ray_backend.encode_task(task, "0" * 64, "local")
    with pytest.raises(ConfigError, match="this worker's data differs from the driver's"):
        train_client(spec, meta, params, None)


def test_a_task_config_json_cannot_carry_is_one_line() -> None:
    task = ClientTask("0", 1, {}, [], {"schedule": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="strategy 'x': task config 'schedule' holds dict"):
        ray_backend.encode_task(task, "", "x")


# --- a real cluster: one head, one worker node, on loopback -------------------------------------
RAY = str(Path(sys.executable).with_name("ray"))
# Ray turns 127.0.0.1 into the host's outside address; another loopback address stays loopback
LOOPBACK = "127.0.0.2"


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def start_node(args: list[str], tmp: Path, name: str) -> subprocess.Popen[bytes]:
    """``ray start --block ...`` in its own process group (stopped by :func:`stop_nodes`)."""
    log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=ray_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_nodes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each node's process group (what `ray start --block` stops its services on),
    then SIGKILL what is left after 20 s."""
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    time.sleep(1)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for_nodes(address: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run([RAY, "status", f"--address={address}"], env=ray_env(),
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and proc.stdout.count(" node_") >= count:
            return
        time.sleep(2)
    raise AssertionError(f"Ray cluster at {address} did not reach {count} nodes")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A head with no CPUs (so every task runs on the worker node) and one worker node of
    one CPU, every port on loopback; stopped in a finally."""
    tmp = tmp_path_factory.mktemp("ray")
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(start_node(["--head", f"--node-ip-address={LOOPBACK}", f"--port={port}",
                                 "--num-cpus=0", "--include-dashboard=false",
                                 f"--dashboard-port={free_port()}",
                                 f"--ray-client-server-port={free_port()}",
                                 f"--temp-dir={tmp / 't'}"], tmp, "head"))
        wait_for_nodes(address, 1)
        procs.append(start_node([f"--address={address}", f"--node-ip-address={LOOPBACK}",
                                 "--num-cpus=1"], tmp, "worker"))
        wait_for_nodes(address, 2)
        yield address
    finally:
        stop_nodes(procs)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedcoe_edge.cli", *args], env=ray_env(),
                          capture_output=True, text=True, timeout=600)


def checkpoints(out: Path) -> dict[str, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    return {str(p.relative_to(out)): load_file(p) for p in sorted((out / "checkpoints").rglob("*.safetensors"))}


@pytest.mark.slow
def test_simulate_on_a_ray_cluster_equals_in_process(cluster: str, tmp_path: Path) -> None:
    here = run_cli("simulate", *TINY, "--out", str(tmp_path / "here"))
    assert here.returncode == 0, here.stderr[-2000:]
    there = run_cli("simulate", *TINY, "--out", str(tmp_path / "ray"), "--backend", "ray",
                    "--ray-address", cluster)
    assert there.returncode == 0, there.stderr[-2000:]
    a = json.loads((tmp_path / "here" / "results.json").read_text())
    b = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert b["backend"] == {"name": "ray", "address": cluster, "refused": 0}
    for algorithm, metrics in a["algorithms"].items():
        for key, value in metrics.items():
            if key != "wall_s":
                assert value == pytest.approx(b["algorithms"][algorithm][key], rel=1e-6, nan_ok=True), key
    ca, cb = checkpoints(tmp_path / "here"), checkpoints(tmp_path / "ray")
    assert set(ca) == set(cb) and len(ca) >= 3
    for path, tensors in ca.items():
        assert set(tensors) == set(cb[path])
        for name, value in tensors.items():  # one torch thread on both sides: bit for bit
            np.testing.assert_array_equal(value, cb[path][name], err_msg=f"{path} {name}")


@pytest.mark.slow
def test_accuracy_grid_on_a_ray_cluster_fills_the_same_cache(cluster: str, tmp_path: Path) -> None:
    from benchmarks import accuracy

    args = ["--settings", "digits-dir0.1", "--algorithms", "fedavg,local", "--ablations", "",
            "--seeds", "0", "--rounds", "2", "--clients", "4", "--new-clients", "1", "--untuned",
            "--eval-every", "1", "--no-progress"]
    for name, extra in (("here", ["--jobs", "1"]), ("ray", ["--ray-address", cluster])):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", *args, *extra,
                               "--out", str(tmp_path / name)], env=ray_env(), capture_output=True,
                              text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
    here = accuracy.load_cache(tmp_path / "here" / "accuracy_cache.jsonl")
    there = accuracy.load_cache(tmp_path / "ray" / "accuracy_cache.jsonl")
    assert set(here) == set(there) and len(here) == 2
    for key, rec in here.items():
        assert rec["curve"] == there[key]["curve"]
        assert {k: v for k, v in rec["metrics"].items() if k != "wall_s"} == pytest.approx(
            {k: v for k, v in there[key]["metrics"].items() if k != "wall_s"}, nan_ok=True)
