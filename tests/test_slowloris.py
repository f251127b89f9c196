"""Uploads cannot hold the coordinator's reassembly budget hostage.

A slowloris with many enrolled identities announces the largest upload each may send and
drips one new chunk now and then, so no upload ever finishes or falls silent: before, it
filled the budget and every honest upload was deferred until the deadline (rounds with 0
of 6 honest updates). Now each selected device is guaranteed its share of the budget, an
upload within its share evicts those borrowing beyond theirs, stalled uploads make room
for others, and an upload with no new chunk for ``UPLOAD_IDLE_S`` is dropped with one
counted refusal (docs/protocol.md, "Bounds").

The unit tests drive :class:`ReassemblyBudget` with an injected clock; the federation
tests run the real coordinator and agents over the in-memory broker, with the attacker
publishing signed envelopes and chunk frames from the project's own wire code. Waits are
generous upper bounds for a loaded two-core machine; nothing asserts on speed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.daemon import UPLOAD_SLACK, Coordinator
from coordinator.harness import DEMO_SECRET, EmbeddedFederation
from fedcoe_edge import protocol as P
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.protocol import BrokerSettings, TransportFactory, mqtt_factory
from fedcoe_edge.transport import MemoryBroker, Topics
from fedcoe_edge.wire import (
    Envelope,
    ReassemblyBudget,
    TransferManifest,
    encode_chunk,
    encode_envelope,
)

WAIT = 240.0


@pytest.fixture(autouse=True)
def _slow_only_when_asked(request: pytest.FixtureRequest) -> None:
    """The federation-sized attack runs only when the marker expression names it (``make
    test-hostile`` passes ``-m slow``); ``make test`` runs the unit tests here."""
    if request.node.get_closest_marker("slow") and "slow" not in (
            request.config.getoption("markexpr") or ""):
        pytest.skip("slow hostile test: run `make test-hostile` (pytest -m slow)")


# --- the budget, unit level ------------------------------------------------------------
def _budget(total: int = 400, owners: int = 4) -> tuple[ReassemblyBudget, list[float]]:
    now = [0.0]
    b = ReassemblyBudget(total, idle_s=60.0, stall_s=15.0, clock=lambda: now[0])
    b.owners = owners
    return b, now


def test_an_upload_within_its_share_evicts_the_oldest_borrower() -> None:
    b, now = _budget()  # 4 owners: 100 bytes each
    assert b.admit("a", "a", 250).admitted  # borrows 150 of the others' shares
    now[0] = 1.0
    assert b.admit("b", "b", 150).admitted  # borrows 50
    now[0] = 2.0
    b.progress("a")  # "a" moved last: "b" now has the oldest progress
    got = b.admit("c", "c", 100)  # within its share, and 400 - 400 leaves no room
    assert got.admitted and got.evicted == ["b"]
    assert b.used == 350 and "b" not in b
    # an upload beyond its share only takes free room or stalled uploads' room
    assert not b.admit("d", "d", 150).admitted and b.used == 350
    now[0] = 2.0 + 15.0  # no new chunk of "a" (since 2.0) or "c" (since 2.0) for 15 s
    got = b.admit("d", "d", 150)
    assert got.admitted and got.evicted == ["a"]


def test_uploads_within_their_shares_are_never_evicted_while_they_progress() -> None:
    b, now = _budget()
    for k in "abc":
        assert b.admit(k, k, 100).admitted
    now[0] = 10.0
    got = b.admit("d", "d", 101)  # beyond its share: nothing to evict, deferred
    assert not got.admitted and got.evicted == [] and b.used == 300
    assert b.admit("d", "d", 100).admitted and b.used == 400
    assert b.admit("a", "a", 100).admitted and b.used == 400  # already admitted: no-op


def test_an_upload_with_no_new_chunk_for_idle_s_is_dropped() -> None:
    b, now = _budget()
    b.admit("a", "a", 100)
    b.admit("b", "b", 100)
    now[0] = 59.0
    b.progress("b")
    assert b.expire() == []
    now[0] = 60.0
    assert b.expire() == ["a"] and b.used == 100
    now[0] = 118.9
    assert b.expire() == []
    now[0] = 119.0
    assert b.expire() == ["b"] and b.used == 0 and len(b) == 0
    assert not b.admit("huge", "x", 401).admitted  # more than the whole budget
    with pytest.raises(ConfigError, match="stall_s <= idle_s"):
        ReassemblyBudget(10, idle_s=1.0, stall_s=2.0)


# --- against the real coordinator -------------------------------------------------------
class Slowloris:
    """``n`` enrolled identities on one in-memory client (the broker's ACL is not what is
    tested): each says hello as a training device, and once told to, announces the largest
    upload the coordinator allows it, re-announces it every few seconds like an agent whose
    announce was deferred, and drips one new chunk of it every ``drip_s``."""

    def __init__(self, factory: TransportFactory, federation: str, n: int, drip_s: float) -> None:
        self.federation = federation
        self.topics = Topics(federation)
        self.ids = [f"loris{i:04d}" for i in range(n)]
        self.keys = {d: P.device_key(DEMO_SECRET, d) for d in self.ids}
        self.drip_s = drip_s
        self.t = factory("slowloris", None, None)
        self.t.connect()
        self.stop = threading.Event()
        self.chunks = 0
        self._thread: threading.Thread | None = None

    def ctl(self, dev: str, type: str, body: dict[str, Any], rnd: int = 0) -> None:
        env = Envelope.new(type, federation=self.federation, sender=dev,
                           recipient=P.COORDINATOR_ID, round=rnd, body=body)
        self.t.publish(self.topics.up_ctl(dev), encode_envelope(env, self.keys[dev]), qos=1)

    def hello(self) -> None:
        for d in self.ids:
            self.ctl(d, P.HELLO, {"role": "train", "num_samples": 100})

    def attack(self, rnd: int, total_bytes: int) -> None:
        """Announce and drip for round ``rnd`` until :meth:`halt` (on its own thread)."""
        self._thread = threading.Thread(target=self._run, args=(rnd, total_bytes), daemon=True)
        self._thread.start()

    def _run(self, rnd: int, total: int) -> None:
        count = -(-total // 1024)
        manifests = {d: TransferManifest(f"r{rnd}-{d}", (), 0, total, 1024, count, "0" * 64)
                     for d in self.ids}
        seq = dict.fromkeys(self.ids, 0)
        next_announce = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_announce:
                for d, m in manifests.items():
                    self.ctl(d, P.RESULT, {"manifest": m.to_dict(), "num_samples": 100}, rnd)
                next_announce = now + 5.0
            for d, m in manifests.items():  # one new chunk each, never the last one
                if seq[d] < count - 1:
                    self.t.publish(self.topics.up_blob(d, m.transfer_id),
                                   encode_chunk(m.transfer_id, seq[d], count, b"\0" * 1024), qos=1)
                    seq[d] += 1
                    self.chunks += 1
            self.stop.wait(self.drip_s)

    def halt(self) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.stop.clear()

    def close(self) -> None:
        self.halt()
        self.t.close()


class Besieged(EmbeddedFederation):
    """The harness federation with room for the slowloris's identities: every one of them
    is selected (``fraction_fit`` 1.0), so each may announce an upload."""

    extra_devices: int = 0

    def coordinator_config(self) -> CoordinatorConfig:
        cfg = super().coordinator_config()
        cfg.federation.min_devices = self.devices + self.extra_devices
        return cfg


@pytest.fixture
def memory_broker() -> Iterator[TransportFactory]:
    broker = MemoryBroker()
    yield lambda cid, will, birth: broker.client(cid, will=will, birth=birth)


def _upload_limit(c: Coordinator, dev: str) -> int:
    return c._task_nbytes(c.tasks[dev].params) + UPLOAD_SLACK


@pytest.mark.slow
@pytest.mark.parametrize("broker", ["memory", "mosquitto"])
def test_a_thousand_dripping_identities_do_not_starve_six_honest_devices(
        tmp_path: Path, broker: str, request: pytest.FixtureRequest) -> None:
    """1,000 enrolled identities each announce the largest upload allowed and drip a new
    chunk every 2 s (never stalled, never idle) from the moment a round opens, while 6
    honest devices train. The budget is set to hold half of the slowloris's uploads, so
    it is full before any honest device has trained: every honest update of both rounds
    must still be accepted (before: 0 of 6 in each round, all deferred to the deadline).
    The daemons run in this process, over the memory broker or a private Mosquitto with
    the deploy template's queue and packet limits."""
    if broker == "memory":
        factory = request.getfixturevalue("memory_broker")
    else:
        mosquitto = request.getfixturevalue("make_mosquitto")(max_packet_size=2_000_000,
                                                               max_queued_messages=100_000)
        factory = mqtt_factory(BrokerSettings(port=mosquitto.port))
    honest, attackers, rounds = 6, 1000, 2
    fed = Besieged(tmp_path, factory, devices=honest, rounds=rounds, quorum=honest,
                   deadline_s=60.0, aggregation="stream")
    fed.extra_devices = attackers
    loris = Slowloris(factory, fed.federation, attackers, drip_s=2.0)
    c = fed.start_coordinator()
    figures: dict[str, Any] = {"broker": broker}
    evicted: list[str] = []  # devices whose upload was dropped to make room (refusal rows
    drop = c._evict_upload  # are pruned to the newest 10,000: count them here)

    def counted(dev: str, xid: str, why: str) -> None:
        evicted.append(dev)
        drop(dev, xid, why)
    c._evict_upload = counted  # type: ignore[method-assign]
    try:
        fed.wait(lambda: c.transport is not None and c.transport.connected, WAIT, "coordinator up")
        loris.hello()
        for i in range(honest):
            fed.add_agent(str(i), str(i))
        for rnd in range(1, rounds + 1):
            fed.wait(lambda r=rnd: c.round_open and c.round == r and  # type: ignore[misc]
                     len(c.tasks) == honest + attackers, WAIT, f"round {rnd} open")
            limit = _upload_limit(c, loris.ids[0])
            if rnd == 1:  # half of the slowloris's uploads fill it
                c.fed.reassembly_budget_mb = attackers * limit / 2 / 2**20
                c._budget.total_bytes = attackers * limit // 2
            loris.attack(rnd, limit)
            fed.wait(lambda r=rnd: c.round > r or not c.round_open,  # type: ignore[misc]
                     WAIT, f"round {rnd} closed")
            loris.halt()
            row = c.store.round_summary(rnd)
            got = sorted(u["device"] for u in c.store.updates(rnd))
            figures[f"round{rnd}"] = {"honest_accepted": len([d for d in got if not d.startswith("loris")]),
                                      "accepted": row["accepted"], "failed": row["failed"],
                                      "upload_limit": limit}
        figures.update(chunks_dripped=loris.chunks, uploads_evicted=len(evicted),
                       honest_uploads_evicted=len([d for d in evicted if not d.startswith("loris")]),
                       budget_bytes=attackers * limit // 2, share_bytes=attackers * limit // 2 // (honest + attackers))
    finally:
        loris.close()
        fed.stop()
    print(f"\nslowloris figures: {json.dumps(figures)}")
    for rnd in range(1, rounds + 1):
        assert figures[f"round{rnd}"]["honest_accepted"] == honest, figures


def test_an_upload_that_goes_silent_is_dropped_with_one_refusal(
        tmp_path: Path, memory_broker: TransportFactory) -> None:
    """An enrolled identity announces an upload and then sends nothing: once no new chunk
    came for the idle timeout its bytes are free again and one refusal is counted."""
    fed = Besieged(tmp_path, memory_broker, devices=2, rounds=1, deadline_s=120.0)
    fed.extra_devices = 1
    loris = Slowloris(memory_broker, fed.federation, 1, drip_s=1.0)
    c = fed.start_coordinator()
    c._budget.idle_s, c._budget.stall_s = 1.0, 1.0
    dev = loris.ids[0]
    try:
        fed.wait(lambda: c.transport is not None and c.transport.connected, WAIT, "coordinator up")
        loris.hello()
        for i in range(2):
            fed.add_agent(str(i), str(i))
        fed.wait(lambda: c.round_open and dev in c.tasks, WAIT, "round 1 open")
        m = TransferManifest(f"r1-{dev}", (), 0, 4096, 1024, 4, "0" * 64)
        loris.ctl(dev, P.RESULT, {"manifest": m.to_dict(), "num_samples": 100}, 1)
        fed.wait(lambda: (dev, m.transfer_id) in c._uploads, WAIT, "the upload admitted")
        fed.wait(lambda: (dev, m.transfer_id) not in c._uploads, WAIT, "the idle upload dropped")
        with c._lock:
            held = c._budget.used
            others = sum(u.manifest.total_bytes for u in c._uploads.values())
        refused = [e for e in c.store.events(kind="rejected") if e["device"] == dev]
    finally:
        loris.close()
        fed.stop()
    assert held == others  # its bytes are free
    assert [(e["count"], "no new chunk for 1s" in e["reason"]) for e in refused] == [(1, True)]
