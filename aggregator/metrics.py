"""Prometheus metrics of one aggregator (a registry of its own: tests create many)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedmq.errors import ConfigError, RejectReason

__all__ = [
    "ABANDON_REASONS",
    "AggregatorMetrics",
    "MetricsExporter",
    "RoundMetrics",
    "UpdateMetrics",
]

# Why a round ended without a new model (the label of fedmq_rounds_abandoned_total).
ABANDON_REASONS = ("no_quorum", "unpublishable_model")

log = logging.getLogger(__name__)


class MetricsExporter:
    """A registry of its own (tests create many), served over HTTP by :meth:`serve`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Start the HTTP exporter (a daemon thread)."""
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {addr}:{port}: {exc}") from exc
        log.info("metrics on http://%s:%d/metrics", addr, port)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (tests and reports); 0.0 when absent."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else float(got)


class UpdateMetrics(MetricsExporter):
    """What every process that folds updates exports: the single-process aggregator and
    each sharded-ingest worker (one name per concept, so dashboards serve both modes)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.updates_accepted = Counter(
            "fedmq_updates_accepted", "Updates journaled (or committed) and folded", registry=r
        )
        self.updates_duplicate = Counter(
            "fedmq_updates_duplicate",
            "Redelivered updates already folded (answered duplicate, not folded again)",
            registry=r,
        )
        self.updates_rejected = Counter(
            "fedmq_updates_rejected", "Updates rejected, by reason", ["reason"], registry=r
        )
        for code in RejectReason.ALL:
            self.updates_rejected.labels(reason=code)
        self.update_norm = Histogram(
            "fedmq_update_norm",
            "L2 norm of each accepted update's decoded delta",
            buckets=(0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 1e4, 1e5),
            registry=r,
        )
        self.updates_clipped = Counter(
            "fedmq_updates_clipped",
            "Accepted updates whose delta was scaled down to the norm bound (norm_action clip)",
            registry=r,
        )
        self.weights_capped = Counter(
            "fedmq_update_weights_capped",
            "Accepted updates folded with less weight than the num_examples they claimed",
            registry=r,
        )
        self.bytes_in = Counter("fedmq_bytes_in", "Update payload bytes received", registry=r)


class RoundMetrics(MetricsExporter):
    """What every process that closes rounds exports: the single-process aggregator and the
    sharded ingest's coordinator."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.rounds_completed = Counter(
            "fedmq_rounds_completed", "Rounds closed with a new model version", registry=r
        )
        self.participants = Histogram(
            "fedmq_round_participants",
            "Accepted updates per closed round",
            buckets=(1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.round_seconds = Histogram(
            "fedmq_round_seconds",
            "Wall time from opening a round to publishing its model",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.accuracy = Gauge("fedmq_global_accuracy", "Held-out accuracy", registry=r)
        self.loss = Gauge("fedmq_global_loss", "Held-out loss", registry=r)
        self.current_round = Gauge("fedmq_current_round", "Id of the open round", registry=r)
        self.model_version = Gauge("fedmq_model_version", "Current model version", registry=r)

    def set_quality(self, metrics: Mapping[str, float]) -> None:
        """The held-out accuracy and loss gauges from an evaluation's figures (those given)."""
        if "accuracy" in metrics:
            self.accuracy.set(metrics["accuracy"])
        if "loss" in metrics:
            self.loss.set(metrics["loss"])


class AggregatorMetrics(UpdateMetrics, RoundMetrics):
    """The single-process aggregator's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.rounds_abandoned = Counter(
            "fedmq_rounds_abandoned", "Rounds abandoned, by reason", ["reason"], registry=r
        )
        for reason in ABANDON_REASONS:
            self.rounds_abandoned.labels(reason=reason)
        self.unpublishable_update_norm = Gauge(
            "fedmq_unpublishable_update_norm",
            "L2 norms of the largest updates of the last round whose model was unpublishable",
            ["device", "update_id"],
            registry=r,
        )
        self.bytes_out = Counter("fedmq_bytes_out", "Payload bytes published", registry=r)
        self.fold_seconds = Histogram(
            "fedmq_fold_seconds",
            "Decode + check + journal + fold time of one update",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        # Federated evaluation (docs/strategies.md): the devices' held-out figures of the
        # last closed round's base model, weighted mean and spread across devices.
        self.federated_accuracy = Gauge(
            "fedmq_federated_accuracy",
            "Devices' held-out accuracy of the last round's base model (global) or of their "
            "locally trained model (personal): example-weighted mean and min/median/max",
            ["model", "stat"],
            registry=r,
        )
        self.federated_loss = Gauge(
            "fedmq_federated_loss",
            "Devices' example-weighted held-out loss (global or personal model)",
            ["model"],
            registry=r,
        )
        self.federated_eval_examples = Gauge(
            "fedmq_federated_eval_examples",
            "Held-out examples the devices evaluated on in the last round",
            registry=r,
        )
        self.federated_eval_devices = Gauge(
            "fedmq_federated_eval_devices",
            "Devices that reported an evaluation in the last round",
            registry=r,
        )
        self.downlink_bytes = Gauge(
            "fedmq_downlink_bytes_per_device",
            "Bytes a device holding the previous version downloads for the current one "
            "(the model with downlink = full; the index and one delta otherwise)",
            registry=r,
        )
        self.dp_epsilon = Gauge(
            "fedmq_dp_epsilon",
            "Central DP epsilon spent so far at the configured delta (0 without dp)",
            registry=r,
        )
        self.dp_epsilon_budget = Gauge(
            "fedmq_dp_epsilon_budget",
            "dp_epsilon_budget: no round opens that would take epsilon above it (0: no budget)",
            registry=r,
        )
        self.dp_budget_exhausted = Gauge(
            "fedmq_dp_budget_exhausted",
            "1 when the next round would exceed dp_epsilon_budget, so no round opens any more",
            registry=r,
        )
        self.publish_failures = Counter(
            "fedmq_publish_failures",
            "Messages the broker did not accept (PUBACK reason >= 0x80), by reason",
            ["reason"],
            registry=r,
        )
        self.chunk_transfers_expired = Counter(
            "fedmq_chunk_transfers_expired",
            "Chunked update transfers dropped incomplete after chunk_timeout",
            registry=r,
        )
        self.online_devices = Gauge(
            "fedmq_online_devices", "Devices whose status is online", registry=r
        )
