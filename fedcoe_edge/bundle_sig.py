"""Signed bundle manifests: a hash and an HMAC-SHA256 (or Ed25519) over every field.

Part files are hash-checked against the manifest, so the manifest is what decides a
device's predictions: ``top_k``, the held experts, the quantization, the model config and
the part hashes themselves. A manifest carries a ``signature`` block (docs/design.md,
"Signed bundles"; the format is in docs/bundle.md)::

    "signature": {"alg": "hmac-sha256", "key_id": "3f2a...", "manifest_sha256": "...",
                  "value": "<hex MAC or Ed25519 signature>"}

covering the canonical JSON (sorted keys, no spaces, ASCII) of the whole manifest without
that block, so an edit to any field, however deep, is detected. The HMAC key is the
device's federation key (what its agent signs MQTT envelopes with), separated from that
use by a derivation; a vendor may sign with an Ed25519 private key instead, verified with
its public key (needs the ``cryptography`` package, imported only then).

Without a key a reader still checks ``manifest_sha256`` (an accidental edit), but anyone
can recompute a hash: only a key proves who wrote the manifest. Given a key, a reader
refuses an unsigned manifest. Everything here runs before any part file is read.

Only CPython's built-in SHA-256 is used (no ``hashlib``/``hmac``: they load OpenSSL, several
MB of RSS on a device); :mod:`fedcoe_edge.bundle_format` hashes part files with the same ``sha256``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcoe_edge.errors import BundleError, ConfigError

try:  # CPython's built-in SHA-256 (see the module docstring)
    from _sha256 import sha256 as sha256  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other Pythons (3.12+: _sha2)
    try:
        from _sha2 import sha256 as sha256  # type: ignore[import-not-found,no-redef]
    except ImportError:
        from hashlib import sha256 as sha256  # type: ignore[no-redef]

try:  # constant-time comparison without importing hmac (and with it OpenSSL)
    from _operator import _compare_digest as _equal  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other Pythons
    from hmac import compare_digest as _equal  # type: ignore[assignment,no-redef]

SIGNATURE_FIELD = "signature"
HMAC_ALG = "hmac-sha256"
ED25519_ALG = "ed25519"
ALGS = (HMAC_ALG, ED25519_ALG)
MIN_KEY_BYTES = 16
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOCK = 64  # SHA-256 block size (HMAC pads the key to it)


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """RFC 2104 HMAC-SHA256 on the built-in SHA-256 (equal to ``hmac.new(key, msg, sha256)``)."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = sha256(bytes(b ^ 0x36 for b in key) + msg).digest()
    return sha256(bytes(b ^ 0x5C for b in key) + inner).digest()


def bundle_mac_key(key: bytes) -> bytes:
    """The key bundle manifests are MACed with, derived from a device's federation key so a
    manifest MAC can never stand in for an envelope MAC made with the same key."""
    return hmac_sha256(bytes(key), b"fedcoe-bundle-manifest")


def canonical_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature block, as
    deterministic JSON (sorted keys, no spaces, ASCII, no NaN)."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False).encode("ascii")
    except ValueError as exc:
        raise BundleError(f"manifest: cannot be signed or verified: {exc}") from None


def key_id(alg: str, key: bytes) -> str:
    """A short public name of a key (the HMAC key is never revealed by it)."""
    tag = b"fedcoe-bundle-key-id:" + alg.encode() + b":"
    return sha256(tag + (bundle_mac_key(key) if alg == HMAC_ALG else key)).hexdigest()[:16]


def read_key_file(path: str | Path, what: str) -> bytes:
    """A key stored as hex text (the format of agent and coordinator key files)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {p}: unreadable: {exc}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what} {p}: not a hex key") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"{what} {p}: key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("ed25519 bundle signatures need the 'cryptography' package "
                          "(pip install cryptography), or use the HMAC federation key") from None
    return ed25519


def read_ed25519_key(path: str | Path, *, private: bool) -> bytes:
    """A raw 32-byte Ed25519 key from a file of 64 hex digits or a PEM (PKCS8 / SPKI)."""
    p = Path(path)
    what = "vendor private key" if private else "vendor public key"
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {p}: unreadable: {exc}") from None
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography.hazmat.primitives import serialization

        ed = _ed25519()
        try:
            key = (serialization.load_pem_private_key(data, None) if private
                   else serialization.load_pem_public_key(data))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{what} {p}: not a PEM key: {exc}") from None
        if private and isinstance(key, ed.Ed25519PrivateKey):
            return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        if not private and isinstance(key, ed.Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        raise ConfigError(f"{what} {p}: not an Ed25519 key")
    try:
        raw = bytes.fromhex(data.decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{what} {p}: neither PEM nor 64 hex digits") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} {p}: an Ed25519 key is 32 bytes, got {len(raw)}")
    return raw


@dataclass(frozen=True)
class BundleKeys:
    """What a bundle reader trusts, and what a writer signs with.

    ``hmac_key``: the device's federation key (verifies and signs HMAC manifests).
    ``ed25519_public``: a vendor's raw public key (verifies only). ``ed25519_private``: a
    vendor's raw private key (signs, in the exporter). ``required``: refuse an unsigned
    manifest; by default whenever a verifying key is given.
    """

    hmac_key: bytes | None = None
    ed25519_public: bytes | None = None
    ed25519_private: bytes | None = None
    required: bool | None = None

    def __post_init__(self) -> None:
        if self.hmac_key is not None and len(self.hmac_key) < MIN_KEY_BYTES:
            raise ConfigError(f"bundle HMAC key must be at least {MIN_KEY_BYTES} bytes")
        for name in ("ed25519_public", "ed25519_private"):
            value = getattr(self, name)
            if value is not None and len(value) != 32:
                raise ConfigError(f"bundle {name} key must be 32 raw bytes, got {len(value)}")
        if self.must_verify and not self.can_verify:
            raise ConfigError("bundle signatures required, but no HMAC key or vendor public key "
                              "was given to verify them with")

    @property
    def can_verify(self) -> bool:
        return self.hmac_key is not None or self.ed25519_public is not None

    @property
    def can_sign(self) -> bool:
        return self.hmac_key is not None or self.ed25519_private is not None

    @property
    def must_verify(self) -> bool:
        return self.can_verify if self.required is None else bool(self.required)

    def describe(self) -> str:
        have = [f"{HMAC_ALG} key {key_id(HMAC_ALG, self.hmac_key)}"] if self.hmac_key else []
        if self.ed25519_public is not None:
            have.append(f"{ED25519_ALG} key {key_id(ED25519_ALG, self.ed25519_public)}")
        return ", ".join(have) or "no key"


def sign_manifest(manifest: Mapping[str, Any], keys: BundleKeys) -> dict[str, Any]:
    """A copy of ``manifest`` with a fresh signature block (Ed25519 when a vendor private
    key is given, else HMAC with the federation key)."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    data = canonical_bytes(body)
    digest = sha256(data).hexdigest()
    if keys.ed25519_private is not None:
        ed = _ed25519()
        private = ed.Ed25519PrivateKey.from_private_bytes(keys.ed25519_private)
        from cryptography.hazmat.primitives import serialization

        public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
        sig = {"alg": ED25519_ALG, "key_id": key_id(ED25519_ALG, public),
               "manifest_sha256": digest, "value": private.sign(data).hex()}
    elif keys.hmac_key is not None:
        sig = {"alg": HMAC_ALG, "key_id": key_id(HMAC_ALG, keys.hmac_key),
               "manifest_sha256": digest,
               "value": hmac_sha256(bundle_mac_key(keys.hmac_key), data).hex()}
    else:
        raise ConfigError("sign_manifest: no HMAC key or vendor private key to sign with")
    return {**body, SIGNATURE_FIELD: sig}


def is_signed(manifest: Mapping[str, Any]) -> bool:
    return manifest.get(SIGNATURE_FIELD) is not None


def verify_manifest(manifest: Any, keys: BundleKeys | None, where: str) -> str | None:
    """Check the manifest's signature block before anything else is trusted.

    Returns the algorithm that verified (None: unsigned and allowed, or hash-checked only
    because no key was given). Raises one BundleError naming ``where`` otherwise.
    """
    keys = keys or BundleKeys()
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: manifest top level must be a JSON object")
    sig = manifest.get(SIGNATURE_FIELD)
    if sig is None:
        if keys.must_verify:
            raise BundleError(f"{where}: manifest is unsigned, and this reader requires a signed "
                              f"manifest ({keys.describe()})")
        return None
    if not isinstance(sig, dict) or not all(isinstance(sig.get(f), str) for f in
                                             ("alg", "key_id", "manifest_sha256", "value")):
        raise BundleError(f"{where}: manifest signature block must hold the strings alg, key_id, "
                          "manifest_sha256 and value")
    alg = sig["alg"]
    if alg not in ALGS:
        raise BundleError(f"{where}: manifest signature algorithm {alg!r} not in {ALGS}")
    data = canonical_bytes(manifest)
    if not _HEX64.fullmatch(sig["manifest_sha256"]) or not _equal(
            sha256(data).hexdigest(), sig["manifest_sha256"]):
        raise BundleError(f"{where}: manifest was changed after it was signed (its sha256 does not "
                          "match the signature block's manifest_sha256)")
    if not keys.can_verify:
        return None  # a hash anyone can recompute: integrity, not authenticity
    try:
        value = bytes.fromhex(sig["value"])
    except ValueError:
        raise BundleError(f"{where}: manifest signature value is not hex") from None
    if alg == HMAC_ALG and keys.hmac_key is not None:
        if _equal(hmac_sha256(bundle_mac_key(keys.hmac_key), data), value):
            return alg
    elif alg == ED25519_ALG and keys.ed25519_public is not None:
        ed = _ed25519()
        from cryptography.exceptions import InvalidSignature

        try:
            ed.Ed25519PublicKey.from_public_bytes(keys.ed25519_public).verify(value, data)
            return alg
        except InvalidSignature:
            pass
    elif not keys.must_verify:
        return None
    else:
        raise BundleError(f"{where}: manifest is signed with {alg} (key {sig['key_id']}), but this "
                          f"reader has no {alg} key ({keys.describe()})")
    raise BundleError(f"{where}: manifest signature does not verify (signed by {alg} key "
                      f"{sig['key_id']}; this reader holds {keys.describe()}): the manifest was "
                      "edited or signed with another key")


def unauthenticated_warning(where: Any, manifest: Mapping[str, Any]) -> str:
    """The one line a command prints when it runs a bundle no key authenticated: a hash
    anyone can recompute says nothing about who wrote ``top_k``, the experts' files, the
    class names or the version (docs/bundle.md, "Versions and rollback")."""
    how = ("signed, but no key was given to verify it" if is_signed(manifest)
           else "its manifest is unsigned")
    return (f"bundle {where} is unauthenticated ({how}): anyone could have rewritten its "
            "manifest (top_k, experts, class names, version); pass --key-file or "
            "--vendor-public-key to verify it")


def reader_keys(key_file: str | None, vendor_public_key: str | None) -> BundleKeys | None:
    """The keys a command line names (``--key-file``, ``--vendor-public-key``); None: none."""
    if not key_file and not vendor_public_key:
        return None
    return BundleKeys(
        hmac_key=read_key_file(key_file, "bundle key file") if key_file else None,
        ed25519_public=(read_ed25519_key(vendor_public_key, private=False)
                        if vendor_public_key else None))
