"""Robust aggregation (fedcoe_edge/robust.py) against hand-computed values, and the
poisoning example: one update with a change of norm 1e4 among honest ones."""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import pytest

from fedcoe_edge.config import _ROBUST_DEFAULTS, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.robust import (
    DefenceState,
    RoundNote,
    capped_samples,
    change_norm,
    clip_factor,
    clip_update,
    close_round,
    defend,
    defend_round,
    median_bound,
    quantile_bound_step,
    robust_substitute,
    round_bound,
    samples_cap,
    weights_norm,
)
from fedcoe_edge.strategies.base import ClientResult

NONE = {"update_clip": "none", "samples_cap": 0.0, "aggregation_rule": "mean"}


def result(cid: str, n: int, **arrays: list[float]) -> ClientResult:
    return ClientResult(cid, 1, n, {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})


# --- pure functions ---------------------------------------------------------------------------
def test_change_norm_counts_float_tensors_the_base_has():
    params = {"a": np.array([3.0, 4.0], np.float32), "steps": np.array([7], np.int64),
              "new": np.array([100.0])}
    base = {"a": np.zeros(2, np.float32), "steps": np.array([0], np.int64)}
    assert change_norm(params, base) == pytest.approx(5.0)
    assert weights_norm({"a": np.array([3.0, 4.0]), "b": np.array([12.0])}, ["a", "b"]) == pytest.approx(13.0)


def test_clip_update_scales_the_change_to_the_bound():
    base = {"a": np.array([1.0, 1.0], np.float32)}
    params = {"a": np.array([4.0, 5.0], np.float32)}  # change (3, 4), norm 5
    out, norm = clip_update(params, base, 2.5)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(out["a"], [2.5, 3.0])  # 1 + 0.5 * (3, 4)
    assert out["a"].dtype == np.float32
    same, _ = clip_update(params, base, 5.0)
    assert same["a"] is params["a"]  # within the bound: untouched


def test_clip_factor_hand_values_and_non_finite_norm():
    assert clip_factor(4.0, 1.0) == 0.25
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(math.nan, 1.0) == 0.0
    assert clip_factor(math.inf, 1.0) == 0.0
    with pytest.raises(ValueError):
        clip_factor(1.0, -1.0)


def test_clip_update_drops_a_non_finite_change():
    base = {"a": np.array([1.0, 2.0])}
    out, norm = clip_update({"a": np.array([np.nan, 5.0])}, base, 1.0)
    assert math.isnan(norm)
    np.testing.assert_array_equal(out["a"], [1.0, 2.0])


def test_median_bound_and_quantile_step_hand_values():
    assert median_bound([1.0, 3.0, 2.0, 100.0], 2.0) == pytest.approx(5.0)  # 2 x 2.5
    assert median_bound([math.nan], 1.0) is None
    # Andrew et al.: 70% under a target of 50%, step 0.2 -> exp(-0.04)
    assert quantile_bound_step(1.0, 0.7, 0.5, 0.2) == pytest.approx(math.exp(-0.04))
    assert quantile_bound_step(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))
    with pytest.raises(ValueError):
        quantile_bound_step(1.0, 1.5, 0.5, 0.2)


def test_samples_cap_and_capped_samples_hand_values():
    assert samples_cap([10.0, 20.0, 30.0, 1e9], 2.0) == pytest.approx(50.0)  # 2 x median 25
    assert samples_cap([], 2.0) is None
    assert capped_samples(1e9, 50.0, None, 2.0) == 50.0
    assert capped_samples(1e9, 50.0, 20.0, 2.0) == 40.0  # its own history: 2 x 20
    assert capped_samples(1e9, 50.0, 20.0, 0.0) == 50.0  # own check off
    assert capped_samples(30.0, 50.0, 20.0, 2.0) == 30.0
    assert capped_samples(500.0, None, None, 2.0) == 1.0  # no history: equal weights
    assert capped_samples(0.2, 50.0, None, 2.0) == 1.0


def test_robust_substitute_puts_each_keys_median_on_its_senders():
    rs = [result("a", 1, w=[1.0, 10.0], e0=[0.0]), result("b", 1, w=[2.0, 20.0], e0=[4.0]),
          result("c", 1, w=[100.0, -5.0], e1=[9.0])]
    med = robust_substitute(rs, "median", 0.0)
    for r in med:
        np.testing.assert_allclose(r.params["w"], [2.0, 10.0])
    np.testing.assert_allclose(med[0].params["e0"], [2.0])  # median over a and b only
    np.testing.assert_allclose(med[2].params["e1"], [9.0])
    assert set(med[2].params) == {"w", "e1"}  # what a result carries does not change
    trim = robust_substitute(rs + [result("d", 1, w=[3.0, 0.0])], "trimmed_mean", 0.25)
    np.testing.assert_allclose(trim[0].params["w"], [2.5, 5.0])  # drop 1 low, 1 high per coord
    assert robust_substitute(rs, "mean", 0.0)[0] is rs[0]


# --- state across rounds ----------------------------------------------------------------------
def test_first_round_bound_scales_with_the_weights_sent_then_median_of_last_round():
    cfg = TrainConfig(clip_init=0.5, clip_multiplier=2.0)
    base = {"a": np.array([6.0, 8.0]), "b": np.array([100.0])}  # ||a|| = 10
    st = DefenceState()
    assert round_bound(st, cfg, {"a": np.zeros(2)}, base) == pytest.approx(5.0)
    notes = [RoundNote("x", 1.0, 5.0, 10.0), RoundNote("y", 3.0, 5.0, 20.0),
             RoundNote("z", 900.0, 5.0, 1e9)]
    nxt = close_round(st, cfg, notes)
    assert nxt.bound == pytest.approx(6.0)  # 2 x median(1, 3, 900)
    assert nxt.norm_history == [3.0]
    assert round_bound(nxt, cfg, {"a": np.zeros(2)}, base) == pytest.approx(6.0)
    fixed = dataclasses.replace(cfg, update_clip="fixed")
    assert round_bound(nxt, fixed, {"a": np.zeros(2)}, base) == pytest.approx(5.0)
    assert math.isinf(round_bound(nxt, TrainConfig(update_clip="none"), {"a": np.zeros(2)}, base))
    assert close_round(nxt, cfg, []) is nxt


def test_quantile_rule_steps_from_the_share_under_the_bound():
    cfg = TrainConfig(update_clip="quantile", clip_quantile=0.5, clip_lr=0.2)
    st = DefenceState(bound=2.0)
    notes = [RoundNote(c, v, 2.0, 1.0) for c, v in (("a", 1.0), ("b", 1.5), ("c", 3.0), ("d", 0.5))]
    assert close_round(st, cfg, notes).bound == pytest.approx(2.0 * math.exp(-0.2 * 0.25))


def test_samples_history_keeps_reports_until_a_cap_exists_then_caps():
    cfg = TrainConfig(samples_cap=2.0, samples_growth=2.0)
    base = {"w": np.zeros(1, np.float32)}
    st = DefenceState()
    r1 = [result("a", 10, w=[0.0]), result("b", 20, w=[0.0]), result("c", 30, w=[0.0]),
          result("liar", 10**9, w=[0.0])]
    out, st = defend_round(st, cfg, r1, base)
    assert [r.num_samples for r in out] == [1, 1, 1, 1]  # first round: equal weights
    assert st.samples == {"a": 10.0, "b": 20.0, "c": 30.0, "liar": 1e9}
    out, st = defend_round(st, cfg, [result("liar", 10**9, w=[0.0]), result("a", 12, w=[0.0]),
                                     result("new", 500, w=[0.0])], base)
    # cap = 2 x median(10, 20, 30, 1e9) = 50; a: 12; new: 50; liar: 50 (own 2 x 1e9 is no help)
    assert [r.num_samples for r in out] == [50, 12, 50]
    assert st.samples["liar"] == 50.0
    _, note = defend(st, cfg, result("a", 10**400, w=[0.0]), base)  # too big for a float
    assert note.samples == pytest.approx(24.0)  # 2 x its own last 12


def test_a_round_is_defended_the_same_in_any_order():
    cfg = TrainConfig()
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal(20).astype(np.float32)}
    rs = [ClientResult(str(i), 1, int(rng.integers(5, 50)),
                       {"w": (base["w"] + rng.standard_normal(20) * (i + 1)).astype(np.float32)})
          for i in range(7)]
    st0 = DefenceState(bound=3.0, samples={str(i): 20.0 for i in range(7)})
    out_a, st_a = defend_round(st0, cfg, rs, base)
    shuffled = rs[:]
    random.Random(1).shuffle(shuffled)
    out_b, st_b = defend_round(st0, cfg, shuffled, base)
    by_b = {r.client_id: r for r in out_b}
    for r in out_a:
        np.testing.assert_array_equal(r.params["w"], by_b[r.client_id].params["w"])
        assert r.num_samples == by_b[r.client_id].num_samples
    assert st_a.to_json() == st_b.to_json()
    assert DefenceState.from_json(st_a.to_json()) == st_a
    assert DefenceState.from_json(None) == DefenceState()


# --- config -------------------------------------------------------------------------------------
def test_robust_defaults_are_listed_once_and_left_out_of_to_dict():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in _ROBUST_DEFAULTS} == _ROBUST_DEFAULTS
    assert not set(_ROBUST_DEFAULTS) & set(cfg.to_dict())  # an older device reads it
    changed = TrainConfig(aggregation_rule="median", clip_multiplier=1.5)
    assert changed.to_dict()["aggregation_rule"] == "median"
    assert TrainConfig.from_dict(changed.to_dict()) == changed


@pytest.mark.parametrize("field,value", [("aggregation_rule", "mode"), ("update_clip", "auto"),
                                         ("trim_ratio", 0.5), ("clip_multiplier", 0.0),
                                         ("clip_quantile", 1.0), ("clip_init", math.nan),
                                         ("samples_cap", -1.0), ("clip_lr", True)])
def test_robust_fields_out_of_range_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_coordinator_reads_the_defences_from_train_with_env_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The coordinator's [train] carries the same fields (one place for defaults and ranges);
    a bad value is one line naming the key, FEDCOE_TRAIN_* overrides it."""
    from coordinator.config import config_from_doc

    def cfg(train: dict[str, object], env: dict[str, str] | None = None) -> Any:
        doc = {"federation": {"state_dir": str(tmp_path / "s")},
               "security": {"secret": bytes(range(32)).hex()}, "train": train}
        return config_from_doc(doc, "c.toml", tmp_path, env=env or {})

    assert cfg({}).train.update_clip == "median" and cfg({}).train.samples_cap == 2.0
    got = cfg({"aggregation_rule": "median", "clip_multiplier": 2}).train
    assert (got.aggregation_rule, got.clip_multiplier) == ("median", 2)
    assert cfg({}, {"FEDCOE_TRAIN_UPDATE_CLIP": "quantile"}).train.update_clip == "quantile"
    with pytest.raises(ConfigError, match="train.update_clip"):
        cfg({"update_clip": "auto"})
    with pytest.raises(ConfigError, match="samples_cap"):
        cfg({"samples_cap": "lots"})


# --- the poisoning example ----------------------------------------------------------------------
def poisoned_rounds(defence: dict[str, object]) -> tuple[list[float], float]:
    """FedAvg, 5 honest devices (change norm 1 each) and one whose change has norm 1e4,
    two rounds. Returns ||aggregate - honest-only aggregate|| per round and the honest
    aggregate's change norm in round 2."""
    from fedcoe_edge.config import ModelConfig
    from fedcoe_edge.strategies.fedavg import FedAvg

    train = TrainConfig(**defence)  # type: ignore[arg-type]
    honest_only = TrainConfig(**NONE)  # type: ignore[arg-type]
    model = ModelConfig(expert_hidden=8)
    s, ref = FedAvg(model, train, seed=0), FedAvg(model, honest_only, seed=0)
    s.initialize()
    ref.initialize()
    rng = np.random.default_rng(3)
    state, ref_state = DefenceState(), DefenceState()
    gaps, moved = [], 0.0
    for rnd in (1, 2):
        base = dict(s.global_state)
        honest = []
        for i in range(5):
            d = {k: rng.standard_normal(v.shape) for k, v in base.items()}
            scale = 1.0 / math.sqrt(sum(float((x ** 2).sum()) for x in d.values()))
            honest.append(ClientResult(f"h{i}", rnd, 100, {k: (base[k] + scale * d[k]).astype(v.dtype)
                                                           for k, v in base.items()}))
        direction = {k: rng.standard_normal(v.shape) for k, v in base.items()}
        scale = 1e4 / math.sqrt(sum(float((x ** 2).sum()) for x in direction.values()))
        bad = ClientResult("bad", rnd, 100, {k: (base[k] + scale * direction[k]).astype(v.dtype)
                                             for k, v in base.items()})
        assert change_norm(bad.params, base) == pytest.approx(1e4, rel=1e-3)
        defended, state = defend_round(state, train, [*honest, bad], base)
        s.aggregate_round(rnd, defended, [])
        ref.global_state = dict(base)
        ref_defended, ref_state = defend_round(ref_state, honest_only, honest, base)
        ref.aggregate_round(rnd, ref_defended, [])
        gaps.append(change_norm(s.global_state, ref.global_state))
        moved = change_norm(ref.global_state, base)
        s.global_state = dict(ref.global_state)  # next round starts from the honest model
    return gaps, moved


def test_one_update_of_norm_1e4_is_held_to_the_honest_aggregate_by_the_default():
    gaps, honest_move = poisoned_rounds({})
    assert gaps[1] < honest_move  # after one round of history: off by less than honest progress
    assert gaps[0] < 1.0  # first round: at most (clip_init x ||w||) / 6 of the init's norm
    assert max(gaps) < 1e-3 * 1e4


def test_one_update_of_norm_1e4_wrecks_the_aggregate_without_a_defence():
    gaps, _ = poisoned_rounds(NONE)
    assert min(gaps) > 1e3  # 1e4 / 6 devices


# --- inside the strategies: batch, streamed and sharded alike ------------------------------------
def _round_results(s: object, rnd: int, seed: int) -> list[ClientResult]:
    """Six results of honest-sized changes (FedCoE: 2 experts each, one all K) and one
    whose change has norm 1e4 and that claims 1e9 samples."""
    from fedcoe_edge.strategies.fedcoe import FedCoE

    rng = np.random.default_rng(seed)
    k = s.model_cfg.num_global_experts  # type: ignore[attr-defined]
    out = []
    for i in range(7):
        if isinstance(s, FedCoE):
            ids = list(range(k)) if i == 0 else sorted(rng.choice(k, size=2, replace=False).tolist())
            base = s.params_for(ids)
            aff: list[float] | None = rng.dirichlet(np.ones(k)).tolist()
        else:
            base, aff = s.global_state, None  # type: ignore[attr-defined]
        scale = 1e3 if i == 6 else 0.02
        params = {n: (v + rng.normal(0, scale, v.shape)).astype(v.dtype) for n, v in base.items()}
        out.append(ClientResult(f"c{i}", rnd, 10**9 if i == 6 else int(rng.integers(20, 80)),
                                params, aff))
    return out


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
def test_batch_streamed_and_sharded_defend_alike(algorithm: str, rule: str) -> None:
    """Two rounds with a poisoned result: batch (aggregate_round), streamed in reverse
    order, and three shards' partials merged (through their wire form) give the same state,
    version and defence state; the poisoned result moved nothing far."""
    from fedcoe_edge.config import ModelConfig
    from fedcoe_edge.sharding import check_partial
    from fedcoe_edge.strategies import make_strategy
    from fedcoe_edge.streaming import Partial

    train = TrainConfig(aggregation_rule=rule)
    model = ModelConfig(expert_hidden=8)
    batch, stream, shard = (make_strategy(algorithm, model, train, 0) for _ in range(3))
    for s in (batch, stream, shard):
        s.initialize()
    for rnd in (1, 2):
        before = dict(batch.global_state)
        results = _round_results(batch, rnd, seed=rnd)
        batch.aggregate_round(rnd, results, [])
        p = stream.new_partial(rnd)
        for r in reversed(results):
            stream.fold(p, r)
        stream.finalize(rnd, p, [])
        parts = []
        for chunk in (results[:2], results[2:5], results[5:]):
            q = shard.new_partial(rnd)
            for r in chunk:
                shard.fold(q, r)
            arrays, meta = q.to_arrays()
            parts.append(Partial.from_arrays(arrays, meta))
            check_partial(parts[-1], rnd=rnd, allowed=[r.client_id for r in chunk],
                          template=shard.new_partial(rnd), state=shard.global_state)
        shard.finalize(rnd, shard.merge(rnd, parts), [])
        for other in (stream, shard):
            assert other.version == batch.version == rnd
            assert other.defence == batch.defence  # per-result notes: exactly equal
            for name, v in batch.global_state.items():
                np.testing.assert_allclose(other.global_state[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
        assert change_norm(batch.global_state, before) < 10.0  # the 1e4-scale change is clipped
        # its 1e9 samples: the report is the history after round 1, capped from round 2 on
        if rnd == 1:
            first = [float(r.num_samples) for r in results]
            assert batch.defence.samples["c6"] == 1e9
        else:
            assert batch.defence.samples["c6"] == pytest.approx(2 * float(np.median(first)))
    assert batch.defence.bound is not None and batch.defence.bound < 100


def test_defence_state_survives_the_coordinator_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The coordinator's (and the leader's) checkpoint writer keeps the clip bound, norm
    history and sample counts; a restored strategy defends the next round as before."""
    import json

    from coordinator.config import FederationSettings
    from coordinator.daemon import write_checkpoint
    from fedcoe_edge.config import ModelConfig
    from fedcoe_edge.strategies import make_strategy

    s = make_strategy("fedcoe", ModelConfig(expert_hidden=8), TrainConfig(), 0)
    s.initialize()
    s.aggregate_round(1, _round_results(s, 1, seed=1), [])
    write_checkpoint(tmp_path, s, FederationSettings(), 1)
    doc = json.loads((tmp_path / "model.json").read_text())
    assert doc["robust"]["bound"] == s.defence.bound and "affinity" in doc
    back = make_strategy("fedcoe", ModelConfig(expert_hidden=8), TrainConfig(), 0)
    back.restore_extra(doc)
    assert back.defence == s.defence
    back.restore_extra({})  # a checkpoint from before the defence: starts afresh
    assert back.defence == DefenceState()


# --- the simulator's attack hook -------------------------------------------------------------
def test_simulator_attack_hook_replaces_what_the_server_receives() -> None:
    """The hook sees every client's honest result and what it returns is what is
    aggregated (None: nothing, as from client 3): client 0 sending x1e4 its change (~0.4 x
    1e4, weighted by its 111 samples) moves FedAvg's weights by hundreds without a defence, and by at most the first-round bound (clip_init x the initial
    weights' norm, over 3 equally weighted clients) with the default."""
    from fedcoe_edge.config import ModelConfig
    from fedcoe_edge.data import make_federation
    from fedcoe_edge.simulation import SimulationConfig, run_one

    fed = make_federation("digits", "dirichlet", num_clients=4, num_new_clients=0, seed=0, alpha=0.5)
    model = ModelConfig(expert_kind="mlp", expert_hidden=16, num_global_experts=4, top_k=2,
                        input_shape=fed.input_shape, num_classes=fed.num_classes)
    seen: list[tuple[int, str, bool]] = []
    sent: dict[str, np.ndarray] = {}

    def attack(strategy: Any, task: Any, res: ClientResult, before: Any, data: Any) -> ClientResult | None:
        seen.append((task.round, task.client_id, res.client_id == task.client_id))
        sent.update(task.params)
        if task.client_id == "3":
            return None  # withheld: as a device that never reports
        if task.client_id != "0":
            return res
        return dataclasses.replace(res, params={k: task.params[k] + 1e4 * (v - task.params[k])
                                                for k, v in res.params.items()})

    moved = {}
    for name, train in (("none", TrainConfig(local_epochs=1, **NONE)),  # type: ignore[arg-type]
                        ("default", TrainConfig(local_epochs=1))):
        cfg = SimulationConfig(rounds=1, algorithms=["fedavg"], eval_every=1, new_clients=0,
                               clients=4, model=model, train=train)
        run = run_one("fedavg", fed, cfg, 0, attack=attack)
        moved[name] = change_norm(run.strategy.global_state, sent)
        if name == "default":  # the server folded exactly the results it was sent
            assert sorted(run.strategy.defence.samples) == ["0", "1", "2"]
    assert sorted(set(seen)) == [(1, c, True) for c in sorted(fed.clients)]
    w = weights_norm(sent, list(sent))
    assert moved["none"] > 100 and moved["none"] > 100 * moved["default"], moved
    assert moved["default"] <= 0.5 * w, (moved, w)  # 2 honest changes plus one clipped to 0.5 w, /3


def test_defence_state_takes_the_samples_cap_once_per_history() -> None:
    """Every update of a round is capped by the same median of the history: the state
    computes it once (not per update) and again when the history gains a device."""
    st = DefenceState(bound=1.0, samples={"a": 10.0, "b": 20.0, "c": 30.0})
    assert st.samples_cap(2.0) == samples_cap(st.samples.values(), 2.0) == pytest.approx(40.0)
    st.samples["z"] = 1e9  # a caller that grows the history in place gets the new median
    assert st.samples_cap(2.0) == samples_cap(st.samples.values(), 2.0) == pytest.approx(50.0)
    assert st.samples_cap(3.0) == pytest.approx(75.0)
    assert DefenceState().samples_cap(2.0) is None
    assert st == DefenceState(bound=1.0, samples=dict(st.samples))  # the memo is not state
