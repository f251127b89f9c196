"""The ``fedcoe`` command line.

Each subcommand lives in its own module exposing ``register(subparsers)``; the parser it adds
sets ``func(args) -> int``. User errors (FedCoEError) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fedcoe_edge.errors import FedCoEError

# Modules that add subcommands, in the order `fedcoe --help` lists them.
COMMAND_MODULES = (
    "fedcoe_edge.commands.simulate",
    "fedcoe_edge.commands.heterogeneity",
    "fedcoe_edge.commands.demo",
    "export.cli",
    "coordinator.cli",
    "device_agent.cli",
    "benchmarks.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoe",
        description="FedCoE on edge devices: simulate federations of dual-level Mixture-of-Experts, "
                    "export int8 ONNX bundles, run the MQTT coordinator and device agents, benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that part of the product is not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedCoEError as exc:
        print(f"fedcoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedcoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
