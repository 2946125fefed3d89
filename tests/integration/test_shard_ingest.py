"""Sharded ingest end to end: real Mosquitto ($share, persistent sessions, manual PUBACK),
real Redis, real worker and coordinator processes. Every test asserts the published model
equals, bit for bit, the one-process result over exactly the updates acknowledged."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.inbox import ITEM_OVERHEAD
from aggregator.shard_worker import MAX_BATCH
from fedmq.net.localbroker import LocalBroker
from fedmq.net.localredis import LocalRedis
from tests.integration.shard_fleet import ShardFleet, assert_exact, durable_redis, wait_for


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    yield from durable_redis(tmp_path)


@pytest.fixture
def fleet(broker: LocalBroker, redis_server: LocalRedis, topic_prefix: str,
          tmp_path: Path) -> Iterator[ShardFleet]:
    f = ShardFleet(broker, redis_server, topic_prefix, tmp_path)  # process logs: tmp_path
    yield f
    f.stop()


def _devices(round_id: int, n: int) -> list[str]:
    return [f"dev-{round_id}-{i:03d}" for i in range(n)]


def test_two_workers_two_rounds_equal_the_one_process_model(fleet: ShardFleet) -> None:
    fleet.start_worker("w1")
    fleet.start_worker("w2")
    fleet.start_coordinator(target=30, rounds=2)
    rounds = []
    for r in (1, 2):
        wait_for(lambda r=r: fleet.store.open_round().round_id == r, 30, f"round {r}")  # type: ignore[union-attr]
        devices = _devices(r, 30)
        for d in devices[:25]:
            fleet.publish(r, d)
        for d in devices[:5]:  # resends of the same update (a lost ack): never counted twice
            fleet.publish(r, d)
        for d in devices[25:]:
            fleet.publish(r, d)
        fleet.wait_version(r, 30)
        wait_for(lambda r=r, d=set(devices): fleet.ok_devices(r) == d, 10, "the acks")
        rounds.append(set(devices))
    assert_exact(fleet.published(2), fleet.reference(rounds))
    log = fleet.log("coordinator")
    assert "round 1 closed: 30 update(s) from 2 worker(s)" in log
    assert "round 2 closed: 30 update(s) from 2 worker(s)" in log
    wait_for(lambda: all("duplicate" in fleet.ok_codes(d) for d in _devices(1, 5)), 10,
             "the resends' duplicate acks")


@pytest.mark.parametrize("ack_mode", ["callback", "manual"])
def test_worker_sigkilled_mid_round_and_restarted_loses_and_doubles_nothing(
    fleet: ShardFleet, ack_mode: str
) -> None:
    fleet.start_worker("w1", ack_mode)
    fleet.start_worker("w2", ack_mode)
    fleet.start_coordinator(target=80, rounds=1)
    devices = _devices(1, 80)
    for d in devices[:40]:
        fleet.publish(1, d)
    wait_for(lambda: len(fleet.ok_devices(1)) >= 10, 30, "some commits")
    fleet.kill("w1")  # mid-stream: committed, in flight and queued updates of its session
    for d in devices[40:]:
        fleet.publish(1, d)
    for d in devices[:10]:
        fleet.publish(1, d)  # device resends while w1 is down
    time.sleep(0.5)
    assert (fleet.store.model_version() or 0) == 0  # w1's share is stranded: not closed yet
    fleet.start_worker("w1", ack_mode)  # same name: same client id, session and partial
    fleet.wait_version(1, 60)
    model = fleet.store.model()
    assert model is not None and model["contributors"] == 80
    # every device is answered accepted (ok, or duplicate for a redelivered commit)
    wait_for(lambda: fleet.ok_devices(1) == set(devices), 10, "every device's ack")
    assert_exact(fleet.published(1), fleet.reference([set(devices)]))


def test_coordinator_restart_mid_round(fleet: ShardFleet) -> None:
    fleet.start_worker("w1")
    fleet.start_worker("w2")
    fleet.start_coordinator(target=40, rounds=2)
    devices = _devices(1, 40)
    for d in devices[:20]:
        fleet.publish(1, d)
    wait_for(lambda: len(fleet.ok_devices(1)) == 20, 30, "20 commits")
    fleet.kill("coordinator")
    for d in devices[20:]:  # the workers go on committing while the coordinator is down
        fleet.publish(1, d)
    wait_for(lambda: len(fleet.ok_devices(1)) == 40, 30, "40 commits")
    assert fleet.store.model_version() == 0
    fleet.start_coordinator(target=40, rounds=2)
    fleet.wait_version(1, 30)
    round2 = _devices(2, 40)
    for d in round2:
        fleet.publish(2, d)
    fleet.wait_version(2, 30)
    assert_exact(fleet.published(2), fleet.reference([set(devices), set(round2)]))


def test_worker_that_never_returns_its_devices_are_dropouts(fleet: ShardFleet) -> None:
    fleet.start_worker("w1")
    fleet.start_worker("w2")
    fleet.start_coordinator(target=40, rounds=1, timeout=3.0)
    fleet.kill("w2")  # gone for good; Mosquitto still routes 1/2 of the updates to it
    devices = _devices(1, 40)
    for d in devices:
        fleet.publish(1, d)
    fleet.wait_version(1, 30)
    model = fleet.store.model()
    assert model is not None
    assert 0 < model["contributors"] < 40
    # the committed updates are exactly the acknowledged ones (the dead worker's never are)
    wait_for(lambda: len(fleet.ok_devices(1)) == model["contributors"], 10, "the acks")
    time.sleep(0.2)
    committed = fleet.ok_devices(1)
    assert len(committed) == model["contributors"]
    assert_exact(fleet.published(1), fleet.reference([committed]))


def test_store_outage_workers_exit_unacknowledged_and_nothing_is_lost(
    fleet: ShardFleet, redis_server: LocalRedis
) -> None:
    fleet.start_worker("w1")
    fleet.start_worker("w2")
    fleet.start_coordinator(target=40, rounds=1)
    devices = _devices(1, 40)
    for d in devices:
        fleet.update(1, d)  # encoded while the store is up (the round's base and epoch)
    for d in devices[:20]:
        fleet.publish(1, d)
    wait_for(lambda: len(fleet.ok_devices(1)) == 20, 30, "20 commits")
    redis_server.stop()  # appendfsync always: every commit is in the AOF
    for d in devices[20:]:
        fleet.publish(1, d)
    wait_for(lambda: all(fleet.procs[w].poll() is not None for w in ("w1", "w2")), 30,
             "the workers to exit on the store failure")
    assert {fleet.procs[w].returncode for w in ("w1", "w2")} == {3}
    assert len(fleet.ok_devices(1)) == 20  # nothing was acknowledged without the store
    redis_server.start()
    fleet.start_worker("w1")
    fleet.start_worker("w2")
    if fleet.procs["coordinator"].poll() is not None:
        fleet.start_coordinator(target=40, rounds=1)
    fleet.wait_version(1, 30)
    wait_for(lambda: fleet.ok_devices(1) == set(devices), 10, "every device's ack")
    assert_exact(fleet.published(1), fleet.reference([set(devices)]))


def test_a_burst_is_group_committed_with_a_bounded_queue(fleet: ShardFleet) -> None:
    """600 updates at once to one worker with a 64 KiB ingest queue: they are committed in
    groups (more than one update per commit), the queue never holds more than its bound plus
    one update (the broker keeps the rest), every device gets its ack and the model is
    exact."""
    bound = 65536
    fleet.start_worker("w1", extra=["--ingest-queue-bytes", str(bound)])
    fleet.start_coordinator(target=600, rounds=1, timeout=120)
    devices = _devices(1, 600)
    payloads = [(d, fleet.update(1, d)) for d in devices]
    for d, p in payloads:  # no wait per publish: a burst
        fleet.client.publish(fleet.topics.update(d), p, qos=1)
    fleet.wait_version(1, 120)
    wait_for(lambda: fleet.ok_devices(1) == set(devices), 30, "the acks")
    assert_exact(fleet.published(1), fleet.reference([set(devices)]))
    fleet.stop()
    found = re.findall(r"largest group commit (\d+), queue peak (\d+) bytes", fleet.log("w1"))
    assert found, fleet.log("w1")[-2000:]
    largest, peak = map(int, found[-1])
    assert 1 < largest <= MAX_BATCH
    one = max(len(p) for _, p in payloads) + ITEM_OVERHEAD
    assert one < peak <= bound + one
