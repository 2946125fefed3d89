"""The bounded hand-over between paho's network thread and the aggregator's main thread.

Why a bound: paho's network thread reads the socket and calls ``on_message``, the main
thread folds. With an unbounded queue the broker's whole backlog moves into the
aggregator's memory whenever updates arrive faster than they are folded (10,000
fmnist-cnn devices sending at once: 82 -> 690 MiB, docs/scaling.md). Mosquitto does not
hold back on its own: a ``manual_ack`` client still gets its in-flight window of QoS 1
messages, and one more per PUBACK (receive-maximum behaves the same, cf. mosquitto#2301).
So :meth:`Inbox.put` blocks while more than ``max_bytes`` wait: paho's network thread
then stops reading, the socket buffers fill, TCP pushes back, and the backlog stays in
the broker (which keeps it for the persistent session anyway).

What a blocked network thread must not break:

- **Exactly-once and journaling are untouched.** The PUBACK of an update is still sent by
  the main thread (``client.ack``) after the update is journaled; the inbox only decides
  *when* a message is handed over, never whether it is acknowledged. An item that never
  reaches the main thread is never acknowledged, so the broker redelivers it, and a
  redelivery of a journaled update is answered ``duplicate``, never folded twice.
- **The main thread never waits on the network thread.** ``client.publish`` and
  ``client.ack`` from the main thread only append to paho's outgoing list (paho 2.x with
  ``loop_start``: the writes happen on the network thread; ``on_message`` runs under
  ``_in_callback_mutex`` only, which those calls do not take). The only waits on the
  network thread are at shutdown (retained publishes acknowledged, ``loop_stop``):
  :meth:`Inbox.close` is called first, which releases a blocked ``put`` at once and makes
  every later one return immediately (those messages stay unacknowledged: redelivered to
  the next session).
- **Keepalive.** While ``put`` blocks, paho sends nothing: no PUBACK (they queue up until
  the network thread runs again) and no PINGREQ. Mosquitto drops a client it has heard
  nothing from for 1.5 x keepalive. Normally the main thread frees space within
  milliseconds (one fold), the network thread runs, and the queued PUBACKs go out, which
  count as traffic. If the main thread is busy for long (closing a round, evaluating), a
  ``put`` waits at most ``max_wait`` (the service uses keepalive / 4) and then admits the
  message over the bound, with one WARNING line per episode: paho's loop runs between two
  messages, so a PINGREQ is due at most keepalive + max_wait after the last packet out,
  before the broker's 1.5 x keepalive deadline. The overshoot is bounded in time: at most
  one message per ``max_wait`` while the main thread is stalled.
- Control items (a new connection) are always admitted: they carry no payload.

A single message larger than the bound is admitted when nothing else waits, so the bound
never rejects a message (``max_update_bytes`` does that, with a reason on the ack topic).
Each item is counted as its payload plus :data:`ITEM_OVERHEAD` bytes of Python objects.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Generic, TypeVar

__all__ = ["ITEM_OVERHEAD", "Inbox"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ITEM_OVERHEAD = 512  # bytes per queued item beyond its payload (dataclass, topic, deque slot)


class Inbox(Generic[T]):
    """FIFO bounded by bytes: ``put`` (network thread) waits for room at most ``max_wait``
    seconds, ``get`` (main thread) frees it."""

    def __init__(self, max_bytes: int, max_wait: float) -> None:
        if max_bytes < 1 or not max_wait > 0:
            raise ValueError("max_bytes and max_wait must be > 0")
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self._items: collections.deque[tuple[T, int]] = collections.deque()
        self._bytes = 0
        self._closed = False
        self._overflowing = False
        self._cond = threading.Condition()
        self.peak_bytes = 0  # the most ever waiting (tests, and the log line)
        self.overflows = 0  # messages admitted over the bound after max_wait

    @property
    def waiting_bytes(self) -> int:
        with self._cond:
            return self._bytes

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T, payload_bytes: int = 0, *, control: bool = False) -> bool:
        """Queue ``item``; False (dropped) once closed. Waits while the bound is exceeded,
        except for ``control`` items, the first item of an empty inbox, and after
        ``max_wait`` seconds (admitted over the bound, one WARNING per episode)."""
        size = payload_bytes + ITEM_OVERHEAD
        with self._cond:
            deadline = time.monotonic() + self.max_wait
            while (not control and not self._closed and self._items
                   and self._bytes + size > self.max_bytes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.overflows += 1
                    if not self._overflowing:
                        self._overflowing = True
                        log.warning(
                            "ingest queue full (%d bytes waiting, bound %d) and the main "
                            "thread took nothing for %.1fs: admitting messages over the bound "
                            "(one per %.1fs) so the MQTT connection stays alive",
                            self._bytes, self.max_bytes, self.max_wait, self.max_wait,
                        )
                    break
                self._cond.wait(remaining)
            if self._closed:
                return False
            self._items.append((item, size))
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None = None) -> T | None:
        """The oldest item, or None when none came within ``timeout`` (0: do not wait)."""
        with self._cond:
            if not self._items and timeout != 0:
                self._cond.wait_for(lambda: bool(self._items), timeout)
            if not self._items:
                return None
            item, size = self._items.popleft()
            self._bytes -= size
            if self._overflowing and self._bytes <= self.max_bytes // 2:
                self._overflowing = False
                log.info("ingest queue back under its bound (%d bytes waiting)", self._bytes)
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Release a waiting ``put`` and refuse every later one (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
