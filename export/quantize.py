"""int8 quantization of exported parts with onnxruntime: static QDQ or dynamic, per part.

Static: QDQ format, int8 per-channel weights, uint8 activations calibrated (MinMax by
default) on a sample of the device's *own* data (Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018,
arXiv 1712.05877). Dynamic: int8 weights, activations scaled per call; only offered for
linear-only parts (on convolutions it becomes ConvInteger, slow on ARM).

``QuantMode.AUTO`` tries both on a linear-only part and keeps the one whose outputs are
closer to fp32 on the calibration sample; convolutional parts (CNN experts, the MobileNet
trunk) always get static QDQ. A part whose int8 file would not be smaller than its fp32
file (a 64x4 linear gate: the Q/DQ scaffolding outweighs the weights) stays fp32. The
choice and the errors measured are recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from export.graph_rewrites import (
    fold_quantized_hardsigmoid,
    name_nodes,
    rewrite_global_pool,
    stem_nodes,
)
from fedcoe_edge.errors import ConfigError

log = logging.getLogger(__name__)

CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}


class _DropQuantizerInfo(logging.Filter):
    """Drops INFO/DEBUG records made by onnxruntime's code; warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING
                or "onnxruntime" not in record.pathname.replace("\\", "/"))


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """While quantizing, drop onnxruntime's quantizer INFO lines.

    The quantizer logs through the *root* logger (``logging.info``: one line per bias scale
    it widens, per tensor without parameters), about a hundred lines per MobileNet part and
    thousands per benchmark run for any caller whose logging is at INFO (the CLI filters its
    own handlers; a script or notebook does not). A filter on the root logger sees only
    records logged on the root logger itself, so the caller's own INFO lines, which come
    from named loggers, still show."""
    root = logging.getLogger()
    drop = _DropQuantizerInfo()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class QuantMode(str, enum.Enum):
    """How a bundle's parts are stored; the values are what the manifest records."""

    FP32 = "fp32"
    STATIC = "static_int8"
    DYNAMIC = "dynamic_int8"
    AUTO = "auto"  # per part: the better of static and dynamic (static only for conv parts)


class Activations(str, enum.Enum):
    """Static int8 activation type; the values are what the manifest records.

    ``U8`` (default): uint8 activations, int8 weights, the fast path of onnxruntime's x86
    kernels. ``S8``: int8 (symmetric) activations. Measured on the trained camera bundle
    (docs/bundle.md, "Same answers on every CPU"): with ``S8`` the int8 top-1 answers of an
    x86 host and of emulated Cortex-A72 / A76 agreed on all 1,000 test images, with ``U8`` on
    99.3%; ``S8`` runs the trunk ~3.7x slower on x86 (onnxruntime's fast x86 int8 kernels take
    uint8 activations), so it is for fleets that need the same answers on mixed CPUs more
    than x86 speed."""

    U8 = "u8"
    S8 = "s8"


@dataclass(frozen=True)
class GraphFixes:
    """The static int8 graph fixes of :mod:`export.graph_rewrites`, one flag each.

    Together they keep a MobileNetV3-style graph integer in onnxruntime; without them its
    int8 runs slower than fp32. Exports take all or none; the benchmarks turn them on one
    at a time to time each step against the next.
    """

    global_pool: bool = True  # ReduceMean pooling as GlobalAveragePool, before quantizing
    fp32_stem: bool = True  # the RGB stem left fp32
    fold_hardsigmoid: bool = True  # HardSigmoid islands folded into integer adds, after

    @classmethod
    def of(cls, value: bool | GraphFixes) -> GraphFixes:
        """``True``: every fix, ``False``: none, or the flags given."""
        if isinstance(value, GraphFixes):
            return value
        return cls() if value else cls(False, False, False)


@dataclass(frozen=True)
class QuantizeOptions:
    """Quantization knobs for :func:`export.bundle.build_bundle`."""

    mode: QuantMode = QuantMode.AUTO
    per_channel: bool = True  # per output channel int8 weight scales
    # 7-bit weights: x86 CPUs without VNNI multiply u8 x s8 with vpmaddubsw, whose int16
    # pair sums saturate with full-range weights (measured on an AVX2-only EPYC: a trained
    # camera bundle's int8 top-1 agreed with fp32 on 95.2% of inputs; 98.8-99.1% with this
    # on, on x86 and ARM alike: docs/bundle.md, "Same answers on every CPU"). The cost is
    # one bit of weight resolution.
    reduce_range: bool = True
    calibration_samples: int = 128  # drawn from the device's training split
    calibration_batch: int = 32  # samples per calibration batch
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    seed: int = 0  # which calibration samples are drawn
    activations: Activations = Activations.U8  # static int8 activation type (Activations)
    # static int8 graph fixes (export.graph_rewrites): GlobalAveragePool, integer HardSigmoid,
    # fp32 RGB stem; without them a MobileNetV3 trunk runs slower in int8 than in fp32
    # (GraphFixes: some of them, for the benchmarks' step-by-step rows)
    graph_fixes: bool | GraphFixes = True

    @classmethod
    def naive(cls) -> QuantizeOptions:
        """Static int8 with no graph fixes: what a first attempt gets (the benchmarks measure
        the fixes against it)."""
        return cls(mode=QuantMode.STATIC, graph_fixes=False)

    @property
    def fixes(self) -> GraphFixes:
        return GraphFixes.of(self.graph_fixes)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", QuantMode(self.mode))
        except ValueError:
            raise ConfigError(f"quantize mode must be one of {[m.value for m in QuantMode]}, "
                              f"got {self.mode!r}") from None
        try:
            object.__setattr__(self, "activations", Activations(self.activations))
        except ValueError:
            raise ConfigError(f"quantize activations must be one of "
                              f"{[a.value for a in Activations]}, got {self.activations!r}") from None
        if self.calibration_samples < 1 or self.calibration_batch < 1:
            raise ConfigError("calibration_samples and calibration_batch must be >= 1, got "
                              f"{self.calibration_samples} and {self.calibration_batch}")
        if self.calibrate_method not in _METHODS:
            raise ConfigError(f"calibrate_method must be one of {sorted(_METHODS)}, "
                              f"got {self.calibrate_method!r}")

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode.value, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range,
                "calibration_samples": self.calibration_samples,
                "calibration_batch": self.calibration_batch,
                "calibrate_method": self.calibrate_method, "seed": self.seed,
                "activations": self.activations.value, "graph_fixes": self._fixes_record()}

    def _fixes_record(self) -> bool | dict[str, bool]:
        """All or none as one bool (what every manifest so far records), else each flag."""
        fixes = self.fixes
        if fixes in (GraphFixes.of(True), GraphFixes.of(False)):
            return fixes == GraphFixes.of(True)
        return asdict(fixes)


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds ``data`` to ``quantize_static`` in batches under one input name.

    ``fixed``: other inputs of the graph, the same array with every batch (the dense fused
    graph's ``gate_bias``).
    """

    def __init__(self, input_name: str, data: np.ndarray, batch: int = 32,
                 fixed: Mapping[str, np.ndarray] | None = None) -> None:
        if len(data) == 0:
            raise ConfigError("calibration: no samples to calibrate on")
        self.input_name = input_name
        self.fixed = dict(fixed or {})
        self.batches = [np.ascontiguousarray(data[i : i + batch], dtype=np.float32)
                        for i in range(0, len(data), batch)]
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch, **self.fixed}

    def rewind(self) -> None:
        self._it = iter(self.batches)


@dataclass
class QuantResult:
    """What happened to one part: the mode kept and the errors measured (vs fp32)."""

    mode: QuantMode
    errors: dict[str, float]  # mode value -> mean |y_int8 - y_fp32| / mean |y_fp32|

    def to_dict(self) -> dict[str, object]:
        return {"mode": self.mode.value, "rel_error": {k: round(v, 6) for k, v in self.errors.items()}}


def op_types(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _run(path: Path, input_name: str, data: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {input_name: np.ascontiguousarray(data, np.float32)})
    # every output counts (a merged heads graph has one per part), side by side per row
    return np.concatenate([np.asarray(o).reshape(len(data), -1) for o in outs], axis=1)


def rel_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(candidate - reference).mean() / max(np.abs(reference).mean(), 1e-12))


def preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's pre-quantization pass: shape inference and graph folding (Conv+BN)."""
    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def quantize_static_file(src: Path, dst: Path, calibration: CalibrationDataReader,
                         opts: QuantizeOptions) -> Path:
    """Static QDQ int8: per-channel int8 weights, uint8 (or ``opts.activations``) activations,
    calibrated on what
    ``calibration`` feeds (an :class:`ArrayCalibrationReader`).

    ``src`` should have been through :func:`preprocess`. ``opts.fixes`` says which rewrites
    of :mod:`export.graph_rewrites` the graph gets (a bundle's parts and the benchmarks'
    MobileNet baselines get the same ones): pooling as GlobalAveragePool before
    quantization, the RGB stem left fp32, and HardSigmoid islands folded into integer adds
    afterwards.
    """
    fixes = opts.fixes
    with tempfile.TemporaryDirectory(prefix="fedcoe-fix-") as tmp:
        proto = onnx.load(str(src))
        name_nodes(proto)
        if fixes.global_pool:
            rewrite_global_pool(proto)
        exclude = stem_nodes(proto) if fixes.fp32_stem else []
        source = Path(tmp) / "fixed.onnx"
        onnx.save(proto, str(source))
        with quiet_quantizer():
            quantize_static(str(source), str(dst), calibration,
                            quant_format=QuantFormat.QDQ, per_channel=opts.per_channel,
                            activation_type=(QuantType.QInt8 if opts.activations is Activations.S8
                                             else QuantType.QUInt8),
                            weight_type=QuantType.QInt8,
                            calibrate_method=_METHODS[opts.calibrate_method],
                            nodes_to_exclude=exclude, reduce_range=opts.reduce_range)
    if fixes.fold_hardsigmoid:
        proto = onnx.load(str(dst))
        if fold_quantized_hardsigmoid(proto):
            onnx.checker.check_model(proto)
            onnx.save(proto, str(dst))
    return dst


def quantize_dynamic_file(src: Path, dst: Path, opts: QuantizeOptions) -> Path:
    """Dynamic int8: int8 weights, activations quantized per call (linear parts only)."""
    with quiet_quantizer():
        quantize_dynamic(str(src), str(dst), per_channel=opts.per_channel,
                         reduce_range=opts.reduce_range, weight_type=QuantType.QInt8)
    return dst


def quantize_part(src: Path, dst: Path, input_name: str, calib: np.ndarray,
                  opts: QuantizeOptions) -> QuantResult:
    """Quantize one part file ``src`` into ``dst`` following ``opts.mode``."""
    mode = opts.mode
    if mode is QuantMode.FP32:
        dst.write_bytes(src.read_bytes())
        return QuantResult(QuantMode.FP32, {})
    has_conv = bool(op_types(src) & CONV_OPS)
    if mode is QuantMode.DYNAMIC and has_conv:
        raise ConfigError(f"dynamic int8 on {src.name}: part has convolutions; use static or auto")
    candidates = [mode] if mode is not QuantMode.AUTO else (
        [QuantMode.STATIC] if has_conv else [QuantMode.STATIC, QuantMode.DYNAMIC])
    reference = _run(src, input_name, calib)
    errors: dict[str, float] = {}
    best: tuple[float, QuantMode, bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="fedcoe-quant-") as tmp:
        pre = preprocess(src, Path(tmp) / "pre.onnx")
        for cand in candidates:
            out = Path(tmp) / f"{cand.value}.onnx"
            if cand is QuantMode.STATIC:
                reader = ArrayCalibrationReader(input_name, calib, opts.calibration_batch)
                quantize_static_file(pre, out, reader, opts)
            else:
                quantize_dynamic_file(pre, out, opts)
            err = rel_error(_run(out, input_name, calib), reference)
            errors[cand.value] = err
            if best is None or err < best[0]:
                best = (err, cand, out.read_bytes())
    assert best is not None
    fp32_bytes = src.read_bytes()
    if opts.mode is QuantMode.AUTO and len(best[2]) >= len(fp32_bytes):
        # a tiny part (e.g. a linear gate) grows with the Q/DQ scaffolding: fp32 is better
        dst.write_bytes(fp32_bytes)
        return QuantResult(QuantMode.FP32, errors)
    dst.write_bytes(best[2])
    log.debug("quantized %s: %s (errors %s)", src.name, best[1].value, errors)
    return QuantResult(best[1], errors)


def quantize_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                  calibration: CalibrationDataReader, options: QuantizeOptions | None = None) -> Path:
    """A whole ONNX model to static int8 QDQ: :func:`preprocess`, then
    :func:`quantize_static_file`, the recipe a bundle's parts get.

    For a model that is not a bundle part: the benchmarks' baselines, the dense fused graph
    (several inputs, any calibration reader). Always static (``options.mode`` is not
    consulted: conv nets are why this exists, and dynamic int8 is slow on them).
    """
    opts = options or QuantizeOptions()
    src_path = Path(src)
    if not src_path.is_file():
        raise ConfigError(f"quantize_int8: source model {src_path} does not exist")
    dst_path = Path(dst)
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedcoe-quant-") as tmp:
        pre = preprocess(src_path, Path(tmp) / "pre.onnx")
        return quantize_static_file(pre, dst_path, calibration, opts)
