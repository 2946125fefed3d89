"""The bounded ingest queue (aggregator.inbox): a full inbox holds the producer back, never
longer than ``max_wait``; control items and a lone oversized message pass; close releases a
waiting producer; the ``ingest_queue_bytes`` key is validated."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from aggregator.config import AggregatorConfig
from aggregator.inbox import ITEM_OVERHEAD, Inbox
from fedmq.errors import ConfigError

KB = 1024


def _put_in_thread(inbox: Inbox[str], item: str, size: int) -> tuple[threading.Thread, list]:
    done: list[tuple[bool, float]] = []
    t0 = time.monotonic()
    t = threading.Thread(target=lambda: done.append((inbox.put(item, size),
                                                     time.monotonic() - t0)))
    t.start()
    return t, done


def test_full_inbox_blocks_until_the_consumer_takes_one() -> None:
    inbox: Inbox[str] = Inbox(max_bytes=3 * (KB + ITEM_OVERHEAD), max_wait=10.0)
    for i in range(3):
        assert inbox.put(f"m{i}", KB)
    t, done = _put_in_thread(inbox, "m3", KB)
    time.sleep(0.3)
    assert done == [] and len(inbox) == 3  # held back: the producer waits
    assert inbox.get(0) == "m0"
    t.join(5)
    assert done and done[0][0] and done[0][1] < 5
    assert [inbox.get(0) for _ in range(4)] == ["m1", "m2", "m3", None]
    assert inbox.peak_bytes == 3 * (KB + ITEM_OVERHEAD) and inbox.overflows == 0


def test_waits_at_most_max_wait_then_admits_over_the_bound_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox: Inbox[str] = Inbox(max_bytes=KB + ITEM_OVERHEAD, max_wait=0.2)
    assert inbox.put("a", KB)
    with caplog.at_level(logging.WARNING, logger="aggregator.inbox"):
        t0 = time.monotonic()
        assert inbox.put("b", KB) and inbox.put("c", KB)
        elapsed = time.monotonic() - t0
    assert 0.35 < elapsed < 2.0  # two waits of max_wait, then admitted
    assert inbox.overflows == 2 and len(inbox) == 3
    warnings = [r for r in caplog.records if "ingest queue full" in r.getMessage()]
    assert len(warnings) == 1  # one line per episode, not per message
    assert [inbox.get(0) for _ in range(3)] == ["a", "b", "c"]


def test_control_items_and_a_lone_big_message_pass_at_once() -> None:
    inbox: Inbox[str] = Inbox(max_bytes=KB, max_wait=10.0)
    t0 = time.monotonic()
    assert inbox.put("huge", 100 * KB)  # nothing else waits: admitted
    assert inbox.put("connected", control=True)
    assert time.monotonic() - t0 < 1.0
    assert inbox.get(0) == "huge" and inbox.get(0) == "connected"
    assert inbox.get(0.05) is None


def test_close_releases_a_waiting_producer_and_drops_later_items() -> None:
    inbox: Inbox[str] = Inbox(max_bytes=KB + ITEM_OVERHEAD, max_wait=30.0)
    assert inbox.put("a", KB)
    t, done = _put_in_thread(inbox, "b", KB)
    time.sleep(0.2)
    inbox.close()
    t.join(5)
    assert done and done[0][0] is False and done[0][1] < 5
    assert inbox.put("c", 1) is False
    assert inbox.get(0) == "a" and inbox.get(0) is None


def test_ingest_queue_bytes_is_validated() -> None:
    assert AggregatorConfig(model="digits-mlp").ingest_queue_bytes == 16 * 1024 * 1024
    for bad in (0, 1000, -1, True, 1.5e6):
        with pytest.raises(ConfigError, match="ingest_queue_bytes"):
            AggregatorConfig(model="digits-mlp", ingest_queue_bytes=bad)  # type: ignore[arg-type]
