"""A Flower Grid that delivers each message to a real ClientApp in this process, through
Flower's own protobuf encoding both ways (what a SuperLink would carry), so a fedcoe run on
Flower's Message API can be checked against the in-process simulator in seconds, without
starting Ray. Node ids and node configs are those the Simulation Engine gives its nodes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LoopbackGrid(Grid):
    """Nodes ``1..n`` with ``partition-id`` ``0..n-1``; ``drop(node, msg)`` may return True
    to lose a message on the way (a node that never answers)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping[str, Any],
                 drop: Callable[[int, Message], bool] | None = None) -> None:
        self.app = client_app
        # who this process is, as a ServerApp process learns it from its SuperLink
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.drop = drop
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={"partition-id": n - 1, "num-partitions": num_nodes},
                       state=RecordDict(), run_config=dict(run_config))
            for n in range(1, num_nodes + 1)}
        self.replies: dict[str, Message] = {}
        self.bytes_down = self.bytes_up = 0
        self.delivered: list[Message] = []  # every message a node received, as it received it

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def get_nodes(self) -> Iterable[Any]:
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            msg.metadata.__dict__["_created_at"] = time.time()
            wire = message_to_proto(msg).SerializeToString()
            self.bytes_down += len(wire)
            node = msg.metadata.dst_node_id
            if self.drop is not None and self.drop(node, msg):
                ids.append(msg.metadata.message_id)
                continue
            received = message_from_proto(type(message_to_proto(msg)).FromString(wire))
            self.delivered.append(received)
            try:
                reply = self.app(received, self.contexts[node])
            except Exception as exc:  # what a SuperNode turns an exception into
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received)
            back = message_to_proto(reply).SerializeToString()
            self.bytes_up += len(back)
            self.replies[msg.metadata.message_id] = message_from_proto(type(message_to_proto(reply)).FromString(back))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
