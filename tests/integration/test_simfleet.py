"""The simulated fleet (``fedmq fleet simulate``) against a real aggregator on a real Mosquitto.

200 devices in two processes (one MQTT connection each, signed updates, keys enrolled in the
aggregator's registry) take part in two rounds of digits-mlp with int8 synthetic deltas:
the aggregator must fold exactly the 400 updates the plan says (none lost, none twice, by
update id in its store), and each published model must equal the previous one plus the
example-weighted mean of the decoded deltas, recomputed here from the plan's seed. With a
dropout fraction, exactly that many devices stay silent and the round closes at its deadline
with the others.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq_ops.simfleet import (
    Arrival,
    FleetPlan,
    FleetReport,
    FleetSpec,
    ShardSettings,
    enroll_fleet,
    run_fleet,
)
from tests.fakes import AggregatorProcess, Watcher, model_weights

pytestmark = pytest.mark.integration

FLEET = "f1"


def _check_model(prev: dict[str, np.ndarray], new: dict[str, np.ndarray],
                 mean: dict[str, np.ndarray]) -> None:
    for name, base in prev.items():
        expected = base.astype(np.float64) + mean[name]
        np.testing.assert_allclose(new[name], expected, rtol=0, atol=1e-6, err_msg=name)


@contextmanager
def _aggregator(broker: LocalBroker, topic_prefix: str, state: Path,
                *args: str) -> Iterator[tuple[AggregatorProcess, Watcher]]:
    """A real aggregator process and a watcher of the fleet's retained topics; the
    aggregator's log is printed when the test fails, and both are stopped at the end."""
    watcher = Watcher(broker, Topics(FLEET, topic_prefix))
    agg = AggregatorProcess(broker, topic_prefix, state, *args).start()
    try:
        yield agg, watcher
    except BaseException:
        print(agg.log()[-8000:])
        raise
    finally:
        agg.stop()
        watcher.close()


def test_200_devices_two_rounds_exact(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    n = 200
    plan = FleetPlan(n, seed=11, name="sim")
    registry = tmp_path / "devices.json"
    assert enroll_fleet(plan, registry) == n
    assert enroll_fleet(plan, registry) == 0  # idempotent
    state = tmp_path / "state"
    with _aggregator(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "int8", "--selection", "any",
        "--clients-per-round", str(n), "--min-updates", str(n), "--rounds", "2",
        "--round-timeout", "300", "--registry", str(registry),
    ) as (agg, watcher):
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                 topic_prefix=topic_prefix, sign=True, rounds=2, timeout=120)
        report = run_fleet(FleetSpec(plan, settings, processes=2))
        print("\n".join(report.lines()))
        assert report.completed
        assert len(report.shards) == 2 and {s.devices for s in report.shards} == {100}
        assert report.total("sent") == 2 * n and report.total("accepted") == 2 * n
        assert report.rejected == {} and report.total("expired") == 0
        assert report.total("acks_unknown") == 0
        assert agg.wait(60) == 0

        v0, v1, v2 = (watcher.model(v, timeout=10) for v in (0, 1, 2))
        epoch = v0.epoch
        with Store(state) as store:
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
            assert store.reject_counts() == {}
            for r in (1, 2):
                contributions = store.contributions(r)
                ids = Counter(uid for _, uid, _, _ in contributions)
                assert max(ids.values()) == 1  # none folded twice
                assert {(d, uid) for d, uid, _, _ in contributions} == {
                    (d, plan.update_id(d, epoch, r)) for d in plan.device_ids()
                }
                assert {(d, k) for d, _, k, _ in contributions} == {
                    (d, plan.num_examples(d, r)) for d in plan.device_ids()
                }
        assert history == [(1, "closed", n), (2, "closed", n)]

        shapes = {t.name: tuple(t.shape) for t in v0.tensors}
        w0, w1, w2 = model_weights(v0), model_weights(v1), model_weights(v2)
        _check_model(w0, w1, plan.expected_mean(plan.device_ids(), 1, shapes, "int8"))
        _check_model(w1, w2, plan.expected_mean(plan.device_ids(), 2, shapes, "int8"))


def test_dropout_fraction_sends_the_rest(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    n, dropout = 120, 0.25
    plan = FleetPlan(n, seed=5, name="drop", dropout=dropout, arrival=Arrival("spread", 1.0))
    senders = plan.senders(1)
    assert len(senders) == 90 and len(plan.dropped(1)) == 30
    state = tmp_path / "state"
    # The round opens once all 120 are online; it closes at its deadline with the 90.
    with _aggregator(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "int8", "--selection", "any",
        "--clients-per-round", str(n), "--min-updates", "10", "--min-devices", str(n),
        "--rounds", "1", "--round-timeout", "6",
    ) as (agg, watcher):
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                 topic_prefix=topic_prefix, rounds=1, timeout=90)
        # 120 connections, one thread: no paho network thread is ever started.
        threads_seen: set[str] = set()
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                threads_seen.update(t.name for t in threading.enumerate())

        sampler = threading.Thread(target=sample, name="sampler")
        sampler.start()
        try:
            report = run_fleet(FleetSpec(plan, settings, processes=1))
        finally:
            sampling.set()
            sampler.join()
        print("\n".join(report.lines()))
        assert report.completed
        assert report.shards[0].peak_connected == n
        assert not [t for t in threads_seen if t.startswith("paho-mqtt-client-drop")]
        assert report.total("dropouts") == 30
        assert report.total("sent") == 90 and report.total("accepted") == 90
        assert agg.wait(60) == 0
        v0, v1 = watcher.model(0, timeout=10), watcher.model(1, timeout=10)
        with Store(state) as store:
            contributions = store.contributions(1)
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
        assert history == [(1, "closed", 90)]
        assert {(d, uid) for d, uid, _, _ in contributions} == {
            (d, plan.update_id(d, v0.epoch, 1)) for d in senders
        }
        shapes = {t.name: tuple(t.shape) for t in v0.tensors}
        _check_model(model_weights(v0), model_weights(v1),
                     plan.expected_mean(senders, 1, shapes, "int8"))


def test_devices_train_for_real_on_their_own_shards(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """``--train digits``: each device trains digits-mlp with LiteRT on its own iid shard;
    the example counts are the shard sizes and the federated model learns (held-out digits
    accuracy, evaluated by the aggregator)."""
    n = 30
    plan = FleetPlan(n, seed=2, name="trn")
    state = tmp_path / "state"
    with _aggregator(
        broker, topic_prefix, state,
        "--eval-dataset", "digits", "--codec", "int8", "--selection", "any",
        "--clients-per-round", str(n), "--min-updates", str(n), "--rounds", "3",
        "--round-timeout", "120", "--epochs", "2", "--lr", "0.1",
    ) as (agg, watcher):
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                 topic_prefix=topic_prefix, rounds=3, timeout=120,
                                 train_dataset="digits", train_model="digits-mlp")
        report = run_fleet(FleetSpec(plan, settings, processes=1))
        print("\n".join(report.lines()))
        assert report.completed and report.total("accepted") == 3 * n
        assert agg.wait(60) == 0
        v0, v3 = watcher.model(0, timeout=10), watcher.model(3, timeout=10)
        with Store(state) as store:
            claimed = {d: k for d, _, k, _ in store.contributions(1)}
        from fedmq.data.datasets import load_dataset
        from fedmq.data.partition import partition

        train, _ = load_dataset("digits")
        sizes = [len(p) for p in partition(train.y, n, "iid", plan.seed)]
        assert claimed == {plan.device_id(i): sizes[i] for i in range(n)}
        print(f"accuracy: v0 {v0.metrics.get('accuracy')}, v3 {v3.metrics['accuracy']}")
        # 30 devices of ~45 examples, 3 rounds: from chance (~10 %) to well above it
        assert v3.metrics["accuracy"] > v0.metrics["accuracy"] + 0.3


def test_unanswered_updates_are_resent_and_counted_once(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """The aggregator is down when the fleet sends: no acks, so every device resends the
    same update id after ``ack_timeout``; the broker keeps originals and resends for the
    aggregator's persistent session, the restarted aggregator folds one per device and
    answers the rest ``duplicate``, and each device counts its update once."""
    n = 60
    plan = FleetPlan(n, seed=8, name="rsd")
    state = tmp_path / "state"
    results: list[FleetReport] = []
    with _aggregator(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "int8", "--selection", "any",
        "--clients-per-round", str(n), "--min-updates", str(n), "--rounds", "1",
        "--round-timeout", "300",
    ) as (agg, watcher):
        watcher.round(1, timeout=30)
        assert agg.stop() == 0  # the retained model and round stay; its session queues
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                 topic_prefix=topic_prefix, rounds=1, timeout=90,
                                 ack_timeout=1.0)
        fleet = threading.Thread(
            target=lambda: results.append(run_fleet(FleetSpec(plan, settings, 1))))
        fleet.start()
        time.sleep(3.5)  # sent, then resent at +1 s and +3 s without answers
        agg.start()
        fleet.join(120)
        assert results, "the fleet did not finish"
        report = results[0]
        print("\n".join(report.lines()))
        assert report.completed
        assert report.total("accepted") == n and report.rejected == {}
        assert report.total("resent") >= n and report.total("expired") == 0
        assert agg.wait(60) == 0
        v0, v1 = watcher.model(0, timeout=10), watcher.model(1, timeout=10)
        with Store(state) as store:
            contributions = store.contributions(1)
        assert sorted(uid for _, uid, _, _ in contributions) == sorted(
            plan.update_id(d, v0.epoch, 1) for d in plan.device_ids())
        shapes = {t.name: tuple(t.shape) for t in v0.tensors}
        _check_model(model_weights(v0), model_weights(v1),
                     plan.expected_mean(plan.device_ids(), 1, shapes, "int8"))
