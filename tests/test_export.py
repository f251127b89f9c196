"""Export to ONNX, int8 quantization, the bundle writer and the export/predict CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.bundle import build_bundle
from export.onnx_export import export_graph
from export.quantize import (
    Activations,
    ArrayCalibrationReader,
    GraphFixes,
    QuantizeOptions,
    QuantMode,
    quantize_part,
)
from fedcoe_edge.checkpoint import save_arrays
from fedcoe_edge.cli import main
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.runtime import MoESession
from fedcoe_edge.training import build_model, predict_probs, run_epochs, to_arrays

torch.set_num_threads(1)


def run_ort(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def torch_out(model, x: np.ndarray, **kw):
    with torch.no_grad():
        return model(torch.from_numpy(x), **kw)


def test_each_part_matches_torch_in_fp32(digits_moe, digits_bundle):
    model, _, _, x_test, _ = digits_moe
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    assert manifest["opset"] == 18 and manifest["gate_outputs"] == "logits"
    g, loc = model.global_part, model.local_part
    modules = {"global_gate": g.gate, "expert_shared": g.shared, "local_gate": loc.gate,
               **{f"expert_g{k}": e for k, e in enumerate(g.experts)},
               **{f"expert_l{j}": e for j, e in enumerate(loc.experts)}}
    assert set(manifest["parts"]) == set(modules)
    for name, module in modules.items():
        for batch in (x_test[:1], x_test[:37]):  # batch 1 and a batch: the batch dim is dynamic
            (onnx_out,) = run_ort(digits_bundle / manifest["parts"][name]["fp32"]["file"],
                                  {"feats": batch})
            with torch.no_grad():
                ref = module(torch.from_numpy(batch)).numpy()
            assert onnx_out.shape == ref.shape
            assert np.abs(onnx_out - ref).max() < 1e-4, name


def test_session_fp32_matches_torch_forward(digits_moe, digits_bundle):
    model, _, _, x_test, _ = digits_moe
    sess = MoESession(digits_bundle, precision="fp32")
    prior = np.array([0.1, 0.5, 0.3, 0.1])
    cases = [({}, {}),
             ({"prior": prior}, {"prior": torch.tensor(prior, dtype=torch.float32)}),
             ({"expert_mask": [1, 3]}, {"expert_mask": torch.tensor([False, True, False, True])}),
             ({"use_local": False}, {"use_local": False})]
    for ours, theirs in cases:
        out = sess.run(x_test, **ours)
        ref = torch_out(model, x_test, **theirs)
        assert np.abs(out.probs - ref.log_probs.exp().numpy()).max() < 1e-4, ours
        assert np.abs(out.global_probs - ref.global_log_probs.exp().numpy()).max() < 1e-4, ours
        assert np.abs(out.gate_probs - ref.gate_probs.numpy()).max() < 1e-4, ours
        assert np.abs(out.routing - ref.routing.numpy()).max() < 1e-4, ours
    # only experts that some input routes to were run, and never more than the mask allows
    assert set(sess.run(x_test[:1]).experts_run) <= {0, 1, 2, 3}
    assert len(sess.run(x_test[:1]).experts_run) == model.cfg.top_k
    assert set(sess.run(x_test, expert_mask=[1, 3]).experts_run) <= {1, 3}


def test_sparse_runtime_equals_fused_dense_graph(digits_moe, digits_bundle):
    x_test = digits_moe[3]
    sess = MoESession(digits_bundle, precision="fp32")
    for kw in ({}, {"expert_mask": [0, 2, 3]}, {"prior": np.array([0.7, 0.1, 0.1, 0.1])}):
        probs, global_probs = sess.run_fused(x_test, **kw)
        out = sess.run(x_test, **kw)
        assert np.abs(out.probs - probs).max() < 1e-5
        assert np.abs(out.global_probs - global_probs).max() < 1e-5


def test_sparse_equals_fused_when_k_equals_K(tmp_path):
    cfg = ModelConfig(expert_kind="mlp", expert_hidden=16, num_global_experts=3, top_k=3,
                      num_local_experts=2)
    model = build_model(cfg, 3).train()
    x = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    build_bundle(model, tmp_path / "b", calibration=x, options=QuantizeOptions(mode=QuantMode.FP32))
    assert all(m.training for m in model.modules())  # a training caller keeps its mode
    model.eval()
    sess = MoESession(tmp_path / "b")
    out = sess.run(x)
    assert out.experts_run == [0, 1, 2]  # k = K: every expert runs, as in the dense graph
    fused, _ = sess.run_fused(x)
    assert np.abs(out.probs - fused).max() < 1e-5
    assert np.abs(out.probs - torch_out(model, x).log_probs.exp().numpy()).max() < 1e-4
    assert not (tmp_path / "b" / "fp32").exists()  # fp32 bundle: the deployed files are fp32


def test_int8_top1_agreement_on_digits(digits_moe, digits_bundle):
    _, _, _, x_test, y_test = digits_moe
    p_fp32 = MoESession(digits_bundle, precision="fp32").predict(x_test)
    p_int8 = MoESession(digits_bundle).predict(x_test)
    agreement = float((p_int8.argmax(1) == p_fp32.argmax(1)).mean())
    assert agreement >= 0.98
    assert float((p_fp32.argmax(1) == y_test).mean()) > 0.8  # the fixture model did learn
    manifest = json.loads((digits_bundle / "manifest.json").read_text())
    for name, part in manifest["parts"].items():
        assert part["quantization"] in ("static_int8", "dynamic_int8", "fp32")
        if name.startswith("expert_"):  # 32x64 + 10x32 weights: int8 must pay off
            assert part["quantization"] != "fp32"
            assert part["bytes"] < 0.6 * part["fp32"]["bytes"]
        detail = part["quant_detail"]["rel_error"]
        assert set(detail) == {"static_int8", "dynamic_int8"}  # auto measured both


def test_cnn_experts_int8_static_agreement_on_digits(digits_moe, tmp_path):
    """CNN experts (conv parts) get static per-channel QDQ and keep >= 98% top-1 agreement."""
    _, x_train, y_train, x_test, _ = digits_moe
    cfg = ModelConfig(expert_kind="cnn", expert_hidden=16, num_global_experts=3, top_k=2,
                      num_local_experts=1)
    model = build_model(cfg, 0)

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = model(xb)
        return torch.nn.functional.nll_loss(out.log_probs, yb) + torch.nn.functional.nll_loss(
            out.global_log_probs, yb)

    run_epochs(model, list(model.parameters()), x_train, y_train, TrainConfig(lr=0.05), 3,
               np.random.default_rng(0), loss)
    model.eval()
    manifest = build_bundle(model, tmp_path / "cnn", calibration=x_train[:128], include_fused=False)
    for k in range(3):
        assert manifest["parts"][f"expert_g{k}"]["quantization"] == "static_int8"
    p_fp32 = MoESession(tmp_path / "cnn", precision="fp32").predict(x_test)
    assert np.abs(p_fp32 - torch_out(model, x_test).log_probs.exp().numpy()).max() < 1e-4
    p_int8 = MoESession(tmp_path / "cnn").predict(x_test)
    assert float((p_int8.argmax(1) == p_fp32.argmax(1)).mean()) >= 0.98


def test_static_and_dynamic_modes_write_what_they_say(digits_moe, tmp_path):
    model, x_train = digits_moe[0], digits_moe[1]
    src = export_graph(model.global_part.experts[0], [torch.from_numpy(x_train[:2])],
                       tmp_path / "e.onnx", ["feats"], ["logits"])
    calib = x_train[:64]
    static = quantize_part(src, tmp_path / "s.onnx", "feats", calib,
                           QuantizeOptions(mode=QuantMode.STATIC))
    dynamic = quantize_part(src, tmp_path / "d.onnx", "feats", calib,
                            QuantizeOptions(mode=QuantMode.DYNAMIC))
    assert static.mode is QuantMode.STATIC and dynamic.mode is QuantMode.DYNAMIC
    s_nodes = onnx.load(str(tmp_path / "s.onnx")).graph.node
    d_ops = {n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node}
    # per-channel weights: a DequantizeLinear with a vector scale for each Gemm weight
    inits = {i.name: i for i in onnx.load(str(tmp_path / "s.onnx")).graph.initializer}
    per_channel = [n for n in s_nodes if n.op_type == "DequantizeLinear"
                   and len(inits.get(n.input[1], onnx.TensorProto()).dims) == 1]
    assert per_channel
    assert "DynamicQuantizeLinear" in d_ops or "MatMulInteger" in d_ops
    for path in (tmp_path / "s.onnx", tmp_path / "d.onnx"):
        (q,) = run_ort(path, {"feats": x_train[:50]})
        (f,) = run_ort(src, {"feats": x_train[:50]})
        assert (q.argmax(1) == f.argmax(1)).mean() >= 0.9


def test_s8_activations_quantize_activations_as_int8(digits_moe, tmp_path):
    """``activations=s8``: every activation QuantizeLinear gets an int8 zero point (the
    default's are uint8), the manifest options record it, and the part still agrees with
    fp32 (docs/bundle.md, "Same answers on every CPU")."""
    model, x_train = digits_moe[0], digits_moe[1]
    src = export_graph(model.global_part.experts[0], [torch.from_numpy(x_train[:2])],
                       tmp_path / "e.onnx", ["feats"], ["logits"])
    dtypes = {}
    for act in (Activations.U8, Activations.S8):
        opts = QuantizeOptions(mode=QuantMode.STATIC, activations=act)
        assert opts.to_dict()["activations"] == act.value
        dst = tmp_path / f"{act.value}.onnx"
        quantize_part(src, dst, "feats", x_train[:64], opts)
        proto = onnx.load(str(dst))
        inits = {i.name: i for i in proto.graph.initializer}
        dtypes[act] = {onnx.numpy_helper.to_array(inits[n.input[2]]).dtype.name
                       for n in proto.graph.node if n.op_type == "QuantizeLinear"}
        (q,) = run_ort(dst, {"feats": x_train[:50]})
        (f,) = run_ort(src, {"feats": x_train[:50]})
        assert (q.argmax(1) == f.argmax(1)).mean() >= 0.9
    assert dtypes == {Activations.U8: {"uint8"}, Activations.S8: {"int8"}}
    assert QuantizeOptions(activations="s8").activations is Activations.S8  # type: ignore[arg-type]


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="activations"):
        QuantizeOptions(activations="u4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="quantize mode"):
        QuantizeOptions(mode="int4")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="calibrate_method"):
        QuantizeOptions(calibrate_method="magic")
    assert QuantizeOptions(mode="static_int8").mode is QuantMode.STATIC  # type: ignore[arg-type]


def test_graph_fixes_are_recorded_as_one_bool_unless_some_are_off():
    """Every manifest so far records ``graph_fixes: true``; a partial set (the benchmarks'
    step-by-step rows) is recorded flag by flag, never as a bool that would misreport it."""
    assert QuantizeOptions().to_dict()["graph_fixes"] is True
    assert QuantizeOptions(graph_fixes=GraphFixes()).to_dict()["graph_fixes"] is True
    assert QuantizeOptions.naive().to_dict()["graph_fixes"] is False
    assert QuantizeOptions.naive().mode is QuantMode.STATIC
    gap = QuantizeOptions(graph_fixes=GraphFixes(fp32_stem=False, fold_hardsigmoid=False))
    assert gap.fixes == GraphFixes(global_pool=True, fp32_stem=False, fold_hardsigmoid=False)
    assert gap.to_dict()["graph_fixes"] == {"global_pool": True, "fp32_stem": False,
                                            "fold_hardsigmoid": False}


def test_calibration_reader_batches_and_fixed_inputs():
    x = np.arange(5 * 2, dtype=np.float64).reshape(5, 2)
    bias = np.zeros(3, np.float32)
    reader = ArrayCalibrationReader("x", x, batch=2, fixed={"gate_bias": bias})
    got = [reader.get_next() for _ in range(4)]
    assert got[3] is None
    assert [b["x"].shape for b in got[:3]] == [(2, 2), (2, 2), (1, 2)]  # type: ignore[index]
    assert all(b["x"].dtype == np.float32 and b["gate_bias"] is bias for b in got[:3])  # type: ignore[index]
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["x"], x[:2])  # type: ignore[index]


def test_dynamic_refused_on_conv_parts(tmp_path):
    cfg = ModelConfig(expert_kind="cnn", expert_hidden=16, num_global_experts=2, top_k=1)
    model = build_model(cfg, 0).eval()
    x = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
    src = export_graph(model.global_part.experts[0], [torch.from_numpy(x[:2])],
                       tmp_path / "c.onnx", ["feats"], ["logits"])
    with pytest.raises(ConfigError, match="convolutions"):
        quantize_part(src, tmp_path / "d.onnx", "feats", x, QuantizeOptions(mode=QuantMode.DYNAMIC))
    auto = quantize_part(src, tmp_path / "a.onnx", "feats", x, QuantizeOptions())
    assert auto.mode is QuantMode.STATIC  # conv parts: static QDQ only


def test_conv_trunk_bundle_small_image(tmp_path):
    """The camera config's path (MobileNetV3-Small trunk, static int8) on 3x32x32 inputs."""
    cfg = ModelConfig(input_shape=(3, 32, 32), trunk="mobilenet_v3_small", expert_kind="mlp",
                      expert_hidden=16,
                      num_global_experts=2, top_k=1, num_local_experts=1)
    model = build_model(cfg, 0).eval()
    x = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    manifest = build_bundle(model, tmp_path / "cam", calibration=x, include_fused=False)
    trunk = manifest["parts"]["trunk"]
    assert trunk["quantization"] == "static_int8"
    nodes = onnx.load(str(tmp_path / "cam" / trunk["file"])).graph.node
    ops = {n.op_type for n in nodes}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    # the int8 fixes of export.graph_rewrites reach the bundle's trunk: SE pooling as
    # GlobalAveragePool (ReduceMean has no int8 kernel), HardSigmoid folded into integer adds
    # (only the fp32 RGB stem's HardSwish keeps one), the stem conv's weight left fp32
    assert "ReduceMean" not in ops and "GlobalAveragePool" in ops
    assert sum(n.op_type == "HardSigmoid" for n in nodes) <= 1
    assert manifest["quantization"]["graph_fixes"] is True
    ref = torch_out(model, x[:4]).log_probs.exp().numpy()
    fp32 = MoESession(tmp_path / "cam", precision="fp32").predict(x[:4])
    assert np.abs(fp32 - ref).max() < 1e-4
    int8 = MoESession(tmp_path / "cam").predict(x[:4])
    assert int8.shape == (4, 10) and np.allclose(int8.sum(1), 1, atol=1e-4)


def test_build_refuses_a_folder_that_is_not_a_bundle(digits_moe, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a bundle folder"):
        build_bundle(digits_moe[0], tmp_path / "notes", calibration=digits_moe[1][:8])
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="calibration data must have shape"):
        build_bundle(digits_moe[0], tmp_path / "b", calibration=np.zeros((4, 64), np.float32))
    assert not (tmp_path / "b").exists()


# --- CLI -------------------------------------------------------------------------------


def write_checkpoint(model, root: Path) -> Path:
    """A checkpoint as `fedcoe simulate` writes it, for client "0" of a 4-client digits run."""
    folder = root / "checkpoints" / "fedcoe"
    state = to_arrays(model.state_dict())
    save_arrays(folder / "global.safetensors", {k: v for k, v in state.items() if k.startswith("global.")})
    save_arrays(folder / "client_0.safetensors", {k: v for k, v in state.items() if k.startswith("local.")})
    sim = {"dataset": "digits", "partition": "dirichlet", "alpha": 0.5, "clients": 4,
           "new_clients": 1, "min_samples": 20, "train": {"experts_per_client": 2}}
    doc = {"model": model.cfg.to_dict(), "version": 3, "clients": ["0"], "algorithm": "fedcoe",
           "seed": 0, "simulation": sim, "affinity": {"0": [0.1, 0.4, 0.2, 0.3]}}
    (folder / "model.json").write_text(json.dumps(doc))
    return root / "checkpoints"


def test_cli_export_report_and_predict(digits_moe, tmp_path, capsys):
    model = digits_moe[0]
    ckpt = write_checkpoint(model, tmp_path)
    out, report_path = tmp_path / "bundle", tmp_path / "report.json"
    rc = main(["export", "--checkpoint-dir", str(ckpt), "--client", "0", "--out", str(out),
               "--quantize", "int8", "--calibration-samples", "64", "--report", str(report_path),
               "--tar"])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["held_experts"] == [1, 3]  # top-2 of the client's affinity row
    for key in ("fp32_max_abs_diff", "int8_top1_agreement", "torch_acc", "fp32_acc", "int8_acc"):
        assert report[key] is not None, key
    assert report["fp32_max_abs_diff"] < 1e-4
    assert report["torch_acc"] == report["fp32_acc"]
    assert report["int8_top1_agreement"] >= 0.9
    assert set(report["sizes"]) == {"global_gate", "expert_shared", "expert_g1", "expert_g3",
                                    "local_gate", "expert_l0"}
    assert report["total_int8_bytes"] < report["total_fp32_bytes"]
    # the torch reference in the report is the client's personal model (held experts only)
    from fedcoe_edge.data import make_federation

    fed = make_federation("digits", "dirichlet", 4, 1, 0, 0.5, 20)
    d = fed.clients["0"]
    ref = predict_probs(model, d.x_test, expert_mask=torch.tensor([False, True, False, True]))
    assert report["samples"] == len(d.y_test)
    assert report["torch_acc"] == pytest.approx(float((ref.argmax(1) == d.y_test).mean()), abs=1e-6)
    assert "onnx int8" in capsys.readouterr().out

    np.save(tmp_path / "in.npy", d.x_test[:3].astype(np.float64))  # floats are cast
    assert main(["predict", "--bundle", str(out) + ".tar", "--input", str(tmp_path / "in.npy"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = MoESession(out).predict(d.x_test[:3])
    assert printed["classes"] == expected.argmax(1).tolist()
    np.save(tmp_path / "one.npy", d.x_test[0])  # one sample without a batch dim
    assert main(["predict", "--bundle", str(out), "--input", str(tmp_path / "one.npy")]) == 0
    assert f"class {int(expected[0].argmax())}" in capsys.readouterr().out


def test_cli_errors_are_one_line(digits_moe, digits_bundle, tmp_path, capsys):
    ckpt = write_checkpoint(digits_moe[0], tmp_path)
    rc = main(["export", "--checkpoint-dir", str(tmp_path / "nope"), "--client", "0",
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    rc = main(["export", "--checkpoint-dir", str(ckpt), "--algorithm", "fedavg", "--client", "0",
               "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "algorithms found: fedcoe" in err
    rc = main(["export", "--checkpoint-dir", str(ckpt), "--client", "7", "--out", str(tmp_path / "b")])
    assert rc == 2 and "no private state for client '7'" in capsys.readouterr().err
    np.save(tmp_path / "ints.npy", np.zeros((2, 1, 8, 8), np.int64))
    rc = main(["predict", "--bundle", str(tmp_path / "nobundle"), "--input", str(tmp_path / "ints.npy")])
    assert rc == 2 and "no such folder" in capsys.readouterr().err
    rc = main(["predict", "--bundle", str(digits_bundle), "--input", str(tmp_path / "ints.npy")])
    assert rc == 2 and "expected floating-point values" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((2, 64), np.float32))
    rc = main(["predict", "--bundle", str(digits_bundle), "--input", str(tmp_path / "wide.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "part 'global_gate'" in err and "(2, 64)" in err


def test_cli_export_static_without_fp32_copies(digits_moe, tmp_path, capsys):
    ckpt = write_checkpoint(digits_moe[0], tmp_path)
    out, report_path = tmp_path / "bundle", tmp_path / "report.json"
    rc = main(["export", "--checkpoint-dir", str(ckpt / "fedcoe"), "--client", "0", "--out", str(out),
               "--quant-mode", "static", "--experts", "0,2", "--no-fp32", "--no-fused",
               "--calibration-samples", "32", "--report", str(report_path)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["held_experts"] == [0, 2] and report["fp32_max_abs_diff"] is None
    assert report["int8_reference"] == "torch" and report["int8_top1_agreement"] >= 0.9
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p["quantization"] for p in manifest["parts"].values()} == {"static_int8"}
    assert manifest["fused"] is None and not (out / "fp32").exists()
    assert "int8 top-1 agreement with torch" in capsys.readouterr().out
