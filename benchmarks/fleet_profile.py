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
import time
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
    """Add this run's figures under ``label`` to ``profile_json``: per fleet size the
    command, the coordinator's CPU-s per round (the benchmark's own accounting), what the
    rounds accepted, the load and the profile summary. Everything already kept stays: a
    second run of a label and size is a repeat (on a machine whose load changes, pairs
    before/after run one size at a time, interleaved, and repeated)."""
    doc: dict[str, Any] = json.loads(profile_json.read_text()) if profile_json.is_file() else {}
    new = [{"devices": r["devices"], "command": command, "at": time.time(),
            "rounds": f"{r.get('rounds_completed', 0)}/{r['rounds']}",
            "coord_cpu_s_per_round": cpu_per_round.get(r["devices"]),
            "round_s": [x["wall_s"] for x in r.get("round_rows", [])],
            "accepted": [x["accepted"] for x in r.get("round_rows", [])],
            "failed": [x["failed"] for x in r.get("round_rows", [])],
            "loadavg_1m_start": r.get("loadavg_1m_start"),
            "profile": r.get("coordinator_profile")} for r in runs]
    doc.setdefault(label, {"sizes": []})["sizes"] += new
    profile_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = profile_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(profile_json)


def _entries(p: dict[str, Any] | None, kind: str) -> str:
    if not p:
        return "n/a"
    return "<br>".join(f"{100 * s:.1f}% `{f}`" for f, s in p[kind][:TOP])


def _bare(command: str) -> str:
    """``command`` without its ``--json PATH`` and ``--workdir PATH`` (a run's own files)."""
    words = command.split()
    return " ".join(w for i, w in enumerate(words)
                    if w not in ("--json", "--workdir") and (i == 0 or words[i - 1] not in ("--json", "--workdir")))


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def markdown(doc: dict[str, Any]) -> list[str]:
    """The "Coordinator CPU profile" section of fleet.md from ``fleet_profile.json``: every
    run in the order it ran, the mean CPU-s per round per label and size with the change,
    then the top entries of each label's first run at each size."""
    labels = [k for k in ("before", "after") if k in doc] + sorted(
        k for k in doc if k not in ("before", "after", "notes", "micro"))
    runs = sorted(((k, s) for k in labels for s in doc[k]["sizes"]), key=lambda x: x[1].get("at", 0))
    sizes = sorted({s["devices"] for _, s in runs})
    lines = ["## Coordinator CPU profile", "",
             f"py-spy samples of the coordinator process ({RATE_HZ} Hz, non-blocking) from "
             "the moment it is online until it exits, at the same fleet sizes and arguments "
             "before and after a change, one size at a time, before and after back to back "
             "on the same machine; CPU-s per round is the benchmark's own accounting "
             "(psutil, coordinator process, mean over the rounds). The machine was shared "
             "with other work (the load column), so compare rows of these tables, not the "
             "table above.", ""]
    for k in labels:  # one line per distinct command, less the per-run --json / --workdir
        for cmd in dict.fromkeys(_bare(s["command"]) for s in doc[k]["sizes"]):
            lines.append(f"* {k}: `{cmd}`")
    lines += ["", "| devices | run | coord CPU-s/round | rounds | accepted per round | "
              "round s | 1-min load at start | py-spy samples |", "|---" * 8 + "|"]
    for k, s in runs:
        cpu = s["coord_cpu_s_per_round"]
        p = s.get("profile")
        lines.append(
            f"| {s['devices']} | {k} | {f'{cpu:.2f}' if cpu is not None else 'n/a'} | "
            f"{s['rounds']} | {' + '.join(str(a) for a in s.get('accepted', []))} | "
            f"{' / '.join(f'{t:.0f}' for t in s['round_s'] if t is not None)} | "
            f"{s['loadavg_1m_start']:.1f} | {p['samples'] if p else 'n/a'} |")
    lines += ["", "| devices | " + " | ".join(f"{k}: mean coord CPU-s/round" for k in labels)
              + " | change |", "|---" * (len(labels) + 2) + "|"]
    for n in sizes:
        means = [_mean([s["coord_cpu_s_per_round"] for s in doc[k]["sizes"]
                        if s["devices"] == n and s["coord_cpu_s_per_round"] is not None])
                 for k in labels]
        cells = [f"{m:.2f} ({sum(1 for s in doc[k]['sizes'] if s['devices'] == n)} run(s))"
                 if m is not None else "n/a" for m, k in zip(means, labels, strict=True)]
        change = (f"{100 * (means[-1] / means[0] - 1):+.0f}%"
                  if len(means) >= 2 and means[0] and means[-1] is not None else "")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {change} |")
    for kind, what in (("self", "own time (the function at the top of the stack)"),
                       ("inclusive", "inclusive time (the function and what it calls)")):
        lines += ["", f"Top {TOP} by {what}, share of the working samples (waiting "
                  "share of all samples in brackets), first run of each:", "",
                  "| devices | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for n in sizes:
            cells = []
            for k in labels:
                p = next((s["profile"] for s in doc[k]["sizes"] if s["devices"] == n), None)
                wait = f" (waiting {100 * p['waiting_share']:.0f}%)" if p else ""
                cells.append(_entries(p, kind) + wait)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += _micro_lines(doc.get("micro", {}))
    if doc.get("notes"):
        lines += ["", *doc["notes"]]
    return lines


def _micro_lines(micro: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The fixed items alone (``python -m benchmarks.fleet_profile --micro``): CPU-s of one
    round's worth of each, per label and size."""
    if not micro:
        return []
    labels = [k for k in ("before", "after") if k in micro] + sorted(
        k for k in micro if k not in ("before", "after"))
    lines = ["", "The per-update items the profile named, alone: process CPU-s for one round's "
             "worth at each size on synthetic inputs (`python -m benchmarks.fleet_profile "
             "--micro LABEL 1000 2000` at each commit): the defence of every update against a "
             "history of every device, `Partial.admit` of every device, `parse_json` of ten "
             "envelopes per device.", "",
             "| devices | item | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    sizes = sorted({r["devices"] for k in labels for r in micro[k]})
    for n in sizes:
        for item in ("defend_s", "admit_s", "parse_json_s"):
            cells = [next((f"{r[item]:.3f}" for r in micro[k] if r["devices"] == n), "n/a")
                     for k in labels]
            lines.append(f"| {n} | {item[:-2]} | " + " | ".join(cells) + " |")
    return lines


# --- the fixed items alone: CPU of one round's worth of each, on the code imported ---------
def micro(devices: int) -> dict[str, Any]:
    """Process CPU seconds of one round's worth of the per-update work the profile named,
    on synthetic inputs of a fleet of ``devices`` (the same at any commit, so a run at the
    commit before a change and one at the change compare the code alone, free of the
    fleet run's scheduling noise): the defence for every update against a history of
    every device, ``Partial.admit`` for every device, ``parse_json`` of ten envelopes per
    device."""
    import numpy as np

    from fedcoe_edge.config import TrainConfig
    from fedcoe_edge.robust import DefenceState, defend
    from fedcoe_edge.strategies.base import ClientResult
    from fedcoe_edge.streaming import Partial
    from fedcoe_edge.wire.envelope import parse_json

    rng = np.random.default_rng(0)
    base = {f"t{i}": rng.normal(size=(64,)).astype(np.float32) for i in range(20)}
    ids = [f"dev{i:05d}" for i in range(devices)]
    state = DefenceState(bound=10.0, samples={d: float(50 + i % 7) for i, d in enumerate(ids)})
    results = [ClientResult(d, 2, 60, {k: v + 0.01 for k, v in base.items()}, None, {}) for d in ids]
    env = json.dumps({"body": {"manifest": {"chunk_count": 3, "expert_ids": [1, 4]},
                               "num_samples": 60, "affinity": [0.1] * 8}, "federation": "fleet",
                      "hmac": "00" * 32, "round": 2}, sort_keys=True, separators=(",", ":")).encode()
    out: dict[str, Any] = {"devices": devices}
    t = time.process_time()
    for r in results:
        defend(state, TrainConfig(), r, base)
    out["defend_s"] = time.process_time() - t
    t = time.process_time()
    p = Partial(1)
    for d in ids:
        p.admit(d, 1)
    out["admit_s"] = time.process_time() - t
    t = time.process_time()
    for _ in range(10 * devices):
        parse_json(env, "envelope")
    out["parse_json_s"] = time.process_time() - t
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.fleet_profile --micro LABEL N [N ...]``: :func:`micro` at each
    N, kept under ``micro`` / LABEL in ``--profile-json`` (fleet.md renders it)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet_profile")
    ap.add_argument("--micro", nargs="+", required=True, metavar="LABEL N")
    ap.add_argument("--profile-json", type=Path,
                    default=Path(__file__).resolve().parent / "results" / "fleet_profile.json")
    args = ap.parse_args(argv)
    label, sizes = args.micro[0], args.micro[1:]
    if not sizes or not all(s.isdigit() and int(s) > 0 for s in sizes):
        print("fleet_profile: --micro LABEL N [N ...] with fleet sizes N >= 1", file=sys.stderr)
        return 2
    rows = [micro(int(n)) for n in sizes]
    for r in rows:
        print(json.dumps(r))
    doc: dict[str, Any] = json.loads(args.profile_json.read_text()) if args.profile_json.is_file() else {}
    doc.setdefault("micro", {})[label] = rows
    tmp = args.profile_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(args.profile_json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
