"""`fedmq status` reads the retained status, round and model topics of a real broker."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedmq import wire
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics

pytestmark = pytest.mark.integration


def test_status_shows_devices_round_and_model(broker: LocalBroker) -> None:
    fleet = f"st-{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    now = time.time()
    msgs = [
        (
            topics.status("pi-001"),
            wire.StatusMessage(
                fleet,
                "pi-001",
                "idle",
                "ai-edge-litert 2.3.0",
                {"threads": 2},
                {"loss": 0.4321, "examples": 170.0, "train_seconds": 0.8},
                3,
                now,
            ),
        ),
        (topics.status("pi-002"), wire.StatusMessage(fleet, "pi-002", "offline", created_at=now)),
        (
            topics.round,
            wire.RoundAnnouncement(
                fleet, 4, 3, now + 60, wire.TrainingConfig(epochs=2, lr=0.2), ("pi-001",), 1
            ),
        ),
        (
            topics.model,
            wire.ModelMessage(
                fleet,
                3,
                3,
                "digits-mlp@abc",
                (wire.Tensor.from_array("w", np.zeros(4, np.float32)),),
                {"accuracy": 0.9133},
            ),
        ),
    ]
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    for topic, msg in msgs:
        pub.publish(topic, wire.encode(msg), qos=1, retain=True).wait_for_publish(5)
    pub.publish(topics.status("junk"), b"\xc1garbage", qos=1, retain=True).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmq_ops",
            "status",
            "--fleet",
            fleet,
            "--port",
            str(broker.port),
            "--wait",
            "1.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    print(out)
    assert "model   version 3 (round 3), accuracy 91.33%" in out
    assert "round   4 on version 3, 1 selected, quorum 1" in out
    assert "devices 2 known, 1 online" in out
    line = next(ln for ln in out.splitlines() if "pi-001" in ln)
    assert "idle" in line and "0.432" in line and "170" in line and "ai-edge-litert" in line
    assert any("pi-002" in ln and "offline" in ln for ln in out.splitlines())
    assert "1 undecodable messages ignored" in out
