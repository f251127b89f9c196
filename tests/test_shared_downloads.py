"""Shared downloads (docs/protocol.md, "Shared downloads"): one retained copy of each
distinct payload per federation, assembled by each device against its own signed manifest,
with the per-device transfer as the fallback; the broker ACL confines a device to its own
federation's copies."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coordinator.harness import EmbeddedFederation, small
from fedcoe_edge.errors import WireError
from fedcoe_edge.messages import SharedRef
from fedcoe_edge.protocol import BrokerSettings, mqtt_factory
from fedcoe_edge.transport import MemoryBroker, MemoryTransport, Message, Topics
from fedcoe_edge.transport.blob import BlobReceiver
from fedcoe_edge.transport.shared import (
    SharedDownload,
    clear_shared,
    publish_shared,
    shared_id,
)
from fedcoe_edge.wire import TransferManifest, encode_chunk

PAYLOAD = bytes(range(256)) * 20  # 5,120 bytes: 3 chunks of 2,048 (the last 1,024)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _manifest(xid: str = "dev-xfer-1", sha: str = SHA, size: int = len(PAYLOAD)) -> TransferManifest:
    return TransferManifest(xid, (0, 2), 4, size, 4096, -(-size // 4096), sha)


# ------------------------------------------------------------------ unit: the pieces
def test_a_payload_is_published_once_as_retained_chunks_and_cleared() -> None:
    broker = MemoryBroker()
    coord, topics = MemoryTransport(broker, "coordinator"), Topics("fa")
    coord.connect()
    ref = publish_shared(coord, topics, PAYLOAD, SHA, chunk_size=2048)
    assert ref == SharedRef(SHA[:32], 2048, 3)  # id = sha256 prefix; ceil(5120 / 2048)
    stored = [broker.retained(topics.shared_chunk(ref.id, s)) for s in range(3)]
    assert [encode_chunk(ref.id, s, 3, PAYLOAD[s * 2048:(s + 1) * 2048]) for s in range(3)] == stored
    assert topics.shared_chunk(ref.id, 2) == f"fl/v1/fa/shared/{SHA[:32]}/2"
    assert topics.parse(topics.shared_chunk(ref.id, 2)).kind == "shared"
    assert topics.parse("fl/v1/fa/dn/shared/ctl").kind == "dn_ctl"  # a device named "shared"
    clear_shared(coord, topics, ref)
    assert [broker.retained(topics.shared_chunk(ref.id, s)) for s in range(3)] == [None] * 3


def test_a_device_assembles_only_what_its_signed_manifest_names() -> None:
    ref = SharedRef(shared_id(SHA), 2048, 3)
    chunks = [encode_chunk(ref.id, s, 3, PAYLOAD[s * 2048:(s + 1) * 2048]) for s in range(3)]
    dl = SharedDownload(ref, _manifest())
    assert dl.add(chunks[2], now=1.0) is None and dl.add(chunks[2], now=2.0) is None  # duplicate
    assert dl.last == 1.0 and dl.received == 1  # a duplicate is not progress
    assert dl.add(chunks[0]) is None
    assert dl.add(chunks[1]) == PAYLOAD
    # the same chunks under a manifest naming other bytes: refused before any chunk
    other = hashlib.sha256(b"x" + PAYLOAD[1:]).hexdigest()
    with pytest.raises(WireError, match="not the payload of sha256"):
        SharedDownload(ref, _manifest(sha=other))
    # a tampered chunk (same id, flipped byte): the hash check refuses the whole payload
    bad = SharedDownload(ref, _manifest())
    bad.add(chunks[0])
    bad.add(chunks[1])
    flipped = PAYLOAD[4096:4097][0] ^ 1
    with pytest.raises(WireError, match="sha256 mismatch"):
        bad.add(encode_chunk(ref.id, 2, 3, bytes([flipped]) + PAYLOAD[4097:]))
    # a chunk of another shared payload, or one longer than the signed size allows
    with pytest.raises(WireError, match="not '"):
        SharedDownload(ref, _manifest()).add(encode_chunk("b" * 32, 0, 3, PAYLOAD[:2048]))
    with pytest.raises(WireError, match="has 2049 bytes, expected 1024"):
        SharedDownload(ref, _manifest()).add(encode_chunk(ref.id, 2, 3, PAYLOAD[:2049]))


def test_an_adopted_transfer_is_acknowledged_like_a_received_one() -> None:
    """The bytes came from the shared copy: the per-device transfer gets its final ACK (the
    coordinator's sender is done) and a re-announce is answered with that ACK again."""
    reports: list[tuple[str, dict[str, Any]]] = []
    rx = BlobReceiver(lambda t, b: reports.append((t, b)), auto_ack=True)
    m = _manifest()
    rx.adopt(m)
    assert reports == [("xfer_done", {"xfer": m.transfer_id, "sha256": SHA})]
    assert rx.completed(m.transfer_id) and not rx.is_open(m.transfer_id)
    rx.expect(m)  # the coordinator repeats the task envelope
    assert reports[-1] == ("xfer_done", {"xfer": m.transfer_id, "sha256": SHA})


def test_each_device_may_read_its_own_federation_s_shared_topics_only() -> None:
    """`fedcoe init`'s ACL: the shared-download line names the device's own federation id,
    its shard's when sharded."""
    import argparse

    from fedcoe_edge.commands.init import acl_text
    from fedcoe_edge.sharding import shard_federation, shard_of

    one = acl_text(argparse.Namespace(federation="f1", shards=1), ["d0", "d1"])
    assert "user d0\ntopic read fl/v1/+/bc/#\ntopic read fl/v1/+/coord/status\n" \
           "topic read fl/v1/f1/shared/#\n" in one
    assert "fl/v1/+/shared" not in one and "fl/v1/#/shared" not in one
    three = acl_text(argparse.Namespace(federation="f1", shards=3), ["d0", "d1", "d2"])
    for dev in ("d0", "d1", "d2"):
        home = shard_federation("f1", shard_of(dev, 3), 3)
        entry = three.split(f"user {dev}\n", 1)[1].split("\n\n", 1)[0].split("user ", 1)[0]
        assert f"topic read fl/v1/{home}/shared/#" in entry
        assert entry.count("/shared/#") == 1


# ------------------------------------------------------------------ over a real Mosquitto
def _counting(factory: Any, coordinator_id: str, seen: list[tuple[str, int, bool]]) -> Any:
    """``factory`` with the coordinator's publishes recorded as (topic, bytes, retain)."""
    lock = threading.Lock()

    def make(cid: str, will: Any, birth: Any) -> Any:
        t = factory(cid, will, birth)
        if cid == coordinator_id:
            orig = t.publish

            def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                        expiry_s: int | None = None) -> None:
                with lock:
                    seen.append((topic, len(payload), retain))
                orig(topic, payload, qos=qos, retain=retain, expiry_s=expiry_s)

            t.publish = publish
        return t

    return make


def _run(root: Path, factory: Any, devices: int) -> EmbeddedFederation:
    """One round with shared downloads switched on (``[federation] shared_downloads``)."""
    fed = EmbeddedFederation(root, factory, devices=devices, rounds=1, shared_downloads=True,
                             **small())
    fed.start()
    try:
        fed.wait_rounds(120)
    except BaseException:
        fed.stop()
        raise
    return fed


@pytest.mark.slow
def test_devices_of_one_expert_set_share_one_published_payload(
        tmp_path: Path, make_mosquitto: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.config import FederationSettings
    from coordinator.daemon import Coordinator

    shares: list[tuple[str, str]] = []  # (purpose, shared id) of every download sent
    share = Coordinator._share

    def recording(self: Coordinator, data: bytes, base: TransferManifest,
                  purpose: str) -> dict[str, Any] | None:
        shares.append((purpose, shared_id(base.sha256)))
        return share(self, data, base, purpose)

    monkeypatch.setattr(Coordinator, "_share", recording)
    broker = make_mosquitto()
    seen: list[tuple[str, int, bool]] = []
    factory = _counting(mqtt_factory(BrokerSettings(port=broker.port)),
                        FederationSettings.coordinator_id, seen)
    fed = _run(tmp_path, factory, devices=4)
    try:
        c = fed.coordinator
        assert c is not None
        sets = {tuple(t.expert_ids) for t in c.tasks.values()}
        row = c.store.round_summary(1)
        agents = list(fed.agents.values())
    finally:
        fed.stop()
    assert row["accepted"] == 4
    # every task (and every final refresh) was assembled from the shared copy ...
    assert [a.shared_downloads for a in agents] == [2, 2, 2, 2]
    assert [list(a.shared_fallbacks) for a in agents] == [[]] * 4
    # ... round 1's four tasks named one copy per expert set, fewer than the devices ...
    tasks = [sid for purpose, sid in shares if purpose == "train"]
    assert len(tasks) == 4 and len(sets) < 4  # at least two devices got the same experts
    assert len(set(tasks)) == len(sets)
    # ... each copy was published once (its first chunk one retained message), whatever the
    # number of devices sent it, and not one chunk went to a device's own blob topic
    firsts = [t.rsplit("/", 2)[1] for t, n, r in seen if "/shared/" in t and r and n
              and t.endswith("/0")]
    assert sorted(firsts) == sorted({sid for _, sid in shares})
    assert not [t for t, _, _ in seen if "/blob/" in t]
    # superseded and, at the coordinator's exit, the remaining copies were cleared (empty
    # retained messages)
    assert {t.rsplit("/", 2)[1] for t, n, r in seen if "/shared/" in t and r and not n} \
        == set(firsts)


@pytest.mark.slow
def test_a_tampered_shared_copy_is_refused_and_the_per_device_transfer_used(
        tmp_path: Path, make_mosquitto: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared copy's bytes are not the ones the signed manifests name (a forged or
    corrupted retained message): every device refuses it with the reason in its log and
    takes its per-device transfer; the round completes with every update."""
    import coordinator.daemon as daemon

    def corrupt(transport: Any, topics: Topics, data: bytes, sha256: str, chunk_size: int,
                **kw: Any) -> SharedRef:
        return publish_shared(transport, topics, bytes([data[0] ^ 1]) + data[1:], sha256,
                              chunk_size, **kw)

    monkeypatch.setattr(daemon, "publish_shared", corrupt)
    broker = make_mosquitto()
    seen: list[tuple[str, int, bool]] = []
    from coordinator.config import FederationSettings

    factory = _counting(mqtt_factory(BrokerSettings(port=broker.port)),
                        FederationSettings.coordinator_id, seen)
    fed = _run(tmp_path, factory, devices=3)
    try:
        c = fed.coordinator
        assert c is not None
        row = c.store.round_summary(1)
        agents = list(fed.agents.values())
    finally:
        fed.stop()
    assert row["accepted"] == 3
    assert [a.shared_downloads for a in agents] == [0, 0, 0]
    for a in agents:
        assert a.shared_fallbacks and all("sha256 mismatch" in r for r in a.shared_fallbacks)
    assert {t.split("/")[4] for t, _, _ in seen if "/blob/" in t} == {"0", "1", "2"}


def test_the_acl_keeps_another_federation_s_shared_copies_from_a_device(
        tmp_path: Path, make_mosquitto: Any, init_broker_tools: None) -> None:
    """`fedcoe init`'s ACL on a real Mosquitto: a device of federation fa receives fa's
    retained shared chunk and nothing of fb's, on the same subscription pass."""
    import argparse
    import subprocess

    from fedcoe_edge.commands.init import acl_text
    from fedcoe_edge.transport.mqtt import MqttTransport

    passwd = tmp_path / "passwd"
    passwd.write_text("coordinator:pw-c\nda:pw-a\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, capture_output=True)
    acl = acl_text(argparse.Namespace(federation="fa", shards=1), ["da"])
    (tmp_path / "acl").write_text(acl.replace("fl/v1/fa/#", "fl/v1/#"))  # one coordinator, two feds
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    conf = [f"listener {port} 127.0.0.1", "allow_anonymous false", f"password_file {passwd}",
            f"acl_file {tmp_path / 'acl'}", "persistence false"]
    if os.geteuid() == 0:
        conf.append("user root")
    broker = make_mosquitto(port=port, config_text="\n".join(conf) + "\n", workdir=tmp_path)

    coord = MqttTransport("coordinator", "127.0.0.1", broker.port, username="coordinator",
                          password="pw-c")
    coord.connect()
    for fed in ("fa", "fb"):
        publish_shared(coord, Topics(fed), PAYLOAD, SHA, chunk_size=8192)
    assert coord.flush(5)
    got: list[str] = []
    ev = threading.Event()

    def on(msg: Message) -> None:
        got.append(msg.topic)
        ev.set()

    dev = MqttTransport("da", "127.0.0.1", broker.port, username="da", password="pw-a")
    dev.connect()
    try:
        dev.subscribe(Topics("fb").shared_filter(shared_id(SHA)), on)
        dev.subscribe(Topics("fa").shared_filter(shared_id(SHA)), on)
        assert ev.wait(5)  # the permitted copy arrives ...
        time.sleep(0.5)  # ... and the other one had the same time to arrive
    finally:
        dev.close()
        coord.close()
    assert got == [Topics("fa").shared_chunk(shared_id(SHA), 0)]


def test_the_coordinator_publishes_once_and_clears_superseded_versions(tmp_path: Path) -> None:
    """``Coordinator._share`` / ``_clear_shared`` on a memory broker: a payload sent to many
    devices is published once; when the version moves on, the older version's copies are
    emptied, except bytes that are also a current payload (here: the trunk file's)."""
    from coordinator.daemon import Coordinator

    broker = MemoryBroker()

    def factory(cid: str, will: Any, birth: Any) -> Any:
        return broker.client(cid, will=will, birth=birth)

    fed = EmbeddedFederation(tmp_path, factory, devices=2, shared_downloads=True, **small())
    c = Coordinator(fed.coordinator_config(), factory)
    c.transport = MemoryTransport(broker, c.me)
    c.transport.connect()
    topics = c.topics
    other = PAYLOAD[::-1]
    m_old = TransferManifest.for_payload(PAYLOAD, expert_ids=[0], base_version=3)
    m_new = TransferManifest.for_payload(other, expert_ids=[0], base_version=4)
    m_trunk = TransferManifest.for_payload(PAYLOAD, expert_ids=[], base_version=0)
    published = broker.stats.published
    refs = [c._share(PAYLOAD, m_old, "train") for _ in range(5)]  # five devices, one copy
    assert refs[0] is not None and all(r == refs[0] for r in refs)
    n = refs[0]["chunk_count"]
    assert broker.stats.published - published == n
    assert c._share(PAYLOAD, m_trunk, "trunk") == refs[0]  # same bytes: same id ...
    assert broker.stats.published - published == 2 * n  # ... kept under its own entry
    c._share(other, m_new, "refresh")
    c._clear_shared(keep_version=4)  # version 3 superseded: its copy is also the trunk's
    assert broker.retained(topics.shared_chunk(shared_id(m_old.sha256), 0)) is not None
    c._clear_shared(keep_version=None)  # the coordinator leaves: everything goes
    for m in (m_old, m_new):
        assert broker.retained(topics.shared_chunk(shared_id(m.sha256), 0)) is None
    c.store.close()


@pytest.mark.slow
def test_a_missing_shared_copy_times_out_to_the_per_device_transfer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The envelope names a shared copy the broker never got (expired, cleared, refused by
    an ACL): after SHARED_IDLE_S without a chunk the agent logs why and takes its
    per-device transfer; the round completes (memory broker, idle limit shortened)."""
    import coordinator.daemon as daemon
    import device_agent.daemon as agent_daemon

    def nothing(transport: Any, topics: Topics, data: bytes, sha256: str, chunk_size: int,
                **kw: Any) -> SharedRef:
        return SharedRef(shared_id(sha256), len(data) or 1, 1)  # announced, never published

    monkeypatch.setattr(daemon, "publish_shared", nothing)
    monkeypatch.setattr(agent_daemon, "SHARED_IDLE_S", 0.5)
    broker = MemoryBroker()

    def factory(cid: str, will: Any, birth: Any) -> Any:
        return broker.client(cid, will=will, birth=birth)

    fed = _run(tmp_path, factory, devices=2)
    try:
        c = fed.coordinator
        assert c is not None
        row = c.store.round_summary(1)
        agents = list(fed.agents.values())
    finally:
        fed.stop()
    assert row["accepted"] == 2
    assert [a.shared_downloads for a in agents] == [0, 0]
    for a in agents:
        assert a.shared_fallbacks and all("no new chunk for 0.5 s, 0 of 1 received" in r
                                          for r in a.shared_fallbacks)
