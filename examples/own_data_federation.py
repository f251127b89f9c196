"""A coordinator and two device agents on your own data, from Python, over a local MQTT broker.

    python examples/own_data_federation.py --out runs/example-federation
    python examples/own_data_federation.py --broker-port 1883   # a Mosquitto you already run

Each device holds its own ``.npz`` (``x_train, y_train, x_test, y_test``; here written
first: 8x8 grey patterns of three classes, each device skewed toward different ones). The
daemons are the real ones `fedcoe coordinator` / `fedcoe agent` run, here as threads of one
process; the messages go through Mosquitto (started on a free loopback port unless
``--broker-port`` names one). After the last round each device rebuilds its int8 ONNX
bundle and predicts with it. Walkthrough: docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import fedcoe_edge as fe
from coordinator.config import CoordinatorConfig, FederationSettings
from coordinator.daemon import Coordinator
from device_agent.config import AgentConfig, DataSettings, DeviceSettings
from device_agent.daemon import DeviceAgent

CLASSES = ["hstripes", "vstripes", "blob"]
SECRET = bytes(range(32))  # a demo secret; a real federation uses `fedcoe init` (0600 files)


def patterns(n: int, weights: list[float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy 8x8 images of the three classes, drawn with class ``weights``."""
    y = rng.choice(3, size=n, p=np.asarray(weights) / sum(weights))
    yy, xx = np.mgrid[0:8, 0:8]
    x = np.empty((n, 1, 8, 8), np.float32)
    for i, c in enumerate(y):
        phase = rng.integers(0, 2)
        if c == 0:
            img = (yy + phase) % 2
        elif c == 1:
            img = (xx + phase) % 2
        else:
            cy, cx = rng.integers(2, 6, 2)
            img = ((yy - cy) ** 2 + (xx - cx) ** 2) < 4
        x[i, 0] = np.clip(img * 0.8 + rng.normal(0.1, 0.1, (8, 8)), 0, 1)
    return x, y.astype(np.int64)


def write_device_data(folder: Path, weights: list[float], seed: int) -> Path:
    """Your own data, as a device keeps it: one .npz with a train and a test split."""
    rng = np.random.default_rng(seed)
    x_train, y_train = patterns(120, weights, rng)
    x_test, y_test = patterns(40, weights, rng)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def wait_for(cond: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError(f"{what} not reached in {timeout:.0f}s")
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/example-federation"))
    p.add_argument("--broker-port", type=int, default=0, help="an MQTT broker on 127.0.0.1 (0: start one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    args = p.parse_args(argv)

    with contextlib.ExitStack() as stack:
        port = args.broker_port
        if not port:  # a private Mosquitto on a free port, stopped on the way out
            port = stack.enter_context(fe.MosquittoBroker()).port
        broker = fe.BrokerSettings(host="127.0.0.1", port=port)

        # the coordinator: rounds, model and training recipe, the federation's class list
        model = fe.ModelConfig(input_shape=(1, 8, 8), num_classes=len(CLASSES), expert_hidden=16)
        coordinator_cfg = CoordinatorConfig(
            federation=FederationSettings(id="example", rounds=args.rounds, min_devices=2,
                                          quorum=2, deadline_s=120, exit_when_done=False,
                                          state_dir=str(args.out / "coordinator"),
                                          classes=CLASSES),
            broker=broker, secret=SECRET, model=model, train=fe.TrainConfig(local_epochs=2))
        coordinator_cfg.validate()
        coordinator = Coordinator(coordinator_cfg)
        thread = threading.Thread(target=coordinator.run, name="coordinator", daemon=True)
        thread.start()
        stack.callback(thread.join, 30)
        stack.callback(coordinator.stop)

        # two devices, each with its own data skewed toward different classes
        agents: list[Any] = []
        for dev, weights in (("cam-a", [0.7, 0.2, 0.1]), ("cam-b", [0.1, 0.2, 0.7])):
            data = write_device_data(args.out / dev, weights, seed=len(agents))
            cfg = AgentConfig(
                device=DeviceSettings(id=dev, federation="example",
                                      state_dir=str(args.out / dev / "state"), bundle="final"),
                broker=broker, key=fe.device_key(SECRET, dev), data=DataSettings(npz=str(data)))
            cfg.validate()
            agent = DeviceAgent(cfg)
            agent.start()
            stack.callback(agent.close)
            agents.append(agent)

        wait_for(lambda: coordinator.finished, args.timeout, f"{args.rounds} rounds")
        rounds = [coordinator.store.round_summary(r) for r in range(1, args.rounds + 1)]
        print(f"{args.rounds} rounds over Mosquitto on 127.0.0.1:{port}")
        for row in rounds:
            print(f"  round {row['round']}: {row['accepted']} updates accepted, "
                  f"{row['rejected']} rejected, {row['failed']} failed, "
                  f"{row['bytes_up']} bytes up, {row['bytes_down']} bytes down")

        # each device predicts with the bundle it rebuilt after the last round (no torch)
        result: dict[str, object] = {"rounds": rounds, "devices": {}}
        for agent in agents:
            bundle = agent.state_dir / "bundle"
            wait_for(lambda b=bundle, a=agent: (b / "manifest.json").is_file() or a.bundle_error,
                     args.timeout, f"{agent.dev}'s bundle")
            if agent.bundle_error:
                raise RuntimeError(f"{agent.dev}: bundle rebuild failed: {agent.bundle_error}")
            with np.load(args.out / agent.dev / "data.npz") as z:
                x_test, y_test = z["x_test"], z["y_test"]
            session = fe.MoESession(bundle)
            acc = float((session.predict(x_test).argmax(1) == y_test).mean())
            names = session.class_names or CLASSES
            first = names[int(session.predict(x_test[:1]).argmax())]
            print(f"  {agent.dev}: bundle accuracy on its own test split {acc:.3f} "
                  f"({len(y_test)} images; the first is a {first})")
            result["devices"][agent.dev] = {"accuracy": acc, "rounds_done": agent.rounds_done}  # type: ignore[index]
    (args.out / "example.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    try:
        main()
    except fe.FedCoEError as exc:  # bad input: one line, exit 2 (as the CLI does)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
