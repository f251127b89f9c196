"""What one enrolled but compromised (or broken) device can make the coordinator do, and
what a coordinator crash costs the devices: each test plays one attack or fault against
the real daemons (in-memory broker, real wire code) and checks what honest devices get.

Clocks are injected where a bound is about time, so nothing here asserts on timing; the
waits are generous upper bounds for a busy machine.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig, FederationSettings
from coordinator.daemon import HELLO_BURST, Coordinator
from coordinator.harness import DEMO_SECRET, EmbeddedFederation, small
from coordinator.limits import RateLimiter, RefusalLog, reason_class
from coordinator.store import Store
from device_agent.config import load_config as load_agent_config
from device_agent.daemon import AgentHooks, DeviceAgent
from fedcoe_edge import protocol as P
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import BrokerSettings, device_key
from fedcoe_edge.transport import MemoryBroker, Message
from fedcoe_edge.wire import (
    Envelope,
    TransferManifest,
    decode_envelope,
    encode_chunk,
    encode_envelope,
    new_msg_id,
    wall_ms,
)

WAIT = 90.0


def memory_factory() -> tuple[MemoryBroker, Any]:
    broker = MemoryBroker()
    return broker, lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def spy_ctl(fed: EmbeddedFederation, dev: str) -> list[str]:
    """Types of the control envelopes the coordinator sends ``dev`` (read on its transport)."""
    seen: list[str] = []
    agent = fed.agents[dev]
    assert agent.transport is not None

    def on(m: Message) -> None:
        seen.append(decode_envelope(m.payload, lambda _s: device_key(DEMO_SECRET, dev)).type)
    agent.transport.subscribe(f"fl/v1/{fed.federation}/dn/{dev}/ctl", on)
    return seen


def refusals(c: Coordinator, dev: str, text: str) -> int:
    return sum(int(e["count"]) for e in c.store.events(kind="rejected")
               if e["device"] == dev and text in e["reason"])


# --- limits, unit level -----------------------------------------------------------------
def test_rate_limiter_token_bucket() -> None:
    now = [0.0]
    rl = RateLimiter(rate=0.5, burst=2, clock=lambda: now[0], max_keys=2)
    assert [rl.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 2.0  # one token back
    assert rl.allow("a") and not rl.allow("a")
    assert rl.allow("b") and rl.allow("c")  # "a" is evicted (memory bound) ...
    assert rl.allow("a") and rl.allow("a")  # ... and starts full again


def test_refusal_log_aggregates_and_prunes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """10,000 refusals of one kind from one device: 3 rows and lines as they come, then one
    summary row (with the count) and one line per interval; retention caps the table."""
    store = Store(tmp_path / "db.sqlite")
    now = [0.0]
    log = logging.getLogger("test.refusals")
    rl = RefusalLog(store, log, interval_s=60.0, per_interval=3, retention=20, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        written = [rl.refuse(1, "evil", f"blob: chunk for unknown transfer 'x{i:08x}'")
                   for i in range(10_000)]
        now[0] = 61.0
        rl.flush()
    assert written[:3] == [True] * 3 and not any(written[3:])
    rows = store.events(kind="rejected")
    assert len(rows) == 4 and sum(r["count"] for r in rows) == 10_000
    assert rows[-1]["count"] == 9_997 and rows[-1]["reason"].startswith("9997 x blob: chunk")
    assert len(caplog.records) == 4 and "and 9997 more like it" in caplog.records[-1].getMessage()
    assert store.round_summary(1)["rejected"] == 10_000
    for i in range(100):  # distinct reasons are each written, but the table keeps 20 rows
        rl.refuse(1, "evil", f"reason number {'abcdefghij'[i % 10]}{'klmnopqrst'[i // 10]}")
    assert len(store.events(kind="rejected")) <= 20 + 2
    assert reason_class("bad 'a1' 12 deadbeefcafe") == reason_class("bad 'b2' 7 0123456789ab")
    store.close()


def test_broker_username_must_be_the_client_id(tmp_path: Path) -> None:
    """With the template's use_username_as_clientid the username becomes the client id;
    a daemon configured otherwise would publish on topics the ACL does not grant it."""
    cfg = CoordinatorConfig(federation=FederationSettings(), secret=DEMO_SECRET,
                            broker=BrokerSettings(username="pi-1"))
    with pytest.raises(ConfigError, match="username 'pi-1' must equal the client id 'coordinator'"):
        cfg.validate()
    (tmp_path / "a.toml").write_text(f"""
[device]
id = "pi-2"
[broker]
username = "pi-3"
[security]
key = "{'ab' * 16}"
[data]
dataset = "digits"
""")
    with pytest.raises(ConfigError, match="username 'pi-3' must equal the client id 'pi-2'"):
        load_agent_config(tmp_path / "a.toml", {})


def test_demo_gives_each_device_only_its_own_key(tmp_path: Path) -> None:
    from benchmarks.demo import Demo

    args = argparse.Namespace(out=tmp_path, devices=3, alpha=0.5, seed=0, rounds=2, deadline=30.0,
                              bundle="off")
    Demo(args).write_configs(1883)
    secret = bytes.fromhex((tmp_path / "secret.hex").read_text().strip())
    for i in range(4):
        text = (tmp_path / f"agent_dev{i}.toml").read_text()
        assert "secret" not in text
        cfg = load_agent_config(tmp_path / f"agent_dev{i}.toml", {})
        assert cfg.key == device_key(secret, f"dev{i}")
        assert (tmp_path / "keys" / f"dev{i}.key").stat().st_mode & 0o077 == 0


# --- a compromised device inside a federation ---------------------------------------------
def _unchecked_send(agent: DeviceAgent, type: str, body: dict[str, Any], rnd: int) -> None:
    """Sign and publish a control message as ``agent`` without the typed check its
    Messenger applies before sending: what a compromised device can still put on the wire."""
    assert agent.transport is not None
    env = Envelope.new(type, federation=agent.topics.federation, sender=agent.dev,
                       recipient=agent.coord, round=rnd, body=body)
    agent.transport.publish(agent.topics.up_ctl(agent.dev), encode_envelope(env, agent.cfg.key),
                            qos=1)


def _hostile_manifest(xid: str, total: int, chunk: int) -> dict[str, Any]:
    return TransferManifest(xid, (), 0, total, chunk, max(1, -(-total // chunk)), "0" * 64).to_dict()


def test_compromised_device_cannot_buy_unbounded_work(tmp_path: Path) -> None:
    """In round 1 device 1 announces a 1-byte-chunk upload, 40 uploads at once and says
    hello 10 times before uploading honestly. The coordinator refuses the tiny chunks,
    keeps one open upload for the device, prepares no new task transfer for the hellos,
    and every device's update (device 1's honest one included) is accepted."""
    _, factory = memory_factory()
    seen: dict[str, Any] = {}
    fed: EmbeddedFederation

    def attack(agent: DeviceAgent, rnd: int) -> bool:
        if rnd != 1:
            return True
        c = fed.coordinator
        assert c is not None
        _unchecked_send(agent, P.RESULT, {"manifest": _hostile_manifest("tiny", 20_000, 1),
                                          "num_samples": 1}, rnd)
        for i in range(40):
            _unchecked_send(agent, P.RESULT, {"manifest": _hostile_manifest(f"many{i}", 4096, 1024),
                                   "num_samples": 1}, rnd)
        for _ in range(10):
            agent.hello()
        fed.wait(lambda: ("1", "many39") in c._uploads, WAIT, "the 40 announces handled")
        # 11 hellos (one at connect) against a burst of HELLO_BURST: the first refusals are
        # written as they come, the rest only counted until the refusal interval ends
        fed.wait(lambda: refusals(c, "1", "rate limit: hello") >= HELLO_BURST, WAIT, "hellos")
        seen["open"] = sum(1 for k in c._uploads if k[0] == "1")
        seen["buffers"] = len(c._receivers["1"].reassembler._open)
        return True

    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=1, deadline_s=120.0,
                             hooks={"1": AgentHooks(before_upload=attack)}, **small())
    fed.start()
    try:
        fed.wait_rounds(WAIT)
        c = fed.coordinator
        assert c is not None
        row = c.store.round_summary(1)
        tiny = refusals(c, "1", "below the 1024-byte minimum")
        downloads = c.store._rows("SELECT COUNT(*) AS n FROM traffic WHERE round=1 AND device='1'"
                                  " AND direction='down' AND purpose='train'")[0]["n"]
    finally:
        fed.stop()
    assert (row["accepted"], row["failed"]) == (3, 0)
    assert tiny == 1
    assert seen == {"open": 1, "buffers": 1}
    assert downloads == 1  # 10 hellos, one task transfer


def test_resent_chunk_of_a_finished_upload_is_reacknowledged(tmp_path: Path) -> None:
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=2, rounds=1, **small())
    fed.start()
    try:
        fed.wait_rounds(WAIT)
        c = fed.coordinator
        assert c is not None
        xid = next(x for d, x in c._accepted_xfers if d == "1")
        seen = spy_ctl(fed, "1")
        agent = fed.agents["1"]
        assert agent.transport is not None
        agent.transport.publish(f"fl/v1/{fed.federation}/up/1/blob/{xid}", encode_chunk(xid, 0, 1, b"again"))
        fed.wait(lambda: P.ACCEPT in seen and "xfer_done" in seen, WAIT, "re-acknowledgement")
        rejected = c.store.events(kind="rejected")
    finally:
        fed.stop()
    assert rejected == []


class _CrashingCoordinator(Coordinator):
    """Dies (stops handling anything) at the first chunk of device 1's round-2 upload."""

    crashed = threading.Event()

    def _on_blob(self, msg: Message) -> None:
        if self.round == 2 and "/up/1/blob/" in msg.topic:
            type(self).crashed.set()
        if type(self).crashed.is_set():
            return
        super()._on_blob(msg)


def test_coordinator_crash_mid_upload_loses_no_update(tmp_path: Path) -> None:
    """The coordinator dies with device 1's round-2 upload in flight; a new one resumes the
    round. The device's chunks for the transfer the new coordinator never saw are answered
    with ``xfer_unknown``; the device re-announces at once and its update is accepted in
    the same round, long before its 600 s upload timeout would have run out."""
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=2, deadline_s=600.0,
                             device_overrides={"1": {"chunk_size": 1024, "window": 4}}, **small())
    fed.coordinator = _CrashingCoordinator(fed.coordinator_config(), factory)
    fed._spawn(fed.coordinator.run, "coordinator")
    for i in range(3):
        fed.add_agent(str(i), str(i))
    try:
        fed.wait(_CrashingCoordinator.crashed.is_set, WAIT, "device 1's round-2 upload started")
        fed.coordinator.stop()
        for t in fed.threads:
            t.join(timeout=10)
        fed.threads.clear()
        c = fed.start_coordinator()
        fed.wait(lambda: c.round == 2 and not c.round_open, WAIT / 2, "round 2 closed after the crash")
        row = c.store.round_summary(2)
    finally:
        fed.stop()
    assert (row["accepted"], row["failed"]) == (3, 0)


def test_repeated_coordinator_online_does_not_make_devices_say_hello_again(tmp_path: Path) -> None:
    """Only a transition to "online" (the coordinator came back) triggers a hello; "online"
    repeated without "offline" in between (a replay, a takeover loop) and retained status
    do not, so the fleet is not pushed into a re-registration and re-download storm."""
    broker, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=1, rounds=1, **small())
    agent = DeviceAgent(fed.agent_config("0", "0"), factory)
    hellos: list[int] = []
    real_hello = agent.hello

    def counting_hello() -> None:
        hellos.append(1)
        real_hello()
    agent.hello = counting_hello  # type: ignore[method-assign]
    agent.start()
    pub = broker.client("coordinator")
    pub.connect()
    try:
        status = f"fl/v1/{fed.federation}/coord/status"
        for state in ("online", "online", "online", "offline", "online", "stopping"):
            pub.publish(status, P.presence_payload(state), qos=1, retain=False)
        fed.wait(lambda: agent._coord_state == "stopping", WAIT, "status messages handled")
    finally:
        pub.close()
        agent.close()
    assert len(hellos) == 3  # at connect, first "online", "online" after "offline"


# --- peer input: authenticated before parsed, every number bounded, budgets per topic -----
def _signed(dev: str, type: str, body: dict[str, Any], rnd: int = 0,
            key: bytes | None = None) -> bytes:
    env = Envelope.new(type, federation="test", sender=dev, recipient=P.COORDINATOR_ID,
                       round=rnd, body=body)
    return encode_envelope(env, key if key is not None else device_key(DEMO_SECRET, dev))


def _raw_envelope(dev: str, body: bytes, key: bytes, type: str = "hb") -> bytes:
    """Canonical envelope bytes around a hand-written body, signed with ``key``: what a
    peer without the device's key (a wrong ``key``) or a compromised one can put on a topic."""
    import hashlib
    import hmac

    unsigned = (b'{"body":' + body + b',"federation":"test","msg_id":"' + new_msg_id().encode()
                + b'","recipient":"coordinator","round":1,"sender":"' + dev.encode()
                + b'","ts_ms":' + str(wall_ms()).encode() + b',"ttl_s":120,"type":"'
                + type.encode() + b'","v":1}')
    mac = hmac.new(key, unsigned, hashlib.sha256).hexdigest().encode()
    i = unsigned.index(b',"msg_id":')
    return unsigned[:i] + b',"hmac":"' + mac + b'"' + unsigned[i:]


@contextlib.contextmanager
def _after_one_round(tmp_path: Path, devices: int = 2) -> Iterator[tuple[EmbeddedFederation,
                                                                         Coordinator]]:
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=devices, rounds=1, federation="test", **small())
    fed.start()
    try:
        fed.wait_rounds(WAIT)
        assert fed.coordinator is not None
        yield fed, fed.coordinator
    finally:
        fed.stop()


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


def test_unauthenticated_flood_is_refused_unparsed_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """10,000 heartbeats and control messages with a float 1e999, 40,000-deep JSON, random
    bytes or a wrong key (every rate limit lifted, so each one reaches the decoder): no
    traceback, one row and one line for the sender per interval (every refusal counted in
    the summary), bounded time. Before, each raised out of the handler (ValueError /
    RecursionError computing the signed bytes) and logged a traceback."""
    import random

    with _after_one_round(tmp_path) as (_, c):
        unlimited = RateLimiter(1e9, 1e9)
        c._hb_limit = c._ctl_limit = unlimited
        wrong = b"w" * 32
        deep = b"[" * 40_000 + b"]" * 40_000
        rng = random.Random(0)
        payloads = [_raw_envelope("0", b'{"x":1e999}', wrong), _raw_envelope("0", deep, wrong),
                    b'{"body":{"x":1e999},"sender":"0"}', deep, rng.randbytes(300),
                    _raw_envelope("0", b'{"rss_mb":1}', wrong)]
        before = len(c.store.events(kind="rejected"))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedcoe"):
            t0 = time.perf_counter()
            for i in range(10_000):
                p = payloads[i % len(payloads)]
                if i % 2:
                    c._on_heartbeat(Message("fl/v1/test/up/0/hb", p, qos=0))
                else:
                    c._on_ctl(Message("fl/v1/test/up/0/ctl", p))
            elapsed = time.perf_counter() - t0
            c._on_presence(Message("fl/v1/test/presence/0", deep))  # unsigned, also bounded
            rows_during = len(c.store.events(kind="rejected")) - before
            lines_during = [r for r in caplog.records if "device=0" in r.getMessage()]
            c.refusals.flush(force=True)
        rows = c.store.events(kind="rejected")[before:]
    print(f"\nunauthenticated messages discarded in-process: {10_000 / elapsed:,.0f}/s "
          f"({elapsed:.2f} s for 10,000, every rate limit lifted)")
    assert _tracebacks(caplog) == []
    assert elapsed < 60.0, elapsed  # ~0.5 s when idle; generous for a loaded machine
    assert rows_during <= 2 and len(lines_during) <= 2  # the first, at once; the rest counted
    unauthenticated = [r for r in rows if "presence" not in r["reason"]]
    assert sum(r["count"] for r in unauthenticated) == 10_000
    assert len(unauthenticated) == 2 and unauthenticated[-1]["reason"].startswith("9999 x ")


def test_unauthenticated_refusals_under_made_up_ids_share_one_row(tmp_path: Path) -> None:
    """Bad messages under 5,000 made-up device ids: at most ``max_new_per_interval`` rows
    open per interval, the rest counted under device ``*``."""
    with _after_one_round(tmp_path) as (_, c):
        c._hb_limit = RateLimiter(1e9, 1e9)
        before = len(c.store.events(kind="rejected"))
        for i in range(5_000):
            c._on_heartbeat(Message(f"fl/v1/test/up/ghost{i}/hb", b"\x00" * 50, qos=0))
        c.refusals.flush(force=True)
        rows = c.store.events(kind="rejected")[before:]
    assert sum(r["count"] for r in rows) == 5_000
    assert len(rows) <= c.refusals.max_new_per_interval + 2
    assert any(r["device"] == "*" for r in rows)


def test_numbers_out_of_range_refuse_that_message_alone(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Device 2 claims ``num_samples`` 10**400 (and then 2**62, which JSON and SQLite could
    hold): its result is refused with a reason, no traceback, and devices 0 and 1 are
    accepted in the same round. Before, the save raised OverflowError and failed the whole
    batch."""
    _, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=3, rounds=1, deadline_s=20.0,
                             federation="test", **small())
    fed.start()
    bad = fed.agents["2"]
    real_send = bad._send
    sends = [0]

    def lying_send(type: str, body: dict[str, Any], rnd: int = 0) -> None:
        if type == P.RESULT:
            sends[0] += 1
            body = {**body, "num_samples": 10**400 if sends[0] % 2 else 2**62,
                    "metrics": {"train_loss": 10**400 if sends[0] % 2 else 1.0}}
            _unchecked_send(bad, type, body, rnd)
            return
        real_send(type, body, rnd)
    bad._send = lying_send  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="fedcoe"):
            c = fed.coordinator
            assert c is not None
            fed.wait(lambda: c.round == 1 and not c.round_open, WAIT, "round 1 closed")
            row = c.store.round_summary(1)
            accepted = {u["device"] for u in c.store.updates(1)}
            reasons = {e["reason"] for e in c.store.events(kind="rejected") if e["device"] == "2"}
    finally:
        fed.stop()
    assert accepted == {"0", "1"} and row["failed"] == 1
    assert sends[0] >= 2
    assert any("integer of 401 digits" in r for r in reasons), reasons
    assert any("result.num_samples" in r for r in reasons), reasons
    assert _tracebacks(caplog) == []


def test_one_bad_member_does_not_fail_its_batch(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Two updates reach the persister together; one carries a value SQLite cannot store.
    The other is still accepted (persisted and counted); only the bad one is dropped."""
    from coordinator.engine import Accepted
    from fedcoe_edge.strategies import ClientResult

    with _after_one_round(tmp_path) as (_, c):
        params = {k: v for k, v in list(c.strategy.global_state.items())[:2]}
        good = Accepted("good", 1, ClientResult("good", 1, 10, dict(params), None, {}), 10, "xg",
                         P.ENCODING_PLAIN)
        bad = Accepted("bad", 1, ClientResult("bad", 1, 10**400, dict(params), None, {}), 10,
                        "xb", P.ENCODING_PLAIN)
        with caplog.at_level(logging.INFO, logger="fedcoe"):
            c._persist_q.put(bad)
            c._persist_q.put(good)
            c._persist_q.join()
        stored = {u["device"] for u in c.store.updates(1)}
    assert "good" in stored and "bad" not in stored
    assert _tracebacks(caplog) == []


def test_evals_only_for_rounds_that_closed(tmp_path: Path) -> None:
    """Evaluations for a round that never existed, is far ahead or is not closed are
    refused with a reason; one for the closed round is stored."""
    with _after_one_round(tmp_path) as (fed, c):
        for rnd in (999, 2, 0):
            c._on_ctl(Message("fl/v1/test/up/0/ctl", _signed(
                "0", P.EVAL, {"kind": "personal", "correct": 1, "total": 2}, rnd)))
        c._on_ctl(Message("fl/v1/test/up/0/ctl", _signed(
            "0", P.EVAL, {"kind": "cold", "correct": 1, "total": 2}, 1)))
        fed.wait(lambda: any(e["kind"] == "cold" for e in c.store.evals()), WAIT, "cold eval")
        rounds = {e["round"] for e in c.store.evals()}
        refused = [e["reason"] for e in c.store.events(kind="rejected") if "eval for round" in e["reason"]]
    assert rounds == {1}
    assert len(refused) == 3 and any("round 999" in r for r in refused), refused


def test_decline_flood_is_grouped_and_event_rows_are_pruned(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 declines from one device: a few rows (declines grouped, the excess refused by
    the decline budget and counted), not 1,000 synced rows; the pruning schedule keeps
    the newest EVENT_RETENTION rows of every kind."""
    import coordinator.daemon as daemon

    with _after_one_round(tmp_path) as (_, c):
        c._ctl_limit = RateLimiter(1e9, 1e9)
        before = {k: len(c.store.events(kind=k)) for k in ("decline", "rejected")}
        for i in range(1_000):
            c._on_ctl(Message("fl/v1/test/up/0/ctl", _signed("0", P.DECLINE, {"reason": f"no {i}"})))
        assert len(c.store.events(kind="decline")) - before["decline"] <= 2  # before: 1,000
        c.refusals.flush(force=True)
        c.declines.flush(force=True)
        declines = c.store.events(kind="decline")[before["decline"]:]
        limited = [e for e in c.store.events(kind="rejected")[before["rejected"]:]
                   if "rate limit: decline" in e["reason"]]
        assert len(declines) + len(limited) <= 4
        assert sum(e["count"] for e in declines + limited) == 1_000
        for i in range(50):
            c.store.add_event(1, f"d{i}", "failure", "deadline passed")
        monkeypatch.setattr(daemon, "EVENT_RETENTION", 5)
        c._prune()
        kinds = {k: len(c.store.events(kind=k)) for k in ("failure", "decline", "rejected")}
    assert all(n <= 5 for n in kinds.values()), kinds


def test_round_close_commits_its_accuracy_with_it(tmp_path: Path) -> None:
    """A kill right after the round is marked closed must not lose its accuracy: at the
    moment the close is committed, the row already holds ``global_acc``."""
    import sqlite3

    seen: list[tuple[str, Any]] = []
    real = Store.close_round

    def watched(self: Store, rnd: int, *args: Any, **kwargs: Any) -> None:
        real(self, rnd, *args, **kwargs)
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)  # what a restart would see
        try:
            seen.append(db.execute("SELECT state, global_acc FROM rounds WHERE round=?",
                                   (rnd,)).fetchone())
        finally:
            db.close()
    Store.close_round = watched  # type: ignore[method-assign]
    try:
        with _after_one_round(tmp_path):
            pass
    finally:
        Store.close_round = real  # type: ignore[method-assign]
    assert seen and seen[0][0] == "closed" and seen[0][1] is not None, seen


def test_agent_refuses_peer_garbage_without_traceback(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """What reaches a device on its control, broadcast and status topics without the
    coordinator's key (1e999, 40,000-deep JSON, random bytes, forged envelopes): no
    traceback and one WARNING line per kind of refusal per minute, not one per message."""
    import random

    broker, factory = memory_factory()
    fed = EmbeddedFederation(tmp_path, factory, devices=1, rounds=1, federation="test", **small())
    agent = DeviceAgent(fed.agent_config("0", "0"), factory)
    agent.start()
    agent.bc_key = b"b" * 32
    wrong = b"w" * 32
    deep = b"[" * 40_000 + b"]" * 40_000
    payloads = [_raw_envelope("coordinator", b'{"x":1e999}', wrong, type="task"),
                _raw_envelope("coordinator", deep, wrong, type="welcome"), deep,
                random.Random(0).randbytes(300)]
    try:
        with caplog.at_level(logging.INFO, logger="fedcoe"):
            for i in range(1_000):
                p = payloads[i % len(payloads)]
                agent._on_ctl(Message("fl/v1/test/dn/0/ctl", p))
                agent._on_broadcast(Message("fl/v1/test/bc/ctl", p))
                agent._on_coord_status(Message("fl/v1/test/coord/status", p))
    finally:
        agent.close()
    assert _tracebacks(caplog) == []
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 8, [r.getMessage() for r in refused]
