"""``fedcoe export`` and ``fedcoe predict``: checkpoint -> int8 ONNX bundle -> predictions.

``export`` turns one client's FedCoE model (arXiv 2605.21264: shared global experts plus its
private local level) into a device bundle (docs/design.md, section 7), calibrating int8 on that
client's own training split, and reports accuracy, parity and sizes on its held-out split.
``export --cold`` builds a cold device's starter bundle from the global model alone (the
coordinator's checkpoint has no private level: a cold device never trains one), every
global expert in it (docs/daemons.md, "A cold device's starter bundle").
The split is rebuilt from the ``simulation`` section of ``model.json`` with
:func:`fedcoe_edge.data.make_federation`, so it is the split the simulation evaluated.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fedcoe_edge.errors import ConfigError, DataError, ValidationError

ALGORITHM_DEFAULT = "fedcoe"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="export a client's model to an int8 ONNX bundle",
        description="Export one client's dual-level MoE to a device bundle (ONNX per part, "
                    "int8, manifest with hashes) and report accuracy and sizes.")
    p.add_argument("--checkpoint-dir", required=True, type=Path,
                   help="DIR/checkpoints (with one folder per algorithm) or a folder holding model.json")
    p.add_argument("--algorithm", default=ALGORITHM_DEFAULT,
                   help="algorithm folder under --checkpoint-dir (default: fedcoe)")
    p.add_argument("--client", default=None,
                   help="client id whose private level is exported (required unless --cold)")
    p.add_argument("--cold", action="store_true",
                   help="a cold device's starter bundle from the global model alone (e.g. the "
                        "coordinator's STATE/checkpoint): no private level needed, every global "
                        "expert; fp32 unless --calibration-data (or --quant-mode dynamic) is given")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--quantize", choices=("int8", "fp32"), default="int8",
                   help="weights of the deployed parts")
    p.add_argument("--quant-mode", choices=("auto", "static", "dynamic"), default="auto",
                   help="int8 scheme: auto picks static or dynamic per part (default)")
    p.add_argument("--calibration-samples", type=int, default=128,
                   help="samples of the client's training split used to calibrate int8")
    p.add_argument("--activations", choices=("u8", "s8"), default="u8",
                   help="static int8 activation type: u8 (default, fast on x86) or s8 (the "
                        "same answers on x86 and ARM, slower on x86; docs/bundle.md)")
    p.add_argument("--calibration-data", type=Path, default=None,
                   help=".npy of inputs to calibrate on when model.json has no simulation config")
    p.add_argument("--experts", default="held",
                   help="global experts in the bundle: held (the client's top-m), all, or ids like 0,2")
    p.add_argument("--no-fp32", action="store_true", help="leave out the fp32 parity copies")
    p.add_argument("--no-fused", action="store_true", help="leave out the fused dense graph")
    p.add_argument("--tar", action="store_true", help="also write BUNDLE.tar")
    p.add_argument("--sign-key-file", type=Path, default=None,
                   help="hex HMAC federation key (the device's key) to sign the manifest with")
    p.add_argument("--sign-vendor-key", type=Path, default=None,
                   help="Ed25519 private key (PEM or hex) to sign the manifest with instead")
    p.add_argument("--federation", default=None,
                   help="federation id written into the (signed) manifest; devices refuse "
                        "another federation's bundle (default: model.json's, if any)")
    p.add_argument("--bundle-version", type=int, default=None,
                   help="version written into the (signed) manifest; readers refuse one older "
                        "than they accepted (default: the checkpoint's global version)")
    p.add_argument("--report", type=Path, default=None, help="write the export report (JSON) here")
    p.set_defaults(func=run_export)

    q = subparsers.add_parser("predict", help="classify inputs with a bundle (onnxruntime only)",
                              description="Run a bundle on FILE.npy and print, per sample, the class "
                                          "(its name when the bundle carries the federation's class "
                                          "list) and the probabilities.")
    q.add_argument("--bundle", required=True, type=Path, help="bundle folder or .tar")
    q.add_argument("--input", required=True, type=Path,
                   help=".npy (numpy.save) of floats, shape (N, *input_shape) or one sample of shape "
                        "input_shape (the bundle's model.input_shape, e.g. 1 8 8 for C H W), "
                        "scaled as in training: image pixels divided by 255 into [0, 1], channels "
                        "first; not an image file")
    q.add_argument("--fp32", action="store_true", help="use the fp32 parity files")
    q.add_argument("--global-only", action="store_true", help="skip the local level (cold start)")
    q.add_argument("--threads", type=int, default=1, help="intra-op threads")
    q.add_argument("--providers", default="CPUExecutionProvider",
                   help="comma-separated onnxruntime execution providers, in priority order")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    q.add_argument("--key-file", default=None,
                   help="hex HMAC federation key the manifest must be signed with (an unsigned "
                        "or differently signed manifest is then refused)")
    q.add_argument("--vendor-public-key", default=None,
                   help="Ed25519 public key (PEM or hex) the manifest may be signed with")
    q.add_argument("--min-version", type=int, default=0,
                   help="refuse a bundle whose signed version is older than this (a rollback)")
    q.add_argument("--federation", default=None,
                   help="refuse a bundle that is not this federation's")
    q.set_defaults(func=run_predict)


# --- export -----------------------------------------------------------------------------


def resolve_checkpoint(path: Path, algorithm: str) -> Path:
    """The folder holding model.json: ``path`` itself or ``path/<algorithm>``."""
    if (path / "model.json").is_file():
        return path
    if (path / algorithm / "model.json").is_file():
        return path / algorithm
    if not path.is_dir():
        raise DataError(f"--checkpoint-dir {path} does not exist")
    found = sorted(p.name for p in path.iterdir() if (p / "model.json").is_file())
    raise DataError(f"--checkpoint-dir {path}: no model.json there or under {algorithm}/ "
                    f"(algorithms found: {', '.join(found) or 'none'})")


def held_experts(spec: str, meta: dict[str, Any], client: str, k_total: int) -> list[int]:
    """Parse ``--experts``: held (top-m of the client's affinity row), all, or a list of ids."""
    from fedcoe_edge.aggregate import top_m

    if spec == "all":
        return list(range(k_total))
    if spec == "held":
        assigned = (meta.get("experts") or {}).get(client)
        if assigned is not None:  # the assignment the client last trained with
            return sorted(int(k) for k in assigned)
        row = (meta.get("affinity") or {}).get(client)
        if row is None:
            return list(range(k_total))  # no affinity yet: the server sends all K
        m = int(((meta.get("simulation") or {}).get("train") or {}).get("experts_per_client", k_total))
        return top_m(np.asarray(row, dtype=np.float64), min(max(m, 1), k_total))
    try:
        ids = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise ConfigError(f"--experts must be held, all or ids like 0,2; got {spec!r}") from None
    if not ids or any(not 0 <= k < k_total for k in ids):
        raise ConfigError(f"--experts ids must be in [0, {k_total}), got {spec!r}")
    return ids


def client_split(meta: dict[str, Any], client: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``client``'s (x_train, y_train, x_test, y_test) and the federation's global test set,
    rebuilt from model.json's simulation config."""
    from fedcoe_edge.data import make_federation

    sim = meta.get("simulation")
    if not isinstance(sim, dict):
        raise DataError("model.json has no simulation config to rebuild the client's data from; "
                        "pass --calibration-data FILE.npy")
    try:
        fed = make_federation(sim["dataset"], sim["partition"], int(sim["clients"]),
                              int(sim["new_clients"]), int(meta["seed"]), float(sim["alpha"]),
                              int(sim["min_samples"]), data_fraction=float(sim.get("data_fraction", 1.0)),
                              data_dir=sim.get("data_dir"),
                              image_shape=tuple(sim["image_shape"]) if sim.get("image_shape") else None)
    except KeyError as exc:
        raise DataError(f"model.json simulation config lacks {exc}") from None
    if client not in fed.clients:
        raise DataError(f"client {client!r} is not a training client of this federation "
                        f"(clients: {', '.join(sorted(fed.clients, key=_id_key))})")
    d = fed.clients[client]
    return d.x_train, d.y_train, d.x_test, d.y_test, (fed.x_global_test, fed.y_global_test)


def _id_key(cid: str) -> tuple[int, str]:
    return (int(cid), "") if cid.isdigit() else (1 << 30, cid)


def load_npy(path: Path, what: str) -> np.ndarray:
    """A float array from ``.npy`` (no pickles); other dtypes are an error."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"{what} {path} is not a readable .npy array: {exc}") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{what} {path}: expected floating-point values, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def quiet_libraries(verbose: bool) -> None:
    """The exporter and quantizer log every rewrite at INFO (some on the root logger)."""
    if verbose:
        return
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def signing_keys(key_file: Path | None, vendor_key: Path | None) -> Any:
    """``--sign-key-file`` / ``--sign-vendor-key`` as BundleKeys (None: an unsigned bundle)."""
    from fedcoe_edge.bundle_sig import BundleKeys, read_ed25519_key, read_key_file

    if key_file is None and vendor_key is None:
        return None
    return BundleKeys(
        hmac_key=read_key_file(key_file, "--sign-key-file") if key_file is not None else None,
        ed25519_private=(read_ed25519_key(vendor_key, private=True)
                         if vendor_key is not None else None))


def run_export(args: argparse.Namespace) -> int:
    import torch

    from export.bundle import build_bundle, calibration_sample, write_tar
    from export.quantize import Activations, QuantizeOptions, QuantMode
    from fedcoe_edge.checkpoint import load_checkpoint
    from fedcoe_edge.training import build_model, load_arrays

    torch.set_num_threads(1)
    quiet_libraries(getattr(args, "verbose", False))
    if args.calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be >= 1, got {args.calibration_samples}")
    if args.client is None and not args.cold:
        raise ConfigError("give --client ID (a training client's bundle) or --cold (a cold "
                          "device's starter bundle from the global model)")
    folder = resolve_checkpoint(args.checkpoint_dir, args.algorithm)
    cfg, global_state, _, meta = load_checkpoint(folder)
    client = str(args.client) if args.client is not None else "cold"
    local_file = folder / f"client_{client}.safetensors"
    if args.cold:
        local_state = None  # the model's initial local level: a cold device never uses it
    else:
        if cfg.num_local_experts > 0 and not local_file.is_file():
            raise DataError(f"checkpoint {folder} has no private state for client {client!r} "
                            f"(clients with state: {', '.join(meta.get('clients', [])) or 'none'}); "
                            "for a cold device's starter bundle use --cold")
        _, _, local_state, _ = load_checkpoint(folder, client if local_file.is_file() else None)
    model = build_model(cfg, int(meta.get("seed", 0)))
    try:
        load_arrays(model, global_state)
        if local_state:
            load_arrays(model, local_state)
    except (KeyError, RuntimeError) as exc:
        raise DataError(f"checkpoint {folder} does not fit its model.json: {exc}") from None
    model.eval()
    held = held_experts("all" if args.cold and args.experts == "held" else args.experts, meta,
                        client, cfg.num_global_experts)
    keys = signing_keys(args.sign_key_file, args.sign_vendor_key)
    federation = args.federation if args.federation is not None else meta.get("federation")
    version = args.bundle_version if args.bundle_version is not None else int(meta.get("version") or 0)
    if version < 0:
        raise ConfigError(f"--bundle-version must be >= 0, got {version}")

    extra: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    mode = QuantMode.FP32 if args.quantize == "fp32" else {
        "auto": QuantMode.AUTO, "static": QuantMode.STATIC, "dynamic": QuantMode.DYNAMIC}[args.quant_mode]
    if args.calibration_data is not None:
        x_cal_all = load_npy(args.calibration_data, "--calibration-data")
        x_test = y_test = None
    elif args.cold:
        x_cal_all, mode = cold_inputs(cfg.input_shape, args.calibration_samples, mode)
        x_test = y_test = None
    else:
        x_cal_all, _, x_test, y_test, extra["global_test"] = client_split(meta, client)
    opts = QuantizeOptions(mode=mode, calibration_samples=args.calibration_samples,
                           activations=Activations(args.activations))
    calib = calibration_sample(x_cal_all, opts.calibration_samples, opts.seed)
    manifest = build_bundle(model, args.out, calibration=calib, held=held, options=opts,
                            include_fp32=not args.no_fp32 or mode is QuantMode.FP32,
                            include_fused=not args.no_fused,
                            meta={"client_id": client, "algorithm": meta.get("algorithm"),
                                  **({"role": "cold"} if args.cold else {}),
                                  "global_version": meta.get("version"),
                                  "checkpoint": str(folder),
                                  **({"classes": list(meta["classes"])} if meta.get("classes") else {})},
                            keys=keys, federation=federation, version=version)
    tar_path = write_tar(args.out) if args.tar else None
    report = export_report(model, args.out, manifest, held,
                           x_test if x_test is not None else calib, y_test, extra)
    report.update({"client": client, "algorithm": meta.get("algorithm"), "cold": bool(args.cold),
                   "tar": str(tar_path) if tar_path else None,
                   "eval_data": ("client test split" if y_test is not None else
                                 "random inputs" if args.cold and args.calibration_data is None
                                 else "calibration data")})
    if args.report is not None:
        from fedcoe_edge.io import atomic_write_text

        atomic_write_text(args.report, json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


def cold_inputs(input_shape: tuple[int, ...], n: int, mode: Any) -> tuple[np.ndarray, Any]:
    """Inputs for a cold starter bundle exported without ``--calibration-data``: the
    coordinator holds no device data, so uniform [0, 1) samples (the scaled inputs' range,
    seeded) only serve the parity report. int8 needs representative inputs (static) or no
    convolutions (dynamic), so ``auto`` writes fp32 here: the cold device replaces the gate
    and experts with fp32 graphs of what it downloads anyway, and only the trunk stays the
    bundle's. Static int8 on noise would mis-scale activations, so it is refused."""
    from export.quantize import QuantMode

    if mode is QuantMode.STATIC:
        raise ConfigError("--cold --quant-mode static needs --calibration-data FILE.npy "
                          "(inputs like the device's); without it use --quant-mode dynamic "
                          "(models without convolutions) or fp32")
    x = np.random.default_rng(0).random((n, *input_shape), dtype=np.float32)
    return x, (QuantMode.FP32 if mode is QuantMode.AUTO else mode)


def parity_metrics(model: Any, sessions: dict[str, Any], held: list[int], x: np.ndarray,
                   y: np.ndarray | None) -> dict[str, Any]:
    """torch vs ONNX fp32 vs int8 on ``x``: accuracies, max |dp|, int8 top-1 agreement."""
    import torch

    from fedcoe_edge.training import predict_probs

    mask = torch.zeros(model.cfg.num_global_experts, dtype=torch.bool)
    mask[held] = True
    p_torch = predict_probs(model, x, expert_mask=mask)
    fp32, int8 = sessions.get("fp32"), sessions.get("int8")
    p_fp32 = fp32.predict(x) if fp32 is not None else None
    p_int8 = int8.predict(x) if int8 is not None else None
    # without fp32 copies (--no-fp32) the int8 files are compared with torch instead
    p_ref = p_fp32 if p_fp32 is not None else p_torch

    def acc(p: np.ndarray | None) -> float | None:
        return None if p is None or y is None else round(float((p.argmax(1) == y).mean()), 6)

    out: dict[str, Any] = {
        "samples": int(len(x)),
        "torch_acc": acc(p_torch),
        "fp32_acc": acc(p_fp32),
        "int8_acc": acc(p_int8),
        "fp32_max_abs_diff": None if p_fp32 is None else float(np.abs(p_fp32 - p_torch).max()),
        "int8_top1_agreement": (None if p_int8 is None
                                else round(float((p_int8.argmax(1) == p_ref.argmax(1)).mean()), 6)),
        "int8_max_abs_diff": None if p_int8 is None else float(np.abs(p_int8 - p_ref).max()),
        "int8_reference": "onnx fp32" if p_fp32 is not None else "torch",
    }
    if fp32 is not None and fp32.manifest.get("fused") is not None:
        p_fused, _ = fp32.run_fused(x)
        out["fused_max_abs_diff"] = float(np.abs(p_fused - p_torch).max())
    return out


def export_report(model: Any, bundle: Path, manifest: dict[str, Any], held: list[int],
                  x: np.ndarray, y: np.ndarray | None,
                  extra_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Any]:
    """Parity, accuracy and sizes of a fresh bundle against the torch model it came from.

    The top-level metrics are on ``x``/``y`` (the client's held-out split); ``extra_sets``
    (e.g. the federation's global test set, larger) get the same metrics under their name.
    """
    from fedcoe_edge.runtime import MoESession
    from fedcoe_edge.simulation import serialized_nbytes
    from fedcoe_edge.training import to_arrays

    has_fp32 = all(p.get("fp32") for p in manifest["parts"].values())
    quantized = manifest["quantization"]["mode"] != "fp32"
    sessions = {"fp32": MoESession(bundle, precision="fp32") if has_fp32 else None,
                "int8": MoESession(bundle) if quantized else None}
    used = {n: v for n, v in to_arrays(model.state_dict()).items()
            if not n.startswith("global.experts.") or int(n.split(".")[2]) in held}
    # int8_bytes: the deployed file of an int8 bundle (a part AUTO kept fp32 counts as is)
    sizes = {n: {"fp32_bytes": p["fp32"]["bytes"] if p.get("fp32") else None,
                 "int8_bytes": p["bytes"] if quantized else None,
                 "quantization": p["quantization"]} for n, p in manifest["parts"].items()}
    report: dict[str, Any] = {"bundle": str(bundle), "held_experts": held,
                              **parity_metrics(model, sessions, held, x, y)}
    for name, (xs, ys) in (extra_sets or {}).items():
        report[name] = parity_metrics(model, sessions, held, xs, ys)
    report.update({
        "sizes": sizes,
        "total_fp32_bytes": sum(s["fp32_bytes"] or 0 for s in sizes.values()),
        "total_int8_bytes": sum(s["int8_bytes"] or 0 for s in sizes.values()) if quantized else None,
        "torch_state_bytes": serialized_nbytes(used),
    })
    return report


def format_report(r: dict[str, Any]) -> str:
    """A small table for the terminal: accuracy and size beside the torch model's."""
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def nbytes(v: int | None) -> str:
        return f"{v:,}" if v else "-"

    lines = [f"bundle {r['bundle']} (client {r.get('client')}, experts {r['held_experts']}, "
             f"{r['samples']} held-out samples)",
             f"{'model':<12}{'accuracy':>10}{'bytes':>12}",
             f"{'torch':<12}{f(r['torch_acc']):>10}{nbytes(r['torch_state_bytes']):>12}",
             f"{'onnx fp32':<12}{f(r['fp32_acc']):>10}{nbytes(r['total_fp32_bytes']):>12}"]
    if r["total_int8_bytes"] is not None:
        lines.append(f"{'onnx int8':<12}{f(r['int8_acc']):>10}{nbytes(r['total_int8_bytes']):>12}")
    parity = []
    if r["fp32_max_abs_diff"] is not None:
        parity.append(f"fp32 vs torch max |dp| {r['fp32_max_abs_diff']:.2e}")
    if r["int8_top1_agreement"] is not None:
        parity.append(f"int8 top-1 agreement with {r['int8_reference']} "
                      f"{r['int8_top1_agreement']:.4f}")
    lines.append("; ".join(parity))
    g = r.get("global_test")
    if g:
        lines.append(f"global test set ({g['samples']} samples): torch {f(g['torch_acc'])}, "
                     f"onnx fp32 {f(g['fp32_acc'])}, onnx int8 {f(g['int8_acc'])}, int8 top-1 "
                     f"agreement {f(g['int8_top1_agreement'])}")
    lines.append(f"{'part':<15}{'quantization':>14}{'fp32 B':>10}{'int8 B':>10}")
    for name, s in r["sizes"].items():
        lines.append(f"{name:<15}{s['quantization']:>14}{s['fp32_bytes'] or '-':>10}"
                     f"{s['int8_bytes'] or '-':>10}")
    return "\n".join(lines)


# --- predict ----------------------------------------------------------------------------


def input_hint(shape: tuple[int, ...]) -> str:
    """What ``--input`` must hold, for error messages: shape, dtype and scaling."""
    dims = ", ".join(str(d) for d in shape)
    return (f"expected a .npy of float32 (numpy.save), shape (N, {dims}) or ({dims}), pixels "
            f"scaled to [0, 1] channels first as in training")


def class_label(names: list[str] | None, c: int) -> str:
    """The class's name when the bundle carries the federation's list, else ``class c``."""
    return names[c] if names is not None and 0 <= c < len(names) else f"class {c}"


def run_predict(args: argparse.Namespace) -> int:
    import sys

    from fedcoe_edge.bundle_io import ReleaseCheck
    from fedcoe_edge.bundle_sig import reader_keys, unauthenticated_warning
    from fedcoe_edge.runtime import MoESession

    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    sess = MoESession(args.bundle, providers=providers, threads=args.threads,
                      precision="fp32" if args.fp32 else "deployed",
                      keys=reader_keys(args.key_file, args.vendor_public_key),
                      release=ReleaseCheck(args.min_version, args.federation, "--min-version"))
    hint = input_hint(sess.input_shape)
    try:
        x = load_npy(args.input, "--input")
    except DataError as exc:
        raise DataError(f"{exc}; {hint}") from None
    if tuple(x.shape) == sess.input_shape:
        x = x[None]
    try:
        out = sess.run(x, use_local=not args.global_only)
    except ValidationError as exc:
        raise DataError(f"--input {args.input}: {exc}; {hint}") from None
    if sess.verified_by is None:  # once, just before the output it qualifies (an error
        # stays one line)
        print(f"fedcoe predict: warning: {unauthenticated_warning(args.bundle, sess.manifest)}",
              file=sys.stderr)
    classes = out.probs.argmax(1)
    names = sess.class_names
    if args.json:
        print(json.dumps({"classes": classes.tolist(),
                          **({"class_names": [class_label(names, int(c)) for c in classes]}
                             if names else {}),
                          "probabilities": np.round(out.probs, 6).tolist(),
                          "experts_run": out.experts_run}))
        return 0
    for i, (c, p) in enumerate(zip(classes, out.probs, strict=True)):
        probs = " ".join(f"{v:.4f}" for v in p)
        print(f"{i}\t{class_label(names, int(c))}\tp={p[c]:.4f}\t[{probs}]")
    return 0
