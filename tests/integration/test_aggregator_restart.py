"""SIGKILL the aggregator between rounds and in the middle of a round; after restarts on the
same state directory the round completes and the model is exactly the weighted mean of every
update sent (none lost, none counted twice). Real Mosquitto, real aggregator process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.errors import RejectReason
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from tests.fakes import (
    AckCollector,
    AggregatorProcess,
    FakeDevice,
    Watcher,
    exact_delta,
    make_update,
    model_weights,
)

pytestmark = pytest.mark.integration

COUNTS = (1, 1, 2, 4)  # num_examples per device: total 8, so the mean is exact in float32


def _expected(
    base: dict[str, np.ndarray], deltas: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    total = np.float32(sum(COUNTS))
    return {
        name: base[name] + sum(n * d[name] for n, d in zip(COUNTS, deltas, strict=True)) / total
        for name in base
    }


def test_sigkill_between_and_within_rounds(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The plain weighted mean: no relative weight cap (COUNTS' 4 is above 2 x median 1).
    monkeypatch.setenv("FEDMQ_AGGREGATOR_WEIGHT_CAP_MULTIPLIER", "0")
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    state = tmp_path / "state"
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "4", "--min-updates", "4", "--rounds", "2",
        "--round-timeout", "600",
    ).start()
    devices = [FakeDevice(broker, topics, f"dev{i}") for i in range(4)]

    def send(i: int, round_id: int, base: int, delta: dict[str, np.ndarray]) -> None:
        payload = make_update(
            "f1", round_id, base, f"dev{i}", delta, COUNTS[i], update_id=f"r{round_id}-dev{i}"
        )
        devices[i].publish(payload)

    try:
        # Round 1, undisturbed.
        assert watcher.round(1).base_version == 0
        w0 = model_weights(watcher.model(0))
        shapes = {k: v.shape for k, v in w0.items()}
        deltas1 = [exact_delta(shapes, 100 + i) for i in range(4)]
        for i in range(4):
            send(i, 1, 0, deltas1[i])
            assert acks.wait(f"dev{i}").accepted
        v1 = watcher.model(1)
        w1 = model_weights(v1)
        for name, value in _expected(w0, deltas1).items():
            np.testing.assert_array_equal(w1[name], value)

        # SIGKILL between rounds (round 2 is open, nothing in it yet), then restart.
        assert watcher.round(2).base_version == 1
        agg.kill()
        agg.start()

        # Two updates of round 2 are journaled and acked ...
        deltas2 = [exact_delta(shapes, 200 + i) for i in range(4)]
        for i in (0, 1):
            send(i, 2, 1, deltas2[i])
            assert acks.wait(f"dev{i}", update_id=f"r2-dev{i}").accepted
        # ... then SIGKILL in the middle of the round. While it is down, the broker queues the
        # other two updates for its persistent session, and dev1 re-sends its update (outbox).
        agg.kill()
        send(1, 2, 1, deltas2[1])
        send(2, 2, 1, deltas2[2])
        send(3, 2, 1, deltas2[3])
        agg.start()

        for i in (2, 3):
            assert acks.wait(f"dev{i}", update_id=f"r2-dev{i}").accepted
        dup = acks.wait("dev1", update_id="r2-dev1")  # already folded: said so, not refolded
        assert (dup.accepted, dup.code, dup.round_id) == (True, RejectReason.DUPLICATE, 2)

        v2 = watcher.model(2)
        assert v2.metrics["participants"] == 4 and v2.metrics["num_examples"] == 8
        w2 = model_weights(v2)
        for name, value in _expected(w1, deltas2).items():
            np.testing.assert_array_equal(w2[name], value)
        assert agg.wait(60) == 0

        with Store(state) as store:
            assert [(r.round_id, r.status, r.participants) for r in store.history()] == [
                (1, "closed", 4), (2, "closed", 4)
            ]
            assert [c[1] for c in store.contributions(2)] == [f"r2-dev{i}" for i in range(4)]
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        for d in devices:
            d.close()
        acks.close()
        watcher.close()
