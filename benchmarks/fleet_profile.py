"""Where the coordinator's CPU goes during a fleet run: py-spy stack samples, summarised.

``python -m benchmarks.fleet --devices 1000 2000 --profile after ...`` attaches
``py-spy record`` (PyPI: ``pip install py-spy``; Linux needs ptrace rights over the
coordinator, which its parent, the benchmark, has) to the coordinator process once it is
online, so the samples cover the rounds, not the imports. The raw collapsed stacks stay in
the run's work folder; this module turns them into the few lines a report needs and keeps,
per label (``before``/``after`` a change), the CPU-s per round and the top entries in
``benchmarks/results/fleet_profile.json``; ``fleet.md`` renders them as its "Coordinator
CPU profile" section (docs/benchmarks.md, "Coordinator CPU profile").

Why the waits are set apart: py-spy counts a thread that is runnable but not running (on
two busy cores, a thread woken from ``Event.wait`` that waits for a core or the GIL) as
active, so on a shared machine the wait primitives collect samples that are no work of
the coordinator. They are reported as one "waiting" share, and the top entries are taken
over the remaining samples.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 50  # samples per second: ~1% of a core for py-spy at 2,000 devices
TOP = 5  # entries per size in the report
# leaf frames that are a thread waiting, not working (see the module docstring)
WAITS = ("Condition.wait", "Event.wait", "Queue.get", "Semaphore.acquire",
         "Condition._acquire_restore", "Lock.acquire", "sleep")
# inclusive entries: functions of these folders, less the loops every stack of a thread
# passes through (they would top the list and say nothing)
PROJECT = ("coordinator/", "fedcoe_edge/", "device_agent/", "export/")
PLUMBING = ("Dispatcher._run", "Dispatcher._handle", "Coordinator.run", "main", "run", "<module>")
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH; None without one."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.is_file() else shutil.which("py-spy")


def attach(pid: int, out: Path, rate_hz: int = RATE_HZ) -> subprocess.Popen[bytes]:
    """Start sampling process ``pid`` into ``out`` (collapsed stacks, one per line); py-spy
    writes the file when the process exits or py-spy is interrupted. ``--nonblocking``:
    the coordinator is never paused to be read, so its CPU figures stay its own."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not found: pip install py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate_hz),
                             "--format", "raw", "--nonblocking", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _frame(raw: str) -> str:
    """``func (path:line)`` -> ``func (path)``: entries are functions, not lines."""
    return _LINE.sub(")", raw.strip())


def summarise(text: str, top: int = 10) -> dict[str, Any]:
    """Collapsed stacks (``frame;frame;... count`` per line, outermost first) to: total
    samples, the waiting share, and over the working samples the ``top`` functions by own
    time (the leaf) and by inclusive time (anywhere on the stack; the project's functions
    only, less the dispatch loops that every handler's stack passes through), each as ``[function, share of working samples]``."""
    total = waiting = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame(f) for f in stack.split(";") if f.strip()]
        total += n
        if not frames or frames[-1].split(" (")[0] in WAITS:
            waiting += n
            continue
        own[frames[-1]] += n
        for f in set(frames):  # the project's functions; its loops and plumbing left out
            if f.split(" (", 1)[-1].startswith(PROJECT) and f.split(" (")[0] not in PLUMBING:
                incl[f] += n
    working = total - waiting

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(k / working, 4)] for f, k in c.most_common(top)] if working else []

    return {"samples": total, "waiting_share": round(waiting / total, 4) if total else 0.0,
            "self": share(own), "inclusive": share(incl)}


def record(profile_json: Path, label: str, command: str, runs: list[dict[str, Any]],
           cpu_per_round: dict[int, float]) -> None:
    """Keep this run's figures under ``label`` in ``profile_json``: per fleet size the
    command, the coordinator's CPU-s per round (the benchmark's own accounting), what the
    rounds accepted and the profile summary. Other labels, and other sizes of this label
    (a run of one size at a time, labels interleaved, pairs before and after closer in
    time on a machine whose load changes), stay."""
    doc: dict[str, Any] = json.loads(profile_json.read_text()) if profile_json.is_file() else {}
    new = [{"devices": r["devices"], "command": command,
            "rounds": f"{r.get('rounds_completed', 0)}/{r['rounds']}",
            "coord_cpu_s_per_round": cpu_per_round.get(r["devices"]),
            "round_s": [x["wall_s"] for x in r.get("round_rows", [])],
            "accepted": [x["accepted"] for x in r.get("round_rows", [])],
            "failed": [x["failed"] for x in r.get("round_rows", [])],
            "loadavg_1m_start": r.get("loadavg_1m_start"),
            "profile": r.get("coordinator_profile")} for r in runs]
    kept = [s for s in doc.get(label, {}).get("sizes", [])
            if s["devices"] not in {n["devices"] for n in new}]
    doc[label] = {"sizes": sorted(kept + new, key=lambda s: s["devices"])}
    profile_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = profile_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(profile_json)


def _entries(p: dict[str, Any] | None, kind: str) -> str:
    if not p:
        return "n/a"
    return "<br>".join(f"{100 * s:.1f}% `{f}`" for f, s in p[kind][:TOP])


def markdown(doc: dict[str, Any]) -> list[str]:
    """The "Coordinator CPU profile" section of fleet.md from ``fleet_profile.json``:
    CPU-s per round before and after at each size, then the top entries per label."""
    labels = [k for k in ("before", "after") if k in doc] + sorted(
        k for k in doc if k not in ("before", "after", "notes"))
    sizes = sorted({s["devices"] for k in labels for s in doc[k]["sizes"]})
    lines = ["## Coordinator CPU profile", "",
             "py-spy samples of the coordinator process (" + f"{RATE_HZ} Hz, non-blocking) "
             "during the rounds, at the same fleet sizes and arguments before and after a "
             "change, run back to back on the same machine; CPU-s per round is the "
             "benchmark's own accounting (psutil, coordinator process, mean over the "
             "rounds). The machine was shared with other work, so compare the columns of "
             "one table, not with the table above.", ""]
    for k in labels:
        for cmd in dict.fromkeys(s["command"] for s in doc[k]["sizes"]):
            lines.append(f"* {k}: `{cmd}`")
    lines += ["", "| devices | " + " | ".join(f"{k}: coord CPU-s/round" for k in labels)
              + " | change | " + " | ".join(f"{k}: rounds, accepted, round s, load" for k in labels)
              + " |", "|---" * (2 * len(labels) + 2) + "|"]
    for n in sizes:
        got = [next((s for s in doc[k]["sizes"] if s["devices"] == n), None) for k in labels]
        vals = [g["coord_cpu_s_per_round"] if g else None for g in got]
        cells = [f"{v:.2f}" if v is not None else "n/a" for v in vals]
        change = (f"{100 * (vals[-1] / vals[0] - 1):+.0f}%"
                  if len(vals) >= 2 and vals[0] and vals[-1] is not None else "")
        runs = [f"{g['rounds']}, {'+'.join(str(a) for a in g.get('accepted', []))}, "
                f"{' / '.join(f'{t:.0f}' for t in g['round_s'] if t is not None)}, "
                f"{g['loadavg_1m_start']:.1f}" if g else "n/a" for g in got]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {change} | " + " | ".join(runs) + " |")
    for kind, what in (("self", "own time (the function at the top of the stack)"),
                       ("inclusive", "inclusive time (the function and what it calls)")):
        lines += ["", f"Top {TOP} by {what}, share of the working samples (waiting "
                  "share of all samples in brackets):", "",
                  "| devices | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for n in sizes:
            cells = []
            for k in labels:
                p = next((s["profile"] for s in doc[k]["sizes"] if s["devices"] == n), None)
                wait = f" (waiting {100 * p['waiting_share']:.0f}%)" if p else ""
                cells.append(_entries(p, kind) + wait)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if doc.get("notes"):
        lines += ["", *doc["notes"]]
    return lines
