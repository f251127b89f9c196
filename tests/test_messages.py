"""Typed message bodies (fedcoe_edge/messages.py): every field checked for type, range and
finiteness, one reason per refusal, and docs/protocol.md listing every message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fedcoe_edge import messages as M
from fedcoe_edge.errors import WireError
from fedcoe_edge.wire import TransferManifest

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = TransferManifest("x1", (0, 1), 3, 5000, 1024, 5, "a" * 64).to_dict()

VALID: dict[type[M.Body], dict[str, Any]] = {
    M.Hello: {"role": "train", "tier": "mid", "memory_mb": 4096.0, "num_samples": 120,
              "label_hist": [60, 60], "runtime": "python"},
    M.Result: {"manifest": MANIFEST, "num_samples": 120, "affinity": [0.5, 0.25, 0.0],
               "metrics": {"train_loss": 0.3, "steps": 12}},
    M.Fetch: {"purpose": "cold", "expert_ids": [0, 3]},
    M.Eval: {"kind": "personal", "correct": 7, "total": 9},
    M.Decline: {"reason": "labels outside the class list"},
    M.Heartbeat: {"rss_mb": 210.5, "load": 0.4, "rounds_done": 3,
                  "bundle": {"round": 3, "ok": False, "error": "export not installed"}},
    M.BundleStatus: {"round": 2, "ok": True, "error": None},
    M.XferProgress: {"xfer": "x1", "next": 2, "highest": 4, "missing": [3], "received": 4,
                     "resets": 0},
    M.XferDone: {"xfer": "x1", "sha256": "a" * 64},
    M.Welcome: {"algorithm": "fedcoe", "seed": 0, "model": {"num_classes": 10},
                "train": {"lr": 0.01}, "bc_key": "ab" * 32, "version": 2, "round": 1,
                "rounds": 5, "round_open": True, "classes": ["cat", "dog"]},
    M.Task: {"manifest": MANIFEST, "expert_ids": [0, 1], "version": 3, "deadline_s": 29.5,
             "config": {"lr": 0.01, "mode": "x"}},
    M.Model: {"manifest": MANIFEST, "expert_ids": [], "version": 3, "purpose": "gate",
              "shared": {"id": "a" * 32, "chunk_size": 1024, "chunk_count": 5}},
    M.SharedRef: {"id": "a" * 32, "chunk_size": 2048, "chunk_count": 3},
    M.Accept: {"xfer": "x1"},
    M.Reject: {"reason": "update delta: L2 norm too large", "xfer": None},
    M.EvalAck: {"kind": "cold"},
    M.XferUnknown: {"xfer": "x1"},
    M.Refused: {"reason": "device 'dev2' is not in allowed_devices (removed)"},
    M.Status: {"state": "open", "round": 2, "version": 1, "rounds": 5},
    M.ShardHello: {"online": ["d1", "d2"], "shards": 2, "version": 4, "round": 1,
                   "session": "abc"},
    M.PartialAnnounce: {"manifest": MANIFEST, "meta": {"fedcoe.round": "1"},
                        "failures": {"d3": "deadline"}},
    M.ShardTask: {"d": "d1", "e": [0, 2], "k": 0, "c": {"lr": 0.1}},
    M.ShardOpen: {"version": 2, "deadline_s": 30.0, "keysets": [["global.gate.w"]],
                  "tasks": [{"d": "d1", "e": [0, 2], "k": 0, "c": {}}]},
    M.ShardModel: {"manifest": MANIFEST, "version": 3, "extra": {"affinity": [[0.5]]}},
}


def test_every_message_class_has_a_valid_example() -> None:
    assert set(VALID) == set(M.ALL)


@pytest.mark.parametrize("cls", M.ALL, ids=lambda c: c.__name__)
def test_valid_bodies_round_trip(cls: type[M.Body]) -> None:
    msg = cls.from_wire(VALID[cls])
    again = cls.from_wire(msg.to_wire())
    assert again == msg
    hash(msg)  # frozen: a message is a value


BAD: list[tuple[type[M.Body], dict[str, Any], str]] = [
    (M.Hello, {"role": 5}, r"hello\.role: must be a string"),
    (M.Hello, {"role": "boss"}, r"hello\.role: must be train\|cold"),
    (M.Hello, {"num_samples": "many"}, r"hello\.num_samples: must be an integer"),
    (M.Hello, {"num_samples": 10**12}, r"hello\.num_samples: 1000000000000 outside"),
    (M.Hello, {"num_samples": True}, r"must be an integer, got bool"),
    (M.Hello, {"label_hist": [1, -1]}, r"hello\.label_hist"),
    (M.Hello, {"memory_mb": 1e300}, r"hello\.memory_mb"),
    (M.Result, {"num_samples": 1}, r"result\.manifest"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 0}, r"result\.num_samples: 0 outside"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 2**62}, r"result\.num_samples"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 5, "affinity": [1, -0.5]},
     r"result\.affinity"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 5, "affinity": "all"}, r"result\.affinity"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 5, "metrics": {"loss": "low"}},
     r"result\.metrics\.loss: must be a number"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 5, "metrics": {"loss": 10**301}},
     r"result\.metrics\.loss"),
    (M.Result, {"manifest": MANIFEST, "num_samples": 5,
                "metrics": {f"m{i}": 1 for i in range(65)}}, r"65 entries"),
    (M.Fetch, {"purpose": "all"}, r"fetch\.purpose"),
    (M.Fetch, {"expert_ids": "zz"}, r"fetch\.expert_ids"),
    (M.Fetch, {"expert_ids": [10**9]}, r"fetch\.expert_ids"),
    (M.Eval, {"kind": "personal", "correct": "a", "total": None}, r"eval\.total: missing"),
    (M.Eval, {"kind": "personal", "correct": 5, "total": 4}, r"eval\.correct: 5 outside 0\.\.4"),
    (M.Eval, {"kind": "global", "correct": 1, "total": 4}, r"eval\.kind"),
    (M.Decline, {"reason": "x" * 5000}, r"decline\.reason: 5000 characters"),
    (M.Heartbeat, {"rss_mb": -1}, r"hb\.rss_mb"),
    (M.Heartbeat, {"bundle": {"round": 1, "ok": "yes"}}, r"hb\.bundle\.ok"),
    (M.XferProgress, {"xfer": "x1", "next": -1, "highest": 0}, r"xfer_progress\.next"),
    (M.XferProgress, {"xfer": "a/b", "next": 0, "highest": 0}, r"xfer_progress\.xfer"),
    (M.XferProgress, {"xfer": "x", "next": 0, "highest": 0, "missing": list(range(2000))},
     r"xfer_progress\.missing"),
    # a receiver lists at most MAX_NACK gaps (Reassembler.progress): one more is refused
    (M.XferProgress, {"xfer": "x", "next": 0, "highest": 600, "missing": list(range(257))},
     r"xfer_progress\.missing"),
    (M.Welcome, {**VALID[M.Welcome], "bc_key": "zz"}, r"welcome\.bc_key"),
    (M.Welcome, {**VALID[M.Welcome], "model": []}, r"welcome\.model: must be an object"),
    (M.Task, {**VALID[M.Task], "deadline_s": 1e12}, r"task\.deadline_s"),
    (M.Task, {**VALID[M.Task], "config": {"x": [1]}}, r"task\.config\.x"),
    (M.Model, {**VALID[M.Model], "purpose": "x"}, r"model\.purpose"),
    (M.Task, {**VALID[M.Task], "shared": {"id": "a" * 31, "chunk_size": 1024, "chunk_count": 5}},
     r"task\.shared\.id: must be 32 hex digits"),
    (M.Task, {**VALID[M.Task], "shared": {"id": "A" * 32, "chunk_size": 1024, "chunk_count": 5}},
     r"task\.shared\.id"),
    (M.SharedRef, {"id": "a" * 32, "chunk_size": 0, "chunk_count": 5},
     r"task\.shared\.chunk_size: 0 outside"),
    (M.SharedRef, {"id": "a" * 32, "chunk_size": 1024, "chunk_count": 10**6},
     r"task\.shared\.chunk_count"),
    (M.Status, {**VALID[M.Status], "round": -1}, r"status\.round"),
    (M.ShardHello, {"online": ["a b"], "shards": 2}, r"shard_hello\.online"),
    (M.PartialAnnounce, {"manifest": MANIFEST, "meta": {"a": 1}}, r"partial\.meta"),
    (M.ShardOpen, {**VALID[M.ShardOpen], "tasks": [{"d": "d1", "e": [], "k": 1}]},
     r"key set index beyond the 1 given"),
    (M.ShardOpen, {**VALID[M.ShardOpen], "tasks": "all"}, r"needs tasks and keysets lists"),
    (M.ShardOpen, {**VALID[M.ShardOpen], "tasks": [{"d": "x/y", "e": [], "k": 0}]},
     r"shard_open\.task\.d"),
    (M.ShardModel, {"manifest": MANIFEST, "version": -3}, r"shard_model\.version"),
]


@pytest.mark.parametrize(("cls", "body", "reason"), BAD,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(BAD)])
def test_bad_fields_are_refused_with_their_name(cls: type[M.Body], body: dict[str, Any],
                                               reason: str) -> None:
    with pytest.raises(M.MessageError, match=reason) as info:
        cls.from_wire(body)
    assert "\n" not in str(info.value)


def test_a_body_that_is_not_an_object_is_refused() -> None:
    for cls in M.ALL:
        with pytest.raises(M.MessageError, match="body must be an object"):
            cls.from_wire([1, 2])


def test_unknown_members_are_ignored_and_unknown_types_refused() -> None:
    assert M.Eval.from_wire({**VALID[M.Eval], "later": 1}) == M.Eval("personal", 7, 9)
    with pytest.raises(M.MessageError, match="unknown message type 'bogus'"):
        M.parse_body("bogus", {})
    assert isinstance(M.parse_body("hb", {}), M.Heartbeat)


def test_what_the_agent_sends_is_what_the_coordinator_takes(tmp_path: Path) -> None:
    """The agent's own hello and result bodies pass the coordinator's checks (so the types
    describe the protocol as it runs, not an idea of it)."""
    import numpy as np

    from device_agent.daemon import _load, _memory_mb, _rss_mb
    from fedcoe_edge.messages import Heartbeat, Hello

    hello = Hello.from_wire({"role": "train", "tier": "mid", "memory_mb": _memory_mb(),
                             "num_samples": 512, "runtime": "python",
                             "label_hist": np.bincount([0, 1, 1]).tolist()})
    assert hello.label_hist == (1, 2)
    hb = Heartbeat.from_wire({"rss_mb": _rss_mb(), "load": _load(), "rounds_done": 0})
    assert hb.rounds_done == 0


def test_protocol_doc_lists_every_message() -> None:
    """docs/protocol.md ("Message bodies") has a row per class, naming each of its fields."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("### Message bodies", 1)[1].split("\n## ", 1)[0]
    from dataclasses import fields

    for cls in M.ALL:
        row = next((line for line in section.splitlines()
                    if line.startswith(f"| `{cls.TYPE}` ")), None)
        assert row is not None, f"docs/protocol.md lists no `{cls.TYPE}` ({cls.__name__})"
        for f in fields(cls):  # type: ignore[arg-type]
            assert re.search(rf"`{f.name}`", row), f"{cls.TYPE}: field {f.name} not in its row"


def test_a_progress_report_of_max_nack_gaps_is_taken() -> None:
    """The parser takes every report the receiver can write: ``MAX_NACK`` gaps exactly."""
    from fedcoe_edge.wire import MAX_NACK

    body = M.XferProgress.from_wire({"xfer": "x", "next": 0, "highest": 600,
                                     "missing": list(range(MAX_NACK))})
    assert len(body.missing) == MAX_NACK


def test_a_shared_reference_names_only_its_signed_manifest_s_bytes() -> None:
    """``SharedRef.manifest_for``: the shared chunks are reassembled under the signed
    manifest's size and sha256 with the reference's chunking; a reference whose id is not
    the manifest's hash prefix (another payload, a stale version) or whose chunking does not
    add up to the signed size is refused."""
    m = TransferManifest("x1", (0, 1), 3, 5000, 1024, 5, "a" * 64)
    ref = M.SharedRef("a" * 32, 2048, 3)
    shared = ref.manifest_for(m)
    assert (shared.transfer_id, shared.total_bytes, shared.sha256) == ("a" * 32, 5000, "a" * 64)
    assert (shared.chunk_size, shared.chunk_count) == (2048, 3)  # ceil(5000 / 2048)
    with pytest.raises(WireError, match="not the payload of sha256 aaaa"):
        M.SharedRef("b" * 32, 2048, 3).manifest_for(m)
    with pytest.raises(WireError, match="chunk_count 2 does not match 5000 bytes / 2048"):
        M.SharedRef("a" * 32, 2048, 2).manifest_for(m)
    # absent on the wire when None: a task without it reads as it always did
    assert "shared" not in M.Task.from_wire(VALID[M.Task]).to_wire()
