"""The same bundle on x86 and on ARM: top-1 agreement of a bundle's int8 and fp32 files run
by onnxruntime on this host and on aarch64 CPUs emulated by user-mode qemu.

A fleet mixes CPU classes (a Raspberry Pi 4's Cortex-A72, a Pi 5's Cortex-A76 with int8 dot
products, an x86 gateway with AVX512-VNNI). The same signed bundle must give the same
answers on each, or the accuracy measured on one is not the accuracy of the others. This
benchmark runs :class:`fedcoe_edge.runtime.MoESession` (torch-free, as a device runs it)
on the official Fashion-MNIST test images at the bundle's input size, once natively and
once per emulated CPU, and compares the predictions (docs/bundle.md, "Same answers on
every CPU").

How ARM is run, without touching the host's binfmt handlers:

* an aarch64 sysroot (Debian's arm64 python3.11 and its libraries, unpacked with
  ``dpkg -x``; numpy, onnxruntime and safetensors aarch64 wheels unpacked from PyPI), made by
  ``benchmarks/arm_sysroot.sh`` (``make arm-sysroot``);
* ``qemu-aarch64 -cpu cortex-a72|cortex-a76 -L SYSROOT SYSROOT/usr/bin/python3.11`` runs this
  module's ``worker`` verb. onnxruntime's CPU probe reads ``/proc/cpuinfo``, which qemu 7.2
  passes through from the x86 host (onnxruntime then crashes on import), so each run gets a
  private mount namespace (``unshare -m``, root) with an ARM ``/proc/cpuinfo`` bound over
  the host's; qemu's ``-cpu`` sets the hardware capabilities (dot product or not) that
  onnxruntime's kernels are chosen by.

Writes ``cross_arch.json`` and ``cross_arch.md`` under ``--out``. Command:
``python -m benchmarks.cross_arch --bundle runs/camera_accuracy/bundle_client0``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
JSON_NAME, MD_NAME = "cross_arch.json", "cross_arch.md"
SYSROOT = Path(os.environ.get("FEDCOE_ARM_SYSROOT", "/opt/fedcoe-arm64"))
PRECISIONS = ("deployed", "fp32")

# /proc/cpuinfo as the two boards' kernels print it (one block per core; two cores are
# enough: the runtime runs one thread). Feature words follow the CPUs' hardware caps:
# the A76 has int8 dot products (asimddp), the A72 has not.
_A72 = ("Features\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n")
_A76 = ("Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
        "asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
        "CPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n")
CPUS = {"cortex-a72": _A72, "cortex-a76": _A76}


def cpuinfo(cpu: str) -> str:
    """An aarch64 ``/proc/cpuinfo`` for ``cpu`` (two cores)."""
    body = CPUS[cpu]
    return "".join(f"processor\t: {i}\nBogoMIPS\t: 108.00\n{body}\n" for i in range(2))


# ----------------------------------------------------------------------------- inputs


def prepare_inputs(size: int, samples: int, seed: int, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The official Fashion-MNIST test split (a stratified ``samples`` subset, or all when
    0), resized to ``size`` px as one grey channel: ``(N, 1, size, size)`` float32 and the
    labels. The worker repeats the channel (what ``fedcoe_edge.pretrain.to_camera`` does)."""
    from fedcoe_edge.data.federation import stratified_subset
    from fedcoe_edge.data.fmnist import load_split
    from fedcoe_edge.pretrain import to_camera

    x, y = load_split("test", data_dir)
    if samples and samples < len(y):
        keep = stratified_subset(y, samples / len(y), np.random.default_rng([seed, 13]))
        x, y = x[keep], y[keep]
    return to_camera(x, size)[:, :1].copy(), y


# ----------------------------------------------------------------------------- worker


def worker(bundle: Path, inputs: Path, out: Path, batch: int = 100) -> None:
    """Run ``bundle`` at both precisions on ``inputs`` (an .npz from :func:`prepare_inputs`)
    and save what each gives: global-path and personal top-1, the top-2 routed experts and
    the trunk's pooled features. torch-free: it runs on the emulated CPUs too."""
    from fedcoe_edge.runtime import MoESession

    x1 = np.load(inputs)["x"]
    res: dict[str, np.ndarray] = {}
    for precision in PRECISIONS:
        sess = MoESession(bundle, precision=precision)
        g, p, top, feats = [], [], [], []
        for i in range(0, len(x1), batch):
            xb = np.ascontiguousarray(np.repeat(x1[i:i + batch], 3, axis=1))
            o = sess.run(xb)
            g.append(o.global_probs.argmax(1))
            p.append(o.probs.argmax(1))
            top.append(np.sort(np.argsort(-o.routing, axis=1)[:, :2], axis=1))
            feats.append(sess.features(xb).reshape(len(xb), -1))
        res[f"{precision}_global"] = np.concatenate(g)
        res[f"{precision}_personal"] = np.concatenate(p)
        res[f"{precision}_experts"] = np.concatenate(top)
        res[f"{precision}_features"] = np.concatenate(feats).astype(np.float32)
    res["machine"] = np.array(platform.machine())
    np.savez(out, **res)  # type: ignore[arg-type]  # numpy stubs type allow_pickle as a kwarg


def emulated(cpu: str, sysroot: Path, bundle: Path, inputs: Path, out: Path,
             timeout_s: float) -> float:
    """Run :func:`worker` on an emulated ``cpu``; seconds taken. Needs root (a private mount
    namespace) and ``qemu-aarch64``; never registers a binfmt handler."""
    python = sysroot / "usr" / "bin" / "python3.11"
    site = sysroot / "site-packages"
    for need in (python, site):
        if not need.exists():
            raise SystemExit(f"cross_arch: {need} missing: build the sysroot with "
                             f"`make arm-sysroot` (benchmarks/arm_sysroot.sh)")
    with tempfile.TemporaryDirectory(prefix="fedcoe-cpuinfo-") as tmp:
        info = Path(tmp) / "cpuinfo"
        info.write_text(cpuinfo(cpu))
        inner = (f"mount --bind {info} /proc/cpuinfo && exec qemu-aarch64 -cpu {cpu} "
                 f"-L {sysroot} {python} -m benchmarks.cross_arch worker --bundle {bundle} "
                 f"--inputs {inputs} --result {out}")
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{site}", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        subprocess.run(["unshare", "-m", "sh", "-c", inner], check=True, env=env,
                       cwd=REPO, timeout=timeout_s)
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- compare


def compare(runs: dict[str, dict[str, np.ndarray]], y: np.ndarray) -> dict[str, Any]:
    """Accuracy per host and precision; agreement of every host with the native one per
    precision (top-1 global and personal, top-2 expert sets, max |feature difference|);
    int8 vs fp32 on every host."""
    native = next(iter(runs))
    acc = {h: {prec: {path: float((r[f"{prec}_{path}"] == y).mean())
                      for path in ("global", "personal")} for prec in PRECISIONS}
           for h, r in runs.items()}

    def agree(a: dict[str, np.ndarray], b: dict[str, np.ndarray], pa: str, pb: str) -> dict[str, float]:
        return {"global": float((a[f"{pa}_global"] == b[f"{pb}_global"]).mean()),
                "personal": float((a[f"{pa}_personal"] == b[f"{pb}_personal"]).mean()),
                "experts": float((a[f"{pa}_experts"] == b[f"{pb}_experts"]).all(1).mean()),
                "max_feature_diff": float(np.abs(a[f"{pa}_features"] - b[f"{pb}_features"]).max())}

    across = {f"{native}_vs_{h}": {prec: agree(runs[native], r, prec, prec) for prec in PRECISIONS}
              for h, r in runs.items() if h != native}
    hosts = [h for h in runs if h != native]
    for i, a in enumerate(hosts):
        for b in hosts[i + 1:]:
            across[f"{a}_vs_{b}"] = {prec: agree(runs[a], runs[b], prec, prec) for prec in PRECISIONS}
    int8_fp32 = {h: agree(r, r, "deployed", "fp32") for h, r in runs.items()}
    return {"native": native, "top1": acc, "across_hosts": across, "int8_vs_fp32": int8_fp32}


def markdown(doc: dict[str, Any]) -> str:
    """The report: accuracy per host, agreement across hosts and int8 vs fp32."""
    res = doc["result"]
    pct = "{:.2%}".format
    lines = ["# The same bundle on x86 and ARM", "",
             f"Bundle `{doc['bundle']}` ({doc['manifest']['trunk']} trunk), "
             f"{doc['samples']:,} official Fashion-MNIST test images at {doc['size']}x{doc['size']}. "
             f"Native host: {doc['env']['cpu']} ({doc['env']['machine']}); ARM: user-mode qemu "
             f"{doc['env']['qemu']} with `-cpu` as named (A72: no int8 dot product; A76: "
             "`sdot`/`udot`). onnxruntime " + doc['env']['onnxruntime'] + " on every host, one thread.",
             "", "| host | int8 global | int8 personal | fp32 global | fp32 personal |",
             "|---|---|---|---|---|"]
    for h, a in res["top1"].items():
        lines.append(f"| {h} | {pct(a['deployed']['global'])} | {pct(a['deployed']['personal'])} "
                     f"| {pct(a['fp32']['global'])} | {pct(a['fp32']['personal'])} |")
    lines += ["", "Agreement between hosts (top-1 of the global path and of the personal mixture; "
              "top-2 expert sets identical; largest |difference| of a pooled trunk feature):", "",
              "| hosts | precision | global top-1 | personal top-1 | top-2 experts | max feature diff |",
              "|---|---|---|---|---|---|"]
    for pair, by in res["across_hosts"].items():
        for prec, a in by.items():
            name = "int8" if prec == "deployed" else prec
            lines.append(f"| {pair.replace('_vs_', ' vs ')} | {name} | {pct(a['global'])} | "
                         f"{pct(a['personal'])} | {pct(a['experts'])} | {a['max_feature_diff']:.3g} |")
    lines += ["", "int8 vs fp32 on each host:", "",
              "| host | global top-1 | personal top-1 | top-2 experts | max feature diff |",
              "|---|---|---|---|---|"]
    for h, a in res["int8_vs_fp32"].items():
        lines.append(f"| {h} | {pct(a['global'])} | {pct(a['personal'])} | {pct(a['experts'])} "
                     f"| {a['max_feature_diff']:.3g} |")
    goal = doc["goal"]
    lines += ["", f"Goals: int8 x86 vs ARM global top-1 >= {goal['across_min']:.1%}: "
              f"**{'met' if goal['across_met'] else 'NOT met'}** (lowest {goal['across_lowest']:.2%}); "
              f"int8 vs fp32 >= {goal['int8_fp32_min']:.0%}: "
              f"**{'met' if goal['int8_fp32_met'] else 'NOT met'}** "
              f"(lowest {goal['int8_fp32_lowest']:.2%}).", "",
              f"Time: {', '.join(f'{h} {s:.0f} s' for h, s in doc['seconds'].items())}. "
              f"Command: `{doc['command']}`.", ""]
    return "\n".join(lines)


def agreement_lines(doc: dict[str, Any]) -> list[str]:
    """The short form for the camera report: int8 and fp32 top-1 agreement of the native host
    with each emulated CPU, and int8 vs fp32, with the command that measured them."""
    res, goal = doc["result"], doc["goal"]
    native = res["native"]
    pct = "{:.2%}".format
    lines = [f"x86 vs aarch64 (`{Path(doc['bundle']).name}`, {doc['samples']:,} test images, "
             f"{doc['manifest']['quantization'].get('activations', 'u8')} activations; "
             "ARM under user-mode qemu, one thread):", "",
             "| hosts | precision | global top-1 | personal top-1 | top-2 experts |",
             "|---|---|---|---|---|"]
    for pair, by in res["across_hosts"].items():
        if not pair.startswith(native + "_vs_"):
            continue
        for prec, a in by.items():
            lines.append(f"| {pair.replace('_vs_', ' vs ')} | "
                         f"{'int8' if prec == 'deployed' else prec} | {pct(a['global'])} | "
                         f"{pct(a['personal'])} | {pct(a['experts'])} |")
    lines += ["", f"int8 vs fp32 global top-1, lowest over hosts: {pct(goal['int8_fp32_lowest'])}. "
              f"Full report: `cross_arch.md`; command: `{doc['command']}`."]
    return lines


GOAL_ACROSS, GOAL_INT8_FP32 = 0.995, 0.99


def goal(res: dict[str, Any]) -> dict[str, Any]:
    """x86 vs ARM int8 global top-1 >= 99.5%; int8 vs fp32 >= 99% on every host."""
    across = min(by["deployed"]["global"] for by in res["across_hosts"].values())
    ifp = min(a["global"] for a in res["int8_vs_fp32"].values())
    return {"across_min": GOAL_ACROSS, "across_lowest": across, "across_met": across >= GOAL_ACROSS,
            "int8_fp32_min": GOAL_INT8_FP32, "int8_fp32_lowest": ifp,
            "int8_fp32_met": ifp >= GOAL_INT8_FP32}


def _qemu_version() -> str:
    try:
        out = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "missing"
    return out.split("\n")[0].split("version")[-1].strip()


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    import onnxruntime as ort

    from benchmarks.harness import cpu_model

    bundle = Path(args.bundle).resolve()
    manifest = json.loads((bundle / "manifest.json").read_text())
    size = int(manifest["model"]["input_shape"][-1])
    with tempfile.TemporaryDirectory(prefix="fedcoe-xarch-") as tmp:
        work = Path(tmp)
        x, y = prepare_inputs(size, args.samples, args.seed, args.data_dir)
        inputs = work / "inputs.npz"
        np.savez(inputs, x=x)
        runs: dict[str, dict[str, np.ndarray]] = {}
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        worker(bundle, inputs, work / "native.npz")
        native = f"{platform.machine()} host"
        seconds[native] = time.perf_counter() - t0
        runs[native] = dict(np.load(work / "native.npz"))
        for cpu in args.cpus:
            print(f"[cross-arch] running on emulated {cpu} ...", flush=True)
            seconds[cpu] = emulated(cpu, Path(args.sysroot), bundle, inputs, work / f"{cpu}.npz",
                                    args.timeout)
            runs[cpu] = dict(np.load(work / f"{cpu}.npz"))
            print(f"[cross-arch] {cpu}: {seconds[cpu]:.0f} s", flush=True)
    res = compare(runs, y)
    return {"bundle": str(bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle),
            "manifest": {"trunk": manifest["model"]["trunk"],
                         "quantization": manifest.get("quantization")},
            "size": size, "samples": int(len(y)), "result": res, "goal": goal(res),
            "seconds": seconds,
            "env": {"cpu": cpu_model(), "machine": platform.machine(), "qemu": _qemu_version(),
                    "onnxruntime": ort.__version__, "python": platform.python_version()},
            "command": command}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cross_arch",
        description="Top-1 agreement of a bundle's int8 and fp32 files on this host and on "
                    "aarch64 CPUs under user-mode qemu (no binfmt handler is registered). "
                    "Needs root (a private mount namespace for an ARM /proc/cpuinfo), "
                    "qemu-aarch64 and the sysroot of `make arm-sysroot`.")
    sub = p.add_subparsers(dest="verb")
    w = sub.add_parser("worker", help="(internal) run the bundle on inputs, save predictions")
    w.add_argument("--bundle", type=Path, required=True)
    w.add_argument("--inputs", type=Path, required=True)
    w.add_argument("--result", type=Path, required=True)
    p.add_argument("--bundle", default="runs/camera_accuracy/bundle_client0",
                   help="bundle folder (default: the one `make bench-camera` leaves)")
    p.add_argument("--samples", type=int, default=1000,
                   help="stratified test images (0: all 10,000; emulation runs ~100x slower)")
    p.add_argument("--cpus", nargs="*", default=list(CPUS), choices=list(CPUS),
                   help="emulated CPUs (default: both)")
    p.add_argument("--sysroot", default=str(SYSROOT),
                   help="aarch64 sysroot of `make arm-sysroot` ($FEDCOE_ARM_SYSROOT)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per emulated run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of cross_arch.json / .md")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verb == "worker":
        worker(args.bundle, args.inputs, args.result)
        return 0
    given = list(sys.argv[1:] if argv is None else argv)
    doc = run(args, " ".join(["python -m benchmarks.cross_arch", *given]).strip())
    args.out.mkdir(parents=True, exist_ok=True)
    from fedcoe_edge.io import atomic_write_text

    atomic_write_text(args.out / JSON_NAME, json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    atomic_write_text(args.out / MD_NAME, text)
    from benchmarks import camera_accuracy

    if (args.out / camera_accuracy.JSON_NAME).is_file():  # the camera report cites this run
        camera_accuracy.main(["--markdown-only", "--out", str(args.out)])
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
