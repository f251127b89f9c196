"""The strategy contract: pure algorithm, no transport.

Shaped after Flower's Strategy (Beutel et al., arXiv 2007.14390): the round loop calls
``configure_round`` to get one task per selected client and ``aggregate_round`` with the
results and the failures (dropped, late, rejected clients are data, not exceptions). The
client half, ``client_update``, runs on the device. The in-process simulator and the MQTT
coordinator drive the same objects, so what is measured in simulation is what is deployed.

Aggregation is one rule per strategy, in four steps (docs/design.md, "Streaming
aggregation"): ``new_partial``, ``accumulate`` (one result), ``merge`` (shards' partials) and
``finalize``. ``aggregate_round`` (the simulator, a coordinator with ``aggregation =
"batch"``) folds every result in client-id order and finalizes; a streaming coordinator folds
them as they are accepted, a leader merges its shards' partials: the same code either way.

Weights cross this boundary as ``dict[str, np.ndarray]`` keyed by stable state-dict names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

import numpy as np

from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.data.client import ClientData  # re-exported: the strategy contract names it
from fedcoe_edge.robust import (
    ROWS,
    DefenceState,
    add_rows,
    close_round,
    defend,
    has_rows,
    keeps_updates,
    notes_of,
    record,
    results_of,
    robust_substitute,
)
from fedcoe_edge.streaming import Partial

Arrays = dict[str, np.ndarray]


@dataclass
class ClientTask:
    """What the server sends one client for one round."""

    client_id: str
    round: int
    params: Arrays  # global parameters that travel down (may be a subset)
    expert_ids: list[int] = field(default_factory=list)  # global experts to train; [] = all
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    """What one client sends back: its update and the statistics aggregation needs."""

    client_id: str
    round: int
    num_samples: int
    params: Arrays  # updated global parameters that travel up (same keys as trained)
    affinity: list[float] | None = None  # mean routing over the client's data (FedCoE)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Failure:
    """A selected client that produced no usable result this round, and why."""

    client_id: str
    round: int
    reason: str


class Strategy(ABC):
    """Server rules plus the client's local procedure for one federated algorithm."""

    name: ClassVar[str]

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0) -> None:
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.global_state: Arrays = {}
        self.version = 0  # bumps on every aggregation; devices report the base they trained on
        # clip bound and sample history from earlier rounds (docs/design.md, "Robust aggregation")
        self.defence = DefenceState()

    @property
    def network_cfg(self) -> ModelConfig:
        """The architecture this strategy actually trains (baselines may differ from model_cfg)."""
        return self.model_cfg

    # --- server side ------------------------------------------------------------------
    @abstractmethod
    def initialize(self) -> Arrays:
        """Create the initial global state (deterministic for the seed) and return it."""

    def select_clients(self, rnd: int, available: Sequence[str]) -> list[str]:
        """Sample ``fraction_fit`` of the available clients (at least one)."""
        ids = sorted(available)
        count = max(1, int(round(self.train_cfg.fraction_fit * len(ids))))
        if count >= len(ids):
            return ids
        return sorted(self.rng.choice(ids, size=count, replace=False).tolist())

    @abstractmethod
    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        """One task per selected client."""

    # --- aggregation: one rule, batch, streamed or sharded -----------------------------
    @abstractmethod
    def new_partial(self, rnd: int) -> Partial:
        """An empty aggregate for round ``rnd``: a :class:`Partial` holding whatever state
        :meth:`accumulate` fills (``extra_sums`` / ``extra_rows`` for a rule that is not a
        weighted sum). Every partial of the round starts here, the shards' included."""

    @abstractmethod
    def accumulate(self, partial: Partial, result: ClientResult) -> None:
        """Fold one result's numbers into ``partial`` (the caller, :meth:`fold`, has already
        counted the client in). The server state it may read is the state before the round
        (``global_state`` and whatever :meth:`finalize` of earlier rounds left), never other
        results: a partial must not depend on the order its results came in beyond float
        rounding, and must allow the result's weights to be dropped afterwards."""

    def merge(self, rnd: int, partials: Sequence[Partial]) -> Partial:
        """One partial for round ``rnd`` from partials over disjoint client sets (a
        leader's shards). Default: :meth:`new_partial`, then :meth:`Partial.merge` of each
        (sums add exactly, ``extra_rows`` concatenate); override only for a merge that is
        neither."""
        merged = self.new_partial(rnd)
        for p in partials:
            merged.merge(p)
        merged.check_rows()
        return merged

    @abstractmethod
    def finalize(self, rnd: int, partial: Partial, failures: Sequence[Failure]) -> Arrays:
        """The new global state from the round's partial (also ``self.global_state``; bump
        ``version`` when it changes). With no client in the partial, keep the state and the
        version: a round below quorum is finalized with an empty partial, so that the
        strategy still sees its failures."""

    @final
    def fold(self, partial: Partial, result: ClientResult) -> None:
        """Defend ``result`` (clip its change, cap its sample weight: docs/design.md, "Robust
        aggregation"; from the state before the round only, so any order and any sharding
        defend it alike), count its client into ``partial`` and :meth:`accumulate` it: what
        every aggregation path calls (a client counted twice is a ValueError). A partial
        that keeps updates (a median / trimmed-mean rule) stores the defended update
        instead; :meth:`close_defence` folds the robust values at the close."""
        result, note = defend(self.defence, self.train_cfg, result, self.global_state)
        partial.admit(result.client_id, result.num_samples)
        if has_rows(partial):
            record(partial, note, result)
        if not keeps_updates(partial):
            self.accumulate(partial, result)
        if partial.extra_rows:
            partial.check_rows()

    # --- the defence's share of a strategy's rule ---------------------------------------
    def defended_keys(self) -> list[str]:
        """The tensors a median / trimmed-mean partial keeps a row of per client: every
        floating global tensor (a strategy whose devices send fewer overrides it)."""
        return [n for n, v in self.global_state.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]

    def with_defence(self, partial: Partial) -> Partial:
        """``partial`` (a fresh one of :meth:`new_partial`) with the defence's rows: every
        built-in strategy's ``new_partial`` returns ``self.with_defence(Partial(...))``. A
        strategy that does not is still clipped and capped in :meth:`fold`, but its bound
        keeps the first-round rule and the robust rules do not apply to it."""
        return add_rows(partial, self.train_cfg, self.global_state, self.defended_keys(),
                        self.model_cfg.num_global_experts)

    def close_defence(self, partial: Partial) -> Partial:
        """The first step of every built-in ``finalize``: the next round's defence state from
        the round's notes, and, when the partial kept the updates, a partial of the robust
        rule (each tensor's median / trimmed mean over its senders, folded as ordinary
        results) for the strategy's own rule to finalize."""
        if not has_rows(partial):
            return partial
        self.defence = close_round(self.defence, self.train_cfg, notes_of(partial))
        if not keeps_updates(partial):
            return partial
        robust = robust_substitute(results_of(partial, ClientResult), self.train_cfg.aggregation_rule,
                                   self.train_cfg.trim_ratio)
        plain = self.new_partial(partial.round)
        plain.extra_rows = {k: v for k, v in plain.extra_rows.items() if not k.startswith(ROWS)}
        for r in sorted(robust, key=lambda r: r.client_id):
            plain.admit(r.client_id, r.num_samples)
            self.accumulate(plain, r)
        return plain

    @final
    def aggregate_round(self, rnd: int, results: Sequence[ClientResult],
                        failures: Sequence[Failure]) -> Arrays:
        """The batch path: fold every result in client-id order, then :meth:`finalize`;
        with no results the state is kept."""
        partial = self.new_partial(rnd)
        for r in sorted(results, key=lambda r: r.client_id):
            self.fold(partial, r)
        return self.finalize(rnd, partial, failures)

    def state_for_cold_start(self) -> Arrays:
        """What a brand-new device downloads before it predicts (default: everything)."""
        return self.global_state

    # --- client side ------------------------------------------------------------------
    @abstractmethod
    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays | None]:
        """Train on the client's data; return the result to upload and the new private state."""

    def personalize(self, local_state: Arrays | None, data: ClientData) -> Arrays | None:
        """Hook run once after the last round (e.g. fine-tuning); default: no change."""
        return local_state

    # --- evaluation -------------------------------------------------------------------
    @abstractmethod
    def predict_global(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of the shared (global) model, (N, C)."""

    @abstractmethod
    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        """Class probabilities of one client's own model, (N, C)."""

    def predict_cold(self, x: np.ndarray, x_unlabeled: np.ndarray | None = None) -> np.ndarray:
        """A new client with no training: by default the global model. ``x_unlabeled`` is
        the device's unlabelled pool, the only inputs a strategy may look at to choose what
        to download (never ``x``, which is scored; docs/design.md, "Cold start")."""
        return self.predict_global(x)

    def diagnostics(self, clients: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    local_states: Mapping[str, Arrays | None], x_global: np.ndarray) -> dict[str, Any]:
        """Why the numbers are what they are, after training: ``clients`` maps a client id to
        its evaluation (x, y), ``x_global`` is the global evaluation set. Default: nothing to
        say; FedCoE reports expert use and what each level adds."""
        return {}

    # --- what a device holds: the daemons ask these, never the strategy's type ----------
    def device_payload(self, client_id: str,
                       expert_ids: Sequence[int] | None) -> tuple[list[int], Arrays]:
        """What a device downloads when it fetches the model: the global expert ids it will
        hold and the arrays. ``expert_ids`` is the device's request (None: whatever this
        strategy assigns it). Default: a dense model cannot be split, so every expert and
        the whole global state, whatever was asked."""
        return list(range(self.model_cfg.num_global_experts)), dict(self.global_state)

    def hold(self, params: Arrays) -> None:
        """On a device: make what it downloaded the state that :meth:`personalize` and the
        prediction methods read. Default: the download is the global state."""
        self.global_state = params

    def predict_held(self, client_id: str, params: Arrays, expert_ids: Sequence[int],
                     local_state: Arrays | None, x: np.ndarray, use_local: bool) -> np.ndarray:
        """Class probabilities with exactly what a device holds (``params`` covering
        ``expert_ids``, its private ``local_state``), (N, C). Default: the personal model
        built from the download; a dense model has no level to leave out."""
        self.hold(params)
        return self.predict_personal(client_id, local_state, x)

    def choose_cold_experts(self, params: Arrays, x_unlabeled: np.ndarray) -> list[int]:
        """On a new device: which global experts to download, given the gate-level ``params``
        it fetched first and its own unlabeled inputs. Default: all of them."""
        return list(range(self.model_cfg.num_global_experts))

    def checkpoint_extra(self) -> dict[str, Any]:
        """Server state beyond the arrays, rng and version that a coordinator checkpoint
        must keep (JSON-ready): the defence's clip bound, norm history and sample counts (a
        subclass adds its own to ``super().checkpoint_extra()``)."""
        return {"robust": self.defence.to_json()}

    def restore_extra(self, doc: Mapping[str, Any]) -> None:
        """Take back what :meth:`checkpoint_extra` wrote (``doc`` is the whole checkpoint
        document; a key it lacks means a checkpoint from before that state existed). A
        subclass that overrides it calls ``super().restore_extra(doc)``."""
        self.defence = DefenceState.from_json(doc.get("robust"))
