"""The ServerApp and ClientApp of FedCoE on Flower (docs/engines.md, "Flower").

Both sides read one run config (:mod:`fedcoe_edge.flower.config`) and build the same
federation from it (the partition is a pure function of dataset, partition, clients and seed),
so a node needs only its ``partition-id``: node config ``partition-id=3`` is client ``"3"`` of
the federation ``fedcoe simulate`` would build. The client trains with the strategy's own
``client_update``, the code the simulator and the device agent call; its private state (local
experts, local gate) stays on the node, in the Flower context's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.data import Federation, make_federation
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.flower import require_flwr
from fedcoe_edge.flower.config import FlowerRun, flower_run
from fedcoe_edge.flower.records import (
    arrays_of,
    arrays_record,
    result_content,
    task_content,
    task_of,
)
from fedcoe_edge.flower.strategy import WHO, FlowerStrategy, OnRound
from fedcoe_edge.simulation import eval_view, fit_model_to_data
from fedcoe_edge.strategies import Strategy, make_strategy
from fedcoe_edge.strategies.base import Arrays
from fedcoe_edge.training import accuracy

require_flwr()

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Result  # noqa: E402

log = logging.getLogger(__name__)

LOCAL = "fedcoe.local"  # the node's private state, in its Flower context (never sent)
RESULTS_FILE = "flower_results.json"
STATE_FILE = "global_state.safetensors"


def federation_of(run: FlowerRun) -> Federation:
    """The federation of ``run``, built as ``fedcoe simulate`` builds it; the model config is
    fitted to its data on ``run.sim`` (input shape, classes), as the simulator does."""
    s = run.sim
    fed = make_federation(s.dataset, s.partition, s.clients, s.new_clients, run.seed, s.alpha,
                          s.min_samples, data_fraction=s.data_fraction, data_dir=s.data_dir,
                          image_shape=s.image_shape)
    s.model = fit_model_to_data(s.model, fed)
    return fed


def build_strategy(run: FlowerRun) -> Strategy:
    return make_strategy(run.algorithm, run.sim.model, run.sim.train, run.seed)


def check_carried(run: FlowerRun, clients: list[str]) -> None:
    """Before any message: a throwaway strategy's first task must fit Flower's records
    (ConfigError in one line if not), so a strategy Flower cannot carry starts nothing."""
    probe = build_strategy(run)
    probe.initialize()
    for task in probe.configure_round(1, clients[:1]):
        task_content(task, run.algorithm)


def state_digest(state: Mapping[str, np.ndarray]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        v = np.ascontiguousarray(state[name])
        h.update(f"{name}|{v.dtype.str}|{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


# --- server --------------------------------------------------------------------------------
def run_server(grid: Grid, context: Context, on_round: OnRound | None = None) -> Result:
    """The ServerApp's main: parse the run config, build the federation, check the strategy
    can be carried, then run the rounds with Flower's ``Strategy.start`` and the global model
    scored on the server after each one (the simulator's ``global_acc``)."""
    run = flower_run(context.run_config)
    fed = federation_of(run)
    clients = sorted(fed.clients)
    check_carried(run, clients)
    strategy = build_strategy(run)
    strategy.initialize()
    view = eval_view(fed, run.sim.split)
    digests: dict[int, str] = {}

    def record(rnd: int, s: Strategy) -> None:
        digests[rnd] = state_digest(s.global_state)
        if on_round is not None:
            on_round(rnd, s)

    flower = FlowerStrategy(strategy, clients, node_timeout=run.node_timeout, on_round=record)

    def evaluate(rnd: int, _arrays: Any) -> MetricRecord:
        return MetricRecord({"global_acc": accuracy(strategy.predict_global(view.x_global_test),
                                                    view.y_global_test)})

    result = flower.start(grid, arrays_record(strategy.global_state), num_rounds=run.sim.rounds,
                          timeout=run.round_timeout, evaluate_fn=evaluate)
    if run.out_dir:
        write_results(Path(run.out_dir), run, flower, result, digests)
    return result


def write_results(out: Path, run: FlowerRun, flower: FlowerStrategy, result: Result,
                  digests: Mapping[int, str]) -> None:
    """flower_results.json (atomically): the config, and per round the clients heard, the
    failures, the mean training loss, the server's global accuracy and the state's digest;
    global_state.safetensors: the last global state, as ``fedcoe simulate`` checkpoints it."""
    from fedcoe_edge.checkpoint import save_arrays
    from fedcoe_edge.io import atomic_write_text

    evals = result.evaluate_metrics_serverapp
    rounds = [{**point, "global_acc": float(evals[int(point["round"])]["global_acc"]),  # type: ignore[arg-type]
               "state_sha256": digests.get(int(point["round"]), "")} for point in flower.history]
    doc = {"engine": "flower", "algorithm": run.algorithm, "seed": run.seed,
           "config": run.sim.to_dict(), "rounds": rounds}
    out.mkdir(parents=True, exist_ok=True)
    save_arrays(out / STATE_FILE, flower.strategy.global_state)
    atomic_write_text(out / RESULTS_FILE, json.dumps(doc, indent=2) + "\n")
    log.info("wrote %s", out / RESULTS_FILE)


def server_app(on_round: OnRound | None = None) -> ServerApp:
    """A ServerApp running :func:`run_server` (``on_round``: see :class:`FlowerStrategy`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, context, on_round)

    return app


# --- client --------------------------------------------------------------------------------
_CLIENT_CACHE: dict[str, tuple[Federation, Strategy]] = {}


def client_side(run_config: Mapping[str, Any]) -> tuple[Federation, Strategy]:
    """The federation and a client-side strategy for a run config, built once per process
    (a Ray actor or a SuperNode's ClientApp process serves many rounds and, in simulation,
    many nodes; ``client_update`` loads everything it reads from the task and the local state)."""
    key = json.dumps(dict(run_config), sort_keys=True, default=str)
    if key not in _CLIENT_CACHE:
        run = flower_run(run_config)
        fed = federation_of(run)
        _CLIENT_CACHE.clear()  # one run at a time per process: bounded
        _CLIENT_CACHE[key] = (fed, build_strategy(run))
    return _CLIENT_CACHE[key]


def client_id_of(context: Context, fed: Federation) -> str:
    """The node's client: node config ``partition-id`` (Flower's simulation sets it, a
    SuperNode gets ``--node-config "partition-id=N num-partitions=M"``), ConfigError if it is
    missing or outside the federation."""
    pid = context.node_config.get("partition-id")
    parts = context.node_config.get("num-partitions", len(fed.clients))
    if isinstance(pid, bool) or not isinstance(pid, int) or str(pid) not in fed.clients:
        raise ConfigError(f"node config partition-id {pid!r:.20} is not a client of this run "
                          f"(0..{len(fed.clients) - 1})")
    if parts != len(fed.clients):
        raise ConfigError(f"node config num-partitions {parts!r:.20} differs from the run's "
                          f"clients {len(fed.clients)}")
    return str(pid)


def _query(msg: Message, context: Context) -> Message:
    fed, _ = client_side(context.run_config)
    return Message(RecordDict({WHO: ConfigRecord({"client-id": client_id_of(context, fed)})}),
                   reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    fed, strategy = client_side(context.run_config)
    cid = client_id_of(context, fed)
    task = task_of(msg.content)
    if task.client_id != cid:
        raise ConfigError(f"task for client {task.client_id!r:.40} reached the node of client {cid!r}")
    local: Arrays | None = (arrays_of(context.state.array_records[LOCAL])
                            if LOCAL in context.state.array_records else None)
    result, local = strategy.client_update(task, local, fed.clients[cid])
    if local is not None:
        context.state.array_records[LOCAL] = arrays_record(local)
    return Message(result_content(result), reply_to=msg)


def client_app() -> ClientApp:
    """A ClientApp that answers the server's ``query`` with its client id and trains on
    ``train`` messages with the strategy's ``client_update``."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    return app


__all__ = ["client_app", "run_server", "server_app"]
