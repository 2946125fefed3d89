"""What the aggregator publishes, and the byte counts of the open round's traffic."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.metrics import AggregatorMetrics

__all__ = ["Outgoing", "RoundTraffic"]


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class RoundTraffic:
    """Bytes of the current round: accepted update payloads in, everything published out.

    Shared by the ingest (acks) and the coordinator (announcements, models); reset when a
    round opens, read when it ends.
    """

    def __init__(self, metrics: AggregatorMetrics) -> None:
        self.metrics = metrics
        self.bytes_in = 0
        self.bytes_out = 0

    def reset(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0

    def emit(self, topic: str, payload: bytes, retain: bool = True) -> Outgoing:
        """Count ``payload`` as published and wrap it (QoS 1)."""
        self.metrics.bytes_out.inc(len(payload))
        self.bytes_out += len(payload)
        return Outgoing(topic, payload, qos=1, retain=retain)
