"""Minimal systemd notification (``sd_notify``) without extra dependencies.

With ``Type=notify`` and ``WatchdogSec=`` in the unit, systemd sets ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC``; the agent sends ``READY=1`` once it runs, ``WATCHDOG=1`` periodically
and ``STOPPING=1`` on shutdown. Outside systemd every call is a no-op returning False.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier", "sd_notify", "watchdog_interval"]

log = logging.getLogger(__name__)


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``; False when not set/failed."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message, exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), None when off."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class SystemdNotifier:
    """``ready()``, ``watchdog()`` (rate-limited by the caller's loop), ``stopping()``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if environ is None else environ)
        self.enabled = bool(self._env.get("NOTIFY_SOCKET"))
        self.watchdog_interval = watchdog_interval(self._env) if self.enabled else None

    def notify(self, message: str) -> bool:
        return self.enabled and sd_notify(message, self._env)

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")
