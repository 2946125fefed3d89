"""A sharded ingest worker on a NATS cluster: the JetStream shell of
:class:`~aggregator.shard_worker.ShardWorker` (docs/scaling.md "Clustered broker: NATS").

Devices publish their updates over MQTT 3.1.1 (QoS 1) to any node of the cluster. NATS' MQTT
gateway (nats-server 2.9) stores each QoS 1 publish in its own replicated stream
``$MQTT_msgs`` (subject ``$MQTT.msgs.fl.<fleet>.update.<device>``) and sends the PUBACK only
after that store; it also delivers the message on the plain subject
``fl.<fleet>.update.<device>``, without waiting for anyone. So by default
(``--capture gateway``) the workers consume ``$MQTT_msgs``: a PUBACKed update is in the
stream. ``--capture stream`` instead creates a stream ``fedmq-updates-<fleet>`` of the plain
subject, which the PUBACK does not wait for (docs/scaling.md says what that loses).

Every worker of the fleet pulls from ONE durable consumer (``fedmq-ingest-<fleet>``), so
JetStream spreads the updates over the live workers. Per fetched batch (``--batch``) the
worker runs the Mosquitto workers' :meth:`ShardWorker.handle_batch` (decode, checks, then the
claims and the partial in ONE atomic Redis commit for the batch), publishes each device's
ack, and only then acknowledges each JetStream message. A
message a worker fetched and never acknowledged (it died, hung or lost the store) is
redelivered to a live worker after ``--ack-wait`` seconds; one that was committed but not
acknowledged is answered ``duplicate`` (accepted) by the claim and counted once. This is what
Mosquitto's ``$share`` cannot do (a dead member's messages stay with its session).

Device acks go out as core NATS messages on ``fl.<fleet>.ack.<device>``; the gateway hands
them to MQTT subscribers at QoS 0 (a device that misses its ack resends and gets
``duplicate``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import redis
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api as js_api
from nats.js.client import JetStreamContext

from aggregator.bundles import resolve_bundle
from aggregator.service_loop import EXIT_STORE, add_service_flags, service_main
from aggregator.shard_store import ShardStore
from aggregator.shard_worker import ShardWorker, worker_client_id
from fedmq.errors import ConfigError, StateError, WireError
from fedmq.signing import Registry
from fedmq.topics import Topics
from fedmq.wire import encode

__all__ = ["NatsIngest", "NatsSettings", "main", "nats_subject", "stream_name"]

log = logging.getLogger(__name__)

#: The NATS MQTT gateway's own stream of QoS 1 publishes (nats-server 2.9: ``$MQTT_msgs``,
#: subjects ``$MQTT.msgs.>``, file storage, interest retention, ``mqtt.stream_replicas``).
GATEWAY_STREAM = "$MQTT_msgs"
GATEWAY_PREFIX = "$MQTT.msgs."
CAPTURES = ("gateway", "stream")
SETUP_TIMEOUT = 30.0  # seconds a starting worker waits for JetStream to answer


def nats_subject(topic: str) -> str:
    """The subject NATS' MQTT gateway (2.9) uses for an MQTT topic or filter: levels joined
    by '.', '+' -> '*', '#' -> '>'. Topics it cannot carry are refused here (a '.' or a
    space in a level, empty levels), so a fleet or device id with a '.' fails at start, not
    silently."""
    levels = topic.split("/")
    for level in levels:
        if not level or "." in level or " " in level:
            raise ConfigError(
                f"MQTT topic {topic!r} cannot be carried by NATS: its levels must be non-empty "
                "and hold no '.' or space (fleet, device and prefix names without '.')"
            )
    return ".".join({"+": "*", "#": ">"}.get(level, level) for level in levels)


def stream_name(fleet: str) -> str:
    """The JetStream stream of a fleet's updates (stream names cannot hold '.')."""
    if "." in fleet:
        raise ConfigError(f"fleet {fleet!r}: a fleet on NATS cannot have a '.' in its name")
    return f"fedmq-updates-{fleet}"


@dataclass(frozen=True)
class NatsSettings:
    """``servers``: client URLs of the cluster's nodes (tried in order); ``ack_wait``:
    seconds after which JetStream redelivers a fetched, unacknowledged update to another
    worker; ``capture``: ``gateway`` (the MQTT gateway's ``$MQTT_msgs``, whose replicas are
    the server's ``mqtt.stream_replicas``) or ``stream`` (a stream of the fleet's subject,
    created with ``replicas`` copies and ``max_age``: older updates are dropped)."""

    servers: tuple[str, ...]
    capture: str = "gateway"
    durable: str = ""
    ack_wait: float = 30.0
    replicas: int = 3
    batch: int = 32
    max_ack_pending: int = 1024
    max_age: float = 7 * 24 * 3600.0
    fetch_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not self.servers or not all(s.strip() for s in self.servers):
            raise ConfigError("nats servers: give at least one URL (nats://host:port)")
        if self.ack_wait <= 0 or self.fetch_timeout <= 0 or self.max_age <= 0:
            raise ConfigError("ack_wait, fetch_timeout and max_age must be > 0 seconds")
        if not 1 <= self.replicas <= 5:
            raise ConfigError(f"replicas must be 1..5 (JetStream's limit), not {self.replicas}")
        if self.batch < 1 or self.max_ack_pending < self.batch:
            raise ConfigError("batch must be >= 1 and max_ack_pending >= batch")
        if self.capture not in CAPTURES:
            raise ConfigError(f"capture must be one of {CAPTURES}, not {self.capture!r}")


class NatsIngest:
    """The JetStream side around one :class:`ShardWorker`."""

    def __init__(self, worker: ShardWorker, topics: Topics, settings: NatsSettings,
                 ready_file: Path | None = None) -> None:
        self.worker = worker
        self.topics = topics
        self.settings = settings
        self.ready_file = ready_file
        subject = nats_subject(topics.update_wildcard)
        if settings.capture == "gateway":
            self.stream, self.subject = GATEWAY_STREAM, GATEWAY_PREFIX + subject
        else:
            self.stream, self.subject = stream_name(topics.fleet), subject
        self.durable = settings.durable or f"fedmq-ingest-{topics.fleet}"
        nats_subject(topics.ack("x"))  # the ack topics must be carriable too
        self.stopping = asyncio.Event()
        self.redelivered = 0

    async def _connect(self) -> NatsClient:
        last: dict[str, float] = {}

        async def error_cb(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            now = time.monotonic()
            if now - last.get(text, -math.inf) >= 10:  # every server down: once per 10 s
                last[text] = now
                log.warning("nats: %s", text)

        async def disconnected_cb() -> None:
            if not nc.is_closed:
                log.warning("nats: disconnected; reconnecting")

        async def reconnected_cb() -> None:
            url = nc.connected_url
            log.info("nats: reconnected to %s", url.netloc if url else "?")

        nc = await nats.connect(
            servers=list(self.settings.servers),
            name=worker_client_id(self.topics.fleet, self.worker.worker),
            dont_randomize=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
        )
        return nc

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        s = self.settings
        if s.capture == "stream":
            await js.add_stream(js_api.StreamConfig(
                name=self.stream, subjects=[self.subject],
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                storage=js_api.StorageType.FILE, num_replicas=s.replicas, max_age=s.max_age,
            ))
            return
        # the gateway creates its stream at the first MQTT connection to the cluster
        waited = False
        while not self.stopping.is_set():
            try:
                await js.stream_info(self.stream)
                return
            except nats.js.errors.NotFoundError:
                if not waited:
                    log.warning("stream %s does not exist yet (NATS' MQTT gateway creates it "
                                "at the first MQTT connection): waiting", self.stream)
                    waited = True
                await asyncio.sleep(0.5)

    async def subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        """The stream and the fleet's shared durable consumer (created when missing). A
        cluster still electing leaders (no answer, 503) is retried for SETUP_TIMEOUT seconds."""
        s = self.settings
        end = time.monotonic() + SETUP_TIMEOUT
        while True:
            try:
                await self._ensure_stream(js)
                psub = await js.pull_subscribe(
                    self.subject, durable=self.durable, stream=self.stream,
                    config=js_api.ConsumerConfig(
                        ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=s.ack_wait,
                        max_ack_pending=s.max_ack_pending,
                        deliver_policy=js_api.DeliverPolicy.ALL,
                    ),
                )
                info = await js.consumer_info(self.stream, self.durable)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() > end:
                    raise ConfigError(f"JetStream did not answer for {SETUP_TIMEOUT:.0f}s "
                                      f"({exc or type(exc).__name__})") from exc
                await asyncio.sleep(0.5)
            except nats.js.errors.APIError as exc:
                raise ConfigError(f"JetStream refused stream {self.stream} / consumer "
                                  f"{self.durable}: {exc.description or exc}") from exc
        if info.config.ack_wait is not None and abs(info.config.ack_wait - s.ack_wait) > 1e-3:
            log.warning("consumer %s exists with ack_wait %.3gs, not the %.3gs asked: the "
                        "existing one applies", self.durable, info.config.ack_wait, s.ack_wait)
        return psub

    async def _handle(self, nc: NatsClient, msgs: list[Msg]) -> bool:
        """A fetched batch of updates, committed as one group; False when the store failed
        (nothing of the batch is acknowledged: all of it is redelivered)."""
        items = []
        for msg in msgs:
            delivered = msg.metadata.num_delivered
            if delivered > 1:
                self.redelivered += 1
                log.info("update on %s redelivered (delivery %d)", msg.subject, delivered)
            items.append((msg.subject.rsplit(".", 1)[-1], msg.data))
        try:
            acks = self.worker.handle_batch(items, time.time())
        except (redis.RedisError, WireError, StateError, OSError) as exc:
            # StateError: an unreadable round record (e.g. a store from before round rules)
            log.error("store failed: %s; exiting without acknowledging %d update(s)",
                      exc, len(msgs))
            return False
        for msg, (device, _), ack in zip(msgs, items, acks, strict=True):
            # a device id that cannot be a topic; a closed connection: the update comes
            # again (redelivered after ack_wait) and is answered duplicate
            with contextlib.suppress(ConfigError, nats.errors.Error):
                await nc.publish(nats_subject(self.topics.ack(device)), encode(ack))
            with contextlib.suppress(nats.errors.Error):
                await msg.ack()
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            nc = await self._connect()
        except (nats.errors.Error, OSError) as exc:
            raise ConfigError(f"no NATS server of {list(self.settings.servers)} "
                              f"answered: {exc or type(exc).__name__}") from exc
        try:
            psub = await self.subscribe(nc.jetstream())
            log.info("worker %s pulls %s from stream %s (durable %s, ack_wait %gs)",
                     self.worker.worker, self.subject, self.stream, self.durable,
                     self.settings.ack_wait)
            if self.ready_file is not None:
                self.ready_file.write_text("ready\n")
            return await self._loop(nc, psub)
        finally:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await nc.flush(timeout=2)  # the acks of committed updates
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()

    async def _loop(self, nc: NatsClient, psub: JetStreamContext.PullSubscription) -> int:
        s = self.settings
        last_warning = 0.0
        while not self.stopping.is_set():
            try:
                msgs = await psub.fetch(s.batch, timeout=s.fetch_timeout)
            except TimeoutError:  # nats.errors.TimeoutError is one too
                continue
            except nats.errors.Error as exc:  # failover: no responders, leader elections
                if time.monotonic() - last_warning > 10:
                    log.warning("fetch from %s failed (%s): retrying", self.stream,
                                exc or type(exc).__name__)
                    last_warning = time.monotonic()
                await asyncio.sleep(0.2)
                continue
            if self.stopping.is_set():  # hand them to the other workers now
                for msg in msgs:
                    with contextlib.suppress(nats.errors.Error):
                        await msg.nak()
                break
            if not await self._handle(nc, msgs):
                return EXIT_STORE
        log.info("worker %s stopped (%d update(s) committed, %d redelivery(ies) seen)",
                 self.worker.worker, self.worker.committed, self.redelivered)
        return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.nats_worker",
                                description="a sharded ingest worker on a NATS JetStream "
                                            "cluster (docs/scaling.md)")
    p.add_argument("--fleet", required=True)
    p.add_argument("--worker", required=True, help="fixed name: partial key in the store")
    p.add_argument("--redis", required=True, help="redis://host:port/db")
    p.add_argument("--servers", required=True,
                   help="comma-separated NATS client URLs of the cluster, tried in order")
    p.add_argument("--prefix", default="", help="topic prefix (tests)")
    p.add_argument("--model", default="digits-mlp", help="zoo model or bundle directory")
    p.add_argument("--registry", default="", help="device registry: signatures required")
    p.add_argument("--capture", choices=CAPTURES, default="gateway",
                   help="consume the MQTT gateway's own stream (a PUBACKed update is stored) "
                        "or a stream of the fleet's subject (docs/scaling.md)")
    p.add_argument("--durable", default="", help="the shared durable consumer "
                   "(default fedmq-ingest-<fleet>)")
    p.add_argument("--ack-wait", type=float, default=30.0,
                   help="seconds before an unacknowledged update goes to another worker")
    p.add_argument("--replicas", type=int, default=3,
                   help="replicas of the stream that --capture stream creates")
    p.add_argument("--batch", type=int, default=32, help="updates per fetch")
    p.add_argument("--fetch-timeout", type=float, default=1.0,
                   help="seconds one pull request waits for updates (and a stop for it)")
    p.add_argument("--max-ack-pending", type=int, default=1024)
    return add_service_flags(p, session_expiry=False)


def _serve(args: argparse.Namespace) -> int:
    settings = NatsSettings(
        servers=tuple(s.strip() for s in args.servers.split(",")), durable=args.durable,
        capture=args.capture,
        ack_wait=args.ack_wait, replicas=args.replicas, batch=args.batch,
        max_ack_pending=args.max_ack_pending, fetch_timeout=args.fetch_timeout,
    )
    bundle = resolve_bundle(args.model)
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    registry = Registry(Path(args.registry)) if args.registry else None
    store = ShardStore(args.redis, args.fleet)
    store.ping()
    worker = ShardWorker(store, template, args.worker, registry=registry)
    ingest = NatsIngest(worker, Topics(args.fleet, args.prefix), settings,
                        Path(args.ready_file) if args.ready_file else None)
    return asyncio.run(ingest.run())


def main(argv: list[str] | None = None) -> int:
    return service_main(build_parser(), argv, _serve, log=log,
                        expected=(ConfigError, StateError, redis.RedisError, OSError,
                                  nats.errors.Error),
                        prefix=lambda args: f"worker {args.worker}")


if __name__ == "__main__":
    sys.exit(main())
