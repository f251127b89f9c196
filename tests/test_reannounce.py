"""An upload announced again with another manifest (docs/protocol.md, "6. Idempotency";
docs/daemons.md, "Reconnects"): after a coordinator restart
a device re-sends the same update (same bytes, so the same transfer id) under the version
of the newer welcome while its earlier announce is still open. The coordinator restarts
that transfer from the newest manifest and accepts the update in the same round, instead
of refusing every re-announce until the deadline ("announced again with a different
manifest")."""

from __future__ import annotations

import hashlib
from pathlib import Path

from coordinator.harness import EmbeddedFederation, small
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge import protocol as P
from fedcoe_edge.transport import MemoryBroker, Transport, Will
from fedcoe_edge.wire import (
    TransferManifest,
    compress_delta,
    compressed_delta_metadata,
    encode_tensors,
)


def stale_announce(agent: DeviceAgent, rnd: int) -> bool:
    """Announce this round's update with the manifest an older welcome would have given it
    (another base version), then let the agent upload as usual: the same transfer id,
    announced twice with different manifests."""
    assert agent.last_result is not None and agent.last_result[0] == rnd
    _, result, base = agent.last_result
    params = {k: v for k, v in result.params.items() if k in base}
    data = encode_tensors(compress_delta(params, base), compressed_delta_metadata())
    digest = hashlib.sha256(f"{agent.dev}\0{rnd}\0".encode() + data).hexdigest()
    experts = sorted({int(n.split(".")[2]) for n in params if n.startswith("global.experts.")})
    old = TransferManifest.for_payload(
        data, expert_ids=experts, base_version=int(agent.welcome.get("version", 0)) + 7,
        chunk_size=agent.cfg.device.chunk_size, transfer_id=f"r{rnd}-{digest[:32]}",
        encoding=P.ENCODING_DELTA)
    agent._send(P.RESULT, {"manifest": old.to_dict(), "num_samples": result.num_samples,
                           "affinity": result.affinity, "metrics": result.metrics}, rnd)
    return True


def test_same_upload_announced_with_a_newer_manifest_is_accepted(tmp_path: Path) -> None:
    broker = MemoryBroker()

    def factory(cid: str, will: Will | None, birth: Will | None) -> Transport:
        return broker.client(cid, will=will, birth=birth)

    fed = EmbeddedFederation(tmp_path, factory, devices=2, rounds=1, quorum=2, deadline_s=60.0,
                             hooks={"0": AgentHooks(before_upload=stale_announce)}, **small())
    fed.start()
    try:
        coord = fed.coordinator
        assert coord is not None
        fed.wait(lambda: coord.finished, 90, "round 1")
        accepted = sorted(u["device"] for u in coord.store.updates(1))
        refused = [e["reason"] for e in coord.store.events(1, "rejected")]
        wall = coord.store.round_summary(1)["wall_s"]
    finally:
        fed.stop()
    assert accepted == ["0", "1"], refused
    assert not any("different manifest" in r for r in refused), refused
    assert wall is not None and wall < 60.0  # closed by the updates, not by the deadline
