"""The coordinator's embedded database (SQLite): device registry and round log.

Design section 8: every accepted update and every round's result is persisted before it is
acknowledged, so a restarted coordinator resumes the round it was in. Weights themselves
live in safetensors files next to the database (written atomically); the database holds
what happened: who registered, who was selected, what was accepted, rejected, failed, how
many bytes moved, and the accuracy reached.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, role TEXT NOT NULL, tier TEXT, memory_mb REAL, num_samples INTEGER,
    label_hist TEXT, capabilities TEXT, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    online INTEGER NOT NULL DEFAULT 0, telemetry TEXT);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, state TEXT NOT NULL, opened_at REAL NOT NULL, deadline_at REAL,
    closed_at REAL, selected TEXT NOT NULL, experts TEXT NOT NULL, version_before INTEGER,
    version_after INTEGER, applied INTEGER, global_acc REAL, bytes_full INTEGER DEFAULT 0,
    note TEXT DEFAULT '');
CREATE TABLE IF NOT EXISTS updates (
    round INTEGER NOT NULL, device TEXT NOT NULL, num_samples INTEGER NOT NULL,
    affinity TEXT, metrics TEXT, bytes INTEGER NOT NULL, path TEXT NOT NULL,
    accepted_at REAL NOT NULL, PRIMARY KEY (round, device));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, device TEXT NOT NULL,
    kind TEXT NOT NULL, reason TEXT NOT NULL, ts REAL NOT NULL, count INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS traffic (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, device TEXT NOT NULL,
    direction TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS evals (
    round INTEGER NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL, correct INTEGER NOT NULL,
    total INTEGER NOT NULL, ts REAL NOT NULL, PRIMARY KEY (round, device, kind));
CREATE TABLE IF NOT EXISTS trunk_fetches (device TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS trunk_fetches_device ON trunk_fetches (device, ts);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, id);
"""


class Store:
    """Thread-safe wrapper over one SQLite connection (handlers and the round loop share it).

    Every statement outside :meth:`batch` is its own fully synced transaction. A fleet's
    coordinator groups writes instead (docs/daemons.md, "Scale"): :meth:`batch` commits many
    statements with one sync, and :meth:`later` queues bookkeeping that need not be durable
    at once (registrations, heartbeats, traffic) for the next batch; any read flushes the
    queue first, so a reader in this process never misses a queued write.
    """

    def __init__(self, path: Path, readonly: bool = False) -> None:
        """Open (and create) the database; ``readonly`` for monitors in other processes."""
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        self._later: list[tuple[str, tuple[Any, ...]]] = []
        self._later_lock = threading.Lock()
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                                       isolation_level=None, timeout=10)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        cols = {r[1] for r in self._db.execute("PRAGMA table_info(events)")}
        if "count" not in cols:  # a database from before refusals were aggregated
            self._db.execute("ALTER TABLE events ADD COLUMN count INTEGER NOT NULL DEFAULT 1")

    def close(self) -> None:
        self.flush_later()
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One transaction (one sync) for every write inside; nests, commits at the outermost."""
        with self._lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def later(self, method: str, *args: Any) -> None:
        """Queue a call of one of this store's write methods for the next :meth:`flush_later`."""
        with self._later_lock:
            self._later.append((method, args))

    def flush_later(self) -> int:
        """Run the queued writes in one transaction; returns how many ran."""
        with self._later_lock:
            items, self._later = self._later, []
        if items:
            with self.batch():
                for method, args in items:
                    getattr(self, method)(*args)
        return len(items)

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self._later:
            self.flush_later()
        with self._lock:
            cur = self._db.execute(sql, args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]  # type: ignore[misc]

    # --- registry ---
    def register(self, device: str, role: str, caps: dict[str, Any]) -> None:
        now = time.time()
        hist = caps.get("label_hist")
        self._exec(
            "INSERT INTO devices (id, role, tier, memory_mb, num_samples, label_hist, capabilities,"
            " first_seen, last_seen, online) VALUES (?,?,?,?,?,?,?,?,?,1)"
            " ON CONFLICT(id) DO UPDATE SET role=excluded.role, tier=excluded.tier,"
            " memory_mb=excluded.memory_mb, num_samples=excluded.num_samples,"
            " label_hist=excluded.label_hist, capabilities=excluded.capabilities,"
            " last_seen=excluded.last_seen, online=1",
            (device, role, caps.get("tier"), caps.get("memory_mb"), caps.get("num_samples"),
             json.dumps(hist) if hist is not None else None, json.dumps(caps, sort_keys=True),
             now, now))

    def set_online(self, device: str, online: bool) -> None:
        self._exec("UPDATE devices SET online=?, last_seen=? WHERE id=?", (int(online), time.time(), device))

    def heartbeat(self, device: str, telemetry: dict[str, Any]) -> None:
        self._exec("UPDATE devices SET last_seen=?, telemetry=? WHERE id=?",
                   (time.time(), json.dumps(telemetry, sort_keys=True)[:2000], device))

    def devices(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM devices ORDER BY id")

    # --- rounds ---
    def open_round(self, rnd: int, selected: list[str], experts: dict[str, list[int]],
                   deadline_at: float, version: int, bytes_full: int) -> None:
        self._exec(
            "INSERT OR REPLACE INTO rounds (round, state, opened_at, deadline_at, selected, experts,"
            " version_before, bytes_full) VALUES (?,?,?,?,?,?,?,?)",
            (rnd, "open", time.time(), deadline_at, json.dumps(selected), json.dumps(experts),
             version, bytes_full))

    def close_round(self, rnd: int, version_after: int, applied: bool, note: str,
                    global_acc: float | None = None) -> None:
        """Close a round and record its global accuracy in ONE statement (one transaction):
        a coordinator killed at any point either still has the round open (it is closed
        again on restart) or has both, never a closed round without its accuracy."""
        self._exec("UPDATE rounds SET state='closed', closed_at=?, version_after=?, applied=?, note=?,"
                   " global_acc=COALESCE(?, global_acc) WHERE round=?",
                   (time.time(), version_after, int(applied), note, global_acc, rnd))

    def round(self, rnd: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM rounds WHERE round=?", (rnd,))
        return rows[0] if rows else None

    def last_round(self) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM rounds ORDER BY round DESC LIMIT 1")
        return rows[0] if rows else None

    def rounds(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM rounds ORDER BY round")

    # --- updates, events, traffic, evals ---
    def add_update(self, rnd: int, device: str, num_samples: int, affinity: list[float] | None,
                   metrics: dict[str, float], nbytes: int, path: str) -> None:
        self._exec("INSERT OR REPLACE INTO updates VALUES (?,?,?,?,?,?,?,?)",
                   (rnd, device, num_samples, json.dumps(affinity), json.dumps(metrics), nbytes,
                    path, time.time()))

    def updates(self, rnd: int) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM updates WHERE round=? ORDER BY device", (rnd,))

    def add_event(self, rnd: int, device: str, kind: str, reason: str, count: int = 1) -> None:
        """One row; ``count`` > 1 stands for that many refusals aggregated into it."""
        self._exec("INSERT INTO events (round, device, kind, reason, ts, count) VALUES (?,?,?,?,?,?)",
                   (rnd, device, kind, reason[:1000], time.time(), count))

    def prune_events(self, kind: str, keep: int) -> int:
        """Retention: keep only the newest ``keep`` rows of ``kind``; returns rows deleted.
        Refusals come from outside and would otherwise grow the database without end."""
        with self._lock:
            cur = self._db.execute(
                "DELETE FROM events WHERE kind=? AND id <= (SELECT id FROM events WHERE kind=?"
                " ORDER BY id DESC LIMIT 1 OFFSET ?)", (kind, kind, keep))
            return int(cur.rowcount or 0)

    def prune_all_events(self, keep: int) -> int:
        """Retention for every kind of event row (refusals, failures, declines): the newest
        ``keep`` of each kind stay. Called on a schedule by the coordinator."""
        with self._lock:
            kinds = [r[0] for r in self._db.execute("SELECT DISTINCT kind FROM events")]
        return sum(self.prune_events(k, keep) for k in kinds)

    # --- limits that must survive a restart ---
    def add_trunk_fetch(self, device: str, ts: float) -> None:
        self._exec("INSERT INTO trunk_fetches (device, ts) VALUES (?,?)", (device, ts))

    def trunk_fetches(self, device: str, since: float) -> list[float]:
        """Times (wall clock) of ``device``'s trunk downloads after ``since``, oldest first."""
        rows = self._rows("SELECT ts FROM trunk_fetches WHERE device=? AND ts>? ORDER BY ts",
                          (device, since))
        return [float(r["ts"]) for r in rows]

    def prune_trunk_fetches(self, before: float) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM trunk_fetches WHERE ts<=?", (before,))
            return int(cur.rowcount or 0)

    def event_count(self, rnd: int, kind: str) -> int:
        """Events of ``kind`` in round ``rnd``, aggregated rows counted by their ``count``."""
        rows = self._rows("SELECT COALESCE(SUM(count), 0) AS n FROM events WHERE round=? AND kind=?",
                          (rnd, kind))
        return int(rows[0]["n"])

    def events(self, rnd: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events WHERE 1=1", list[Any]()
        if rnd is not None:
            sql += " AND round=?"
            args.append(rnd)
        if kind is not None:
            sql += " AND kind=?"
            args.append(kind)
        return self._rows(sql + " ORDER BY id", tuple(args))

    def add_traffic(self, rnd: int, device: str, direction: str, purpose: str, nbytes: int) -> None:
        self._exec("INSERT INTO traffic (round, device, direction, purpose, bytes, ts) VALUES (?,?,?,?,?,?)",
                   (rnd, device, direction, purpose, nbytes, time.time()))

    def traffic(self, rnd: int | None = None) -> dict[tuple[str, str], int]:
        """Bytes per (direction, purpose), for one round or all."""
        sql = "SELECT direction, purpose, SUM(bytes) AS b FROM traffic"
        args: tuple[Any, ...] = ()
        if rnd is not None:
            sql += " WHERE round=?"
            args = (rnd,)
        rows = self._rows(sql + " GROUP BY direction, purpose", args)
        return {(r["direction"], r["purpose"]): int(r["b"]) for r in rows}

    def add_eval(self, rnd: int, device: str, kind: str, correct: int, total: int) -> None:
        self._exec("INSERT OR REPLACE INTO evals VALUES (?,?,?,?,?,?)",
                   (rnd, device, kind, correct, total, time.time()))

    def evals(self, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return self._rows("SELECT * FROM evals ORDER BY round, device")
        return self._rows("SELECT * FROM evals WHERE kind=? ORDER BY round, device", (kind,))

    def round_summary(self, rnd: int) -> dict[str, Any]:
        """One row of the per-round table: counts, bytes and accuracies."""
        r = self.round(rnd) or {}
        t = self.traffic(rnd)
        ev = self._rows("SELECT SUM(correct) AS c, SUM(total) AS n FROM evals WHERE round=? AND kind='personal'",
                        (rnd,))[0]
        counts = {k: self.event_count(rnd, k) for k in ("rejected", "failure")}
        return {
            "round": rnd, "state": r.get("state"),
            "selected": len(json.loads(r["selected"])) if r else 0,
            "accepted": len(self.updates(rnd)), "failed": counts["failure"],
            "rejected": counts["rejected"], "applied": bool(r.get("applied")),
            "global_acc": r.get("global_acc"),
            "personalized_acc": (ev["c"] / ev["n"]) if ev["n"] else None,
            "bytes_up": t.get(("up", "train"), 0), "bytes_down": t.get(("down", "train"), 0),
            "bytes_refresh": t.get(("down", "refresh"), 0),
            "bytes_full": int(r.get("bytes_full") or 0),
            "wall_s": (r["closed_at"] - r["opened_at"]) if r and r.get("closed_at") else None,
        }
