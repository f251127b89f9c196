"""FedCoE: federated coordinated dual-level Mixture-of-Experts.

"FedCoE: Bridging Generalization and Personalization via Federated Coordinated Dual-level
MoEs", arXiv 2605.21264; our reading is docs/design.md section 4:

* clients train their private level (local experts + local gate) together with a local copy
  of the global gate, the shared expert and the m global experts they were assigned, under
  the coordinated objective of ``fedcoe_edge.losses``;
* clients report n_i and their affinity r_i = mean_x g(x) (the global gate's dense
  probabilities over all K experts, computable without holding the experts);
* the server aggregates expert k with weights n_i r_ik over the clients that sent it, the
  gate/shared expert/trunk by n_i, keeps an EMA affinity matrix R and assigns each client its
  top-m experts by R for the next round (partial exchange; the gate always travels);
* a device routes only among the experts it holds, so partial exchange changes nothing about
  correctness, only about which experts it can use;
* cold start: a new device computes its routing prior pi = mean g(x) on unlabeled data,
  downloads the fewest experts (at least top_k) that carry ``cold_start_mass`` of pi and
  predicts with the global path, no gradient step. The prior is measured on the device's
  unlabelled pool, never on the inputs it is scored on.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedcoe_edge.aggregate import (
    assign_experts,
    balance_bias_step,
    ema,
    expert_capacity,
)
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.losses import fedcoe_loss, label_log_prior
from fedcoe_edge.model import DualLevelMoE, topk_routing
from fedcoe_edge.strategies.base import (
    Arrays,
    ClientData,
    ClientResult,
    ClientTask,
    Failure,
    Strategy,
)
from fedcoe_edge.strategies.bundle_rules import cover_prior
from fedcoe_edge.streaming import ExpertSums, Partial
from fedcoe_edge.training import build_model, load_arrays, predict_probs, run_epochs, to_arrays
from fedcoe_edge.trunk import TRUNK_PREFIX, exchanged, kept_locally, prepare_trunk


def expert_of(name: str) -> int | None:
    """Global expert index a state key belongs to, or None for gate/shared/trunk/local keys."""
    if not name.startswith("global.experts."):
        return None
    return int(name.split(".")[2])


def client_seed(seed: int, client_id: str) -> int:
    """Stable per-client seed (Python's hash() is salted per process, crc32 is not)."""
    return (seed * 1_000_003 + zlib.crc32(client_id.encode())) % (2**31)


class FedCoE(Strategy):
    """Affinity-weighted experts, sample-weighted gate, partial exchange, cold start."""

    name = "fedcoe"

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0,
                 *, affinity_weighting: bool = True, partial_exchange: bool = True) -> None:
        super().__init__(model_cfg, train_cfg, seed)
        self.model: DualLevelMoE = build_model(model_cfg, seed)
        prepare_trunk(self.model, model_cfg)  # pretrained / frozen trunk (docs/design.md, "Trunk modes")
        self.affinity_weighting = affinity_weighting  # False: plain n_i mean of experts (ablation)
        self.partial_exchange = partial_exchange  # False: every client gets all K (m = K)
        self.affinity: dict[str, np.ndarray] = {}  # R, one EMA row per client
        self._assignment: dict[str, list[int]] = {}  # see the ``assignment`` property
        self._assigned_at: tuple[int, int] = (-1, -1)
        self.velocity: dict[str, np.ndarray] = {}  # server momentum buffer (server_step)
        k = model_cfg.num_global_experts
        self.m = min(train_cfg.experts_per_client, k) if partial_exchange else k

    # --- server side ------------------------------------------------------------------
    def initialize(self) -> Arrays:
        self.global_state = to_arrays(self.model.global_state())
        return self.global_state

    def expert_keys(self) -> list[list[str]]:
        keys: list[list[str]] = [[] for _ in range(self.model_cfg.num_global_experts)]
        for name in self.global_state:
            k = expert_of(name)
            if k is not None:
                keys[k].append(name)
        return keys

    def experts_for(self, client_id: str) -> list[int]:
        """The experts a client holds from now on: its share of the capacity-limited assignment
        over every client that has reported (all K for one that never has). The assignment is
        a pure function of (affinity, version, seed), so the simulator, the coordinator and a
        coordinator resumed from its affinity table all agree on it."""
        return list(self.assignment.get(client_id, range(self.model_cfg.num_global_experts)))

    @property
    def assignment(self) -> dict[str, list[int]]:
        """Client id -> held experts, recomputed when the affinity table or version changes."""
        stamp = (self.version, len(self.affinity))
        if self._assigned_at != stamp:
            self._assignment = self.assign(self.version, sorted(self.affinity))
            self._assigned_at = stamp
        return self._assignment

    def assign(self, rnd: int, client_ids: Sequence[str]) -> dict[str, list[int]]:
        """Capacity-limited top-m assignment over ``client_ids`` (``rnd`` seeds the ties).

        Clients that never reported get all K (their first round is a full exchange, so their
        affinity is measured against every expert). The rest share the experts under a cap of
        ``ceil(slack * n * m / K)`` clients each, by affinity; ties break by a permutation
        drawn from (seed, round), never toward the lower index. docs/design.md, "Routing".
        """
        k = self.model_cfg.num_global_experts
        known = [c for c in client_ids if c in self.affinity]
        out = {c: list(range(k)) for c in client_ids if c not in self.affinity}
        if not known:
            return out
        if self.m >= k:
            return {**out, **{c: list(range(k)) for c in known}}
        scores = np.stack([self.affinity[c] for c in known])
        rng = np.random.default_rng([self.seed, rnd, 7])
        tiebreak = rng.permutation(scores.size).reshape(scores.shape).astype(np.float64)
        cap = expert_capacity(len(known), self.m, k, self.train_cfg.capacity_slack)
        for c, ids in zip(known, assign_experts(scores, self.m, cap, tiebreak), strict=True):
            out[c] = ids
        return out

    def params_for(self, expert_ids: Sequence[int]) -> Arrays:
        """The gate, shared expert and trunk always; routed experts only those listed."""
        wanted = set(expert_ids)
        return {n: v for n, v in self.global_state.items()
                if (expert_of(n) is None or expert_of(n) in wanted) and exchanged(self.model_cfg, n)}

    def configure_round(self, rnd: int, client_ids: Sequence[str]) -> list[ClientTask]:
        tasks = []
        for cid in client_ids:
            ids = self.experts_for(cid)
            tasks.append(ClientTask(cid, rnd, self.params_for(ids), ids, config={"version": self.version}))
        return tasks

    def gate_bias_key(self) -> str:
        """State name of the global gate's output bias (the balancing step adjusts it)."""
        net = self.model.global_part.gate.net
        prefix = "global.gate.net." if isinstance(net, torch.nn.Linear) else f"global.gate.net.{len(list(net.children())) - 1}."
        return prefix + "bias"

    # --- aggregation (docs/design.md, "Streaming aggregation") -------------------------
    def new_partial(self, rnd: int) -> Partial:
        k = self.model_cfg.num_global_experts
        return self.with_defence(Partial(rnd, experts=ExpertSums(k), share=np.zeros(k, dtype=np.float64)))

    def defended_keys(self) -> list[str]:
        """What devices send: a frozen or locally fine-tuned trunk never travels."""
        return [n for n in super().defended_keys() if exchanged(self.model_cfg, n)]

    def accumulate(self, partial: Partial, result: ClientResult) -> None:
        """Experts by ``n_i r_ik`` over the clients that sent them (``n_i`` when every
        sender's affinity for k is 0), the gate, shared expert and *exchanged* trunk by
        ``n_i`` (a frozen or locally fine-tuned trunk never travels, so it is not summed),
        the routing mass for balancing and the reported row for the EMA. A client that did
        not report an affinity counts as uniform."""
        k_total = self.model_cfg.num_global_experts
        row = (np.asarray(result.affinity, dtype=np.float64) if result.affinity is not None
               else np.full(k_total, 1.0 / k_total))
        if row.shape != (k_total,):
            raise ValueError(f"affinity of {result.client_id!r:.40} has {row.size} entries, "
                             f"the model {k_total} experts")
        assert partial.experts is not None and partial.share is not None, "not a FedCoE partial"
        partial.experts.add(result.params, self.expert_keys(), result.num_samples,
                            row if self.affinity_weighting else np.ones_like(row))
        dense_keys = [n for n in self.global_state
                      if expert_of(n) is None and exchanged(self.model_cfg, n)]
        partial.dense.add(result.params, result.num_samples, keys=dense_keys)
        partial.share += float(result.num_samples) * row
        partial.affinity[result.client_id] = row.tolist()

    def finalize(self, rnd: int, partial: Partial, failures: Sequence[Failure]) -> Arrays:
        """Means of the sums (experts nobody sent keep their value), the affinity EMA per
        reporting client, then the gate-bias step toward uniform use over all K (a client
        holding m < K experts cannot see the others' load). No client: the state stays."""
        partial = self.close_defence(partial)
        if not partial.clients:
            return self.global_state
        assert partial.experts is not None and partial.share is not None, "not a FedCoE partial"
        k_total = self.model_cfg.num_global_experts
        new = dict(self.global_state)
        new.update(partial.experts.means(self.global_state, self.expert_keys()))
        new.update(partial.dense.mean(self.global_state))
        sent = [k for k in range(k_total) if partial.experts.by_affinity[k].weight > 0
                or partial.experts.by_samples[k].weight > 0]
        new = self.server_step(new, sent)
        for cid in sorted(partial.affinity):
            self.affinity[cid] = ema(self.affinity.get(cid), np.asarray(partial.affinity[cid]),
                                     self.train_cfg.affinity_ema)
        if self.train_cfg.balance_rate > 0 and k_total > 1:
            share = partial.share / max(partial.samples, 1e-12)
            key = self.gate_bias_key()
            step = balance_bias_step(share, self.train_cfg.balance_rate)
            new[key] = (np.asarray(new[key], dtype=np.float64) + step).astype(new[key].dtype)
        self.global_state = new
        self.version += 1
        return new

    def server_step(self, aggregate: Arrays, sent: Sequence[int]) -> Arrays:
        """Smooth the move from the current global state to this round's ``aggregate``:
        ``v = server_momentum * v + (aggregate - global)``, ``global += server_lr * v``, over
        the gate, shared expert, exchanged trunk and the experts in ``sent``. An expert no
        client sent keeps its value and its velocity (it did not take part in the round).
        Round-to-round swings of the global path come from which clients' skews dominate a
        round's mean; this low-pass filter damps them (docs/design.md, "Server stabilization").
        With the defaults (1.0, 0.0) it returns ``aggregate`` unchanged."""
        lr, mom = self.train_cfg.server_lr, self.train_cfg.server_momentum
        if lr == 1.0 and mom == 0.0:
            return aggregate
        took_part = set(sent)
        held_out = {n for k, keys in enumerate(self.expert_keys()) if k not in took_part for n in keys}
        out = dict(aggregate)
        for name, value in aggregate.items():
            old = self.global_state[name]
            if name in held_out or not np.issubdtype(np.asarray(old).dtype, np.floating):
                continue
            step = np.asarray(value, dtype=np.float64) - np.asarray(old, dtype=np.float64)
            if mom > 0:
                step = mom * self.velocity.get(name, 0.0) + step
                self.velocity[name] = step
            out[name] = (np.asarray(old, dtype=np.float64) + lr * step).astype(np.asarray(old).dtype)
        return out

    def affinity_matrix(self, client_ids: Sequence[str]) -> np.ndarray:
        """R as a (clients, K) array in the given order; rows of clients never seen are NaN."""
        k = self.model_cfg.num_global_experts
        return np.stack([self.affinity.get(c, np.full(k, np.nan)) for c in client_ids])

    # --- client side ------------------------------------------------------------------
    def fresh_local_state(self, client_id: str) -> Arrays:
        """A new device's private level, initialised from its own seed."""
        state = to_arrays(build_model(self.model_cfg, client_seed(self.seed, client_id)).local_state())
        if self.model_cfg.trunk_mode == "local-finetune":  # starts from the shared (pretrained) trunk
            built = build_model(self.model_cfg, self.seed)
            prepare_trunk(built, self.model_cfg)
            state.update({n: v for n, v in to_arrays(built.state_dict()).items()
                          if n.startswith(TRUNK_PREFIX)})
        return state

    def expert_mask(self, expert_ids: Sequence[int]) -> torch.Tensor:
        mask = torch.zeros(self.model_cfg.num_global_experts, dtype=torch.bool)
        mask[list(expert_ids)] = True
        return mask

    def client_update(self, task: ClientTask, local_state: Arrays | None,
                      data: ClientData) -> tuple[ClientResult, Arrays]:
        model, cfg = self.model, self.train_cfg
        ids = task.expert_ids or list(range(self.model_cfg.num_global_experts))
        load_arrays(model, task.params)
        load_arrays(model, local_state if local_state is not None else self.fresh_local_state(task.client_id))
        mask = self.expert_mask(ids)
        named = dict(model.named_parameters())
        trainable_names = [n for n in named if kept_locally(self.model_cfg, n) or n in task.params]
        anchor = {n: torch.from_numpy(np.array(task.params[n])) for n in trainable_names
                  if n in task.params}

        log_prior = (label_log_prior(torch.from_numpy(data.y_train), self.model_cfg.num_classes, cfg.tau)
                     if cfg.tau > 0 else None)

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            out = model(xb, expert_mask=mask, detach_global=cfg.detach_global)
            return fedcoe_loss(out, yb, cfg, named, anchor, mask, log_prior).total

        # affinity under the gate the server sent, before local training bends it toward the
        # experts this client holds: it is the aggregated gate's load and routing on this
        # client's data, what assignment and balancing need (docs/design.md, "Routing")
        affinity = self.routing_prior(data.x_train)
        rng = np.random.default_rng([self.seed, task.round, client_seed(0, task.client_id)])
        last = run_epochs(model, [named[n] for n in trainable_names], data.x_train, data.y_train,
                          cfg, cfg.local_epochs, rng, loss)
        state = to_arrays(model.state_dict())
        upload = {n: state[n] for n in task.params}
        local = {n: v for n, v in state.items() if kept_locally(self.model_cfg, n)}
        return (ClientResult(task.client_id, task.round, data.num_train, upload,
                             affinity=affinity.tolist(), metrics={"train_loss": last}), local)

    @torch.no_grad()
    def routing_prior(self, x: np.ndarray) -> np.ndarray:
        """pi = mean_x g(x): dense gate probabilities over all K, needing no expert weights."""
        return self.dense_gate(x).mean(0).numpy().astype(np.float64)

    @torch.no_grad()
    def dense_gate(self, x: np.ndarray) -> torch.Tensor:
        """g(x) (B, K): the loaded gate's probabilities over all K experts, no mask, no prior."""
        self.model.eval()
        return self.model.gate_logits(self.model.global_part.trunk(torch.from_numpy(x))).softmax(-1)

    # --- evaluation -------------------------------------------------------------------
    def predict_global(self, x: np.ndarray) -> np.ndarray:
        load_arrays(self.model, self.global_state)
        return predict_probs(self.model, x, use_local=False)

    def predict_personal(self, client_id: str, local_state: Arrays | None, x: np.ndarray) -> np.ndarray:
        """The device's model: server global state, only its assigned experts, its local level."""
        load_arrays(self.model, self.global_state)
        load_arrays(self.model, local_state if local_state is not None else self.fresh_local_state(client_id))
        return predict_probs(self.model, x, expert_mask=self.expert_mask(self.experts_for(client_id)))

    def cold_start_experts(self, x_unlabeled: np.ndarray) -> list[int]:
        """The experts a new device downloads, chosen from its routing prior on its own data."""
        load_arrays(self.model, self.global_state)
        return self.experts_for_prior(self.routing_prior(x_unlabeled))

    def experts_for_prior(self, prior: np.ndarray) -> list[int]:
        """Cold start's download: the fewest experts, by routing prior, that carry
        ``train.cold_start_mass`` of it, never fewer than top_k (docs/design.md, "Cold start").
        A device whose data spreads over more kinds than m experts cover gets them all; one
        whose data is narrow downloads little."""
        return cover_prior(prior, self.model_cfg, self.train_cfg)  # a bundle device's rule too

    def predict_cold(self, x: np.ndarray, x_unlabeled: np.ndarray | None = None) -> np.ndarray:
        """Cold start: experts chosen from the routing prior on ``x_unlabeled`` (the device's
        pool), then the global path over them on ``x``. Without a pool the prior comes from
        ``x`` itself: a deployed device with nothing but the inputs it serves, which nobody
        scores; an evaluation always passes the pool (docs/design.md, "Cold start")."""
        ids = self.cold_start_experts(x if x_unlabeled is None or len(x_unlabeled) == 0 else x_unlabeled)
        return predict_probs(self.model, x, use_local=False, expert_mask=self.expert_mask(ids))

    # --- what a device holds ----------------------------------------------------------
    def device_payload(self, client_id: str,
                       expert_ids: Sequence[int] | None) -> tuple[list[int], Arrays]:
        """Only the experts asked for (default: the device's assignment) plus the gate,
        shared expert and exchanged trunk: partial exchange (docs/design.md)."""
        ids = self.experts_for(client_id) if expert_ids is None else list(expert_ids)
        k = self.model_cfg.num_global_experts
        if not all(isinstance(i, int) and 0 <= i < k for i in ids):
            raise ValueError(f"expert ids must be integers in 0..{k - 1}, got {ids!r:.80}")
        return ids, self.params_for(ids)

    def hold(self, params: Arrays) -> None:
        """A device holds a subset of experts, so its download goes into the network (the
        experts it lacks are masked at prediction), not into the server's global state."""
        load_arrays(self.model, params)

    def predict_held(self, client_id: str, params: Arrays, expert_ids: Sequence[int],
                     local_state: Arrays | None, x: np.ndarray, use_local: bool) -> np.ndarray:
        """Routing restricted to the held experts; the local level from ``local_state`` (a
        fresh one before the device trained) unless ``use_local`` is False (cold path)."""
        self.hold(params)
        if use_local:
            load_arrays(self.model, local_state if local_state is not None
                        else self.fresh_local_state(client_id))
        return predict_probs(self.model, x, use_local=use_local,
                             expert_mask=self.expert_mask(expert_ids))

    def choose_cold_experts(self, params: Arrays, x_unlabeled: np.ndarray) -> list[int]:
        """Routing prior of the downloaded gate on the device's own inputs, then the
        experts that carry ``train.cold_start_mass`` of it (:meth:`experts_for_prior`)."""
        self.hold(params)
        return self.experts_for_prior(self.routing_prior(x_unlabeled))

    def checkpoint_extra(self) -> dict[str, Any]:
        """The EMA affinity matrix: expert assignment and aggregation weights depend on it."""
        doc: dict[str, Any] = {**super().checkpoint_extra(),
                               "affinity": {c: [float(v) for v in np.asarray(r)]
                                            for c, r in sorted(self.affinity.items())}}
        if self.velocity:  # server momentum on: a resumed coordinator keeps its velocity
            doc["server_velocity"] = {n: {"shape": list(v.shape), "data": v.ravel().tolist()}
                                      for n, v in sorted(self.velocity.items())}
        return doc

    def restore_extra(self, doc: Mapping[str, Any]) -> None:
        super().restore_extra(doc)
        self.affinity = {c: np.asarray(r, dtype=np.float64)
                         for c, r in dict(doc.get("affinity", {})).items()}
        self.velocity = {n: np.asarray(v["data"], dtype=np.float64).reshape(v["shape"])
                         for n, v in dict(doc.get("server_velocity", {})).items()}

    # --- diagnostics ------------------------------------------------------------------
    @torch.no_grad()
    def level_outputs(self, client_id: str, local_state: Arrays | None,
                      x: np.ndarray) -> dict[str, np.ndarray]:
        """A device's three predictors on ``x``: the personal mixture, the global path alone
        (its held experts, no local level) and the local experts alone, as probabilities, plus
        the routing weights it uses (B, K)."""
        load_arrays(self.model, self.global_state)
        load_arrays(self.model, local_state if local_state is not None else self.fresh_local_state(client_id))
        self.model.eval()
        out = self.model(torch.from_numpy(x), expert_mask=self.expert_mask(self.experts_for(client_id)))
        levels = {"personal": out.log_probs.exp().numpy(), "global_path": out.global_log_probs.exp().numpy(),
                  "routing": out.routing.numpy()}
        if out.local_log_probs is not None:
            levels["local"] = out.local_log_probs.exp().numpy()
        return levels

    def diagnostics(self, clients: Mapping[str, tuple[np.ndarray, np.ndarray]],
                    local_states: Mapping[str, Arrays | None], x_global: np.ndarray) -> dict[str, Any]:
        """Expert use and what each level adds (docs/design.md, "Diagnostics").

        * ``expert_share`` (K): routing mass per expert over every client's evaluation inputs,
          as devices route them (held experts, top-k); ``routing_matrix`` the same per client;
        * ``global_expert_share`` (K) and ``gate_entropy`` (nats; ``gate_entropy_norm`` divided
          by log K): the aggregated gate over all K on the global evaluation set;
        * ``distinct_expert_sets``: how many different expert sets the clients hold;
        * ``personal_acc``, ``global_path_acc``, ``local_acc``: the personal mixture, the
          global path alone and the local experts alone on the clients' own splits, and
          ``personal_vs_global_path`` = personal - global path.
        """
        k = self.model_cfg.num_global_experts
        rows, sizes = [], []
        correct = {"personal": 0, "global_path": 0, "local": 0}
        total = 0
        for cid, (x, y) in clients.items():
            if len(y) == 0:
                continue
            lv = self.level_outputs(cid, local_states.get(cid), x)
            rows.append(lv["routing"].mean(0))
            sizes.append(len(y))
            for name in correct:
                if name in lv:
                    correct[name] += int((lv[name].argmax(1) == y).sum())
            total += len(y)
        matrix = np.stack(rows) if rows else np.zeros((0, k))
        share = (np.average(matrix, axis=0, weights=sizes) if rows else np.full(k, np.nan))
        load_arrays(self.model, self.global_state)
        g = self.dense_gate(x_global)
        routing = topk_routing(g, self.model_cfg.top_k)
        entropy = float(-(g * g.clamp_min(1e-12).log()).sum(-1).mean())
        accs = {name: (c / total if total else float("nan")) for name, c in correct.items()}
        has_local = self.model_cfg.num_local_experts > 0
        return {
            "expert_share": share.tolist(),
            "global_expert_share": routing.mean(0).tolist(),
            "gate_entropy": entropy,
            "gate_entropy_norm": entropy / float(np.log(k)) if k > 1 else 0.0,
            "distinct_expert_sets": len({tuple(self.experts_for(c)) for c in clients}),
            "personal_acc": accs["personal"],
            "global_path_acc": accs["global_path"],
            "local_acc": accs["local"] if has_local else float("nan"),
            "personal_vs_global_path": accs["personal"] - accs["global_path"],
            "routing_matrix": matrix.tolist(),
        }

