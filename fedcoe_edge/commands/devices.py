"""``fedcoe devices add NAME [--cold] | remove NAME | list [--json]``: enrol and revoke
devices of a live federation folder written by ``fedcoe init`` (docs/daemons.md, "Adding
and removing devices").

What ``add`` changes is what ``init`` wrote for every device, so a device added later is
provisioned exactly like the first ones:

* ``devices/NAME/device.key`` (its own key, derived from the federation secret) and
  ``devices/NAME/agent.toml`` (``role = "cold"`` with ``--cold``), both mode 600;
* ``broker/passwd`` (a new random password, hashed with ``mosquitto_passwd`` when it is
  installed) and ``broker/acl`` (the device's own entry);
* ``coordinator/coordinator.toml``: the ``allowed_devices`` line.

Then the broker is told to re-read its password file and ACL (SIGHUP to the pid in the
``pid_file`` its ``mosquitto.conf`` names) and the RUNNING coordinator notices the changed
``allowed_devices`` by itself: it looks at its config file's modification time every
second (``coordinator.config.DEVICES_RELOAD_S``). A watched file was chosen over a signed
control message because it needs no second channel, no key on the operator's side beyond
the folder it already holds, and a coordinator that was stopped reads the same list when
it starts. ``remove`` reverses each step (the device's folder moves to ``removed/``) in the
other order: the coordinator's list first, then, ``REMOVE_GRACE_S`` later, the broker's
files and the SIGHUP, since Mosquitto disconnects a client whose login a reload removed;
in between the running coordinator refuses the device and tells it why while it is still
connected.

Every file is written to a temporary file beside it and renamed over the old one, and all
of them are prepared before the first rename: an error (a device added twice, an unknown
device, a broker that cannot be signalled) is one line and exit 2 with nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from coordinator.config import DEVICES_RELOAD_S
from fedcoe_edge.errors import ConfigError
from fedcoe_edge.io import atomic_write_text

__all__ = ["Federation", "add_device", "list_devices", "register", "remove_device"]

ALLOWED_LINE = re.compile(r"^(allowed_devices\s*=\s*)\[[^\]\n]*\](.*)$", re.MULTILINE)
PID_LINE = re.compile(r"^\s*pid_file\s+(\S.*?)\s*$", re.MULTILINE)
# `remove` with a broker to reload: between the coordinator's allowed_devices and the
# broker's files, time for the running coordinator to notice (it looks every
# DEVICES_RELOAD_S) and tell the device why, before Mosquitto disconnects it
REMOVE_GRACE_S = 3 * DEVICES_RELOAD_S
# where init's ACL starts the `%u` patterns every device shares (init.DEVICE_ACL)
PATTERNS_MARK = "# Every device;"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "devices", help="add, remove or list the devices of a live federation (no restart)",
        description="Enrol or revoke one device of a federation folder written by `fedcoe init`: "
                    "its folder (key, agent.toml), the broker's password file and ACL (the "
                    "broker is told to reload them with SIGHUP) and the coordinator's "
                    "allowed_devices, which a running coordinator re-reads within a second. "
                    "Errors are one line and exit 2 with nothing changed (docs/daemons.md, "
                    "\"Adding and removing devices\").")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="provision a new device and allow it")
    add.add_argument("name", help="the new device's id (its MQTT username and client id)")
    add.add_argument("--cold", action="store_true",
                     help="a cold device (role = \"cold\"): joins late, cold-start path only")
    add.add_argument("--data", default="data",
                     help="the device's data path in its agent.toml, as `fedcoe init --data` "
                          "takes it ({device} becomes the id; .npz: an npz file, else an image "
                          "folder)")
    rm = actions.add_parser("remove", help="revoke a device: refused from its next message on")
    rm.add_argument("name", help="the device's id")
    ls = actions.add_parser("list", help="the federation's devices: role, allowed, broker login")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for q in (add, rm, ls):
        q.add_argument("--dir", type=Path, default=Path("."),
                       help="the federation folder `fedcoe init` wrote (default: the current one)")
    for q in (add, rm):
        q.add_argument("--no-reload", action="store_true",
                       help="do not signal the broker (it is stopped and reads the files when it "
                            "starts, or you reload it yourself)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fed = Federation.open(args.dir)
    if args.action == "list":
        rows = list_devices(fed)
        if args.json:
            print(json.dumps({"federation": fed.federation_id, "devices": rows}, indent=2))
        else:
            print(table(rows))
        return 0
    if args.action == "add":
        add_device(fed, args.name, cold=args.cold, data=args.data, reload=not args.no_reload)
        role = "cold" if args.cold else "train"
        print(f"device {args.name!r} added ({role}): {fed.devices_dir / args.name} holds its "
              f"agent.toml and device.key (copy the folder to the device, then: fedcoe agent "
              f"--config agent.toml); the broker {reload_note(args)} and the running coordinator "
              f"allows it within a second")
        if not fed.hashed:
            print(f"  mosquitto_passwd is not installed: hash the new password with "
                  f"mosquitto_passwd -U {fed.passwd}")
        return 0
    moved = remove_device(fed, args.name, reload=not args.no_reload)
    print(f"device {args.name!r} removed: the broker {reload_note(args)}, the running "
          f"coordinator refuses it from its next message on and tells it why (the agent exits "
          f"3); its folder moved to {moved}")
    return 0


def reload_note(args: argparse.Namespace) -> str:
    return "was not signalled (--no-reload)" if args.no_reload else "reloaded its password file and ACL"


@dataclass
class Federation:
    """The files of one federation folder that ``devices`` reads and rewrites."""

    root: Path
    doc: dict[str, Any]  # coordinator.toml, parsed
    hashed: bool = True  # the last password written was hashed

    @classmethod
    def open(cls, root: Path) -> Federation:
        root = Path(root).resolve()
        cdir = root / "coordinator"
        if (cdir / "leader.toml").is_file():
            raise ConfigError(f"{root} is a sharded federation (coordinator/leader.toml): "
                              "`fedcoe devices` handles a single coordinator's folder only")
        for path in (cdir / "coordinator.toml", root / "broker" / "passwd",
                     root / "broker" / "acl", root / "broker" / "mosquitto.conf"):
            if not path.is_file():
                raise ConfigError(f"{root} is not a federation folder written by `fedcoe init` "
                                  f"(no {path.relative_to(root)}); give --dir FOLDER")
        toml = cdir / "coordinator.toml"
        try:
            doc = tomllib.loads(toml.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{toml}: {exc}") from None
        fed = cls(root, doc)
        if not isinstance(fed.section("federation").get("allowed_devices"), list) or \
                not ALLOWED_LINE.search(toml.read_text(encoding="utf-8")):
            raise ConfigError(f"{toml}: [federation] has no one-line allowed_devices = [...] "
                              "list (as `fedcoe init` writes it) to add to or remove from")
        return fed

    def section(self, name: str) -> dict[str, Any]:
        value = self.doc.get(name, {})
        return value if isinstance(value, dict) else {}

    @property
    def coordinator_toml(self) -> Path:
        return self.root / "coordinator" / "coordinator.toml"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def passwd(self) -> Path:
        return self.root / "broker" / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "broker" / "acl"

    @property
    def federation_id(self) -> str:
        return str(self.section("federation").get("id", "demo"))

    @property
    def allowed(self) -> list[str]:
        return [str(d) for d in self.section("federation").get("allowed_devices", [])]

    def broker_users(self) -> list[str]:
        return [ln.split(":", 1)[0] for ln in self.passwd.read_text(encoding="utf-8").splitlines()
                if ":" in ln and not ln.startswith("#")]

    def secret(self) -> bytes:
        from fedcoe_edge.protocol import read_secret

        sec = self.section("security")
        return read_secret(str(sec.get("secret", "")), str(sec.get("secret_file", "")),
                           f"{self.coordinator_toml}: [security] secret",
                           self.coordinator_toml.parent)


# --- the three operations -----------------------------------------------------------------
def add_device(fed: Federation, name: str, cold: bool = False, data: str = "data",
               reload: bool = True) -> None:
    """Provision and allow ``name``; ConfigError (nothing changed) when it exists already,
    its id is not valid, or the broker cannot be signalled."""
    from fedcoe_edge.commands.init import DEVICE_KEY, agent_toml, toml_list, write_private
    from fedcoe_edge.protocol import COORDINATOR_ID, device_key

    check_name(name)
    coordinator = str(fed.section("federation").get("coordinator_id", COORDINATOR_ID))
    if name == coordinator or name == str(fed.section("broker").get("username", "")):
        raise ConfigError(f"device {name!r}: that is the coordinator's id")
    if name in fed.allowed:
        raise ConfigError(f"device {name!r} is already in allowed_devices ({fed.coordinator_toml}); "
                          "`fedcoe devices list` shows the devices")
    if name in fed.broker_users():
        raise ConfigError(f"device {name!r} already has a broker login in {fed.passwd}")
    folder = fed.devices_dir / name
    if folder.exists():
        raise ConfigError(f"{folder} exists already (left from an earlier device?); move it away "
                          "or pick another name")
    pid = broker_pid(fed) if reload else None
    password = secrets.token_urlsafe(18)
    ns = init_args(fed, data)
    shape = [int(v) for v in fed.section("model").get("input_shape", [1, 8, 8])]
    classes = [str(c) for c in fed.section("federation").get("classes", [])]
    toml_text = set_allowed(fed, [*fed.allowed, name], toml_list)
    acl_text = acl_with(fed.acl.read_text(encoding="utf-8"), name, fed.federation_id)
    passwd_text, fed.hashed = passwd_with(fed, name, password)
    key = device_key(fed.secret(), name).hex() + "\n"
    # everything is prepared; now the renames, the device's folder first (a crash after it
    # leaves a folder that is not allowed yet, which a second `add` names)
    fed.devices_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=fed.devices_dir))
    try:
        write_private(tmp / DEVICE_KEY, key)
        write_private(tmp / "agent.toml", agent_toml(ns, name, classes, shape,
                                                     "cold" if cold else "train")
                      .replace("{password}", password))
        tmp.chmod(0o755)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(fed, passwd_text, acl_text, toml_text, pid)


def remove_device(fed: Federation, name: str, reload: bool = True,
                  grace_s: float = REMOVE_GRACE_S) -> Path:
    """Revoke ``name``: out of allowed_devices, then (``grace_s`` later, when the broker is
    reloaded) out of the broker's password file and ACL; its folder moves to
    ``removed/NAME-<UTC time>`` (returned). ConfigError when unknown."""
    from fedcoe_edge.commands.init import toml_list

    if name not in fed.allowed:
        known = ", ".join(fed.allowed) or "none"
        raise ConfigError(f"device {name!r} is not in allowed_devices ({fed.coordinator_toml}); "
                          f"known: {known}")
    pid = broker_pid(fed) if reload else None
    toml_text = set_allowed(fed, [d for d in fed.allowed if d != name], toml_list)
    acl_text = acl_without(fed.acl.read_text(encoding="utf-8"), name)
    passwd_text = "".join(ln + "\n" for ln in fed.passwd.read_text(encoding="utf-8").splitlines()
                          if ln.split(":", 1)[0] != name)
    # the coordinator first: Mosquitto disconnects a client whose login a reload removed,
    # so the running coordinator is given the time to tell the device why before that
    atomic_write_text(fed.coordinator_toml, toml_text,
                      mode=fed.coordinator_toml.stat().st_mode & 0o777)
    if pid is not None:
        time.sleep(grace_s)
    commit(fed, passwd_text, acl_text, None, pid)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved = fed.root / "removed" / f"{name}-{stamp}"
    folder = fed.devices_dir / name
    if folder.is_dir():
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder, moved)
    return moved


def list_devices(fed: Federation) -> list[dict[str, Any]]:
    """One row per device that is allowed or has a folder: its role (from its agent.toml),
    whether the coordinator allows it, and whether the broker has its login."""
    users = set(fed.broker_users())
    names = list(dict.fromkeys([*fed.allowed, *sorted(
        p.name for p in fed.devices_dir.glob("*") if p.is_dir() and not p.name.startswith("."))]))
    rows = []
    for name in names:
        role = "?"
        try:
            doc = tomllib.loads((fed.devices_dir / name / "agent.toml").read_text(encoding="utf-8"))
            role = str(doc.get("device", {}).get("role", "train"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass
        rows.append({"name": name, "role": role, "allowed": name in fed.allowed,
                     "broker_login": name in users,
                     "folder": str(fed.devices_dir / name) if (fed.devices_dir / name).is_dir()
                     else None})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ["device", "role", "allowed", "broker login", "folder"]
    body = [[r["name"], r["role"], "yes" if r["allowed"] else "no",
             "yes" if r["broker_login"] else "no", r["folder"] or "-"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=False)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in [head, *body])


# --- the pieces ---------------------------------------------------------------------------
def check_name(name: str) -> None:
    from fedcoe_edge.transport.topics import check_id

    try:
        check_id(name, "device id")
    except Exception as exc:
        raise ConfigError(str(exc)) from None


def init_args(fed: Federation, data: str) -> argparse.Namespace:
    """The ``fedcoe init`` arguments ``agent_toml`` reads, from the coordinator's config."""
    broker = fed.section("broker")
    return argparse.Namespace(tls=bool(broker.get("tls", False)), data=data, shards=1,
                              federation=fed.federation_id,
                              host=str(broker.get("host", "127.0.0.1")),
                              port=int(broker.get("port", 1883)))


def set_allowed(fed: Federation, names: list[str], toml_list: Any) -> str:
    """coordinator.toml with its ``allowed_devices`` line replaced (comment kept), checked
    to parse to exactly ``names``."""
    text = fed.coordinator_toml.read_text(encoding="utf-8")
    new = ALLOWED_LINE.sub(lambda m: f"{m.group(1)}{toml_list(names)}{m.group(2)}", text, count=1)
    got = tomllib.loads(new).get("federation", {}).get("allowed_devices")
    if got != names:  # e.g. an allowed_devices line outside [federation]
        raise ConfigError(f"{fed.coordinator_toml}: could not rewrite [federation] allowed_devices")
    return new


def acl_with(text: str, name: str, federation: str) -> str:
    """The ACL with ``name``'s own entry (init.device_acl_entry, for ``federation``) before
    the shared ``%u`` patterns."""
    from fedcoe_edge.commands.init import device_acl_entry

    entry = "\n".join(device_acl_entry(name, federation)) + "\n"
    at = text.find(PATTERNS_MARK)
    if at < 0:
        first = re.search(r"^pattern ", text, re.MULTILINE)
        at = first.start() if first else len(text)
    head = text[:at]
    if head and not head.endswith("\n"):
        head += "\n"
    # the entry goes at the end of the device entries, before the blank line above the mark
    stripped = head.rstrip("\n")
    return stripped + "\n" + entry + "\n" + text[at:] if stripped else entry + "\n" + text[at:]


def acl_without(text: str, name: str) -> str:
    """The ACL without ``name``'s ``user`` entry (that line and its ``topic`` lines)."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        if line.strip() == f"user {name}":
            skipping = True
            continue
        if skipping and line.startswith("topic "):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def passwd_with(fed: Federation, name: str, password: str) -> tuple[str, bool]:
    """The password file with ``name`` added, hashed with ``mosquitto_passwd -b`` on a
    private copy when the tool is installed (True), else as a plain line (False)."""
    old = fed.passwd.read_text(encoding="utf-8")
    if old and not old.endswith("\n"):
        old += "\n"
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return old + f"{name}:{password}\n", False
    fd, tmp = tempfile.mkstemp(dir=fed.passwd.parent, prefix=".passwd.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(old)
        done = subprocess.run([tool, "-b", tmp, name, password], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip().splitlines()
            raise ConfigError(f"mosquitto_passwd could not add {name!r}: "
                              f"{why[-1] if why else done.returncode}")
        return Path(tmp).read_text(encoding="utf-8"), True
    finally:
        Path(tmp).unlink(missing_ok=True)


def broker_pid(fed: Federation) -> int:
    """The pid of the broker running ``broker/mosquitto.conf`` (its ``pid_file``), checked
    to be a live Mosquitto this user may signal; ConfigError naming the fix otherwise."""
    conf = fed.root / "broker" / "mosquitto.conf"
    found = PID_LINE.search(conf.read_text(encoding="utf-8"))
    fix = ("start the broker with `mosquitto -c " + str(conf) + "`, or give --no-reload when it "
           "is stopped (it reads the files when it starts)")
    if found is None:
        raise ConfigError(f"broker cannot be signalled: {conf} names no pid_file; add `pid_file "
                          f"{conf.parent / 'mosquitto.pid'}` and restart the broker, or give "
                          "--no-reload and reload it yourself (kill -HUP its pid)")
    path = Path(found.group(1))
    try:
        pid = int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"broker cannot be signalled: pid file {path}: "
                          f"{getattr(exc, 'strerror', None) or exc}; {fix}") from None
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        os.kill(pid, 0)
        if cmdline.parent.parent.is_dir() and b"mosquitto" not in cmdline.read_bytes():
            raise ProcessLookupError
    except ProcessLookupError:
        raise ConfigError(f"broker cannot be signalled: pid {pid} from {path} is not a running "
                          f"mosquitto; {fix}") from None
    except (PermissionError, OSError) as exc:
        raise ConfigError(f"broker cannot be signalled: pid {pid} from {path}: {exc}; run this "
                          "as the broker's user (or root), or give --no-reload") from None
    return pid


def commit(fed: Federation, passwd_text: str, acl_text: str, toml_text: str | None,
           pid: int | None) -> None:
    """Rename the prepared files into place (broker files first, so an added device can log
    in by the time the coordinator allows it; each rename is atomic), then SIGHUP the
    broker."""
    atomic_write_text(fed.passwd, passwd_text, mode=fed.passwd.stat().st_mode & 0o777)
    atomic_write_text(fed.acl, acl_text, mode=fed.acl.stat().st_mode & 0o777)
    if toml_text is not None:
        atomic_write_text(fed.coordinator_toml, toml_text,
                          mode=fed.coordinator_toml.stat().st_mode & 0o777)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            raise ConfigError(f"files written, but the broker (pid {pid}) could not be signalled: "
                              f"{exc}; reload it with kill -HUP") from None
