"""Typed bodies of the control messages: one frozen dataclass per message type.

An envelope (``fedcoe_edge.wire.envelope``) authenticates who sent a body; this module says
what the body may hold. Each class has one :meth:`from_wire` that checks every field it
knows (type, range, finiteness, length) and raises :class:`MessageError` with a one-line
reason naming the field, so a daemon refuses that message alone and never indexes a
``dict[str, Any]`` from the network. Members a class does not know are ignored, so a newer
peer may add optional fields. ``to_wire()`` gives the body a sender puts in its envelope.

docs/protocol.md, section 3 ("Message bodies") lists every class from these definitions
(``tests/test_messages.py`` checks the list is complete) and section 9 ("Bounds") the
limits below.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from fedcoe_edge.errors import WireError
from fedcoe_edge.wire import MAX_JSON_INT, MAX_NACK, TransferManifest
from fedcoe_edge.wire.common import ID_RE

MAX_SAMPLES = 10**9  # a device's claimed training samples (num_samples, eval totals)
MAX_EXPERTS = 4096  # expert ids and affinity entries in one message
MAX_METRICS = 64  # entries of a result's metrics
MAX_NAME = 64  # a metric name, a class name, a tier
MAX_REASON = 500  # a decline's or a reject's reason (longer ones are refused / cut)
MAX_CLASSES = 10_000
MAX_DEADLINE_S = 30 * 24 * 3600.0
_HEX_RE = re.compile(r"^[0-9a-f]+$")
SHARED_ID_LEN = 32  # hex digits of a shared download's id: a prefix of its sha256
MAX_SHARED_CHUNK = 16 * 2**20  # bytes per shared chunk (a broker's packet limit is lower)
MAX_SHARED_CHUNKS = 65536  # chunks per shared download

M = TypeVar("M", bound="Body")


class MessageError(WireError):
    """A message body that fails its :meth:`Body.from_wire` check."""


# --- field readers: each raises MessageError naming the message and the field ------------
def _where(cls: type, name: str) -> str:
    return f"{getattr(cls, 'TYPE', cls.__name__)}.{name}"


def _get(body: Mapping[str, Any], cls: type, name: str, required: bool) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise MessageError(f"{_where(cls, name)}: missing")
        return None
    return body[name]


def _int(body: Mapping[str, Any], cls: type, name: str, lo: int = 0, hi: int = MAX_JSON_INT,
         required: bool = True) -> int | None:
    v = _get(body, cls, name, required)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool):
        raise MessageError(f"{_where(cls, name)}: must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise MessageError(f"{_where(cls, name)}: {v} outside {lo}..{hi}")
    return v


def _num(body: Mapping[str, Any], cls: type, name: str, lo: float = 0.0,
         hi: float = 1e300, required: bool = True) -> float | None:
    v = _get(body, cls, name, required)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise MessageError(f"{_where(cls, name)}: must be a number, got {type(v).__name__}")
    x = float(v) if abs(v) <= 1e300 else math.inf
    if not math.isfinite(x) or not lo <= x <= hi:
        raise MessageError(f"{_where(cls, name)}: {v!r:.40} outside {lo:g}..{hi:g}")
    return x


def _str(body: Mapping[str, Any], cls: type, name: str, max_len: int = MAX_NAME,
         choices: tuple[str, ...] | None = None, pattern: re.Pattern[str] | None = None,
         required: bool = True) -> str | None:
    v = _get(body, cls, name, required)
    if v is None:
        return None
    if not isinstance(v, str):
        raise MessageError(f"{_where(cls, name)}: must be a string, got {type(v).__name__}")
    if choices is not None and v not in choices:
        raise MessageError(f"{_where(cls, name)}: must be {'|'.join(choices)}, got {v!r:.40}")
    if len(v) > max_len:
        raise MessageError(f"{_where(cls, name)}: {len(v)} characters (at most {max_len})")
    if pattern is not None and not pattern.match(v):
        raise MessageError(f"{_where(cls, name)}: {v!r:.40} does not match {pattern.pattern}")
    return v


def _bool(body: Mapping[str, Any], cls: type, name: str) -> bool:
    v = _get(body, cls, name, True)
    if not isinstance(v, bool):
        raise MessageError(f"{_where(cls, name)}: must be true or false")
    return v


def _ints(body: Mapping[str, Any], cls: type, name: str, lo: int, hi: int,
          max_len: int = MAX_EXPERTS, required: bool = True) -> tuple[int, ...] | None:
    v = _get(body, cls, name, required)
    if v is None:
        return None
    if not isinstance(v, list) or len(v) > max_len:
        raise MessageError(f"{_where(cls, name)}: must be a list of at most {max_len} integers")
    for i in v:
        if not isinstance(i, int) or isinstance(i, bool) or not lo <= i <= hi:
            raise MessageError(f"{_where(cls, name)}: must hold integers in {lo}..{hi}, got {i!r:.40}")
    return tuple(v)


def _obj(body: Mapping[str, Any], cls: type, name: str, required: bool = True
         ) -> dict[str, Any] | None:
    v = _get(body, cls, name, required)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise MessageError(f"{_where(cls, name)}: must be an object")
    return v


def _shared(body: Mapping[str, Any], cls: type) -> SharedRef | None:
    v = _obj(body, cls, "shared", required=False)
    return None if v is None else SharedRef.from_wire(v)


def _manifest(body: Mapping[str, Any], cls: type) -> TransferManifest:
    try:
        return TransferManifest.from_dict(body.get("manifest"))
    except WireError as exc:
        raise MessageError(f"{_where(cls, 'manifest')}: {exc}") from None


class Body:
    """Base of every message body: ``TYPE`` is the envelope type it travels as."""

    TYPE: ClassVar[str] = ""

    @classmethod
    def from_wire(cls: type[M], body: Any) -> M:
        """Check ``body`` (an envelope's body) and build the message; MessageError if not."""
        if not isinstance(body, dict):
            raise MessageError(f"{cls.TYPE}: body must be an object")
        return cls._parse(body)

    @classmethod
    def _parse(cls: type[M], body: dict[str, Any]) -> M:
        raise NotImplementedError

    def to_wire(self) -> dict[str, Any]:
        """The body as plain JSON (tuples as lists, manifests as dicts)."""
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, TransferManifest):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Body):
                v = v.to_wire()
            out[f.name] = v
        return out


# --- device -> coordinator -------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Body):
    """A device (re)registers: its role and what it can do."""

    TYPE: ClassVar[str] = "hello"
    role: str = "train"
    tier: str | None = None
    memory_mb: float | None = None
    num_samples: int | None = None
    label_hist: tuple[int, ...] | None = None
    runtime: str | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Hello:
        return cls(role=_str(b, cls, "role", choices=("train", "cold"), required=False) or "train",
                   tier=_str(b, cls, "tier", required=False),
                   memory_mb=_num(b, cls, "memory_mb", 0.0, 1e9, required=False),
                   num_samples=_int(b, cls, "num_samples", 0, MAX_SAMPLES, required=False),
                   label_hist=_ints(b, cls, "label_hist", 0, MAX_SAMPLES, MAX_CLASSES,
                                    required=False),
                   runtime=_str(b, cls, "runtime", required=False))

    def capabilities(self) -> dict[str, Any]:
        """What the registry stores (``devices.capabilities``)."""
        return self.to_wire()


@dataclass(frozen=True)
class Result(Body):
    """A trained update's announce: the upload's manifest and what the device reports."""

    TYPE: ClassVar[str] = "result"
    manifest: TransferManifest
    num_samples: int
    affinity: tuple[float, ...] | None = None
    metrics: tuple[tuple[str, float], ...] = ()

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Result:
        manifest = _manifest(b, cls)
        n = _int(b, cls, "num_samples", 1, MAX_SAMPLES)
        assert n is not None
        aff = _get(b, cls, "affinity", False)
        affinity = None
        if aff is not None:
            if not isinstance(aff, list) or len(aff) > MAX_EXPERTS:
                raise MessageError(f"result.affinity: must be a list of at most {MAX_EXPERTS} numbers")
            affinity = tuple(_num({"affinity": a}, cls, "affinity", 0.0, 1e300) or 0.0
                             for a in aff)
        metrics = _obj(b, cls, "metrics", required=False) or {}
        if len(metrics) > MAX_METRICS:
            raise MessageError(f"result.metrics: {len(metrics)} entries (at most {MAX_METRICS})")
        clean = []
        for k, v in sorted(metrics.items()):
            if len(k) > MAX_NAME:
                raise MessageError(f"result.metrics: name of {len(k)} characters (at most {MAX_NAME})")
            x = _num({f"metrics.{k}": v}, cls, f"metrics.{k}", -1e300, 1e300)
            assert x is not None
            clean.append((k, x))
        return cls(manifest, n, affinity, tuple(clean))

    def metrics_dict(self) -> dict[str, float]:
        return dict(self.metrics)

    def to_wire(self) -> dict[str, Any]:
        return {"manifest": self.manifest.to_dict(), "num_samples": self.num_samples,
                "affinity": None if self.affinity is None else list(self.affinity),
                "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class Fetch(Body):
    """Send me parameters: the gate (``[]``), given experts, what the strategy assigns
    (``expert_ids`` null), or the pretrained trunk file (``purpose`` trunk)."""

    TYPE: ClassVar[str] = "fetch"
    purpose: str = "refresh"
    expert_ids: tuple[int, ...] | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Fetch:
        purpose = _str(b, cls, "purpose", choices=("refresh", "gate", "cold", "trunk"),
                       required=False) or "refresh"
        return cls(purpose, _ints(b, cls, "expert_ids", 0, MAX_EXPERTS - 1, required=False))


@dataclass(frozen=True)
class Eval(Body):
    """A device's accuracy on its own test data after a round (or its cold start)."""

    TYPE: ClassVar[str] = "eval"
    kind: str
    correct: int
    total: int

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Eval:
        kind = _str(b, cls, "kind", choices=("personal", "cold"))
        total = _int(b, cls, "total", 0, MAX_SAMPLES)
        assert kind is not None and total is not None
        correct = _int(b, cls, "correct", 0, total)
        assert correct is not None
        return cls(kind, correct, total)


@dataclass(frozen=True)
class Decline(Body):
    """This device cannot train the federation's task; the reason, cut to MAX_REASON."""

    TYPE: ClassVar[str] = "decline"
    reason: str = ""

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Decline:
        return cls(_str(b, cls, "reason", max_len=4 * MAX_REASON, required=False) or "")

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", self.reason[:MAX_REASON])


@dataclass(frozen=True)
class BundleStatus(Body):
    """The last int8 bundle rebuild, inside a heartbeat."""

    TYPE: ClassVar[str] = "hb.bundle"
    round: int
    ok: bool
    error: str | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> BundleStatus:
        rnd = _int(b, cls, "round", -1, MAX_JSON_INT)
        assert rnd is not None
        return cls(rnd, _bool(b, cls, "ok"), _str(b, cls, "error", max_len=200, required=False))


@dataclass(frozen=True)
class Heartbeat(Body):
    """Telemetry on ``up/{dev}/hb``: memory, load, rounds done, the last bundle rebuild."""

    TYPE: ClassVar[str] = "hb"
    rss_mb: float | None = None
    load: float | None = None
    rounds_done: int | None = None
    bundle: BundleStatus | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Heartbeat:
        bundle = _obj(b, cls, "bundle", required=False)
        return cls(_num(b, cls, "rss_mb", 0.0, 1e9, required=False),
                   _num(b, cls, "load", 0.0, 1e6, required=False),
                   _int(b, cls, "rounds_done", 0, MAX_JSON_INT, required=False),
                   None if bundle is None else BundleStatus.from_wire(bundle))

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_wire().items() if v is not None}


# --- transfer reports (both directions) -----------------------------------------------
@dataclass(frozen=True)
class XferProgress(Body):
    """A receiver's progress / NACK report (``Reassembler.progress``)."""

    TYPE: ClassVar[str] = "xfer_progress"
    xfer: str
    next: int
    highest: int
    missing: tuple[int, ...] = ()
    received: int | None = None
    resets: int = 0

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> XferProgress:
        xfer = _str(b, cls, "xfer", max_len=128, pattern=ID_RE)
        nxt = _int(b, cls, "next", 0, MAX_JSON_INT)
        highest = _int(b, cls, "highest", -1, MAX_JSON_INT)
        missing = _ints(b, cls, "missing", 0, MAX_JSON_INT, max_len=MAX_NACK,
                       required=False) or ()
        assert xfer is not None and nxt is not None and highest is not None
        return cls(xfer, nxt, highest, missing,
                   _int(b, cls, "received", 0, MAX_JSON_INT, required=False),
                   _int(b, cls, "resets", 0, MAX_JSON_INT, required=False) or 0)


@dataclass(frozen=True)
class XferDone(Body):
    """A receiver's final ACK: every chunk in, this sha256."""

    TYPE: ClassVar[str] = "xfer_done"
    xfer: str
    sha256: str = ""

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> XferDone:
        xfer = _str(b, cls, "xfer", max_len=128, pattern=ID_RE)
        assert xfer is not None
        return cls(xfer, _str(b, cls, "sha256", max_len=64, required=False) or "")


# --- coordinator -> device -------------------------------------------------------------
@dataclass(frozen=True)
class Welcome(Body):
    """The federation's terms for a device that said hello (signed with its own key)."""

    TYPE: ClassVar[str] = "welcome"
    algorithm: str
    seed: int
    model: dict[str, Any] = field(hash=False)  # ModelConfig.from_dict checks it
    train: dict[str, Any] = field(hash=False)  # TrainConfig.from_dict checks it
    bc_key: str
    version: int
    round: int
    rounds: int
    round_open: bool = False
    classes: tuple[str, ...] = ()

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Welcome:
        key = _str(b, cls, "bc_key", max_len=256, pattern=_HEX_RE)
        assert key is not None
        if len(key) < 32 or len(key) % 2:
            raise MessageError("welcome.bc_key: must be an even number (>= 32) of hex digits")
        classes = _get(b, cls, "classes", False) or []
        if (not isinstance(classes, list) or len(classes) > MAX_CLASSES
                or not all(isinstance(c, str) and len(c) <= 256 for c in classes)):
            raise MessageError(f"welcome.classes: must be at most {MAX_CLASSES} strings")
        return cls(_str(b, cls, "algorithm") or "", _int(b, cls, "seed", -MAX_JSON_INT) or 0,
                   _obj(b, cls, "model") or {}, _obj(b, cls, "train") or {}, key,
                   _int(b, cls, "version") or 0, _int(b, cls, "round") or 0,
                   _int(b, cls, "rounds") or 0,
                   bool(_get(b, cls, "round_open", False)), tuple(classes))

    def to_wire(self) -> dict[str, Any]:
        out = super().to_wire()
        out["classes"] = list(self.classes)
        return out


@dataclass(frozen=True)
class SharedRef(Body):
    """Where a download's bytes are published once for every device of the federation
    (docs/protocol.md, "Shared downloads"): ``id`` (the first 32 hex digits of the payload's
    sha256, so the id alone names the bytes), and their chunking on the shared topics. The
    size and the sha256 the device checks are the signed manifest's, never the chunks'."""

    TYPE: ClassVar[str] = "task.shared"
    id: str
    chunk_size: int
    chunk_count: int

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> SharedRef:
        sid = _str(b, cls, "id", max_len=SHARED_ID_LEN, pattern=_HEX_RE) or ""
        if len(sid) != SHARED_ID_LEN:
            raise MessageError(f"{_where(cls, 'id')}: must be {SHARED_ID_LEN} hex digits")
        return cls(sid, _int(b, cls, "chunk_size", 1, MAX_SHARED_CHUNK) or 1,
                   _int(b, cls, "chunk_count", 1, MAX_SHARED_CHUNKS) or 1)

    def manifest_for(self, manifest: TransferManifest) -> TransferManifest:
        """The manifest the shared chunks are reassembled under: the signed ``manifest``'s
        size, hash and encoding, this id and chunking (WireError when they disagree, or
        when this id is not the manifest's hash: a device never assembles bytes its
        envelope did not name)."""
        if manifest.sha256[:SHARED_ID_LEN] != self.id:
            raise WireError(f"shared download {self.id}: not the payload of sha256 "
                            f"{manifest.sha256[:12]}... named by the signed manifest")
        m = dataclasses.replace(manifest, transfer_id=self.id, chunk_size=self.chunk_size,
                                chunk_count=self.chunk_count)
        m.check()
        return m


@dataclass(frozen=True)
class Task(Body):
    """A round's task: the download's manifest, the experts in it, the time left."""

    TYPE: ClassVar[str] = "task"
    manifest: TransferManifest
    expert_ids: tuple[int, ...]
    version: int
    deadline_s: float
    config: dict[str, Any] = field(hash=False)  # numbers and strings only
    shared: SharedRef | None = None  # the bytes on the shared topics, when published there

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Task:
        config = _obj(b, cls, "config", required=False) or {}
        for k, v in config.items():
            if not isinstance(v, int | float | str) or (isinstance(v, float) and not math.isfinite(v)):
                raise MessageError(f"task.config.{k:.40}: must be a number or a string")
        return cls(_manifest(b, cls), _ints(b, cls, "expert_ids", 0, MAX_EXPERTS - 1) or (),
                   _int(b, cls, "version") or 0,
                   _num(b, cls, "deadline_s", 0.0, MAX_DEADLINE_S) or 0.0, config,
                   _shared(b, cls))

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_wire().items() if k != "shared" or v is not None}


@dataclass(frozen=True)
class Model(Body):
    """The answer to a fetch: the download's manifest and what it holds."""

    TYPE: ClassVar[str] = "model"
    manifest: TransferManifest
    expert_ids: tuple[int, ...]
    version: int
    purpose: str
    shared: SharedRef | None = None  # as in Task

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Model:
        return cls(_manifest(b, cls), _ints(b, cls, "expert_ids", 0, MAX_EXPERTS - 1) or (),
                   _int(b, cls, "version") or 0,
                   _str(b, cls, "purpose", choices=("refresh", "gate", "cold", "trunk")) or "",
                   _shared(b, cls))

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_wire().items() if k != "shared" or v is not None}


@dataclass(frozen=True)
class Accept(Body):
    """An update is persisted (``xfer``: its upload)."""

    TYPE: ClassVar[str] = "accept"
    xfer: str | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Accept:
        return cls(_str(b, cls, "xfer", max_len=128, pattern=ID_RE, required=False))


@dataclass(frozen=True)
class Reject(Body):
    """An input refused, with the reason (``xfer`` when it refuses an upload)."""

    TYPE: ClassVar[str] = "reject"
    reason: str = ""
    xfer: str | None = None

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Reject:
        return cls(_str(b, cls, "reason", max_len=2 * MAX_REASON, required=False) or "",
                   _str(b, cls, "xfer", max_len=128, pattern=ID_RE, required=False))


@dataclass(frozen=True)
class EvalAck(Body):
    """That eval (kind, envelope round) is stored."""

    TYPE: ClassVar[str] = "eval_ack"
    kind: str

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> EvalAck:
        return cls(_str(b, cls, "kind", choices=("personal", "cold")) or "")


@dataclass(frozen=True)
class XferUnknown(Body):
    """Chunks of an upload the coordinator does not know: re-announce it."""

    TYPE: ClassVar[str] = "xfer_unknown"
    xfer: str

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> XferUnknown:
        return cls(_str(b, cls, "xfer", max_len=128, pattern=ID_RE) or "")


@dataclass(frozen=True)
class Refused(Body):
    """This device is not (or no longer) allowed in the federation, and why: nothing it
    sends will be accepted, so the agent stops with its own exit code instead of retrying
    (docs/daemons.md, "Adding and removing devices"). Signed with the device's own key,
    so only the coordinator holding the federation secret can send it."""

    TYPE: ClassVar[str] = "refused"
    reason: str

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Refused:
        return cls(_str(b, cls, "reason", max_len=2 * MAX_REASON) or "")


@dataclass(frozen=True)
class Status(Body):
    """The coordinator's broadcast on ``bc/ctl``: round state and version."""

    TYPE: ClassVar[str] = "status"
    state: str
    round: int
    version: int
    rounds: int

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> Status:
        return cls(_str(b, cls, "state", choices=("idle", "open", "closed", "finished")) or "",
                   _int(b, cls, "round") or 0, _int(b, cls, "version") or 0,
                   _int(b, cls, "rounds") or 0)


# --- shard <-> leader ------------------------------------------------------------------
@dataclass(frozen=True)
class ShardHello(Body):
    """A shard aggregator is up: its devices online, its version, its shard count."""

    TYPE: ClassVar[str] = "shard_hello"
    online: tuple[str, ...]
    shards: int
    version: int = -1
    round: int = 0
    session: str = ""

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> ShardHello:
        online = _get(b, cls, "online", True)
        if not isinstance(online, list) or not all(isinstance(d, str) and ID_RE.match(d)
                                                   for d in online):
            raise MessageError("shard_hello.online: must be a list of device ids")
        version = _int(b, cls, "version", -1, MAX_JSON_INT, required=False)
        return cls(tuple(online), _int(b, cls, "shards", 1, 1 << 16) or 1,
                   -1 if version is None else version,
                   _int(b, cls, "round", required=False) or 0,
                   _str(b, cls, "session", required=False) or "")


@dataclass(frozen=True)
class PartialAnnounce(Body):
    """A shard's partial sums for a round: the blob's manifest, the sums' meta, the
    failures it saw (device -> reason)."""

    TYPE: ClassVar[str] = "partial"
    manifest: TransferManifest
    meta: dict[str, str] = field(hash=False)
    failures: dict[str, str] = field(hash=False)

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> PartialAnnounce:
        meta = _obj(b, cls, "meta", required=False) or {}
        failures = _obj(b, cls, "failures", required=False) or {}
        for name, d in (("meta", meta), ("failures", failures)):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
                raise MessageError(f"partial.{name}: must map strings to strings")
        return cls(_manifest(b, cls), meta, failures)


@dataclass(frozen=True)
class ShardTask(Body):
    """One device's task inside a ``shard_open``: device, experts, key set, config."""

    TYPE: ClassVar[str] = "shard_open.task"
    d: str
    e: tuple[int, ...]
    k: int
    c: dict[str, Any] = field(hash=False)

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> ShardTask:
        config = _obj(b, cls, "c", required=False) or {}
        if not all(isinstance(v, int | float | str) for v in config.values()):
            raise MessageError("shard_open.task.c: must map names to numbers or strings")
        return cls(_str(b, cls, "d", max_len=128, pattern=ID_RE) or "",
                   _ints(b, cls, "e", 0, MAX_EXPERTS - 1) or (),
                   _int(b, cls, "k", 0, MAX_EXPERTS) or 0, config)


@dataclass(frozen=True)
class ShardOpen(Body):
    """The leader opens a round at a shard: its devices' tasks, each naming one of the
    ``keysets`` (the global tensors its parameters are made of)."""

    TYPE: ClassVar[str] = "shard_open"
    version: int
    deadline_s: float
    tasks: tuple[ShardTask, ...]
    keysets: tuple[tuple[str, ...], ...]

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> ShardOpen:
        tasks, keysets = _get(b, cls, "tasks", True), _get(b, cls, "keysets", True)
        if not isinstance(tasks, list) or not isinstance(keysets, list):
            raise MessageError("shard_open needs tasks and keysets lists")
        if not all(isinstance(ks, list) and all(isinstance(k, str) for k in ks) for ks in keysets):
            raise MessageError("shard_open.keysets: must be lists of tensor names")
        typed = tuple(ShardTask.from_wire(t) for t in tasks)
        if any(t.k >= len(keysets) for t in typed):
            raise MessageError(f"shard_open.tasks: a key set index beyond the {len(keysets)} given")
        return cls(_int(b, cls, "version") or 0, _num(b, cls, "deadline_s", 0.0, MAX_DEADLINE_S) or 0.0,
                   typed, tuple(tuple(ks) for ks in keysets))

    def to_wire(self) -> dict[str, Any]:
        return {"version": self.version, "deadline_s": self.deadline_s,
                "tasks": [t.to_wire() for t in self.tasks],
                "keysets": [list(ks) for ks in self.keysets]}


@dataclass(frozen=True)
class ShardModel(Body):
    """The leader's global state of ``version`` (a blob manifest) and the strategy's
    server extras (checked by the strategy's ``restore_extra``)."""

    TYPE: ClassVar[str] = "shard_model"
    manifest: TransferManifest
    version: int
    extra: dict[str, Any] = field(hash=False)

    @classmethod
    def _parse(cls, b: dict[str, Any]) -> ShardModel:
        return cls(_manifest(b, cls), _int(b, cls, "version") or 0,
                   _obj(b, cls, "extra", required=False) or {})


DEVICE_TO_COORDINATOR: tuple[type[Body], ...] = (Hello, Result, Fetch, Eval, Decline, Heartbeat,
                                                 XferProgress, XferDone)
COORDINATOR_TO_DEVICE: tuple[type[Body], ...] = (Welcome, Task, Model, Accept, Reject, EvalAck,
                                                 XferUnknown, Refused, Status, XferProgress,
                                                 XferDone)
SHARD_LEADER: tuple[type[Body], ...] = (ShardHello, PartialAnnounce, ShardOpen, ShardTask,
                                        ShardModel)
ALL: tuple[type[Body], ...] = tuple(dict.fromkeys(
    DEVICE_TO_COORDINATOR + COORDINATOR_TO_DEVICE + (BundleStatus, SharedRef) + SHARD_LEADER))
BY_TYPE: dict[str, type[Body]] = {c.TYPE: c for c in ALL if "." not in c.TYPE}


def parse_body(type: str, body: Any) -> Body:
    """The typed body of an envelope of ``type``; MessageError for an unknown type."""
    cls = BY_TYPE.get(type)
    if cls is None:
        raise MessageError(f"unknown message type {type!r:.40}")
    return cls.from_wire(body)
