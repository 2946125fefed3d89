"""FedBuff over a real broker and a real aggregator process SIGKILLed mid-buffer: a stale
update (trained on the previous version) is journaled with its staleness weight before its
PUBACK, re-folded exactly after the restart, its redelivery is a duplicate, and the next model
is exactly the staleness-weighted mean. A too-stale update is refused with the staleness in
the reason."""

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


def test_sigkill_mid_buffer_refolds_the_stale_update_exactly(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_WEIGHT_CAP_MULTIPLIER", "0")  # the plain weights
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    state = tmp_path / "state"
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--round-policy", "fedbuff",
        "--buffer-size", "2", "--max-staleness", "1", "--staleness-exponent", "1",
        "--rounds", "3",
    ).start()
    devices = {name: FakeDevice(broker, topics, name) for name in ("a", "b", "slow", "c", "d")}

    def send(dev: str, round_id: int, base: int, delta: dict[str, np.ndarray], n: int) -> str:
        uid = f"r{round_id}-{dev}"
        devices[dev].publish(make_update("f1", round_id, base, dev, delta, n, update_id=uid))
        return uid

    try:
        ann = watcher.round(1)
        assert (ann.base_version, ann.selected) == (0, ())
        w0 = model_weights(watcher.model(0))
        shapes = {k: v.shape for k, v in w0.items()}
        d = {name: exact_delta(shapes, i) for i, name in enumerate(devices)}

        # Buffer 1 (version 0): a and b; "slow" is still training on version 0.
        for dev, n in (("a", 1), ("b", 3)):
            assert acks.wait(dev, update_id=send(dev, 1, 0, d[dev], n)).accepted
        w1 = model_weights(watcher.model(1))
        for name in shapes:
            mean = (d["a"][name] + 3 * d["b"][name]) / 4
            np.testing.assert_array_equal(w1[name], w0[name] + mean)
        assert watcher.round(2).base_version == 1

        # Buffer 2 (version 1): slow's update of round 1 (staleness 1): weight 2 x 1/2 = 1.
        ack = acks.wait("slow", update_id=send("slow", 1, 0, d["slow"], 2))
        assert (ack.accepted, ack.code, ack.round_id) == (True, "ok", 1)
        agg.kill()  # mid-buffer: slow's update is journaled, nothing else
        send("slow", 1, 0, d["slow"], 2)  # slow re-sends (lost ack): queued by the broker
        uid_c = send("c", 2, 1, d["c"], 1)
        agg.start()
        dup = acks.wait("slow", update_id="r1-slow")
        assert (dup.accepted, dup.code, dup.round_id) == (True, RejectReason.DUPLICATE, 2)
        assert acks.wait("c", update_id=uid_c).accepted
        v2 = watcher.model(2)
        assert v2.metrics["participants"] == 2
        w2 = model_weights(v2)
        for name in shapes:
            np.testing.assert_array_equal(w2[name], w1[name] + (d["slow"][name] + d["c"][name]) / 2)

        # Buffer 3 (version 2): an update on version 0 is 2 behind: refused, reason says so.
        old = acks.wait("d", update_id=send("d", 1, 0, d["d"], 1))
        assert (old.accepted, old.code) == (False, RejectReason.WRONG_BASE)
        assert "2 version(s) behind the current version 2 (max_staleness 1)" in old.reason
        for dev in ("a", "b"):
            assert acks.wait(dev, update_id=send(dev, 3, 2, d[dev], 1)).accepted
        watcher.model(3)
        assert agg.wait(60) == 0

        with Store(state) as store:
            assert [(r.round_id, r.status, r.participants) for r in store.history()] == [
                (1, "closed", 2), (2, "closed", 2), (3, "closed", 2)
            ]
            assert [c[1] for c in store.contributions(2)] == ["r2-c", "r1-slow"]
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        for dev in devices.values():
            dev.close()
        acks.close()
        watcher.close()
