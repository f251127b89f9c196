"""Transports for the FedCoE edge protocol: one interface, in-memory and MQTT (paho) backends.

See :mod:`fedcoe_edge.transport.base` for the contract and ``docs/protocol.md`` for topics.
``MqttTransport`` is imported lazily so that the simulator does not load paho.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedcoe_edge.transport.base import Handler, Message, Transport, Will, topic_matches
from fedcoe_edge.transport.memory import MemoryBroker, MemoryTransport
from fedcoe_edge.transport.topics import TopicInfo, Topics

if TYPE_CHECKING:
    from fedcoe_edge.transport.mqtt import MqttTransport, TlsSettings

__all__ = [
    "Handler",
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "MqttTransport",
    "TlsSettings",
    "TopicInfo",
    "Topics",
    "Transport",
    "Will",
    "topic_matches",
]


def __getattr__(name: str) -> Any:
    if name in ("MqttTransport", "TlsSettings"):
        from fedcoe_edge.transport import mqtt

        return getattr(mqtt, name)
    raise AttributeError(f"module 'fedcoe_edge.transport' has no attribute {name!r}")
