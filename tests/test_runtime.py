"""The on-device runtime: verification before loading, bad input, swaps, torch-free import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.bundle import build_bundle, write_tar
from export.onnx_export import export_graph
from export.quantize import QuantizeOptions, QuantMode
from fedcoe_edge.errors import BundleError, ConfigError, ValidationError
from fedcoe_edge.runtime import MoESession, read_bundle, sha256_hex, topk_routing
from fedcoe_edge.training import build_model

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bundle(digits_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the shared bundle, free to tamper with."""
    return Path(shutil.copytree(digits_bundle, tmp_path / "b"))


@pytest.fixture
def count_sessions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts onnxruntime sessions created (to prove nothing is loaded half-way)."""
    made: list[int] = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    return made


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_import_and_predict_with_torch_unimportable(digits_bundle: Path, digits_moe) -> None:
    x = digits_moe[3][:5]
    np.save(digits_bundle.parent / "x.npy", x)
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "import numpy as np\n"
        "import fedcoe_edge.runtime as rt\n"
        f"s = rt.MoESession({str(digits_bundle)!r})\n"
        f"p = s.predict(np.load({str(digits_bundle.parent / 'x.npy')!r}))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(','.join(str(int(c)) for c in p.argmax(1)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    expected = MoESession(digits_bundle).predict(x).argmax(1)
    assert res.stdout.strip() == ",".join(str(int(c)) for c in expected)
    # the device's command line, also without torch
    code = ("import runpy, sys\nsys.modules['torch'] = None\n"
            f"sys.argv = ['rt', {str(digits_bundle)!r}, {str(digits_bundle.parent / 'x.npy')!r}]\n"
            "runpy.run_module('fedcoe_edge.runtime', run_name='__main__')\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert [line.split("\t")[1] for line in res.stdout.strip().splitlines()] == [
        f"class {int(c)}" for c in expected]
    # and the blocker really blocks: the same process cannot import torch
    res = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; import torch"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "import of torch halted" in res.stderr


def test_tampered_file_is_refused_before_any_session(bundle: Path, count_sessions) -> None:
    target = bundle / "expert_g1.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"part 'expert_g1' file expert_g1.onnx fails its sha256"):
        MoESession(bundle)
    assert count_sessions == []


def test_missing_file_is_refused_before_any_session(bundle: Path, count_sessions) -> None:
    (bundle / "fp32" / "local_gate.onnx").unlink()
    with pytest.raises(BundleError, match=r"part 'local_gate' \(fp32\) file fp32/local_gate.onnx is missing"):
        MoESession(bundle)
    assert count_sessions == []


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format_version=99), "unknown format_version 99"),
    (lambda d: d.update(format="something-else"), "format is 'something-else'"),
    (lambda d: d["parts"].pop("expert_g2"), r"missing \['expert_g2'\]"),
    (lambda d: d["parts"]["expert_g0"].update(file="../../etc/passwd"), "escapes the bundle"),
    (lambda d: d["parts"]["expert_g0"].update(sha256="abc"), "not a lowercase sha256"),
    (lambda d: d.update(top_k=3), "top_k=3 disagrees"),
    (lambda d: d["model"].update(num_classes=1), "invalid model config"),
    (lambda d: d.update(held_experts=[0, 9]), "held_experts must be distinct ids"),
    (lambda d: d["parts"]["global_gate"].update(quantization="int4"), "quantization 'int4'"),
])
def test_bad_manifest_is_refused(bundle: Path, count_sessions, change, message: str) -> None:
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=message):
        MoESession(bundle)
    assert count_sessions == []


def test_manifest_that_lies_about_an_interface_is_refused(bundle: Path) -> None:
    # swap two files *and* their hashes: every hash verifies, but the gate is not an expert
    def change(d):
        gate, expert = d["parts"]["global_gate"], d["parts"]["expert_g0"]
        for key in ("file", "sha256", "bytes"):
            gate[key], expert[key] = expert[key], gate[key]
    edit_manifest(bundle, change)
    # the gate runs inside the merged heads graph; expert_g0's session gets the gate's file
    with pytest.raises(BundleError, match="part 'expert_g0' outputs"):
        MoESession(bundle)


def test_merged_heads_run_like_the_separate_parts(digits_moe, tmp_path: Path, count_sessions) -> None:
    """heads.onnx (gates, shared and local experts in one graph) is an accelerator only:
    the same numbers as one session per part, with fewer sessions."""
    model, x_train, x = digits_moe[0], digits_moe[1], digits_moe[3][:16]
    opts = QuantizeOptions(mode=QuantMode.FP32)
    merged = build_bundle(model, tmp_path / "m", calibration=x_train[:32], options=opts,
                          include_fused=False)
    build_bundle(model, tmp_path / "s", calibration=x_train[:32], options=opts,
                 include_fused=False, include_heads=False)
    assert merged["heads"]["parts"] == ["global_gate", "expert_shared", "local_gate", "expert_l0"]
    count_sessions.clear()
    fast = MoESession(tmp_path / "m")
    n_merged = len(count_sessions)
    slow = MoESession(tmp_path / "s")
    n_separate = len(count_sessions) - n_merged
    assert (n_merged, n_separate) == (5, 8)  # 4 always-on sessions become 1 (+ 4 routed)
    for kw in ({}, {"use_local": False}, {"expert_mask": [1, 2]}, {"prior": [0.1, 0.2, 0.3, 0.4]}):
        a, b = fast.run(x, **kw), slow.run(x, **kw)
        assert np.abs(a.probs - b.probs).max() < 1e-6, kw
        assert np.array_equal(a.routing, b.routing) and a.experts_run == b.experts_run
    assert np.abs(fast.routing_prior(x) - slow.routing_prior(x)).max() < 1e-7
    ref = model(torch.from_numpy(x)).log_probs.exp().detach().numpy()
    assert np.abs(fast.predict(x) - ref).max() < 1e-4
    # a manifest whose heads claim other parts is refused before any session
    count_sessions.clear()
    edit_manifest(tmp_path / "m", lambda d: d["heads"].update(parts=["global_gate"]))
    with pytest.raises(BundleError, match="heads.parts must be the always-on parts"):
        MoESession(tmp_path / "m")
    assert count_sessions == []


def test_file_changed_after_verification_is_refused(bundle: Path, monkeypatch) -> None:
    """Each file is hashed again as it is loaded: a change between the bundle check and the
    session (another process rewriting the folder) is caught, naming the part."""
    import fedcoe_edge.runtime as rt

    real = rt.read_bundle

    def then_tamper(*args, **kwargs):
        contents = real(*args, **kwargs)
        target = bundle / "expert_g1.onnx"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        return contents

    monkeypatch.setattr(rt, "read_bundle", then_tamper)
    with pytest.raises(BundleError, match="part 'expert_g1' file expert_g1.onnx fails its sha256 "
                                          r"check \(changed since"):
        MoESession(bundle)


def test_read_bundle_keep_verifies_all_but_holds_only_what_is_asked(bundle: Path) -> None:
    contents = read_bundle(bundle, keep=lambda m: {m["parts"]["expert_g0"]["file"]})
    assert list(contents.files) == ["expert_g0.onnx"]
    target = bundle / "fp32" / "expert_g3.onnx"  # not kept, still checked
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(BundleError, match=r"part 'expert_g3' \(fp32\) file fp32/expert_g3.onnx fails"):
        read_bundle(bundle, keep=lambda m: set())


def test_tar_bundle_round_trip_and_tamper(bundle: Path, digits_moe, tmp_path: Path) -> None:
    x = digits_moe[3][:20]
    tar_path = write_tar(bundle)
    assert tar_path.name == "b.tar"
    assert np.array_equal(MoESession(tar_path).predict(x), MoESession(bundle).predict(x))
    # rewrite the tar with one member changed: refused, naming the part
    bad = tmp_path / "bad.tar"
    with tarfile.open(tar_path) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            fh = src.extractfile(member)
            assert fh is not None  # every member of a bundle tar is a regular file
            data = fh.read()
            if member.name == "expert_shared.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            dst.addfile(member, __import__("io").BytesIO(data))
    with pytest.raises(BundleError, match="part 'expert_shared'"):
        MoESession(bad)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    with pytest.raises(BundleError, match="unreadable tar"):
        MoESession(tmp_path / "junk.tar")


def test_bad_inputs_name_the_part(digits_bundle: Path) -> None:
    sess = MoESession(digits_bundle)
    good = np.zeros((2, 1, 8, 8), np.float32)
    with pytest.raises(ValidationError, match=r"part 'global_gate'.*shape \(batch, 1, 8, 8\), got \(2, 64\)"):
        sess.run(good.reshape(2, 64))
    with pytest.raises(ValidationError, match=r"part 'global_gate'.*dtype float32, got float64"):
        sess.run(good.astype(np.float64))
    with pytest.raises(ValidationError, match="numpy array"):
        sess.run(good.tolist())
    with pytest.raises(ValidationError, match="shape"):
        sess.run(np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(ValidationError, match="ids must be in"):
        sess.run(good, expert_mask=[5])
    with pytest.raises(ValidationError, match="selects no expert"):
        sess.run(good, expert_mask=np.zeros(4, bool))
    with pytest.raises(ValidationError, match="prior"):
        sess.run(good, prior=[0.5, 0.5])
    with pytest.raises(ConfigError, match="threads"):
        MoESession(digits_bundle, threads=0)
    with pytest.raises(ConfigError, match="precision"):
        MoESession(digits_bundle, precision="int4")


def test_batch_one_equals_batch_rows_and_providers_pass_through(digits_bundle: Path, digits_moe) -> None:
    x = digits_moe[3][:6]
    fp32 = MoESession(digits_bundle, precision="fp32")
    rows = np.concatenate([fp32.predict(x[i : i + 1]) for i in range(len(x))])
    assert np.abs(fp32.predict(x) - rows).max() < 1e-6
    # dynamic int8 scales activations per call, so a row depends (slightly) on its batch
    sess = MoESession(digits_bundle, providers=["CPUExecutionProvider"], threads=1)
    batch = sess.predict(x)
    rows = np.concatenate([sess.predict(x[i : i + 1]) for i in range(len(x))])
    assert np.abs(batch - rows).max() < 0.02 and np.array_equal(batch.argmax(1), rows.argmax(1))
    assert sess.providers == ["CPUExecutionProvider"]
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in sess._sessions.values())


def test_routing_prior_matches_torch(digits_bundle: Path, digits_moe) -> None:
    model, x = digits_moe[0], digits_moe[3]
    with torch.no_grad():
        ref = model.gate_logits(torch.from_numpy(x)).softmax(-1).mean(0).numpy()
    got = MoESession(digits_bundle, precision="fp32").routing_prior(x)
    assert np.abs(got - ref).max() < 1e-5


def test_topk_ties_go_to_the_lower_index_like_onnx_topk(tie_bundle: tuple[Path, np.ndarray]) -> None:
    # a zero gate gives every expert the same probability: only the tie rule decides
    bundle, x = tie_bundle
    sess = MoESession(bundle)
    out = sess.run(x)
    assert out.experts_run == [0, 1]
    assert np.allclose(out.routing, [[0.5, 0.5, 0.0, 0.0]] * 5)
    # batch 1 routes in plain Python: the same tie rule, the same numbers as the batch
    one = sess.run(x[:1])
    assert one.experts_run == [0, 1] and one.routing.tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert sess.run(x[:1], expert_mask=[1, 3]).experts_run == [1, 3]
    assert np.abs(one.probs - out.probs[:1]).max() < 1e-6
    fused, _ = sess.run_fused(x)  # the ONNX TopK in the dense graph agrees
    assert np.abs(out.probs - fused).max() < 1e-6
    assert topk_routing(np.array([[0.2, 0.3, 0.3, 0.2]]), 1).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_held_subset_bundle_and_cold_start_download(digits_moe, tmp_path: Path) -> None:
    """A device holding experts {0, 2}: the default mask, the error for others, a swap-in."""
    model, x_train, _, x_test, _ = digits_moe
    out = tmp_path / "sub"
    build_bundle(model, out, calibration=x_train[:64], held=[0, 2],
                 options=QuantizeOptions(mode=QuantMode.FP32))
    sess = MoESession(out)
    assert sess.held_experts == [0, 2] and not (out / "expert_g1.onnx").exists()
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test), expert_mask=torch.tensor([True, False, True, False]))
    assert np.abs(sess.predict(x_test) - ref.log_probs.exp().numpy()).max() < 1e-4
    with pytest.raises(ValidationError, match=r"expert\(s\) \[1\] are not in this bundle"):
        sess.run(x_test, expert_mask=[0, 1])
    # download expert 1 (cold start: the routing prior asked for it) and use it
    src = export_graph(model.global_part.experts[1], [torch.from_numpy(x_test[:2])],
                       tmp_path / "g1.onnx", ["feats"], ["logits"])
    sess.swap_expert(1, src, sha256=sha256_hex(src.read_bytes()), quantization="fp32")
    assert sess.held_experts == [0, 1, 2]
    with torch.no_grad():
        ref = model(torch.from_numpy(x_test), expert_mask=torch.tensor([True, True, True, False]))
    assert np.abs(sess.predict(x_test) - ref.log_probs.exp().numpy()).max() < 1e-4
    assert MoESession(out).held_experts == [0, 1, 2]  # persisted and verifiable


def test_swap_expert_replaces_one_file_atomically(bundle: Path, digits_moe, tmp_path: Path) -> None:
    model, x_test = digits_moe[0], digits_moe[3]
    sess = MoESession(bundle)
    before = sess.predict(x_test)
    other = build_model(model.cfg, 99).eval()  # an expert with different weights
    src = export_graph(other.global_part.experts[2], [torch.from_numpy(x_test[:2])],
                       tmp_path / "new_g2.onnx", ["feats"], ["logits"])
    digest = sess.swap_expert(2, src, sha256=sha256_hex(src.read_bytes()), quantization="fp32")
    after = sess.predict(x_test)
    assert not np.array_equal(before, after)
    # the same maths in torch with expert 2 replaced (the rest stays int8: compare loosely)
    patched = build_model(model.cfg, 0).eval()
    patched.load_state_dict(model.state_dict())
    patched.global_part.experts[2].load_state_dict(other.global_part.experts[2].state_dict())
    with torch.no_grad():
        ref = patched(torch.from_numpy(x_test)).log_probs.exp().numpy()
    assert (after.argmax(1) == ref.argmax(1)).mean() >= 0.95
    # on disk: new file listed with its hash, the old one gone, fused graph dropped
    manifest = json.loads((bundle / "manifest.json").read_text())
    part = manifest["parts"]["expert_g2"]
    assert part["sha256"] == digest and (bundle / part["file"]).is_file()
    assert not (bundle / "expert_g2.onnx").exists() and "fp32" not in part
    assert manifest["fused"] is None and not (bundle / "fused_dense.onnx").exists()
    reloaded = MoESession(bundle)
    assert np.abs(reloaded.predict(x_test) - after).max() < 1e-6
    with pytest.raises(BundleError, match="fused"):
        reloaded.run_fused(x_test)
    with pytest.raises(BundleError, match="part 'expert_g2' has no fp32 file"):
        MoESession(bundle, precision="fp32")


def test_bad_swaps_leave_the_old_expert(bundle: Path, digits_moe, tmp_path: Path) -> None:
    model, x_test = digits_moe[0], digits_moe[3]
    sess = MoESession(bundle)
    before = sess.predict(x_test)
    manifest_before = (bundle / "manifest.json").read_bytes()
    files_before = sorted(p.name for p in bundle.iterdir())
    good = export_graph(build_model(model.cfg, 5).global_part.experts[0],
                        [torch.from_numpy(x_test[:2])], tmp_path / "g.onnx", ["feats"], ["logits"])
    gate = export_graph(model.global_part.gate, [torch.from_numpy(x_test[:2])],
                        tmp_path / "gate.onnx", ["feats"], ["logits"])
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 100)
    cases = [
        (lambda: sess.swap_expert(0, good, sha256="0" * 64), "fails its sha256 check"),
        (lambda: sess.swap_expert(0, tmp_path / "junk.onnx"), "cannot be loaded by onnxruntime"),
        (lambda: sess.swap_expert(0, gate), "part 'expert_g0' outputs"),
        (lambda: sess.swap_expert(0, tmp_path / "absent.onnx"), "does not exist"),
        (lambda: sess.swap_expert(7, good), r"k must be in \[0, 4\)"),
    ]
    for call, message in cases:
        with pytest.raises((BundleError, ValidationError), match=message):
            call()
        assert np.array_equal(sess.predict(x_test), before)
        assert (bundle / "manifest.json").read_bytes() == manifest_before
        assert sorted(p.name for p in bundle.iterdir()) == files_before
    assert read_bundle(bundle).manifest["parts"]["expert_g0"]["file"] == "expert_g0.onnx"


def _old_glue(sess: MoESession, x: np.ndarray, prior=None, expert_mask=None,
              use_local: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """The float64 formula ``MoESession.run`` used before its float32 glue, on the same
    sessions' outputs: (probs, global probs, routing, experts run)."""
    from fedcoe_edge.moe_numpy import softmax

    feats = sess.features(x)
    heads = {n: o.astype(np.float64) for n, o in sess._run_heads(feats).items()}

    def part(name: str, f: np.ndarray = feats) -> np.ndarray:
        return heads[name] if name in heads else sess._run_part(name, f).astype(np.float64)

    logits = part("global_gate")
    if prior is not None:
        logits = logits + np.log(np.maximum(np.asarray(prior, np.float64), 1e-8))
    gate = softmax(np.where(sess._mask(expert_mask), logits, -np.inf))
    routing = topk_routing(gate, sess.cfg.top_k)
    z = part("expert_shared")
    run = [int(k) for k in np.flatnonzero((routing > 0).any(0))]
    for k in run:
        rows = np.flatnonzero(routing[:, k] > 0)
        z[rows] += routing[rows, k : k + 1] * part(f"expert_g{k}", np.ascontiguousarray(feats[rows]))
    global_p = softmax(z)
    if not use_local or sess.cfg.num_local_experts == 0:
        return global_p, global_p, routing, run
    h = softmax(part("local_gate"))
    local_z = np.stack([part(f"expert_l{j}") for j in range(sess.cfg.num_local_experts)], 1)
    if sess.cfg.local_residual:
        local_z = local_z + z[:, None, :]
    probs = h[:, :1] * global_p + (h[:, 1:, None] * softmax(local_z)).sum(1)
    return probs, global_p, routing, run


@pytest.mark.parametrize("precision", ["deployed", "fp32"])
def test_float32_glue_gives_the_float64_formula(digits_bundle: Path, digits_moe, precision: str) -> None:
    """run()'s float32 glue (plain Python gate at batch 1, numpy for a batch) gives the
    probabilities, routing, experts and top-1 of the float64 formula it replaced."""
    x = digits_moe[3][:12]
    sess = MoESession(digits_bundle, precision=precision)
    k_total = sess.num_global_experts
    prior = np.linspace(0.05, 1.0, k_total)
    for kw in ({}, {"use_local": False}, {"expert_mask": [1, 2]}, {"expert_mask": [3]},
               {"prior": prior}, {"prior": prior, "expert_mask": [0, 2, 3]}):
        for xb in [x[i : i + 1] for i in range(4)] + [x]:  # batch 1 and batch 12 paths
            got = sess.run(xb, **kw)
            probs, global_p, routing, run = _old_glue(sess, xb, **kw)
            assert got.probs.dtype == np.float32 and got.routing.dtype == np.float32
            assert np.abs(got.probs - probs).max() < 1e-5, kw
            assert np.abs(got.global_probs - global_p).max() < 1e-5, kw
            assert np.abs(got.routing - routing).max() < 1e-5, kw
            assert got.experts_run == run, kw
            assert np.array_equal(got.probs.argmax(1), probs.argmax(1)), kw
    # a batch-row prior (B, K) goes through the batch path only
    rows = np.random.default_rng(2).uniform(0.1, 1.0, (len(x), k_total))
    assert np.abs(sess.run(x, prior=rows).probs - _old_glue(sess, x, prior=rows)[0]).max() < 1e-5

