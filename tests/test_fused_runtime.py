"""``MoESession(fused=...)``: the whole forward pass as one onnxruntime graph composed in
memory from the verified parts, with the same answers as the per-part path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.bundle import build_bundle, write_tar
from export.onnx_export import export_graph
from export.quantize import QuantizeOptions, QuantMode
from fedcoe_edge.config import ModelConfig
from fedcoe_edge.errors import BundleError, ConfigError
from fedcoe_edge.fused import FUSE_MODES
from fedcoe_edge.runtime import MoESession, sha256_hex
from fedcoe_edge.training import build_model

torch.set_num_threads(1)


@pytest.fixture
def bundle(digits_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the shared bundle, free to tamper with."""
    return Path(shutil.copytree(digits_bundle, tmp_path / "b"))


def _same(a, b, tol: float = 1e-5) -> None:  # two RuntimeOutputs
    assert a.experts_run == b.experts_run
    assert np.array_equal(a.probs.argmax(1), b.probs.argmax(1))
    for name in ("probs", "global_probs", "gate_probs", "routing"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32, name
        assert np.abs(x - y).max() < tol, (name, np.abs(x - y).max())
    assert (a.local_gate_probs is None) == (b.local_gate_probs is None)
    if a.local_gate_probs is not None:
        assert np.abs(a.local_gate_probs - b.local_gate_probs).max() < tol


@pytest.mark.parametrize("mode", FUSE_MODES)
def test_fused_gives_the_per_part_answers(digits_bundle: Path, digits_moe, mode: str) -> None:
    x_test = digits_moe[3][:40]
    for precision in ("fp32", "deployed"):
        parts = MoESession(digits_bundle, precision=precision)
        fused = MoESession(digits_bundle, precision=precision, fused=mode)
        assert fused.fused_mode == mode and not fused._sessions  # one session, no parts
        if precision == "fp32":  # a batch: fp32 rows do not depend on their batch
            _same(parts.run(x_test), fused.run(x_test))
        # one input at a time (batch 1: plain-Python routing in the per-part path; dynamic
        # int8 parts scale activations per call, so int8 is compared call for call)
        for i in range(0, 40, 5):
            _same(parts.run(x_test[i:i + 1]), fused.run(x_test[i:i + 1]))
        prior = np.array([0.7, 0.1, 0.1, 0.1])
        for kw in ({"prior": prior}, {"expert_mask": [1, 3]}, {"use_local": False},
                   {"prior": prior, "expert_mask": [0, 2, 3], "use_local": False}):
            _same(parts.run(x_test[:1], **kw), fused.run(x_test[:1], **kw))
        if precision == "fp32":
            rows = np.tile(prior, (len(x_test), 1))
            _same(parts.run(x_test, prior=rows), fused.run(x_test, prior=rows))


def test_fused_ties_go_to_the_lower_index(tie_bundle: tuple[Path, np.ndarray]) -> None:
    bundle, x = tie_bundle
    for mode in FUSE_MODES:
        sess = MoESession(bundle, fused=mode)
        out = sess.run(x)
        assert out.experts_run == [0, 1] and out.local_gate_probs is None
        assert out.routing.tolist() == [[0.5, 0.5, 0.0, 0.0]] * 5
        assert sess.run(x[:1], expert_mask=[1, 3]).experts_run == [1, 3]
        _same(MoESession(bundle).run(x), out)


def test_fused_held_subset_and_top_k_equal_to_k(digits_moe, tmp_path: Path) -> None:
    model, x_train, _, x_test, _ = digits_moe
    build_bundle(model, tmp_path / "sub", calibration=x_train[:64], held=[0, 2],
                 options=QuantizeOptions(mode=QuantMode.FP32))
    for mode in FUSE_MODES:
        _same(MoESession(tmp_path / "sub").run(x_test[:20]),
              MoESession(tmp_path / "sub", fused=mode).run(x_test[:20]))
    cfg = ModelConfig(expert_kind="mlp", expert_hidden=8, num_global_experts=2, top_k=2,
                      num_local_experts=1, local_residual=False, shared_expert=False)
    all_k = build_model(cfg, 3).eval()
    build_bundle(all_k, tmp_path / "all", calibration=x_test[:16],
                 options=QuantizeOptions(mode=QuantMode.FP32))
    _same(MoESession(tmp_path / "all").run(x_test[:20]),
          MoESession(tmp_path / "all", fused=True).run(x_test[:20]))


def test_fused_composes_only_verified_parts(bundle: Path, tmp_path: Path) -> None:
    tar = write_tar(bundle)
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    _same(MoESession(bundle).run(x[:1]), MoESession(tar, fused=True).run(x[:1]))
    # one byte of an expert changed: refused before anything is composed or loaded
    f = bundle / "expert_g1.onnx"
    data = bytearray(f.read_bytes())
    data[-5] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="expert_g1"):
        MoESession(bundle, fused=True)
    with pytest.raises(ConfigError, match="fused must be"):
        MoESession(tar, fused="sparse")


def test_swap_on_a_fused_session_runs_the_parts(bundle: Path, digits_moe, tmp_path: Path) -> None:
    model, x_test = digits_moe[0], digits_moe[3][:10]
    fused = MoESession(bundle, fused=True)
    other = build_model(model.cfg, 99).eval()
    src = export_graph(other.global_part.experts[2], [torch.from_numpy(x_test[:2])],
                       tmp_path / "g2.onnx", ["feats"], ["logits"])
    fused.swap_expert(2, src, sha256=sha256_hex(src.read_bytes()), quantization="fp32")
    assert fused.fused_mode is None  # the fused graph held the old expert
    _same(MoESession(bundle).run(x_test[:1]), fused.run(x_test[:1]))
    assert json.loads((bundle / "manifest.json").read_text())["parts"]["expert_g2"]["file"] != \
        "expert_g2.onnx"
    # and the re-swapped bundle fuses again from its new, verified files
    _same(MoESession(bundle).run(x_test[:1]), MoESession(bundle, fused=True).run(x_test[:1]))


def test_fused_is_one_session(digits_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = ort.InferenceSession

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        made.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    sess = MoESession(digits_bundle, fused=True)
    sess.run(np.zeros((1, 1, 8, 8), np.float32))
    assert len(made) == 1
    sess.features(np.zeros((1, 1, 8, 8), np.float32))  # parts made on first need
    assert len(made) > 1
