"""What ``MoESession.run`` costs beyond its onnxruntime sessions, as a ratio to MobileNetV3-Small.

``python -m benchmarks.glue_cost [--workdir DIR] [--smoke]`` times, round-robin in one
process (docs/bundle.md, "Runtime cost"): MobileNetV3-Small int8 (one call), the sparse
top-2 ``MoESession.run`` on the camera int8 bundle, the same four sessions called back to
back with no numpy between them, the trunk and heads merged into one graph
(``onnx.compose``, a prototype of fewer calls) plus the two routed experts, the trunk
alone, and ``MoESession(fused="dense")`` / ``fused="if"``: the whole pass, routing and
mixture included, as one onnxruntime call. 224x224, batch 1, one thread.

Each call is timed by its thread's CPU time (``time.thread_time``): on a machine shared
with other jobs a preempted call is then not charged the wait, which wall time would add
to whichever call was running. Blocks of rounds in the order of
:func:`benchmarks.compare.repeat_order`; each row's ratio is median (min-max) over the
blocks of its p50 over V3-Small's p50 in the same block.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.compare import repeat_order
from benchmarks.harness import ArtifactStore, Case, prepare

__all__ = ["glue_cost", "glue_rss", "main", "rss_target"]


def _merged_trunk_heads(bundle: Path, out: Path) -> Path:
    """trunk.onnx and heads.onnx as one graph that also outputs the features."""
    import onnx
    import onnx.compose

    trunk = onnx.load(str(bundle / "trunk.onnx"))
    heads = onnx.compose.add_prefix(onnx.load(str(bundle / "heads.onnx")), "h_")
    feats = trunk.graph.output[0].name
    merged = onnx.compose.merge_models(trunk, heads, io_map=[(feats, heads.graph.input[0].name)])
    merged.graph.output.insert(0, onnx.helper.make_tensor_value_info(
        feats, onnx.TensorProto.FLOAT, None))
    onnx.save(merged, str(out))
    return out


def glue_cost(store: ArtifactStore, smoke: bool = False, blocks: int = 5,
              rounds: int = 60, warmup: int = 20) -> dict[str, list[float]]:
    """Per row, its p50 (ms of thread CPU time) in each block; row ``v3s`` is the baseline."""
    from benchmarks.fedcoe import int8_bundle
    from benchmarks.ort_session import make_session
    from fedcoe_edge.fused import FUSE_MODES
    from fedcoe_edge.runtime import MoESession

    size = 32 if smoke else 224
    bundle = int8_bundle(store, smoke=smoke)
    base = prepare(Case("tiny_convnet" if smoke else "mobilenet_v3_small", "onnxruntime",
                        "int8", size), store)
    sess = MoESession(bundle, threads=1)
    x = np.random.default_rng(0).standard_normal((1, *sess.input_shape)).astype(np.float32)
    routed = sess.run(x).experts_run
    sessions, names = sess._sessions, sess._input_names  # the objects run() itself calls
    experts = [(sessions[f"expert_g{k}"], names[f"expert_g{k}"]) for k in routed]

    def back_to_back() -> None:
        f = sessions["trunk"].run(None, {names["trunk"]: x})[0] if "trunk" in sessions else x
        sessions["heads"].run(None, {names["heads"]: f})
        for s, n in experts:
            s.run(None, {n: f})

    timers: dict[str, Callable[[], object]] = {
        "v3s": base.run,
        "run": lambda: sess.run(x),
        "sessions back to back": back_to_back,
    }
    if "trunk" in sessions and "heads" in sessions:
        merged = make_session(_merged_trunk_heads(bundle, store.root / "trunk_heads.onnx"))
        m_in = merged.get_inputs()[0].name

        def merged_call() -> None:
            f = merged.run(None, {m_in: x})[0]
            for s, n in experts:
                s.run(None, {n: f})

        timers["trunk+heads one graph, 2 experts"] = merged_call
        timers["trunk alone"] = lambda: sessions["trunk"].run(None, {names["trunk"]: x})
    for mode in FUSE_MODES:  # the whole pass as one graph (MoESession(fused=...))
        fused = MoESession(bundle, threads=1, fused=mode)
        timers[f"run, fused={mode!r} (one call)"] = (lambda f: lambda: f.run(x))(fused)
    fns = list(timers.values())
    for fn in fns:
        for _ in range(warmup):
            fn()
    p50: dict[str, list[float]] = {k: [] for k in timers}
    for b in range(blocks):
        times: list[list[float]] = [[] for _ in fns]
        order = repeat_order(len(fns), b)
        for _ in range(rounds):
            for i in order:
                t0 = time.thread_time()
                fns[i]()
                times[i].append(time.thread_time() - t0)
        for k, t in zip(timers, times, strict=True):
            p50[k].append(1e3 * statistics.median(t))
    base.close()
    return p50


def rss_target(bundle: str, fused: str, input_shape: Sequence[int], iters: int = 3) -> None:
    """Memory probe target: open ``bundle`` (``fused``: ``"no"`` or a fuse mode) and run it."""
    from fedcoe_edge.runtime import MoESession

    sess = MoESession(bundle, threads=1, fused=False if fused == "no" else fused)
    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    for _ in range(iters):
        sess.run(x)


def glue_rss(store: ArtifactStore, smoke: bool = False, repeats: int = 3) -> dict[str, list[float]]:
    """Peak RSS growth (MiB) over an interpreter that only imported onnxruntime and numpy,
    each row in ``repeats`` fresh processes (:func:`benchmarks.memory.peak_rss_increase`)."""
    from benchmarks.fedcoe import int8_bundle
    from benchmarks.memory import MemoryTarget, peak_rss_increase
    from fedcoe_edge.fused import FUSE_MODES

    size = 32 if smoke else 224
    bundle = int8_bundle(store, smoke=smoke)
    base = prepare(Case("tiny_convnet" if smoke else "mobilenet_v3_small", "onnxruntime",
                        "int8", size), store)
    assert base.memory is not None
    from fedcoe_edge.runtime import MoESession

    shape = list(MoESession(bundle).input_shape)
    targets = {"v3s": base.memory}
    for fused in ("no", *FUSE_MODES):
        targets["run" if fused == "no" else f"run, fused={fused!r}"] = MemoryTarget(
            "benchmarks.glue_cost:rss_target",
            {"bundle": str(bundle), "fused": fused, "input_shape": shape})
    base.close()
    out: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(repeats):
        for k, t in targets.items():
            out[k].append(peak_rss_increase(t).increase_mb)
    return out


def _ratio(row: Sequence[float], base: Sequence[float]) -> str:
    r = sorted(a / b for a, b in zip(row, base, strict=True))
    return f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built files here")
    parser.add_argument("--smoke", action="store_true", help="the tiny bundle, 32x32")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--rss", action="store_true",
                        help="peak RSS growth in fresh processes instead of CPU time")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedcoe-glue-") as tmp:
        store = ArtifactStore(args.workdir or tmp)
        if args.rss:
            rss = glue_rss(store, args.smoke)
            print(f"{'what':<36} {'peak RSS growth MiB, median (min-max) of 3 processes':>8}")
            for k, v in rss.items():
                med = statistics.median(v)
                print(f"{k:<36} {med:7.1f} ({min(v):.1f}-{max(v):.1f})  "
                      f"{med / statistics.median(rss['v3s']):.2f}x")
            return 0
        p50 = glue_cost(store, args.smoke, args.blocks, args.rounds)
    load: Any = "?"
    if Path("/proc/loadavg").exists():
        load = Path("/proc/loadavg").read_text().split()[0]
    print(f"load average {load}; thread CPU time, {args.blocks} blocks x {args.rounds} rounds")
    print(f"{'what':<36} {'p50 ms':>8}  ratio to V3-Small int8, median (min-max) over blocks")
    for k, v in p50.items():
        print(f"{k:<36} {statistics.median(v):8.3f}  {_ratio(v, p50['v3s'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
