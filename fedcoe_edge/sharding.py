"""Aggregation past one machine: which shard owns a device, and what a shard sends its leader.

A fleet that outgrows one coordinator runs several *shard aggregators*, each serving the
devices whose id hashes to it, and one *leader* that owns client selection, the strategy's
server state (affinity matrix, model version) and the aggregation (docs/daemons.md, "Past one
machine: leader and shard aggregators"). A shard folds its devices' accepted updates into a
:class:`~fedcoe_edge.streaming.Partial` with the strategy's own rule (``Strategy.fold``)
exactly as a single coordinator does, and sends that partial (weighted sums and weights,
signed) to the leader; the leader combines the partials with ``Strategy.merge`` (sums of
disjoint client sets add exactly, per-client rows concatenate) and finalizes, so its result
is the single coordinator's up to float rounding.

This module is the pure half both daemons share: the stable shard hash, the names and keys
of shards, the leader's topics, the partial's wire form and the checks every received
partial passes before it is merged. No transport, no threads: everything here is tested
without a broker.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcoe_edge.errors import ValidationError, WireError
from fedcoe_edge.streaming import Partial
from fedcoe_edge.transport.topics import check_id
from fedcoe_edge.wire import decode_tensor_metadata, decode_tensors, encode_tensors, parse_json

__all__ = [
    "MAX_SHARDS", "LEADER_ID", "SHARD_HELLO", "SHARD_OPEN", "SHARD_MODEL", "PARTIAL", "MODEL_EXTRA",
    "shard_of", "shard_federation", "shard_name", "shard_index", "shard_key", "LeaderTopics",
    "partial_to_wire", "partial_from_wire", "model_extra", "check_partial", "PartialInbox",
]

MAX_SHARDS = 1024  # a bound for config checks; a broker cluster runs far fewer aggregators
LEADER_ID = "leader"  # the leader's envelope sender name
# control message types between the leader and its shards (envelope.type)
SHARD_HELLO = "shard_hello"  # shard -> leader: I am up, these devices are online, my version
SHARD_OPEN = "shard_open"  # leader -> shard: round r is open, these are your devices' tasks
SHARD_MODEL = "shard_model"  # leader -> shard: the global state of version v (blob manifest)
PARTIAL = "partial"  # shard -> leader: round r's partial sums (blob manifest) and failures
# metadata key of a shard_model transfer holding the strategy's server extras as JSON: they
# grow with the fleet (one affinity row per client), so they travel in the transfer, not in
# the 1 MiB signed envelope (docs/daemons.md, "Past one machine: leader and shard aggregators")
MODEL_EXTRA = "extra"


def _check_count(shards: int) -> None:
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an integer in 1..{MAX_SHARDS}, got {shards!r}")


def shard_of(device_id: str, shards: int) -> int:
    """The shard that owns ``device_id``: sha256 of the id (UTF-8), first 8 bytes as a
    big-endian integer, mod ``shards``. Stable across processes, hosts and Python versions
    (unlike ``hash()``), so a device, its shard and the leader agree without a table."""
    _check_count(shards)
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_federation(federation: str, index: int, shards: int) -> str:
    """The federation id a shard's devices use, e.g. ``demo.s1of3``: their topics live under
    ``fl/v1/demo.s1of3/``. Naming the shard count makes a device configured for another
    layout talk to nobody (its hello goes unanswered) instead of to the wrong shard."""
    _check_count(shards)
    if not 0 <= index < shards:
        raise ValueError(f"shard index must be in 0..{shards - 1}, got {index}")
    return check_id(f"{federation}.s{index}of{shards}", "shard federation id")


def shard_name(index: int) -> str:
    """Envelope sender name of shard ``index`` towards its leader."""
    return f"shard-{index}"


def shard_index(name: str, shards: int) -> int | None:
    """The index in a shard name (``shard-2`` -> 2), None when it names no shard of this
    layout: what the leader asks before it looks up a key."""
    head, _, tail = name.partition("-")
    if head != "shard" or not tail.isdigit() or str(int(tail)) != tail:
        return None
    i = int(tail)
    return i if i < shards else None


def shard_key(secret: bytes, name: str) -> bytes:
    """Per-shard HMAC key derived from the federation secret the same way device keys are
    (``fedcoe_edge.protocol.device_key``), under its own label: a shard key never equals a
    device key, and neither reveals the secret."""
    return hmac.new(secret, b"fedcoe-shard:" + name.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class LeaderTopics:
    """The leader's channel, under ``fl/v1/{federation}/agg``: ``dn`` leader -> shard,
    ``up`` shard -> leader, each with a ``ctl`` topic and chunked ``blob`` topics, as the
    device channel has. Devices never subscribe here."""

    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, "federation id")

    @property
    def prefix(self) -> str:
        return f"fl/v1/{self.federation}/agg"

    def dn_ctl(self, shard: str) -> str:
        return f"{self.prefix}/dn/{check_id(shard, 'shard name')}/ctl"

    def dn_blob(self, shard: str, xfer: str) -> str:
        return f"{self.prefix}/dn/{check_id(shard, 'shard name')}/blob/{check_id(xfer, 'transfer id')}"

    def up_ctl(self, shard: str) -> str:
        return f"{self.prefix}/up/{check_id(shard, 'shard name')}/ctl"

    def up_blob(self, shard: str, xfer: str) -> str:
        return f"{self.prefix}/up/{check_id(shard, 'shard name')}/blob/{check_id(xfer, 'transfer id')}"

    def leader_status(self) -> str:
        """Leader presence (retained, last-will offline): a shard says hello when it reads online."""
        return f"{self.prefix}/leader/status"

    def leader_filters(self) -> list[str]:
        return [f"{self.prefix}/up/+/ctl", f"{self.prefix}/up/+/blob/+"]

    def shard_filters(self, shard: str) -> list[str]:
        return [f"{self.prefix}/dn/{check_id(shard, 'shard name')}/#", self.leader_status()]

    def parse(self, topic: str) -> tuple[str, str, str | None]:
        """``(direction, shard, transfer id or None)``; WireError for anything else."""
        head = self.prefix + "/"
        parts = topic[len(head):].split("/") if topic.startswith(head) else []
        if len(parts) >= 3 and parts[0] in ("dn", "up"):
            shard, rest = parts[1], parts[2:]
            check_id(shard, "shard name")
            if rest == ["ctl"]:
                return parts[0], shard, None
            if len(rest) == 2 and rest[0] == "blob":
                return parts[0], shard, check_id(rest[1], "transfer id")
        raise WireError(f"topic {topic!r}: not a leader/shard topic under {self.prefix!r}")


# --- the partial on the wire ----------------------------------------------------------------
def partial_to_wire(partial: Partial) -> tuple[bytes, dict[str, str]]:
    """Safetensors bytes: the sums, with the string metadata (round, clients, affinity rows)
    as the payload's own ``__metadata__``, and what the signed envelope carries of it (nothing:
    the rows grow with the shard's devices and passed the envelope's 1 MiB limit at about
    10,000 devices). The bytes are bound to the envelope by the signed manifest's sha256."""
    arrays, meta = partial.to_arrays()
    return encode_tensors(arrays, metadata=meta), {}


def model_extra(data: bytes, sent: Mapping[str, object]) -> dict[str, object]:
    """The server extras of a ``shard_model`` transfer: its ``extra`` metadata (JSON of an
    object), or ``sent`` (the envelope's) when the payload has none. ValidationError in one
    line for anything else."""
    try:
        text = decode_tensor_metadata(data).get(MODEL_EXTRA)
    except WireError as exc:
        raise ValidationError(f"shard_model: {exc}") from None
    if text is None:
        return dict(sent)
    try:
        extra = parse_json(text.encode("utf-8"), "shard_model extra")
    except WireError as exc:
        raise ValidationError(str(exc)) from None
    if not isinstance(extra, dict):
        raise ValidationError("shard_model extra must be a JSON object")
    return extra


def partial_from_wire(data: bytes, meta: Mapping[str, object]) -> Partial:
    """Parse what :func:`partial_to_wire` wrote; ValidationError with a one-line reason for
    anything malformed (never an arbitrary exception from deep inside)."""
    if not isinstance(meta, Mapping) or not all(isinstance(v, str) for v in meta.values()):
        raise ValidationError("partial metadata must be an object of strings")
    try:
        if not meta:  # in the payload (partial_to_wire), not in the envelope
            meta = decode_tensor_metadata(data)
        arrays = decode_tensors(data)
        return Partial.from_arrays(arrays, {str(k): str(v) for k, v in meta.items()})
    except (WireError, KeyError, ValueError, TypeError) as exc:
        raise ValidationError(f"malformed partial: {exc}"[:300]) from None


def _finite_nonneg(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x >= 0


def check_partial(p: Partial, *, rnd: int, allowed: Iterable[str], template: Partial,
                  state: Mapping[str, np.ndarray]) -> None:
    """Everything a received partial must satisfy before the leader merges it; raises
    ValidationError naming the first problem.

    ``template`` is an empty partial of the strategy (``Strategy.new_partial``): the received
    one must have the same structure (dense only, or dense + expert sums + routing share,
    and the same extra state: ``extra_sums`` of the template's shapes, ``extra_rows`` with
    the template's row shape and one row per client). ``state`` is the global state the sums
    are over: every summed tensor must be one of its names with its shape, every value
    finite (a NaN would poison every shard's result). ``allowed`` are the clients the leader
    gave this shard in round ``rnd``."""
    if p.round != rnd:
        raise ValidationError(f"partial is for round {p.round}, the open round is {rnd}")
    allowed_set = set(allowed)
    members = set(p.clients)
    if len(members) != len(p.clients):
        raise ValidationError("partial lists a client twice")
    stray = [c for c in p.clients if c not in allowed_set]
    if stray:
        raise ValidationError(f"partial counts client(s) not selected on this shard: {stray[:3]}")
    if not _finite_nonneg(p.samples):
        raise ValidationError("partial samples must be finite and >= 0")
    if (p.experts is None) != (template.experts is None) or (p.share is None) != (template.share is None):
        raise ValidationError("partial structure does not match the strategy's aggregation rule")
    sums = [("dense", p.dense)]
    if p.experts is not None and template.experts is not None:
        if p.experts.num_experts != template.experts.num_experts:
            raise ValidationError(f"partial has {p.experts.num_experts} experts, "
                                  f"the model {template.experts.num_experts}")
        sums += [(f"expert {k}", s) for k, s in enumerate(p.experts.by_affinity)]
        sums += [(f"expert {k} (by samples)", s) for k, s in enumerate(p.experts.by_samples)]
    for what, s in sums:
        if not _finite_nonneg(s.weight) or s.count < 0 or s.count > len(p.clients):
            raise ValidationError(f"partial {what}: weight/count out of range")
        if s.weight > 0 and not s.sums:
            raise ValidationError(f"partial {what}: a weight without sums")
        for name, arr in s.sums.items():
            ref = state.get(name)
            if ref is None:
                raise ValidationError(f"partial {what}: tensor {name!r:.80} is not in the global state")
            if tuple(arr.shape) != tuple(np.shape(ref)):
                raise ValidationError(f"partial {what}: tensor {name!r:.80} has shape "
                                      f"{list(arr.shape)}, expected {list(np.shape(ref))}")
            if not np.all(np.isfinite(arr)):
                raise ValidationError(f"partial {what}: tensor {name!r:.80} has non-finite values")
    _check_extra(p, template)
    if p.share is not None and template.share is not None and (
            p.share.shape != template.share.shape or not np.all(np.isfinite(p.share))
            or np.any(p.share < 0)):
        raise ValidationError("partial routing share must be finite, >= 0, one per expert")
    width = template.share.shape[0] if template.share is not None else None
    for cid, row in p.affinity.items():
        if cid not in members:
            raise ValidationError(f"partial has an affinity row for {cid!r:.40}, not one of its clients")
        if (not isinstance(row, list) or (width is not None and len(row) != width)
                or not all(_finite_nonneg(v) for v in row)):
            raise ValidationError(f"partial affinity row of {cid!r:.40} must be {width} finite numbers >= 0")


def _check_extra(p: Partial, template: Partial) -> None:
    """A strategy's extra state: the template's names, shapes (rows: one per client) and
    dtypes, finite values."""
    for what, got, want in (("sums", p.extra_sums, template.extra_sums),
                            ("rows", p.extra_rows, template.extra_rows)):
        if set(got) != set(want):
            raise ValidationError(f"partial extra {what} {sorted(got)[:3]} differ from the "
                                  f"strategy's {sorted(want)[:3]}")
        for name, arr in got.items():
            ref = want[name]
            shape = ((len(p.clients), *ref.shape[1:]) if what == "rows" else ref.shape)
            if tuple(arr.shape) != tuple(shape) or arr.dtype != ref.dtype:
                raise ValidationError(f"partial extra {what} {name!r:.80}: {arr.dtype}{list(arr.shape)}, "
                                      f"expected {ref.dtype}{list(shape)}")
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                raise ValidationError(f"partial extra {what} {name!r:.80} has non-finite values")


@dataclass
class PartialInbox:
    """The leader's book of one round: which shard was asked for which clients, whose
    partial came in. :meth:`refusal` answers why a partial must be refused before it is
    even parsed (unknown shard, another round, a second one from the same shard)."""

    round: int
    expected: dict[str, list[str]]  # shard name -> the clients it was given this round
    received: dict[str, Partial] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # client -> reason, as the shards said

    def refusal(self, shard: str, rnd: int) -> str | None:
        if shard not in self.expected:
            return f"unknown shard {shard!r:.40}"
        if rnd != self.round:
            late = "late" if rnd < self.round else "early"
            return f"partial for round {rnd} ({late}; the open round is {self.round})"
        if shard in self.received:
            return f"duplicate partial for round {rnd} (one already merged from this shard)"
        return None

    def accept(self, shard: str, partial: Partial, failures: Mapping[str, str]) -> None:
        self.received[shard] = partial
        own = set(self.expected[shard])
        self.failures.update({c: str(r)[:300] for c, r in failures.items() if c in own})

    @property
    def complete(self) -> bool:
        return set(self.received) >= set(self.expected)

    def missing(self) -> list[str]:
        return sorted(set(self.expected) - set(self.received))

    def round_failures(self, merged_clients: Sequence[str]) -> dict[str, str]:
        """Every selected client without a merged update, with the reason: what its shard
        reported, or that its shard's partial never came (or was refused)."""
        done = set(merged_clients)
        out: dict[str, str] = {}
        for shard, clients in sorted(self.expected.items()):
            for c in clients:
                if c in done:
                    continue
                if shard not in self.received:
                    out[c] = f"no partial from {shard} (missing or refused)"
                else:
                    out[c] = self.failures.get(c, "deadline passed with no accepted update")
        return out

