"""Envelope, weight codec, int8 deltas, chunked transfers and update validation."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.errors import ConfigError, ValidationError, WireError
from fedcoe_edge.wire import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_NACK,
    MIN_CHUNK_SIZE,
    Chunk,
    Envelope,
    Reassembler,
    ReplayCache,
    TransferManifest,
    TransferWindow,
    UnauthenticatedError,
    check_chunk_size,
    compress_delta,
    compressed_delta_metadata,
    decode_chunk,
    decode_envelope,
    decode_tensor_metadata,
    decode_tensors,
    decompress_delta,
    encode_chunk,
    encode_envelope,
    encode_tensors,
    is_compressed_delta,
    split_chunks,
    validate_update,
)

KEY = b"k" * 32
KEYS = {"dev1": KEY, "coord": b"c" * 32}
T0 = 1_700_000_000_000


def _env(**kw: object) -> Envelope:
    base: dict[str, object] = dict(
        federation="fed", sender="dev1", recipient="coord", round=3, body={"a": [1, 2]}, ts_ms=T0
    )
    base.update(kw)
    return Envelope.new("hello", **base)  # type: ignore[arg-type]


def _decode(data: bytes, **kw: object) -> Envelope:
    kw.setdefault("now_ms", T0 + 1000)
    return decode_envelope(data, KEYS.get, **kw)  # type: ignore[arg-type]


def _resign(d: dict[str, object], key: bytes = KEY) -> bytes:
    """Re-sign a hand-edited envelope dict so only the intended defect remains."""
    import hmac

    unsigned = {k: v for k, v in d.items() if k != "hmac"}
    body = json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()
    d["hmac"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _sign_raw(unsigned: bytes, key: bytes = KEY) -> bytes:
    """Sign hand-written canonical bytes (``{...}`` without the hmac member) the way
    encode_envelope does, so a test can put what no encoder would write behind a valid
    HMAC: the receiver's parse limits are then all that stands in the way."""
    import hmac

    mac = hmac.new(key, unsigned, hashlib.sha256).hexdigest()
    i = unsigned.index(b',"msg_id":')
    return unsigned[:i] + b',"hmac":"' + mac.encode() + b'"' + unsigned[i:]


def _unsigned_with_body(body: bytes, sender: str = "dev1") -> bytes:
    return (b'{"body":' + body + b',"federation":"fed","msg_id":"m1","recipient":"coord",'
            b'"round":3,"sender":"' + sender.encode() + b'","ts_ms":' + str(T0).encode()
            + b',"ttl_s":300,"type":"hello","v":1}')


# ----------------------------------------------------------------------------- envelope


def test_envelope_roundtrip_and_canonical_bytes() -> None:
    env = _env()
    data = encode_envelope(env, KEY)
    assert data == encode_envelope(env, KEY)  # deterministic
    got = _decode(data)
    assert got.body == {"a": [1, 2]} and got.round == 3 and got.sender == "dev1"
    assert len(got.hmac) == 64 and replace(got, hmac="") == env


def test_envelope_is_authenticated_on_its_canonical_bytes() -> None:
    """The HMAC covers the bytes as sent: the same fields in another order or with spaces
    are not what was signed, and are refused before anything is parsed."""
    d = json.loads(encode_envelope(_env(), KEY))
    shuffled = json.dumps(dict(reversed(list(d.items())))).encode()
    with pytest.raises(UnauthenticatedError, match="no sender member"):
        _decode(shuffled)
    spaced = json.dumps(d, sort_keys=True).encode()
    with pytest.raises(UnauthenticatedError):
        _decode(spaced)
    # a body holding its own "hmac" and "sender" members does not confuse the raw reading
    env = _env(body={"hmac": "0" * 64, "sender": "coord", "x": ',"hmac":"'})
    assert _decode(encode_envelope(env, KEY)).body["sender"] == "coord"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "no sender member"),
        (b"{not json", "no sender member"),
        (b"[1, 2]", "no sender member"),
        (b'{"v": 1, "v": 1}', "no sender member"),
        (b'{"ts_ms": NaN}', "no sender member"),
        (b'{"body":{},"hmac":"' + b"0" * 64 + b'","sender":"dev1","v":1}', "bad HMAC"),
        (b'{"body":{},"hmac":"zz","sender":"dev1","v":1}', "no HMAC member"),
        (b'{"body":{},"sender":"a/b"}', "not a valid id"),
    ],
)
def test_envelope_rejects_unauthenticated_bytes_unparsed(data: bytes, reason: str) -> None:
    with pytest.raises(UnauthenticatedError, match=reason):
        _decode(data)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"x":1e999}', "not finite"),
        (b'{"x":-1e999}', "not finite"),
        (b'{"x":NaN}', "non-standard JSON constant"),
        (b'{"x":Infinity}', "non-standard JSON constant"),
        (b'{"x":' + b"1" * 401 + b"}", "integer of 401 digits"),
        (b'{"x":9223372036854775808}', "exceeds"),
        (b'{"x":' + b"[" * 40_000 + b"]" * 40_000 + b"}", "nested 40002 deep"),
        (b'{"x":' + b"[" * 32 + b"]" * 32 + b"}", "nested 34 deep"),
        (b'{"x":1,"x":2}', "duplicate key"),
        (b'{"x":"\xff"}', "not valid JSON"),
    ],
)
def test_authenticated_envelope_is_parsed_with_limits(body: bytes, reason: str) -> None:
    """What a key holder signs still goes through the limits: no inf, no 400-digit
    integer, no recursion bomb, each refused in one line (never OverflowError or
    RecursionError out of the receiver)."""
    with pytest.raises(WireError, match=reason) as info:
        _decode(_sign_raw(_unsigned_with_body(body)))
    assert not isinstance(info.value, UnauthenticatedError)


def test_envelope_limits_accept_what_the_encoder_writes() -> None:
    body = {"big": MAX_JSON_INT, "small": -MAX_JSON_INT, "f": 1.5e300, "s": "[[[{" * 100}
    nested: Any = 1
    for _ in range(MAX_JSON_DEPTH - 2):  # the envelope and its body are two levels
        nested = [nested]
    body["deep"] = nested
    assert _decode(encode_envelope(_env(body=body), KEY)).body == body
    with pytest.raises(WireError, match="not in canonical form"):
        _decode(_sign_raw(_unsigned_with_body(b'{"a":1.0e2}')))


def test_unauthenticated_flood_is_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """10,000 unsigned or mis-signed messages (inf numbers, 40,000-deep nesting, random
    bytes) are refused without one JSON parse: bounded work per message."""
    import fedcoe_edge.wire.envelope as envelope_mod

    def no_parse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("an unauthenticated message was parsed")
    monkeypatch.setattr(envelope_mod, "parse_json", no_parse)
    deep = b"[" * 40_000 + b"]" * 40_000
    forged = [
        _sign_raw(_unsigned_with_body(b'{"x":1e999}'), key=b"w" * 32),
        _sign_raw(_unsigned_with_body(deep), key=b"w" * 32),
        _sign_raw(_unsigned_with_body(b"{}", sender="stranger")),
        deep, b"\x00" * 1000,
    ]
    t0 = time.perf_counter()
    for i in range(10_000):
        with pytest.raises(UnauthenticatedError):
            _decode(forged[i % len(forged)])
    assert time.perf_counter() - t0 < 20.0  # ~10 us each when idle; generous under load


def test_envelope_rejects_wrong_version() -> None:
    d = json.loads(encode_envelope(_env(), KEY))
    d["v"] = 2
    with pytest.raises(WireError, match="unsupported protocol version 2"):
        _decode(_resign(d))


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d: d.pop("ttl_s"), "missing field.*ttl_s"),
        (lambda d: d.update(extra=1), "unexpected field.*extra"),
        (lambda d: d.update(round="3"), "'round' must be a non-negative integer"),
        (lambda d: d.update(round=True), "'round' must be a non-negative integer"),
        (lambda d: d.update(round=-1), "'round' must be a non-negative integer"),
        (lambda d: d.update(body=[1]), "'body' must be a JSON object"),
        (lambda d: d.update(ttl_s=0), "'ttl_s' must be an integer"),
        (lambda d: d.update(sender="a/b"), "not a valid id"),
        (lambda d: d.update(type="Hello World"), "'type' must match"),
        (lambda d: d.update(ts_ms=1.5), "'ts_ms' must be a non-negative integer"),
    ],
)
def test_envelope_rejects_bad_fields(edit: Callable[[dict[str, Any]], object], reason: str) -> None:
    d = json.loads(encode_envelope(_env(), KEY))
    edit(d)
    with pytest.raises(WireError, match=reason):
        _decode(_resign(d))


def test_envelope_rejects_tampering_and_wrong_keys() -> None:
    data = encode_envelope(_env(), KEY)
    d = json.loads(data)
    d["body"]["a"] = [1, 3]
    with pytest.raises(WireError, match="bad HMAC"):
        _decode(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    d = json.loads(data)
    d["round"] = 4
    with pytest.raises(UnauthenticatedError, match="from 'dev1': bad HMAC"):
        _decode(json.dumps(d, sort_keys=True, separators=(",", ":")).encode())
    with pytest.raises(WireError, match="bad HMAC"):
        _decode(encode_envelope(_env(), b"x" * 32))
    with pytest.raises(WireError, match="unknown sender"):
        _decode(encode_envelope(_env(sender="stranger"), KEY))
    with pytest.raises(WireError, match="at least 16 bytes"):
        encode_envelope(_env(), b"short")


def test_envelope_ttl_and_clock_skew() -> None:
    data = encode_envelope(_env(ttl_s=10), KEY)
    assert _decode(data, now_ms=T0 + 10_000).ttl_s == 10
    with pytest.raises(WireError, match="expired 1 ms ago"):
        _decode(data, now_ms=T0 + 10_001)
    with pytest.raises(WireError, match="in the future"):
        _decode(data, now_ms=T0 - 400_000)


def test_envelope_replay_rejected_but_fresh_ids_pass() -> None:
    cache = ReplayCache()
    data = encode_envelope(_env(), KEY)
    _decode(data, replay_cache=cache)
    with pytest.raises(WireError, match="replayed msg_id"):
        _decode(data, replay_cache=cache)
    _decode(encode_envelope(_env(), KEY), replay_cache=cache)  # new msg_id
    assert len(cache) == 2


def test_forged_envelope_does_not_poison_replay_cache() -> None:
    cache = ReplayCache()
    env = _env()
    with pytest.raises(WireError, match="bad HMAC"):
        _decode(encode_envelope(env, b"z" * 32), replay_cache=cache)
    assert _decode(encode_envelope(env, KEY), replay_cache=cache).msg_id == env.msg_id


def test_replay_cache_is_bounded_and_never_readmits() -> None:
    cache = ReplayCache(capacity=3)
    for i in range(5):
        cache.check_and_add("d", f"m{i}", expires_ms=1000 + i, now=0)
    assert len(cache) == 3
    # m0 and m1 were evicted: they must still be refused (below the floor).
    with pytest.raises(WireError, match="older than the replay window"):
        cache.check_and_add("d", "m0", expires_ms=1000, now=0)
    with pytest.raises(WireError, match="replayed"):
        cache.check_and_add("d", "m4", expires_ms=1004, now=0)
    cache.check_and_add("d", "m9", expires_ms=2000, now=0)  # newer than the floor: fine
    # After expiry, entries drop out: the ttl check guards those messages.
    cache.check_and_add("d", "late", expires_ms=5000, now=3000)
    assert len(cache) == 1


def test_encode_envelope_refuses_what_receiver_would_reject() -> None:
    with pytest.raises(WireError, match="body is not plain JSON"):
        encode_envelope(_env(body={"x": float("nan")}), KEY)
    with pytest.raises(WireError, match="'round' must be"):
        encode_envelope(_env(round=-2), KEY)
    with pytest.raises(WireError, match="envelope limit"):
        encode_envelope(_env(body={"x": "a" * 1_100_000}), KEY)


# ----------------------------------------------------------------------------- tensors


def test_tensor_codec_roundtrip_all_dtypes_and_noncontiguous() -> None:
    rng = np.random.default_rng(0)
    t: dict[str, np.ndarray] = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(4, dtype=np.uint8),
        "b": np.array([True, False]),
        "scalar": np.array(2.5, dtype=np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32)[:, ::2].T,
    }
    out = decode_tensors(encode_tensors(t))
    assert set(out) == set(t)
    for k, v in t.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    out["f32"][0, 0] = 9.0  # writable, not a view into the payload


def test_tensor_codec_rejects_bad_input() -> None:
    with pytest.raises(WireError, match="not a valid safetensors payload"):
        decode_tensors(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WireError, match="not a valid safetensors payload"):
        decode_tensors(b"\x80\x02}q\x00.")  # a pickle is just bytes here, never executed
    with pytest.raises(WireError, match="'obj'.*unsupported dtype object"):
        encode_tensors({"obj": np.array([object()])})
    with pytest.raises(WireError, match="'x' is list"):
        encode_tensors({"x": [1, 2]})  # type: ignore[dict-item]


def test_tensor_metadata_roundtrip() -> None:
    data = encode_tensors({"a": np.zeros(2, np.float32)}, metadata={"round": "4"})
    assert decode_tensor_metadata(data) == {"round": "4"}
    assert decode_tensor_metadata(encode_tensors({"a": np.zeros(2, np.float32)})) == {}


# ----------------------------------------------------------------------------- int8 deltas


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "experts.0.w": rng.standard_normal((64, 128)).astype(np.float32),
        "experts.0.b": rng.standard_normal(128).astype(np.float32),
        "gate.w": rng.standard_normal((32, 8)).astype(np.float32),
        "bn.count": np.array([7], dtype=np.int64),
    }


def test_int8_delta_error_bound_and_ratio() -> None:
    base = _model(1)
    rng = np.random.default_rng(2)
    new = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()}
    new["bn.count"] = np.array([9], dtype=np.int64)
    payload = compress_delta(new, base)
    assert is_compressed_delta(payload) and not is_compressed_delta(base)
    data = encode_tensors(payload, metadata=compressed_delta_metadata())
    rebuilt = decompress_delta(decode_tensors(data), base)
    np.testing.assert_array_equal(rebuilt["bn.count"], [9])  # integers lossless
    for k in ("experts.0.w", "experts.0.b", "gate.w"):
        d = new[k].astype(np.float32) - base[k]
        bound = float(np.abs(d).max()) / 254 + 4 * np.finfo(np.float32).eps * float(
            np.abs(new[k]).max()
        )
        err = float(np.abs(rebuilt[k] - new[k]).max())
        assert 0 < err <= bound, k
        assert rebuilt[k].dtype == np.float32
    full = len(encode_tensors(new))
    assert full / len(data) > 3.5  # int8 codes vs float32 weights, minus headers


def test_int8_delta_zero_delta_and_float16() -> None:
    base = {"w": np.ones((3, 3), np.float16)}
    payload = compress_delta(base, base)
    assert payload["s:w"][0] == 0 and not payload["q:w"].any()
    out = decompress_delta(payload, base)
    assert out["w"].dtype == np.float16
    np.testing.assert_array_equal(out["w"], base["w"])


def test_int8_delta_rejects_mismatches() -> None:
    base = _model(1)
    bad = dict(base, **{"gate.w": np.full((32, 8), np.inf, np.float32)})
    with pytest.raises(ValidationError, match="'gate.w' has non-finite"):
        compress_delta(bad, base)
    with pytest.raises(ValidationError, match="'gate.w' has shape"):
        compress_delta(dict(base, **{"gate.w": np.zeros((8, 32), np.float32)}), base)
    payload = compress_delta(base, base)
    with pytest.raises(ValidationError, match="'experts.0.b' missing"):
        decompress_delta({k: v for k, v in payload.items() if "experts.0.b" not in k}, base)
    with pytest.raises(WireError, match="unexpected payload key 'zz'"):
        decompress_delta(dict(payload, zz=np.zeros(1)), base)
    wrong = dict(payload)
    wrong["q:gate.w"] = np.zeros((2, 2), np.int8)
    with pytest.raises(ValidationError, match="'gate.w' has shape"):
        decompress_delta(wrong, base)
    wrong = dict(payload)
    del wrong["s:gate.w"]
    with pytest.raises(WireError, match="'gate.w' lacks a float32 scale"):
        decompress_delta(wrong, base)


# ----------------------------------------------------------------------------- transfers


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_manifest_roundtrip_and_checks() -> None:
    data = _payload(3 * 1024 + 100)
    m = TransferManifest.for_payload(data, expert_ids=[3, 1], base_version=7, chunk_size=1024)
    assert m.chunk_count == 4 and m.chunk_len(3) == 100 and m.total_bytes == 3172
    assert TransferManifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert DEFAULT_CHUNK_SIZE == 256 * 1024
    for size in (MIN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE):
        check_chunk_size(size, "cfg")
    for size in (MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1):
        with pytest.raises(ConfigError, match=f"cfg chunk_size must be in 1 KiB..16 MiB, got {size}"):
            check_chunk_size(size, "cfg")
    with pytest.raises(WireError, match="chunk_count 5 does not match"):
        TransferManifest.from_dict(dict(m.to_dict(), chunk_count=5))
    with pytest.raises(WireError, match="missing field.*sha256"):
        TransferManifest.from_dict({k: v for k, v in m.to_dict().items() if k != "sha256"})
    with pytest.raises(WireError, match="expert_ids must be non-negative"):
        TransferManifest.from_dict(dict(m.to_dict(), expert_ids=["a"]))
    empty = TransferManifest.for_payload(b"", expert_ids=[], base_version=0)
    assert empty.chunk_count == 1 and split_chunks(b"") == [b""]


def test_chunk_frame_roundtrip_and_garbage() -> None:
    frame = encode_chunk("x1", 2, 5, b"abc")
    assert decode_chunk(frame) == Chunk("x1", 2, 5, b"abc")
    with pytest.raises(WireError, match="bad magic"):
        decode_chunk(b"XYZ" + frame[3:])
    with pytest.raises(WireError, match="shorter than the frame header"):
        decode_chunk(b"F")
    with pytest.raises(WireError, match="truncated"):
        decode_chunk(frame[:7])


def test_reassembly_with_duplicates_and_reordering() -> None:
    data = _payload(10_000, seed=3)
    m = TransferManifest.for_payload(data, expert_ids=[0], base_version=1, chunk_size=1024)
    frames = [
        encode_chunk(m.transfer_id, i, m.chunk_count, c)
        for i, c in enumerate(split_chunks(data, 1024))
    ]
    r = Reassembler()
    r.expect(m)
    r.expect(m)  # re-announce is idempotent
    order = frames[::-1] + frames[3:6]
    random.Random(0).shuffle(order)
    flags = [r.add(f) for f in order[:5]]
    assert r.missing(m.transfer_id) and not r.is_complete(m.transfer_id)
    flags += [r.add(f) for f in order[5:]]
    assert flags.count(True) == m.chunk_count and flags.count(False) == 3
    assert r.is_complete(m.transfer_id) and r.missing(m.transfer_id) == []
    assert r.duplicates(m.transfer_id) == 3
    assert r.finish(m.transfer_id) == data
    assert m.transfer_id not in r


def test_reassembler_reports_gaps_for_nack() -> None:
    data = _payload(5 * 1024)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    r = Reassembler()
    r.expect(m)
    for i in (0, 2, 3):
        r.add(encode_chunk(m.transfer_id, i, 5, data[i * 1024 : (i + 1) * 1024]))
    assert r.missing(m.transfer_id, upto_highest=True) == [1]
    assert r.missing(m.transfer_id) == [1, 4]
    p = r.progress(m.transfer_id)
    assert (p["next"], p["highest"], p["missing"], p["received"]) == (1, 3, [1], 3)
    with pytest.raises(WireError, match="incomplete, 2 of 5 chunks missing"):
        r.finish(m.transfer_id)


def test_reassembler_rejects_unknown_and_inconsistent_chunks() -> None:
    data = _payload(3 * 1024)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    r = Reassembler(max_total_bytes=4 * 1024)
    with pytest.raises(WireError, match="chunk for unknown transfer"):
        r.add(encode_chunk(m.transfer_id, 0, 3, data[:1024]))
    r.expect(m)
    with pytest.raises(WireError, match="chunk 0 has 1023 bytes, expected 1024"):
        r.add(encode_chunk(m.transfer_id, 0, 3, data[:1023]))
    with pytest.raises(WireError, match="disagrees with manifest count 3"):
        r.add(encode_chunk(m.transfer_id, 0, 4, data[:1024]))
    with pytest.raises(WireError, match="different manifest"):
        r.expect(replace(m, base_version=9))
    other = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    with pytest.raises(WireError, match="exceed the reassembly budget"):
        r.expect(other)
    r.discard(m.transfer_id)
    r.expect(other)


def test_tampered_chunk_fails_sha256_then_full_resend_succeeds() -> None:
    data = _payload(4096, seed=5)
    m = TransferManifest.for_payload(data, expert_ids=[2], base_version=3, chunk_size=1024)
    chunks = split_chunks(data, 1024)
    r = Reassembler()
    r.expect(m)
    for i, c in enumerate(chunks):
        body = c if i != 2 else bytes([c[0] ^ 1]) + c[1:]
        r.add(encode_chunk(m.transfer_id, i, m.chunk_count, body))
    with pytest.raises(WireError, match="sha256 mismatch"):
        r.finish(m.transfer_id)
    assert r.progress(m.transfer_id)["resets"] == 1
    assert r.missing(m.transfer_id) == [0, 1, 2, 3]
    for i, c in enumerate(chunks):
        r.add(encode_chunk(m.transfer_id, i, m.chunk_count, c))
    assert r.finish(m.transfer_id) == data


def test_window_over_lossy_channel_completes() -> None:
    """Sender window + reassembler over a channel that drops, duplicates and reorders."""
    data = _payload(200_000, seed=7)
    m = TransferManifest.for_payload(data, expert_ids=[0, 1], base_version=1, chunk_size=4096)
    w = TransferWindow(m, data, window=6, retransmit_s=1.0)
    r = Reassembler()
    r.expect(m)
    rng = random.Random(1)
    clock, max_in_flight, wire_chunks = 0.0, 0, 0
    pending: list[bytes] = []
    while not w.done and clock < 1000:
        for seq in w.due(clock):
            frame = w.chunk(seq)
            wire_chunks += 1
            if rng.random() < 0.15:
                continue  # dropped by the broker
            pending.append(frame)
            if rng.random() < 0.1:
                pending.append(frame)  # QoS 1 redelivery
        max_in_flight = max(max_in_flight, w.in_flight)
        rng.shuffle(pending)
        for frame in pending:
            r.add(frame)
        pending.clear()
        if r.is_complete(m.transfer_id):
            w.on_final_ack(hashlib.sha256(r.finish(m.transfer_id)).hexdigest())
            break
        if rng.random() < 0.8:  # progress reports get lost too
            w.on_progress(r.progress(m.transfer_id), clock)
        clock += 0.5
    assert w.done and max_in_flight <= 6
    assert wire_chunks > m.chunk_count and w.resends > 0


def test_window_restarts_after_receiver_reset() -> None:
    data = _payload(3 * 1024)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    w = TransferWindow(m, data, window=8)
    assert w.due(0.0) == [0, 1, 2]
    w.on_progress({"next": 3, "highest": 2, "missing": [], "resets": 0}, 0.1)
    assert w.due(0.2) == [] and w.in_flight == 0
    w.on_progress({"next": 0, "highest": -1, "missing": [], "resets": 1}, 0.3)
    assert w.due(0.4) == [0, 1, 2]
    w.on_progress({"next": 3, "highest": 2, "missing": [], "resets": 0}, 0.5)  # stale
    assert w.in_flight == 3
    assert not w.on_final_ack("0" * 64) and w.on_final_ack(m.sha256) and w.done
    with pytest.raises(WireError, match="malformed progress report"):
        w.on_progress({"next": "x"}, 1.0)
    with pytest.raises(WireError, match="out of range"):
        w.on_progress({"next": 0, "highest": 1, "missing": [7]}, 1.0)
    with pytest.raises(WireError, match="does not match its manifest"):
        TransferWindow(m, data[:-1])


# ----------------------------------------------------------------------------- validation


def test_validate_update_checks_everything() -> None:
    ref = {"w": ((2, 3), np.float32), "n": ((1,), np.int64)}
    good = {"w": np.ones((2, 3), np.float32), "n": np.array([1])}
    validate_update(good, ref, norm_bound=3.0)
    with pytest.raises(ValidationError, match="tensor 'n' missing"):
        validate_update({"w": good["w"]}, ref)
    with pytest.raises(ValidationError, match="unexpected tensor 'x'"):
        validate_update(dict(good, x=np.zeros(1)), ref)
    with pytest.raises(ValidationError, match="'w' has shape \\[3, 2\\]"):
        validate_update(dict(good, w=np.ones((3, 2), np.float32)), ref)
    with pytest.raises(ValidationError, match="'w' has dtype float64"):
        validate_update(dict(good, w=np.ones((2, 3))), ref)
    nan = good["w"].copy()
    nan[1, 1] = np.nan
    with pytest.raises(ValidationError, match="'w' has 1 non-finite"):
        validate_update(dict(good, w=nan), ref)
    with pytest.raises(ValidationError, match="L2 norm 2.449 exceeds bound 2.*largest tensor 'w'"):
        validate_update(good, ref, norm_bound=2.0)
    with pytest.raises(ValidationError, match="tensor 'w' L2 norm 2.449 exceeds bound 1"):
        validate_update(good, ref, norm_bound={"w": 1.0})


# ------------------------------------------------------------------ bounded receiver work


def test_manifest_refuses_tiny_chunks_of_a_large_payload() -> None:
    """A 1-byte chunk size multiplied the receiver's per-chunk work by the payload size."""
    data = _payload(20_000)
    with pytest.raises(WireError, match="below the 1024-byte minimum"):
        TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1)
    good = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=MIN_CHUNK_SIZE)
    with pytest.raises(WireError, match="below the 1024-byte minimum"):
        TransferManifest.from_dict(dict(good.to_dict(), chunk_size=1, chunk_count=20_000))
    # a payload that fits in one chunk may declare any chunk size at least its length
    small = TransferManifest.for_payload(b"abc", expert_ids=[], base_version=0, chunk_size=16)
    assert small.chunk_count == 1


def test_progress_report_is_bounded_and_never_acks_an_unlisted_gap() -> None:
    n = 3 * MAX_NACK
    data = _payload(n * 1024, seed=9)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    r = Reassembler()
    r.expect(m)
    chunks = split_chunks(data, 1024)
    for i in range(1, n, 2):  # every other chunk: n/2 gaps
        r.add(encode_chunk(m.transfer_id, i, n, chunks[i]))
    p = r.progress(m.transfer_id)
    assert len(p["missing"]) == MAX_NACK and p["missing"][:3] == [0, 2, 4]
    assert p["highest"] == 2 * MAX_NACK - 1  # just below the first gap left out
    w = TransferWindow(m, data, window=n)
    w.due(0.0)
    w.on_progress(p, 0.1)
    unlisted = 2 * MAX_NACK
    assert not w.acked[unlisted] and all(not w.acked[s] for s in p["missing"])
    assert all(w.acked[s] for s in range(1, p["highest"] + 1, 2))


def test_window_restarts_when_the_receiver_lost_everything() -> None:
    """A receiver that restarted reports ``received`` 0: the sender starts over instead of
    waiting for acknowledgements of chunks nobody holds (even after its final ACK)."""
    data = _payload(3 * 1024)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    w = TransferWindow(m, data, window=8)
    assert w.due(0.0) == [0, 1, 2]
    w.on_progress({"next": 2, "highest": 1, "missing": [], "received": 2, "resets": 0}, 0.1)
    w.on_progress({"next": 0, "highest": -1, "missing": [], "received": 0, "resets": 0}, 0.2)
    assert w.due(0.3) == [0, 1, 2]
    assert w.on_final_ack(m.sha256) and w.done
    w.on_progress({"next": 0, "highest": -1, "missing": [], "received": 0, "resets": 0}, 0.4)
    assert not w.done and w.due(0.5) == [0, 1, 2]


def test_replay_cache_per_sender_keeps_honest_devices_apart() -> None:
    """A shared window overflows under a fleet's volume and then refuses valid messages that
    expire soonest (heartbeats, ttl 120 s, behind control messages, ttl 600 s); per-sender
    windows refuse nothing honest, still catch replays, and bound each sender alone."""
    from fedcoe_edge.wire import ReplayCache

    now = 1_000_000
    shared, per = ReplayCache(capacity=3000), ReplayCache(per_sender=64)
    for dev in range(2000):  # one control message per device, then one heartbeat each
        for cache in (shared, per):
            cache.check_and_add(f"d{dev}", f"c{dev}", now + 600_000, now)
    refused = 0
    for dev in range(2000):
        try:
            shared.check_and_add(f"d{dev}", f"h{dev}", now + 120_000, now)
        except WireError:
            refused += 1
        per.check_and_add(f"d{dev}", f"h{dev}", now + 120_000, now)  # never refused
    assert refused >= 999  # the shared window is full: every later heartbeat is refused
    with pytest.raises(WireError, match="replayed"):
        per.check_and_add("d7", "h7", now + 120_000, now)
    for i in range(200):  # one sender floods: only its own window overflows
        per.check_and_add("flood", f"m{i}", now + 600_000 + i, now)
    assert len(per) == 2 * 2000 + 64
    with pytest.raises(WireError, match="older than the replay window"):
        per.check_and_add("flood", "old", now + 1000, now)
    per.check_and_add("d1", "fresh", now + 1000, now)  # others are untouched
    # entries expire: a later sweep forgets them
    later = now + 700_000
    per.check_and_add("d1", "late", later + 1000, later)
    assert len(per) < 2 * 2000


def test_msg_ids_are_unique_and_hex() -> None:
    from fedcoe_edge.wire import new_msg_id

    ids = {new_msg_id() for _ in range(50_000)}
    assert len(ids) == 50_000 and all(len(i) == 32 and int(i, 16) >= 0 for i in list(ids)[:100])


def test_window_backs_off_while_the_receiver_is_silent() -> None:
    """A silent receiver gets one window again, then single probes at doubling intervals
    (capped), and any progress report restores the first timeout."""
    data = _payload(64 * 1024, seed=3)
    m = TransferManifest.for_payload(data, expert_ids=[0], base_version=1, chunk_size=1024)
    w = TransferWindow(m, data, window=8, retransmit_s=2.0, max_retransmit_s=16.0)
    assert len(w.due(0.0)) == 8
    jitter = w.timeout_s / 2.0
    assert 1.0 <= jitter < 1.25
    sends: list[tuple[float, int]] = []
    t = 0.0
    while t < 200.0:
        t += 0.25
        out = w.due(t)
        if out:
            sends.append((t, len(out)))
    # the first timeout resends the window, every later one a single probe
    assert sends[0][1] == 8 and all(n == 1 for _, n in sends[1:])
    gaps = [b[0] - a[0] for a, b in zip(sends, sends[1:], strict=False)]
    # waits double from 2 s (times the jitter) and stop at the 16 s cap
    assert gaps[0] == pytest.approx(4.0 * jitter, abs=0.3)
    assert gaps[1] == pytest.approx(8.0 * jitter, abs=0.3)
    assert all(g == pytest.approx(16.0 * jitter, abs=0.3) for g in gaps[2:])
    assert len(sends) < 16  # a fixed 2 s timer would have resent ~100 times
    # a report on resent chunks gives no clean round trip (Karn): the wait stays backed off,
    # but the next timeout resends a full window again
    w.on_progress({"next": 2, "highest": 1, "missing": []}, t)
    assert w.timeout_s == pytest.approx(16.0 * jitter)
    fresh = w.due(t)
    assert fresh and min(fresh) == 8  # chunks 8.. go out for the first time
    assert len(w.due(t + 16.0 * jitter + 0.01)) == 8
    # a report on a chunk sent once: its round trip (0.5 s) sets the timeout, floored
    # at retransmit_s, and the doubling ends
    w2 = TransferWindow(m, data, window=8, retransmit_s=2.0, max_retransmit_s=16.0)
    w2.due(0.0)
    w2.on_progress({"next": 8, "highest": 7, "missing": []}, 0.5)
    assert w2.rto_s == pytest.approx(2.0) and w2.timeout_s < 2.0 * 1.25  # no doubling


def test_window_timeout_follows_a_slow_receiver() -> None:
    """A receiver that answers every chunk 3 s late (a busy coordinator) with a 1 s floor:
    the timeout learns the round trip, so after the start-up nothing is sent twice."""
    data = _payload(400 * 1024, seed=5)
    m = TransferManifest.for_payload(data, expert_ids=[0], base_version=1, chunk_size=1024)
    w = TransferWindow(m, data, window=8, retransmit_s=1.0, max_retransmit_s=60.0)
    r = Reassembler()
    r.expect(m)
    t, delay = 0.0, 3.0
    arriving: list[tuple[float, bytes]] = []
    resends_at: list[float] = []
    while not w.done and t < 2000.0:
        before = w.resends
        for seq in w.due(t):
            arriving.append((t + delay, w.chunk(seq)))
        if w.resends > before:
            resends_at.append(t)
        ready = [f for at, f in arriving if at <= t]
        arriving = [(at, f) for at, f in arriving if at > t]
        for f in ready:
            r.add(f)
        if ready:
            if r.is_complete(m.transfer_id):
                w.on_final_ack(hashlib.sha256(r.finish(m.transfer_id)).hexdigest())
            else:
                w.on_progress(r.progress(m.transfer_id), t)
        t += 0.1
    assert w.done
    assert w.rto_s >= delay  # learned: srtt + 4 rttvar, at least the round trip
    assert resends_at and max(resends_at) < 15.0  # only while it was learning
    assert w.resends <= 3 * 8


def test_window_jitter_differs_between_transfers() -> None:
    data = _payload(4096)
    factors = {
        TransferWindow(
            TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024,
                                         transfer_id=f"x{i}"), data, retransmit_s=1.0,
        ).timeout_s
        for i in range(20)
    }
    assert len(factors) == 20 and all(1.0 <= f < 1.25 for f in factors)


def test_window_rejects_a_timeout_above_its_cap() -> None:
    data = _payload(4096)
    m = TransferManifest.for_payload(data, expert_ids=[], base_version=0, chunk_size=1024)
    with pytest.raises(WireError, match="retransmit_s"):
        TransferWindow(m, data, retransmit_s=90.0, max_retransmit_s=60.0)


def test_window_due_honours_a_limit_and_wants_says_when_to_call() -> None:
    data = _payload(10 * 1024, seed=9)
    m = TransferManifest.for_payload(data, expert_ids=[0], base_version=1, chunk_size=1024)
    w = TransferWindow(m, data, window=4, retransmit_s=1.0)
    assert w.wants(0.0)
    assert w.due(0.0, limit=3) == [0, 1, 2]  # held back by the caller's budget ...
    assert w.wants(0.0)
    assert w.due(0.0, limit=0) == []
    assert w.due(0.0) == [3]  # ... and the window (4) still counts what is in flight
    assert not w.wants(0.5)  # window full, timer not due: nothing to do
    w.on_progress({"next": 2, "highest": 3, "missing": [2]}, 0.6)
    assert w.wants(0.6)
    assert w.due(0.6, limit=1) == [2]  # the resend goes first
    assert w.due(0.6) == [4, 5, 6]  # in flight now: 2 only


def test_depth_scan_runs_only_when_the_brackets_could_exceed_the_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The nesting can be no deeper than the count of ``[``/``{`` bytes: a document with at
    most the limit of them is parsed without the exact scan; one with more still gets it
    (and a deep one is refused), brackets inside strings included in the count."""
    import fedcoe_edge.wire.envelope as envelope_mod

    calls: list[bytes] = []
    exact = envelope_mod.json_depth

    def counted(d: bytes) -> int:
        calls.append(d)
        return exact(d)

    monkeypatch.setattr(envelope_mod, "json_depth", counted)
    shallow = b'{"a":[1,[2]],"b":{"c":"x"}}'
    assert envelope_mod.parse_json(shallow, "t") == {"a": [1, [2]], "b": {"c": "x"}}
    assert calls == []
    quoted = b'{"s":"' + b"[" * 40 + b'"}'
    assert envelope_mod.parse_json(quoted, "t") == {"s": "[" * 40}
    assert calls == [quoted]
    with pytest.raises(WireError, match="nested 33 deep"):
        envelope_mod.parse_json(b'{"x":' + b"[" * 32 + b"]" * 32 + b"}", "t")


@pytest.mark.parametrize("body", [{}, {"a": [1, 2]}, {"z": {"y": 1.5, "b": "é\u2028"}, "msg_id": "x", "k": None},
                                  {"manifest": {"sha256": "ab" * 32, "expert_ids": [0, 3]}, "n": 10**15}])
def test_an_encoded_envelope_is_the_canonical_json_of_its_fields_signed(body: dict[str, object]) -> None:
    """encode_envelope dumps the body once and joins the fields' parts: the bytes equal
    canonical_json of the whole envelope, with the HMAC over canonical_json of the rest."""
    import dataclasses
    import hashlib
    import hmac as _hmac

    from fedcoe_edge.wire.envelope import canonical_json

    env = _env(body=body)
    d = {f.name: getattr(env, f.name) for f in dataclasses.fields(env)}
    d.pop("hmac")
    d["hmac"] = _hmac.new(KEY, canonical_json(d), hashlib.sha256).hexdigest()
    assert encode_envelope(env, KEY) == canonical_json(d)
