"""Peak resident memory of the real daemons: what a board must hold to run each role.

``python -m benchmarks.agent_memory`` runs ``fedcoe demo`` (a private Mosquitto, the
coordinator and device agents as separate processes on 8x8 digits, then one cold device)
twice: with the agents' final int8 bundle rebuild (``--bundle final``, the default) and
without it (``--bundle off``), and samples the peak RSS (Linux ``VmHWM``) of every process
of the demo's tree until it exits. Rows: training agents (the largest of them), the cold
agent (torch engine) and the coordinator. docs/deploy.md ("What each board can do") quotes
``results/agent_memory.md``; the runtime profile's own figure is in ``latency.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from fedcoe_edge.io import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_S = 0.2


def vm_hwm_mb(pid: int) -> float | None:
    """The process's peak resident set (``VmHWM``) in MiB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def watch_tree(proc: subprocess.Popen[bytes], timeout_s: float) -> dict[int, tuple[list[str], float]]:
    """Until ``proc`` exits: every descendant's command line and the highest ``VmHWM`` seen.
    ``VmHWM`` only grows, so sampling it shortly before a process exits loses at most what
    the last ``SAMPLE_S`` added."""
    seen: dict[int, tuple[list[str], float]] = {}
    root = psutil.Process(proc.pid)
    end = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > end:
            proc.kill()
            raise TimeoutError(f"fedcoe demo still running after {timeout_s:.0f} s")
        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in [root, *children]:
            peak = vm_hwm_mb(child.pid)
            if peak is None:
                continue
            if child.pid not in seen:
                try:
                    seen[child.pid] = (child.cmdline(), peak)
                except psutil.Error:
                    continue
            else:
                seen[child.pid] = (seen[child.pid][0], max(seen[child.pid][1], peak))
        time.sleep(SAMPLE_S)
    return seen


def classify(seen: dict[int, tuple[list[str], float]], out: Path) -> dict[str, float]:
    """Peak MiB per role: ``train`` and ``cold`` agents (their config's ``[device] role``)
    and the ``coordinator``; the largest process of each."""
    peaks: dict[str, float] = {}
    for cmd, peak in seen.values():
        if "fedcoe_edge.cli" not in cmd or "--config" not in cmd:
            continue
        sub = cmd[cmd.index("fedcoe_edge.cli") + 1]
        config = out / cmd[cmd.index("--config") + 1]
        if sub == "agent":
            role = tomllib.loads(config.read_text())["device"].get("role", "train")
        elif sub == "coordinator":
            role = "coordinator"
        else:
            continue
        peaks[role] = round(max(peaks.get(role, 0.0), peak), 1)
    return peaks


def run_demo(bundle: str, rounds: int, devices: int, timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fedcoe-agent-memory-") as tmp:
        out = Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "fedcoe_edge.cli", "demo", "--out", str(out),
               "--rounds", str(rounds), "--devices", str(devices), "--bundle", bundle]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seen = watch_tree(proc, timeout_s)
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise RuntimeError(f"fedcoe demo --bundle {bundle} failed: {err[-2000:]}")
        return {"bundle": bundle, "rounds": rounds, "devices": devices,
                "seconds": round(time.monotonic() - t0, 1), "peak_rss_mib": classify(seen, out)}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Peak memory of the daemons (digits demo)", "",
             f"Run {doc['run_at']} on `{doc['machine']}` ({doc['cpus']} cores), python "
             f"{doc['python']}, torch {doc['torch']}, onnxruntime {doc['onnxruntime']}. Command: "
             f"`{doc['command']}`. Peak RSS is each process's `VmHWM`, sampled every "
             f"{SAMPLE_S} s until the demo ends; a row is the largest process of its role.", "",
             "| agents' bundle | training agent | cold agent (torch engine) | coordinator | rounds | devices | wall s |",
             "|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        p = r["peak_rss_mib"]
        lines.append(f"| `{r['bundle']}` | {p.get('train', '-')} MiB | {p.get('cold', '-')} MiB | "
                     f"{p.get('coordinator', '-')} MiB | {r['rounds']} | {r['devices']} | {r['seconds']} |")
    lines += ["", "With `bundle = \"final\"` a training agent exports its int8 ONNX bundle after the last "
              "round (torch.onnx and the quantizer in the same process); `off` is training alone. "
              "An inference-only agent of the runtime profile (no torch) is not in this table: "
              "its figure is the onnxruntime rows of `latency.md`.", ""]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agent_memory", description=__doc__)
    p.add_argument("--rounds", type=int, default=3, help="federated rounds per demo run")
    p.add_argument("--devices", type=int, default=3, help="training devices (plus one cold)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="give up on a demo run after this")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for agent_memory.json/.md")
    args = p.parse_args(argv)
    import onnxruntime
    import torch

    runs = [run_demo(b, args.rounds, args.devices, args.timeout_s) for b in ("final", "off")]
    doc = {"run_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": cpu_name(), "cpus": psutil.cpu_count(),
           "python": platform.python_version(), "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__,
           "command": f"python -m benchmarks.agent_memory --rounds {args.rounds} --devices {args.devices}",
           "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "agent_memory.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_text(args.out / "agent_memory.md", markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
