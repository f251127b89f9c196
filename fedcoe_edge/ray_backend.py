"""Simulations on a Ray cluster (docs/engines.md, "Ray").

Two uses, both optional (the ``[ray]`` extra):

* :class:`RayExecutor` is a :data:`fedcoe_edge.simulation.ClientExecutor`: each round's client
  training runs as Ray tasks, one per selected client, and the server side (selection,
  aggregation, evaluation) stays in the driver, so ``fedcoe simulate --backend ray`` runs the
  rule ``fedcoe simulate`` runs on the same numbers.
* :func:`run_jobs` runs independent jobs (the accuracy grid's runs) as Ray tasks, each
  returning a JSON document.

What crosses Ray is ours to decode: a task goes as its tensors in safetensors bytes
(:func:`fedcoe_edge.wire.encode_tensors`) and a JSON string (client, round, expert ids, task
config, the run's data and model settings); a worker answers with safetensors bytes and a
JSON string, which the driver parses strictly and checks as the coordinator checks an upload
(:func:`check_result`) before the strategy aggregates it. A worker rebuilds the client's data
from the run's settings and proves it has the driver's data with a digest. This does not make
the workers untrusted: Ray ships the task code itself with cloudpickle and picks how to decode
a return value from what the sender wrote, so a Ray cluster is one trust domain.

Nothing here imports Ray at import time; :func:`require_ray` turns a missing Ray, or one
outside the tested range, into one ConfigError line before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError, FedCoEError, ValidationError, WireError
from fedcoe_edge.extras import require_extra, version_range
from fedcoe_edge.messages import MAX_METRICS, MAX_NAME, MAX_SAMPLES
from fedcoe_edge.strategies import SIMULATION_ONLY
from fedcoe_edge.strategies.base import Arrays, ClientData, ClientResult, ClientTask, Strategy
from fedcoe_edge.wire import (
    DEFAULT_NORM_BOUND,
    decode_tensors,
    encode_tensors,
    parse_json,
    validate_change,
    validate_update,
)

log = logging.getLogger(__name__)

# The Ray releases the tests ran against: >= RAY_MIN and < RAY_BELOW (pyproject.toml's [ray]
# extra pins the same range). Ray's task and object APIs change between minor releases.
RAY_MIN = (2, 55)
RAY_BELOW = (2, 56)
RAY_RANGE = version_range(RAY_MIN, RAY_BELOW)

BACKENDS = ("inprocess", "ray")

CONNECT_TIMEOUT_S = 3.0  # a head that does not accept a TCP connection in this long is not there


# --- checks that start nothing ---------------------------------------------------------------
def require_ray(version: str | None = None) -> str:
    """The installed Ray version, or ConfigError in one line when Ray is missing or outside
    the tested range (``version`` overrides the installed one: tests, error paths)."""
    return require_extra("ray", "Ray", "ray", RAY_MIN, RAY_BELOW, version)


def check_backend(backend: str, address: str | None, algorithms: Sequence[str] = ()) -> None:
    """One ConfigError line for a backend we do not have, ``--ray-address`` without
    ``--backend ray``, or an algorithm the Ray backend's upload check would refuse."""
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r:.40}: expected one of {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise ConfigError(f"--ray-address {address!r:.80} needs --backend ray (got --backend {backend})")
    if backend == "ray":
        for name in algorithms:
            if name in SIMULATION_ONLY:
                raise ConfigError(f"algorithm {name!r} cannot run on --backend ray: "
                                  f"{SIMULATION_ONLY[name]}, which the upload check refuses")


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a Ray head's GCS (what ``ray start --head`` prints), or ConfigError."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address {address!r:.80}: expected HOST:PORT of a Ray head "
                          f"(what `ray start --head` prints)")
    return host, int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ConfigError in one line unless something accepts a TCP connection at ``address``
    within ``timeout`` seconds: ``ray.init`` would otherwise retry for a minute or more."""
    host, port = parse_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--ray-address {address}: no Ray head answers there ({reason}; "
                          f"start one with `ray start --head`)") from None


def connect(address: str | None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` (None: start a local Ray with ``num_cpus``), after
    :func:`require_ray` and :func:`check_reachable`; the caller calls :func:`shutdown`."""
    require_ray()
    if address is not None:
        check_reachable(address)
    import ray

    # a tip about GPU env vars Ray prints on every init; fedcoe's tasks ask for no GPU
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address {address}: Ray could not join ({str(exc).splitlines()[0][:200]})") from None


def shutdown() -> None:
    """Leave the cluster (and stop a local Ray this process started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --- what travels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """What a worker needs to rebuild the federation and the client-side strategy: the
    algorithm, seed, data settings (``fedcoe_edge.data.make_federation``'s arguments) and the
    model and training configs, as plain JSON."""

    algorithm: str
    seed: int
    data: Mapping[str, Any]
    model: Mapping[str, Any]
    train: Mapping[str, Any]

    def to_json(self) -> str:
        return json.dumps({"algorithm": self.algorithm, "seed": self.seed, "data": dict(self.data),
                           "model": dict(self.model), "train": dict(self.train)}, sort_keys=True)


def data_settings(cfg: Any) -> dict[str, Any]:
    """The federation settings of a :class:`fedcoe_edge.simulation.SimulationConfig`."""
    return {"dataset": cfg.dataset, "partition": cfg.partition, "clients": cfg.clients,
            "new_clients": cfg.new_clients, "alpha": cfg.alpha, "min_samples": cfg.min_samples,
            "data_fraction": cfg.data_fraction, "data_dir": cfg.data_dir,
            "image_shape": None if cfg.image_shape is None else list(cfg.image_shape)}


def data_digest(data: ClientData) -> str:
    """sha256 over a client's training split (dtype, shape, bytes): a worker trains only when
    its copy of the client's data is the driver's."""
    h = hashlib.sha256()
    for arr in (data.x_train, data.y_train):
        v = np.ascontiguousarray(arr)
        h.update(f"{v.dtype.str}|{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def jsonable_scalar(value: Any, where: str) -> Any:
    """A task config value as JSON carries it (numbers, strings, booleans, None and lists of
    them), or ConfigError naming ``where``."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where} is {value}, which JSON cannot carry")
        return value
    if isinstance(value, list | tuple):
        return [jsonable_scalar(v, where) for v in value]
    raise ConfigError(f"{where} holds {type(value).__name__} {value!r:.40}, which the Ray "
                      f"backend cannot carry (JSON numbers, strings, booleans and lists)")


def encode_task(task: ClientTask, digest: str, algorithm: str) -> tuple[str, bytes]:
    meta = {"client_id": task.client_id, "round": task.round,
            "expert_ids": [int(i) for i in task.expert_ids], "data_sha256": digest,
            "config": {str(k): jsonable_scalar(v, f"strategy {algorithm!r}: task config {k!r}")
                       for k, v in task.config.items()}}
    return json.dumps(meta), encode_tensors(task.params)


def decode_task(meta_json: str, data: bytes) -> tuple[ClientTask, str]:
    meta = json.loads(meta_json)
    task = ClientTask(str(meta["client_id"]), int(meta["round"]), decode_tensors(data),
                      [int(i) for i in meta["expert_ids"]], dict(meta["config"]))
    return task, str(meta["data_sha256"])


def encode_result(result: ClientResult) -> tuple[str, bytes]:
    meta = {"client_id": result.client_id, "round": result.round,
            "num_samples": int(result.num_samples),
            "affinity": None if result.affinity is None else [float(a) for a in result.affinity],
            "metrics": {str(k): float(v) for k, v in result.metrics.items()}}
    return json.dumps(meta), encode_tensors(result.params)


def check_result(task: ClientTask, meta_json: str, data: bytes, num_experts: int,
                 norm_bound: float = DEFAULT_NORM_BOUND) -> ClientResult:
    """Decode and check a worker's answer to ``task`` as the coordinator checks an upload
    (coordinator/engine.py, ``check_update``; docs/design.md, section 8): strict JSON, the
    client and round asked, safetensors bytes with exactly the tensors sent (names, shapes,
    dtypes), finite values, the L2 norm of the change within ``norm_bound``, a sample count in
    1..MAX_SAMPLES, ``num_experts`` finite non-negative affinities, at most MAX_METRICS finite
    metrics. ValidationError (or WireError) in one line otherwise."""
    where = f"Ray result for client {task.client_id!r} round {task.round}"
    meta = parse_json(meta_json.encode("utf-8"), where)
    if not isinstance(meta, dict):
        raise ValidationError(f"{where}: not a JSON object")
    if (meta.get("client_id"), meta.get("round")) != (task.client_id, task.round):
        raise ValidationError(f"{where}: says client {meta.get('client_id')!r:.40} round "
                              f"{meta.get('round')!r:.20}")
    params = decode_tensors(data)
    validate_change(params, task.params, norm_bound)
    n = meta.get("num_samples")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SAMPLES:
        raise ValidationError(f"{where}: num_samples {n!r:.20} is not a count in 1..{MAX_SAMPLES}")
    aff = meta.get("affinity")
    if aff is not None and (not isinstance(aff, list) or len(aff) != num_experts or not all(
            isinstance(a, int | float) and not isinstance(a, bool) and a >= 0 for a in aff)):
        raise ValidationError(f"{where}: affinity must be {num_experts} finite non-negative numbers")
    metrics = meta.get("metrics", {})
    if (not isinstance(metrics, dict) or len(metrics) > MAX_METRICS
            or not all(len(k) <= MAX_NAME and isinstance(v, int | float) and not isinstance(v, bool)
                       for k, v in metrics.items())):
        raise ValidationError(f"{where}: metrics must be at most {MAX_METRICS} finite numbers by name")
    return ClientResult(task.client_id, task.round, n, params,
                        None if aff is None else [float(a) for a in aff],
                        {k: float(v) for k, v in metrics.items()})


# --- the worker side ---------------------------------------------------------------------------
_WORKER_CACHE: dict[str, tuple[Any, Strategy]] = {}


def worker_side(spec_json: str) -> tuple[Any, Strategy]:
    """The federation and a client-side strategy for a run, built once per worker process
    (``client_update`` reads everything else from the task and the private state)."""
    if spec_json not in _WORKER_CACHE:
        from fedcoe_edge.data import make_federation
        from fedcoe_edge.strategies import make_strategy

        spec = json.loads(spec_json)
        d = spec["data"]
        fed = make_federation(d["dataset"], d["partition"], d["clients"], d["new_clients"],
                              spec["seed"], d["alpha"], d["min_samples"],
                              data_fraction=d["data_fraction"], data_dir=d["data_dir"],
                              image_shape=None if d["image_shape"] is None else tuple(d["image_shape"]))
        model = dict(spec["model"])
        model["input_shape"] = tuple(model["input_shape"])
        strategy = make_strategy(spec["algorithm"], ModelConfig.from_dict(model),
                                 TrainConfig.from_dict(spec["train"]), spec["seed"])
        _WORKER_CACHE.clear()  # one run at a time per worker process: bounded
        _WORKER_CACHE[spec_json] = (fed, strategy)
    return _WORKER_CACHE[spec_json]


def train_client(spec_json: str, task_json: str, task_bytes: bytes,
                 local_bytes: bytes | None) -> tuple[str, bytes, bytes | None]:
    """One client's round on a worker: its data must match the driver's digest; returns the
    result (JSON, safetensors) and the client's private state after the round (safetensors;
    None when the strategy keeps none). Only str and bytes go back, which Ray carries without
    pickle (msgpack and raw buffers)."""
    import torch

    torch.set_num_threads(1)  # one Ray CPU per task
    fed, strategy = worker_side(spec_json)
    task, digest = decode_task(task_json, task_bytes)
    data = fed.clients[task.client_id]
    if data_digest(data) != digest:
        raise ConfigError(f"client {task.client_id!r}: this worker's data differs from the driver's "
                          f"(check the dataset and data_dir on every node)")
    local = None if local_bytes is None else decode_tensors(local_bytes)
    result, new_local = strategy.client_update(task, local, data)
    meta, params = encode_result(result)
    return meta, params, None if new_local is None else encode_tensors(new_local)


def ray_error_line(exc: BaseException) -> str:
    """The first line of a Ray task's failure: the worker's exception type and message."""
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:300]
    return str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__


# --- the driver side ---------------------------------------------------------------------------
class RayExecutor:
    """A ClientExecutor (fedcoe_edge.simulation) that trains each round's clients as Ray tasks
    of one CPU each, then decodes and checks every answer (:func:`check_result`); an answer
    that fails the check is dropped with a warning (the strategy aggregates the rest), as the
    coordinator refuses an upload. Needs :func:`connect` first.

    ``data`` is the federation's settings (:func:`data_settings`): every worker rebuilds the
    federation from them, so the dataset must be readable at the same place on every node."""

    def __init__(self, data: Mapping[str, Any], norm_bound: float = DEFAULT_NORM_BOUND) -> None:
        self.data = dict(data)
        self.norm_bound = norm_bound
        # by client and data object; the object is held so that its id cannot be reused
        self.digests: dict[tuple[str, int], tuple[ClientData, str]] = {}
        self.refused = 0  # answers dropped by the check, over the executor's life
        self._remote: Any = None

    def run_tasks(self, spec: str, calls: Sequence[tuple[str, bytes, bytes | None]]) -> list[Any]:
        """``train_client(spec, *call)`` for every call, as Ray tasks; the answers in order."""
        import ray

        if self._remote is None:
            self._remote = ray.remote(num_cpus=1)(train_client)
        spec_ref = ray.put(spec)
        refs = [self._remote.remote(spec_ref, *call) for call in calls]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayError as exc:
            raise ConfigError(f"a Ray client task failed: {ray_error_line(exc)}") from None

    def __call__(self, algorithm: str, strategy: Strategy,
                 jobs: Sequence[tuple[ClientTask, Arrays | None, ClientData]],
                 ) -> list[tuple[ClientResult | None, Arrays | None]]:
        spec = RunSpec(algorithm, strategy.seed, self.data, strategy.model_cfg.to_dict(),
                       strategy.train_cfg.to_dict()).to_json()
        calls = []
        for task, local, data in jobs:
            key = (task.client_id, id(data))
            if key not in self.digests:
                self.digests[key] = (data, data_digest(data))
            meta, params = encode_task(task, self.digests[key][1], algorithm)
            calls.append((meta, params, None if local is None else encode_tensors(local)))
        answers = self.run_tasks(spec, calls)
        out: list[tuple[ClientResult | None, Arrays | None]] = []
        k = strategy.model_cfg.num_global_experts
        for (task, before, _), answer in zip(jobs, answers, strict=True):
            try:
                meta, params, local_bytes = answer
                result = check_result(task, meta, params, k, self.norm_bound)
                local = None if local_bytes is None else decode_tensors(local_bytes)
                if before is not None and local is not None:  # the private state keeps its form
                    try:
                        validate_update(local, {n: (v.shape, v.dtype) for n, v in before.items()})
                    except ValidationError as exc:
                        raise ValidationError(f"Ray result for client {task.client_id!r}: private "
                                              f"state {str(exc).removeprefix('update: ')}") from None
            except (FedCoEError, TypeError, ValueError) as exc:
                self.refused += 1
                log.warning("round %d: %s", task.round, exc if isinstance(exc, FedCoEError)
                            else f"Ray result for client {task.client_id!r}: malformed ({exc})")
                out.append((None, before))
                continue
            out.append((result, local))
        return out


def _json_job(work: Callable[..., dict[str, Any]], *args: Any) -> str:
    """A grid job on a worker: ``work(*args)`` as a JSON string (what the driver parses)."""
    import torch

    torch.set_num_threads(1)
    return json.dumps(work(*args))


def run_jobs(todo: Sequence[Any], work: Callable[..., dict[str, Any]],
             args_of: Callable[[Any], tuple[Any, ...]],
             on_done: Callable[[Any, dict[str, Any]], None],
             progress: Callable[[], None] | None = None) -> None:
    """Run ``work(*args_of(job))`` for every job as a Ray task of one CPU and hand each
    finished record to ``on_done`` in the driver, in the order they finish. ``work`` and its
    arguments travel to the workers as Ray sends code (cloudpickle: the trust domain); each
    record comes back as a JSON string, parsed with ``json.loads`` (never unpickled). A job
    that raises stops the rest (cancelled) after the finished ones are handed over."""
    import ray

    remote = ray.remote(num_cpus=1, max_retries=0)(_json_job)
    pending = {remote.remote(work, *args_of(j)): j for j in todo}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                text = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                raise ConfigError(f"Ray job {job!r:.80} failed: {ray_error_line(exc)}") from None
            if not isinstance(text, str):
                raise WireError(f"Ray job {job!r:.80}: answer is {type(text).__name__}, not JSON text")
            try:  # NaN stays NaN, as in the grid's cache (json.dumps / json.loads)
                record = json.loads(text)
            except ValueError as exc:
                raise WireError(f"Ray job {job!r:.80}: answer is not JSON ({str(exc)[:100]})") from None
            if not isinstance(record, dict):
                raise WireError(f"Ray job {job!r:.80}: answer is not a JSON object")
            on_done(job, record)
            if progress is not None:
                progress()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
