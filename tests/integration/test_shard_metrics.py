"""The sharded ingest's Prometheus metrics and the coordinator's evaluation, end to end: real
Mosquitto, real Redis, two real worker processes and a real coordinator process, each
serving /metrics on its own port, scraped over HTTP. The counts are exact: what the devices
sent, answered as the acks say; the coordinator's held-out accuracy is the one evaluating the
published model locally gives."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.evaluate import make_evaluator
from fedmq.net.localbroker import free_port
from fedmq.wire import decode_model
from tests.integration import test_shard_ingest
from tests.integration.shard_fleet import BUNDLE, ShardFleet, assert_exact, wait_for

pytestmark = pytest.mark.integration
# test_shard_ingest's fixtures: a durable Redis and the fleet harness over it
redis_server = test_shard_ingest.redis_server
fleet = test_shard_ingest.fleet

N = 12  # devices whose update counts
RESENT = 3  # of them send their update again (a lost ack): duplicate
EVAL_EXAMPLES = 300


def scrape(port: int) -> dict[str, float]:
    """Every sample of the exporter on ``port``: ``name`` or ``name{k="v",...}`` -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
    return out


def total(ports: list[int], name: str) -> float:
    """A sample summed over the workers."""
    return sum(scrape(p).get(name, 0.0) for p in ports)


def test_workers_and_coordinator_serve_exact_counts_and_the_evaluated_accuracy(
    fleet: ShardFleet,
) -> None:
    workers = {"w1": free_port(), "w2": free_port()}
    coordinator = free_port()
    for name, port in workers.items():
        fleet.start_worker(name, extra=["--metrics-port", str(port)])
    fleet.start_coordinator(target=N, rounds=2, extra=[  # keeps serving after round 1
        "--metrics-port", str(coordinator), "--eval-dataset", "digits",
        "--eval-examples", str(EVAL_EXAMPLES)])
    ports = list(workers.values())
    devices = [f"dev-{i:02d}" for i in range(N)]
    for d in devices[:-1]:
        fleet.publish(1, d)
    wait_for(lambda: fleet.ok_devices(1) == set(devices[:-1]), 30, "the first acks")
    for d in devices[:RESENT]:  # resends of committed updates, each its own commit
        fleet.publish(1, d)
    for d in ("codec-1", "codec-2"):  # not the round's codec (int8)
        fleet.publish(1, d, fleet.update(1, d, codec="float32"))
    fleet.publish(1, "late-1", fleet.update(1, "late-1", claims_round=5))
    fleet.publish(1, "junk-1", b"not an update")
    wait_for(lambda: all(len(fleet.acks.get(d, [])) == 2 for d in devices[:RESENT])
             and all(d in fleet.acks for d in ("codec-1", "codec-2", "late-1", "junk-1")),
             30, "the answers to the resends and the refusals")
    assert fleet.store.model_version() == 0  # N - 1 devices: the round is still open
    fleet.publish(1, devices[-1])  # the N-th closes it
    fleet.wait_version(1, 30)
    wait_for(lambda: scrape(coordinator).get("fedmq_rounds_completed_total") == 1, 30,
             "the coordinator's round metrics")

    assert total(ports, "fedmq_updates_accepted_total") == N
    assert total(ports, "fedmq_updates_duplicate_total") == RESENT
    rejected = {reason: total(ports, f'fedmq_updates_rejected_total{{reason="{reason}"}}')
                for reason in ("bad_codec", "wrong_round", "malformed", "duplicate")}
    assert rejected == {"bad_codec": 2, "wrong_round": 1, "malformed": 1, "duplicate": 0}
    # every update that passed the checks went through exactly one commit: N new, the
    # resends refused by their claims; the refusals never reached the store
    assert total(ports, "fedmq_shard_commit_batch_size_sum") == N + RESENT
    assert total(ports, "fedmq_shard_commit_seconds_count") == total(
        ports, "fedmq_shard_commit_batch_size_count")
    assert total(ports, "fedmq_update_norm_count") == N
    sent = sum(len(p) for p in fleet.sent.values()) + len(b"not an update") + sum(
        len(fleet.sent[(1, d)]) for d in devices[:RESENT])
    assert total(ports, "fedmq_bytes_in_total") == sent
    assert all(scrape(p)["fedmq_updates_accepted_total"] > 0 for p in ports)  # both worked

    got = scrape(coordinator)
    assert got["fedmq_rounds_completed_total"] == 1
    assert (got["fedmq_round_participants_count"], got["fedmq_round_participants_sum"]) == (1, N)
    assert got["fedmq_round_seconds_count"] == 1
    assert (got["fedmq_model_version"], got["fedmq_current_round"]) == (1, 2)
    assert got['fedmq_shard_workers_seen{kind="worker"}'] == 2
    assert got['fedmq_shard_workers_seen{kind="gateway"}'] == 0

    weights = fleet.published(1)
    assert_exact(weights, fleet.reference([set(devices)]))
    evaluator = make_evaluator(BUNDLE, "digits", EVAL_EXAMPLES)
    assert evaluator is not None
    local = evaluator(weights)
    assert got["fedmq_global_accuracy"] == local["accuracy"]
    assert got["fedmq_global_loss"] == local["loss"]
    model = next(m for m in map(decode_model, list(fleet.models)) if m.version == 1)
    assert model.metrics == {"accuracy": local["accuracy"], "loss": local["loss"],
                             "participants": float(N)}
    assert f"model version 1: accuracy {local['accuracy']:.4f}" in fleet.log("coordinator")
