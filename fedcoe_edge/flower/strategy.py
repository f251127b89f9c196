"""A Flower strategy that is any registered fedcoe strategy (docs/engines.md, "Flower").

:class:`FlowerStrategy` speaks Flower's message-based Strategy (``configure_train`` /
``aggregate_train``, run by ``Strategy.start``) and, underneath, only the fedcoe contract:
``select_clients``, ``configure_round`` and ``aggregate_round``, the calls the in-process
simulator makes in the same order. It never looks at the concrete strategy type, so FedCoE's
partial exchange (each node gets and returns only its experts) is simply what FedCoE's
``configure_round`` asks for.

Flower addresses nodes; fedcoe addresses clients. Before the first round every node is asked
(a ``query`` message) which client it is; the ClientApp answers from its node config.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from fedcoe_edge.errors import ConfigError, FedCoEError
from fedcoe_edge.flower import require_flwr
from fedcoe_edge.flower.records import arrays_record, result_of, task_content
from fedcoe_edge.strategies.base import ClientResult, ClientTask, Failure, Strategy

require_flwr()

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy as FlwrStrategy  # noqa: E402

log = logging.getLogger(__name__)

WHO = "fedcoe.who"  # ConfigRecord of a query reply: the node's client id
OnRound = Callable[[int, Strategy], None]


class FlowerStrategy(FlwrStrategy):
    """Flower's side of a fedcoe strategy: nodes <-> clients, messages <-> tasks and results.

    ``clients`` are the client ids the run expects (every one must have a node before round
    1, as every simulated client exists before round 1); ``on_round`` is called after each
    aggregation with the round and the fedcoe strategy (what a test or a report reads).
    """

    def __init__(self, strategy: Strategy, clients: Iterable[str], *, node_timeout: float = 300.0,
                 on_round: OnRound | None = None) -> None:
        self.strategy = strategy
        self.clients = sorted(clients)
        self.node_timeout = node_timeout
        self.on_round = on_round
        self.node_of: dict[str, int] = {}
        self.left_out: dict[int, str] = {}  # node -> why it is not a client (one line each)
        self.sent: dict[str, ClientTask] = {}
        self.history: list[dict[str, float]] = []

    # --- which node is which client ------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Ask every new node for its client id until each expected client has a node. A node
        that errs, names no client of this run or one another node already holds is left out
        (logged; a hostile or misconfigured node cannot stop the run); when ``node_timeout``
        passes with a client still missing, ConfigError in one line names the missing clients
        and the nodes left out."""
        deadline = time.monotonic() + self.node_timeout
        asked: set[int] = set()
        while len(self.node_of) < len(self.clients):
            new = [n for n in grid.get_node_ids() if n not in asked]
            asked.update(new)
            queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(queries, timeout=max(deadline - time.monotonic(), 1.0)):
                self._register(reply)
            if len(self.node_of) < len(self.clients):
                if time.monotonic() > deadline:
                    missing = sorted(set(self.clients) - set(self.node_of))
                    left = "; ".join(f"SuperNode {n}: {why}" for n, why in list(self.left_out.items())[:4])
                    raise ConfigError(f"no SuperNode answered for client(s) {', '.join(missing[:8])} "
                                      f"within node-timeout {self.node_timeout:g} s "
                                      f"({len(self.node_of)} of {len(self.clients)} connected"
                                      f"{'; left out: ' + left if left else ''})")
                time.sleep(0.2)

    def _register(self, reply: Message) -> None:
        node = reply.metadata.src_node_id
        why = self._refusal(reply)
        if why is not None:
            log.warning("SuperNode %d left out: %s", node, why)
            self.left_out[node] = why
            return
        self.node_of[str(reply.content.config_records[WHO]["client-id"])] = node

    def _refusal(self, reply: Message) -> str | None:
        """Why a query reply does not make its node a client of this run, or None."""
        if reply.has_error():
            return f"refused to join: {(reply.error.reason or '')[:200]}"
        try:
            cid = str(reply.content.config_records[WHO]["client-id"])
        except KeyError:
            return "its reply names no client"
        if cid not in self.clients:
            return f"says it is client {cid!r:.40}, not one of the {len(self.clients)} clients of this run"
        if cid in self.node_of and self.node_of[cid] != reply.metadata.src_node_id:
            return f"says it is client {cid!r}, which SuperNode {self.node_of[cid]} already is"
        return None

    # --- training: the simulator's round, over messages ---------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """``arrays`` is Flower's copy of the global state; the fedcoe strategy holds the
        authoritative one and decides what each client gets."""
        self.discover(grid)
        selected = self.strategy.select_clients(server_round, list(self.node_of))
        tasks = self.strategy.configure_round(server_round, selected)
        self.sent = {t.client_id: t for t in tasks}
        return [Message(task_content(t, self.strategy.name), dst_node_id=self.node_of[t.client_id],
                        message_type=MessageType.TRAIN, group_id=str(server_round)) for t in tasks]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply, call the strategy's own batch aggregation with the
        results and failures (a node that errs, sends a malformed result or no reply in time is
        a failure, as in the simulator and the coordinator), and hand Flower the new state."""
        client_of = {n: c for c, n in self.node_of.items()}
        results: list[ClientResult] = []
        failures: list[Failure] = []
        for reply in replies:
            cid = client_of.get(reply.metadata.src_node_id)
            if cid is None or cid not in self.sent:
                continue
            task = self.sent.pop(cid)
            if reply.has_error():
                failures.append(Failure(cid, server_round, f"error: {reply.error.reason}"))
                continue
            try:
                results.append(result_of(reply.content, task))
            except FedCoEError as exc:
                log.warning("round %d: %s", server_round, exc)
                failures.append(Failure(cid, server_round, f"rejected: {exc}"))
        failures += [Failure(cid, server_round, "no reply") for cid in sorted(self.sent)]
        self.sent = {}
        state = self.strategy.aggregate_round(server_round, results, failures)
        metrics = self._round_metrics(server_round, results, failures)
        if self.on_round is not None:
            self.on_round(server_round, self.strategy)
        return arrays_record(state), MetricRecord(metrics)

    def _round_metrics(self, rnd: int, results: list[ClientResult],
                       failures: list[Failure]) -> dict[str, Any]:
        losses = [(r.metrics.get("train_loss", float("nan")), r.num_samples) for r in results]
        finite = [(v, n) for v, n in losses if np.isfinite(v)]
        loss = (float(np.average([v for v, _ in finite], weights=[max(n, 1) for _, n in finite]))
                if finite else float("nan"))
        point = {"round": rnd, "clients": len(results), "failures": len(failures), "train_loss": loss}
        self.history.append(dict(point))
        return point

    # --- evaluation happens on the server (ServerApp's evaluate_fn) ----------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("fedcoe strategy %r (%s), %d clients", self.strategy.name,
                 type(self.strategy).__name__, len(self.clients))
