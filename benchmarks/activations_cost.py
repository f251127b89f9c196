"""What int8 activations cost on this CPU: a bundle's trunk quantized with uint8 and with int8
activations, timed against each other and against fp32 in one run (docs/bundle.md, "Same
answers on every CPU").

Signed (s8) activations make a bundle's int8 answers the same on x86 and ARM
(``benchmarks.cross_arch``), but x86 onnxruntime has its fast int8 kernels for uint8
activations. This measures the price on the CPU it runs on: the bundle's fp32 trunk
(``fp32/trunk.onnx``) is quantized both ways here, with the export's own recipe
(:func:`export.quantize.quantize_part`, static int8, graph fixes, 7-bit weights) calibrated on
Fashion-MNIST training images, then the three sessions (one intra-op thread each) are timed
round-robin: every block calls each model in turn, the order rotated per block, so each
ratio is taken under the same load. Ratios: median (min-max) over the blocks.

Writes ``activations_cost.json`` and ``.md`` under ``--out``. Command:
``python -m benchmarks.activations_cost --bundle runs/camera_accuracy/bundle_client0``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
JSON_NAME, MD_NAME = "activations_cost.json", "activations_cost.md"
VARIANTS = ("fp32", "int8 u8", "int8 s8")


def calibration_images(size: int, samples: int, data_dir: str | None) -> np.ndarray:
    """``samples`` Fashion-MNIST training images as the camera model sees them:
    ``(samples, 3, size, size)`` float32."""
    from fedcoe_edge.data.fmnist import load_split
    from fedcoe_edge.pretrain import to_camera

    x, _ = load_split("train", data_dir)
    keep = np.random.default_rng(0).choice(len(x), size=samples, replace=False)
    return to_camera(x[np.sort(keep)], size)


def fp32_trunk(bundle: Path) -> Path:
    """The bundle's fp32 trunk, or exit with one line saying what is missing."""
    src = bundle / "fp32" / "trunk.onnx"
    if not src.is_file():
        raise SystemExit(f"activations_cost: {src} missing (a bundle exported with "
                         "--quantize int8 keeps its fp32 copies there)")
    return src


def build_trunks(bundle: Path, work: Path, calib: np.ndarray) -> dict[str, Path]:
    """The bundle's fp32 trunk and its u8 and s8 static int8 quantizations."""
    from export.quantize import Activations, QuantizeOptions, QuantMode, quantize_part

    src = fp32_trunk(bundle)
    out = {"fp32": src}
    for act in (Activations.U8, Activations.S8):
        dst = work / f"trunk_{act.value}.onnx"
        opts = QuantizeOptions(mode=QuantMode.STATIC, activations=act)
        quantize_part(src, dst, _input_name(src), calib, opts)
        out[f"int8 {act.value}"] = dst
    return out


def _input_name(path: Path) -> str:
    import onnxruntime as ort

    return str(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
               .get_inputs()[0].name)


def time_round_robin(models: dict[str, Path], x: np.ndarray, blocks: int, calls: int
                     ) -> dict[str, list[float]]:
    """Per block and model, the median ms of ``calls`` single-image calls (after warm-up),
    the models taken in turn, each block in :func:`benchmarks.compare.repeat_order`'s order
    (rotated and alternated per block, as the latency report's round-robin), and every other
    call in reverse."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in models.items()}
    names = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for i in range(10):
            s.run(None, {names[k]: x[i % len(x)][None]})
    from benchmarks.compare import repeat_order

    medians: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for b in range(blocks):
        rot = [order[j] for j in repeat_order(len(order), b)]
        per: dict[str, list[float]] = {k: [] for k in models}
        for i in range(calls):
            for k in rot if i % 2 == 0 else reversed(rot):
                xi = x[i % len(x)][None]
                t0 = time.perf_counter()
                sessions[k].run(None, {names[k]: xi})
                per[k].append((time.perf_counter() - t0) * 1e3)
        for k in models:
            medians[k].append(float(np.median(per[k])))
    return medians


def summarize(medians: dict[str, list[float]]) -> dict[str, Any]:
    """p50 per model (median over blocks) and each int8 variant's ratio to fp32 and s8 to u8,
    as median (min-max) over blocks."""
    def ratio(a: str, b: str) -> dict[str, float]:
        r = np.asarray(medians[a]) / np.asarray(medians[b])
        return {"median": float(np.median(r)), "min": float(r.min()), "max": float(r.max())}

    return {"p50_ms": {k: float(np.median(v)) for k, v in medians.items()},
            "ratios": {"int8 u8 / fp32": ratio("int8 u8", "fp32"),
                       "int8 s8 / fp32": ratio("int8 s8", "fp32"),
                       "int8 s8 / int8 u8": ratio("int8 s8", "int8 u8")}}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["result"]
    lines = ["# What int8 activations cost on this CPU", "",
             f"The trunk of `{doc['bundle']}` at {doc['size']}x{doc['size']}, one image per call, "
             f"one thread, on {doc['env']['cpu']} (onnxruntime {doc['env']['onnxruntime']}); "
             f"{doc['blocks']} round-robin blocks of {doc['calls']} calls per model. "
             "Ratios: median (min-max) over blocks.", "",
             "| trunk | p50 ms |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in s["p50_ms"].items()]
    lines += ["", "| ratio | median | min-max |", "|---|---|---|"]
    lines += [f"| {k} | {r['median']:.2f}x | {r['min']:.2f}-{r['max']:.2f} |"
              for k, r in s["ratios"].items()]
    lines += ["", f"Command: `{doc['command']}`.", ""]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.activations_cost",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path("runs/camera_accuracy/bundle_client0"),
                   help="bundle folder with fp32/ copies (default: `make bench-camera`'s)")
    p.add_argument("--blocks", type=int, default=5, help="round-robin repeat blocks")
    p.add_argument("--calls", type=int, default=200, help="calls per model per block")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.blocks < 1 or args.calls < 1 or args.calibration_samples < 1:
        raise SystemExit("activations_cost: --blocks, --calls and --calibration-samples "
                         "must be >= 1")
    import onnxruntime as ort

    from benchmarks.harness import cpu_model
    from fedcoe_edge.io import atomic_write_text

    fp32_trunk(args.bundle)  # before any work
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    size = int(manifest["model"]["input_shape"][-1])
    calib = calibration_images(size, args.calibration_samples, args.data_dir)
    with tempfile.TemporaryDirectory(prefix="fedcoe-actcost-") as tmp:
        models = build_trunks(args.bundle, Path(tmp), calib)
        medians = time_round_robin(models, calib, args.blocks, args.calls)
    given = list(sys.argv[1:] if argv is None else argv)
    doc = {"bundle": str(args.bundle), "size": size, "blocks": args.blocks,
           "calls": args.calls, "result": summarize(medians), "block_medians_ms": medians,
           "env": {"cpu": cpu_model(), "onnxruntime": ort.__version__},
           "command": " ".join(["python -m benchmarks.activations_cost", *given]).strip()}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / JSON_NAME, json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    atomic_write_text(args.out / MD_NAME, text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
