"""The edge agent's MQTT shell around :class:`edge_agent.core.EdgeCore`.

Threads: paho's network thread decodes nothing, it only queues what arrives; one worker
thread feeds the core in order (messages, connection, timer), publishes what it returns and
runs its training jobs; ``run()`` waits for a stop request, drives the timer and the systemd
watchdog. Everything about rounds, training, the outbox and acks is in the core.

The model and round topics hold the latest state (retained): of the messages that waited on
one of them while the worker was busy (training), only the newest is fed to the core, so a
slow device next trains on the newest model it received, not on each older one in turn.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent.config import AgentConfig
from edge_agent.core import Action, CoreSettings, EdgeCore, Publish, carry_out
from edge_agent.downlink import DownlinkReceiver, DownlinkStep, is_index
from edge_agent.evaluation import device_evaluation
from edge_agent.he import load_he
from edge_agent.outbox import Outbox
from edge_agent.secagg import SecureRounds
from edge_agent.state import StateStore
from edge_agent.subscriptions import Subscriptions
from edge_agent.systemd import SystemdNotifier
from edge_agent.trainer import LiteRTTrainer, Trainer
from fedmq.chunks import (
    MemoryChunkStore,
    Reassembler,
    ReassemblyLimits,
    chunk_wildcard,
    is_manifest,
    publications,
    transfer_id,
)
from fedmq.data.local import LocalData
from fedmq.errors import ConfigError, ModelError, WireError
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.net.mqtt import ConnectionWatch, connect, make_client
from fedmq.signing import Registry, load_or_create_key
from fedmq.wire import RoundAnnouncement

__all__ = ["EdgeAgent", "build_trainer"]

log = logging.getLogger(__name__)

_TICK = 0.5  # seconds between resend/watchdog checks
_STOP_JOIN = 10.0  # how long shutdown waits for a training in progress


def build_trainer(config: AgentConfig) -> Trainer:
    """The ``config.backend`` trainer (LiteRT, or Keras which needs TensorFlow) for
    ``config.model`` (a bundle directory or a prebuilt name)."""
    path = Path(config.model).expanduser()
    bundle_dir = path if path.is_dir() else prebuilt_bundle_path(config.model)
    if config.backend == "keras":
        try:
            from edge_agent.keras_trainer import KerasTrainer  # imports TensorFlow
        except ImportError as exc:
            raise ModelError(f"backend 'keras' needs TensorFlow and Keras: {exc}") from exc
        return KerasTrainer(load_bundle(bundle_dir), num_threads=config.num_threads)
    return LiteRTTrainer(load_bundle(bundle_dir), num_threads=config.num_threads)


class EdgeAgent:
    """One device. ``trainer``/``data`` default to the ones ``config`` describes."""

    def __init__(
        self,
        config: AgentConfig,
        trainer: Trainer | None = None,
        data: LocalData | None = None,
    ) -> None:
        self.config = config
        self.store = StateStore(config.state_dir, config.device_id)
        self.device_id = self.store.device_id
        self.topics = config.topics
        self.outbox = Outbox(Path(config.state_dir) / "outbox")
        self.trainer: Trainer = trainer if trainer is not None else build_trainer(config)
        self.data = data if data is not None else LocalData.from_config(config.data_config())
        self.data, evaluation = device_evaluation(config, self.data)
        spec = self.trainer.spec
        if self.data.num_classes != spec.num_classes:
            raise ModelError(
                f"local data has {self.data.num_classes} classes, model {spec.name} "
                f"has {spec.num_classes}"
            )
        key = load_or_create_key(config.signing_key) if config.signing_key else None
        load_he(config.he_context)  # registers the ckks codec (None: HE off)
        self.core = EdgeCore(
            CoreSettings(
                fleet=config.fleet, device_id=self.device_id, topics=self.topics,
                train_delay=config.train_delay,
                ack_timeout=config.ack_timeout, max_resends=config.max_resends,
                seed=config.seed, num_threads=config.num_threads,
                metrics_textfile=config.metrics_textfile,
            ),
            self.store, self.outbox, self.trainer, self.data, key, evaluation,
        )
        if key is not None:  # secure rounds need the enrolled key (edge_agent.secagg)
            peers = None
            if config.peer_registry is not None:
                if not Path(config.peer_registry).is_file():
                    raise ConfigError(f"peer_registry {config.peer_registry} is not a file")
                peers = Registry(config.peer_registry)
            self.core.secure = SecureRounds(config.fleet, self.device_id, self.topics, key,
                                            peers, seed=config.seed)
        # The model's retained chunks (worker thread only); kept across reconnects.
        self._chunks = Reassembler(
            ReassemblyLimits(timeout=config.chunk_timeout, remember_expired=0),
            MemoryChunkStore(),
        )
        self._model_chunks = chunk_wildcard(self.topics.model)[: -len("+")]
        # Compressed downlink: index -> snapshot / deltas (edge_agent.downlink).
        self._downlink = DownlinkReceiver(
            self.topics, config.fleet,
            {t.name: t.shape for t in self.trainer.spec.trainable_specs},
        )
        self._downlink_chunks = Reassembler(
            ReassemblyLimits(timeout=config.chunk_timeout, remember_expired=0),
            MemoryChunkStore(),
        )
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        # topic -> sequence number of its newest queued message (model and round topics)
        self._newest: dict[str, int] = {}
        self._seq = itertools.count()
        self._newest_lock = threading.Lock()
        self._tick_pending = threading.Event()
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._client = self._make_client()
        self._worker: threading.Thread | None = None
        log.info(
            "edge agent %s: fleet %s, model %s (%s), %d local examples, %d update(s) in outbox",
            self.device_id, config.fleet, spec.name, self.trainer.runtime_name,
            len(self.data), len(self.outbox),
        )

    # ------------------------------------------------------------------ public view
    @property
    def model_version(self) -> int | None:
        return self.core.model_version

    @property
    def current_round(self) -> RoundAnnouncement | None:
        return self.core.current_round

    def stop(self) -> None:
        """Ask ``run()`` to return (thread-safe, also from a signal handler)."""
        self._stop.set()

    # ------------------------------------------------------------------ MQTT client
    def _make_client(self) -> mqtt.Client:
        will = (
            self.topics.status(self.device_id),
            self.core.status_payload("offline", time.time()),
            1,
            True,
        )
        settings = self.config.mqtt_settings(self.device_id)
        client = make_client(settings, will=will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._subs = Subscriptions(retry_after=max(1.0, settings.reconnect_min))
        self._watch = ConnectionWatch(  # connection trouble: one clear line; fatal: stop
            client, settings, on_fatal=self.stop,
            on_publish_failure=lambda _topic, _reason: self.store.bump("publish_failures"),
        )
        return client

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        log.info(
            "connected to %s:%d as %s (session present: %s)",
            self.config.mqtt.host, self.config.mqtt.port, self.device_id, flags.session_present,
        )
        self.connected.set()
        self._subs.new_connection()
        self._subs.subscribe(client, [
            (self.topics.model, 1), (chunk_wildcard(self.topics.model), 1),
            (self.topics.round, 1), (self.topics.ack(self.device_id), 1),
            (self.topics.secagg_out, 1), (self.topics.secagg_relay(self.device_id), 1),
        ])
        self._events.put(("connected", None))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, props: Any
    ) -> None:
        if self._subs.on_suback(client, mid, reason_codes):
            self.store.bump("subscriptions_refused")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        self._events.put(("disconnected", None))
        if was and not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting with backoff", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        seq: int | None = None
        if msg.topic in (self.topics.model, self.topics.round):
            with self._newest_lock:
                seq = next(self._seq)
                self._newest[msg.topic] = seq
        self._events.put(("message", (msg.topic, bytes(msg.payload), seq)))

    def _superseded(self, topic: str, seq: int | None) -> bool:
        """True when a newer message of this (latest-state) topic is already queued."""
        if seq is None:
            return False
        with self._newest_lock:
            return self._newest.get(topic, seq) > seq

    def _publish(self, out: Publish) -> None:
        if not self.connected.is_set():
            return  # the core sends it again (outbox) or republishes on connect (status)
        for pub in publications(out.topic, out.payload, out.retain, self.config.max_message_bytes):
            self._client.publish(pub.topic, pub.payload, qos=out.qos, retain=pub.retain)

    # ------------------------------------------------------------------ run / stop
    def run(self, stop_event: threading.Event | None = None) -> None:
        """Connect (retrying while the broker is down) and serve until stopped.

        Returns when ``stop_event`` (or :meth:`stop`, SIGTERM, SIGINT) is set, after
        publishing the retained ``offline`` status and disconnecting.
        """
        restore = self._install_signal_handlers()
        notifier = SystemdNotifier()
        cfg = self.config
        self._worker = threading.Thread(target=self._work, name="edge-agent-worker", daemon=True)
        self._worker.start()
        connect(self._client, cfg.mqtt_settings(self.device_id), asynchronous=True)
        self._client.loop_start()
        notifier.ready(f"device {self.device_id}")
        last_ping = 0.0
        try:
            while not self._stop.wait(_TICK):
                if stop_event is not None and stop_event.is_set():
                    break
                if not self._tick_pending.is_set():
                    self._tick_pending.set()
                    self._events.put(("tick", None))
                interval = notifier.watchdog_interval
                now = time.monotonic()
                if interval and now - last_ping >= interval and self._worker.is_alive():
                    notifier.watchdog()
                    last_ping = now
        finally:
            notifier.stopping()
            self._shutdown()
            restore()
        self._watch.raise_if_failed()  # bad credentials / TLS at start-up: exit 1, one line

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("received %s: stopping", signal.Signals(signum).name)
            self.stop()

        for s in previous:
            signal.signal(s, handler)

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        return restore

    def _shutdown(self) -> None:
        self._stop.set()
        self._events.put(("stop", None))
        if self._worker is not None:
            self._worker.join(_STOP_JOIN)
            if self._worker.is_alive():
                log.warning("training still running at shutdown; its round will be redone")
        if self.connected.is_set():
            info = self._client.publish(
                self.topics.status(self.device_id),
                self.core.status_payload("offline", time.time()),
                qos=1,
                retain=True,
            )
            try:
                info.wait_for_publish(timeout=5.0)
            except (RuntimeError, ValueError) as exc:
                log.warning("could not publish the offline status: %s", exc)
            self._client.disconnect()
        self._client.loop_stop()
        self.connected.clear()
        log.info("edge agent %s stopped", self.device_id)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            kind, value = self._events.get()
            if kind == "stop" or self._stop.is_set():
                return
            try:
                carry_out(self.core, self._feed(kind, value), self._publish)
            except Exception:  # never let one bad event kill the worker
                log.exception("error while handling %s", kind)

    def _feed(self, kind: str, value: Any) -> list[Action]:
        now = time.time()
        if kind == "message":
            topic, payload, seq = value
            if self._superseded(topic, seq):
                log.debug("skipping a queued message on %s: a newer one is queued", topic)
                return []
            return self._on_payload(topic, payload, now)
        if kind == "connected":
            if not self.connected.is_set():
                return []
            return self.core.on_connected(now) + self._downlink_step(
                self._downlink.on_connected(), now
            )
        if kind == "disconnected":
            self.core.on_disconnected()
            return []
        if kind == "tick":
            self._tick_pending.clear()
            expired = self._chunks.expire(now) + self._downlink_chunks.expire(now)
            if expired:
                self.store.bump("chunk_transfers_expired", expired)
            return self.core.tick(now)
        return []

    def _on_downlink(
        self, topic: str, base: str | None, payload: bytes, now: float
    ) -> list[Action]:
        """A snapshot or delta of the compressed downlink (or one of its chunks)."""
        if base is not None and self._downlink.wants(base):
            if not payload:
                return []  # a retained chunk being cleared
            try:
                whole = self._downlink_chunks.feed(base, payload, now)
            except WireError as exc:
                self.store.bump("bad_messages")
                log.warning("ignoring bad chunk on %s: %s (%s)", topic, exc.reason, exc.code)
                return []
            if whole is None:
                return []
            self._downlink_chunks.finish(base, transfer_id(whole))
            topic, payload = base, whole
        elif payload and is_manifest(payload):
            return []  # its chunks carry it
        if payload:
            self.store.bump("downlink_bytes", len(payload))
        return self._downlink_step(self._downlink.on_payload(topic, payload), now)

    def _downlink_step(self, step: DownlinkStep, now: float) -> list[Action]:
        if self.connected.is_set():
            if step.unsubscribe:
                self._client.unsubscribe(
                    [t for u in step.unsubscribe for t in (u, chunk_wildcard(u))]
                )
            if step.subscribe:
                self._subs.subscribe(
                    self._client,
                    [(t, 1) for s in step.subscribe for t in (s, chunk_wildcard(s))],
                )
        if step.rejected:
            self.store.bump("downlink_rejected", step.rejected)
        if step.model is None:
            return []
        if step.from_snapshot:
            self.store.bump("downlink_snapshots")
        if step.deltas_applied:
            self.store.bump("downlink_deltas", step.deltas_applied)
        return self.core.on_message(self.topics.model, step.model, now)

    def _on_payload(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """Reassemble the model's retained chunks (docs/protocol.md), then hand whole
        payloads to the core; the model topic's manifest only says chunks are coming."""
        if topic.startswith(self._model_chunks):
            if not payload:
                return []  # a retained chunk being cleared
            try:
                whole = self._chunks.feed("model", payload, now)
            except WireError as exc:
                self.store.bump("bad_messages")
                log.warning("ignoring bad model chunk on %s: %s (%s)", topic, exc.reason,
                            exc.code)
                return []
            if whole is None:
                return []
            self._chunks.finish("model", transfer_id(whole))
            return self.core.on_message(self.topics.model, whole, now)
        if topic == self.topics.model and is_index(payload):
            try:
                step = self._downlink.on_index(payload)
            except WireError as exc:
                self.store.bump("bad_messages")
                log.warning("ignoring bad model index: %s (%s)", exc.reason, exc.code)
                return []
            self.store.bump("downlink_bytes", len(payload))
            return self._downlink_step(step, now)
        base = topic.rsplit("/chunk/", 1)[0] if "/chunk/" in topic else None
        if self._downlink.wants(topic) or (base is not None and self._downlink.wants(base)):
            return self._on_downlink(topic, base, payload, now)
        if topic == self.topics.model and is_manifest(payload):
            log.debug("the model comes in chunks (manifest %d bytes)", len(payload))
            return []
        return self.core.on_message(topic, payload, now)
