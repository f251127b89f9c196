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


# The runtime install profile without a second venv: torch made unimportable (as it is where
# it is not installed; the CLI and the agent check with find_spec), the agent's own modules
# imported, then `fedcoe predict` on a bundle; the process's VmHWM is printed last.
RUNTIME_PROBE = r"""
import sys
sys.modules["torch"] = None
import device_agent.daemon, paho.mqtt.client
from fedcoe_edge.cli import main
rc = main(["predict", "--bundle", sys.argv[1], "--input", sys.argv[2]])
assert "torch" not in [m for m, v in sys.modules.items() if v is not None], "torch was imported"
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print("VMHWM_KB", int(hwm.split()[1]), file=sys.stderr)
sys.exit(rc)
"""


def runtime_probe(bundle: Path, tmp: Path) -> float:
    """Peak MiB of a runtime-profile process: the agent's modules and ``fedcoe predict``."""
    import numpy as np

    manifest = json.loads((bundle / "manifest.json").read_text())
    x = tmp / "x.npy"
    np.save(x, np.zeros((1, *manifest["model"]["input_shape"]), np.float32))
    res = subprocess.run([sys.executable, "-c", RUNTIME_PROBE, str(bundle), str(x)],
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"runtime probe failed: {res.stderr[-2000:]}")
    kb = next(int(s.split()[1]) for s in res.stderr.splitlines() if s.startswith("VMHWM_KB"))
    return round(kb / 1024, 1)


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
        peaks = classify(seen, out)
        seconds = round(time.monotonic() - t0, 1)
        bundles = sorted((out / "devices").glob("*/bundle/manifest.json"))
        if bundles:
            peaks["runtime"] = runtime_probe(bundles[0].parent, Path(tmp))
        return {"bundle": bundle, "rounds": rounds, "devices": devices, "seconds": seconds,
                "peak_rss_mib": peaks}


def markdown(doc: dict[str, Any]) -> str:
    lines = ["# Peak memory of the daemons (digits demo)", "",
             f"Run {doc['run_at']} on `{doc['machine']}` ({doc['cpus']} cores), python "
             f"{doc['python']}, torch {doc['torch']}, onnxruntime {doc['onnxruntime']}. Command: "
             f"`{doc['command']}`. Peak RSS is each process's `VmHWM`, sampled every "
             f"{SAMPLE_S} s until the demo ends; a row is the largest process of its role.", "",
             "| agents' bundle | training agent | cold agent (torch engine) | coordinator | runtime profile, no torch | rounds | devices | wall s |",
             "|---|---|---|---|---|---|---|---|"]

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v} MiB"

    for r in doc["runs"]:
        p = r["peak_rss_mib"]
        lines.append(f"| `{r['bundle']}` | {mib(p.get('train'))} | {mib(p.get('cold'))} | "
                     f"{mib(p.get('coordinator'))} | {mib(p.get('runtime'))} | {r['rounds']} | "
                     f"{r['devices']} | {r['seconds']} |")
    lines += ["", "With `bundle = \"final\"` a training agent exports its int8 ONNX bundle after the last "
              "round (torch.onnx and the quantizer in the same process); `off` is training alone. "
              "The runtime-profile column is a separate process with torch unimportable (as on a "
              "device without it): the agent's modules and paho imported, then `fedcoe predict` "
              "on a training device's final bundle (8x8 digits); it is not the whole inference-only "
              "agent (no MQTT session, no gate swap). The model's size matters little here: in "
              "`latency.md` a bundle adds 29 MiB (3x32x32) to 31 MiB (3x224x224, camera-size, "
              "int8, top-2, batch 1) over a process that only imported onnxruntime (54 MiB).", ""]
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
