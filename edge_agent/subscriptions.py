"""What each SUBSCRIBE asked for, so a SUBACK that refuses some topics is noticed.

A broker may grant a subscription partly: MQTT 5 reason codes >= 0x80, 3.1.1's 0x80. The
device would then stay deaf to that topic (its model, its round, its acks) until it happens
to reconnect; NATS's MQTT gateway does this when it cannot create the JetStream consumer
behind a subscription in time (docs/scaling.md, "Clustered broker: NATS"). So every refused
topic is logged in one line and subscribed again after ``retry_after`` seconds, while the
same connection lasts; a new connection subscribes everything anew and forgets the rest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

__all__ = ["Subscriptions"]

log = logging.getLogger(__name__)


class _Client(Protocol):
    def subscribe(self, topic: list[tuple[str, int]]) -> tuple[Any, int | None]: ...


class Subscriptions:
    """See the module docstring. ``schedule(delay, fn)`` runs ``fn`` later (a daemon timer)."""

    def __init__(self, retry_after: float,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        self.retry_after = retry_after
        self._schedule = schedule or _timer
        self._lock = threading.Lock()
        self._asked: dict[int, list[tuple[str, int]]] = {}
        self._generation = 0
        self.refused = 0  # topics refused so far (tests, counters)

    def subscribe(self, client: _Client, topics: list[tuple[str, int]]) -> None:
        """Subscribe ``topics`` and remember them until their SUBACK."""
        with self._lock:
            _rc, mid = client.subscribe(topics)
            if mid is not None:
                self._asked[mid] = topics

    def new_connection(self) -> None:
        """A new connection: pending SUBACKs and retries of the old one no longer apply."""
        with self._lock:
            self._asked.clear()
            self._generation += 1

    def on_suback(self, client: _Client, mid: int, reason_codes: Sequence[Any]) -> list[str]:
        """The topics the broker refused (subscribed again after ``retry_after``)."""
        with self._lock:
            topics = self._asked.pop(mid, None)
            generation = self._generation
        if topics is None:
            return []
        refused = [t for t, rc in zip(topics, reason_codes, strict=False)
                   if getattr(rc, "is_failure", False)]  # paho: value >= 0x80, both versions
        if not refused:
            return []
        self.refused += len(refused)
        names = ", ".join(t for t, _ in refused)
        log.warning("the broker refused the subscription to %s; subscribing again in %.0fs",
                    names, self.retry_after)

        def again() -> None:
            with self._lock:
                if generation != self._generation:
                    return  # reconnected meanwhile: everything was subscribed anew
            self.subscribe(client, refused)

        self._schedule(self.retry_after, again)
        return [t for t, _ in refused]


def _timer(delay: float, fn: Callable[[], None]) -> None:
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
