"""Sharded aggregation, pure half: the shard hash, shard names and keys, the partial's wire
form, the checks a received partial passes, and the exactness of 1 vs 3 shards with the
real strategy's select -> configure -> fold -> wire -> merge -> finalize."""

from __future__ import annotations

import copy
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ValidationError, WireError
from fedcoe_edge.protocol import device_key
from fedcoe_edge.sharding import (
    LeaderTopics,
    PartialInbox,
    check_partial,
    partial_from_wire,
    partial_to_wire,
    shard_federation,
    shard_index,
    shard_key,
    shard_name,
    shard_of,
)
from fedcoe_edge.strategies import ClientResult, Strategy, make_strategy
from fedcoe_edge.streaming import Partial


def test_shard_of_is_stable_and_spreads() -> None:
    # pinned values: the hash is sha256 (first 8 bytes, big-endian), not Python's salted
    # per-process hash(); a change here moves every deployed device to another shard
    assert [shard_of(d, 3) for d in ("dev-0", "dev-1", "dev-2", "camera-17")] == [2, 0, 2, 2]
    assert shard_of("dev-0", 1) == 0
    assert shard_of("dev-0", 7) == 4225845007160471423 % 7 == 1
    assert shard_of("dev-0", 1024) == 4225845007160471423 % 1024 == 895
    counts = Counter(shard_of(f"d{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 850  # ~1000 each
    for bad in (0, -1, 2000, True):
        with pytest.raises(ValueError, match="shards must be"):
            shard_of("d", bad)  # type: ignore[arg-type]


def test_names_keys_and_topics() -> None:
    assert shard_federation("demo", 1, 3) == "demo.s1of3"
    with pytest.raises(ValueError, match="index"):
        shard_federation("demo", 3, 3)
    assert shard_name(2) == "shard-2" and shard_index("shard-2", 3) == 2
    assert shard_index("shard-3", 3) is None and shard_index("shard-02", 3) is None
    assert shard_index("dev-1", 3) is None
    secret = bytes(range(32))
    assert shard_key(secret, "shard-0") != shard_key(secret, "shard-1")
    assert shard_key(secret, "shard-0") != device_key(secret, "shard-0")  # own label
    t = LeaderTopics("demo")
    assert t.parse(t.up_ctl("shard-1")) == ("up", "shard-1", None)
    assert t.parse(t.dn_blob("shard-0", "x1")) == ("dn", "shard-0", "x1")
    for bad in ("fl/v1/demo/up/dev/ctl", "fl/v1/demo/agg/up/shard-1/other"):
        with pytest.raises(WireError):
            t.parse(bad)


def _strategy(algorithm: str = "fedcoe") -> Strategy:
    s = make_strategy(algorithm, ModelConfig(expert_hidden=16), TrainConfig(fraction_fit=0.75), 0)
    s.initialize()
    return s


def _train(task_params: dict[str, np.ndarray], cid: str, rnd: int, k: int) -> ClientResult:
    """A stand-in for a device's training: a seeded perturbation of what it was sent."""
    rng = np.random.default_rng(zlib.crc32(f"{cid}/{rnd}".encode()))
    # by sorted name: a state that crossed the wire may list its tensors in another order
    params = {n: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
              if np.issubdtype(v.dtype, np.floating) else v.copy()
              for n, v in sorted(task_params.items())}
    return ClientResult(cid, rnd, int(rng.integers(5, 200)), params, rng.dirichlet(np.ones(k)).tolist())


def _run(strategy: Strategy, shards: int, rounds: int, devices: list[str]) -> Strategy:
    """The leader's round with ``shards`` shard aggregators: selection and tasks on the
    leader, each shard folds its own devices' results, partials cross the wire form, are
    checked, merged by the strategy and aggregated."""
    k = strategy.model_cfg.num_global_experts
    for rnd in range(1, rounds + 1):
        ids = strategy.select_clients(rnd, devices)
        tasks = strategy.configure_round(rnd, ids)
        expected = {shard_name(i): [] for i in range(shards)}  # type: dict[str, list[str]]
        for t in tasks:
            expected[shard_name(shard_of(t.client_id, shards))].append(t.client_id)
        inbox = PartialInbox(rnd, expected)
        template = strategy.new_partial(rnd)
        for name, clients in expected.items():
            p = strategy.new_partial(rnd)
            for t in tasks:
                if t.client_id in clients:
                    strategy.fold(p, _train(t.params, t.client_id, rnd, k))
            data, meta = partial_to_wire(p)
            got = partial_from_wire(data, meta)
            assert inbox.refusal(name, rnd) is None
            check_partial(got, rnd=rnd, allowed=clients, template=template, state=strategy.global_state)
            inbox.accept(name, got, {})
        assert inbox.complete
        merged = strategy.merge(rnd, list(inbox.received.values()))
        assert sorted(merged.clients) == sorted(ids)
        strategy.finalize(rnd, merged, [])
    return strategy


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
def test_one_shard_equals_three_shards_over_two_rounds(algorithm: str) -> None:
    devices = [f"dev-{i}" for i in range(12)]
    base = _strategy(algorithm)
    one = _run(copy.deepcopy(base), 1, 2, devices)
    three = _run(copy.deepcopy(base), 3, 2, devices)
    assert one.version == three.version == 2
    # three shards really split the fleet
    assert len({shard_of(d, 3) for d in devices}) == 3
    for name, value in one.global_state.items():
        np.testing.assert_allclose(three.global_state[name], value, rtol=1e-9, atol=1e-12, err_msg=name)
    assert one.checkpoint_extra().keys() == three.checkpoint_extra().keys()
    for c, row in one.checkpoint_extra().get("affinity", {}).items():
        np.testing.assert_allclose(three.checkpoint_extra()["affinity"][c], row, rtol=1e-12)
    # and the state moved: the test can fail
    assert any(not np.array_equal(v, base.global_state[n]) for n, v in one.global_state.items())


def test_default_merge() -> None:
    s = _strategy()
    a = s.new_partial(1)
    merged = s.merge(1, [])
    assert merged.clients == [] and merged.round == 1
    k = s.model_cfg.num_global_experts
    s.fold(a, _train(s.params_for([0, 1]), "x", 1, k))  # type: ignore[attr-defined]
    assert s.merge(1, [a]).clients == ["x"]
    with pytest.raises(ValueError, match="overlap"):
        s.merge(1, [a, a])
    with pytest.raises(ValueError, match="round"):
        s.merge(2, [a])


def _shard_partial(s: Strategy, rnd: int, clients: list[str]) -> Partial:
    p = s.new_partial(rnd)
    k = s.model_cfg.num_global_experts
    for c in clients:
        s.fold(p, _train(s.params_for([0, 1]), c, rnd, k))  # type: ignore[attr-defined]
    return p


def test_bad_partials_are_refused_with_a_reason() -> None:
    s = _strategy()
    template = s.new_partial(2)
    good = _shard_partial(s, 2, ["a", "b"])
    state = s.global_state

    def check(p: Partial, allowed: tuple[str, ...] = ("a", "b")) -> None:
        check_partial(p, rnd=2, allowed=allowed, template=template, state=state)

    check(good)
    # malformed bytes / metadata
    data, meta = partial_to_wire(good)
    with pytest.raises(ValidationError, match="malformed"):
        partial_from_wire(data[:-10], meta)
    with pytest.raises(ValidationError, match="malformed"):
        partial_from_wire(data, {**meta, "clients": "not json"})
    with pytest.raises(ValidationError, match="strings"):
        partial_from_wire(data, {**meta, "round": 2})  # type: ignore[dict-item]
    # wrong round inside the partial
    with pytest.raises(ValidationError, match="round 3"):
        check(_shard_partial(s, 3, ["a"]))
    # clients not given to this shard
    with pytest.raises(ValidationError, match="not selected"):
        check(good, allowed=("a",))
    # a NaN in a sum
    bad = partial_from_wire(data, meta)
    name = next(iter(bad.dense.sums))
    bad.dense.sums[name][...] = np.nan
    with pytest.raises(ValidationError, match="non-finite"):
        check(bad)
    # a tensor of another shape / not in the state
    bad = partial_from_wire(data, meta)
    bad.dense.sums[name] = np.zeros(3)
    with pytest.raises(ValidationError, match="shape"):
        check(bad)
    bad = partial_from_wire(data, meta)
    bad.dense.sums["evil"] = np.zeros(3)
    with pytest.raises(ValidationError, match="not in the global state"):
        check(bad)
    # a FedAvg-shaped partial sent to a FedCoE leader
    with pytest.raises(ValidationError, match="structure"):
        check(Partial(2, clients=["a"], samples=1.0))
    # negative weight, bad affinity row
    bad = partial_from_wire(data, meta)
    bad.dense.weight = -1.0
    with pytest.raises(ValidationError, match="weight"):
        check(bad)
    bad = partial_from_wire(data, meta)
    bad.affinity["a"] = [float("inf")] * s.model_cfg.num_global_experts
    with pytest.raises(ValidationError, match="affinity"):
        check(bad)


def test_inbox_refuses_unknown_late_and_duplicate_shards() -> None:
    s = _strategy()
    inbox = PartialInbox(2, {"shard-0": ["a", "b"], "shard-1": ["c"], "shard-2": ["d"]})
    assert inbox.refusal("shard-9", 2) == "unknown shard 'shard-9'"
    assert "late" in (inbox.refusal("shard-0", 1) or "")
    assert "early" in (inbox.refusal("shard-0", 3) or "")
    assert inbox.refusal("shard-0", 2) is None
    inbox.accept("shard-0", _shard_partial(s, 2, ["a"]), {"b": "update rejected: norm", "zz": "x"})
    assert "duplicate" in (inbox.refusal("shard-0", 2) or "")
    inbox.accept("shard-1", _shard_partial(s, 2, ["c"]), {})
    assert not inbox.complete and inbox.missing() == ["shard-2"]
    merged = s.merge(2, list(inbox.received.values()))
    # a missing shard's clients become failures, as data for the strategy
    assert inbox.round_failures(merged.clients) == {
        "b": "update rejected: norm", "d": "no partial from shard-2 (missing or refused)"}


def test_role_and_shard_count_are_checked_in_one_place(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.config import Role, config_from_doc
    from fedcoe_edge.cli import main
    from fedcoe_edge.errors import ConfigError

    def cfg(**fed: object) -> Any:
        doc = {"federation": {"state_dir": str(tmp_path / "s"), **fed},
               "security": {"secret": bytes(range(32)).hex()}}
        return config_from_doc(doc, "c.toml", tmp_path, env={})

    c = cfg(shards=3)
    c.check_role(Role.LEADER, None)
    c.check_role(Role.SHARD, 2)
    for role, index, msg in [(Role.SHARD, 3, "0..2"), (Role.SHARD, None, "0..2"), (Role.SHARD, -1, "0..2"),
                             (Role.LEADER, 1, "--role shard only"), (Role.SINGLE, None, "--role leader")]:
        with pytest.raises(ConfigError, match=msg):
            c.check_role(role, index)
    for bad in (0, 5000):
        with pytest.raises(ConfigError, match="shards must be in 1..1024"):
            cfg(shards=bad)
    with pytest.raises(ConfigError, match="needs aggregation"):
        cfg(shards=2, aggregation="batch")
    with pytest.raises(ConfigError, match="needs aggregation"):
        cfg(aggregation="batch").check_role(Role.LEADER, None)
    # the CLI: one line, exit 2
    path = tmp_path / "c.toml"
    path.write_text(f'[federation]\nshards = 2\nstate_dir = "{tmp_path / "s"}"\n'
                    f'[security]\nsecret = "{bytes(range(32)).hex()}"\n')
    assert main(["coordinator", "--config", str(path), "--role", "shard", "--shard-index", "2"]) == 2
    assert "needs --shard-index in 0..1, got 2" in capsys.readouterr().err
    assert main(["coordinator", "--config", str(path)]) == 2
    assert "start a --role leader and 2 --role shard processes" in capsys.readouterr().err
    assert main(["shard-of", "dev-0", "dev-1", "--config", str(path)]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0] == f"dev-0 {shard_of('dev-0', 2)} demo.s{shard_of('dev-0', 2)}of2"
    assert main(["shard-of", "bad/id", "--shards", "2", "--federation", "demo"]) == 2
    assert "device id" in capsys.readouterr().err


def test_extra_state_crosses_the_wire_and_is_checked() -> None:
    """A rule's own state (extra sums that add, per-client rows that concatenate) survives
    the wire form and is checked against the strategy's empty partial like the sums are."""
    template = Partial(1, extra_sums={"norm": np.zeros(1)},
                       extra_rows={"u": np.zeros((0, 3), dtype=np.float32)})

    def shard(clients: list[str], base: float) -> Partial:
        p = Partial(1, extra_sums={"norm": np.zeros(1)},
                    extra_rows={"u": np.zeros((0, 3), dtype=np.float32)})
        for i, c in enumerate(clients):
            p.admit(c, 10)
            p.extra_sums["norm"] = p.extra_sums["norm"] + base + i
            p.extra_rows["u"] = np.concatenate([p.extra_rows["u"], np.full((1, 3), base + i, np.float32)])
        return partial_from_wire(*partial_to_wire(p))

    a, b = shard(["a", "b"], 1.0), shard(["c"], 5.0)
    for p, allowed in ((a, ("a", "b")), (b, ("c",))):
        check_partial(p, rnd=1, allowed=allowed, template=template, state={})
    merged = copy.deepcopy(template)
    merged.merge(a)
    merged.merge(b)
    merged.check_rows()
    assert merged.clients == ["a", "b", "c"]
    np.testing.assert_array_equal(merged.extra_sums["norm"], [1.0 + 2.0 + 5.0])
    np.testing.assert_array_equal(merged.extra_rows["u"][:, 0], [1.0, 2.0, 5.0])  # row i: clients[i]
    bad = copy.deepcopy(a)
    bad.extra_rows["u"] = bad.extra_rows["u"][:1]  # a row short of its clients
    with pytest.raises(ValidationError, match=r"extra rows 'u'.*expected float32\[2, 3\]"):
        check_partial(bad, rnd=1, allowed=("a", "b"), template=template, state={})
    bad = copy.deepcopy(a)
    bad.extra_sums["norm"][0] = np.inf
    with pytest.raises(ValidationError, match="non-finite"):
        check_partial(bad, rnd=1, allowed=("a", "b"), template=template, state={})
    bad = copy.deepcopy(a)
    bad.extra_sums["other"] = np.zeros(1)
    with pytest.raises(ValidationError, match="extra sums"):
        check_partial(bad, rnd=1, allowed=("a", "b"), template=template, state={})
    with pytest.raises(KeyError, match="different extra"):
        Partial(1).merge(a)


def test_what_grows_with_the_fleet_travels_in_the_transfer_not_the_envelope() -> None:
    """FedCoE's affinity rows (one per client) in a shard's partial and in the leader's
    model: at 12,000 clients they are over the signed envelope's 1 MiB, so the envelope
    carries none of them and the transfer's own metadata all of them."""
    import json

    from fedcoe_edge.sharding import MODEL_EXTRA, model_extra
    from fedcoe_edge.wire import MAX_ENVELOPE_BYTES, encode_tensors

    s = _strategy()
    clients = [f"dev-{i:05d}" for i in range(12_000)]
    p = _shard_partial(s, 2, clients[:2])
    rng = np.random.default_rng(0)  # routing shares as a gate reports them: full floats
    rows = {c: [float(v) for v in rng.dirichlet(np.ones(4))] for c in clients}
    p.affinity.update(rows)
    p.clients = list(clients)
    data, meta = partial_to_wire(p)
    assert meta == {}  # the envelope's part
    got = partial_from_wire(data, meta)
    assert got.clients == clients and got.affinity == rows
    s.affinity = {c: np.asarray(r) for c, r in rows.items()}  # type: ignore[attr-defined]
    extra = s.checkpoint_extra()
    assert len(json.dumps(extra)) > MAX_ENVELOPE_BYTES
    blob = encode_tensors(s.global_state, metadata={MODEL_EXTRA: json.dumps(extra)})
    assert model_extra(blob, {}) == json.loads(json.dumps(extra))
    assert model_extra(encode_tensors(s.global_state), {"affinity": {}}) == {"affinity": {}}
    with pytest.raises(ValidationError, match="object"):
        model_extra(encode_tensors(s.global_state, metadata={MODEL_EXTRA: "[1]"}), {})
    with pytest.raises(ValidationError, match="extra"):
        model_extra(encode_tensors(s.global_state, metadata={MODEL_EXTRA: "{nope"}), {})
