"""Agents re-send FETCH and EVAL until the coordinator answers them.

Neither message carries a manifest that the transfer pump would repeat, so a QoS 1
message lost in a broker or coordinator restart used to mean a device that never got its
final experts, or an accuracy that never reached the round log. Here the coordinator
"loses" the first fetch and the first eval of every device (it drops them unhandled, as a
crash would); each device must re-send them and the round log must end complete, with a
bounded number of sends. The backoff is shortened so the test does not sleep for long.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import device_agent.daemon as agent_daemon
from coordinator.daemon import Coordinator
from coordinator.harness import EmbeddedFederation, small
from fedcoe_edge import protocol as P
from fedcoe_edge.messages import Eval, Fetch
from fedcoe_edge.transport import MemoryBroker

WAIT = 120.0


class _Forgetful(Coordinator):
    """Drops the first fetch of each (device, purpose) and the first eval of each
    (device, kind) unhandled, then behaves normally."""

    dropped: Counter[tuple[str, str, str]] = Counter()
    handled: Counter[tuple[str, str, str]] = Counter()
    lock = threading.Lock()

    def _first(self, key: tuple[str, str, str]) -> bool:
        with self.lock:
            first = key not in self.dropped
            if first:
                self.dropped[key] += 1
            else:
                self.handled[key] += 1
            return first

    def _on_fetch(self, dev: str, rnd: int, body: Fetch) -> None:
        if self._first((dev, P.FETCH, body.purpose)):
            return
        super()._on_fetch(dev, rnd, body)

    def _on_eval(self, dev: str, rnd: int, body: Eval) -> None:
        if self._first((dev, P.EVAL, body.kind)):
            return
        super()._on_eval(dev, rnd, body)


def _federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator_cls: Any,
                devices: int, first_s: float, max_s: float) -> tuple[Any, Any]:
    """An in-memory federation of one round whose coordinator is ``coordinator_cls``, with the
    agents' retry delays shortened to ``first_s`` .. ``max_s``."""
    monkeypatch.setattr(P, "RETRY_FIRST_S", first_s)  # retry_delay reads these
    monkeypatch.setattr(P, "RETRY_MAX_S", max_s)
    broker = MemoryBroker()

    def factory(cid: str, will: Any, birth: Any) -> Any:
        return broker.client(cid, will=will, birth=birth)

    fed = EmbeddedFederation(tmp_path, factory, devices=devices, rounds=1, **small())
    c = fed.coordinator = coordinator_cls(fed.coordinator_config(), factory)
    fed._spawn(c.run, "coordinator")
    return fed, c


def test_agents_resend_fetch_and_eval_until_answered(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fed, c = _federation(tmp_path, monkeypatch, _Forgetful, devices=2, first_s=0.3, max_s=1.0)
    for i in range(2):
        fed.add_agent(str(i), str(i))
    try:
        fed.wait_rounds(WAIT)  # final refresh fetch + personal eval of both devices, both lost once
        cold = fed.add_agent("c", "new0", role="cold")  # gate fetch, cold fetch, cold eval
        fed.wait(lambda: any(e["device"] == "c" for e in c.store.evals("cold")), WAIT, "cold eval")
        fed.wait(lambda: not any(a._requests for a in fed.agents.values()), WAIT,
                 "every request answered")
        personal = {e["device"] for e in c.store.evals("personal") if e["round"] == 1}
        given_up = [list(a.requests_given_up) for a in fed.agents.values()]
        sends = dict(_Forgetful.dropped + _Forgetful.handled)
    finally:
        fed.stop()
    assert cold.cold_ready.is_set()
    assert personal == {"0", "1"}
    assert given_up == [[], [], []]
    want = {(d, P.FETCH, "refresh") for d in "01"} | {(d, P.EVAL, "personal") for d in "01"} | {
        ("c", P.FETCH, "gate"), ("c", P.FETCH, "cold"), ("c", P.EVAL, "cold")}
    assert set(_Forgetful.dropped) == want and set(_Forgetful.handled) == want
    # answered after the first re-send; never more than the per-request bound
    assert all(2 <= n <= agent_daemon.RETRY_ATTEMPTS for n in sends.values()), sends


class _Deaf(Coordinator):
    """Never answers an eval (an older coordinator, or one that keeps losing them)."""

    evals: Counter[str] = Counter()

    def _on_eval(self, dev: str, rnd: int, body: Eval) -> None:
        type(self).evals[dev] += 1


def test_an_unanswered_eval_is_sent_a_bounded_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded attempts: RETRY_ATTEMPTS sends, then the device gives up (one WARNING line)."""
    fed, c = _federation(tmp_path, monkeypatch, _Deaf, devices=1, first_s=0.05, max_s=0.1)
    agent = fed.add_agent("0", "0")
    try:
        fed.wait(lambda: (P.EVAL, "personal", 1) in agent.requests_given_up, WAIT, "eval given up")
        time.sleep(0.5)  # nothing more is sent after giving up
        sent = _Deaf.evals["0"]
    finally:
        fed.stop()
    assert sent == agent_daemon.RETRY_ATTEMPTS
