"""The harness itself: a real broker that delivers retained QoS 1 messages and restarts."""

from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
import pytest

from fedmq.net.localbroker import LocalBroker

pytestmark = pytest.mark.integration


def _roundtrip(b: LocalBroker, topic: str, payload: bytes) -> bytes:
    got: list[bytes] = []
    done = threading.Event()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(b.host, b.port)
    pub.loop_start()
    pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        done.set()

    sub.on_message = on_message
    sub.connect(b.host, b.port)
    sub.subscribe(topic, qos=1)
    sub.loop_start()
    done.wait(5)
    for c in (pub, sub):
        c.loop_stop()
        c.disconnect()
    assert got, f"no message on {topic}"
    return got[0]


def test_broker_delivers_retained(broker: LocalBroker, topic_prefix: str) -> None:
    assert _roundtrip(broker, f"{topic_prefix}/x", b"hello") == b"hello"


def test_fresh_broker_keeps_retained_across_restart(
    fresh_broker: LocalBroker, topic_prefix: str
) -> None:
    _roundtrip(fresh_broker, f"{topic_prefix}/keep", b"v1")
    fresh_broker.restart()
    assert fresh_broker.running
    assert _roundtrip(fresh_broker, f"{topic_prefix}/keep", b"v1") == b"v1"
