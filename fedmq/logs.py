"""Logging set-up and the one wrapper every entry point runs under.

A :class:`~fedmq.errors.FedmqError` becomes one log line and exit code 1, Ctrl-C exit code
130: operators see a reason, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from fedmq.errors import FedmqError

__all__ = ["run_logged", "setup_logging"]


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def run_logged(
    func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, logger: str
) -> int:
    """Set up logging from ``-v``/``-q`` and run ``func``: a FedmqError becomes a one-line
    error and exit code 1, Ctrl-C exit code 130."""
    setup_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False))
    try:
        result = func(args)
    except FedmqError as exc:
        logging.getLogger(logger).error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)
