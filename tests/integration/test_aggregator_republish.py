"""A finished federation (``--rounds``) restarted after its last round still connects and
republishes its retained model and clears the retained round, whatever the broker holds
(an older model and a stale round, or nothing), then exits 0 (real Mosquitto and process)."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq.wire import RoundAnnouncement, TrainingConfig, decode_model, encode
from tests.fakes import AggregatorProcess, FakeDevice, Watcher, connect, exact_delta, make_update

pytestmark = pytest.mark.integration


class _Retained:
    """Every message on the model and round topics, in arrival order (payload b"" = cleared)."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self.topics = topics
        self.seen: list[tuple[str, bytes]] = []
        self._cond = threading.Condition()
        self.client = connect(b)
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a, **_k: subscribed.set()
        self.client.on_message = self._on_message
        self.client.subscribe([(topics.model, 1), (topics.round, 1)])
        assert subscribed.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        kind = "model" if msg.topic == self.topics.model else "round"
        with self._cond:
            self.seen.append((kind, bytes(msg.payload)))
            self._cond.notify_all()

    def wait_for(self, kind: str, payload_ok: object, start: int, timeout: float = 60.0) -> None:
        def found() -> bool:
            return any(k == kind and payload_ok(p) for k, p in self.seen[start:])  # type: ignore[operator]

        with self._cond:
            assert self._cond.wait_for(found, timeout), (kind, self.seen[start:])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_finished_federation_republishes_on_restart(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics("f1", topic_prefix)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "state",
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "1", "--min-updates", "1", "--rounds", "1",
    ).start()
    dev = FakeDevice(broker, topics, "dev0")
    spy: _Retained | None = None
    try:
        watcher.round(1)
        v0 = watcher.model(0)
        shapes = {t.name: t.shape for t in v0.tensors}
        dev.publish(make_update("f1", 1, 0, "dev0", exact_delta(shapes, 1), 1, update_id="u1"))
        assert watcher.model(1).version == 1
        assert agg.wait(60) == 0

        def is_v1(p: bytes) -> bool:
            return bool(p) and decode_model(p).version == 1

        # The broker lost our retained state to an older autosave: model v0 and round 1.
        stale_round = RoundAnnouncement("f1", 1, 0, 1e12, TrainingConfig(codec="float32"))
        for topic, payload in ((topics.model, encode(v0)), (topics.round, encode(stale_round))):
            dev.client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        spy = _Retained(broker, topics)
        spy.wait_for("model", lambda p: bool(p) and decode_model(p).version == 0, 0)
        mark = len(spy.seen)
        assert agg.start().wait(60) == 0
        spy.wait_for("model", is_v1, mark)
        spy.wait_for("round", lambda p: p == b"", mark)

        # No retained model at all.
        dev.client.publish(topics.model, b"", qos=1, retain=True).wait_for_publish(10)
        spy.wait_for("model", lambda p: p == b"", mark)
        mark = len(spy.seen)
        assert agg.start().wait(60) == 0
        spy.wait_for("model", is_v1, mark)
        assert "Traceback" not in agg.log()
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        dev.close()
        watcher.close()
        if spy is not None:
            spy.close()
