"""``fedcoe init DIR --devices N`` and ``fedcoe keygen``: provision a federation from zero.

``init`` writes everything a federation needs in one folder, so nobody edits eight keys
per device by hand:

* ``coordinator/coordinator.toml`` and ``coordinator/federation.secret`` (mode 600): the
  federation secret stays with the coordinator, which derives every device's key from it;
* ``devices/<id>/agent.toml`` and ``devices/<id>/device.key`` (both mode 600): each device
  gets only its OWN derived HMAC key, never the federation secret, so a stolen device
  cannot sign as another device or as the coordinator;
* ``broker/mosquitto.conf``, ``broker/acl`` and ``broker/passwd`` (one password per client,
  hashed in place with ``mosquitto_passwd -U`` when that tool is installed).

With ``--shards S`` (S > 1) the fleet is served by a leader and S shard aggregators
(docs/daemons.md, "Past one machine"): instead of ``coordinator.toml`` the coordinator
folder holds ``leader.toml`` and ``shard-<i>.toml``, one per process, each logging in to
the broker as its own MQTT identity (``coordinator.config.mqtt_identity``) with its own
password and an ACL entry granting only the topics that process uses, and every device's
``agent.toml`` names its shard's federation id. The broker template binds the client id to
the username, so aggregators sharing one login would take over each other's session.

Every value ``init`` does not decide itself (rounds, deadline, the model and training
knobs) is read from the config dataclasses the daemons default to, so a provisioned
federation and an unconfigured daemon agree.

The class list (``--classes``) goes into the coordinator's ``[federation] classes``, which
every welcome carries, so label i names the same class on every device whatever folders it
holds. The whole tree is written into a temporary sibling folder and renamed into place:
an error leaves nothing half-written. ``--force`` reuses a non-empty folder: every file
``init`` writes replaces its old version with one ``os.replace`` (a reader sees the old
file or the new one, never a partial one), and any other file there is left alone.

``--cold N`` adds N cold-device templates (``cold1..coldN``, ``role = "cold"``): a device
that joins late and only takes the cold-start path (docs/design.md, section 4.4), with its
own key, broker password and ACL entry like every training device; it is allowed by the
coordinator but not counted in ``min_devices``.

The broker files are written so that Mosquitto starts without a warning: its ACL
``pattern`` lines must each name ``%u`` or ``%c``, so the topics every device may read
(broadcasts, the coordinator's status) are granted per user instead. ``init`` also tries to
bind the broker's host:port and warns in one line when something (typically the system's
own ``mosquitto`` service on 1883) already listens there.

``keygen`` makes a new federation secret or derives one device's key (for a device added
later, or after rotating the secret).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from coordinator.config import FederationSettings, Role, mqtt_identity
from device_agent.config import DeviceSettings
from fedcoe_edge.config import ModelConfig, TrainConfig
from fedcoe_edge.errors import ConfigError

FED_SECRET = "federation.secret"
DEVICE_KEY = "device.key"


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "init", help="provision a federation: coordinator, per-device agent configs and keys, broker",
        formatter_class=fmt,
        description="Write DIR/coordinator (config + federation secret), DIR/devices/<id> (config + "
                    "that device's own derived key, never the secret) and DIR/broker (Mosquitto "
                    "config, ACL, passwords), then print the commands that start each part. "
                    "Secrets are written with mode 600.")
    p.add_argument("dir", type=Path, help="folder to create (must not exist or be empty, "
                                           "unless --force)")
    p.add_argument("--force", action="store_true",
                   help="write into a non-empty DIR: overwrite (atomically) the files init writes, "
                        "leave every other file alone; a new federation secret, so every device "
                        "needs its new folder")
    p.add_argument("--devices", type=int, default=3, help="number of training devices")
    p.add_argument("--cold", type=int, default=0, metavar="N",
                   help="also write N cold-device templates cold1..coldN (role = \"cold\": a late "
                        "device on the cold-start path), each with its key, password and ACL entry")
    p.add_argument("--names", default="",
                   help="comma-separated device ids; replaces --devices (default: dev1..devN)")
    p.add_argument("--federation", default="fleet1", help="federation id (topic prefix fl/v1/ID)")
    p.add_argument("--host", default="127.0.0.1",
                   help="broker host name or IP the devices and coordinator connect to")
    p.add_argument("--port", type=int, default=1883, help="broker port (8883 is usual with --tls)")
    p.add_argument("--tls", action="store_true",
                   help="TLS to the broker: configs point at ca.crt next to them, the broker "
                        "config at ca.crt/server.crt/server.key (see deploy/mosquitto/README.md)")
    p.add_argument("--classes", default="",
                   help="comma-separated class names in label order, e.g. cat,dog,bird; each "
                        "device's image sub-folders must be among them (default: labels as "
                        "stored on each device, 10 classes)")
    p.add_argument("--image-shape", default="1,8,8",
                   help="C,H,W every image is converted (C 1 = grey, 3 = RGB) and resized to")
    p.add_argument("--data", default="data",
                   help="data path per device; {device} becomes the id; a path ending in .npz is "
                        "an npz file, anything else an image folder with one sub-folder per class; "
                        "relative paths are relative to the device's agent.toml")
    p.add_argument("--rounds", type=int, default=FederationSettings.rounds, help="federated rounds")
    p.add_argument("--deadline", type=float, default=FederationSettings.deadline_s,
                   help="per-round deadline in seconds")
    p.add_argument("--shards", type=int, default=1,
                   help="S > 1: a leader and S shard aggregators, each with its own config, "
                        "broker login and ACL entry; devices get their shard's federation id")
    p.set_defaults(func=run_init)

    k = sub.add_parser(
        "keygen", help="make a federation secret or derive one device's key from it",
        formatter_class=fmt,
        description="With --new-secret: write 32 random bytes (hex) to --out, mode 600. With "
                    "--secret-file and --device: derive that device's HMAC key (hex) and write "
                    "it to --out (mode 600) or print it. Give a device only its own key.")
    k.add_argument("--new-secret", action="store_true", help="create a new federation secret")
    k.add_argument("--secret-file", type=Path, default=None, help="federation secret (hex) to derive from")
    k.add_argument("--device", default=None, help="device id whose key to derive")
    k.add_argument("--out", type=Path, default=None, help="file to write (mode 600); default: print")
    k.set_defaults(func=run_keygen)


def write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only (0600) from the first byte: a file
    created world-readable and chmod-ed after could be read in between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by umask; an existing file keeps its own


def parse_ids(args: argparse.Namespace) -> list[str]:
    from fedcoe_edge.transport.topics import check_id

    # --names, when given, decides the number of devices (--devices is then ignored)
    ids = ([t.strip() for t in args.names.split(",") if t.strip()] if args.names
           else [f"dev{i}" for i in range(1, args.devices + 1)])
    if not ids:
        raise ConfigError(f"--devices must be >= 1, got {args.devices}")
    if args.cold < 0:
        raise ConfigError(f"--cold must be >= 0, got {args.cold}")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"--names has duplicates: {args.names}")
    for d in ids:
        try:
            check_id(d, "device id")
        except Exception as exc:
            raise ConfigError(f"--names: {exc}") from None
        if d == "coordinator":
            raise ConfigError("--names: 'coordinator' is the coordinator's id")
    return ids


def cold_ids(args: argparse.Namespace, ids: list[str]) -> list[str]:
    """``cold1..coldN`` for ``--cold N``; a clash with a training device's id is refused."""
    cold = [f"cold{i}" for i in range(1, args.cold + 1)]
    clash = sorted(set(cold) & set(ids))
    if clash:
        raise ConfigError(f"--names: {', '.join(clash)} is a --cold device's id; rename it")
    return cold


def parse_shape(text: str) -> list[int]:
    try:
        shape = [int(t) for t in text.split(",")]
    except ValueError:
        raise ConfigError(f"--image-shape must be C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise ConfigError(f"--image-shape must be C,H,W with C 1 or 3, got {text!r}")
    return shape


def toml_list(items: list[str] | list[int]) -> str:
    import json

    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def aggregators(args: argparse.Namespace) -> dict[str, str]:
    """Config file stem -> MQTT identity of every coordinator process: ``coordinator`` for a
    single coordinator, or ``leader`` and ``shard-<i>`` when sharded."""
    fed = FederationSettings(id=args.federation, shards=args.shards)
    if args.shards == 1:
        return {"coordinator": mqtt_identity(fed, Role.SINGLE)}
    out = {"leader": mqtt_identity(fed, Role.LEADER)}
    for i in range(args.shards):
        out[f"shard-{i}"] = mqtt_identity(fed, Role.SHARD, i)
    return out


EVAL_COMMENT = """
# Optional: score the global model after every round on a shipped dataset's held-out
# test set (docs/design.md, section 5). Without [eval] the coordinator holds no test data
# of its own, so the accuracy column of its round lines and of `fedcoe status` stays
# empty (devices still report their own accuracy). Uncomment with a dataset whose images
# match [model]:
# [eval]
# dataset = "digits"        # shipped: digits (1,8,8, 10 classes); empty: no evaluation
# partition = "dirichlet"   # how the dataset is split, as in `fedcoe simulate`
"""


HTTP_COMMENT = """
# Optional: Prometheus metrics and a read-only web dashboard served by the coordinator
# (docs/daemons.md, "Metrics and dashboard"). Both are off (port 0) and, when on, bound
# to this machine only unless host says otherwise; neither has a login.
# [metrics]
# port = 9464               # GET http://127.0.0.1:9464/metrics
# host = "127.0.0.1"
# [dashboard]
# port = 8080               # open http://127.0.0.1:8080/ (rounds, curves, devices, refusals)
# host = "127.0.0.1"
"""


def coordinator_toml(args: argparse.Namespace, ids: list[str], classes: list[str],
                     shape: list[int], stem: str, username: str, cold: Sequence[str] = ()) -> str:
    """One coordinator process's config; a leader's and its shards' differ only in the
    ``[broker]`` login. Unset knobs are the dataclass defaults the daemon would use. Cold
    devices are allowed but not counted in ``min_devices`` (they join late)."""
    tls = ('tls = true\nca_file = "ca.crt"             # the CA that signed the broker certificate\n'
           if args.tls else "tls = false\n")
    num_classes = len(classes) if classes else ModelConfig.num_classes
    m, t = ModelConfig(), TrainConfig()
    if args.shards == 1:
        head = "# fedcoe coordinator --config coordinator.toml   (written by `fedcoe init`)"
        shards = ""
    else:
        role = ("--role leader" if stem == "leader"
                else f"--role shard --shard-index {stem.removeprefix('shard-')}")
        head = (f"# fedcoe coordinator --config {stem}.toml {role}   (written by `fedcoe init`)\n"
                f"# leader.toml and every shard-<i>.toml differ only in [broker] username/password:\n"
                f"# each process logs in as itself (docs/daemons.md, \"Past one machine\").")
        shards = (f"shards = {args.shards}                   # a leader and {args.shards} shard "
                  "aggregators (streamed aggregation)\n")
    return f"""{head}
# Relative paths are relative to this file's folder. Every key can be overridden with
# FEDCOE_<SECTION>_<KEY>, e.g. FEDCOE_BROKER_PORT=8883. Keys not written here take the
# defaults listed in deploy/coordinator.toml.

[federation]
id = "{args.federation}"
algorithm = "{FederationSettings.algorithm}"
rounds = {args.rounds}
min_devices = {len(ids)}               # devices online before round 1
quorum = {max(1, len(ids) // 2)}                    # accepted updates needed to apply a round
deadline_s = {args.deadline}
state_dir = "state"
{shards}allowed_devices = {toml_list([*ids, *cold])}{"   # cold devices too" if cold else ""}
# label i is classes[i] on every device (sent in every welcome); empty: labels as stored
classes = {toml_list(classes)}

[broker]
host = "{args.host}"
port = {args.port}
username = "{username}"
password = "{{password}}"
{tls}
[security]
secret_file = "{FED_SECRET}"      # never copy this file to a device

[model]
input_shape = {toml_list(shape)}
num_classes = {num_classes}
expert_kind = "{m.expert_kind}"
expert_hidden = {m.expert_hidden}
num_global_experts = {m.num_global_experts}
top_k = {m.top_k}
num_local_experts = {m.num_local_experts}

[train]
local_epochs = {t.local_epochs}
batch_size = {t.batch_size}
lr = {t.lr}
experts_per_client = {t.experts_per_client}
{EVAL_COMMENT}{HTTP_COMMENT}"""


def device_federation(args: argparse.Namespace, dev: str) -> str:
    """The federation id in a device's config: its shard's when the fleet is sharded."""
    if args.shards == 1:
        return str(args.federation)
    from fedcoe_edge.sharding import shard_federation, shard_of

    return shard_federation(args.federation, shard_of(dev, args.shards), args.shards)


def agent_toml(args: argparse.Namespace, dev: str, classes: list[str], shape: list[int],
               role: str = "train") -> str:
    """A device's config; ``role = "cold"`` for a cold device (its data is its test set)."""
    tls = ('tls = true\nca_file = "ca.crt"             # copy the broker CA here\n'
           if args.tls else "tls = false\n")
    data = args.data.replace("{device}", dev)
    source = f'npz = "{data}"' if data.endswith(".npz") else f'image_folder = "{data}"   # one sub-folder per class'
    fed = device_federation(args, dev)
    note = "" if args.shards == 1 else f"   # shard {fed.split('.s')[-1].split('of')[0]} of {args.shards} (fedcoe shard-of)"
    return f"""# fedcoe agent --config agent.toml   (written by `fedcoe init` for device {dev})
# Relative paths are relative to this file's folder. Holds the broker password: keep it 0600.

[device]
id = "{dev}"
federation = "{fed}"{note}
role = "{role}"{ROLE_NOTE[role]}
tier = "{DeviceSettings.tier}"                # local expert width: small (Pi Zero) | medium | large (Jetson)
state_dir = "state"            # the private level lives here and never leaves the device
bundle = "{DeviceSettings.bundle}"               # int8 ONNX bundle for `fedcoe predict` after the last round

[broker]
host = "{args.host}"
port = {args.port}
username = "{dev}"
password = "{{password}}"
{tls}
[security]
key_file = "{DEVICE_KEY}"           # this device's own key, derived from the federation secret

[data]
{source}
image_shape = {toml_list(shape)}    # must match the coordinator's [model] input_shape
classes = {toml_list(classes)}
"""


ROLE_NOTE = {"train": "                # train: joins every round",
             "cold": "                 # cold: joins late, takes the cold-start path only "
                     "(docs/design.md, section 4.4)"}

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def mosquitto_conf(args: argparse.Namespace, root: Path) -> str:
    """The broker of deploy/mosquitto/mosquitto.conf for this federation: passwords, ACL,
    client id bound to the username, the same limits, persistence in ``broker/data/``.
    A loopback ``--host`` binds the listener to loopback only."""
    b = root / "broker"
    bind = f" {args.host}" if args.host in LOOPBACK and not args.tls else ""
    if args.tls:
        listener = (f"listener {args.port}\ncafile {b / 'ca.crt'}\ncertfile {b / 'server.crt'}\n"
                    f"keyfile {b / 'server.key'}\ntls_version tlsv1.2\n")
    else:
        listener = f"listener {args.port}{bind}\n"
    return f"""# mosquitto -c mosquitto.conf   (written by `fedcoe init`; see deploy/mosquitto/README.md)
per_listener_settings false
{listener}allow_anonymous false
password_file {b / 'passwd'}
acl_file {b / 'acl'}
# the client id IS the username: one login, one session (nobody takes over another's)
use_username_as_clientid true
max_packet_size 2000000
# the coordinator needs devices x (window + 4) queued messages (docs/daemons.md, "Scale")
max_queued_messages 100000
# sessions, queued messages and retained presence survive a broker restart
persistence true
persistence_location {b / 'data'}/
autosave_interval 60
connection_messages true
# `fedcoe devices add|remove` sends SIGHUP to this pid: Mosquitto re-reads passwd and acl
pid_file {b / 'mosquitto.pid'}
"""


DEVICE_ACL = """
# Every device; %u is its username (= its id and MQTT client id). Pattern lines apply to
# every user, and Mosquitto warns about a pattern without %u/%c, hence the per-user reads.
pattern write fl/v1/+/up/%u/#
pattern write fl/v1/+/presence/%u
pattern read fl/v1/+/dn/%u/#
"""

# What every client may read whatever its name: granted in each user entry (a `topic` line
# before any `user` line would apply to anonymous clients only).
SHARED_READS = ["topic read fl/v1/+/bc/#", "topic read fl/v1/+/coord/status"]


def device_acl_entry(dev: str, federation: str) -> list[str]:
    """A device's own ACL entry: the broadcasts, the coordinator's status and the shared
    downloads of its OWN federation id (``federation``: a shard's ``FED.s<i>of<S>``), never
    another's (docs/protocol.md, "Shared downloads"); its own uplink, presence and downlink
    come from the ``%u`` patterns of :data:`DEVICE_ACL`."""
    return [f"user {dev}", *SHARED_READS, f"topic read fl/v1/{federation}/shared/#"]


def acl_text(args: argparse.Namespace, devices: Sequence[str] = ()) -> str:
    """Each client only its own topics (deploy/mosquitto/acl). A single coordinator owns its
    federation's tree; when sharded, the leader only its side of ``fl/v1/FED/agg`` and
    shard i its devices' tree ``fl/v1/FED.s<i>of<S>`` plus its own side of the leader's
    channel (fedcoe_edge.sharding.LeaderTopics)."""
    from fedcoe_edge.sharding import LeaderTopics, shard_federation, shard_name, shard_of

    fed, who = args.federation, aggregators(args)
    lines = ["# Mosquitto ACL (written by `fedcoe init`): every client only its own topics."]
    if args.shards == 1:
        lines += [f"user {who['coordinator']}", f"topic readwrite fl/v1/{fed}/#", *SHARED_READS]
    else:
        lt = LeaderTopics(fed)
        lines += ["# the leader: selection and aggregation; it talks to the shards only",
                  f"user {who['leader']}",
                  f"topic read {lt.prefix}/up/#",
                  f"topic write {lt.prefix}/dn/#",
                  f"topic write {lt.leader_status()}", *SHARED_READS]
        for i in range(args.shards):
            name = shard_name(i)
            lines += ["", f"# shard {i}: the coordinator of its devices' federation id, and the "
                          "leader's channel to it",
                      f"user {who[name]}",
                      f"topic readwrite fl/v1/{shard_federation(fed, i, args.shards)}/#",
                      f"topic read {lt.prefix}/dn/{name}/#",
                      f"topic read {lt.leader_status()}",
                      f"topic write {lt.prefix}/up/{name}/#", *SHARED_READS]
    lines += ["", "# every device: what all of them read (their own topics: the patterns below)"]
    for dev in devices:
        home = (fed if args.shards == 1
                else shard_federation(fed, shard_of(dev, args.shards), args.shards))
        lines += device_acl_entry(dev, home)
    return "\n".join(lines) + "\n" + DEVICE_ACL


def port_warning(args: argparse.Namespace) -> str | None:
    """One line when the broker's host:port cannot be bound here (something listens on it),
    naming the fix; None when it is free or the host is not this machine's. Only a warning:
    the port may be meant for a broker already running."""
    from fedcoe_edge.broker import port_in_use

    bind = args.host if args.host in LOOPBACK and not args.tls else ""
    why = port_in_use(bind or args.host, args.port)
    if why is None:
        return None
    return (f"warning: {args.host}:{args.port} is already in use ({why}), e.g. by the system's "
            f"own mosquitto service: give init --port N a free port, or stop that service "
            f"(sudo systemctl disable --now mosquitto) before starting this federation's broker")


def run_init(args: argparse.Namespace) -> int:
    from fedcoe_edge.protocol import check_classes, device_key

    out: Path = args.dir
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; pick a new one")
    reuse = out.exists() and any(out.iterdir())
    if reuse and not args.force:
        raise ConfigError(f"{out} exists and is not an empty folder; pick a new one, or give "
                          "--force to overwrite the files init writes there (others stay)")
    ids = parse_ids(args)
    cold = cold_ids(args, ids)
    shape = parse_shape(args.image_shape)
    classes = [t.strip() for t in args.classes.split(",") if t.strip()]
    if classes:
        check_classes(classes, "--classes")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.rounds < 1 or not args.deadline > 0:
        raise ConfigError("--rounds must be >= 1 and --deadline > 0")
    from fedcoe_edge.sharding import MAX_SHARDS

    if not 1 <= args.shards <= MAX_SHARDS:
        raise ConfigError(f"--shards must be in 1..{MAX_SHARDS}, got {args.shards}")
    who = aggregators(args)
    taken = sorted(set(ids + cold) & set(who.values()))
    if taken:
        raise ConfigError(f"--names: {', '.join(taken)} is an aggregator's MQTT identity")
    final = out.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the secrets inside are 0600 on their own
    try:
        secret = secrets.token_bytes(32)
        passwords = {c: secrets.token_urlsafe(18) for c in [*who.values(), *ids, *cold]}
        write_private(tmp / "coordinator" / FED_SECRET, secret.hex() + "\n")
        for stem, user in who.items():
            text = coordinator_toml(args, ids, classes, shape, stem, user, cold)
            write_private(tmp / "coordinator" / f"{stem}.toml", text.replace("{password}", passwords[user]))
        for dev in [*ids, *cold]:
            d = tmp / "devices" / dev
            role = "cold" if dev in cold else "train"
            write_private(d / DEVICE_KEY, device_key(secret, dev).hex() + "\n")
            write_private(d / "agent.toml", agent_toml(args, dev, classes, shape, role)
                          .replace("{password}", passwords[dev]))
        (tmp / "broker" / "data").mkdir(parents=True)
        (tmp / "broker" / "mosquitto.conf").write_text(mosquitto_conf(args, final))
        (tmp / "broker" / "acl").write_text(acl_text(args, [*ids, *cold]))
        write_private(tmp / "broker" / "passwd", "".join(f"{u}:{pw}\n" for u, pw in passwords.items()))
        hashed = hash_passwords(tmp / "broker" / "passwd")
        if reuse:
            replace_files(tmp, final)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            if out.exists():
                out.rmdir()
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(next_steps(args, final, ids, classes, hashed, cold))
    warning = port_warning(args)
    if warning is not None:
        print(warning, file=sys.stderr)
    return 0


def replace_files(src: Path, dst: Path) -> None:
    """``--force``: move every file of the tree ``src`` onto the same path under ``dst``
    with ``os.replace`` (atomic on one file system: ``src`` is a sibling of ``dst``), making
    the folders it needs; files under ``dst`` that ``src`` does not hold are left alone."""
    paths = sorted(src.rglob("*"))
    for path in paths:  # every clash first, so a refusal replaces nothing
        target = dst / path.relative_to(src)
        if path.is_dir() and target.exists() and not target.is_dir():
            raise ConfigError(f"--force: {target} is a file where init writes a folder")
        if not path.is_dir() and target.is_dir():
            raise ConfigError(f"--force: {target} is a folder where init writes a file")
    for path in paths:
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            os.replace(path, target)


def hash_passwords(path: Path) -> bool:
    """Hash the plain ``user:password`` lines in place when ``mosquitto_passwd`` exists (the
    configs keep the plain passwords, the broker needs only the hashes)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return False
    done = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, check=False)
    return done.returncode == 0


def next_steps(args: argparse.Namespace, root: Path, ids: list[str], classes: list[str],
               hashed: bool, cold: Sequence[str] = ()) -> str:
    dev0 = ids[0]
    cdir = root / "coordinator"
    configs = ("coordinator.toml" if args.shards == 1
               else f"leader.toml, shard-0..{args.shards - 1}.toml (one broker login each)")
    lines = [f"federation {args.federation!r} written to {root}:",
             f"  coordinator/  {configs}, {FED_SECRET} (mode 600: stays on the coordinator hosts)",
             f"  devices/<id>/ agent.toml + {DEVICE_KEY} (that device's key only) for {', '.join(ids)}",
             *([f"  devices/<id>/ cold-device templates (role = \"cold\") for {', '.join(cold)}"]
               if cold else []),
             "  broker/       mosquitto.conf, acl, passwd",
             "",
             "next:"]
    if not hashed:
        lines.append(f"  mosquitto_passwd -U {root / 'broker' / 'passwd'}   # hash the broker passwords")
    if args.tls:
        lines.append("  put ca.crt/server.crt/server.key in broker/ and ca.crt next to every config "
                     "(deploy/mosquitto/README.md shows the openssl steps)")
    lines.append(f"  1. broker:      mosquitto -c {root / 'broker' / 'mosquitto.conf'}")
    if args.shards == 1:
        lines.append(f"  2. coordinator: fedcoe coordinator --config {cdir / 'coordinator.toml'}")
    else:
        lines.append(f"  2. leader:      fedcoe coordinator --config {cdir / 'leader.toml'} --role leader")
        for i in range(args.shards):
            lines.append(f"     shard {i}:     fedcoe coordinator --config {cdir / f'shard-{i}.toml'} "
                         f"--role shard --shard-index {i}")
    lines += [f"  3. each device: copy devices/<id>/ to it (e.g. scp -r {root / 'devices' / dev0} "
              f"{dev0}:fedcoe), put its data at {args.data.replace('{device}', '<id>')} "
              f"(relative to agent.toml), then",
              "                  fedcoe agent --config agent.toml",
              f"  4. after round {args.rounds}: fedcoe predict --bundle state/bundle --input x.npy "
              "(on a device)"]
    if args.shards == 1:
        lines.append(f"  later: fedcoe devices add NAME --dir {root} (--cold for a cold device), "
                     f"fedcoe devices remove NAME --dir {root}: no restart (docs/daemons.md, "
                     "\"Adding and removing devices\")")
    if classes:
        lines.append(f"classes (label order): {', '.join(classes)}; a device with another class "
                     "folder declines with one line")
    return "\n".join(lines)


def run_keygen(args: argparse.Namespace) -> int:
    from fedcoe_edge.protocol import device_key, read_secret

    if args.new_secret:
        if args.secret_file is not None or args.device is not None:
            raise ConfigError("--new-secret takes only --out")
        if args.out is None:
            raise ConfigError("--new-secret needs --out FILE (a secret is never printed)")
        if args.out.exists():
            raise ConfigError(f"--out {args.out} exists; a secret is never overwritten "
                              "(remove it first when rotating)")
        write_private(args.out, secrets.token_bytes(32).hex() + "\n")
        print(f"federation secret written to {args.out} (mode 600)")
        return 0
    if args.secret_file is None or not args.device:
        raise ConfigError("give --new-secret --out FILE, or --secret-file FILE --device ID")
    from fedcoe_edge.transport.topics import check_id

    try:
        check_id(args.device, "--device")
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    secret = read_secret("", str(args.secret_file), "--secret", Path.cwd())
    key = device_key(secret, args.device).hex()
    if args.out is None:
        print(key)
    else:
        write_private(args.out, key + "\n")
        print(f"key of device {args.device!r} written to {args.out} (mode 600)")
    return 0
