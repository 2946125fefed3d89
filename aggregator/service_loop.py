"""The shells the sharded ingest's service processes share (docs/scaling.md): the blocking
MQTT loop a SIGTERM/SIGINT ends, and the ``main(argv)`` that turns the expected errors into
one log line and an exit code."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import redis

from fedmq.logs import setup_logging
from fedmq.net.mqtt import MqttSettings, connect

__all__ = ["EXIT_STORE", "add_service_flags", "run_until_signalled", "service_main"]

EXIT_STORE = 3  # the store failed: the message in hand was not acknowledged


def run_until_signalled(client: mqtt.Client, settings: MqttSettings, *,
                        ping: Callable[[], object], failed: threading.Event,
                        stopped: Callable[[], None]) -> int:
    """Check the store with ``ping``, then serve ``client`` until a signal disconnects it.
    ``failed`` set: :data:`EXIT_STORE`; else ``stopped()`` logs the stop and the exit code is 0."""
    def stop(signum: int, frame: Any) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ping()
    connect(client, settings, asynchronous=False)
    client.loop_forever(retry_first_connection=True)
    if failed.is_set():
        return EXIT_STORE
    stopped()
    return 0


def add_service_flags(p: argparse.ArgumentParser, *,
                      session_expiry: bool) -> argparse.ArgumentParser:
    """Add the flags a service's parser ends with (``--session-expiry`` for an MQTT
    session, ``--ready-file``, ``-v``) and return ``p``."""
    if session_expiry:
        p.add_argument("--session-expiry", type=int, default=7 * 24 * 3600)
    p.add_argument("--ready-file", default="", help="written once subscribed (tests)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def service_main(parser: argparse.ArgumentParser, argv: list[str] | None,
                 run: Callable[[argparse.Namespace], int], *, log: logging.Logger,
                 expected: tuple[type[Exception], ...] = (),
                 prefix: Callable[[argparse.Namespace], str] = lambda args: "") -> int:
    """Parse ``argv``, set up logging and return ``run(args)``. An ``expected`` error becomes
    one line ``<prefix>: <error>`` on ``log`` and exit code :data:`EXIT_STORE` for a Redis
    error, else 1."""
    args = parser.parse_args(argv)
    setup_logging(args.verbose, False)
    if not expected:
        return run(args)
    try:
        return run(args)
    except expected as exc:
        log.error("%s: %s", prefix(args), exc or type(exc).__name__)
        return EXIT_STORE if isinstance(exc, redis.RedisError) else 1
