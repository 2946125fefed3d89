"""The edge agent: one device's MQTT session, round handling, local training and outbox.

Threads: paho's network thread decodes nothing, it only queues what arrives; one worker
thread handles messages in order (model, round, ack, resends) and trains; ``run()`` waits for
a stop request, drives the resend timer and the systemd watchdog.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
import uuid
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edge_agent.config import AgentConfig
from edge_agent.decide import Decision, SkipReason, decide
from edge_agent.outbox import Outbox, OutboxEntry
from edge_agent.state import StateStore
from edge_agent.systemd import SystemdNotifier
from edge_agent.trainer import LiteRTTrainer, Trainer
from fedmq.data.local import LocalData
from fedmq.data.sampling import sample_size
from fedmq.errors import FedmqError, ModelError, RejectReason, WireError
from fedmq.memory import peak_rss_mb
from fedmq.models.spec import check_weights, load_bundle, prebuilt_bundle_path
from fedmq.net.mqtt import ConnectionWatch, connect, make_client
from fedmq.signing import load_or_create_key, sign_update
from fedmq.update.codecs import CODECS, decode_tensor, encode_delta
from fedmq.wire import (
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    UpdateMessage,
    decode_ack,
    decode_model,
    decode_round,
    encode,
)

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


@dataclass
class _Sent:
    """Bookkeeping of one outbox update sent by this process."""

    last_sent: float
    attempts: int
    info: mqtt.MQTTMessageInfo | None
    gave_up: bool = False


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
        spec = self.trainer.spec
        if self.data.num_classes != spec.num_classes:
            raise ModelError(
                f"local data has {self.data.num_classes} classes, model {spec.name} "
                f"has {spec.num_classes}"
            )
        self._key = load_or_create_key(config.signing_key) if config.signing_key else None
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._tick_pending = threading.Event()
        self._stop = threading.Event()
        self.connected = threading.Event()
        # worker-thread state
        self._global: dict[str, np.ndarray] | None = None
        self._model_version: int | None = None
        self._round: RoundAnnouncement | None = None
        self._sent: dict[str, _Sent] = {}
        self._failed_rounds: set[int] = set()
        self._last_decision: tuple[int, str] | None = None
        self._state_name = "online"
        self._last_metrics: dict[str, float] = {}
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
        return self._model_version

    @property
    def current_round(self) -> RoundAnnouncement | None:
        return self._round

    def stop(self) -> None:
        """Ask ``run()`` to return (thread-safe, also from a signal handler)."""
        self._stop.set()

    # ------------------------------------------------------------------ MQTT client
    def _make_client(self) -> mqtt.Client:
        will = (self.topics.status(self.device_id), self._status_payload("offline"), 1, True)
        settings = self.config.mqtt_settings(self.device_id)
        client = make_client(settings, will=will)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
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
        client.subscribe(
            [(self.topics.model, 1), (self.topics.round, 1), (self.topics.ack(self.device_id), 1)]
        )
        state = "training" if self._state_name == "training" else "online"
        self._publish_status(state)
        self._events.put(("connected", None))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any
    ) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was and not self._stop.is_set():
            log.warning("disconnected from the broker (%s); reconnecting with backoff", rc)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._events.put(("message", (msg.topic, bytes(msg.payload))))

    # ------------------------------------------------------------------ status
    def _status_payload(self, state: str, round_id: int | None = None) -> bytes:
        spec = self.trainer.spec
        return encode(
            StatusMessage(
                fleet=self.config.fleet,
                device=self.device_id,
                state=state,
                runtime=self.trainer.runtime_name,
                capabilities={
                    "model": spec.name,
                    "examples": len(self.data),
                    "threads": self.config.num_threads,
                    "codecs": list(CODECS),
                },
                metrics=dict(self._last_metrics),
                round_id=round_id,
                created_at=time.time(),
            )
        )

    def _publish_status(self, state: str, round_id: int | None = None) -> None:
        self._state_name = state
        if not self.connected.is_set():
            return
        self._client.publish(
            self.topics.status(self.device_id),
            self._status_payload(state, round_id),
            qos=1,
            retain=True,
        )

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
                self._status_payload("offline"),
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
                if kind == "message":
                    self._handle_message(*value)
                elif kind == "connected":
                    self._flush(on_connect=True)
                elif kind == "tick":
                    self._tick_pending.clear()
                    if self._resend_due():
                        self._flush()
            except Exception:  # never let one bad event kill the worker
                log.exception("error while handling %s", kind)

    def _handle_message(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained message being cleared
            return
        try:
            if topic == self.topics.model:
                self._on_model(decode_model(payload))
            elif topic == self.topics.round:
                self._on_round(decode_round(payload))
            elif topic == self.topics.ack(self.device_id):
                self._on_ack(payload)
            else:
                log.debug("ignoring message on %s", topic)
        except WireError as exc:
            self.store.bump("bad_messages")
            log.warning("ignoring bad message on %s: %s (%s)", topic, exc.reason, exc.code)

    def _on_model(self, msg: ModelMessage) -> None:
        if msg.fleet != self.config.fleet:
            log.warning("ignoring model for fleet %r", msg.fleet)
            return
        if msg.version == self._model_version:
            return
        spec = self.trainer.spec
        try:
            raw = {t.name: decode_tensor(t, "float32") for t in msg.tensors}
            weights = check_weights(spec, {n: raw[n] for n in spec.trainable if n in raw},
                                    names=spec.trainable)
        except (WireError, ModelError) as exc:
            self.store.bump("bad_messages")
            log.error("ignoring model version %d: does not fit %s: %s", msg.version, spec.name, exc)
            return
        if self._model_version is not None and msg.version < self._model_version:
            log.warning("model version went back from %d to %d", self._model_version, msg.version)
        self._global = weights
        self._model_version = msg.version
        self.store.set_model_version(msg.version)
        log.info("global model version %d (round %d) received", msg.version, msg.round_id)
        self._consider_round()

    def _on_round(self, ann: RoundAnnouncement) -> None:
        if ann.fleet != self.config.fleet:
            log.warning("ignoring round announcement for fleet %r", ann.fleet)
            return
        previous = self._round
        if previous is not None and ann.round_id < previous.round_id:
            # Round ids only increase: this is a stale retained message (a broker that lost
            # its last state in a crash). Acting on it would drop the current round's update.
            log.warning(
                "ignoring announcement of round %d: round %d is newer", ann.round_id,
                previous.round_id,
            )
            return
        self._round = ann
        if previous is None or previous.round_id != ann.round_id:
            log.info(
                "round %d open: base version %d, %d epoch(s), lr %g, codec %s, %s",
                ann.round_id, ann.base_version, ann.config.epochs, ann.config.lr,
                ann.config.codec,
                f"{len(ann.selected)} selected" if ann.selected else "any device",
            )
        for entry in self.outbox.drop_stale(ann.round_id):
            self._sent.pop(entry.update_id, None)
            self.store.bump("updates_dropped")
        self._flush()
        self._consider_round()

    def _consider_round(self) -> None:
        ann = self._round
        if ann is None or ann.round_id in self._failed_rounds:
            return
        decision = decide(
            ann, self.device_id, self.store.snapshot(), self._model_version,
            fleet=self.config.fleet, now=time.time(),
        )
        if not decision.train:
            key = (ann.round_id, str(decision.reason))
            if key != self._last_decision:
                self._last_decision = key
                level = logging.DEBUG if decision.reason is SkipReason.ALREADY_SUBMITTED else (
                    logging.INFO)
                log.log(level, "round %d: %s", ann.round_id, decision)
            return
        self._train(ann, decision)

    # ------------------------------------------------------------------ training
    def _train(self, ann: RoundAnnouncement, decision: Decision) -> None:
        assert self._global is not None and decision.train
        r, cfg = ann.round_id, ann.config
        self._publish_status("training", r)
        try:
            entry = self._train_round(ann, self._global)
        except (FedmqError, ValueError) as exc:
            self._failed_rounds.add(r)
            self.store.bump("train_failures")
            log.error("round %d: training failed: %s", r, exc)
            self._publish_status("idle", r)
            return
        log.info(
            "round %d: trained %d epoch(s): loss %.4f, %d examples in %.2fs; update %s "
            "(%s, %d bytes)",
            r, cfg.epochs, self._last_metrics["loss"], int(self._last_metrics["examples"]),
            self._last_metrics["train_seconds"], entry.update_id, cfg.codec, len(entry.payload),
        )
        self._send(entry)
        self._publish_status("idle", r)

    def _train_round(
        self, ann: RoundAnnouncement, global_weights: Mapping[str, np.ndarray]
    ) -> OutboxEntry:
        r, cfg = ann.round_id, ann.config
        x, y = self.data.round_batch(r)
        m = sample_size(len(x), cfg.sample_fraction, cfg.max_examples)
        x, y = x[:m], y[:m]  # round_batch is shuffled
        self.trainer.set_weights(global_weights)
        # Seeded by (seed, device, round): a round's training and rounding are reproducible,
        # differ between devices, and a retrained round after a crash gives the same update.
        rng = np.random.default_rng([self.config.seed, zlib.crc32(self.device_id.encode()), r])
        metrics = self.trainer.fit(x, y, epochs=cfg.epochs, lr=cfg.lr, rng=rng)
        local = self.trainer.get_weights()
        delta = {n: local[n] - global_weights[n] for n in self.trainer.spec.trainable}
        tensors = encode_delta(delta, cfg.codec, rng)
        self._last_metrics = {
            "loss": float(metrics.loss) if math.isfinite(metrics.loss) else 0.0,
            "train_seconds": float(metrics.seconds),
            "examples": float(metrics.examples),
            "steps": float(metrics.steps),
            "peak_rss_mb": peak_rss_mb(),
        }
        msg = UpdateMessage(
            fleet=self.config.fleet,
            round_id=r,
            base_version=ann.base_version,
            device=self.device_id,
            update_id=uuid.uuid4().hex,
            num_examples=int(m),
            codec=cfg.codec,
            tensors=tensors,
            metrics=self._last_metrics,
            created_at=time.time(),
        )
        if self._key is not None:
            msg = sign_update(msg, self._key)
        # Durable before it leaves the device: a crash now means a resend, never a loss.
        entry = self.outbox.put(r, msg.update_id, encode(msg))
        self.store.record_submission(r, msg.update_id)
        return entry

    # ------------------------------------------------------------------ sending
    def _send(self, entry: OutboxEntry) -> None:
        sent = self._sent.get(entry.update_id)
        attempts = sent.attempts if sent else 0
        if not self.connected.is_set():
            log.info(
                "offline: update %s of round %d waits in the outbox", entry.update_id,
                entry.round_id,
            )
            return
        info = self._client.publish(
            self.topics.update(self.device_id), entry.payload, qos=1
        )
        self._sent[entry.update_id] = _Sent(time.monotonic(), attempts + 1, info)
        if attempts:
            self.store.bump("updates_resent")
            log.info(
                "re-sent update %s of round %d (attempt %d)",
                entry.update_id, entry.round_id, attempts + 1,
            )

    def _resend_due(self) -> bool:
        """Cheap check (no disk reads) whether some sent update waited out its ack timeout."""
        now = time.monotonic()
        return any(
            not s.gave_up and now - s.last_sent >= self.config.ack_timeout
            for s in self._sent.values()
        )

    def _flush(self, on_connect: bool = False) -> None:
        """Send pending updates of the current round that need it."""
        if self._round is None or not self.connected.is_set():
            return
        now = time.monotonic()
        for entry in self.outbox.pending():
            if entry.round_id != self._round.round_id:
                continue  # dropped when the round announcement says so
            sent = self._sent.get(entry.update_id)
            if sent is None:
                self._send(entry)  # never sent by this process (restart, or was offline)
                continue
            if on_connect and sent.info is not None and not sent.info.is_published():
                continue  # paho re-sends its unacknowledged QoS 1 messages itself
            if sent.gave_up or now - sent.last_sent < self.config.ack_timeout:
                continue
            if sent.attempts > self.config.max_resends:
                sent.gave_up = True
                log.warning(
                    "no ack for update %s of round %d after %d sends; keeping it until the "
                    "round closes", entry.update_id, entry.round_id, sent.attempts,
                )
                continue
            self._send(entry)

    # ------------------------------------------------------------------ acks
    def _on_ack(self, payload: bytes) -> None:
        ack = decode_ack(payload)
        if ack.device != self.device_id or ack.fleet != self.config.fleet:
            log.warning("ignoring ack for %s/%s", ack.fleet, ack.device)
            return
        # Record and log the outcome first, then clear the outbox: whoever sees the outbox
        # empty (an operator, a test) also sees why.
        if ack.accepted:
            self.store.bump("updates_accepted")
            log.info("update %s of round %d accepted", ack.update_id, ack.round_id)
        elif ack.code == RejectReason.DUPLICATE:
            log.info("update %s of round %d: aggregator already has it (duplicate)",
                     ack.update_id, ack.round_id)
        else:
            self.store.bump("updates_rejected")
            log.warning(
                "update %s of round %d rejected: %s: %s",
                ack.update_id, ack.round_id, ack.code, ack.reason or "(no reason given)",
            )
        self._sent.pop(ack.update_id, None)
        if not self.outbox.remove(ack.update_id):
            log.debug("ack for update %s that is not in the outbox", ack.update_id)
