"""onnxruntime CPU sessions with explicit threading, importing nothing but onnxruntime.

Kept apart from :mod:`benchmarks.onnx_utils` (which pulls in onnx and the quantizer) so that
the fresh-process memory probe (:mod:`benchmarks.memory`) measures the runtime alone.

Threading trap: on a shared or oversubscribed machine, intra-op threads that
spin while waiting for work steal the cores that do the work, so 2 threads can be slower
than 1; ``spinning=False`` turns ``session.intra_op.allow_spinning`` off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import onnxruntime as ort

from fedcoe_edge.errors import ConfigError

__all__ = ["OPTIMIZATION_LEVELS", "make_session", "session_runner"]

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def make_session(
    model: str | os.PathLike[str] | bytes,
    threads: int = 1,
    *,
    spinning: bool | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
) -> ort.InferenceSession:
    """A session with ``threads`` intra-op threads and sequential execution.

    ``spinning=None`` keeps onnxruntime's default (spin when ``threads > 1``).
    ``optimization`` is one of ``disable``, ``basic``, ``extended``, ``all``.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(
            f"make_session: optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, "
            f"got {optimization!r}"
        )
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ConfigError(f"make_session: threads must be a positive int, got {threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if spinning is not None:
        flag = "1" if spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", flag)
        so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, so, providers=providers or ["CPUExecutionProvider"])


def session_runner(session: ort.InferenceSession, inputs: dict[str, Any]) -> Callable[[], Any]:
    """A zero-argument callable running one inference on fixed inputs (what timers call)."""
    names = [o.name for o in session.get_outputs()]

    def run() -> Any:
        return session.run(names, inputs)

    return run
