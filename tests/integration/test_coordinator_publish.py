"""The sharded coordinator's retained publish survives its broker going away: it waits for
the reconnection and the model reaches the broker that comes back (a NATS node dying under
the coordinator, tests/integration/test_nats_cluster.py, is the same case). Before, paho's
``wait_for_publish`` raised RuntimeError("not currently connected") and the coordinator died."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from aggregator.shard_coordinator import publish_retained
from fedmq.net.localbroker import BrokerOptions, LocalBroker
from fedmq.net.mqtt import MqttSettings, connect, make_client


def test_a_retained_publish_waits_for_the_broker_to_come_back(tmp_path: Path) -> None:
    first = LocalBroker(workdir=tmp_path / "b1")
    first.start()
    settings = MqttSettings(host=first.host, port=first.port, client_id="coord-test",
                            reconnect_min=1, reconnect_max=1, clean_start=True)
    client = make_client(settings)
    connect(client, settings, asynchronous=False)
    client.loop_start()
    try:
        first.stop()
        time.sleep(0.5)
        assert not client.is_connected()
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                publish_retained(client, "fl/x/model", b"model-v1", timeout=30)
                outcome.append(None)
            except BaseException as exc:  # reported by the assert below
                outcome.append(exc)

        t = threading.Thread(target=run)
        t.start()
        time.sleep(1.0)
        assert not outcome  # still waiting: no broker
        with LocalBroker(BrokerOptions(port=first.port), workdir=tmp_path / "b2") as second:
            t.join(30)
            assert outcome == [None]
            got: list[bytes] = []
            sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="reader")
            sub.on_message = lambda c, u, m: got.append(bytes(m.payload))
            sub.connect(second.host, second.port)
            sub.subscribe("fl/x/model", qos=1)
            sub.loop_start()
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
            sub.loop_stop()
            assert got == [b"model-v1"]  # retained on the broker that came back
    finally:
        client.disconnect()
        client.loop_stop()
