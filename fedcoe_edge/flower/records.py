"""Tasks and results as Flower records, by state-dict name (docs/engines.md, "Flower records").

A task travels as an ArrayRecord of exactly the tensors the strategy sends that client (with
FedCoE's partial exchange: the gate, the shared expert and its own experts) and a ConfigRecord
of the rest; a result comes back the same way with its sample count and affinity. Nothing is
pickled: arrays are numpy buffers and the rest is Flower's typed scalars and lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcoe_edge.errors import ConfigError, ValidationError
from fedcoe_edge.flower import require_flwr
from fedcoe_edge.strategies.base import Arrays, ClientResult, ClientTask

require_flwr()

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

PARAMS = "fedcoe.params"  # ArrayRecord: the tensors, by state-dict name
TASK = "fedcoe.task"  # ConfigRecord: client-id, round, expert-ids
CONFIG = "fedcoe.config"  # ConfigRecord: the strategy's task config, as it gave it
RESULT = "fedcoe.result"  # ConfigRecord: client-id, round, num-samples, affinity
METRICS = "fedcoe.metrics"  # MetricRecord: the client's training metrics
SCALARS = (bool, int, float, str, bytes)


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named numpy arrays as an ArrayRecord (copies; Flower serialises them as .npy bytes)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def arrays_of(record: ArrayRecord) -> Arrays:
    return {k: v.numpy() for k, v in record.items()}


def carried(value: Any, where: str) -> Any:
    """``value`` as a ConfigRecord can hold it (a scalar or a list of one scalar type), or
    ConfigError naming ``where``: the strategy cannot be carried by Flower."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        items = [v.item() if isinstance(v, np.generic) else v for v in value]
        if all(isinstance(v, SCALARS) for v in items) and len({type(v) for v in items}) <= 1:
            return items
    raise ConfigError(f"{where} holds {type(value).__name__} {value!r:.40}, which a Flower "
                      f"ConfigRecord cannot carry (scalars or lists of one scalar type)")


def task_content(task: ClientTask, strategy_name: str) -> RecordDict:
    config = {k: carried(v, f"strategy {strategy_name!r}: task config {k!r}")
              for k, v in task.config.items()}
    return RecordDict({
        PARAMS: arrays_record(task.params),
        TASK: ConfigRecord({"client-id": task.client_id, "round": task.round,
                            "expert-ids": [int(i) for i in task.expert_ids]}),
        CONFIG: ConfigRecord(config),
    })


def task_of(content: RecordDict) -> ClientTask:
    meta = content.config_records[TASK]
    return ClientTask(str(meta["client-id"]), int(meta["round"]),  # type: ignore[arg-type]
                      arrays_of(content.array_records[PARAMS]),
                      [int(i) for i in meta["expert-ids"]],  # type: ignore[union-attr]
                      dict(content.config_records[CONFIG]))


def result_content(result: ClientResult) -> RecordDict:
    meta: dict[str, Any] = {"client-id": result.client_id, "round": result.round,
                            "num-samples": int(result.num_samples)}
    if result.affinity is not None:
        meta["affinity"] = [float(a) for a in result.affinity]
    return RecordDict({
        PARAMS: arrays_record(result.params),
        RESULT: ConfigRecord(meta),
        METRICS: MetricRecord({k: float(v) for k, v in result.metrics.items()}),
    })


def result_of(content: RecordDict, task: ClientTask) -> ClientResult:
    """The result a node sent for ``task``, checked against what was asked: its client and
    round, the tensors it was sent (their names, shapes and dtypes), a sample count. ValidationError in one line otherwise; the round counts
    the node as a failure and goes on."""
    try:
        meta = content.config_records[RESULT]
        params = arrays_of(content.array_records[PARAMS])
        metrics = dict(content.metric_records.get(METRICS, MetricRecord()))
    except (KeyError, TypeError) as exc:
        raise ValidationError(f"reply for client {task.client_id!r} lacks {exc}") from None
    if (meta.get("client-id"), meta.get("round")) != (task.client_id, task.round):
        raise ValidationError(f"reply for client {task.client_id!r} round {task.round} says client "
                              f"{meta.get('client-id')!r:.40} round {meta.get('round')!r:.20}")
    if set(params) != set(task.params):
        raise ValidationError(f"client {task.client_id!r} returned tensors other than those it was sent "
                              f"({len(params)} vs {len(task.params)})")
    for name, value in params.items():
        want = task.params[name]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValidationError(f"client {task.client_id!r}: {name} is {value.dtype}{list(value.shape)}, "
                                  f"expected {want.dtype}{list(want.shape)}")
    samples = meta.get("num-samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValidationError(f"client {task.client_id!r}: num-samples {samples!r:.20} is not a count")
    affinity = meta.get("affinity")
    return ClientResult(task.client_id, task.round, samples, params,
                        affinity=None if affinity is None else [float(a) for a in affinity],  # type: ignore[union-attr]
                        metrics={k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]
