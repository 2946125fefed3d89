"""Prometheus metrics of the sharded ingest (docs/scaling.md, "Sharded ingest"; names in
docs/monitoring.md).

A worker exports the single-process aggregator's update metrics (:class:`UpdateMetrics`:
``fedmq_updates_accepted``, ``fedmq_updates_duplicate``, ``fedmq_updates_rejected{reason}``,
``fedmq_update_norm``, ``fedmq_updates_clipped``, ``fedmq_update_weights_capped``,
``fedmq_bytes_in``) and its group commits (``fedmq_shard_commit_batch_size``,
``fedmq_shard_commit_seconds``); the coordinator the round metrics (:class:`RoundMetrics`:
``fedmq_rounds_completed``, ``fedmq_round_participants``, ``fedmq_round_seconds``,
``fedmq_model_version``, ``fedmq_current_round``, ``fedmq_global_accuracy``,
``fedmq_global_loss``) and the partials it merged (``fedmq_shard_workers_seen{kind}``). One
name per concept: a dashboard of the single process reads both modes.

The worker's per-update logic (:class:`~aggregator.shard_worker.ShardWorker`) knows nothing of
them: its runner counts the acks :meth:`ShardWorker.handle_batch` returns
(:meth:`ShardWorkerMetrics.count_acks`) and commits through :class:`MeteredShardStore`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Gauge, Histogram

from aggregator.metrics import RoundMetrics, UpdateMetrics
from aggregator.shard_store import CommitResult, Fold, ShardStore
from fedmq.errors import RejectReason
from fedmq.wire import AckMessage

__all__ = ["PARTIAL_KINDS", "MeteredShardStore", "ShardCoordinatorMetrics", "ShardWorkerMetrics"]

#: Who committed a partial the coordinator merged (the label of fedmq_shard_workers_seen).
PARTIAL_KINDS = ("worker", "gateway")


class ShardWorkerMetrics(UpdateMetrics):
    """One sharded-ingest worker's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.commit_batch = Histogram(
            "fedmq_shard_commit_batch_size",
            "Updates per group commit (one store script: their claims and the partial)",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "fedmq_shard_commit_seconds",
            "Seconds of one group commit to the store (round trip and script)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )

    def count_acks(self, acks: Iterable[AckMessage]) -> None:
        """Count the answers to a batch: ``ok`` accepted, an accepted ``duplicate`` (a resend
        of a committed update), every refusal by its reason."""
        for ack in acks:
            if not ack.accepted:
                self.updates_rejected.labels(reason=ack.code).inc()
            elif ack.code == RejectReason.DUPLICATE:
                self.updates_duplicate.inc()
            else:
                self.updates_accepted.inc()

    def count_commit(self, folds: Mapping[str, Fold], status: str, seconds: float) -> None:
        """One store commit of ``folds``; the folds' norms, clips and caps once committed."""
        self.commit_batch.observe(len(folds))
        self.commit_seconds.observe(seconds)
        if status != "ok":
            return
        for fold in folds.values():
            self.update_norm.observe(fold.norm)
            if fold.scale < 1.0:
                self.updates_clipped.inc()
            if fold.weight < fold.claimed:
                self.weights_capped.inc()


class MeteredShardStore(ShardStore):
    """A :class:`ShardStore` whose commits are counted and timed in ``metrics``."""

    def __init__(self, url: str, fleet: str, metrics: ShardWorkerMetrics) -> None:
        super().__init__(url, fleet)
        self.metrics = metrics

    def commit(
        self, epoch: str, round_id: int, worker: str, folds: Mapping[str, Fold],
        partial: bytes, generation: int,
    ) -> CommitResult:
        started = time.perf_counter()
        res = super().commit(epoch, round_id, worker, folds, partial, generation)
        self.metrics.count_commit(folds, res.status, time.perf_counter() - started)
        return res


class ShardCoordinatorMetrics(RoundMetrics):
    """The sharded ingest's coordinator's metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        self.workers_seen = Gauge(
            "fedmq_shard_workers_seen",
            "Committed partials the last closed round merged: of workers (kind=worker) and "
            "of site gateways (kind=gateway)",
            ["kind"],
            registry=self.registry,
        )
        for kind in PARTIAL_KINDS:
            self.workers_seen.labels(kind=kind)
