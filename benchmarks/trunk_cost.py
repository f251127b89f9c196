"""On-device training cost of the camera-size FedCoE model: federated vs frozen trunk.

One local SGD step of FedCoE's client objective (``fedcoe_loss``, the parameters
``client_update`` trains: the local level plus everything the coordinator sent) on the
camera model of :mod:`benchmarks.fedcoe` (MobileNetV3-Small trunk, K=8 + M=2 MLP heads,
224x224 RGB), with ``trunk_mode = "federated"`` (today: the trunk is sent, trained and
uploaded) and ``"frozen"`` (docs/design.md, "Trunk modes") with its feature cache off and on,
beside one step of a full MobileNetV3-Small fine-tune measured in the same run. The cached
row is the step once the batch's features are cached; its one-time fill per sample is
(cold step - warm step) / batch, a cold step being one right after the cache was emptied.
One thread; each configuration runs in its own process (peak RSS is that process's VmHWM
after warm-up and the timed steps), and the whole set is repeated in alternating order so
the ratios carry their spread.

    python -m benchmarks.trunk_cost [--repeats 3] [--steps 6] [--out benchmarks/results]

Writes ``trunk_cost.json`` and ``trunk_cost.md``. Bytes up per round: what a device
uploads after training m=2 experts (fp32 tensors, and the int8 delta the agent sends by
default), against a full V3-Small model for a FedAvg-style fine-tune.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("full_v3_small", "fedcoe_federated", "fedcoe_frozen", "fedcoe_frozen_cached")
# trunk_mode and model.trunk_cache_mb (MiB) of each FedCoE variant: the plain frozen row runs
# the trunk every step (cache off; every step here reuses one batch, so it would hit), the
# cached row is timed once its cache is warm (docs/design.md, "Trunk modes")
FEDCOE_VARIANTS = {"fedcoe_federated": ("federated", None), "fedcoe_frozen": ("frozen", 0),
                   "fedcoe_frozen_cached": ("frozen", None)}
BATCHES = (8, 16)
EXPERTS_PER_CLIENT = 2
REPO = Path(__file__).resolve().parents[1]


def _child(variant: str, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from benchmarks.memory import read_vmhwm_kb
    from fedcoe_edge.config import TrainConfig
    from fedcoe_edge.feature_cache import FeatureCache, cache_of
    from fedcoe_edge.wire import compress_delta, compressed_delta_metadata, encode_tensors

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    train = TrainConfig(experts_per_client=EXPERTS_PER_CLIENT)
    cache: FeatureCache | None = None  # the frozen trunk's feature cache, cached variant only
    if variant == "full_v3_small":
        from fedcoe_edge.mobilenet import mobilenet_v3_small

        torch.manual_seed(0)
        model: torch.nn.Module = mobilenet_v3_small(num_classes=10)
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                              weight_decay=train.weight_decay)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(model(xb), yb)

        sent = {n: v.detach().numpy() for n, v in model.state_dict().items()}
        up_fp32 = sum(v.nbytes for v in sent.values())
        up_int8 = None
        trained = sum(p.numel() for p in params)
    else:
        from benchmarks.fedcoe import camera_config
        from fedcoe_edge.losses import fedcoe_loss
        from fedcoe_edge.strategies import FedCoE, make_strategy
        from fedcoe_edge.trunk import kept_locally

        base = camera_config()
        mode, cache_mb = FEDCOE_VARIANTS[variant]
        cfg = type(base).from_dict({**base.to_dict(), "num_classes": 10, "trunk_mode": mode,
                                    **({} if cache_mb is None else {"trunk_cache_mb": cache_mb})})
        s = make_strategy("fedcoe", cfg, train, 0)
        assert isinstance(s, FedCoE)
        s.initialize()
        ids = list(range(EXPERTS_PER_CLIENT))
        sent = s.params_for(ids)
        model = s.model
        if variant == "fedcoe_frozen_cached":
            cache = cache_of(s.model.global_part.trunk)
            assert cache is not None
        named = dict(model.named_parameters())
        names = [n for n in named if kept_locally(cfg, n) or n in sent]
        params = [named[n] for n in names]
        keep = {id(p) for p in params}
        for p in model.parameters():  # as run_epochs does: only what is trained needs grads
            p.requires_grad_(id(p) in keep)
        anchor = {n: torch.from_numpy(np.array(sent[n])) for n in names if n in sent}
        mask = s.expert_mask(ids)
        opt = torch.optim.SGD(params, lr=train.lr, momentum=train.momentum,
                              weight_decay=train.weight_decay)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = model(xb, expert_mask=mask, detach_global=train.detach_global)
            return fedcoe_loss(out, yb, train, named, anchor, mask).total

        up_fp32 = sum(np.asarray(v).nbytes for v in sent.values())
        moved = {k: np.asarray(np.asarray(v) + np.asarray(1e-3 if np.issubdtype(v.dtype, np.floating)
                                                          else 1, v.dtype))
                 for k, v in sent.items()}  # a trained update
        up_int8 = len(encode_tensors(compress_delta(moved, sent), compressed_delta_metadata()))
        trained = sum(p.numel() for p in params)
    model.train()
    x = torch.from_numpy(rng.random((batch, 3, 224, 224), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 10, batch).astype(np.int64))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.clip_grad_norm)
        opt.step()
        return time.perf_counter() - t0

    times, cold = [], []
    for i in range(warmup + steps):
        if cache is not None and i >= warmup:  # the batch's first pass: trunk + keys + store
            cache.clear()
            cold.append(step())
        t = step()  # with a cache: all hits (this batch was stored by the step before)
        if i >= warmup:
            times.append(t)
    if cache is not None:
        assert cache.stats.misses == batch * (steps + 1) and cache.stats.bypassed == 0
    return {"variant": variant, "batch": batch, "step_s": statistics.median(times),
            "step_s_all": times, "cold_step_s": statistics.median(cold) if cold else None,
            "cold_step_s_all": cold, "peak_rss_mb": read_vmhwm_kb() / 1024,
            "params_trained": int(trained), "bytes_up_fp32": int(up_fp32),
            "bytes_up_int8_delta": up_int8}


def run(repeats: int, steps: int, warmup: int) -> dict[str, Any]:
    from benchmarks.harness import cpu_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs: list[dict[str, Any]] = []
    order = [(v, b) for b in BATCHES for v in VARIANTS]
    for r in range(repeats):
        for variant, batch in (order if r % 2 == 0 else order[::-1]):
            res = subprocess.run([sys.executable, "-m", "benchmarks.trunk_cost", "--child", variant,
                                  str(batch), str(steps), str(warmup)], capture_output=True,
                                 text=True, env=env, cwd=REPO, timeout=1800)
            if res.returncode != 0:
                raise SystemExit(f"{variant} batch {batch}: {res.stderr.strip()[-2000:]}")
            row = json.loads(res.stdout.strip().splitlines()[-1])
            row["repeat"] = r
            runs.append(row)
            print(f"repeat {r} {variant:<17} batch {batch:>2}: {row['step_s'] * 1e3:7.0f} ms/step, "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return {"runs": runs, "summary": summarize(runs), "repeats": repeats, "steps": steps,
            "warmup": warmup, "threads": 1, "input": [3, 224, 224],
            "experts_per_client": EXPERTS_PER_CLIENT, "cpu": cpu_model(),
            "loadavg_at_end": list(os.getloadavg()), "cpus": os.cpu_count(),
            "command": f"python -m benchmarks.trunk_cost --repeats {repeats} --steps {steps}"}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, batch): median step time and RSS over repeats, and the ratio to the full
    fine-tune step of the same repeat (min / median / max over repeats); for the cached
    variant also the one-time fill cost per sample, (cold step - warm step) / batch."""
    rows = []
    for batch in BATCHES:
        base = {r["repeat"]: r for r in runs if r["variant"] == "full_v3_small" and r["batch"] == batch}
        for variant in VARIANTS:
            mine = [r for r in runs if r["variant"] == variant and r["batch"] == batch]
            if not mine:  # a JSON from before the variant existed
                continue
            ratios = [r["step_s"] / base[r["repeat"]]["step_s"] for r in mine]
            rss = [r["peak_rss_mb"] / base[r["repeat"]]["peak_rss_mb"] for r in mine]
            rows.append({
                "variant": variant, "batch": batch,
                "step_ms": 1e3 * statistics.median(r["step_s"] for r in mine),
                "step_ratio": [min(ratios), statistics.median(ratios), max(ratios)],
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                "rss_ratio": [min(rss), statistics.median(rss), max(rss)],
                "params_trained": mine[0]["params_trained"],
                "bytes_up_fp32": mine[0]["bytes_up_fp32"],
                "bytes_up_int8_delta": mine[0]["bytes_up_int8_delta"],
            })
            fills = [1e3 * (r["cold_step_s"] - r["step_s"]) / batch for r in mine
                     if r.get("cold_step_s") is not None]
            if fills:
                rows[-1]["fill_ms_per_sample"] = [min(fills), statistics.median(fills), max(fills)]
    return rows


def closing_text(camera: dict[str, Any] | None) -> str:
    """What this benchmark does not measure, and where the camera accuracy run's report is
    (``camera``: that run's ``camera_accuracy.json``, when it sits next to this report)."""
    if camera is None:
        return ("Not measured here: accuracy on real camera data (`python -m "
                "benchmarks.camera_accuracy` trains FedCoE with a pretrained, frozen trunk on "
                "Fashion-MNIST; its report is `camera_accuracy.md`), and a frozen vs federated "
                "trunk on that data.")
    c, top1 = camera["config"], camera["result"]["top1"]["torch_fp32"]
    return (f"Accuracy on real camera data with the trunk frozen is in `camera_accuracy.md`: "
            f"Fashion-MNIST at {c['size']}x{c['size']}, trunk pretrained on a public slice "
            f"({100 * camera['pretrain']['val_acc']:.2f}% for trunk + linear head on held-out "
            f"public images), {c['rounds']} rounds over {c['clients']} clients: "
            f"{100 * top1['global']:.2f}% global-path and {100 * top1['personal']:.2f}% "
            f"personal top-1 (torch fp32) on {camera['result']['samples']:,} test images. Not "
            f"measured: a frozen vs federated trunk on that data.")


def markdown(doc: dict[str, Any], camera: dict[str, Any] | None = None) -> str:
    def mb(b: int | None) -> str:
        return "n/a" if b is None else f"{b / 1e6:.2f} MB"

    def spread(r: list[float]) -> str:
        return f"{r[1]:.2f}x ({r[0]:.2f}-{r[2]:.2f})"

    lines = [
        "# On-device training cost: federated vs frozen trunk (camera-size FedCoE)",
        "",
        f"One SGD step of FedCoE's client objective on the camera model (MobileNetV3-Small "
        f"trunk, K=8 + M=2 MLP heads, {EXPERTS_PER_CLIENT} experts held, 3x224x224, 1 thread), "
        "beside one step of a full MobileNetV3-Small fine-tune in the same run. Ratios: median "
        f"(min-max) over {doc['repeats']} repeats run in alternating order, each the median of "
        f"{doc['steps']} steps after {doc['warmup']} warm-up steps; peak RSS is the process's "
        f"VmHWM. CPU: {doc['cpu']} ({doc.get('cpus')} cores, load average "
        f"{', '.join(f'{v:.1f}' for v in doc.get('loadavg_at_end') or [])} at the end of the run: "
        "other jobs shared the cores, so absolute times are noisy; the ratios compare steps "
        f"of the same repeat). Command: `{doc['command']}`.",
        "",
        "| model | batch | ms/step | vs full V3-Small step | peak RSS | vs full RSS | "
        "params trained | bytes up / round (fp32) | bytes up (int8 delta) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"full_v3_small": "full MobileNetV3-Small fine-tune",
             "fedcoe_federated": "FedCoE, trunk federated (today)",
             "fedcoe_frozen": "FedCoE, trunk frozen",
             "fedcoe_frozen_cached": "FedCoE, trunk frozen, features cached"}
    for r in doc["summary"]:
        lines.append(f"| {names[r['variant']]} | {r['batch']} | {r['step_ms']:.0f} | "
                     f"{spread(r['step_ratio'])} | {r['peak_rss_mb']:.0f} MB | "
                     f"{spread(r['rss_ratio'])} | {r['params_trained']:,} | "
                     f"{mb(r['bytes_up_fp32'])} | {mb(r['bytes_up_int8_delta'])} |")
    fed = next(r for r in doc["summary"] if r["variant"] == "fedcoe_federated")
    frz = next(r for r in doc["summary"] if r["variant"] == "fedcoe_frozen")
    lines += [
        "",
        f"Bytes up per round with the trunk frozen: {mb(frz['bytes_up_fp32'])} fp32, "
        f"{frz['bytes_up_fp32'] / fed['bytes_up_fp32']:.1%} of the federated trunk's "
        f"{mb(fed['bytes_up_fp32'])} (int8 deltas: {mb(frz['bytes_up_int8_delta'])} vs "
        f"{mb(fed['bytes_up_int8_delta'])}). The same figures hold for the download of a "
        "round's task. The frozen trunk is shipped once (a pretrained file, hash-checked: "
        "`model.trunk_weights` / `trunk_sha256`).",
    ]
    lines += cache_sentence(doc["summary"])
    lines += [
        "",
        closing_text(camera),
    ]
    return "\n".join(lines) + "\n"


def cache_sentence(summary: list[dict[str, Any]]) -> list[str]:
    """The paragraph on the frozen trunk's feature cache (none for a JSON without its rows)."""
    cached = [r for r in summary if r["variant"] == "fedcoe_frozen_cached"]
    if not cached:
        return []
    plain = {r["batch"]: r for r in summary if r["variant"] == "fedcoe_frozen"}
    parts = [f"{r['step_ms']:.0f} ms at batch {r['batch']} ({r['step_ratio'][1]:.2f}x the full "
             f"fine-tune's step, {r['step_ms'] / plain[r['batch']]['step_ms']:.2f}x the uncached "
             f"frozen step), after a one-time fill of {r['fill_ms_per_sample'][1]:.1f} ms per "
             f"sample ({r['fill_ms_per_sample'][0]:.1f}-{r['fill_ms_per_sample'][2]:.1f})"
             for r in cached if r["batch"] in plain and "fill_ms_per_sample" in r]
    return ["", "Features cached (`model.trunk_cache_mb`, default 256 MiB, docs/design.md, "
            "\"Trunk modes\"): a frozen trunk's features are computed once per sample and reused by every "
            "later epoch and round while they fit in the budget (576 fp32 features + ~0.7 KB of "
            "bookkeeping per sample: about 89k samples in 256 MiB). Once warm, a step costs "
            + "; ".join(parts) + ": the trunk forward under no_grad plus a sha256 key of the "
            "sample, paid on its first pass only."]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trunk_cost", description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=4, metavar=("VARIANT", "BATCH", "STEPS", "WARMUP"),
                   help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--markdown-only", action="store_true",
                   help="rewrite trunk_cost.md from an existing trunk_cost.json")
    args = p.parse_args(argv)
    camera_json = args.out / "camera_accuracy.json"  # the camera run's report, if it landed
    camera = json.loads(camera_json.read_text()) if camera_json.is_file() else None
    if args.markdown_only:
        doc = json.loads((args.out / "trunk_cost.json").read_text())
        (args.out / "trunk_cost.md").write_text(markdown(doc, camera))
        return 0
    if args.child:
        variant, batch, steps, warmup = args.child
        print(json.dumps(_child(variant, int(batch), int(steps), int(warmup))))
        return 0
    doc = run(args.repeats, args.steps, args.warmup)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trunk_cost.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "trunk_cost.md").write_text(markdown(doc, camera))
    print(markdown(doc, camera))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
