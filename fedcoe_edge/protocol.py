"""What the device agent and the coordinator daemon agree on, beyond ``fedcoe_edge.wire``.

FedCoE (arXiv 2605.21264) runs as a coordinator plus device agents exchanging a subset of
the global experts per round (docs/design.md, section 8). This module holds the pieces both daemons
share: control message types, per-device HMAC keys, broker settings, the transport
factory, TOML loading with ``FEDCOE_*`` environment overrides, and a small signed
messenger that turns envelopes into one-line rejections instead of exceptions.

It lives in the library, below both daemons, so neither daemon imports the other
(docs/design.md, section 2).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (JetPack 6, Ubuntu 22.04): the same parser, as tomli
    import tomli as tomllib  # type: ignore[no-redef]

from fedcoe_edge import wire
from fedcoe_edge.errors import ConfigError, WireError
from fedcoe_edge.messages import BY_TYPE
from fedcoe_edge.transport import Topics, Transport, Will
from fedcoe_edge.wire import Envelope, ReplayCache, decode_envelope, encode_envelope, parse_json

log = logging.getLogger("fedcoe.protocol")

# --- control message types (envelope.type) -------------------------------------------
HELLO = "hello"  # device -> coordinator: capabilities
WELCOME = "welcome"  # coordinator -> device: algorithm, model/train config, broadcast key
TASK = "task"  # coordinator -> device: round, expert ids, download manifest
RESULT = "result"  # device -> coordinator: n, affinity, metrics, upload manifest
ACCEPT = "accept"  # coordinator -> device: update persisted
REJECT = "reject"  # coordinator -> device: update refused, with the reason
FETCH = "fetch"  # device -> coordinator: send me these experts (cold start, refresh)
MODEL = "model"  # coordinator -> device: manifest of a fetched parameter set
EVAL = "eval"  # device -> coordinator: accuracy of its own model on its own test data
EVAL_ACK = "eval_ack"  # coordinator -> device: that eval (kind, round) is stored; without this
# answer the device re-sends it (bounded backoff), since a broker restart can lose QoS 1
STATUS = "status"  # broadcast: round open / closed / finished
HEARTBEAT = "hb"  # device -> coordinator on up/<id>/hb: telemetry (memory, load)
REFUSED = "refused"  # coordinator -> device: not (or no longer) allowed here, with the reason
XFER_UNKNOWN = "xfer_unknown"  # coordinator -> device: chunks for an upload it does not know
# (it restarted, or the announce was lost): the device re-announces the upload at once
DECLINE = "decline"  # device -> coordinator: this device cannot train the federation's task
# (labels outside the class list, data shape != model input): the coordinator stops selecting
# it at once instead of waiting out the round deadline, and logs the reason

COORDINATOR_ID = "coordinator"
# Repeats of an unanswered request (a device's FETCH or EVAL) or of a transfer's manifest
# (the coordinator's download announce): RETRY_FIRST_S, doubling, capped at RETRY_MAX_S;
# a device sends a request at most RETRY_ATTEMPTS times (6 sends over about 135 s), so
# either side that stops answering costs the other a bounded number of messages.
RETRY_FIRST_S = 5.0
RETRY_MAX_S = 60.0
RETRY_ATTEMPTS = 6


def check_classes(classes: list[str], where: str) -> None:
    """A class list names each label once: a duplicate would give two labels one name, and
    an empty name cannot be a folder."""
    if not all(isinstance(c, str) and c.strip() and "/" not in c for c in classes):
        raise ConfigError(f"{where} must be non-empty folder names (strings without '/')")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise ConfigError(f"{where} names {', '.join(dup)} more than once")
    if len(classes) == 1:
        raise ConfigError(f"{where} needs at least 2 classes, got {classes}")


def retry_delay(sent: int) -> float:
    """Wait after the ``sent``-th send: 5, 10, 20, 40, 60, 60 ... s."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, sent - 1))
DEFAULT_WINDOW = wire.DEFAULT_WINDOW  # the transfer window's default lives with its check
ENCODING_PLAIN = "safetensors"
ENCODING_DELTA = "safetensors+int8delta"


def device_key(secret: bytes, device_id: str) -> bytes:
    """Per-device HMAC key derived from the federation secret: a leaked device key does not
    reveal the others, and the coordinator needs no key table."""
    return hmac.new(secret, b"fedcoe-device:" + device_id.encode(), hashlib.sha256).digest()


def broadcast_key(secret: bytes, federation: str) -> bytes:
    """Key of the broadcast channel; devices learn it in their (device-signed) welcome."""
    return hmac.new(secret, b"fedcoe-broadcast:" + federation.encode(), hashlib.sha256).digest()


def parse_key(text: str, where: str) -> bytes:
    """A key given as hex in a config file (at least 16 bytes)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(f"{where}: not a hex string") from None
    if len(key) < 16:
        raise ConfigError(f"{where}: key must be at least 16 bytes (32 hex digits), got {len(key)}")
    return key


def read_secret(value: str, file: str, where: str, base: Path) -> bytes:
    """The secret from ``value`` (hex) or from a file holding hex; the file wins."""
    if file:
        path = Path(file) if Path(file).is_absolute() else base / file
        if not path.is_file():
            raise ConfigError(f"{where}_file: {path} not found")
        return parse_key(path.read_text(), f"{where}_file {path}")
    if not value:
        raise ConfigError(f"{where}: missing (set it or {where}_file, or FEDCOE_* env)")
    return parse_key(value, where)


# --- broker settings and transports ------------------------------------------------------
@dataclass
class BrokerSettings:
    """Where the MQTT broker is and how to log in (username = client id by convention)."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 3600

    def validate(self, where: str) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"{where}.port must be in 1..65535, got {self.port}")
        if not self.host:
            raise ConfigError(f"{where}.host must not be empty")
        if self.keepalive_s < 5:
            raise ConfigError(f"{where}.keepalive_s must be >= 5, got {self.keepalive_s}")
        if self.tls and not self.ca_file:
            raise ConfigError(f"{where}.tls needs ca_file (the CA that signed the broker's certificate)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError(f"{where}: cert_file and key_file go together (client certificate)")

    def check_files(self, where: str) -> None:
        """The TLS files must exist before connecting: paho would otherwise fail inside
        ``connect`` with a traceback. Separate from :meth:`validate` so a config can be
        parsed (and tested) on a machine that does not hold the certificates."""
        if not self.tls:
            return
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                raise ConfigError(f"{where}.{name}: {value} not found (tls = true needs it)")

    def resolve(self, base: Path) -> None:
        """Make the certificate paths relative to the config file's folder, like every other
        path in a config, so a daemon started from another directory finds them."""
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value and not Path(value).is_absolute():
                setattr(self, name, str(base / value))


def check_username(username: str, client_id: str, where: str) -> None:
    """The broker username, when set, must be the daemon's own id: the shipped broker
    template (``use_username_as_clientid``) makes the username the MQTT client id, and the
    ACL's ``%u`` patterns name the topics of that id."""
    if username and username != client_id:
        raise ConfigError(f"{where}.username {username!r} must equal the client id {client_id!r} "
                          "(the broker binds the client id to the username)")


TransportFactory = Callable[[str, Will | None, Will | None], Transport]
"""``factory(client_id, will, birth) -> Transport`` (unconnected)."""


def mqtt_factory(settings: BrokerSettings, keep_trying: bool = True) -> TransportFactory:
    """Factory of paho-based transports for ``settings`` (imported lazily: paho is optional
    for the simulator). ``keep_trying``: the daemons' default, a broker not reachable at
    start is retried forever with backoff (docs/daemons.md, "Reconnects")."""

    def make(client_id: str, will: Will | None, birth: Will | None) -> Transport:
        from fedcoe_edge.transport.mqtt import MqttTransport

        settings.check_files("[broker]")
        kwargs: dict[str, Any] = {
            "host": settings.host, "port": settings.port, "will": will, "birth": birth,
            "keepalive_s": settings.keepalive_s, "session_expiry_s": settings.session_expiry_s,
            "keep_trying": keep_trying,
        }
        if settings.username:
            kwargs["username"] = settings.username
            kwargs["password"] = settings.password or None
        if settings.tls:
            from fedcoe_edge.transport.mqtt import TlsSettings

            kwargs["tls"] = TlsSettings(ca_certs=settings.ca_file,
                                        certfile=settings.cert_file or None,
                                        keyfile=settings.key_file or None)
        return MqttTransport(client_id, **kwargs)

    return make


# --- TOML + environment -------------------------------------------------------------------
def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config file; a missing file or a syntax error is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _coerce(text: str, like: Any, where: str) -> Any:
    """Turn an environment string into the type of the default it overrides."""
    if isinstance(like, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected a boolean, got {text!r}")
    if isinstance(like, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if isinstance(like, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if isinstance(like, list | dict | tuple):
        try:
            return json.loads(text)
        except ValueError:
            raise ConfigError(f"{where}: expected JSON, got {text!r}") from None
    return text


def apply_env(doc: dict[str, Any], defaults: Mapping[str, Mapping[str, Any]],
              env: Mapping[str, str] | None = None, prefix: str = "FEDCOE_") -> dict[str, Any]:
    """Overlay ``FEDCOE_<SECTION>_<KEY>`` variables on a config document.

    ``defaults`` lists the known keys per section (with a value of the right type); only
    those are looked up, so a typo in the environment cannot create a silent option. Lets
    systemd units and containers inject secrets and ports without editing the file.
    """
    env = os.environ if env is None else env
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in doc.items()}
    for section, keys in defaults.items():
        for key, like in keys.items():
            name = f"{prefix}{section}_{key}".upper()
            if name in env:
                out.setdefault(section, {})[key] = _coerce(env[name], like, name)
    return out


def build_section(cls: type, doc: Mapping[str, Any], section: str, source: str) -> Any:
    """Instantiate a dataclass from one TOML section; unknown keys name the file and section."""
    raw = doc.get(section, {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: [{section}] must be a table")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown option(s) in [{section}]: {', '.join(unknown)}")
    check_types(cls, raw, f"{source}: [{section}]")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ConfigError(f"{source}: [{section}]: {exc}") from None


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", tuple: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def check_types(cls: type, raw: Mapping[str, Any], where: str) -> None:
    """Each value must have the type of the field's default (an integer also passes for a
    number). Dataclasses do not check types, so ``lr = "fast"`` would otherwise surface
    deep inside training as a TypeError traceback instead of one line naming the key."""
    defaults = section_defaults(cls)
    for key, value in raw.items():
        like = defaults.get(key)
        if like is None:
            continue
        if isinstance(like, bool):
            ok = isinstance(value, bool)
        elif isinstance(like, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(like, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(like, list | tuple):
            ok = isinstance(value, list | tuple)
        else:
            ok = isinstance(value, type(like))
        if not ok:
            raise ConfigError(f"{where} {key} must be {_type_name(like)}, got {value!r:.60}")


def section_defaults(cls: type) -> dict[str, Any]:
    """Default value of every field of a dataclass (for :func:`apply_env`)."""
    obj = cls()
    return {f.name: getattr(obj, f.name) for f in fields(cls)}


# --- signed messaging ---------------------------------------------------------------------
@dataclass
class Messenger:
    """Signs what this side sends and authenticates what it receives.

    ``keys(sender)`` returns the HMAC key for a peer (None = unknown peer). Decode errors
    come back as a reason string, because a daemon logs a rejection and carries on.
    """

    transport: Transport
    topics: Topics
    me: str
    keys: Callable[[str], bytes | None]
    replay: ReplayCache = field(default_factory=ReplayCache)

    def send(self, topic: str, type: str, recipient: str, body: Mapping[str, Any],
             key: bytes, round: int = 0, ttl_s: int = 600, retain: bool = False,
             expiry_s: int | None = None) -> None:
        typed = BY_TYPE.get(type)
        if typed is not None:  # never send what the receiver's from_wire would refuse
            typed.from_wire(body)
        env = Envelope.new(type, federation=self.topics.federation, sender=self.me,
                           recipient=recipient, round=round, body=body, ttl_s=ttl_s)
        self.transport.publish(topic, encode_envelope(env, key), qos=1, retain=retain,
                               expiry_s=expiry_s)

    def open(self, payload: bytes, expect_sender: str | None = None,
             key_override: bytes | None = None) -> Envelope:
        """Authenticate, then decode; raises WireError with a one-line reason
        (:class:`~fedcoe_edge.wire.UnauthenticatedError` when the HMAC did not verify)."""
        lookup = self.keys if key_override is None else (lambda _s: key_override)
        # the topic names the sender: its key verifies the raw bytes before anything is
        # parsed (a message signed by another sender fails that HMAC)
        env = decode_envelope(payload, lookup, replay_cache=self.replay,
                              expect_sender=expect_sender)
        if env.federation != self.topics.federation:
            raise WireError(f"envelope for federation {env.federation!r}, not {self.topics.federation!r}")
        if env.recipient not in (self.me, "*"):
            raise WireError(f"envelope addressed to {env.recipient!r}, not {self.me!r}")
        return env


# hex literals first: "byte 0xbc" must blank to one class, not 256 (random garbage names a
# different byte in every decode error)
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|0x[0-9a-fA-F]+|[0-9a-f]{8,}|\d+")


def reason_class(reason: str) -> str:
    """What stays the same across repeats of one refusal: quoted names, ids and numbers
    are blanked, so 10,000 chunks for 10,000 made-up transfers are one class."""
    return _VARIABLE.sub("#", reason)[:120]


class LogLimiter:
    """At most one log line per (peer, kind) per ``interval_s``; the repeats are counted and
    the count rides on the next line written. For the daemons that keep no refusal table
    (the device agent, a shard): what a peer sends never buys more log than this."""

    def __init__(self, interval_s: float = 60.0, max_keys: int = 1000,
                 clock: Callable[[], float] | None = None) -> None:
        self.interval_s, self.max_keys = interval_s, max_keys
        self._clock = clock or time.monotonic
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, logger: logging.Logger, peer: str, kind: str, msg: str) -> bool:
        """Log ``msg`` at WARNING unless ``(peer, kind)`` logged within the interval;
        True when written."""
        now = self._clock()
        with self._lock:
            last, skipped = self._last.get((peer, kind), (-1e18, 0))
            if now - last < self.interval_s:
                self._last[(peer, kind)] = (last, skipped + 1)
                return False
            self._last.pop((peer, kind), None)
            while len(self._last) >= self.max_keys:
                self._last.pop(next(iter(self._last)))
            self._last[(peer, kind)] = (now, 0)
        more = f" (and {skipped} more like it in {self.interval_s:.0f}s)" if skipped else ""
        logger.warning("%s%s", msg, more)
        return True


def presence_payload(state: str, **extra: Any) -> bytes:
    """Plain JSON for presence / coordinator status: the will is fixed at connect time, so it
    cannot carry a fresh signature; it only ever triggers behaviour that is safe to repeat."""
    return json.dumps({"state": state, **extra}, sort_keys=True).encode()


PRESENCE_MAX_BYTES = 1024


def presence_state(payload: bytes) -> str | None:
    """The ``state`` of a presence / status payload, or None when it is not one: the
    payload is unsigned, so it is read with the same limits as any peer input (size,
    nesting, finite numbers) and never raises."""
    if len(payload) > PRESENCE_MAX_BYTES:
        return None
    try:
        doc = parse_json(bytes(payload), "presence", max_depth=2)
    except WireError:
        return None
    state = doc.get("state") if isinstance(doc, dict) else None
    return state if isinstance(state, str) else None


def install_stop_handlers(stop: Callable[[], None]) -> None:
    """SIGTERM/SIGINT call ``stop()`` (a clean shutdown) instead of killing the process."""
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
