"""``fedcoe status``: a federation's state read from its coordinator's state folder.

Reads ``coordinator.sqlite`` read-only (docs/daemons.md, "Status"): while the coordinator
runs, the database is in WAL mode, so a reader sees the last committed state and never
blocks the daemon's writes (a read-only connection takes no write lock, and SQLite's
checkpoint only waits for readers, never fails the writer); after it stopped the same file
is read as it was left. Whether a coordinator holds the folder now comes from its lock
file (:mod:`coordinator.statelock`).

Also the round and run summary lines the coordinator logs (docs/daemons.md, "Logs"), built
from the same per-round rows, so the log and ``fedcoe status`` cannot disagree.

The ``--json`` document is versioned (``"schema": 1``): keys are added, never renamed or
removed, within one schema number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedcoe_edge.errors import ConfigError, DataError

SCHEMA = 1
DB_NAME = "coordinator.sqlite"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show a federation's rounds, devices and accuracy (live or after the coordinator stopped)",
        description="Read the coordinator's state folder (read-only; the running coordinator is "
                    "never blocked) and print the current round and its deadline, the devices "
                    "(online, last seen, last round, bytes, accuracy), accepted and failed "
                    "updates per round and the accuracy curve. --json prints one document "
                    "whose keys docs/daemons.md, 'Status' lists.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="coordinator.toml (its [federation] state_dir)")
    where.add_argument("--state-dir", type=Path, help="the coordinator's state folder")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rounds: int | None = None
    federation: str | None = None
    allowed: list[str] | None = None
    if args.config is not None:
        from coordinator.config import load_config

        cfg = load_config(args.config)
        state_dir, rounds, federation = cfg.state_dir, cfg.federation.rounds, cfg.federation.id
        allowed = list(cfg.federation.allowed_devices)
    else:
        state_dir = args.state_dir
    doc = read_status(state_dir, rounds=rounds, federation=federation, allowed=allowed)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        sys.stdout.write(format_status(doc))
    return 0


# --- reading ---------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection. A database whose coordinator stopped cleanly has no WAL
    files left, and a read-only connection cannot create the shared-memory file then: it
    is read as immutable (nobody writes it; a coordinator starting meanwhile recreates
    the WAL, and the next ``status`` reads through it again)."""
    wal = path.with_name(path.name + "-wal")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, isolation_level=None)
        db.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        if wal.exists():
            raise
        db = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, timeout=5,
                             isolation_level=None)
    db.row_factory = sqlite3.Row
    return db


def _rows(db: sqlite3.Connection, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [dict(r) for r in db.execute(sql, args).fetchall()]


def iso(ts: float | None) -> str | None:
    """Epoch seconds as local ISO 8601 with the UTC offset (as the log lines), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(float(ts)).astimezone().isoformat(timespec="seconds")


def coordinator_running(state_dir: Path) -> dict[str, Any]:
    """What the lock file says: ``running`` is True/False when the holder is on this host
    (its pid is checked), None when it is on another host (cannot be checked from here)."""
    from coordinator.statelock import holder

    h = holder(state_dir)
    if not h:
        return {"running": False, "pid": None, "host": None, "started": None}
    running: bool | None = None
    if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int):
        try:
            os.kill(int(h["pid"]), 0)
            running = True
        except ProcessLookupError:
            running = False
        except PermissionError:  # someone else's process: it exists
            running = True
    started = h.get("started")
    return {"running": running, "pid": h.get("pid"), "host": h.get("host"),
            "started": iso(started) if isinstance(started, int | float) else None}


def round_rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    """One row per round: counts, bytes, accuracies, times (as ``Store.round_summary``,
    in one pass over the tables instead of one query per round)."""
    rounds = _rows(db, "SELECT * FROM rounds ORDER BY round")
    accepted = {r["round"]: r["n"] for r in
                _rows(db, "SELECT round, COUNT(*) AS n FROM updates GROUP BY round")}
    events: dict[tuple[int, str], int] = {
        (r["round"], r["kind"]): int(r["n"]) for r in
        _rows(db, "SELECT round, kind, SUM(count) AS n FROM events GROUP BY round, kind")}
    traffic: dict[tuple[int, str, str], int] = {
        (r["round"], r["direction"], r["purpose"]): int(r["b"]) for r in
        _rows(db, "SELECT round, direction, purpose, SUM(bytes) AS b FROM traffic "
                  "GROUP BY round, direction, purpose")}
    personal = {r["round"]: (r["c"] / r["n"] if r["n"] else None) for r in
                _rows(db, "SELECT round, SUM(correct) AS c, SUM(total) AS n FROM evals "
                          "WHERE kind='personal' GROUP BY round")}
    out = []
    for r in rounds:
        n = r["round"]
        out.append({
            "round": n, "state": r["state"],
            "selected": len(json.loads(r["selected"] or "[]")),
            "accepted": int(accepted.get(n, 0)), "failed": events.get((n, "failure"), 0),
            "rejected": events.get((n, "rejected"), 0), "applied": bool(r["applied"]),
            "global_acc": r["global_acc"], "personalized_acc": personal.get(n),
            "bytes_up": traffic.get((n, "up", "train"), 0),
            "bytes_down": traffic.get((n, "down", "train"), 0),
            "bytes_refresh": traffic.get((n, "down", "refresh"), 0),
            "bytes_full": int(r["bytes_full"] or 0),
            "opened": iso(r["opened_at"]), "deadline": iso(r["deadline_at"]),
            "closed": iso(r["closed_at"]),
            "wall_s": (round(r["closed_at"] - r["opened_at"], 3) if r["closed_at"] else None),
            "version_after": r["version_after"], "note": r["note"] or "",
        })
    return out


def device_rows(db: sqlite3.Connection) -> list[dict[str, Any]]:
    """One row per registered device: presence, the last round it delivered an update in,
    its bytes (all rounds) and its newest accuracy report (personal or cold)."""
    last_round = {r["device"]: r["r"] for r in
                  _rows(db, "SELECT device, MAX(round) AS r FROM updates GROUP BY device")}
    nbytes: dict[tuple[str, str], int] = {
        (r["device"], r["direction"]): int(r["b"]) for r in
        _rows(db, "SELECT device, direction, SUM(bytes) AS b FROM traffic GROUP BY device, direction")}
    acc: dict[str, dict[str, Any]] = {}
    for r in _rows(db, "SELECT * FROM evals ORDER BY round, ts"):  # the newest wins
        if r["total"]:
            acc[r["device"]] = {"accuracy": r["correct"] / r["total"], "accuracy_kind": r["kind"],
                                "accuracy_round": r["round"]}
    out = []
    for d in _rows(db, "SELECT * FROM devices ORDER BY id"):
        a = acc.get(d["id"], {"accuracy": None, "accuracy_kind": None, "accuracy_round": None})
        out.append({"id": d["id"], "role": d["role"], "tier": d["tier"],
                    "online": bool(d["online"]), "last_seen": iso(d["last_seen"]),
                    "last_round": last_round.get(d["id"]),
                    "bytes_up": nbytes.get((d["id"], "up"), 0),
                    "bytes_down": nbytes.get((d["id"], "down"), 0), **a})
    return out


def read_status(state_dir: Path, rounds: int | None = None,
                federation: str | None = None,
                allowed: list[str] | None = None) -> dict[str, Any]:
    """The status document of ``state_dir`` (see the module docstring; schema 1).
    ``allowed``: the config's ``allowed_devices`` (None: not known, e.g. ``--state-dir``;
    empty: any device with a key), which marks each device ``allowed`` true or false, so a
    device removed with ``fedcoe devices remove`` shows as such."""
    state_dir = Path(state_dir)
    path = state_dir / DB_NAME
    if not path.is_file():
        raise ConfigError(f"no {DB_NAME} in {state_dir}: not a coordinator state folder "
                          "(or the coordinator never started there)")
    try:
        db = _connect(path)
        try:
            rows = round_rows(db)
            devices = device_rows(db)
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    for d in devices:
        d["allowed"] = None if allowed is None else (not allowed or d["id"] in allowed)
    coord = coordinator_running(state_dir)
    last = rows[-1] if rows else None
    current = last["round"] if last else 0
    if last is not None and last["state"] == "open":
        state = "open"
    elif rounds is not None and current >= rounds:
        state = "finished"
    else:
        state = "waiting" if current == 0 else "between rounds"
    deadline_in = None
    if state == "open" and last is not None and last["deadline"]:
        deadline_in = round(datetime.fromisoformat(last["deadline"]).timestamp() - time.time(), 1)
    return {
        "schema": SCHEMA, "state_dir": str(state_dir), "federation": federation,
        "coordinator": coord, "round": current, "rounds": rounds, "state": state,
        "deadline": last["deadline"] if state == "open" and last else None,
        "deadline_in_s": deadline_in,
        "devices": devices,
        "devices_online": sum(1 for d in devices if d["online"]),
        "allowed_devices": None if allowed is None else list(allowed),
        "round_log": rows,
        "accuracy": [{"round": r["round"], "global": r["global_acc"],
                      "personalized": r["personalized_acc"]} for r in rows],
    }


# --- printing ----------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _bytes(n: int | None) -> str:
    if not n:
        return "0"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; numbers read best right-aligned, text left."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i and c[:1].isdigit() or c == "-" else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def format_status(doc: dict[str, Any]) -> str:
    """The human form: a heading, the devices table and the rounds table."""
    c = doc["coordinator"]
    running = {True: f"running (pid {c['pid']} on {c['host']} since {c['started']})",
               False: "not running", None: f"held by pid {c['pid']} on host {c['host']}"}[c["running"]]
    of = f" of {doc['rounds']}" if doc["rounds"] is not None else ""
    fed = f"federation {doc['federation']}, " if doc["federation"] else ""
    out = [f"{fed}state {doc['state_dir']}: coordinator {running}",
           f"round {doc['round']}{of}: {doc['state']}"
           + (f", deadline {doc['deadline']} (in {doc['deadline_in_s']:.0f} s)"
              if doc["deadline"] and doc["deadline_in_s"] is not None else ""),
           f"devices: {doc['devices_online']} online of {len(doc['devices'])}", ""]
    devs = [[d["id"], d["role"], "yes" if d["online"] else "no", d["last_seen"] or "-",
             str(d["last_round"]) if d["last_round"] is not None else "-",
             _bytes(d["bytes_up"]), _bytes(d["bytes_down"]),
             f"{_pct(d['accuracy'])} ({d['accuracy_kind']}, r{d['accuracy_round']})"
             if d["accuracy"] is not None else "-"] for d in doc["devices"]]
    out.append(table(["device", "role", "online", "last seen", "last round", "up", "down",
                      "accuracy"], devs))
    rnds = [[str(r["round"]), r["state"], str(r["selected"]), str(r["accepted"]), str(r["failed"]),
             str(r["rejected"]), _pct(r["global_acc"]), _pct(r["personalized_acc"]),
             _bytes(r["bytes_up"]), _bytes(r["bytes_down"]),
             f"{r['wall_s']:.1f}" if r["wall_s"] is not None else "-"] for r in doc["round_log"]]
    out.append(table(["round", "state", "selected", "accepted", "failed", "refused", "global acc",
                      "personal acc", "up", "down", "seconds"], rnds))
    return "\n".join(out)


# --- log lines -----------------------------------------------------------------------------


def mean_accuracy(summary: dict[str, Any]) -> float | None:
    """The round's accuracy to report: the coordinator's own evaluation when ``[eval]``
    names a dataset, else the mean of the devices' personal evaluations, else unknown."""
    for key in ("global_acc", "personalized_acc"):
        if summary.get(key) is not None:
            return float(summary[key])
    return None


def round_line(summary: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The per-round summary log line and its fields (``extra=`` for ``--log-format json``),
    from ``Store.round_summary``."""
    acc = mean_accuracy(summary)
    fields = {"event": "round_summary", "round": summary["round"],
              "accepted": summary["accepted"], "failed": summary["failed"],
              "rejected": summary["rejected"], "accuracy": acc,
              "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"],
              "seconds": round(summary["wall_s"], 3) if summary.get("wall_s") is not None else None}
    msg = (f"round {summary['round']} summary: accepted {summary['accepted']}, failed "
           f"{summary['failed']}, mean accuracy {_pct(acc) if acc is not None else 'unknown'}, "
           f"bytes up {summary['bytes_up']} down {summary['bytes_down']}, "
           f"{fields['seconds'] if fields['seconds'] is not None else '?'} s")
    return msg, fields


def run_line(summaries: list[dict[str, Any]], seconds: float, version: int
             ) -> tuple[str, dict[str, Any]]:
    """The end-of-run summary line: the rounds this process closed, their totals, the last
    known accuracy, and how long it ran."""
    accs = [a for a in (mean_accuracy(s) for s in summaries) if a is not None]
    fields = {"event": "run_summary", "rounds": len(summaries),
              "last_round": summaries[-1]["round"] if summaries else None,
              "accepted": sum(s["accepted"] for s in summaries),
              "failed": sum(s["failed"] for s in summaries),
              "accuracy": accs[-1] if accs else None,
              "bytes_up": sum(s["bytes_up"] for s in summaries),
              "bytes_down": sum(s["bytes_down"] for s in summaries),
              "seconds": round(seconds, 3), "version": version}
    msg = (f"run summary: {fields['rounds']} round(s) closed (last {fields['last_round']}), "
           f"accepted {fields['accepted']}, failed {fields['failed']}, final accuracy "
           f"{_pct(fields['accuracy']) if fields['accuracy'] is not None else 'unknown'}, bytes up "
           f"{fields['bytes_up']} down {fields['bytes_down']}, {seconds:.1f} s, version {version}")
    return msg, fields
