"""The NATS worker's pure parts: MQTT topic -> NATS subject as NATS' MQTT gateway (2.9)
maps it, the settings' checks, and which stream and filter each capture mode consumes."""

from __future__ import annotations

import pytest

from aggregator.nats_worker import (
    GATEWAY_STREAM,
    NatsIngest,
    NatsSettings,
    nats_subject,
    stream_name,
)
from fedmq.errors import ConfigError
from fedmq.topics import Topics


def test_topics_map_to_the_gateway_subjects() -> None:
    assert nats_subject("fl/lab/update/dev1") == "fl.lab.update.dev1"
    assert nats_subject("t1/fl/lab/update/+") == "t1.fl.lab.update.*"
    assert nats_subject("fl/lab/#") == "fl.lab.>"


@pytest.mark.parametrize("topic", ["fl/lab.x/update/d", "fl/lab/update/d 1", "/fl/lab", "fl//x"])
def test_topics_nats_cannot_carry_are_refused(topic: str) -> None:
    with pytest.raises(ConfigError, match="cannot be carried by NATS"):
        nats_subject(topic)


def test_a_fleet_with_a_dot_has_no_stream() -> None:
    assert stream_name("lab") == "fedmq-updates-lab"
    with pytest.raises(ConfigError, match="cannot have"):
        stream_name("lab.eu")


@pytest.mark.parametrize("kwargs", [
    {"servers": ()}, {"servers": ("",)}, {"ack_wait": 0}, {"replicas": 0}, {"replicas": 6},
    {"batch": 0}, {"batch": 64, "max_ack_pending": 32}, {"capture": "queue"},
])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"servers": ("nats://127.0.0.1:4222",), **kwargs}
    with pytest.raises(ConfigError):
        NatsSettings(**args)  # type: ignore[arg-type]


class _Worker:  # what NatsIngest reads of a ShardWorker before it runs
    worker = "w1"


@pytest.mark.parametrize("capture, stream, subject", [
    ("gateway", GATEWAY_STREAM, "$MQTT.msgs.p1.fl.lab.update.*"),
    ("stream", "fedmq-updates-lab", "p1.fl.lab.update.*"),
])
def test_each_capture_consumes_its_stream(capture: str, stream: str, subject: str) -> None:
    ingest = NatsIngest(_Worker(), Topics("lab", "p1"),  # type: ignore[arg-type]
                        NatsSettings(servers=("nats://127.0.0.1:4222",), capture=capture))
    assert (ingest.stream, ingest.subject, ingest.durable) == (stream, subject,
                                                              "fedmq-ingest-lab")


def test_a_prefix_with_a_dot_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="cannot be carried by NATS"):
        NatsIngest(_Worker(), Topics("lab", "t.1"),  # type: ignore[arg-type]
                   NatsSettings(servers=("nats://127.0.0.1:4222",)))
