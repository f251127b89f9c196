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

The class list (``--classes``) goes into the coordinator's ``[federation] classes``, which
every welcome carries, so label i names the same class on every device whatever folders it
holds. The whole tree is written into a temporary sibling folder and renamed into place:
an error leaves nothing half-written.

``keygen`` makes a new federation secret or derives one device's key (for a device added
later, or after rotating the secret).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

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
    p.add_argument("dir", type=Path, help="folder to create (must not exist or be empty)")
    p.add_argument("--devices", type=int, default=3, help="number of training devices")
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
    p.add_argument("--rounds", type=int, default=20, help="federated rounds")
    p.add_argument("--deadline", type=float, default=120.0, help="per-round deadline in seconds")
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


def coordinator_toml(args: argparse.Namespace, ids: list[str], classes: list[str],
                     shape: list[int]) -> str:
    tls = ('tls = true\nca_file = "ca.crt"             # the CA that signed the broker certificate\n'
           if args.tls else "tls = false\n")
    num_classes = len(classes) if classes else 10
    return f"""# fedcoe coordinator --config coordinator.toml   (written by `fedcoe init`)
# Relative paths are relative to this file's folder. Every key can be overridden with
# FEDCOE_<SECTION>_<KEY>, e.g. FEDCOE_BROKER_PORT=8883.

[federation]
id = "{args.federation}"
algorithm = "fedcoe"
rounds = {args.rounds}
min_devices = {len(ids)}               # devices online before round 1
quorum = {max(1, len(ids) // 2)}                    # accepted updates needed to apply a round
deadline_s = {args.deadline}
state_dir = "state"
allowed_devices = {toml_list(ids)}
# label i is classes[i] on every device (sent in every welcome); empty: labels as stored
classes = {toml_list(classes)}

[broker]
host = "{args.host}"
port = {args.port}
username = "coordinator"
password = "{{password}}"
{tls}
[security]
secret_file = "{FED_SECRET}"      # never copy this file to a device

[model]
input_shape = {toml_list(shape)}
num_classes = {num_classes}
expert_kind = "cnn"
expert_hidden = 32
num_global_experts = 4
top_k = 2
num_local_experts = 1

[train]
local_epochs = 2
batch_size = 32
lr = 0.05
experts_per_client = 2
"""


def agent_toml(args: argparse.Namespace, dev: str, classes: list[str], shape: list[int]) -> str:
    tls = ('tls = true\nca_file = "ca.crt"             # copy the broker CA here\n'
           if args.tls else "tls = false\n")
    data = args.data.replace("{device}", dev)
    source = f'npz = "{data}"' if data.endswith(".npz") else f'image_folder = "{data}"   # one sub-folder per class'
    return f"""# fedcoe agent --config agent.toml   (written by `fedcoe init` for device {dev})
# Relative paths are relative to this file's folder. Holds the broker password: keep it 0600.

[device]
id = "{dev}"
federation = "{args.federation}"
tier = "medium"                # local expert width: small (Pi Zero) | medium | large (Jetson)
state_dir = "state"            # the private level lives here and never leaves the device
bundle = "final"               # int8 ONNX bundle for `fedcoe predict` after the last round

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


def mosquitto_conf(args: argparse.Namespace, root: Path) -> str:
    b = root / "broker"
    if args.tls:
        listener = (f"listener {args.port}\ncafile {b / 'ca.crt'}\ncertfile {b / 'server.crt'}\n"
                    f"keyfile {b / 'server.key'}\ntls_version tlsv1.2\n")
    else:
        listener = f"listener {args.port}\n"
    return f"""# mosquitto -c mosquitto.conf   (written by `fedcoe init`; see deploy/mosquitto/README.md)
per_listener_settings false
{listener}allow_anonymous false
password_file {b / 'passwd'}
acl_file {b / 'acl'}
use_username_as_clientid true
max_packet_size 2000000
# the coordinator needs devices x (window + 4) queued messages (docs/daemons.md, "Scale")
max_queued_messages 100000
persistence false
"""


ACL = """# Mosquitto ACL (written by `fedcoe init`): each device only its own topics.
user coordinator
topic readwrite fl/v1/#

pattern write fl/v1/+/up/%u/#
pattern write fl/v1/+/presence/%u
pattern read fl/v1/+/dn/%u/#
pattern read fl/v1/+/bc/#
pattern read fl/v1/+/coord/status
"""


def run_init(args: argparse.Namespace) -> int:
    from fedcoe_edge.protocol import check_classes, device_key

    out: Path = args.dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; pick a new one")
    ids = parse_ids(args)
    shape = parse_shape(args.image_shape)
    classes = [t.strip() for t in args.classes.split(",") if t.strip()]
    if classes:
        check_classes(classes, "--classes")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.rounds < 1 or not args.deadline > 0:
        raise ConfigError("--rounds must be >= 1 and --deadline > 0")
    final = out.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the secrets inside are 0600 on their own
    try:
        secret = secrets.token_bytes(32)
        passwords = {c: secrets.token_urlsafe(18) for c in ["coordinator", *ids]}
        write_private(tmp / "coordinator" / FED_SECRET, secret.hex() + "\n")
        write_private(tmp / "coordinator" / "coordinator.toml",
                      coordinator_toml(args, ids, classes, shape).replace("{password}", passwords["coordinator"]))
        for dev in ids:
            d = tmp / "devices" / dev
            write_private(d / DEVICE_KEY, device_key(secret, dev).hex() + "\n")
            write_private(d / "agent.toml", agent_toml(args, dev, classes, shape).replace("{password}", passwords[dev]))
        (tmp / "broker").mkdir()
        (tmp / "broker" / "mosquitto.conf").write_text(mosquitto_conf(args, final))
        (tmp / "broker" / "acl").write_text(ACL)
        write_private(tmp / "broker" / "passwd", "".join(f"{u}:{pw}\n" for u, pw in passwords.items()))
        hashed = hash_passwords(tmp / "broker" / "passwd")
        if out.exists():
            out.rmdir()
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(next_steps(args, final, ids, classes, hashed))
    return 0


def hash_passwords(path: Path) -> bool:
    """Hash the plain ``user:password`` lines in place when ``mosquitto_passwd`` exists (the
    configs keep the plain passwords, the broker needs only the hashes)."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return False
    done = subprocess.run([tool, "-U", str(path)], capture_output=True, text=True, check=False)
    return done.returncode == 0


def next_steps(args: argparse.Namespace, root: Path, ids: list[str], classes: list[str],
               hashed: bool) -> str:
    dev0 = ids[0]
    lines = [f"federation {args.federation!r} written to {root}:",
             f"  coordinator/  coordinator.toml, {FED_SECRET} (mode 600: stays on the coordinator)",
             f"  devices/<id>/ agent.toml + {DEVICE_KEY} (that device's key only) for {', '.join(ids)}",
             "  broker/       mosquitto.conf, acl, passwd",
             "",
             "next:"]
    if not hashed:
        lines.append(f"  mosquitto_passwd -U {root / 'broker' / 'passwd'}   # hash the broker passwords")
    if args.tls:
        lines.append("  put ca.crt/server.crt/server.key in broker/ and ca.crt next to every config "
                     "(deploy/mosquitto/README.md shows the openssl steps)")
    lines += [f"  1. broker:      mosquitto -c {root / 'broker' / 'mosquitto.conf'}",
              f"  2. coordinator: fedcoe coordinator --config {root / 'coordinator' / 'coordinator.toml'}",
              f"  3. each device: copy devices/<id>/ to it (e.g. scp -r {root / 'devices' / dev0} "
              f"{dev0}:fedcoe), put its data at {args.data.replace('{device}', '<id>')} "
              f"(relative to agent.toml), then",
              "                  fedcoe agent --config agent.toml",
              f"  4. after round {args.rounds}: fedcoe predict --bundle state/bundle --input x.npy "
              "(on a device)"]
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
