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
"""

from __future__ import annotations

import argparse
import logging
import secrets
import signal
import sys
import time
from typing import Any

import paho.mqtt.client as mqtt
import redis

from aggregator.bundles import model_id_of, resolve_bundle
from aggregator.shard_store import ShardStore
from fedmq.errors import ConfigError, StateError
from fedmq.logs import setup_logging
from fedmq.models.spec import ModelBundle
from fedmq.net.mqtt import PROTOCOLS, MqttSettings, connect, make_client
from fedmq.tensor import Tensor
from fedmq.topics import Topics
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.update.strategies import MeanDeltaStrategy, make_strategy
from fedmq.wire import ModelMessage, RoundAnnouncement, TrainingConfig, encode

__all__ = ["ShardCoordinator", "main", "merge_partials"]

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
        server_lr: float = 1.0,
        target: int = 10,
        min_updates: int = 1,
        round_timeout: float = 60.0,
        training: TrainingConfig | None = None,
    ) -> None:
        self.store = store
        self.bundle = bundle
        self.template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        self.topics = topics
        self.publish = publish
        built = make_strategy(strategy, server_lr)
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
        self.model_id = model_id_of(bundle)
        self.finished: list[int] = []  # round ids this process closed

    def start(self, now: float) -> None:
        """Create the fleet's state (first start) and publish the store's model and round."""
        if self.store.init(secrets.token_hex(4), self.bundle.initial_trainable(), 1,
                           now + self.round_timeout, self.target):
            log.info("sharded fleet %s initialised", self.store.fleet)
        self.publish_current(now)

    def publish_current(self, now: float) -> None:
        model = self.store.model()
        rnd = self.store.open_round()
        if model is None or rnd is None:
            raise StateError("the store has no model or round: start() first")
        tensors = tuple(Tensor.from_array(n, w) for n, w in model["weights"].items())
        self.publish(self.topics.model, encode(ModelMessage(
            self.store.fleet, model["version"], model["round_id"], self.model_id, tensors,
            created_at=now, epoch=model["epoch"],
        )))
        self.publish(self.topics.round, encode(RoundAnnouncement(
            self.store.fleet, rnd.round_id, rnd.base_version, rnd.deadline,
            self.strategy.configure(rnd.round_id, self.training), min_updates=self.min_updates,
            model_id=self.model_id, opened_at=now, epoch=rnd.epoch,
        )))

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
        model = self.store.model()
        assert model is not None
        self.strategy.load_state(model["strategy"])
        weights = self.strategy.aggregate(model["weights"], merged.result())
        state = self.strategy.state()
        version = model["version"] + 1
        if self.store.finish(rnd.epoch, rnd.round_id, version, weights, state, merged.count,
                             now + self.round_timeout, self.target):
            log.info(
                "round %d closed: %d update(s) from %d worker(s), weight %.6g -> version %d",
                rnd.round_id, merged.count, len(partials), merged.total_weight, version,
            )
            self.finished.append(rnd.round_id)
        self.publish_current(now)
        return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.shard_coordinator",
                                description="the sharded ingest's coordinator (docs/scaling.md)")
    p.add_argument("--fleet", required=True)
    p.add_argument("--redis", required=True, help="redis://host:port/db")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--prefix", default="", help="topic prefix (tests)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="5",
                   help="MQTT version (3.1.1 for NATS' MQTT gateway)")
    p.add_argument("--model", default="digits-mlp", help="zoo model or bundle directory")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--target", type=int, default=10, help="updates that close a round")
    p.add_argument("--min-updates", type=int, default=1)
    p.add_argument("--round-timeout", type=float, default=60.0)
    p.add_argument("--rounds", type=int, default=0, help="stop after this model version (0: never)")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between store polls")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, False)
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        topics = Topics(args.fleet, args.prefix)
        settings = MqttSettings(host=args.host, port=args.port, protocol=args.protocol,
                                client_id=f"fedmq-coordinator-{args.fleet}")
        client = make_client(settings)
        connect(client, settings, asynchronous=False)
        client.loop_start()

        def publish(topic: str, payload: bytes) -> None:
            info = client.publish(topic, payload, qos=1, retain=True)
            info.wait_for_publish(30)
            if info.rc != mqtt.MQTT_ERR_SUCCESS or not info.is_published():
                raise OSError(f"publish on {topic} failed: {info.rc}")

        store = ShardStore(args.redis, args.fleet)
        coord = ShardCoordinator(
            store, resolve_bundle(args.model), topics, publish, strategy=args.strategy,
            server_lr=args.server_lr, target=args.target, min_updates=args.min_updates,
            round_timeout=args.round_timeout,
        )
        coord.start(time.time())
        while not stopping:
            version = store.model_version()
            if args.rounds and version is not None and version >= args.rounds:
                log.info("model version %d reached: stopping", version)
                break
            if not coord.tick(time.time()):
                time.sleep(args.poll)
        client.disconnect()  # first: wakes the network thread, so loop_stop returns at once
        client.loop_stop()
        return 0
    except (ConfigError, StateError, redis.RedisError, OSError) as exc:
        log.error("coordinator: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
