"""``fedcoe demo``: a whole FedCoE deployment on one machine, as separate processes.

FedCoE (arXiv 2605.21264) over MQTT, exactly as deployed (docs/design.md, section 8): a private
Mosquitto on a free loopback port from a generated config, the coordinator daemon and six
device agents (``fedcoe coordinator`` / ``fedcoe agent``, one process each) on non-IID
digits, ten rounds with partial expert exchange and int8 delta uploads, then a seventh
device joins cold (gate -> routing prior -> top experts -> predict). It prints one table
row per round and a summary, writes ``--json``, and stops every process cleanly at the
end and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from coordinator.config import EvalSettings, FederationSettings
from device_agent.config import DeviceSettings
from fedcoe_edge.errors import ConfigError, FedCoEError
from fedcoe_edge.io import atomic_write_text
from fedcoe_edge.protocol import device_key

log = logging.getLogger("fedcoe.demo")

MARKER = ".fedcoe-demo"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a full MQTT deployment locally: broker, coordinator, 6 devices + 1 cold",
        description="Start Mosquitto on a free loopback port, the coordinator and N device agents "
                    "as separate processes on non-IID digits, run the rounds, bring one more "
                    "device in cold, print a table per round and a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for configs, state, logs")
    p.add_argument("--json", type=Path, default=None, help="write the summary here (default OUT/demo.json)")
    # every default is the daemons' own (coordinator/config.py, device_agent/config.py)
    p.add_argument("--rounds", type=int, default=FederationSettings.rounds, help="federated rounds")
    p.add_argument("--devices", type=int, default=EvalSettings.num_clients,
                   help="training devices (plus one cold device)")
    p.add_argument("--alpha", type=float, default=EvalSettings.alpha,
                   help="Dirichlet concentration of the label skew")
    p.add_argument("--seed", type=int, default=FederationSettings.seed,
                   help="seed of the partition and the model")
    p.add_argument("--deadline", type=float, default=FederationSettings.deadline_s,
                   help="per-round deadline in seconds")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--bundle", choices=("final", "every", "off"), default=DeviceSettings.bundle,
                   help="when devices rebuild their int8 ONNX bundle")
    p.set_defaults(func=run)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


def toml_text(doc: dict[str, dict[str, Any]], header: str = "") -> str:
    """A flat two-level TOML document (sections of scalars/lists), enough for our configs."""
    lines = [f"# {header}"] if header else []
    for section, values in doc.items():
        lines.append(f"\n[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


class Demo:
    """Owns the processes; ``close()`` stops them all, whatever happened."""

    def __init__(self, args: argparse.Namespace, deadline: float = math.inf) -> None:
        self.args = args
        self.out: Path = args.out.resolve()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.broker: Any = None
        self.federation = "demo"
        self.deadline = deadline  # the time.monotonic() past which ``tick`` gives up

    def start(self) -> None:
        """The broker, the generated configs, the coordinator and the training devices."""
        from fedcoe_edge.broker import MosquittoBroker

        (self.out / "mosquitto").mkdir(exist_ok=True)
        self.broker = MosquittoBroker(workdir=self.out / "mosquitto")
        self.broker.start()
        print(f"mosquitto on 127.0.0.1:{self.broker.port}; configs, state and logs in {self.out}")
        self.write_configs(self.broker.port)
        self.spawn("coordinator", "coordinator", "--config", "coordinator.toml")
        for i in range(self.args.devices):
            self.spawn(f"dev{i}", "agent", "--config", f"agent_dev{i}.toml")

    def open_store(self) -> Any:
        """The coordinator's database, read-only, once the coordinator has created its schema."""
        from coordinator.store import Store

        db = self.out / "coordinator" / "coordinator.sqlite"
        store = None
        while store is None:  # the coordinator creates the database and its schema
            self.tick()
            if db.exists():
                try:
                    store = Store(db, readonly=True)
                    store.rounds()
                except sqlite3.Error:
                    store = None
        return store

    def tick(self) -> None:
        """One wait step: every daemon still alive, the deadline not passed."""
        self.check_alive()
        if time.monotonic() > self.deadline:
            raise FedCoEError(f"demo did not finish within {self.args.timeout:.0f}s (see {self.out}/logs)")
        time.sleep(0.2)

    # --- setup ---
    def write_configs(self, port: int) -> None:
        a, out = self.args, self.out
        secret_file = out / "secret.hex"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_hex(32) + "\n")
            secret_file.chmod(0o600)
        broker = {"host": "127.0.0.1", "port": port}
        data = {"dataset": "digits", "partition": EvalSettings.partition, "num_clients": a.devices,
                "new_clients": EvalSettings.new_clients, "alpha": a.alpha, "seed": a.seed}
        coord = {
            "federation": {"id": self.federation, "algorithm": FederationSettings.algorithm, "seed": a.seed,
                           "rounds": a.rounds, "min_devices": a.devices,
                           "quorum": max(1, (2 * a.devices) // 3), "deadline_s": a.deadline,
                           "state_dir": "coordinator"},
            "broker": broker,
            "security": {"secret_file": "secret.hex"},
            "eval": {k: v for k, v in data.items() if k != "client"} | {"dataset": "digits"},
        }
        atomic_write_text(out / "coordinator.toml", toml_text(coord, "generated by fedcoe demo"))
        secret = bytes.fromhex(secret_file.read_text().strip())
        (out / "keys").mkdir(exist_ok=True)
        for i in range(a.devices + 1):
            cold = i == a.devices
            dev = f"dev{i}"
            doc = {"device": {"id": dev, "federation": self.federation,
                              "role": "cold" if cold else "train",
                              "tier": ("small", "medium", "large")[i % 3], "state_dir": f"devices/{dev}",
                              "bundle": a.bundle},
                   # only its own key: the federation secret would let a device derive
                   # every other device's key and sign in their name
                   "broker": broker, "security": {"key_file": f"keys/{dev}.key"},
                   "data": data | {"client": "new0" if cold else str(i)}}
            key_file = out / "keys" / f"{dev}.key"
            atomic_write_text(key_file, device_key(secret, dev).hex() + "\n")
            key_file.chmod(0o600)
            atomic_write_text(out / f"agent_{dev}.toml", toml_text(doc, "generated by fedcoe demo"))

    def spawn(self, name: str, *argv: str) -> None:
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        f = (logs / f"{name}.log").open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "fedcoe_edge.cli", *argv],
                                            stdout=f, stderr=subprocess.STDOUT, cwd=self.out, env=env,
                                            start_new_session=True)  # Ctrl-C reaches us, we stop them
        f.close()

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.out / "logs" / f"{name}.log").read_text(errors="replace").splitlines()[-5:]
                raise FedCoEError(f"{name} exited with code {p.returncode}: " + " | ".join(tail))

    # --- teardown ---
    def close(self) -> None:
        """SIGTERM every daemon (devices first, the coordinator last), then the broker."""
        order = [n for n in self.procs if n != "coordinator"] + (["coordinator"] if "coordinator" in self.procs else [])
        for name in order:
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name in order:
            p = self.procs[name]
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within 15s; killing it", name)
                p.kill()
                p.wait(timeout=5)
        if self.broker is not None:
            self.broker.close()
            self.broker = None


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def run(args: argparse.Namespace) -> int:
    _prepare_out(args)
    json_path = args.json or args.out / "demo.json"
    t0 = time.monotonic()
    demo = Demo(args, deadline=t0 + args.timeout)

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        summary = _run_federation(demo, t0)
    except KeyboardInterrupt:
        print("\nfedcoe demo: interrupted; stopping every process", file=sys.stderr)
        demo.close()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        demo.close()
    summary["wall_s_with_shutdown"] = round(time.monotonic() - t0, 1)
    atomic_write_text(json_path, json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"\nwrote {json_path}; logs in {demo.out / 'logs'}")
    return 0


def _prepare_out(args: argparse.Namespace) -> None:
    """Check the arguments and give the demo a fresh ``--out`` (only ever one it made itself)."""
    if args.rounds < 1 or args.devices < 2:
        raise ConfigError(f"need --rounds >= 1 and --devices >= 2, got {args.rounds}, {args.devices}")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    if args.out.exists() and any(args.out.iterdir()):
        if not (args.out / MARKER).is_file():
            raise ConfigError(f"--out {args.out} is not empty and not a previous demo folder; "
                              "the demo starts from a fresh state folder")
        shutil.rmtree(args.out)  # a previous demo run: start over
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / MARKER).write_text("fedcoe demo output; removed by the next `fedcoe demo --out` here\n")


def _run_federation(demo: Demo, t0: float) -> dict[str, Any]:
    """Start everything, follow the rounds, bring the cold device in, wait for the bundles."""
    args = demo.args
    demo.start()
    store = demo.open_store()
    rows = _follow_rounds(demo, store)
    cold_dev = f"dev{args.devices}"
    print(f"\n{cold_dev} joins cold: gate -> routing prior on its own data -> top experts -> predict")
    demo.spawn(cold_dev, "agent", "--config", f"agent_{cold_dev}.toml")
    while not [e for e in store.evals("cold") if e["device"] == cold_dev]:
        demo.tick()
    failed = _wait_for_bundles(demo, store) if args.bundle != "off" else []
    check = (bundle_check(demo, store, "dev0")
             if args.bundle != "off" and "dev0" not in failed else None)
    summary = summarize(store, args, rows, cold_dev, time.monotonic() - t0)
    summary["bundle_check"] = check
    summary["bundles"] = sorted(p.parent.parent.name for p in
                                (demo.out / "devices").glob("*/bundle/manifest.json"))
    summary["bundles_failed"] = failed
    store.close()
    return summary


def _follow_rounds(demo: Demo, store: Any) -> list[dict[str, Any]]:
    """Print one table row per round as it closes (and its devices have evaluated)."""
    head = ("| round | devices | accepted | failed | rejected | global acc | global acc, devices' "
            "splits | personal acc | up KB | down KB | refresh KB | full-exchange KB | s |")
    print("global acc: the global model on the class-balanced held-out set; global acc, devices' "
          "splits: the same model on the devices' own test splits, the images personal acc is "
          "scored on (compare these two)")
    print("up/down KB: this round's training uploads / task downloads; refresh KB: the aggregated "
          "gate and held experts each device fetches after a round to score its personal model; "
          "full-exchange KB: what sending every device the whole global model both ways would cost")
    print(head)
    print("|" + "---|" * 13)
    rows: list[dict[str, Any]] = []
    for rnd in range(1, demo.args.rounds + 1):
        while True:
            r = store.round(rnd)
            if r is not None and r["state"] == "closed" and r["global_acc"] is not None:
                break
            demo.tick()
        # the devices evaluate after fetching the aggregated experts; give them a moment
        wait_evals = time.monotonic() + 20
        expected = len(json.loads(r["selected"])) - len(store.events(rnd, "failure"))
        while (len([e for e in store.evals("personal") if e["round"] == rnd]) < expected
               and time.monotonic() < wait_evals):
            demo.tick()
        s = store.round_summary(rnd)
        rows.append(s)
        print(f"| {rnd} | {s['selected']} | {s['accepted']} | {s['failed']} | {s['rejected']} "
              f"| {_fmt(s['global_acc'])} | {_fmt(_global_on_devices(store, rnd))} "
              f"| {_fmt(s['personalized_acc'])} | {s['bytes_up'] / 1024:.1f} "
              f"| {s['bytes_down'] / 1024:.1f} | {s['bytes_refresh'] / 1024:.1f} "
              f"| {s['bytes_full'] / 1024:.1f} | {_fmt(s['wall_s'], '.1f')} |", flush=True)
    return rows


def _global_on_devices(store: Any, rnd: int) -> float | None:
    """The coordinator's accuracy of the round's global model on the devices' own test splits
    (its ``global_devices`` eval row), or None without one."""
    from coordinator.engine import GLOBAL_DEVICES_EVAL

    row = [e for e in store.evals(GLOBAL_DEVICES_EVAL) if e["round"] == rnd]
    return row[0]["correct"] / row[0]["total"] if row and row[0]["total"] else None


def _wait_for_bundles(demo: Demo, store: Any) -> list[str]:
    """Wait until every device has reported (in its heartbeat, through the coordinator) that
    it rebuilt its int8 bundle after the last round, or that it could not; the devices whose
    rebuild failed."""
    print("waiting for the devices' int8 ONNX bundles ...", flush=True)
    failed: list[str] = []
    pending = [f"dev{i}" for i in range(demo.args.devices + 1)]
    while pending:
        demo.tick()
        status = bundle_status(store)
        for dev in list(pending):
            s = status.get(dev)
            if s is None:
                continue
            pending.remove(dev)
            if not s.get("ok"):
                failed.append(dev)
                print(f"{dev}: bundle rebuild failed: {s.get('error')}", flush=True)
    if failed:
        print(f"bundle rebuild failed on {', '.join(failed)} (see their logs)", flush=True)
    return failed


def bundle_check(demo: Demo, store: Any, dev: str) -> dict[str, Any]:
    """What a device runs after the federation: ``dev``'s own signed int8 bundle, opened as
    ``fedcoe predict`` opens it (onnxruntime + numpy, signature checked with the device's
    key), scored on the device's test split beside the accuracy its torch model reported
    for the last round, and its size beside the fp32 weights it holds. This is the export
    step of the demo: the bundle is the one the device rebuilt, not a second model."""
    from device_agent.config import DataSettings
    from device_agent.data import load_demo
    from fedcoe_edge.bundle_sig import BundleKeys
    from fedcoe_edge.runtime import MoESession

    a, state = demo.args, demo.out / "devices" / dev
    data = load_demo(DataSettings(dataset="digits", client=dev.removeprefix("dev"),
                                  partition=EvalSettings.partition, num_clients=a.devices,
                                  new_clients=EvalSettings.new_clients, alpha=a.alpha, seed=a.seed))
    key = bytes.fromhex((demo.out / "keys" / f"{dev}.key").read_text().strip())
    session = MoESession(state / "bundle", keys=BundleKeys(hmac_key=key))
    int8_acc = float((session.predict(data.x_test).argmax(1) == data.y_test).mean())
    torch_eval = [e for e in store.evals("personal") if e["device"] == dev and e["round"] == a.rounds]
    torch_acc = torch_eval[-1]["correct"] / torch_eval[-1]["total"] if torch_eval else None
    bundle_bytes = sum(f.stat().st_size for f in (state / "bundle").iterdir() if f.is_file())
    fp32_bytes = sum((state / f).stat().st_size for f in ("global.safetensors", "local.safetensors")
                     if (state / f).is_file())
    print(f"\n{dev}'s int8 bundle ({state / 'bundle'}, signed {session.verified_by}, experts "
          f"{session.held_experts}): {bundle_bytes / 1024:.1f} KB of ONNX files vs "
          f"{fp32_bytes / 1024:.1f} KB of fp32 weights it trained with; top-1 on its "
          f"{len(data.y_test)} test images {int8_acc:.4f} int8 (onnxruntime, no torch) vs "
          f"{_fmt(torch_acc)} for its torch model after round {a.rounds}", flush=True)
    return {"device": dev, "int8_acc": int8_acc, "torch_acc": torch_acc,
            "test_samples": len(data.y_test), "bundle_bytes": bundle_bytes,
            "fp32_weights_bytes": fp32_bytes, "verified_by": session.verified_by}


def bundle_status(store: Any) -> dict[str, dict[str, Any]]:
    """Each device's last reported bundle rebuild ({"round", "ok", "error"}), from the
    telemetry the coordinator keeps; devices that reported none are absent."""
    out: dict[str, dict[str, Any]] = {}
    for row in store.devices():
        try:
            b = json.loads(row.get("telemetry") or "{}").get("bundle")
        except (ValueError, AttributeError):
            continue
        if isinstance(b, dict):
            out[str(row["id"])] = b
    return out


def summarize(store: Any, args: argparse.Namespace, rows: list[dict[str, Any]], cold_dev: str,
              wall: float) -> dict[str, Any]:
    traffic = store.traffic()
    last = args.rounds
    pers = [e for e in store.evals("personal") if e["round"] == last]
    cold = [e for e in store.evals("cold") if e["device"] == cold_dev]
    up = traffic.get(("up", "train"), 0)
    down_train = traffic.get(("down", "train"), 0)
    down_all = sum(b for (d, _), b in traffic.items() if d == "down")
    full = sum(r["bytes_full"] for r in rows)
    return {
        "rounds_completed": sum(1 for r in rows if r["state"] == "closed"),
        "final_global_acc": rows[-1]["global_acc"],
        # the same global model on the images the personal accuracy is scored on
        "final_global_acc_device_splits": _global_on_devices(store, last),
        "final_personalized_acc": (sum(e["correct"] for e in pers) / sum(e["total"] for e in pers)) if pers else None,
        "cold_start_acc": (cold[-1]["correct"] / cold[-1]["total"]) if cold else None,
        "bytes_up_total": up,
        "bytes_down_total": down_all,
        "bytes_down_train": down_train,
        "bytes_down_refresh": traffic.get(("down", "refresh"), 0),
        "bytes_down_cold_start": traffic.get(("down", "gate"), 0) + traffic.get(("down", "cold"), 0),
        "bytes_full_exchange_equivalent": full,
        "bytes_full_exchange_note": "one full global model per selected device per round, per direction "
                                    "(what FedAvg-style full exchange uploads, and again downloads)",
        "upload_ratio": up / full if full else None,
        "download_train_ratio": down_train / full if full else None,
        "rejected_total": sum(r["rejected"] for r in rows),
        "failed_total": sum(r["failed"] for r in rows),
        "devices": args.devices, "alpha": args.alpha, "seed": args.seed,
        "wall_s": round(wall, 1),
        "rounds": rows,
    }


def print_summary(s: dict[str, Any]) -> None:
    print("\n| metric | value |\n|---|---|")
    for key in ("rounds_completed", "final_global_acc", "final_global_acc_device_splits",
                "final_personalized_acc", "cold_start_acc",
                "bytes_up_total", "bytes_down_total", "bytes_full_exchange_equivalent", "upload_ratio",
                "download_train_ratio", "rejected_total", "failed_total", "wall_s"):
        v = s[key]
        print(f"| {key} | {v:.4f} |" if isinstance(v, float) else f"| {key} | {v} |")
    print("final_global_acc is read on the class-balanced held-out set; "
          "final_global_acc_device_splits and final_personalized_acc on the devices' own test "
          "splits (the same images): personalization is their difference")
    print("upload_ratio = bytes uploaded / full-exchange equivalent; download_train_ratio = task "
          "downloads (gate + assigned experts) / full-exchange equivalent: below 1 is what partial "
          "expert exchange saves")
