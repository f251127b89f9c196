"""On-device runtime for an exported FedCoE bundle: onnxruntime and numpy only, no torch.

FedCoE ("Bridging Generalization and Personalization via Federated Coordinated Dual-level
MoEs", arXiv 2605.21264) routes each input to its top-k global experts; the point of the
bundle (docs/design.md, section 7) is that a device runs *only* those experts. :class:`MoESession`
reproduces :meth:`fedcoe_edge.model.DualLevelMoE.forward` in numpy around one ONNX session
per part:

    g      = softmax(gate(f) + log prior)  restricted to the experts held / masked
    r      = top-k of g, renormalised      (ties to the lower index, as ONNX TopK)
    p_G    = softmax(S(f) + sum_k r_k E_k(f))        only experts with r_k > 0 are run
    p      = h_0 p_G + sum_j h_j softmax(z_G + L_j(f)),  h = softmax(local_gate(f))

(z_G: the global path's logits; without ``local_residual`` the term is softmax(L_j(f))).

Gates are exported as *logits* so the prior and mask are applied here exactly as torch
does. Note that ``torch.topk`` on CPU does not break exact ties toward the lower index
(e.g. four equal probabilities, k=2, gives experts 2 and 3); ONNX TopK does, and so does
this runtime. Exact ties only happen with degenerate gates (all-equal logits).

Loading verifies the manifest's signature (:mod:`fedcoe_edge.bundle_sig`: hash plus HMAC of
the federation key or a vendor's Ed25519, over every field), then its schema and version,
then every listed file's sha256, all *before* any session is created; the bytes that were
hashed are the bytes handed to onnxruntime.

This module is the session and its command line. The bundle format is
:mod:`fedcoe_edge.bundle_format`, reading and packing a bundle :mod:`fedcoe_edge.bundle_io`,
the numpy maths :mod:`fedcoe_edge.moe_numpy`; their names are re-exported here.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from fedcoe_edge.bundle_format import (
    BUNDLE_FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANTIZATIONS,
    VERSION_FIELD,
    RollbackError,
    class_names_of,
    feat_shape_of,
    listed_files,
    part_names,
    release_of,
    sha256_fd,
    sha256_hex,
    validate_manifest,
)
from fedcoe_edge.bundle_io import BundleContents, ReleaseCheck, pack_tar, read_bundle
from fedcoe_edge.bundle_sig import BundleKeys, is_signed, sign_manifest, unauthenticated_warning
from fedcoe_edge.errors import BundleError, ConfigError, ValidationError
from fedcoe_edge.fused import FUSE_MODES, Buf, FusedPart, FuseError, compose_moe_graph
from fedcoe_edge.moe_numpy import log_softmax, softmax, topk_routing

__all__ = [
    "BUNDLE_FORMAT", "DEFAULT_PROVIDERS", "FORMAT_VERSION", "MANIFEST_NAME", "PRECISIONS",
    "QUANTIZATIONS", "BundleContents", "MoESession", "ReleaseCheck", "RollbackError",
    "RuntimeOutput", "class_names_of",
    "feat_shape_of", "listed_files", "log_softmax", "main", "pack_tar", "part_names",
    "read_bundle", "sha256_hex", "softmax", "topk_routing", "validate_manifest",
]

PRECISIONS = ("deployed", "fp32")
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# which fused graph ``fused=True`` builds (docs/bundle.md, "Runtime cost")
DEFAULT_FUSE_MODE = "if"


def _nothing(manifest: Mapping[str, Any]) -> set[str]:
    return set()


@dataclass
class RuntimeOutput:
    """What :meth:`MoESession.run` returns; names follow ``fedcoe_edge.model.MoEOutput``."""

    probs: np.ndarray  # (B, C) personal mixture p(x) (global path when use_local=False)
    global_probs: np.ndarray  # (B, C) p_G(x)
    gate_probs: np.ndarray  # (B, K) softmax of the global gate over the experts allowed
    routing: np.ndarray  # (B, K) top-k renormalised weights actually used
    local_gate_probs: np.ndarray | None  # (B, 1+M) or None
    experts_run: list[int]  # global experts executed for this batch (sparse top-k)


def _softmax_(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place on a float32 array we own; returns ``z``.

    Four numpy calls: at batch 1 the call count, not the 1,000 exps, is the cost. After the
    row max is subtracted the sum is >= 1, so the division is safe; -inf logits become 0.
    """
    z -= z.max(-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(-1, keepdims=True)
    return z


def _topk_routing32(logits: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """:func:`fedcoe_edge.moe_numpy.topk_routing` in float32 with fewer temporaries: each
    row's top-k of ``probs`` renormalised, ties to the lower index (a stable sort, as ONNX
    TopK). The order is taken on the gate's ``logits`` (softmax keeps it): two float32
    logits one ulp apart stay apart there, where their float32 probabilities could tie."""
    if k >= probs.shape[-1]:
        return probs.copy()
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, -1)
    top /= np.maximum(top.sum(-1, keepdims=True), np.float32(1e-12))
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, order, top, -1)
    return weights


def _route_one(logits: list[float], bias: np.ndarray | None,
               k: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.float32]]:
    """Batch 1: gate probabilities (1, K), routing (1, K) and {expert: weight > 0}, in plain
    Python over K floats (two numpy calls in all, to hand back the arrays): the same numbers
    as :func:`_softmax_` and :func:`_topk_routing32`, ties to the lower index."""
    if bias is not None:
        row = bias if bias.ndim == 1 else bias[0]
        logits = [a + b for a, b in zip(logits, row.tolist(), strict=True)]
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]  # exp(-inf) = 0: an expert not allowed
    total = sum(exps)
    probs = [e / total for e in exps]
    n = len(probs)
    # sorted() is stable: equal logits keep the lower index first, as ONNX TopK
    chosen = range(n) if k >= n else sorted(range(n), key=lambda i: -logits[i])[:k]
    kept = sum(probs[i] for i in chosen)
    kept = max(kept, 1e-12)
    weights = {i: probs[i] / kept for i in chosen if probs[i] > 0}
    routing = [0.0] * n
    for i, w in weights.items():
        routing[i] = w
    return (np.array([probs], np.float32), np.array([routing], np.float32),
            {i: np.float32(w) for i, w in weights.items()})


class MoESession:
    """Run a verified bundle with onnxruntime: gate, then only the top-k experts.

    ``bundle``: folder or ``.tar``. ``precision``: ``"deployed"`` (the quantized files) or
    ``"fp32"`` (the parity copies). ``providers`` are passed through to onnxruntime
    unchanged (e.g. ``["TensorrtExecutionProvider", "CUDAExecutionProvider",
    "CPUExecutionProvider"]`` on a Jetson). ``threads`` sets the trunk's intra-op threads
    (the heads run single-threaded: nothing to split, and idle pools would spin).
    ``keys``: the keys the manifest's signature must verify with (given one, an unsigned
    manifest is refused); a swap re-signs the manifest with its HMAC key. ``release``: the
    lowest version and the federation the bundle must have (a
    :class:`~fedcoe_edge.bundle_format.RollbackError` otherwise), checked right after the
    signature: a signature proves who wrote a bundle, not that it is still the current one.
    ``verified_by`` is the algorithm that authenticated the manifest, None when nothing did.
    ``fused``: ``True``, ``"if"`` or ``"dense"`` joins the verified parts into one graph that
    also routes and mixes, so :meth:`run` is one onnxruntime call (faster, more memory:
    docs/bundle.md, "Runtime cost"); the per-part sessions are then made only on first need.
    """

    def __init__(self, bundle: str | os.PathLike[str], *, providers: Sequence[str] | None = None,
                 threads: int = 1, precision: str = "deployed",
                 keys: BundleKeys | None = None, release: ReleaseCheck | None = None,
                 fused: bool | str = False) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"MoESession: precision must be one of {PRECISIONS}, got {precision!r}")
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"MoESession: threads must be a positive int, got {threads!r}")
        self.precision = precision
        self.providers = list(providers) if providers is not None else list(DEFAULT_PROVIDERS)
        self.threads = threads
        self.keys = keys
        # verifies everything before any session exists. A .tar keeps the bytes this session
        # loads; a folder keeps none and each file is re-read and re-verified just before its
        # session is made (the bytes handed to onnxruntime are always bytes that were hashed),
        # so at most one file's bytes are held at a time: they would otherwise add the whole
        # bundle to the process's peak memory
        self._from_tar = not Path(bundle).is_dir()
        contents = read_bundle(bundle, keep=self._needed_files if self._from_tar else _nothing,
                               keys=keys, release=release)
        self.verified_by = contents.verified_by
        self.manifest = contents.manifest
        self.cfg = contents.cfg
        self.root = contents.root
        self._lock = threading.Lock()
        m = self.manifest
        self.feat_shape = feat_shape_of(m)
        self.input_shape = tuple(self.cfg.input_shape)
        self.num_classes = self.cfg.num_classes
        self.class_names = class_names_of(m, self.num_classes)
        names = part_names(self.cfg, m["held_experts"])
        heads_entry = self._heads_entry(m)
        # parts computed by the merged heads graph get no session of their own
        self._merged: list[str] = list(m["heads"]["parts"]) if heads_entry is not None else []
        chosen = {n: self._variant_entry(n) for n in names if n not in self._merged}
        if heads_entry is not None:
            chosen["heads"] = heads_entry
        dense = m.get("fused")  # the exported dense fp32 graph (run_fused), not fused=
        self._fused_bytes = (contents.files[dense["file"]]
                             if dense is not None and self.root is None else None)
        self._bundle_path = Path(bundle)
        self._release = release
        self._chosen = chosen
        self._held_mask = self._held_array(m["held_experts"])
        self._fused: ort.InferenceSession | None = None
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._input_names: dict[str, str] = {}
        # one session for the whole forward pass (docs/bundle.md, "Runtime cost"): the
        # per-part sessions are then made only if a method other than run() needs them
        self._moe: ort.InferenceSession | None = None
        self._zero_bias = np.zeros((1, self.cfg.num_global_experts), np.float32)
        self.fused_mode: str | None = self._fuse_mode(fused)
        if self.fused_mode is not None:
            self._moe = self._fused_session(contents.files, chosen, self.fused_mode)
            del contents
            return
        files = contents.files
        del contents
        self._load_parts(files)

    def _load_parts(self, files: dict[str, bytes]) -> None:
        """One session per chosen part, each file's bytes released once its session exists
        (onnxruntime keeps its own copy: the bundle is never held twice in RAM)."""
        chosen, m = self._chosen, self.manifest
        uses: dict[str, int] = {}
        for e in chosen.values():
            uses[e["file"]] = uses.get(e["file"], 0) + 1
        sessions = {}
        for n, e in chosen.items():
            if self._from_tar:
                sessions[n] = self._make_session(files[e["file"]], n)
            else:
                sessions[n] = self._load_verified(e, n)
            uses[e["file"]] -= 1
            if uses[e["file"]] == 0:
                files.pop(e["file"], None)
        files.clear()
        for n, sess in sessions.items():
            self._check_interface(n, sess, m["heads"] if n == "heads" else m["parts"][n])
        self._sessions = sessions
        self._input_names = {n: sess.get_inputs()[0].name for n, sess in sessions.items()}

    def _parts(self) -> dict[str, ort.InferenceSession]:
        """The per-part sessions, made on first need by a fused session (a folder's files
        are re-verified as read; a .tar is read and verified again, signature first)."""
        if not self._sessions:
            files: dict[str, bytes] = {}
            if self._from_tar:
                files = read_bundle(self._bundle_path, keep=self._needed_files, keys=self.keys,
                                    release=self._release).files
            self._load_parts(files)
        return self._sessions

    @staticmethod
    def _fuse_mode(fused: bool | str) -> str | None:
        if fused is False:
            return None
        if fused is True:
            return DEFAULT_FUSE_MODE
        if fused not in FUSE_MODES:
            raise ConfigError(f"MoESession: fused must be a bool or one of {FUSE_MODES}, "
                              f"got {fused!r}")
        return str(fused)

    def _fused_session(self, files: Mapping[str, bytes], chosen: Mapping[str, Mapping[str, Any]],
                       mode: str) -> ort.InferenceSession:
        """One session on the verified parts joined with the routing and the mixture
        (:func:`fedcoe_edge.fused.compose_moe_graph`). The bytes joined are the bytes whose
        sha256 the (signed) manifest lists: a .tar's kept bytes, a folder's re-read and
        re-checked here; each is dropped once joined."""
        m, cfg = self.manifest, self.cfg

        def data(name: str) -> bytes:
            e = chosen[name]
            if self._from_tar:
                return files[e["file"]]
            return self._read_verified(e, f"part '{name}'")

        def out_name(name: str) -> str:
            return str(m["parts"][name]["outputs"][0]["name"])

        trunk = None
        feed = "x"
        if "trunk" in chosen:
            trunk = FusedPart("trunk", data("trunk"), "x", {out_name("trunk"): "feats"}, "trunk/")
            feed = "feats"
        heads: list[FusedPart] = []
        if "heads" in chosen:
            outs = [o["name"] for o in m["heads"]["outputs"]]
            heads.append(FusedPart("heads", data("heads"), feed,
                                   dict(zip(outs, self._merged, strict=True)), "heads/"))
        always = ["global_gate", *(["expert_shared"] if cfg.shared_expert else []),
                  "local_gate" if cfg.num_local_experts > 0 else "",
                  *(f"expert_l{j}" for j in range(cfg.num_local_experts))]
        for n in always:
            if n and n in chosen:
                heads.append(FusedPart(n, data(n), feed, {out_name(n): n}, f"{n}/"))
        experts = {k: FusedPart(f"expert_g{k}", data(f"expert_g{k}"), feed,
                                {out_name(f"expert_g{k}"): f"expert_g{k}"}, f"expert_g{k}/")
                   for k in m["held_experts"]}
        try:
            graph = compose_moe_graph(
                trunk=trunk, heads=heads, experts=experts, num_global=cfg.num_global_experts,
                top_k=cfg.top_k, num_local=cfg.num_local_experts, num_classes=self.num_classes,
                shared_expert=cfg.shared_expert, local_residual=cfg.local_residual,
                input_shape=self.input_shape, mode=mode)
        except FuseError as exc:
            raise BundleError(f"bundle: its parts cannot be fused into one graph: {exc}") from None
        del trunk, heads, experts
        sess = self._session_from_pieces(graph, "moe")
        names = [o.name for o in sess.get_outputs()]
        want = ["probs", "global_probs", "gate_probs", "routing",
                *(["local_gate_probs"] if cfg.num_local_experts > 0 else [])]
        if names != want:
            raise BundleError(f"bundle: the fused graph's outputs {names} are not {want}")
        return sess

    # --- construction helpers ------------------------------------------------------------
    def _needed_files(self, manifest: Mapping[str, Any]) -> set[str]:
        """Files whose bytes this session loads: its precision's parts, and the fused graph
        of a .tar (a folder's is re-read on first use)."""
        parts = manifest.get("parts") or {}
        heads = self._heads_entry(manifest)
        merged = set(manifest["heads"]["parts"]) if heads is not None else set()
        needed: set[str] = {heads["file"]} if heads is not None else set()
        for name, part in parts.items():
            entry = part if self.precision == "deployed" else part.get("fp32")
            if (name not in merged and isinstance(entry, Mapping)
                    and isinstance(entry.get("file"), str)):
                needed.add(entry["file"])
        fused = manifest.get("fused")
        if self._from_tar and isinstance(fused, Mapping) and isinstance(fused.get("file"), str):
            needed.add(fused["file"])
        return needed

    def _heads_entry(self, manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The merged always-on heads file at this precision, if the bundle has one."""
        heads = manifest.get("heads")
        if not isinstance(heads, Mapping):
            return None
        entry = heads if self.precision == "deployed" else heads.get("fp32")
        return entry if isinstance(entry, Mapping) else None

    def _variant_entry(self, name: str) -> Mapping[str, Any]:
        part = self.manifest["parts"][name]
        if self.precision == "deployed":
            return part
        if part.get("fp32") is None:
            raise BundleError(f"bundle: part '{name}' has no fp32 file (exported without fp32 "
                              "copies, or swapped since)")
        return part["fp32"]

    def _session_options(self, name: str = "") -> ort.SessionOptions:
        so = ort.SessionOptions()
        # only the trunk (and the dense graph) has work to split: a head is one small GEMM
        # pair, and every extra intra-op pool spins between calls. Measured with threads=2
        # on 2 cores: ten sessions each with its own spinning pool ran 10x slower than one.
        so.intra_op_num_threads = self.threads if name in ("trunk", "fused", "moe") else 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        if name not in ("trunk", "fused", "moe"):
            # a head's tensors are a few KB: a per-session arena only reserves memory
            # (measured: ~0.15 MB of peak RSS per head session, no latency change)
            so.enable_cpu_mem_arena = False
        return so

    def _load_verified(self, entry: Mapping[str, Any], name: str) -> ort.InferenceSession:
        """A session on a folder bundle's file, hashed again just before it is loaded.

        The file is opened once; its contents are hashed through that descriptor and, where
        the OS names descriptors (``/proc/self/fd``), onnxruntime loads the same open file
        by that name. Handing onnxruntime a Python ``bytes`` instead costs two extra copies
        of the graph inside onnxruntime's loader, which stay in the process's peak memory
        (measured: +4 MB for a camera-size bundle).
        """
        assert self.root is not None
        path = self.root / entry["file"]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BundleError(f"bundle {self.root}: part '{name}' file {entry['file']} is "
                              f"unreadable: {exc}") from None
        try:
            if sha256_fd(fd) != entry["sha256"]:
                raise BundleError(f"bundle {self.root}: part '{name}' file {entry['file']} fails "
                                  "its sha256 check (changed since the bundle was verified)")
            by_fd = f"/proc/self/fd/{fd}"
            if os.path.exists(by_fd):
                return self._make_session(by_fd, name)
            return self._make_session(self._read_verified(entry, f"part '{name}'"), name)
        finally:
            os.close(fd)

    def _session_from_pieces(self, pieces: list[Buf], name: str) -> ort.InferenceSession:
        """A session on a graph given as pieces of its bytes. Where the OS has anonymous
        files named by descriptor (Linux ``memfd_create``, ``/proc/self/fd``), the pieces
        are written to one and onnxruntime loads it by name: a Python ``bytes`` would be
        one more copy of the whole graph, and onnxruntime's loader makes two more of it
        (see :meth:`_load_verified`). The file is this process's own, never on disk."""
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and os.path.isdir("/proc/self/fd"):
            fd = memfd(f"fedcoe-{name}", getattr(os, "MFD_CLOEXEC", 0))
            try:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view):]
                pieces.clear()
                return self._make_session(f"/proc/self/fd/{fd}", name)
            finally:
                os.close(fd)
        return self._make_session(b"".join(pieces), name)

    def _make_session(self, data: bytes | str, name: str) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(data, self._session_options(name),
                                        providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"bundle: part '{name}' cannot be loaded by onnxruntime: "
                              f"{str(exc).splitlines()[0][:200]}") from None

    @staticmethod
    def _check_interface(name: str, sess: ort.InferenceSession, spec: Mapping[str, Any]) -> None:
        """The graph's input/output names and non-batch dims must be what the manifest says."""
        for kind, actual, wanted in (("input", sess.get_inputs(), spec["inputs"]),
                                     ("output", sess.get_outputs(), spec["outputs"])):
            got = [(a.name, list(a.shape)[1:]) for a in actual]
            want = [(w["name"], list(w["shape"])[1:]) for w in wanted]
            if got != want:
                raise BundleError(f"bundle: part '{name}' {kind}s {got} differ from the "
                                  f"manifest's {want}")

    # --- properties ----------------------------------------------------------------------
    @property
    def federation(self) -> str | None:
        """The federation the manifest names (None: a bundle exported without one)."""
        return release_of(self.manifest)[0]

    @property
    def version(self) -> int:
        """The manifest's model version (0: a bundle exported without one)."""
        return release_of(self.manifest)[1]

    @property
    def held_experts(self) -> list[int]:
        return sorted(self.manifest["held_experts"])

    @property
    def num_global_experts(self) -> int:
        return self.cfg.num_global_experts

    # --- inference -----------------------------------------------------------------------
    def _check_input(self, x: Any) -> np.ndarray:
        # the common case (a float32 array of the right shape) is three comparisons: the
        # error text is only built when one fails (formatting it cost ~2 us per call)
        if (isinstance(x, np.ndarray) and x.dtype == np.float32
                and x.shape[1:] == self.input_shape and x.ndim == 1 + len(self.input_shape)
                and x.shape[0] >= 1):
            return x if x.flags.c_contiguous else np.ascontiguousarray(x)
        first = "trunk" if "trunk" in self.manifest["parts"] else "global_gate"
        want = "(batch, " + ", ".join(str(d) for d in self.input_shape) + ")"
        if not isinstance(x, np.ndarray):
            raise ValidationError(f"MoESession input for part '{first}': expected a numpy array "
                                  f"of shape {want}, got {type(x).__name__}")
        if x.dtype != np.float32:
            raise ValidationError(f"MoESession input for part '{first}': expected dtype float32, "
                                  f"got {x.dtype}")
        raise ValidationError(f"MoESession input for part '{first}': expected shape {want}, "
                              f"got {tuple(x.shape)} (float32, scaled as in training)")

    def _held_array(self, held_ids: Sequence[int]) -> np.ndarray:
        held = np.zeros(self.cfg.num_global_experts, dtype=bool)
        held[list(held_ids)] = True
        held.setflags(write=False)
        # the gate bias of the default mask, made once: None when every expert is held
        bias = None if held.all() else np.where(held, np.float32(0), np.float32(-np.inf))
        if bias is not None:
            bias.setflags(write=False)
        self._held_bias = bias
        return held

    def _mask(self, expert_mask: Any) -> np.ndarray:
        """Bool (K,) of the experts routing may use: default the held ones (read-only)."""
        k_total = self.cfg.num_global_experts
        held = self._held_mask
        if expert_mask is None:
            return held
        arr = np.asarray(expert_mask)
        if arr.dtype == bool:
            if arr.shape != (k_total,):
                raise ValidationError(f"expert_mask: expected a bool array of shape ({k_total},), "
                                      f"got {arr.shape}")
            mask = arr.copy()
        else:
            ids = [int(i) for i in arr.reshape(-1)]
            if any(not 0 <= i < k_total for i in ids):
                raise ValidationError(f"expert_mask: expert ids must be in [0, {k_total}), got {ids}")
            mask = np.zeros(k_total, dtype=bool)
            mask[ids] = True
        if not mask.any():
            raise ValidationError("expert_mask: selects no expert")
        absent = [int(i) for i in np.flatnonzero(mask & ~held)]
        if absent:
            raise ValidationError(f"expert_mask: expert(s) {absent} are not in this bundle "
                                  f"(held: {self.held_experts})")
        return mask

    def _prior(self, prior: Any) -> np.ndarray | None:
        if prior is None:
            return None
        arr = np.asarray(prior, dtype=np.float64)
        k_total = self.cfg.num_global_experts
        if arr.shape[-1:] != (k_total,) or arr.ndim > 2 or not np.all(np.isfinite(arr)) or (arr < 0).any():
            raise ValidationError(f"prior: expected non-negative finite values of shape ({k_total},) "
                                  f"or (batch, {k_total}), got shape {arr.shape}")
        return arr

    def _run_part(self, name: str, feats: np.ndarray) -> np.ndarray:
        """One part's logits, float32 as onnxruntime returns them (a fresh, writable array)."""
        if name in self._merged:
            return self._run_heads(feats)[name]
        out: np.ndarray = self._parts()[name].run(None, {self._input_names[name]: feats})[0]
        return out

    def _run_heads(self, feats: np.ndarray) -> dict[str, np.ndarray]:
        """Every always-on part's logits: one call of the merged graph, or one per part."""
        if not self._merged:
            return {}
        outs = self._parts()["heads"].run(None, {self._input_names["heads"]: feats})
        return dict(zip(self._merged, outs, strict=True))

    def features(self, x: np.ndarray) -> np.ndarray:
        """Trunk output (the input itself for an identity trunk), float32."""
        x = self._check_input(x)
        sessions = self._parts()
        if "trunk" not in sessions:
            return x
        out = sessions["trunk"].run(None, {self._input_names["trunk"]: x})[0]
        return np.ascontiguousarray(out, np.float32)

    def _gate_bias(self, mask: np.ndarray, prior: np.ndarray | None) -> np.ndarray | None:
        """What is added to the gate's logits: log prior, and -inf for experts not allowed
        (None: nothing to add, every expert allowed and no prior)."""
        if prior is None:
            if mask is self._held_mask:
                return self._held_bias
            return np.where(mask, np.float32(0), np.float32(-np.inf))
        log_p = np.log(np.maximum(prior, 1e-8)).astype(np.float32)
        return np.where(mask, log_p, np.float32(-np.inf))

    def gate_logits(self, feats: np.ndarray, prior: Any = None,
                    _heads: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """The global gate's logits (float64), the log prior added when one is given."""
        logits = (_heads["global_gate"] if _heads is not None and "global_gate" in _heads
                  else self._run_part("global_gate", feats)).astype(np.float64)
        p = self._prior(prior)
        if p is not None:
            logits = logits + np.log(np.maximum(p, 1e-8))
        return logits

    def routing_prior(self, x: np.ndarray) -> np.ndarray:
        """pi = mean_x softmax(gate(x)) over all K: what a cold-start device reports (float64)."""
        return softmax(self.gate_logits(self.features(x))).mean(0)

    def run(self, x: np.ndarray, *, prior: Any = None, expert_mask: Any = None,
            use_local: bool = True) -> RuntimeOutput:
        """One forward pass over a batch (B >= 1), mirroring ``DualLevelMoE.forward``.

        The maths around the sessions is float32, on the arrays onnxruntime returns, in as
        few numpy calls as the formulas allow (docs/bundle.md, "Runtime cost"): right after
        the trunk each distinct numpy call costs 5 to 30 us at batch 1 (its code and data
        are out of the caches), whatever the size of its array, so the count of calls, not
        their arithmetic, is what this glue costs. At batch 1 the gate's softmax and top-k
        over K values are plain Python. A fused session (``fused=``) makes the whole pass
        one onnxruntime call instead (:meth:`_run_moe`).
        """
        if self._moe is not None:
            return self._run_moe(x, prior, expert_mask, use_local)
        with self._lock:
            feats = self.features(x)
            mask = self._mask(expert_mask)
            p = self._prior(prior)
            if p is not None and p.ndim == 2 and p.shape[0] != feats.shape[0]:
                raise ValidationError(f"prior: {p.shape[0]} rows for a batch of {feats.shape[0]}")
            heads = self._run_heads(feats)  # one call for every always-on part, when merged

            def part(name: str) -> np.ndarray:
                return heads[name] if name in heads else self._run_part(name, feats)

            logits = part("global_gate")  # (B, K)
            bias = self._gate_bias(mask, p)
            if logits.shape[0] == 1:
                gate_probs, routing, weights = _route_one(logits[0].tolist(), bias,
                                                          self.cfg.top_k)
            else:
                if bias is not None:
                    logits += bias
                gate_probs = _softmax_(logits.copy())
                routing = _topk_routing32(logits, gate_probs, self.cfg.top_k)
                weights = None
            z = (part("expert_shared") if self.cfg.shared_expert
                 else np.zeros((feats.shape[0], self.num_classes), np.float32))
            if weights is not None:  # batch 1: the routed experts and their weights, known
                experts_run = sorted(weights)
                for k in experts_run:
                    out = self._run_part(f"expert_g{k}", feats)
                    out *= weights[k]
                    z += out
            else:
                experts_run = []
                # only experts some row routes to (masked and non-held ones have weight 0)
                routed = routing > 0
                for k in np.flatnonzero(routed.any(0)).tolist():
                    experts_run.append(k)
                    if routed[:, k].all():  # every row: no gather/scatter
                        out = self._run_part(f"expert_g{k}", feats)
                        out *= routing[:, k : k + 1]
                        z += out
                        continue
                    rows = np.flatnonzero(routed[:, k])
                    sub = np.ascontiguousarray(feats[rows])
                    z[rows] += routing[rows, k : k + 1] * self._run_part(f"expert_g{k}", sub)
            # p = h_0 p_G + sum_j h_j softmax(L_j), in probability space: the same mixture
            # torch forms with logsumexp, in half the numpy calls (what run() returns is
            # probabilities anyway). The 1+M distributions are softmaxed as one (B, 1+M, C)
            # stack and mixed with one matmul.
            m = self.cfg.num_local_experts
            if not (use_local and m > 0):
                global_p = _softmax_(z)
                return RuntimeOutput(global_p.copy(), global_p, gate_probs, routing, None,
                                     experts_run)
            h = _softmax_(part("local_gate"))  # (B, 1+M)
            stack = np.stack([z, *(part(f"expert_l{j}") for j in range(m))], 1)
            if self.cfg.local_residual:  # residual local experts: softmax(z_G + L_j)
                stack[:, 1:] += z[:, None]
            _softmax_(stack)
            probs = np.matmul(h[:, None], stack)[:, 0]
            global_p = np.ascontiguousarray(stack[:, 0])
        return RuntimeOutput(probs, global_p, gate_probs, routing, h, experts_run)

    def _run_moe(self, x: Any, prior: Any, expert_mask: Any, use_local: bool) -> RuntimeOutput:
        """:meth:`run` as one call of the fused graph: the same checks, the same outputs
        (docs/bundle.md, "Runtime cost")."""
        with self._lock:
            x = self._check_input(x)
            mask = self._mask(expert_mask)
            p = self._prior(prior)
            if p is not None and p.ndim == 2 and p.shape[0] != x.shape[0]:
                raise ValidationError(f"prior: {p.shape[0]} rows for a batch of {x.shape[0]}")
            bias = self._gate_bias(mask, p)
            if bias is None:
                bias = self._zero_bias
            elif bias.ndim == 1:
                bias = bias[None]
            assert self._moe is not None
            outs = self._moe.run(None, {"x": x, "gate_bias": bias})
        probs, global_p, gate_probs, routing = outs[:4]
        if x.shape[0] == 1:
            experts_run = [k for k, w in enumerate(routing[0].tolist()) if w > 0]
        else:
            experts_run = np.flatnonzero((routing > 0).any(0)).tolist()
        if not (use_local and self.cfg.num_local_experts > 0):
            return RuntimeOutput(global_p.copy(), global_p, gate_probs, routing, None,
                                 experts_run)
        return RuntimeOutput(probs, global_p, gate_probs, routing, outs[4], experts_run)

    def predict(self, x: np.ndarray, **kw: Any) -> np.ndarray:
        """Class probabilities (B, C); keyword arguments as :meth:`run`."""
        return self.run(x, **kw).probs

    def run_fused(self, x: np.ndarray, *, prior: Any = None,
                  expert_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """The dense single-graph export: (personal probs, global probs), for comparison."""
        fused = self.manifest.get("fused")
        if fused is None:
            raise BundleError("bundle: exported without the fused dense graph")
        x = self._check_input(x)
        if self._fused is None:
            self._fused = self._make_session(self._read_fused(fused), "fused")
        mask = self._mask(expert_mask)
        bias = np.zeros(self.cfg.num_global_experts)
        p = self._prior(prior)
        if p is not None:
            if p.ndim != 1:
                raise ValidationError("prior: the fused graph takes one (K,) prior per call")
            bias = np.log(np.maximum(p, 1e-8))
        bias = np.where(mask, bias, -np.inf).astype(np.float32)
        lp, glp = self._fused.run(None, {"x": x, "gate_bias": bias})
        return np.exp(lp), np.exp(glp)

    def _read_fused(self, entry: Mapping[str, Any]) -> bytes:
        """The fused graph's bytes: kept for a .tar, re-read and re-verified from a folder."""
        if self._fused_bytes is not None:
            return self._fused_bytes
        return self._read_verified(entry, "fused graph")

    def _read_verified(self, entry: Mapping[str, Any], what: str) -> bytes:
        """A folder bundle's file, read now and checked against the manifest's sha256."""
        assert self.root is not None
        path = self.root / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle {self.root}: {what} file {entry['file']} is unreadable: "
                              f"{exc}") from None
        if sha256_hex(data) != entry["sha256"]:
            raise BundleError(f"bundle {self.root}: {what} file {entry['file']} fails its sha256 "
                              "check (changed since the bundle was verified)")
        return data

    # --- updates -------------------------------------------------------------------------
    def swap_expert(self, k: int, path: str | os.PathLike[str] | bytes, *,
                    sha256: str | None = None, quantization: str = "unknown",
                    version: int | None = None) -> str:
        """Replace global expert ``k`` with the ONNX file at ``path``; returns its sha256.

        The new file is hashed (and compared with ``sha256`` when given), loaded into a new
        session and checked against the expert interface before anything changes; on any
        failure the old expert stays. For a folder bundle the file is written under a new
        name and the manifest is replaced atomically, so a crash leaves a consistent bundle.
        The part's fp32 parity copy is dropped (it no longer matches). ``k`` may be an
        expert the bundle did not hold yet (a device downloading an expert).
        A signed manifest is re-signed with the session's HMAC key (a signed bundle without
        one cannot be swapped: the result would no longer verify).
        """
        if not isinstance(k, int) or not 0 <= k < self.cfg.num_global_experts:
            raise ValidationError(f"swap_expert: k must be in [0, {self.cfg.num_global_experts}), "
                                  f"got {k!r}")
        return self.swap_part(f"expert_g{k}", path, sha256=sha256, quantization=quantization,
                              version=version)

    def swap_part(self, name: str, path: str | os.PathLike[str] | bytes, *,
                  sha256: str | None = None, quantization: str = "unknown",
                  version: int | None = None) -> str:
        """Replace a global part (``global_gate``, ``expert_shared`` or ``expert_g{k}``) with
        an ONNX file (a path, or its bytes); as :meth:`swap_expert`.

        ``version``: the model version the new part comes from; the manifest's version
        becomes it (signed with the rest). A version older than the bundle's is refused
        (a :class:`RollbackError`): a swap never takes a bundle back.

        A part computed inside the merged ``heads`` graph is taken out of it: the bundle
        drops ``heads`` and runs its always-on parts from their own files from then on.
        """
        swappable = ["global_gate", *(["expert_shared"] if self.cfg.shared_expert else []),
                     *(f"expert_g{k}" for k in range(self.cfg.num_global_experts))]
        if name not in swappable:
            raise ValidationError(f"swap_part: part must be one of {swappable}, got {name!r}")
        if self.precision != "deployed":
            raise ConfigError("swap_part: only a session on the deployed precision can swap")
        if quantization not in QUANTIZATIONS:
            raise ValidationError(f"swap_part: quantization must be one of {QUANTIZATIONS}")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                    or version < self.version):
            raise RollbackError(f"swap_part: part '{name}' of version {version!r} is older than "
                                f"the bundle's version {self.version}: refused as a rollback")
        self._parts()  # a fused session's part sessions, needed from now on
        resign = (self.keys is not None and self.keys.hmac_key is not None
                  and (is_signed(self.manifest) or self.keys.must_verify))
        if is_signed(self.manifest) and not resign:
            raise ConfigError(f"swap_part: part '{name}': the bundle's manifest is signed; "
                              "swapping needs the HMAC federation key to re-sign it")
        if isinstance(path, bytes):
            data, src = path, f"the {name} graph given"
        else:
            src_path = Path(path)
            if not src_path.is_file():
                raise BundleError(f"swap_part: part '{name}': file {src_path} does not exist")
            data, src = src_path.read_bytes(), str(src_path)
        digest = sha256_hex(data)
        if sha256 is not None and digest != sha256.lower():
            raise BundleError(f"swap_part: part '{name}': {src} fails its sha256 check "
                              f"(expected {sha256[:12]}..., file {digest[:12]}...)")
        sess = self._make_session(data, name)
        n_out = self.cfg.num_global_experts if name == "global_gate" else self.num_classes
        spec = {"inputs": [{"name": "feats", "shape": ["batch", *self.feat_shape], "dtype": "float32"}],
                "outputs": [{"name": "logits", "shape": ["batch", n_out], "dtype": "float32"}]}
        self._check_interface(name, sess, spec)
        probe = sess.run(None, {"feats": np.zeros((1, *self.feat_shape), np.float32)})[0]
        if probe.shape != (1, n_out) or not np.all(np.isfinite(probe)):
            raise BundleError(f"swap_part: part '{name}': {src} gives output {probe.shape} "
                              f"or non-finite values on a probe input")
        rel = f"{name}.{digest[:12]}.onnx"
        new_manifest = json.loads(json.dumps(self.manifest))
        old = new_manifest["parts"].get(name)
        new_manifest["parts"][name] = {"file": rel, "sha256": digest, "bytes": len(data),
                                       "quantization": quantization, **spec}
        if version is not None:
            new_manifest[VERSION_FIELD] = version
        if name.startswith("expert_g"):
            held = set(new_manifest["held_experts"]) | {int(name[len("expert_g"):])}
            new_manifest["held_experts"] = sorted(held)
        new_manifest["parts"] = {n: new_manifest["parts"][n]
                                 for n in part_names(self.cfg, new_manifest["held_experts"])}
        # the dense graph still holds the old weights: it is no longer comparable, drop it
        new_manifest["fused"] = None
        unmerge = name in self._merged
        if unmerge:  # likewise the merged heads; their parts run from their own files
            new_manifest["heads"] = None
        if resign:
            assert self.keys is not None
            new_manifest = sign_manifest(new_manifest, BundleKeys(hmac_key=self.keys.hmac_key))
        validate_manifest(new_manifest)
        old_entries = [old, old.get("fp32")] if old is not None else []
        dropped = [self.manifest.get("fused"), *([self.manifest.get("heads")] if unmerge else [])]
        if unmerge and isinstance(self.manifest["heads"], Mapping):
            dropped.append(self.manifest["heads"].get("fp32"))
        stale = [e for e in (*old_entries, *dropped) if e is not None and e["file"] != rel]
        # the merged parts' own sessions, made (and verified) before anything changes
        own = {n: self._part_session(n) for n in self._merged if n != name} if unmerge else {}
        with self._lock:
            if self.root is not None:
                from fedcoe_edge.io import atomic_write_bytes, atomic_write_text

                atomic_write_bytes(self.root / rel, data)
                atomic_write_text(self.root / MANIFEST_NAME, json.dumps(new_manifest, indent=2) + "\n")
                for entry in stale:  # only after the new manifest no longer lists them
                    if entry["file"] not in listed_files(new_manifest):
                        (self.root / entry["file"]).unlink(missing_ok=True)
            self.manifest = new_manifest
            if unmerge:
                self._sessions.pop("heads", None)
                self._input_names.pop("heads", None)
                self._merged = []
            for n, other in own.items():
                self._sessions[n] = other
                self._input_names[n] = other.get_inputs()[0].name
            self._sessions[name] = sess
            self._input_names[name] = sess.get_inputs()[0].name
            self._held_mask = self._held_array(new_manifest["held_experts"])
            self._fused = None
            self._fused_bytes = None
            # the fused graph holds the old part: from now on run() calls the parts
            self._moe = None
            self.fused_mode = None
        return digest

    def _part_session(self, name: str) -> ort.InferenceSession:
        """A session on one part's own deployed file (a folder's is re-verified as read)."""
        entry = self.manifest["parts"][name]
        if self.root is None:
            raise ConfigError(f"swap_part: part '{name}' runs inside the merged heads of a .tar "
                              "bundle; unpack it to a folder to swap it")
        sess = self._load_verified(entry, name)
        self._check_interface(name, sess, entry)
        return sess


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedcoe_edge.runtime BUNDLE FILE.npy``: predict on a device without torch."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m fedcoe_edge.runtime",
                                     description="Classify FILE.npy with a bundle (no torch).")
    parser.add_argument("bundle", help="bundle folder or .tar")
    parser.add_argument("input", help=".npy of float inputs, (N, *input_shape) or one sample")
    parser.add_argument("--fp32", action="store_true", help="use the fp32 parity files")
    parser.add_argument("--global-only", action="store_true", help="skip the local level")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--providers", default="CPUExecutionProvider",
                        help="comma-separated onnxruntime execution providers")
    parser.add_argument("--key-file", help="hex HMAC federation key the manifest must be "
                        "signed with (an unsigned manifest is then refused)")
    parser.add_argument("--vendor-public-key", help="Ed25519 public key (PEM or hex) the "
                        "manifest may be signed with instead")
    parser.add_argument("--min-version", type=int, default=0,
                        help="refuse a bundle older than this version (a rollback)")
    parser.add_argument("--federation", default=None,
                        help="refuse a bundle that is not this federation's")
    args = parser.parse_args(argv)
    try:
        from fedcoe_edge.bundle_sig import reader_keys

        sess = MoESession(args.bundle, threads=args.threads,
                          providers=[p for p in args.providers.split(",") if p],
                          precision="fp32" if args.fp32 else "deployed",
                          keys=reader_keys(args.key_file, args.vendor_public_key),
                          release=ReleaseCheck(args.min_version, args.federation,
                                               "--min-version"))
        try:
            x = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValidationError(f"input {args.input}: not a readable .npy array: {exc}") from None
        if not np.issubdtype(x.dtype, np.floating):
            raise ValidationError(f"input {args.input}: expected floats (float32, pixels scaled "
                                  f"to [0, 1], channels first), got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if tuple(x.shape) == sess.input_shape:
            x = x[None]
        probs = sess.predict(x, use_local=not args.global_only)
    except (BundleError, ValidationError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if sess.verified_by is None:  # once, just before the output it qualifies
        print(f"warning: {unauthenticated_warning(args.bundle, sess.manifest)}", file=sys.stderr)
    names = sess.class_names
    for i, p in enumerate(probs):
        c = int(p.argmax())
        label = names[c] if names is not None else f"class {c}"
        print(f"{i}\t{label}\tp={p[c]:.4f}\t[{' '.join(f'{v:.4f}' for v in p)}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
