"""Thousands of malformed and adversarial updates through a real Mosquitto to a running
aggregator process; it must not crash, must ack and count every reject by reason, and a valid
round must still complete afterwards with exactly the expected model.

Payloads come from tests/fuzz_payloads.py (seeded). Each one's fate is predicted with the
same pure pieces the engine uses (``decode_update`` with the aggregator's limits, the round's
``RoundState.check`` and the model's ``WeightedSum.check``); mutations that happen to stay
valid are not sent, so every payload sent must be rejected, and the aggregator's counts by
reason (Prometheus endpoint while it runs, SQLite after it stopped, and the acks) must equal
the prediction. Prints payloads fuzzed and rejects by reason.
"""

from __future__ import annotations

import random
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import Rejected
from fedmq.net.localbroker import LocalBroker, free_port
from fedmq.topics import Topics
from fedmq.update.accumulate import WeightedSum
from fedmq.wire import Limits, RoundAnnouncement, decode_update
from tests.fakes import (
    AckLog,
    AggregatorProcess,
    Watcher,
    connect,
    exact_delta,
    make_update,
    model_weights,
)
from tests.fuzz_payloads import fuzz_payload, valid_update_map

pytestmark = pytest.mark.integration

FLEET = "f1"
TO_SEND = 3000
PUBLISHERS = 10
MAX_UPDATE_BYTES = 64 * 1024
MAX_SENT_BYTES = 256 * 1024  # bigger payloads are generated but not sent (broker time)
MAX_CLAIMED_EXAMPLES = 10_000_000  # the aggregator's default
GOOD_COUNTS = (1, 3)  # num_examples of the two valid updates: the mean is exact in float32


class _Oracle:
    """The engine's decision for one payload, from the same pure functions it uses."""

    def __init__(self, ann: RoundAnnouncement, template: dict[str, tuple[int, ...]]) -> None:
        self.limits = Limits(max_bytes=MAX_UPDATE_BYTES)
        self.template = template
        self.plan = RoundPlan(
            round_id=ann.round_id, base_version=ann.base_version, selected=ann.selected,
            target=len(GOOD_COUNTS), min_updates=ann.min_updates, opened_at=ann.opened_at,
            deadline=ann.deadline, abandon_at=ann.deadline, config=ann.config,
        )

    def __call__(self, topic_device: str, payload: bytes) -> str:
        try:
            msg = decode_update(payload, self.limits)
            if not msg.tensors:  # its eval kept: an eval-only report, a valid message
                return "accepted"
            fold = WeightedSum(self.template)
            RoundState(FLEET, self.plan, MAX_CLAIMED_EXAMPLES).check(
                msg, topic_device,
                lambda m: fold.check(m.tensors, m.codec, float(m.num_examples)),
            )
        except Rejected as exc:
            return exc.code
        return "accepted"


def _rejects_from_metrics(port: int) -> Counter[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "fedmq_updates_rejected":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.value:
                    out[sample.labels["reason"]] = int(sample.value)
    return out


@pytest.mark.timeout(240)
def test_fuzzed_updates_are_all_rejected_counted_and_harmless(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics(FLEET, topic_prefix)
    state = tmp_path / "state"
    metrics_port = free_port()
    acks = AckLog(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", str(len(GOOD_COUNTS)), "--min-updates", str(len(GOOD_COUNTS)),
        "--rounds", "1", "--round-timeout", "600", "--max-update-bytes", str(MAX_UPDATE_BYTES),
        "--metrics-port", str(metrics_port),
    ).start()
    publishers: list[mqtt.Client] = []
    t0 = time.monotonic()
    try:
        ann = watcher.round(1, timeout=60)
        v0 = watcher.model(0, timeout=10)
        w0 = model_weights(v0)
        template = {t.name: t.shape for t in v0.tensors}
        oracle = _Oracle(ann, template)

        # Generate until TO_SEND payloads that must be rejected (seeded: reproducible).
        rng = random.Random(20261124)
        batch: list[tuple[str, bytes]] = []
        predicted: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        generated = still_valid = too_big_to_send = 0
        while len(batch) < TO_SEND:
            device = f"fz{generated:05d}"
            base = valid_update_map(rng, template, fleet=FLEET, round_id=ann.round_id,
                                    base_version=ann.base_version, device=device)
            kind, payload = fuzz_payload(rng, base)
            generated += 1
            if len(payload) > MAX_SENT_BYTES:
                too_big_to_send += 1
                continue
            outcome = oracle(device, payload)
            if outcome == "accepted":
                still_valid += 1  # the mutation kept it a valid update: not a fuzz case
                continue
            batch.append((device, payload))
            predicted[outcome] += 1
            kinds[kind] += 1
        generated_s = time.monotonic() - t0

        # Publish them all at once over PUBLISHERS connections (QoS 1).
        for i in range(PUBLISHERS):
            publishers.append(connect(broker, f"fuzz-{topic_prefix}-{i}"))
        t1 = time.monotonic()
        infos = [
            publishers[i % PUBLISHERS].publish(topics.update(device), payload, qos=1)
            for i, (device, payload) in enumerate(batch)
        ]
        for info in infos:
            info.wait_for_publish(60)
        got = acks.wait_count(TO_SEND, timeout=90)
        handled_s = time.monotonic() - t1
        assert agg.proc is not None and agg.proc.poll() is None, "the aggregator died"
        from_metrics = _rejects_from_metrics(metrics_port)
        from_acks = Counter(a.code for a in acks.acks)
        print(
            f"\nfuzz via broker: generated {generated}, sent {len(batch)} "
            f"({sum(len(p) for _, p in batch) / 1e6:.1f} MB; skipped {still_valid} still valid, "
            f"{too_big_to_send} > {MAX_SENT_BYTES} bytes); acks {got}; kinds {dict(kinds)}\n"
            f"rejects by reason predicted {dict(predicted.most_common())}\n"
            f"rejects by reason from /metrics {dict(from_metrics.most_common())}\n"
            f"generated in {generated_s:.1f}s, published and answered in {handled_s:.1f}s "
            f"({len(batch) / handled_s:.0f} payloads/s)"
        )
        assert got == TO_SEND, f"{TO_SEND - got} payload(s) without an ack"
        assert not any(a.accepted for a in acks.acks)
        assert from_acks == predicted
        assert from_metrics == predicted
        assert sorted(a.device for a in acks.acks) == sorted(d for d, _ in batch)

        # The round is intact: two valid updates close it with exactly their weighted mean.
        deltas = [exact_delta(template, 500 + i) for i in range(len(GOOD_COUNTS))]
        good = connect(broker, f"good-{topic_prefix}")
        publishers.append(good)
        for i, (n, delta) in enumerate(zip(GOOD_COUNTS, deltas, strict=True)):
            payload = make_update(FLEET, ann.round_id, ann.base_version, f"good-{i}", delta, n)
            good.publish(topics.update(f"good-{i}"), payload, qos=1).wait_for_publish(10)
        v1 = watcher.model(1, timeout=60)
        assert v1.metrics["participants"] == len(GOOD_COUNTS)
        w1 = model_weights(v1)
        total = np.float32(sum(GOOD_COUNTS))
        for name, base_w in w0.items():
            expected = base_w + sum(
                n * d[name] for n, d in zip(GOOD_COUNTS, deltas, strict=True)
            ) / total
            np.testing.assert_array_equal(w1[name], expected, err_msg=name)
        assert agg.wait(60) == 0
        with Store(state) as store:
            stored = Counter(store.reject_counts())
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
            devices = [c[0] for c in store.contributions(1)]
        print(f"rejects by reason in the store {dict(stored.most_common())}; "
              f"total {time.monotonic() - t0:.1f}s")
        assert stored == predicted
        assert history == [(1, "closed", len(GOOD_COUNTS))]
        assert devices == [f"good-{i}" for i in range(len(GOOD_COUNTS))]
    except BaseException:
        print(agg.log()[-6000:])
        raise
    finally:
        for c in publishers:
            c.disconnect()
            c.loop_stop()
        agg.stop()
        acks.close()
        watcher.close()
