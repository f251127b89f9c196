"""The ``fedcoe`` command line: the app shell, the top layer (docs/design.md, "Layers").

Each subcommand lives in its own module exposing ``register(subparsers)``; the parser it adds
sets ``func(args) -> int``. User errors (FedCoEError) print one line on stderr and exit 2.
This module and :mod:`fedcoe_edge.commands` are the only part of ``fedcoe_edge`` that names
the packages above the library (the exporter, the daemons, the benchmarks), to assemble
their subcommands; no library module imports them (``tests/test_layers.py``).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fedcoe_edge.errors import FedCoEError
from fedcoe_edge.logsetup import FORMATS, configure

# Modules that add subcommands, in the order `fedcoe --help` lists them; each lives in the
# package of the layer it drives. A package missing from an install drops its commands.
COMMAND_MODULES = (
    "fedcoe_edge.commands.init",
    "fedcoe_edge.commands.devices",
    "fedcoe_edge.commands.simulate",
    "fedcoe_edge.commands.heterogeneity",
    "fedcoe_edge.commands.pretrain",
    "benchmarks.demo",
    "export.cli",
    "coordinator.cli",
    "coordinator.status",
    "device_agent.cli",
    "benchmarks.cli",
)


# What `[train]` adds to the runtime install profile (pyproject.toml): a command that needs
# one of them on a runtime-only device says so in one line instead of a traceback.
TRAIN_PROFILE_MODULES = frozenset({"torch", "onnx", "onnxscript", "sklearn", "scipy",
                                   "matplotlib", "tqdm"})


def version() -> str:
    """The installed distribution's version (a source checkout without metadata: unknown)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fedcoe-edge")
    except PackageNotFoundError:
        return "unknown"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Prints a default only where it says something: not for flags (False), options
    without one (None) or help texts that already name their default; lists print as the
    comma-separated text the option takes, not as a Python list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or action.required or d is None or d is False
                or d == argparse.SUPPRESS or "default" in text.lower() or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

    def _expand_help(self, action: argparse.Action) -> str:
        if isinstance(action.default, list | tuple):
            action = copy.copy(action)
            action.default = ",".join(str(v) for v in action.default)
        return super()._expand_help(action)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedcoe",
        description="FedCoE on edge devices: simulate federations of dual-level Mixture-of-Experts, "
                    "export int8 ONNX bundles, run the MQTT coordinator and device agents, benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="log lines as text (ISO 8601 date first) or one JSON object per "
                             "line (docs/daemons.md, Logs); also accepted after the command")
    parser.add_argument("--version", action="version", version=f"fedcoe {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that part of the product is not installed in this build
            raise
        module.register(sub)
    for p in sub.choices.values():  # one help style for every subcommand, wherever registered
        p.formatter_class = HelpFormatter
        # `fedcoe coordinator --log-format json` reads as naturally as the global form;
        # SUPPRESS keeps the global value when the subcommand does not repeat it
        p.add_argument("--log-format", choices=FORMATS, default=argparse.SUPPRESS,
                       help="log lines as text or JSON (same as before the command)")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but an unknown option is reported with the usage of the
    subcommand it was given to (argparse would print the top-level usage, which does not
    show the subcommand's options)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = _subparsers(parser).get(getattr(args, "command", None) or "", parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


class QuietThirdParty(logging.Filter):
    """Drops INFO/DEBUG lines from the exporter's and quantizer's libraries (onnxruntime's
    quantizer logs through the root logger: thousands of lines per bundle); warnings and
    errors still show, and ``-v`` shows everything."""

    NOISY = ("onnxruntime", "onnxscript", "onnx_ir", "torch/onnx", "torch.onnx")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        where = f"{record.name} {record.pathname.replace(chr(92), '/')}"
        return not any(n in where for n in self.NOISY)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    # the one place logging is configured (docs/daemons.md, "Logs"); commands only log
    configure(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    if not args.verbose:  # also on handlers an embedding program installed before us
        for handler in logging.getLogger().handlers:
            handler.addFilter(QuietThirdParty())
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except FedCoEError as exc:
        print(f"fedcoe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in TRAIN_PROFILE_MODULES:
            raise
        # the package is installed from its wheel, not by name from an index (docs/deploy.md)
        print(f"fedcoe {args.command}: error: needs the train install profile (pip install "
              f"torch==2.13.0, then the wheel with [train]: docs/deploy.md, \"Which install a "
              f"device needs\"); this install has no {exc.name}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedcoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
