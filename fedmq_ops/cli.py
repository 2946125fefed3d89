"""The ``fedmq`` command: one entry point, a subcommand per role.

Each subcommand lives next to the code it runs and registers itself with
``add_parser(subparsers)``; the modules are imported only when present, so a device with
the ``edge`` extra alone still gets ``fedmq agent`` and a working ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedmq.logs import run_logged

__all__ = ["build_parser", "main"]

# (module, function) pairs; each function takes the subparsers object.
_SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("aggregator.cli", "add_parser"),
    ("edge_agent.cli", "add_parser"),
    ("fedmq_ops.model_cli", "add_model_subcommands"),
    ("fedmq_ops.demo", "add_parser"),
    ("fedmq_ops.experiment", "add_parser"),
    ("fedmq_ops.broker", "add_parser"),
    ("fedmq_ops.enroll", "add_parser"),
    ("fedmq_ops.fleet_status", "add_parser"),
    ("fedmq_ops.report", "add_parser"),
    ("fedmq_ops.privacy_cli", "add_parser"),
    ("fedmq_ops.he_cli", "add_parser"),
    ("fedmq_ops.simfleet.cli", "add_parser"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq",
        description="Federated learning for fleets of small devices over MQTT.",
        epilog="Run `fedmq COMMAND --help` for the options of each command.",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, func_name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A missing optional part (not installed on this device) just hides the command.
            if exc.name and (module_name.startswith(exc.name) or exc.name in module_name):
                continue
            raise
        getattr(module, func_name)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_logged(args.func, args, "fedmq")


if __name__ == "__main__":
    sys.exit(main())
