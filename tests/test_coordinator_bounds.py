"""What one enrolled but compromised (or broken) device can make the coordinator do, and
what a coordinator crash costs the devices: each test plays one attack or fault against
the real daemons (in-memory broker, real wire code) and checks what honest devices get.

Clocks are injected where a bound is about time, so nothing here asserts on timing; the
waits are generous upper bounds for a busy machine.
"""

from __future__ import annotations

import argparse
import logging
import threading
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
from fedcoe_edge.wire import TransferManifest, decode_envelope, encode_chunk

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
        agent._send(P.RESULT, {"manifest": _hostile_manifest("tiny", 20_000, 1), "num_samples": 1}, rnd)
        for i in range(40):
            agent._send(P.RESULT, {"manifest": _hostile_manifest(f"many{i}", 4096, 1024),
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
