"""A publish paho dropped while disconnected counts as not delivered (no exception)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
import pytest

from aggregator.service import _delivered


def test_a_publish_dropped_while_disconnected_is_not_delivered() -> None:
    dropped = mqtt.MQTTMessageInfo(1)
    dropped.rc = mqtt.MQTT_ERR_NO_CONN
    with pytest.raises(RuntimeError):  # what paho itself does: a traceback in the service
        dropped.is_published()
    assert _delivered(dropped) is False
    waiting = mqtt.MQTTMessageInfo(2)
    assert _delivered(waiting) is False
    waiting._set_as_published()
    assert _delivered(waiting) is True
