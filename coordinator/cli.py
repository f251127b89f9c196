"""``fedcoe coordinator --config coordinator.toml``: run the MQTT coordinator daemon.

Runs FedCoE (arXiv 2605.21264) rounds with partial expert exchange until the configured
number of rounds is done, then keeps serving cold-start fetches (unless
``exit_when_done``). SIGTERM and Ctrl-C stop it cleanly: the coordinator status goes
offline, the database is closed, and a restart resumes from the state folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("fedcoe.coordinator")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="run the MQTT coordinator daemon (rounds, aggregation, persistence)",
        description="Coordinate a FedCoE federation over MQTT: register devices, run rounds with "
                    "a deadline and a quorum, send each device only its top-m experts plus the "
                    "gate, aggregate, checkpoint atomically and log every round in SQLite. "
                    "Options can be overridden with FEDCOE_<SECTION>_<KEY> environment variables.",
    )
    p.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    p.add_argument("--rounds", type=int, default=None, help="override [federation] rounds")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit after the last round instead of serving cold-start fetches")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.config import load_config
    from coordinator.daemon import Coordinator
    from fedcoe_edge.protocol import install_stop_handlers

    cfg = load_config(args.config)
    cfg.broker.check_files(f"{cfg.source}: [broker]")
    if args.rounds is not None:
        cfg.federation.rounds = args.rounds
        cfg.validate()
    if args.exit_when_done:
        cfg.federation.exit_when_done = True
    coord = Coordinator(cfg)
    install_stop_handlers(coord.stop)
    log.info("coordinator %s for federation %s on %s:%d, state in %s", cfg.federation.coordinator_id,
             cfg.federation.id, cfg.broker.host, cfg.broker.port, cfg.state_dir)
    return coord.run()
