"""An update a device published with the retain flag is refused `retained` (live, thanks to
retain-as-published, and again on every resubscribe after a restart), never folded; a normal
publish of the same update is then accepted (real Mosquitto, real aggregator process)."""

from __future__ import annotations

from pathlib import Path

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
)

pytestmark = pytest.mark.integration


def test_retained_update_is_refused_every_time_and_never_folded(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    state = tmp_path / "state"
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "1", "--min-updates", "1", "--rounds", "1",
    ).start()
    dev = FakeDevice(broker, topics, "dev0")
    try:
        watcher.round(1)
        shapes = {t.name: t.shape for t in watcher.model(0).tensors}
        payload = make_update("f1", 1, 0, "dev0", exact_delta(shapes, 1), 1, update_id="u1")
        dev.client.publish(topics.update("dev0"), payload, qos=1, retain=True).wait_for_publish(10)
        live = acks.wait("dev0", update_id="u1")
        assert (live.accepted, live.code) == (False, RejectReason.RETAINED)
        assert "must not be retained" in live.reason
        assert agg.stop() == 0  # on the restart's resubscribe the retained update comes again
        agg.start()
        again = acks.wait("dev0", update_id="u1")
        assert (again.accepted, again.code) == (False, RejectReason.RETAINED)
        dev.client.publish(topics.update("dev0"), b"", qos=1, retain=True).wait_for_publish(10)
        dev.publish(payload)  # the same update, not retained
        ok = acks.wait("dev0", update_id="u1")
        assert (ok.accepted, ok.code) == (True, "ok")
        assert watcher.model(1).metrics["participants"] == 1
        assert agg.wait(60) == 0
        log = agg.log()
        assert log.count("retained: updates must not be retained") == 2
        with Store(state) as store:
            assert store.reject_counts()[RejectReason.RETAINED] == 2
            assert [c[1] for c in store.contributions(1)] == ["u1"]
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        dev.close()
        acks.close()
        watcher.close()
