"""``fedcoe coordinator --config coordinator.toml``: run the MQTT coordinator daemon.

Runs FedCoE (arXiv 2605.21264) rounds with partial expert exchange until the configured
number of rounds is done, then keeps serving cold-start fetches (unless
``exit_when_done``). SIGTERM and Ctrl-C stop it cleanly: the coordinator status goes
offline, the database is closed, and a restart resumes from the state folder.

Past one machine (docs/daemons.md, "Past one machine: leader and shard aggregators") the
same command runs as ``--role leader`` (selection, merge, aggregation) or ``--role shard
--shard-index i`` (serves the devices whose id hashes to shard i); ``fedcoe shard-of`` says
which shard, and so which federation id, a device must be configured with.
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
                    "Options can be overridden with FEDCOE_<SECTION>_<KEY> environment variables. "
                    "A fleet past one machine runs one '--role leader' and S '--role shard "
                    "--shard-index i' processes with the same config ([federation] shards = S, "
                    "or --shards S); each shard serves the devices 'fedcoe shard-of' assigns it.",
    )
    p.add_argument("--config", type=Path, required=True, help="coordinator.toml")
    p.add_argument("--rounds", type=int, default=None, help="override [federation] rounds")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit after the last round instead of serving cold-start fetches")
    p.add_argument("--role", choices=["single", "leader", "shard"], default="single",
                   help="single: one coordinator serves every device; leader: selects, merges the "
                        "shards' partial sums and aggregates (talks to shards only); shard: serves "
                        "its devices, sends its partial sums to the leader")
    p.add_argument("--shards", type=int, default=None,
                   help="override [federation] shards (how many shard aggregators)")
    p.add_argument("--shard-index", type=int, default=None,
                   help="with --role shard: which shard this process is, 0..shards-1")
    p.set_defaults(func=run)

    s = sub.add_parser(
        "shard-of",
        help="print the shard and the federation id a device uses when the fleet is sharded",
        description="Which shard aggregator serves a device: sha256(device id) mod shards "
                    "(fedcoe_edge.sharding.shard_of). Prints one line per device, "
                    "'DEVICE_ID SHARD FEDERATION_ID'; put FEDERATION_ID in the device's "
                    "[device] federation (its topics are then fl/v1/FEDERATION_ID/...).",
    )
    s.add_argument("device_ids", nargs="+", metavar="DEVICE_ID", help="device ids")
    s.add_argument("--shards", type=int, default=None,
                   help="how many shard aggregators (default: [federation] shards of --config)")
    s.add_argument("--federation", default=None,
                   help="federation id (default: [federation] id of --config)")
    s.add_argument("--config", type=Path, default=None,
                   help="coordinator.toml to read the federation id and shards from")
    s.set_defaults(func=run_shard_of)


def run_shard_of(args: argparse.Namespace) -> int:
    from fedcoe_edge.errors import ConfigError
    from fedcoe_edge.protocol import load_toml
    from fedcoe_edge.sharding import MAX_SHARDS, shard_federation, shard_of
    from fedcoe_edge.transport.topics import check_id

    fed, shards = args.federation, args.shards
    if args.config is not None:
        doc = load_toml(args.config).get("federation", {})
        fed = fed if fed is not None else doc.get("id", "demo")
        shards = shards if shards is not None else doc.get("shards", 1)
    if fed is None or shards is None:
        raise ConfigError("give --federation and --shards, or --config")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ConfigError(f"--shards must be in 1..{MAX_SHARDS}, got {shards}")
    try:
        check_id(fed, "federation id")
        for d in args.device_ids:
            check_id(d, "device id")
    except Exception as exc:
        raise ConfigError(str(exc)) from None
    for d in args.device_ids:
        i = shard_of(d, shards)
        print(f"{d} {i} {shard_federation(fed, i, shards)}")
    return 0


def run(args: argparse.Namespace) -> int:
    from coordinator.config import Role, load_config
    from coordinator.statelock import StateLock
    from fedcoe_edge.protocol import install_stop_handlers

    cfg = load_config(args.config)
    cfg.broker.check_files(f"{cfg.source}: [broker]")
    if args.rounds is not None:
        cfg.federation.rounds = args.rounds
    if args.shards is not None:
        cfg.federation.shards = args.shards
    cfg.validate()
    role = Role(args.role)
    cfg.check_role(role, args.shard_index)
    if args.exit_when_done:
        cfg.federation.exit_when_done = True
    f = cfg.federation
    if role is Role.LEADER:
        from coordinator.leader import Leader

        leader = Leader(cfg, f.shards)
        install_stop_handlers(leader.stop)
        log.info("leader of %d shard(s) for federation %s on %s:%d, state in %s", f.shards, f.id,
                 cfg.broker.host, cfg.broker.port, leader.state_dir)
        with StateLock(leader.state_dir, "leader"):
            return leader.run()
    if role is Role.SHARD:
        from coordinator.shard import ShardAggregator

        assert args.shard_index is not None
        shard = ShardAggregator(cfg, args.shard_index, f.shards)
        install_stop_handlers(shard.stop)
        log.info("shard %d of %d for federation %s (devices: %s) on %s:%d, state in %s",
                 args.shard_index, f.shards, f.id, shard.fed.id, cfg.broker.host, cfg.broker.port,
                 shard.state_dir)
        with StateLock(shard.state_dir, f"shard {args.shard_index}"):
            return shard.run()
    from coordinator.daemon import Coordinator

    # one coordinator per state folder, taken before the database is opened: a second one
    # exits here, code 2, naming the holder (docs/daemons.md, "One coordinator per state folder")
    with StateLock(cfg.state_dir):
        coord = Coordinator(cfg)
        install_stop_handlers(coord.stop)
        log.info("coordinator %s for federation %s on %s:%d, state in %s", f.coordinator_id,
                 f.id, cfg.broker.host, cfg.broker.port, cfg.state_dir)
        return coord.run()
