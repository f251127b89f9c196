"""Prometheus metrics of a coordinator, read from its state folder (docs/daemons.md,
"Metrics and dashboard").

The figures are the store's, not a second set of counters kept beside it: a collector
reads ``coordinator.sqlite`` read-only (as ``fedcoe status`` does, :mod:`coordinator.status`)
at each scrape, so ``/metrics``, ``fedcoe status`` and the dashboard cannot disagree, the
counters survive a restart of the coordinator (they count the state folder's whole life;
refusals only as far as the event retention keeps their rows), and the daemon needs no hook
in its message handlers.

Every scrape does bounded work, whatever the history: the append-only tables (traffic,
refusal and failure events) are read past the last row id already counted, at most
``TAIL_ROWS`` rows per scrape (the rest on the next one); closed rounds are folded once;
only the open round's updates are counted again. Label values come from fixed sets: a
refusal's reason is mapped to one of :data:`REASONS` (never the raw text, which carries
what a device sent), so a hostile device cannot grow the label set.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from coordinator.status import DB_NAME, _connect

# The reason classes of refusals (``kind = rejected``), failures (``failure``) and declines
# (``decline``); first match wins, the text tested is the stored reason with an aggregated
# row's "N x " prefix removed. Anything else is "other".
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((cls, re.compile(rx)) for cls, rx in (
    ("deadline", r"^deadline passed"),
    ("declined", r"^device declined"),
    ("rate_limit", r"^rate limit:"),
    ("trunk_limit", r"trunk downloaded \d+ times"),
    ("replay", r"replayed msg_id"),
    ("expired", r"expired \d+ ms ago|in the future \(clock skew\)"),
    ("unauthenticated", r"bad HMAC|unknown sender|no HMAC member|no sender member|"
                        r"sender .* is not a valid id"),
    ("bad_topic", r"^topic:|^heartbeat: topic "),
    ("late", r"^update for closed round"),
    ("not_selected", r"^device not selected"),
    ("duplicate", r"^duplicate update"),
    ("after_failure", r"^update after this round's failure"),
    ("too_large", r"^upload of \d+ bytes exceeds"),
    ("upload_dropped", r"^upload dropped:"),
    ("not_allowed", r"^chunk from a device that is not allowed|^device '[^']*' is not in the "
                    r"federation's allowed_devices|^device removed from the federation"),
    ("bad_chunk", r"^blob:"),
    ("invalid_update", r"^update rejected:|^update( delta)?:|^(de)?compress_delta|"
                       r"^decode_tensor|^affinity must be"),
    ("malformed", r"^presence:|^unknown message type|^unknown encoding|^envelope|^\w+: "),
))
REASONS: tuple[str, ...] = (*dict.fromkeys(cls for cls, _ in _RULES), "other")
KINDS: tuple[str, ...] = ("rejected", "failure", "decline")
DIRECTIONS: tuple[str, ...] = ("up", "down")
PURPOSES: tuple[str, ...] = ("train", "refresh", "gate", "cold", "trunk")
ROLES: tuple[str, ...] = ("train", "cold")
_COUNT = re.compile(r"^\d+ x ")

# Round durations: a test federation closes rounds in seconds, a deployment's deadline is
# minutes (deploy/coordinator.toml: 300 s).
DURATION_BUCKETS: tuple[float, ...] = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# rows of an append-only table read per scrape at most: 0.5-0.8 s on the project's 2-core
# test machine, a few ms once caught up (docs/daemons.md, "Metrics and dashboard")
TAIL_ROWS = 200_000

__all__ = ["REASONS", "StoreCollector", "reason_class", "registry_for"]


def reason_class(reason: str) -> str:
    """The label value of a stored refusal or failure reason: one of :data:`REASONS`."""
    text = _COUNT.sub("", reason[:300], count=1)
    for cls, rx in _RULES:
        if rx.search(text):
            return cls
    return "other"


def _one_of(value: Any, known: tuple[str, ...]) -> str:
    return value if value in known else "other"


class StoreCollector:
    """A ``prometheus_client`` collector over one state folder (see the module docstring).
    Thread-safe: scrapes are served one at a time."""

    def __init__(self, state_dir: Path, federation: str = "", rounds: int | None = None) -> None:
        self.path = Path(state_dir) / DB_NAME
        self.federation, self.rounds = federation, rounds
        self._lock = threading.Lock()
        self._traffic_id = 0
        self._event_id = 0
        self._bytes: dict[tuple[str, str], int] = {}
        self._events: dict[tuple[str, str], int] = {}
        self._closed_upto = 0  # rounds 1..this are closed and folded in below
        self._closed = 0
        self._accepted_closed = 0
        self._dur_buckets = [0] * len(DURATION_BUCKETS)
        self._dur_sum = 0.0
        # what the last scrape saw of the moving parts
        self._live: dict[str, Any] = {}

    # ------------------------------------------------------------------ reading
    def _catch_up(self, db: sqlite3.Connection) -> None:
        """Fold what was written since the last scrape (bounded: see TAIL_ROWS)."""
        rows = db.execute(
            "SELECT MAX(id) AS last, direction, purpose, SUM(bytes) AS b FROM "
            "(SELECT id, direction, purpose, bytes FROM traffic WHERE id > ? ORDER BY id LIMIT ?) "
            "GROUP BY direction, purpose", (self._traffic_id, TAIL_ROWS)).fetchall()
        for r in rows:
            key = (_one_of(r["direction"], DIRECTIONS), _one_of(r["purpose"], PURPOSES))
            self._bytes[key] = self._bytes.get(key, 0) + int(r["b"] or 0)
            self._traffic_id = max(self._traffic_id, int(r["last"]))
        for r in db.execute("SELECT id, kind, reason, count FROM events WHERE id > ? ORDER BY id "
                            "LIMIT ?", (self._event_id, TAIL_ROWS)).fetchall():
            key = (_one_of(r["kind"], KINDS), reason_class(str(r["reason"])))
            self._events[key] = self._events.get(key, 0) + int(r["count"] or 1)
            self._event_id = int(r["id"])
        accepted = {int(r["round"]): int(r["n"]) for r in db.execute(
            "SELECT round, COUNT(*) AS n FROM updates WHERE round > ? GROUP BY round",
            (self._closed_upto,))}
        open_round: int | None = None
        for r in db.execute("SELECT round, state, opened_at, closed_at FROM rounds WHERE round > ? "
                            "ORDER BY round", (self._closed_upto,)).fetchall():
            if r["state"] != "closed" or r["closed_at"] is None:
                open_round = int(r["round"])
                break  # rounds close in order: nothing past an open one is closed
            self._fold_closed(int(r["round"]), float(r["closed_at"]) - float(r["opened_at"]),
                              accepted.pop(int(r["round"]), 0))
        live_accepted = sum(accepted.values())
        last = db.execute("SELECT MAX(round) AS r FROM rounds").fetchone()["r"]
        acc = db.execute("SELECT global_acc FROM rounds WHERE global_acc IS NOT NULL "
                         "ORDER BY round DESC LIMIT 1").fetchone()
        pers = db.execute("SELECT round, SUM(correct) AS c, SUM(total) AS n FROM evals WHERE "
                          "kind='personal' AND round = (SELECT MAX(round) FROM evals WHERE "
                          "kind='personal')").fetchone()
        roles = {(_one_of(r["role"], ROLES), int(r["online"])): int(r["n"]) for r in db.execute(
            "SELECT role, online, COUNT(*) AS n FROM devices GROUP BY role, online")}
        online: dict[str, int] = {}
        known: dict[str, int] = {}
        for (role, up), n in roles.items():
            known[role] = known.get(role, 0) + n
            if up:
                online[role] = online.get(role, 0) + n
        self._live = {
            "round": int(last or 0), "open": open_round is not None,
            "accepted_open": live_accepted,
            "global_acc": None if acc is None else float(acc["global_acc"]),
            "personal_acc": (float(pers["c"]) / float(pers["n"])
                             if pers is not None and pers["n"] else None),
            "online": online, "registered": known,
        }

    def _fold_closed(self, rnd: int, seconds: float, accepted: int) -> None:
        self._closed_upto = rnd
        self._closed += 1
        self._accepted_closed += accepted
        self._dur_sum += seconds
        for i, le in enumerate(DURATION_BUCKETS):
            if seconds <= le:
                self._dur_buckets[i] += 1

    # ------------------------------------------------------------------ exposing
    def describe(self) -> Iterator[Any]:
        """The families without touching the database (``registry.register`` calls this)."""
        yield from self._families()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            if self.path.is_file():
                db = _connect(self.path)
                try:
                    self._catch_up(db)
                finally:
                    db.close()
            yield from self._families()

    def _families(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        live = self._live
        info = GaugeMetricFamily("fedcoe_federation_info", "The federation this coordinator "
                                 "serves (value 1)", labels=["federation"])
        info.add_metric([self.federation], 1)
        yield info
        yield GaugeMetricFamily("fedcoe_round", "Current round (the newest opened; 0 before "
                                "the first)", value=live.get("round", 0))
        yield GaugeMetricFamily("fedcoe_round_open", "1 while a round is open, else 0",
                                value=int(bool(live.get("open"))))
        if self.rounds is not None:
            yield GaugeMetricFamily("fedcoe_rounds_configured", "[federation] rounds",
                                    value=self.rounds)
        yield CounterMetricFamily("fedcoe_rounds_closed", "Rounds closed",
                                  value=self._closed)
        # _fold_closed counts a round in every bucket it fits: the counts are cumulative
        buckets = [(f"{le:g}", n) for le, n in zip(DURATION_BUCKETS, self._dur_buckets, strict=True)]
        buckets.append(("+Inf", self._closed))
        yield HistogramMetricFamily("fedcoe_round_duration_seconds", "Closed rounds, from "
                                    "opening to closing", buckets=buckets, sum_value=self._dur_sum)
        yield CounterMetricFamily("fedcoe_updates_accepted", "Updates accepted (persisted), "
                                  "all rounds", value=self._accepted_closed
                                  + live.get("accepted_open", 0))
        ref = CounterMetricFamily("fedcoe_refusals", "Refused inputs (kind=rejected), round "
                                  "failures (kind=failure) and declines, by reason class",
                                  labels=["kind", "reason"])
        for (kind, reason), n in sorted(self._events.items()):
            ref.add_metric([kind, reason], n)
        yield ref
        by = CounterMetricFamily("fedcoe_bytes", "Payload bytes moved (up: updates; down: "
                                 "tasks, refreshes, cold starts, trunk)",
                                 labels=["direction", "purpose"])
        for (direction, purpose), n in sorted(self._bytes.items()):
            by.add_metric([direction, purpose], n)
        yield by
        on = GaugeMetricFamily("fedcoe_devices_online", "Devices online (said hello, no "
                               "offline since), by role", labels=["role"])
        reg = GaugeMetricFamily("fedcoe_devices_registered", "Devices that ever registered, "
                                "by role", labels=["role"])
        for role in (*ROLES, "other"):
            if role in live.get("registered", {}):
                on.add_metric([role], live["online"].get(role, 0))
                reg.add_metric([role], live["registered"][role])
        yield on
        yield reg
        for key, name, doc in (
                ("global_acc", "fedcoe_global_accuracy",
                 "The newest global accuracy ([eval] test set), a fraction"),
                ("personal_acc", "fedcoe_personalized_accuracy",
                 "The devices' mean personal accuracy in the newest round they reported")):
            if live.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=live[key])


def registry_for(state_dir: Path, federation: str = "", rounds: int | None = None) -> Any:
    """A private ``CollectorRegistry`` holding one :class:`StoreCollector` (never the
    global registry: several coordinators run in one test process)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    registry.register(StoreCollector(state_dir, federation, rounds))
    return registry
