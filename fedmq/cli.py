"""The ``fedmq`` command: one entry point, a subcommand per role.

Each subcommand lives next to the code it runs and registers itself with
``add_parser(subparsers)``; the modules are imported only when present, so a device with
the ``edge`` extra alone still gets ``fedmq agent`` and a working ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fedmq.errors import FedmqError

__all__ = ["build_parser", "main", "run_logged"]

# (module, function) pairs; each function takes the subparsers object.
_SUBCOMMANDS: tuple[tuple[str, str], ...] = (
    ("aggregator.cli", "add_parser"),
    ("edge_agent.cli", "add_parser"),
    ("fedmq.models.cli", "add_model_subcommands"),
    ("fedmq.demo", "add_parser"),
    ("fedmq.experiment", "add_parser"),
    ("fedmq.broker_tools", "add_parser"),
    ("fedmq.enroll", "add_parser"),
    ("fedmq.fleet_status", "add_parser"),
    ("fedmq.report", "add_parser"),
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


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_logged(args.func, args, "fedmq")


def run_logged(
    func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, logger: str
) -> int:
    """Set up logging from ``-v``/``-q`` and run ``func``: a FedmqError becomes a one-line
    error and exit code 1, Ctrl-C exit code 130."""
    _setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        result = func(args)
    except FedmqError as exc:
        logging.getLogger(logger).error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
