"""Topic scheme of the FedCoE edge protocol (docs/design.md section 8, docs/protocol.md).

Every topic lives under ``fl/v1/{federation}``; the ``dn`` / ``up`` split lets a broker
ACL give each device write access to ``up/{dev}/#`` and read access to ``dn/{dev}/#``
only (username = client id = device id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedcoe_edge.errors import WireError

__all__ = ["Topics", "TopicInfo", "check_id"]

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_id(value: str, what: str) -> str:
    """Ids become topic levels: no ``/``, ``+``, ``#`` or empty strings."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise WireError(f"{what} {value!r:.80} must match {_ID_RE.pattern}")
    return value


@dataclass(frozen=True)
class TopicInfo:
    """What :meth:`Topics.parse` found: ``kind`` is one of ``dn_ctl``, ``dn_blob``,
    ``bc_ctl``, ``up_ctl``, ``up_blob``, ``up_hb``, ``presence``, ``coord_status``, ``shared``
    (``transfer_id``: the shared download's id)."""

    kind: str
    device: str | None = None
    transfer_id: str | None = None


@dataclass(frozen=True)
class Topics:
    """Builds and parses the topics of one federation."""

    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, "federation id")

    @property
    def prefix(self) -> str:
        return f"fl/v1/{self.federation}"

    # --- concrete topics (QoS / retain as in the design table) ---
    def dn_ctl(self, dev: str) -> str:
        """Coordinator -> device: task, accept, nack, transfer progress (QoS 1)."""
        return f"{self.prefix}/dn/{check_id(dev, 'device id')}/ctl"

    def dn_blob(self, dev: str, xfer: str) -> str:
        """Coordinator -> device: chunks of expert weights (QoS 1)."""
        return f"{self.prefix}/dn/{check_id(dev, 'device id')}/blob/{check_id(xfer, 'transfer id')}"

    def shared_chunk(self, sid: str, seq: int) -> str:
        """Coordinator -> every device of this federation: chunk ``seq`` of the shared
        download ``sid`` (QoS 1, retained, message expiry; docs/protocol.md, "Shared
        downloads"). Its own level, so no device id can name it."""
        return f"{self.prefix}/shared/{check_id(sid, 'shared download id')}/{int(seq)}"

    def shared_filter(self, sid: str) -> str:
        """Every chunk of the shared download ``sid``."""
        return f"{self.prefix}/shared/{check_id(sid, 'shared download id')}/+"

    def bc_ctl(self) -> str:
        """Broadcast: round announcement, new global version (QoS 1, retained, expiry)."""
        return f"{self.prefix}/bc/ctl"

    def up_ctl(self, dev: str) -> str:
        """Device -> coordinator: hello, result manifest, transfer progress (QoS 1)."""
        return f"{self.prefix}/up/{check_id(dev, 'device id')}/ctl"

    def up_blob(self, dev: str, xfer: str) -> str:
        """Device -> coordinator: chunks of an update (QoS 1)."""
        return f"{self.prefix}/up/{check_id(dev, 'device id')}/blob/{check_id(xfer, 'transfer id')}"

    def up_hb(self, dev: str) -> str:
        """Heartbeat and telemetry (QoS 0)."""
        return f"{self.prefix}/up/{check_id(dev, 'device id')}/hb"

    def presence(self, dev: str) -> str:
        """Online on connect, last-will offline (QoS 1, retained)."""
        return f"{self.prefix}/presence/{check_id(dev, 'device id')}"

    def coord_status(self) -> str:
        """Coordinator presence, last-will offline (QoS 1, retained)."""
        return f"{self.prefix}/coord/status"

    # --- subscription filters ---
    def device_filters(self, dev: str) -> list[str]:
        """What a device subscribes to: its own downlink, broadcasts, coordinator status."""
        return [
            f"{self.prefix}/dn/{check_id(dev, 'device id')}/#",
            f"{self.prefix}/bc/#",
            self.coord_status(),
        ]

    def coordinator_filters(self) -> list[str]:
        """What the coordinator subscribes to: every uplink and every presence."""
        return [f"{self.prefix}/up/#", f"{self.prefix}/presence/+"]

    def dn_blob_filter(self, dev: str) -> str:
        """Every blob addressed to ``dev``."""
        return f"{self.prefix}/dn/{check_id(dev, 'device id')}/blob/+"

    def up_ctl_filter(self) -> str:
        """Control messages from every device."""
        return f"{self.prefix}/up/+/ctl"

    def up_blob_filter(self) -> str:
        """Blobs from every device."""
        return f"{self.prefix}/up/+/blob/+"

    def parse(self, topic: str) -> TopicInfo:
        """Classify a received topic; :class:`WireError` if it is not part of the scheme."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise WireError(f"topic {topic!r}: not under {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if parts == ["bc", "ctl"]:
            return TopicInfo("bc_ctl")
        if parts == ["coord", "status"]:
            return TopicInfo("coord_status")
        if (len(parts) == 3 and parts[0] == "shared" and _ID_RE.match(parts[1])
                and parts[2].isdigit()):
            return TopicInfo("shared", None, parts[1])
        if len(parts) == 2 and parts[0] == "presence" and _ID_RE.match(parts[1]):
            return TopicInfo("presence", parts[1])
        if len(parts) >= 3 and parts[0] in ("dn", "up") and _ID_RE.match(parts[1]):
            d, dev, rest = parts[0], parts[1], parts[2:]
            if rest == ["ctl"]:
                return TopicInfo(f"{d}_ctl", dev)
            if d == "up" and rest == ["hb"]:
                return TopicInfo("up_hb", dev)
            if len(rest) == 2 and rest[0] == "blob" and _ID_RE.match(rest[1]):
                return TopicInfo(f"{d}_blob", dev, rest[1])
        raise WireError(f"topic {topic!r}: not a FedCoE protocol topic")
