"""``fedcoe agent --config agent.toml``: run the device agent daemon.

The device side of FedCoE (arXiv 2605.21264): presence with last-will, hello with
capabilities, tasks, local fine-tuning on the device's own data, compressed uploads; its
local experts and local gate stay in its state folder. SIGTERM and Ctrl-C stop it cleanly.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("fedcoe.agent")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent",
        help="run the device agent daemon (MQTT session, local fine-tuning, cold start)",
        description="Join a FedCoE federation over MQTT as one device: train the assigned global "
                    "experts and the private local level on this device's data, upload int8 "
                    "deltas, keep the private level on disk. Options can be overridden with "
                    "FEDCOE_<SECTION>_<KEY> environment variables (e.g. FEDCOE_DEVICE_ID).",
    )
    p.add_argument("--config", type=Path, required=True, help="agent.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from device_agent.config import load_config
    from device_agent.daemon import DeviceAgent, torch_installed
    from fedcoe_edge.protocol import install_stop_handlers

    cfg = load_config(args.config)
    if cfg.device.engine != "onnx" and torch_installed():  # not imported by an inference device
        import torch

        torch.set_num_threads(1)  # an edge device (and the demo's shared CPU): one core for training
    # exporter/quantizer INFO lines (dozens per bundle rebuild) are dropped by the CLI's
    # QuietThirdParty filter unless -v (fedcoe_edge/cli.py)
    cfg.broker.check_files(f"{cfg.source}: [broker]")
    agent = DeviceAgent(cfg)
    install_stop_handlers(agent.stop)
    log.info("agent %s (%s, tier %s) for federation %s on %s:%d", cfg.device.id, cfg.device.role,
             cfg.device.tier, cfg.device.federation, cfg.broker.host, cfg.broker.port)
    return agent.run()
