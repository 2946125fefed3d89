"""The sharded ingest's coordinator: opens rounds in the store, closes them, merges the
workers' committed partials exactly, applies the strategy and publishes the model.

A round closes when the number of claimed devices reaches ``target`` or, at the deadline,
with whatever was committed (at least ``min_updates``; otherwise the deadline moves on).
Updates a worker had not committed when the round closed (a worker that died and did not
come back in time) are dropouts of that round: the broker still holds them for the dead
session, and when the worker returns they are answered ``round_closed``.

Every step is restartable: the store holds the round (open/closed), the partials and the
model; a coordinator killed anywhere resumes from the store (a closed round is merged again
from the same partials; :meth:`ShardStore.finish` applies once) and publishes the store's
model and round again (retained, idempotent). Only mean-delta strategies (FedAvg, FedAvgM,
FedAdam, FedYogi, FedAdagrad) are supported: they need the weighted mean alone.

The ingest bounds (:mod:`aggregator.bounds`) are decided here, once per round: when it opens
a round the coordinator freezes the norm bound and the relative weight cap from the fleet's
pool of recent norms and claims (:meth:`FleetBounds.round_bounds`) into the round's
:class:`RoundRules`, with the round's codec and the examples cap; every worker applies those.
When a round finishes, its folds (their norms and claims, from the claims; norms of updates
rejected for their norm) enter the pool in device order, so the next round's limits do not
depend on which worker folded what or in which order updates arrived.

With ``eval_dataset`` set, each model the coordinator publishes is evaluated on that held-out
set with the single-process aggregator's evaluator (:func:`aggregator.evaluate.make_evaluator`):
the figures are logged, set as ``fedmq_global_accuracy``/``fedmq_global_loss`` and carried in
the published model's ``metrics`` (as the single process's models carry them), also when a
restarted coordinator republishes the store's model. Prometheus (:mod:`aggregator.shard_metrics`)
on ``metrics_port``.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import redis

from aggregator.bounds import BoundsConfig, FleetBounds
from aggregator.bundles import model_id_of, resolve_bundle
from aggregator.evaluate import Evaluator, evaluate, make_evaluator
from aggregator.guard import finite_metrics
from aggregator.service_loop import service_main
from aggregator.shard_config import (
    COORDINATOR_FLAGS,
    ShardConfig,
    add_flags,
    config_from_args,
)
from aggregator.shard_metrics import ShardCoordinatorMetrics
from aggregator.shard_store import Fold, OpenRound, RoundRules, ShardStore
from fedmq.errors import ConfigError, DataError, StateError
from fedmq.models.spec import ModelBundle
from fedmq.net.mqtt import connect, make_client
from fedmq.tensor import Tensor
from fedmq.topics import Topics
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.update.strategies import MeanDeltaStrategy, StrategyOptions, make_strategy
from fedmq.wire import ModelMessage, RoundAnnouncement, TrainingConfig, encode

__all__ = [
    "ShardCoordinator", "add_arguments", "command", "from_config", "main", "merge_partials",
]

log = logging.getLogger(__name__)


def merge_partials(
    partials: dict[str, bytes], template: dict[str, tuple[int, ...]]
) -> FixedPointSum:
    """Every worker's committed partial summed (exact: integer sums, any order)."""
    total = FixedPointSum(template)
    for worker in sorted(partials):
        total.merge(FixedPointSum.from_bytes(partials[worker], template))
    return total


class ShardCoordinator:
    """Rounds over a :class:`ShardStore`; publishes through ``publish(topic, payload)``."""

    def __init__(
        self,
        store: ShardStore,
        bundle: ModelBundle,
        topics: Topics,
        publish: Any,
        *,
        strategy: str = "fedavg",
        server_lr: float | None = None,
        target: int = 10,
        min_updates: int = 1,
        round_timeout: float = 60.0,
        training: TrainingConfig | None = None,
        bounds: BoundsConfig | None = None,
        max_claimed_examples: int = 10_000_000,
        options: StrategyOptions | None = None,
        evaluator: Evaluator | None = None,
        metrics: ShardCoordinatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.bundle = bundle
        self.template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        self.topics = topics
        self.publish = publish
        built = make_strategy(strategy, server_lr, options=options)
        if not isinstance(built, MeanDeltaStrategy):
            raise ConfigError(
                f"strategy {strategy!r} needs every update; the sharded ingest merges sums "
                "(use fedavg, fedavgm, fedadam, fedyogi or fedadagrad)"
            )
        self.strategy = built
        if target < 1 or min_updates < 1 or round_timeout <= 0:
            raise ConfigError("target and min_updates must be >= 1, round_timeout > 0")
        self.target = target
        self.min_updates = min_updates
        self.round_timeout = round_timeout
        self.training = training or TrainingConfig(codec="float32")
        self.bounds = bounds or BoundsConfig()
        if max_claimed_examples < 1:
            raise ConfigError("max_claimed_examples must be >= 1")
        self.max_claimed_examples = max_claimed_examples
        self.model_id = model_id_of(bundle)
        self.finished: list[int] = []  # round ids this process closed
        self.evaluator = evaluator
        self.metrics = metrics or ShardCoordinatorMetrics()
        # the figures of the newest model evaluated (version, figures): each version once
        self.quality: tuple[int, dict[str, float]] | None = None
        # the open round as first published by this process (epoch, round id, when)
        self._opened: tuple[str, int, float] | None = None

    def start(self, now: float) -> None:
        """Create the fleet's state (first start) and publish the store's model and round."""
        pool = FleetBounds.from_json(self.bounds, self.store.fleet_bounds())
        if self.store.init(secrets.token_hex(4), self.bundle.initial_trainable(), 1,
                           now + self.round_timeout, self.target, self.rules(1, pool)):
            log.info("sharded fleet %s initialised", self.store.fleet)
        self.publish_current(now)

    def rules(self, round_id: int, pool: FleetBounds) -> RoundRules:
        """What the workers check round ``round_id``'s updates against."""
        return RoundRules(self.strategy.configure(round_id, self.training), pool.round_bounds(),
                          self.max_claimed_examples)

    def publish_current(self, now: float) -> None:
        model = self.store.model()
        rnd = self.store.open_round()
        if model is None or rnd is None:
            raise StateError("the store has no model or round: start() first")
        tensors = tuple(Tensor.from_array(n, w) for n, w in model["weights"].items())
        quality = self.model_quality(model["version"], model["weights"])
        self.publish(self.topics.model, encode(ModelMessage(
            self.store.fleet, model["version"], model["round_id"], self.model_id, tensors,
            metrics={**quality, "participants": float(model["contributors"])},
            created_at=now, epoch=model["epoch"],
        )))
        self.publish(self.topics.round, encode(RoundAnnouncement(
            self.store.fleet, rnd.round_id, rnd.base_version, rnd.deadline,
            rnd.rules.config, min_updates=self.min_updates,
            model_id=self.model_id, opened_at=now, epoch=rnd.epoch,
        )))
        self._note_published(model["version"], rnd, now)

    def model_quality(self, version: int, weights: dict[str, np.ndarray]) -> dict[str, float]:
        """The held-out figures of model ``version`` (evaluated once; {} without an
        evaluator); logged and set as the accuracy and loss gauges."""
        if self.quality is not None and self.quality[0] == version:
            return self.quality[1]
        quality = finite_metrics(evaluate(self.evaluator, weights))
        self.quality = (version, quality)
        if quality:
            log.info("model version %d: %s", version,
                     ", ".join(f"{k} {v:.4f}" for k, v in sorted(quality.items())))
        self.metrics.set_quality(quality)
        return quality

    def _note_published(self, version: int, rnd: OpenRound, now: float) -> None:
        self.metrics.model_version.set(version)
        self.metrics.current_round.set(rnd.round_id)
        if self._opened is None or self._opened[:2] != (rnd.epoch, rnd.round_id):
            self._opened = (rnd.epoch, rnd.round_id, now)

    def _open_seconds(self, rnd: OpenRound, now: float) -> float | None:
        """Seconds since this process published ``rnd`` first (opened it or, after a
        restart, found it open); None when it never did."""
        if self._opened is None or self._opened[:2] != (rnd.epoch, rnd.round_id):
            return None
        return max(0.0, now - self._opened[2])

    def _observe_round(self, partials: dict[str, bytes], count: int,
                       seconds: float | None) -> None:
        """A round this process finished, in the round metrics."""
        self.metrics.rounds_completed.inc()
        self.metrics.participants.observe(count)
        if seconds is not None:
            self.metrics.round_seconds.observe(seconds)
        gateways = sum(1 for name in partials if ":" in name)  # gateway_partial_key's
        self.metrics.workers_seen.labels(kind="gateway").set(gateways)
        self.metrics.workers_seen.labels(kind="worker").set(len(partials) - gateways)

    def tick(self, now: float) -> bool:
        """Close and finish the round when due; True when a round was finished."""
        rnd = self.store.open_round()
        if rnd is None:
            raise StateError("the store has no round: start() first")
        if rnd.state == "open":
            count = self.store.claim_count(rnd.epoch, rnd.round_id)
            if count < rnd.target and now < rnd.deadline:
                return False
            if count < self.min_updates:
                self.store.extend(rnd.epoch, rnd.round_id, now + self.round_timeout)
                log.warning("round %d: %d of %d updates at the deadline; deadline extended",
                            rnd.round_id, count, self.min_updates)
                return False
        partials = self.store.close(rnd.epoch, rnd.round_id)
        if partials is None:
            return False  # another coordinator finished it meanwhile
        merged = merge_partials(partials, self.template)
        claimed = self.store.claim_count(rnd.epoch, rnd.round_id)
        if merged.count != claimed:
            raise StateError(
                f"round {rnd.round_id}: partials hold {merged.count} updates, claims "
                f"{claimed}: the store is inconsistent"
            )
        claims = self.store.claims(rnd.epoch, rnd.round_id)
        # Only the cloud workers' folds carry a device's norm and claimed examples; a site
        # gateway's partial holds its devices' updates summed (a GatewayClaim each), so
        # they stay out of the fleet's norm and claim pools (docs/scaling.md).
        folds = {d: c for d, c in claims.items() if isinstance(c, Fold)}
        via_gateways = len(claims) - len(folds)
        pool = FleetBounds.from_json(self.bounds, self.store.fleet_bounds())
        for device, norm in sorted(self.store.rejected_norms(rnd.epoch, rnd.round_id).items()):
            pool.observe_norm(device, norm)
        for device, fold in sorted(folds.items()):
            pool.observe_norm(device, fold.norm)
            pool.observe_claim(device, fold.claimed)
        clipped = sum(1 for f in folds.values() if f.scale < 1.0)
        capped = sum(1 for f in folds.values() if f.weight < f.claimed)
        model = self.store.model()
        assert model is not None
        self.strategy.load_state(model["strategy"])
        weights = self.strategy.aggregate(model["weights"], merged.result())
        state = self.strategy.state()
        version = model["version"] + 1
        rules = self.rules(rnd.round_id + 1, pool)
        finished = self.store.finish(rnd.epoch, rnd.round_id, version, weights, state,
                                     merged.count, now + self.round_timeout, self.target,
                                     rules, pool.to_json())
        if finished:
            log.info(
                "round %d closed: %d update(s) from %d worker(s) (%d via site gateways, %d "
                "norm-clipped, %d weight-capped), weight %.6g -> version %d; round %d: norm "
                "bound %s, weight cap %s",
                rnd.round_id, merged.count, len(partials), via_gateways, clipped, capped,
                merged.total_weight, version, rnd.round_id + 1,
                "none" if rules.bounds.norm_limit is None
                else f"{rules.bounds.norm_limit[0]:.4g} ({rules.bounds.norm_limit[1]})",
                "none" if rules.bounds.weight_cap is None else f"{rules.bounds.weight_cap:.6g}",
            )
            self.finished.append(rnd.round_id)
        seconds = self._open_seconds(rnd, now)
        self.publish_current(now)  # the new model evaluated, then published
        if finished:
            self._observe_round(partials, merged.count, seconds)
        return True


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, COORDINATOR_FLAGS)


def from_config(
    config: ShardConfig, store: ShardStore, publish: Callable[[str, bytes], None],
    metrics: ShardCoordinatorMetrics | None = None,
) -> ShardCoordinator:
    """The coordinator of ``config`` (its bundle and evaluation set resolved) over
    ``store``."""
    bundle = resolve_bundle(config.model)
    return ShardCoordinator(
        store, bundle, config.topics, publish, metrics=metrics,
        evaluator=make_evaluator(bundle, config.eval_dataset, config.eval_examples,
                                 config.seed),
        strategy=config.strategy, options=config.strategy_options(),
        target=config.clients_per_round, min_updates=config.min_updates,
        round_timeout=config.round_timeout, training=config.training_config(),
        bounds=config.bounds_config(), max_claimed_examples=config.max_claimed_examples,
    )


def command(args: argparse.Namespace) -> int:
    """Load the configuration from ``args`` and run the coordinator until ``rounds``."""
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        config = config_from_args(args, COORDINATOR_FLAGS)
        config.mqtt.check_files()
        settings = replace(config.mqtt, client_id=f"fedmq-coordinator-{config.fleet}")
        client = make_client(settings)
        connect(client, settings, asynchronous=False)
        client.loop_start()

        def publish(topic: str, payload: bytes) -> None:
            publish_retained(client, topic, payload)

        metrics = ShardCoordinatorMetrics()
        if config.metrics_port:
            metrics.serve(config.metrics_port, config.metrics_host)
        store = ShardStore(config.shard.redis, config.fleet)
        coord = from_config(config, store, publish, metrics)
        coord.start(time.time())
        while not stopping:
            version = store.model_version()
            if config.rounds and version is not None and version >= config.rounds:
                log.info("model version %d reached: stopping", version)
                break
            if not coord.tick(time.time()):
                time.sleep(config.shard.poll)
        client.disconnect()  # first: wakes the network thread, so loop_stop returns at once
        client.loop_stop()
        return 0
    except (ConfigError, StateError, DataError, redis.RedisError, OSError) as exc:
        log.error("coordinator: %s", exc)
        return 1


def publish_retained(client: mqtt.Client, topic: str, payload: bytes, *,
                     timeout: float = 60.0) -> None:
    """Publish ``payload`` retained at QoS 1 and wait for the broker's PUBACK, across a
    reconnection (e.g. to a fallback broker after a node died): while the client is not
    connected it waits, and a publish the lost connection interrupted is sent again (the same
    retained bytes twice change nothing). OSError when no broker took it within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.is_connected():
            info = client.publish(topic, payload, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.1, deadline - time.monotonic()))
                if info.is_published():
                    return
            except (RuntimeError, ValueError):  # the connection went meanwhile: again
                pass
        time.sleep(0.1)
    raise OSError(f"publish on {topic}: no broker took it within {timeout:.0f}s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.shard_coordinator",
                                description="the sharded ingest's coordinator (docs/scaling.md)")
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    return service_main(build_parser(), argv, command, log=log)


if __name__ == "__main__":
    sys.exit(main())
