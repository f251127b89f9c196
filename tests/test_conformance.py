"""Conformance matrix: every registered strategy x trunk mode x aggregation path gives the
same new global state for the same results (docs/design.md, "Streaming aggregation").

The aggregation paths are the four ways the project applies a round:

* ``batch``: ``Strategy.aggregate_round`` (the simulator; a coordinator with
  ``aggregation = "batch"``);
* ``stream``: the coordinator's default: ``fold`` in arrival order, the partial made durable
  through its array form half way (as ``acc-*.safetensors`` is before an ACK), ``finalize``;
* ``leader+1`` and ``leader+3``: shard aggregators fold their own devices' results, each
  partial crosses the real wire form (``fedcoe_edge.sharding.partial_to_wire`` /
  ``partial_from_wire``) and the leader's checks (``check_partial``, ``PartialInbox``),
  the leader merges (``Strategy.merge``) and finalizes.

Trunk modes: ``random`` (a randomly initialised trunk, federated: the default), and a
pretrained trunk that is ``federated``, ``frozen`` or ``local-finetune``. Only FedCoE and its
ablations implement trunk modes and pretrained weights (``make_strategy`` refuses them for
the baselines, which train a plain network), so the baselines run the ``random`` column
only; ``test_baselines_refuse_other_trunk_modes`` pins that restriction.

Each round has a device that sends a partial expert subset (FedCoE's family; a dense
baseline always sends its whole model) and one that fails (a ``Failure``, which on the
sharded paths the leader derives from its shard's report). The results are synthetic and
fast: seeded perturbations of each device's task, shaped like what one real
``client_update`` of the strategy uploads (which names it adds or leaves out, whether it
reports an affinity), on a tiny registered trunk (a conv + BatchNorm, so integer BatchNorm
counters are aggregated too). They are computed once per round and fed to every path; two
rounds, so the strategies' server state (FedCoE's affinity EMA, expert assignment, version)
carries over.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from torch import nn

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.registry import TRUNKS, register_trunk
from fedcoe_edge.sharding import (
    PartialInbox,
    check_partial,
    partial_from_wire,
    partial_to_wire,
    shard_name,
    shard_of,
)
from fedcoe_edge.strategies import (
    STRATEGIES,
    ClientData,
    ClientResult,
    Failure,
    Strategy,
    make_strategy,
)
from fedcoe_edge.strategies.fedcoe import FedCoE, expert_of
from fedcoe_edge.streaming import Partial
from fedcoe_edge.training import build_model, to_arrays
from fedcoe_edge.trunk import TRUNK_PREFIX, exchanged

TRUNK = "conformance-tiny"
TRUNK_MODES = ("random", "federated", "frozen", "local-finetune")
PATHS = ("batch", "stream", "leader+1", "leader+3")
DEVICES = [f"dev-{i}" for i in range(5)]  # shards of 3: 2, 0, 2, 1, 2
PARTIAL_DEVICE = "dev-2"  # holds one expert only
FAILING_DEVICE = "dev-3"  # alone on shard 1 of 3: that shard's partial is empty
ROUNDS = 2
TRAIN = TrainConfig(local_epochs=1, batch_size=8, experts_per_client=2)


def tiny_trunk(input_shape: tuple[int, ...]) -> nn.Module:
    """Conv + BatchNorm (float weights and an int64 ``num_batches_tracked``) + ReLU."""
    return nn.Sequential(nn.Conv2d(input_shape[0], 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())


def base_model() -> ModelConfig:
    return ModelConfig(input_shape=(1, 6, 6), trunk=TRUNK, expert_kind="mlp", expert_hidden=8,
                       num_global_experts=4, top_k=2, num_local_experts=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Registers the tiny trunk for this module and writes a 'pretrained' trunk file (the
    trunk of a model built from another seed) with its sha256."""
    register_trunk(TRUNK, tiny_trunk, replace=True)
    try:
        model = build_model(base_model(), 7)
        arrays = {k: v for k, v in to_arrays(model.state_dict()).items() if k.startswith(TRUNK_PREFIX)}
        path = tmp_path_factory.mktemp("trunk") / "trunk.safetensors"
        save_file(arrays, str(path))
        yield str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        TRUNKS.unregister(TRUNK)


def model_for(mode: str, pretrained: tuple[str, str]) -> ModelConfig:
    cfg = base_model()
    if mode == "random":
        return cfg
    path, digest = pretrained
    return ModelConfig.from_dict({**cfg.to_dict(), "trunk_mode": mode, "trunk_weights": path,
                                  "trunk_sha256": digest})


def is_fedcoe_family(name: str) -> bool:
    return issubclass(STRATEGIES[name], FedCoE)


def matrix() -> list[Any]:
    """(strategy, trunk mode) for every valid pair; the baselines support the default only."""
    return [pytest.param(name, mode, id=f"{name}-{mode}") for name in sorted(STRATEGIES)
            for mode in TRUNK_MODES if is_fedcoe_family(name) or mode == "random"]


def device_data(dev: str) -> ClientData:
    rng = np.random.default_rng(int(dev.split("-")[1]))
    x = rng.random((12, 1, 6, 6), dtype=np.float32)
    y = rng.integers(0, 10, 12).astype(np.int64)
    return ClientData(x, y, x[:4], y[:4])


def upload_shape(s: Strategy, rnd: int) -> tuple[set[str], set[str], bool]:
    """What a real device of this strategy uploads relative to its task, from one real
    ``client_update``: the names it adds (FedRep's head), the names it leaves out (Local
    uploads nothing) and whether it reports an affinity."""
    probe = copy.deepcopy(s)
    task = probe.configure_round(rnd, [DEVICES[0]])[0]
    r, _ = probe.client_update(task, None, device_data(DEVICES[0]))
    return set(r.params) - set(task.params), set(task.params) - set(r.params), r.affinity is not None


def round_results(s: Strategy, rnd: int, shape: tuple[set[str], set[str], bool]
                  ) -> tuple[list[ClientResult], list[Failure]]:
    """The round's uploads for ``s`` (the batch path's strategy): every selected device but
    the failing one uploads a seeded perturbation of what a real device of ``s`` sends for its
    task (``upload_shape``); the partial device's task is narrowed to one expert."""
    added, dropped, reports = shape
    k = s.model_cfg.num_global_experts
    tasks = s.configure_round(rnd, s.select_clients(rnd, DEVICES))
    results, failures = [], []
    for t in tasks:
        if t.client_id == FAILING_DEVICE:
            failures.append(Failure(t.client_id, rnd, "deadline passed with no accepted update"))
            continue
        if t.client_id == PARTIAL_DEVICE and isinstance(s, FedCoE):
            keep = t.expert_ids[-1:] if t.expert_ids else [k - 1]
            t.params, t.expert_ids = s.params_for(keep), keep
        rng = np.random.default_rng([rnd, int(t.client_id.split("-")[1])])
        names = sorted((set(t.params) | added) - dropped)
        params = {}
        for n in names:
            v = s.global_state[n]
            params[n] = ((v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
                         if np.issubdtype(v.dtype, np.floating) else v + rng.integers(0, 3, v.shape))
        affinity = rng.dirichlet(np.ones(k)).tolist() if reports else None
        results.append(ClientResult(t.client_id, rnd, int(rng.integers(5, 50)), params, affinity))
    return results, failures


def run_path(s: Strategy, path: str, rnd: int, results: list[ClientResult],
             failures: list[Failure]) -> None:
    """Apply one round to ``s`` the way ``path`` does."""
    if path == "batch":
        s.aggregate_round(rnd, results, failures)
        return
    arrivals = list(reversed(results))  # not the batch's client-id order
    if path == "stream":
        p = s.new_partial(rnd)
        half = len(arrivals) // 2
        for r in arrivals[:half]:
            s.fold(p, r)
        p = Partial.from_arrays(*p.to_arrays())  # the durable snapshot a restart resumes from
        for r in arrivals[half:]:
            s.fold(p, r)
        s.finalize(rnd, p, failures)
        return
    shards = int(path.split("+")[1])
    selected = sorted([r.client_id for r in results] + [f.client_id for f in failures])
    expected: dict[str, list[str]] = {shard_name(i): [] for i in range(shards)}
    for dev in selected:
        expected[shard_name(shard_of(dev, shards))].append(dev)
    inbox = PartialInbox(rnd, expected)
    template = s.new_partial(rnd)
    for name, devs in sorted(expected.items()):
        p = s.new_partial(rnd)  # a shard holds the same strategy and version as its leader
        for r in arrivals:
            if r.client_id in devs:
                s.fold(p, r)
        data, meta = partial_to_wire(p)
        got = partial_from_wire(data, meta)
        assert inbox.refusal(name, rnd) is None
        check_partial(got, rnd=rnd, allowed=devs, template=template, state=s.global_state)
        inbox.accept(name, got, {f.client_id: f.reason for f in failures if f.client_id in devs})
    assert inbox.complete
    merged = s.merge(rnd, [inbox.received[n] for n in sorted(inbox.received)])
    derived = [Failure(c, rnd, why) for c, why in sorted(inbox.round_failures(merged.clients).items())]
    assert [(f.client_id, f.reason) for f in derived] == [(f.client_id, f.reason) for f in failures]
    s.finalize(rnd, merged, derived)


def assert_same(ref: Strategy, other: Strategy, what: str) -> None:
    assert other.version == ref.version, what
    assert set(other.global_state) == set(ref.global_state), what
    for name, value in ref.global_state.items():
        got = other.global_state[name]
        assert got.dtype == value.dtype and got.shape == value.shape, f"{what}: {name}"
        np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-6, err_msg=f"{what}: {name}")
    ref_aff, got_aff = ref.checkpoint_extra().get("affinity", {}), other.checkpoint_extra().get("affinity", {})
    assert sorted(got_aff) == sorted(ref_aff), what
    for c, row in ref_aff.items():
        np.testing.assert_allclose(got_aff[c], row, rtol=1e-9, atol=1e-12, err_msg=f"{what}: affinity {c}")


@pytest.mark.parametrize(("algorithm", "mode"), matrix())
def test_every_aggregation_path_gives_the_same_state(algorithm: str, mode: str,
                                                     pretrained: tuple[str, str]) -> None:
    ref = make_strategy(algorithm, model_for(mode, pretrained), TRAIN, seed=0)
    init = {k: v.copy() for k, v in ref.initialize().items()}
    paths = {p: copy.deepcopy(ref) for p in PATHS if p != "batch"}
    shape = upload_shape(ref, 1)
    subset_sent = False
    for rnd in range(1, ROUNDS + 1):
        results, failures = round_results(ref, rnd, shape)
        assert failures and len(results) == len(DEVICES) - 1
        if isinstance(ref, FedCoE):
            sent = next(r for r in results if r.client_id == PARTIAL_DEVICE)
            experts = {expert_of(n) for n in sent.params} - {None}
            subset_sent = subset_sent or len(experts) < ref.model_cfg.num_global_experts
            # what travels follows the trunk mode: a frozen / local trunk never leaves a device
            assert all(exchanged(ref.model_cfg, n) for r in results for n in r.params)
        for path, s in paths.items():
            run_path(s, path, rnd, results, failures)
        run_path(ref, "batch", rnd, results, failures)
        for path, s in paths.items():
            assert_same(ref, s, f"{algorithm}/{mode}/{path}/round {rnd}")
    assert not isinstance(ref, FedCoE) or subset_sent
    shares = getattr(ref, "shares_model", True)
    assert ref.version == (ROUNDS if shares else 0)
    moved = [n for n in init if not np.array_equal(init[n], ref.global_state[n])]
    assert bool(moved) == shares  # the rounds really changed the state: the matrix can fail
    if mode in ("frozen", "local-finetune"):  # the global trunk is never averaged
        trunk = [n for n in init if n.startswith(TRUNK_PREFIX)]
        assert trunk and not set(trunk) & set(moved)


def test_baselines_refuse_other_trunk_modes(pretrained: tuple[str, str]) -> None:
    """Why the matrix has one column for the baselines: they refuse the others."""
    for name in sorted(STRATEGIES):
        if is_fedcoe_family(name):
            continue
        for mode in TRUNK_MODES[1:]:
            with pytest.raises(ConfigError, match="trunk_mode"):
                make_strategy(name, model_for(mode, pretrained), TRAIN)


def test_matrix_covers_every_registered_strategy() -> None:
    names = {p.values[0] for p in matrix()}
    assert names == set(STRATEGIES)
    assert len(matrix()) == sum(4 if is_fedcoe_family(n) else 1 for n in STRATEGIES)


def test_a_registered_user_strategy_streams_and_shards(pretrained: tuple[str, str]) -> None:
    """A strategy defined outside the package (here: FedAvg whose update deltas are clipped
    to a norm, with the clipped count kept in the partial's extra state) runs every path
    with no other module touched."""
    from fedcoe_edge.strategies import FedAvg, register_strategy, unregister_strategy

    class ClippedFedAvg(FedAvg):
        name = "conformance-clipped"
        clip = 0.05

        def new_partial(self, rnd: int) -> Partial:
            return Partial(rnd, extra_sums={"clipped": np.zeros(1)},
                           extra_rows={"norm": np.zeros((0,))})

        def accumulate(self, partial: Partial, result: ClientResult) -> None:
            delta = {k: np.asarray(result.params[k], np.float64) - self.global_state[k]
                     for k in self.global_state}
            norm = float(np.sqrt(sum(float((d ** 2).sum()) for d in delta.values())))
            scale = min(1.0, self.clip / max(norm, 1e-12))
            clipped = {k: (self.global_state[k] + scale * d) for k, d in delta.items()}
            partial.dense.add(clipped, result.num_samples, keys=list(self.global_state))
            partial.extra_sums["clipped"] = partial.extra_sums["clipped"] + (scale < 1.0)
            partial.extra_rows["norm"] = np.append(partial.extra_rows["norm"], norm)

    register_strategy(ClippedFedAvg.name, ClippedFedAvg)
    try:
        ref = make_strategy(ClippedFedAvg.name, model_for("random", pretrained), TRAIN, seed=0)
        ref.initialize()
        paths = {p: copy.deepcopy(ref) for p in PATHS if p != "batch"}
        results, failures = round_results(ref, 1, upload_shape(ref, 1))
        for path, s in paths.items():
            run_path(s, path, 1, results, failures)
        run_path(ref, "batch", 1, results, failures)
        for path, s in paths.items():
            assert_same(ref, s, f"user strategy/{path}")
        p = ref.new_partial(1)
        for r in results:
            ref.fold(p, r)
        assert p.extra_sums["clipped"][0] == len(results)  # every update was clipped
        assert p.extra_rows["norm"].shape == (len(results),)
    finally:
        unregister_strategy(ClippedFedAvg.name)
