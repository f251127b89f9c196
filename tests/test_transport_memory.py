"""In-memory broker/transport: MQTT matching, retained, wills, sessions, chunked transfers."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

from fedcoe_edge.errors import ConfigError, WireError
from fedcoe_edge.transport import MemoryBroker, Message, Topics, Will, topic_matches
from fedcoe_edge.transport.base import Dispatcher, check_filter, publish_packet_size
from fedcoe_edge.transport.blob import XFER_DONE, BlobReceiver, BlobSender, fit_chunk_size
from fedcoe_edge.wire import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    Envelope,
    ReplayCache,
    TransferManifest,
    TransferWindow,
    decode_envelope,
    decode_tensors,
    encode_envelope,
    encode_tensors,
)


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+/c", "a//c", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/c", False),
        ("a/b/c", "a/b", False),
        ("+", "a", True),
    ],
)
def test_topic_matching(flt: str, topic: str, ok: bool) -> None:
    assert topic_matches(flt, topic) is ok


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a+/b", ""])
def test_bad_filters_rejected(bad: str) -> None:
    with pytest.raises(WireError, match="topic filter"):
        check_filter(bad)


def test_topics_build_and_parse() -> None:
    t = Topics("fed1")
    assert t.dn_blob("pi-3", "x9") == "fl/v1/fed1/dn/pi-3/blob/x9"
    assert t.up_hb("pi-3") == "fl/v1/fed1/up/pi-3/hb"
    cases = {
        t.dn_ctl("d"): ("dn_ctl", "d", None),
        t.dn_blob("d", "x"): ("dn_blob", "d", "x"),
        t.up_ctl("d"): ("up_ctl", "d", None),
        t.up_blob("d", "x"): ("up_blob", "d", "x"),
        t.up_hb("d"): ("up_hb", "d", None),
        t.presence("d"): ("presence", "d", None),
        t.bc_ctl(): ("bc_ctl", None, None),
        t.coord_status(): ("coord_status", None, None),
    }
    for topic, (kind, dev, xfer) in cases.items():
        info = t.parse(topic)
        assert (info.kind, info.device, info.transfer_id) == (kind, dev, xfer)
        assert any(topic_matches(f, topic) for f in t.coordinator_filters() + t.device_filters("d"))
    assert not any(topic_matches(f, t.dn_ctl("other")) for f in t.device_filters("d"))
    assert topic_matches(t.dn_blob_filter("d"), t.dn_blob("d", "x"))
    assert topic_matches(t.up_blob_filter(), t.up_blob("e", "x"))
    assert topic_matches(t.up_ctl_filter(), t.up_ctl("e"))
    assert not topic_matches(t.up_ctl_filter(), t.up_hb("e"))
    with pytest.raises(WireError, match="device id 'a/b'"):
        t.dn_ctl("a/b")
    with pytest.raises(WireError, match="device id '\\+'"):
        t.presence("+")
    with pytest.raises(WireError, match="not a FedCoE protocol topic"):
        t.parse("fl/v1/fed1/dn/d/other")
    with pytest.raises(WireError, match="not under"):
        t.parse("fl/v1/fed2/bc/ctl")


def test_publish_subscribe_runs_handlers_on_worker_thread() -> None:
    broker = MemoryBroker()
    a, b = broker.client("a"), broker.client("b")
    a.connect()
    b.connect()
    seen_threads: list[bool] = []
    reply = threading.Event()

    def on_ping(m: Message) -> None:
        seen_threads.append(b.is_handler_thread())
        b.publish("t/pong", m.payload + b"!", qos=1)  # publishing from a handler is fine

    b.subscribe("t/ping", on_ping)
    a.subscribe("t/+", lambda m: reply.set() if m.topic == "t/pong" else None)
    a.publish("t/ping", b"hi")
    assert reply.wait(5)
    assert seen_threads == [True] and not a.is_handler_thread()
    a.close()
    b.close()


def test_handler_exception_does_not_stop_delivery() -> None:
    broker = MemoryBroker(threaded=False)
    c = broker.client("c")
    c.connect()
    got: list[bytes] = []

    def flaky(m: Message) -> None:
        if m.payload == b"boom":
            raise ValueError("bad message")
        got.append(m.payload)

    c.subscribe("x", flaky)
    for p in (b"1", b"boom", b"2"):
        c.publish("x", p)
    broker.pump()
    assert got == [b"1", b"2"]


def test_retained_messages_and_expiry() -> None:
    now = [0.0]
    broker = MemoryBroker(threaded=False, clock=lambda: now[0])
    pub = broker.client("pub")
    pub.connect()
    pub.publish("fl/bc", b"round 3", retain=True, expiry_s=10)
    pub.publish("fl/status", b"online", retain=True)
    got: list[Message] = []
    sub = broker.client("sub")
    sub.connect()
    sub.subscribe("fl/#", got.append)
    broker.pump()
    assert sorted((m.topic, m.payload, m.retain) for m in got) == [
        ("fl/bc", b"round 3", True),
        ("fl/status", b"online", True),
    ]
    now[0] = 11.0
    assert broker.retained("fl/bc") is None  # expired
    pub.publish("fl/status", b"", retain=True)  # empty payload clears
    assert broker.retained("fl/status") is None
    late: list[Message] = []
    sub2 = broker.client("sub2")
    sub2.connect()
    sub2.subscribe("fl/#", late.append)
    broker.pump()
    assert late == []


def test_will_on_kill_not_on_close_and_birth_on_connect() -> None:
    broker = MemoryBroker(threaded=False)
    watcher = broker.client("coord")
    watcher.connect()
    got: list[tuple[str, bytes]] = []
    watcher.subscribe("p/+", lambda m: got.append((m.topic, m.payload)))
    mk = lambda cid: broker.client(  # noqa: E731
        cid,
        will=Will(f"p/{cid}", b"offline"),
        birth=Will(f"p/{cid}", b"online"),
    )
    d1, d2 = mk("d1"), mk("d2")
    d1.connect()
    d2.connect()
    broker.pump()
    d1.kill()
    d2.close()
    broker.pump()
    assert got == [
        ("p/d1", b"online"),
        ("p/d2", b"online"),
        ("p/d1", b"offline"),
    ]
    assert broker.retained("p/d1") == b"offline" and broker.retained("p/d2") == b"online"


def test_persistent_session_queues_qos1_and_drops_beyond_limit() -> None:
    broker = MemoryBroker(threaded=False, max_queued=3)
    dev = broker.client("dev")
    got: list[bytes] = []
    dev.subscribe("dn/dev/#", lambda m: got.append(m.payload))
    dev.connect()
    coord = broker.client("coord")
    coord.connect()
    dev.kill()
    for i in range(5):
        coord.publish("dn/dev/ctl", f"q1-{i}".encode(), qos=1)
    coord.publish("dn/dev/ctl", b"q0", qos=0)
    dev.connect()
    broker.pump()
    assert got == [b"q1-0", b"q1-1", b"q1-2"]
    assert broker.stats.dropped == 2
    # clean_start throws the session away: nothing queued for a fresh one.
    dev.kill()
    coord.publish("dn/dev/ctl", b"lost", qos=1)
    fresh = broker.client("dev", clean_start=True)
    fresh.subscribe("dn/dev/#", lambda m: got.append(m.payload))
    fresh.connect()
    broker.pump()
    assert got[-1] == b"q1-2"


def test_offline_qos1_publish_waits_for_connect() -> None:
    broker = MemoryBroker(threaded=False)
    sub = broker.client("sub")
    got: list[bytes] = []
    sub.subscribe("t", lambda m: got.append(m.payload))
    sub.connect()
    pub = broker.client("pub")
    pub.publish("t", b"queued", qos=1)
    pub.publish("t", b"lost", qos=0)
    broker.pump()
    assert got == []
    pub.connect()
    broker.pump()
    assert got == [b"queued"]


def test_oversize_publish_refused_locally() -> None:
    broker = MemoryBroker(max_packet_size=10_000)
    c = broker.client("c")
    c.connect()
    room = c.max_payload("a/b")
    assert publish_packet_size("a/b", room, 1, expiry=True) == 10_000
    c.publish("a/b", b"x" * room, expiry_s=5)
    with pytest.raises(WireError, match="'a/b'.*exceeds the broker's maximum packet size 10000"):
        c.publish("a/b", b"x" * (room + 100))
    with pytest.raises(WireError, match="wildcards"):
        c.publish("a/+", b"x")
    c.close()


def _model_bytes(n_experts: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    t = {
        f"experts.{i}.w": rng.standard_normal((128, 256)).astype(np.float32)
        for i in range(n_experts)
    }
    t["gate.w"] = rng.standard_normal((64, n_experts)).astype(np.float32)
    return encode_tensors(t)


def test_chunked_transfer_over_lossy_broker_with_signed_reports() -> None:
    """Coordinator -> device transfer; the broker drops 20% of chunks and duplicates 10%,
    reports travel as signed envelopes, the clock is simulated (no sleeps)."""
    now = [0.0]
    rng = random.Random(3)
    broker = MemoryBroker(threaded=False, max_packet_size=40_000, clock=lambda: now[0])

    def fault(client_id: str, m: Message) -> int:
        if "/blob/" not in m.topic:
            return 1
        r = rng.random()
        return 0 if r < 0.2 else (2 if r < 0.3 else 1)

    broker.fault = fault
    topics, keys = Topics("fed"), {"coord": b"c" * 32, "dev1": b"d" * 32}
    coord, dev = broker.client("coord"), broker.client("dev1")
    coord.connect()
    dev.connect()
    data = _model_bytes(4)
    xid = "x1"
    blob_topic = topics.dn_blob("dev1", xid)
    cs = fit_chunk_size(coord, blob_topic, xid)
    assert cs < 40_000
    manifest = TransferManifest.for_payload(
        data, expert_ids=[0, 2], base_version=5, chunk_size=cs, transfer_id=xid
    )
    sender = BlobSender(
        coord, blob_topic, manifest, data, window=4, retransmit_s=1.0, clock=lambda: now[0]
    )

    def dev_report(kind: str, body: dict) -> None:
        env = Envelope.new(kind, federation="fed", sender="dev1", recipient="coord", body=body)
        dev.publish(topics.up_ctl("dev1"), encode_envelope(env, keys["dev1"]))

    received: list[bytes] = []
    receiver = BlobReceiver(dev_report, ack_every=2, auto_ack=True)
    dev.subscribe(
        topics.dn_blob_filter("dev1"), lambda m: _keep(receiver.on_chunk(m.payload), received)
    )
    cache = ReplayCache()

    def on_up(m: Message) -> None:
        env = decode_envelope(m.payload, keys.get, replay_cache=cache)
        (sender.on_done if env.type == XFER_DONE else sender.on_progress)(env.body)

    coord.subscribe(topics.up_ctl_filter(), on_up)
    receiver.expect(TransferManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))))
    steps = 0
    while not sender.done and steps < 2000:
        sender.pump()
        broker.pump()
        now[0] += 0.25
        steps += 1
    assert sender.done and len(received) == 1
    assert received[0] == data
    assert decode_tensors(received[0])["gate.w"].shape == (64, 4)
    assert sender.resends > 0 and sender.chunks_published > manifest.chunk_count
    # A late duplicate after completion re-sends the final ACK instead of failing.
    before = broker.stats.published
    broker.fault = None
    coord.publish(blob_topic, sender._win.chunk(0))
    broker.pump()
    assert broker.stats.published == before + 2  # the chunk and a repeated xfer_done


def _keep(result: tuple[TransferManifest, bytes] | None, out: list[bytes]) -> None:
    if result is not None:
        out.append(result[1])


def test_blob_receiver_rejects_unknown_transfer() -> None:
    reports: list[str] = []
    r = BlobReceiver(lambda k, b: reports.append(k))
    from fedcoe_edge.wire import encode_chunk

    with pytest.raises(WireError, match="chunk for unknown transfer 'nope'"):
        r.on_chunk(encode_chunk("nope", 0, 1, b"x"))
    with pytest.raises(WireError, match="bad magic"):
        r.on_chunk(b"garbage!")
    assert reports == []


def test_blob_receiver_acks_only_after_caller_persisted() -> None:
    from fedcoe_edge.wire import encode_chunk, split_chunks

    reports: list[tuple[str, dict]] = []
    r = BlobReceiver(lambda k, b: reports.append((k, b)), ack_every=100)
    data = bytes(range(256)) * 40
    m = TransferManifest.for_payload(data, expert_ids=[1], base_version=2, chunk_size=4096)
    r.expect(m)
    frames = [
        encode_chunk(m.transfer_id, i, m.chunk_count, c)
        for i, c in enumerate(split_chunks(data, 4096))
    ]
    assert r.on_chunk(frames[0]) is None and r.on_chunk(frames[1]) is None
    done = r.on_chunk(frames[2])
    assert done is not None and done[1] == data and done[0] == m
    assert all(k != XFER_DONE for k, _ in reports)  # nothing acknowledged yet
    assert r.on_chunk(frames[1]) is None  # duplicate while the ACK is pending: ignored
    assert all(k != XFER_DONE for k, _ in reports)
    r.ack(m.transfer_id)
    assert reports[-1] == (XFER_DONE, {"xfer": m.transfer_id, "sha256": m.sha256})
    r.on_chunk(frames[0])  # late duplicate: the sender missed the ACK, send it again
    assert reports[-1][0] == XFER_DONE and len([k for k, _ in reports if k == XFER_DONE]) == 2
    with pytest.raises(WireError, match="has not completed here"):
        r.ack("other")


def test_bulk_lane_waits_while_control_messages_are_queued() -> None:
    """Chunks queued before a control message are handled after it; order within each
    lane is kept; stop() still handles everything queued before it."""
    seen: list[str] = []
    d = Dispatcher("lanes", threaded=False)
    d.add("blob/#", lambda m: seen.append(m.topic), bulk=True)
    d.add("ctl/#", lambda m: seen.append(m.topic))
    for i in range(3):
        d.put(Message(f"blob/{i}", b""))
    d.put(Message("ctl/a", b""))
    d.put(Message("blob/3", b""))
    d.put(Message("ctl/b", b""))
    assert d.drain() == 6
    assert seen == ["ctl/a", "ctl/b", "blob/0", "blob/1", "blob/2", "blob/3"]

    seen.clear()
    gate = threading.Event()
    t = Dispatcher("lanes-threaded")
    def slow(m: Message) -> None:
        gate.wait(5)
        seen.append(m.topic)

    t.add("blob/#", slow, bulk=True)
    t.add("ctl/#", lambda m: seen.append(m.topic))
    t.put(Message("blob/0", b""))  # the worker blocks in this handler ...
    time.sleep(0.05)
    t.put(Message("blob/1", b""))
    t.put(Message("ctl/x", b""))  # ... and takes this one before blob/1
    gate.set()
    t.stop()
    assert seen == ["blob/0", "ctl/x", "blob/1"]


def test_blob_sender_publishes_only_what_the_shared_budget_allows() -> None:
    """Many senders share one budget (a coordinator's outgoing backlog bound): nothing is
    published while it is spent, and the held-back chunks go out on later pumps."""
    broker = MemoryBroker(threaded=False)
    coord = broker.client("coord")
    coord.connect()
    data = _model_bytes(3)
    allowance = [0]
    senders: list[BlobSender] = []

    def budget() -> int:  # like the coordinator's: the bound minus what is still queued
        return allowance[0] - sum(s.chunks_published for s in senders)

    for i in range(3):
        m = TransferManifest.for_payload(data, expert_ids=[0], base_version=1,
                                         chunk_size=4096, transfer_id=f"x{i}")
        senders.append(BlobSender(coord, f"t/{i}", m, data, window=4, budget=budget))
    assert [s.pump() for s in senders] == [0, 0, 0]
    allowance[0] = 5
    assert [s.pump() for s in senders] == [4, 1, 0]  # windows of 4, five chunks in all
    allowance[0] = 12
    assert [s.pump() for s in senders] == [0, 3, 4]  # the first one's window is full


# --- small windows --------------------------------------------------------------------
TICK_S = 0.05  # a daemon's poll interval; also the one-way delay of a report here


def _transfer_seconds(window: int, chunks: int = 196, limit_s: float = 600.0) -> tuple[float, int]:
    """Simulated seconds for one transfer of ``chunks`` 1 KiB chunks at ``window``, over the
    deterministic memory broker with a clock that advances one tick per step: chunks are
    delivered within a step, the receiver's reports in the next one (a round trip of one
    tick), and the sender pumps every step, as a daemon's timer does. Returns the seconds
    (``limit_s`` when it did not finish) and the chunks resent."""
    now = [0.0]
    broker = MemoryBroker(threaded=False)
    a, b = broker.client("a"), broker.client("b")
    a.connect()
    b.connect()
    data = np.random.default_rng(window).bytes(chunks * 1024)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                     transfer_id="x", window=window)
    sender = BlobSender(a, "t/x", m, data, window=window, retransmit_s=2.0, clock=lambda: now[0])
    pending: list[tuple[str, dict]] = []
    receiver = BlobReceiver(lambda kind, body: pending.append((kind, body)), auto_ack=True)
    receiver.expect(TransferManifest.from_dict(json.loads(json.dumps(m.to_dict()))))
    b.subscribe("t/#", lambda msg: _keep(receiver.on_chunk(msg.payload), []))
    while not sender.done and now[0] < limit_s:
        reports, pending[:] = list(pending), []
        for kind, body in reports:
            (sender.on_done if kind == XFER_DONE else sender.on_progress)(body)
        sender.pump()
        broker.pump()
        now[0] += TICK_S
    return (now[0] if sender.done else limit_s), sender.resends


@pytest.mark.parametrize("window", [1, 2, 3])
def test_windows_below_the_report_interval_finish_at_the_round_trip_pace(window: int) -> None:
    """196 chunks at window 1, 2 or 3: the manifest carries ``report_every`` = the window,
    so the receiver reports once per window and the sender never waits for its timer. It
    takes one round trip (a tick here) per window, with no resends; without the field the
    receiver reported only on a resent duplicate and window 1 or 2 did not finish in 600
    simulated seconds (window 3: 82 s)."""
    seconds, resends = _transfer_seconds(window)
    rounds = -(-196 // window)
    assert seconds <= (rounds + 3) * TICK_S, (window, seconds)
    assert resends == 0
    print(f"window {window}: 196 chunks in {seconds:.2f} simulated s, {resends} resends")


def test_the_manifest_declares_a_small_window_and_only_a_small_one() -> None:
    data = bytes(5000)
    small = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                         window=2)
    assert small.report_every == 2 and small.to_dict()["report_every"] == 2
    assert TransferManifest.from_dict(small.to_dict()) == small
    usual = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                         window=16)
    assert "report_every" not in usual.to_dict()  # unchanged on the wire for windows >= 4
    assert TransferManifest.from_dict(usual.to_dict()) == usual
    with pytest.raises(WireError, match="window 1 is below the manifest's report_every 4"):
        BlobSender(MemoryBroker().client("a"), "t/x", usual, data, window=1)
    with pytest.raises(WireError, match="report_every must be an integer in 1..4"):
        TransferManifest.from_dict({**usual.to_dict(), "report_every": 0})


def test_backoff_does_not_grow_across_windows_that_make_progress() -> None:
    """The crawl: a receiver that answers a window only once the sender resent it (as one
    that reports every 4 chunks did for a window of 2). No report gives a clean round-trip
    sample (Karn), but each acknowledges new chunks: the wait stays the first timeout's,
    window after window. Before, only a clean sample ended the doubling, so the wait grew
    to ``max_retransmit_s`` (60 s) per 2 chunks."""
    data = bytes(range(256)) * 200
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                     transfer_id="b", window=2)
    w = TransferWindow(m, data, window=2, retransmit_s=2.0, max_retransmit_s=60.0)
    t, waits = 0.0, []
    sent = w.due(t)
    for _ in range(20):
        waits.append(w.timeout_s)
        t += w.timeout_s + 1e-6
        assert w.due(t) == sent  # the timer fired: the window again ...
        t += 0.05  # ... and the receiver answers the duplicate
        w.on_progress({"xfer": "b", "next": sent[-1] + 1, "highest": sent[-1], "missing": [],
                       "received": sent[-1] + 1}, t)
        sent = w.due(t)
        assert sent == [sent[0], sent[0] + 1]
    assert max(waits) <= 2.0 * 1.25, waits


def test_after_a_silence_the_first_clean_report_restores_the_measured_timeout() -> None:
    """A silent receiver doubles the wait; the report that ends the silence acknowledges
    chunks sent before it (no clean sample) and keeps only the doublings their delay
    showed; the next window's report is clean and brings the measured timeout back."""
    data = bytes(range(256)) * 64
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                     transfer_id="c")
    w = TransferWindow(m, data, window=4, retransmit_s=1.0, max_retransmit_s=60.0)
    assert w.due(0.0) == [0, 1, 2, 3]
    t = 0.0
    for _ in range(4):  # the receiver is silent: one window, then single probes
        t += w.timeout_s + 1e-6
        assert w.due(t)
    backed_off = w.timeout_s
    assert backed_off >= 16 * w.rto_s
    t += 0.1
    w.on_progress({"xfer": "c", "next": 4, "highest": 3, "missing": [], "received": 4}, t)
    assert w.timeout_s <= backed_off  # the doubling stops: the delay it showed, no more
    assert w.due(t) == [4, 5, 6, 7]
    t += 0.1
    w.on_progress({"xfer": "c", "next": 8, "highest": 7, "missing": [], "received": 8}, t)
    assert w.timeout_s <= 1.25 * w.rto_s and w.rto_s == 1.0


@pytest.mark.parametrize("window", [0, -1, 257, 2.5, True])
def test_both_configs_refuse_a_window_outside_the_range_that_works(window: object) -> None:
    """One check (``wire.check_window``) for the coordinator's and the agent's ``window``:
    1..MAX_WINDOW, every value of which completes a transfer (the tests above)."""
    from coordinator.config import CoordinatorConfig, FederationSettings
    from device_agent.config import AgentConfig, DataSettings, DeviceSettings

    coord = CoordinatorConfig(federation=FederationSettings(window=window),  # type: ignore[arg-type]
                              secret=b"s" * 32)
    agent = AgentConfig(device=DeviceSettings(id="d1", window=window),  # type: ignore[arg-type]
                        key=b"k" * 32, data=DataSettings(dataset="digits"))
    for cfg in (coord, agent):
        with pytest.raises(ConfigError, match=rf"window must be an integer in 1..{MAX_WINDOW}"):
            cfg.validate()
    for ok in (1, 2, DEFAULT_WINDOW, MAX_WINDOW):
        CoordinatorConfig(federation=FederationSettings(window=ok), secret=b"s" * 32).validate()
        AgentConfig(device=DeviceSettings(id="d1", window=ok), key=b"k" * 32,
                    data=DataSettings(dataset="digits")).validate()


def test_open_blob_is_the_send_recipe() -> None:
    """``open_blob``, which every sender calls: the id names the topic, the chunk size is
    fitted to what the broker takes there, the manifest is hashed here or re-chunked from a
    prepared ``base`` (one payload for many receivers: same sha256, this id and chunking),
    and the chunks reassemble to the payload."""
    from fedcoe_edge.transport.blob import open_blob

    broker = MemoryBroker(threaded=False, max_packet_size=40_000)
    coord, dev = broker.client("coord"), broker.client("dev1")
    coord.connect()
    dev.connect()
    topics = Topics("fed")
    data = _model_bytes(2)
    fresh = open_blob(coord, lambda x: topics.dn_blob("dev1", x), data, chunk_size=1 << 20,
                      window=4, expert_ids=[1], base_version=7)
    m = fresh.manifest
    assert m.chunk_size == fit_chunk_size(coord, topics.dn_blob("dev1", m.transfer_id),
                                          m.transfer_id) < 40_000
    assert (m.expert_ids, m.base_version, m.total_bytes) == ((1,), 7, len(data))
    assert m.chunk_count == -(-len(data) // m.chunk_size)
    base = TransferManifest.for_payload(data, expert_ids=[1], base_version=7, chunk_size=1 << 20)
    again = open_blob(coord, lambda x: topics.dn_blob("dev1", x), data, chunk_size=1 << 20,
                      window=4, base=base, transfer_id="x-given", verify=False)
    a = again.manifest
    size = fit_chunk_size(coord, topics.dn_blob("dev1", "x-given"), "x-given")
    assert (a.transfer_id, a.sha256, a.chunk_size, a.chunk_count) == (
        "x-given", base.sha256, size, -(-len(data) // size))
    received: list[bytes] = []
    def report(kind: str, body: dict) -> None:
        (again.on_done if kind == XFER_DONE else again.on_progress)(body)

    receiver = BlobReceiver(report, auto_ack=True)
    dev.subscribe(topics.dn_blob_filter("dev1"),
                  lambda msg: _keep(receiver.on_chunk(msg.payload), received))
    receiver.expect(a)
    for _ in range(200):
        if again.done:
            break
        again.pump()
        broker.pump()
    assert again.done and received == [data]
    # a base re-chunked for a window below the report interval declares it, as a fresh
    # manifest does; a payload that is not the base's is refused before anything is sent
    small = open_blob(coord, lambda x: topics.dn_blob("dev1", x), data, chunk_size=1 << 20,
                      window=2, base=base, transfer_id="x-small", verify=False)
    assert small.manifest.report_every == 2 == TransferManifest.for_payload(
        data, expert_ids=[1], base_version=7, window=2).report_every
    with pytest.raises(WireError, match="bytes to send under a manifest of"):
        open_blob(coord, lambda x: topics.dn_blob("dev1", x), data + b"x", chunk_size=1 << 20,
                  window=4, base=base, transfer_id="x-other", verify=False)
