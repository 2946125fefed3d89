"""The fedmq aggregator: round engine, persistence, metrics and the MQTT service."""

from __future__ import annotations

from aggregator.config import AggregatorConfig, load_aggregator_config

__all__ = ["AggregatorConfig", "load_aggregator_config"]
