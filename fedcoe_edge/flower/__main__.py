"""``python -m fedcoe_edge.flower check [APP] [--run-config "k=v ..."]``: the preflight of a
Flower run (docs/engines.md, "Flower").

It does what the ServerApp does before its first message, here and now: the Flower version is
in the tested range, the run config parses, the federation builds and the strategy's tasks fit
Flower's records. One line and exit 0, or one ``error:`` line and exit 2, so a bad run config
or a strategy Flower cannot carry is found before a SuperLink is asked to start anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedcoe_edge.errors import ConfigError, FedCoEError


def app_run_config(app: Path, overrides: list[str]) -> dict[str, Any]:
    """The run config ``flwr run APP --run-config ...`` hands the apps: the app's
    [tool.flwr.app.config], flattened, with the overrides parsed as Flower parses them."""
    from click import ClickException
    from flwr.common.config import flatten_dict, parse_config_args

    from fedcoe_edge.protocol import load_toml

    path = app / "pyproject.toml"
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (APP is a Flower app folder)")
    doc = load_toml(path)
    config = dict(flatten_dict(doc.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})))
    try:
        config.update(parse_config_args(overrides))
    except ClickException as exc:  # Flower's own parser, flwr run's message
        raise ConfigError(f"--run-config {' '.join(overrides)!r:.80}: {exc.message}") from None
    return config


def check(app: Path, overrides: list[str]) -> str:
    from fedcoe_edge.flower import require_flwr

    version = require_flwr()
    from fedcoe_edge.flower.apps import check_carried, federation_of
    from fedcoe_edge.flower.config import flower_run

    run = flower_run(app_run_config(app, overrides))
    fed = federation_of(run)
    check_carried(run, sorted(fed.clients))
    return (f"ok: {run.algorithm} on flwr {version}: {len(fed.clients)} clients (one SuperNode "
            f"each, partition-id 0..{len(fed.clients) - 1}), {run.sim.rounds} rounds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcoe_edge.flower",
                                     description="FedCoE on Flower: check a run before `flwr run`.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check the Flower version, the run config and the strategy")
    p.add_argument("app", type=Path, nargs="?", default=Path("."), help="Flower app folder")
    p.add_argument("--run-config", action="append", default=[],
                   help='overrides as `flwr run` takes them, e.g. "num-server-rounds=5 alpha=0.1"')
    args = parser.parse_args(argv)
    try:
        print(check(args.app, args.run_config))
    except FedCoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
