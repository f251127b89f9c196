"""Signed bundle manifests: every prediction-changing edit is refused before any part is read."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.bundle import build_bundle, write_tar
from export.onnx_export import export_graph
from export.quantize import QuantizeOptions, QuantMode
from fedcoe_edge.bundle_sig import (
    BundleKeys,
    bundle_mac_key,
    canonical_bytes,
    hmac_sha256,
    sign_manifest,
)
from fedcoe_edge.errors import BundleError, ConfigError
from fedcoe_edge.runtime import MoESession, read_bundle, sha256_hex
from fedcoe_edge.training import build_model

REPO = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def sign_folder(root: Path, key: bytes = KEY) -> None:
    path = root / "manifest.json"
    path.write_text(json.dumps(sign_manifest(json.loads(path.read_text()),
                                             BundleKeys(hmac_key=key)), indent=2))


def edit(root: Path, change: Callable[[dict[str, Any]], None], *, rehash: bool = False) -> None:
    """Edit the manifest as an attacker would; ``rehash`` also fixes the manifest_sha256
    (anyone can recompute a hash; only the MAC needs the key)."""
    path = root / "manifest.json"
    doc = json.loads(path.read_text())
    change(doc)
    if rehash and doc.get("signature"):
        doc["signature"]["manifest_sha256"] = hashlib.sha256(canonical_bytes(doc)).hexdigest()
    path.write_text(json.dumps(doc))


@pytest.fixture
def signed(digits_bundle: Path, tmp_path: Path) -> Path:
    root = Path(shutil.copytree(digits_bundle, tmp_path / "signed"))
    sign_folder(root)
    return root


@pytest.fixture
def no_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every .onnx file opened or handed to onnxruntime (must stay empty on refusal)."""
    seen: list[str] = []
    real_read, real_sess = Path.read_bytes, ort.InferenceSession

    def read_bytes(self: Path) -> bytes:
        if self.suffix == ".onnx":
            seen.append(self.name)
        return real_read(self)

    def session(*args: Any, **kwargs: Any) -> Any:
        seen.append("session")
        return real_sess(*args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def test_hmac_matches_the_standard_library() -> None:
    for key in (b"k" * 16, bytes(range(64)), bytes(range(100))):
        for msg in (b"", b"manifest", bytes(1000)):
            assert hmac_sha256(key, msg) == hmac.new(key, msg, hashlib.sha256).digest()


def test_signed_bundle_loads_with_its_key_and_predicts_the_same(signed: Path, digits_bundle: Path,
                                                                digits_moe) -> None:
    x = digits_moe[3][:50]
    sess = MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    assert np.array_equal(sess.predict(x), MoESession(digits_bundle).predict(x))
    sig = json.loads((signed / "manifest.json").read_text())["signature"]
    assert sig["alg"] == "hmac-sha256" and KEY.hex() not in json.dumps(sig)
    # the MAC is over the canonical manifest with a key derived from the federation key
    doc = json.loads((signed / "manifest.json").read_text())
    assert sig["value"] == hmac.new(bundle_mac_key(KEY), canonical_bytes(doc),
                                    hashlib.sha256).hexdigest()
    MoESession(signed)  # without a key: the hash is still checked, and it holds


def _drop_expert(d: dict[str, Any]) -> None:
    d["held_experts"].remove(3)
    d["parts"].pop("expert_g3")


def _top_k_one(d: dict[str, Any]) -> None:
    d["top_k"] = 1
    d["model"]["top_k"] = 1


EDITS = {
    "top_k 2 -> 1": _top_k_one,
    "drop held expert 3": _drop_expert,
    "quantization": lambda d: d["parts"]["expert_g1"].update(quantization="fp32"),
    "model config": lambda d: d["model"].update(local_residual=False),
    "class names": lambda d: d["meta"].update(classes=[f"c{i}" for i in range(10)]),
}


@pytest.mark.parametrize("rehash", [False, True], ids=["hash-kept", "hash-recomputed"])
@pytest.mark.parametrize("name", list(EDITS))
def test_each_manifest_edit_is_refused_before_any_part_is_read(signed: Path, no_reads: list[str],
                                                               name: str, rehash: bool) -> None:
    edit(signed, EDITS[name], rehash=rehash)
    message = "signature does not verify" if rehash else "changed after it was signed"
    with pytest.raises(BundleError, match=message):
        MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    assert no_reads == []
    if not rehash:  # a plain edit breaks the hash: refused even by a reader without the key
        with pytest.raises(BundleError, match="changed after it was signed"):
            read_bundle(signed)


def test_replacing_an_expert_file_with_its_sha256_is_refused(signed: Path, digits_moe,
                                                             tmp_path: Path, no_reads) -> None:
    """The attacker swaps in other weights and updates the part's sha256 and size (and the
    manifest hash): every file hash verifies, only the MAC catches it."""
    other = build_model(digits_moe[0].cfg, 99).eval()
    src = export_graph(other.global_part.experts[1], [torch.from_numpy(digits_moe[3][:2])],
                       tmp_path / "evil.onnx", ["feats"], ["logits"])
    data = src.read_bytes()
    (signed / "expert_g1.onnx").write_bytes(data)
    no_reads.clear()

    def change(d: dict[str, Any]) -> None:
        d["parts"]["expert_g1"].update(sha256=sha256_hex(data), bytes=len(data))

    edit(signed, change, rehash=True)
    read_bundle(signed)  # without the key the bundle is self-consistent: that is the attack
    no_reads.clear()
    with pytest.raises(BundleError, match="signature does not verify"):
        MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    assert no_reads == []


def test_unsigned_or_wrongly_signed_manifest_is_refused_when_a_key_is_given(
        digits_bundle: Path, signed: Path, no_reads: list[str]) -> None:
    with pytest.raises(BundleError, match="manifest is unsigned, and this reader requires"):
        MoESession(digits_bundle, keys=BundleKeys(hmac_key=KEY))
    edit(signed, lambda d: d.pop("signature"))
    with pytest.raises(BundleError, match="manifest is unsigned"):
        read_bundle(signed, keys=BundleKeys(hmac_key=KEY))
    sign_folder(signed, OTHER_KEY)
    with pytest.raises(BundleError, match="signature does not verify"):
        MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    edit(signed, lambda d: d["signature"].update(alg="rsa"))
    with pytest.raises(BundleError, match="algorithm 'rsa'"):
        MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    assert no_reads == []
    with pytest.raises(ConfigError, match="no HMAC key or vendor public key"):
        BundleKeys(required=True)


def test_signed_tar_is_checked_before_its_parts(signed: Path, tmp_path: Path) -> None:
    tar = write_tar(signed, tmp_path / "b.tar")
    MoESession(tar, keys=BundleKeys(hmac_key=KEY))
    with pytest.raises(BundleError, match="signature does not verify"):
        MoESession(tar, keys=BundleKeys(hmac_key=OTHER_KEY))


def test_swap_re_signs_with_the_key_and_needs_it(signed: Path, digits_moe, tmp_path: Path) -> None:
    model, x_test = digits_moe[0], digits_moe[3]
    src = export_graph(build_model(model.cfg, 7).global_part.experts[2],
                       [torch.from_numpy(x_test[:2])], tmp_path / "g2.onnx", ["feats"], ["logits"])
    with pytest.raises(ConfigError, match="manifest is signed; swapping needs the HMAC"):
        MoESession(signed).swap_expert(2, src, quantization="fp32")
    sess = MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    sess.swap_expert(2, src, quantization="fp32")
    after = sess.predict(x_test)
    reloaded = MoESession(signed, keys=BundleKeys(hmac_key=KEY))  # verifies: re-signed
    assert np.array_equal(reloaded.predict(x_test), after)
    with pytest.raises(BundleError, match="signature does not verify"):
        MoESession(signed, keys=BundleKeys(hmac_key=OTHER_KEY))


def test_exporter_signs_and_the_clis_refuse_edits(digits_moe, tmp_path: Path) -> None:
    """``build_bundle(keys=...)``; then ``fedcoe predict`` and ``python -m
    fedcoe_edge.runtime`` with ``--key-file``: exit 0 signed, exit 2 and one line after an edit."""
    model, x_train, _, x_test, _ = digits_moe
    out = tmp_path / "b"
    build_bundle(model, out, calibration=x_train[:32], held=[0, 1, 2, 3],
                 options=QuantizeOptions(mode=QuantMode.FP32), include_fused=False,
                 keys=BundleKeys(hmac_key=KEY))
    key_file = tmp_path / "device.key"
    key_file.write_text(KEY.hex() + "\n")
    np.save(tmp_path / "x.npy", x_test[:3])
    clis = [[sys.executable, "-m", "fedcoe_edge.cli", "predict", "--bundle", str(out),
             "--input", str(tmp_path / "x.npy"), "--key-file", str(key_file)],
            [sys.executable, "-m", "fedcoe_edge.runtime", str(out), str(tmp_path / "x.npy"),
             "--key-file", str(key_file)]]
    for cmd in clis:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert len(res.stdout.strip().splitlines()) == 3
    edit(out, _top_k_one, rehash=True)
    for cmd in clis:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stdout == ""
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "signature does not verify" in lines[0], res.stderr
    (tmp_path / "short.key").write_text("abcd")
    res = subprocess.run([*clis[0][:-1], str(tmp_path / "short.key")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "at least 16 bytes" in res.stderr


def test_ed25519_vendor_signature(signed: Path, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    path = signed / "manifest.json"
    path.write_text(json.dumps(sign_manifest(json.loads(path.read_text()),
                                             BundleKeys(ed25519_private=raw))))
    MoESession(signed, keys=BundleKeys(ed25519_public=public))
    with pytest.raises(BundleError, match="has no ed25519 key"):
        MoESession(signed, keys=BundleKeys(hmac_key=KEY))
    edit(signed, _top_k_one, rehash=True)
    with pytest.raises(BundleError, match="signature does not verify"):
        MoESession(signed, keys=BundleKeys(ed25519_public=public))
