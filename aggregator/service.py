"""The MQTT shell around :class:`~aggregator.engine.Engine` (paho-mqtt 2.x, MQTT v5).

paho's network thread only queues what arrives; the calling thread runs the engine, so the
engine needs no locks. The queue is bounded (``ingest_queue_bytes``, :mod:`aggregator.inbox`):
when it is full paho stops reading and the backlog stays in the broker. Updates are received
with ``manual_ack``: the PUBACK goes out only after the engine journaled (or rejected) the
update, and the fixed client id with a persistent session makes the broker keep QoS 1
updates while the aggregator is down.

A full state directory stops nothing: an update that cannot be journaled is not
acknowledged (one ERROR line) and kept in memory to be retried every ``tick_interval``
until it is journaled (the broker redelivers it if the connection or the process goes
first); no round is closed, abandoned or opened while updates wait, and a close that hits
the full disk leaves the round open and is retried the same way. On every start and
reconnect, finished or not, the service connects and republishes its retained state; with
all ``rounds`` done it then answers what the broker kept for it and exits.

Payloads above ``max_message_bytes`` go out in chunks, and update chunks are held in
``<state_dir>/chunks`` (:mod:`fedmq.chunks`): a chunk is acknowledged once on disk, the one
that completes an update once the update is journaled (docs/protocol.md, "Chunked transfer").
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import paho.mqtt.client as mqtt

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Outgoing, RoundResult, resolve_bundle
from aggregator.evaluate import make_evaluator
from aggregator.he import he_mode, install_he
from aggregator.inbox import Inbox
from aggregator.metrics import AggregatorMetrics
from aggregator.secagg import SECAGG_POLICY, SecAggDriver
from aggregator.store import Store
from fedmq.chunks import (
    DirChunkStore,
    Reassembler,
    ReassemblyLimits,
    is_chunk,
    publications,
    transfer_id,
)
from fedmq.errors import RejectReason, StateError, StorageFullError, WireError
from fedmq.net.mqtt import ConnectionWatch, connect, make_client
from fedmq.wire import AckMessage

__all__ = ["AggregatorService", "build_engine", "run"]

log = logging.getLogger(__name__)

OnRound = Callable[[RoundResult], None]
# After the first connection, updates the broker kept for us are handled before any round
# is closed, abandoned or opened.
_BACKLOG_GRACE = 0.5
# A finished federation waits this long for its final model to reach the broker (a broker
# restart at the very end) before it exits; the next start republishes it anyway.
_FINAL_DELIVERY_WAIT = 30.0


@dataclass(frozen=True)
class _Inbound:
    generation: int
    topic: str
    payload: bytes
    mid: int
    qos: int
    retain: bool = False


@dataclass(frozen=True)
class _Connected:
    generation: int
    session_present: bool


def _delivered(info: mqtt.MQTTMessageInfo) -> bool:
    """The broker acknowledged this publish. paho raises (instead of answering False) for a
    publish queued while disconnected that it then dropped: not delivered."""
    try:
        return bool(info.is_published())
    except (RuntimeError, ValueError):
        return False


def build_engine(config: AggregatorConfig, metrics: AggregatorMetrics | None = None) -> Engine:
    """Bundle, evaluation set, state directory and metrics wired into an engine."""
    bundle = resolve_bundle(config.model)
    evaluator = make_evaluator(bundle, config.eval_dataset, config.eval_examples, config.seed)
    store = Store(config.state_dir)
    try:
        engine = Engine(config, store, bundle, evaluator, metrics)
        install_he(config, engine)  # HE mode (docs/privacy.md); nothing when off
        return engine
    except BaseException:
        store.close()
        raise


class AggregatorService:
    """Connects, feeds the engine and publishes what it returns until stopped or done."""

    def __init__(
        self,
        config: AggregatorConfig,
        engine: Engine | None = None,
        on_round: OnRound | None = None,
    ) -> None:
        self.config = config
        self.engine = engine or build_engine(config)
        self.on_round = on_round
        self.he = he_mode(self.engine)  # encrypted rounds: the decryptor's topics
        self.topics = config.topics
        # round_policy = "secagg": the secure protocol of each round (aggregator.secagg)
        self.secagg = (SecAggDriver(config, self.engine, time.time())
                       if config.round_policy == SECAGG_POLICY else None)
        self._settings = config.mqtt_settings()
        # bounded: a full inbox blocks on_message, so the backlog stays in the broker; a put
        # waits at most keepalive / 4 so PINGREQs still go out (aggregator.inbox)
        self._inbox: Inbox[_Inbound | _Connected] = Inbox(
            config.ingest_queue_bytes, self._settings.keepalive / 4)
        self._generation = 0
        self._connected = False
        self._stopping = False
        self._ticking = False
        self._pending: list[Outgoing] = []
        self._parked: list[_Inbound] = []  # updates not journaled: the state disk is full
        self._full: StorageFullError | None = None  # a round change failed on a full disk
        self._last_infos: list[mqtt.MQTTMessageInfo] = []
        self._chunks = Reassembler(
            ReassemblyLimits(
                max_transfer_bytes=config.max_update_bytes,
                max_transfers_per_sender=config.max_transfers_per_device,
                timeout=config.chunk_timeout,
            ),
            DirChunkStore(Path(config.state_dir) / "chunks"),
            now=time.time(),
        )
        self.client = make_client(self._settings, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._watch = ConnectionWatch(  # connection trouble: one clear line; fatal: stop
            self.client, self._settings,
            on_publish_failure=lambda _topic, reason: self.engine.metrics.publish_failures
            .labels(reason=reason).inc(),
        )

    # -- paho callbacks (network thread): only queue, never raise ---------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        try:
            if getattr(reason, "is_failure", False):
                log.error("broker refused the connection: %s", reason)
                return
            self._generation += 1
            client.subscribe(self._subscriptions())
            present = bool(getattr(flags, "session_present", False))
            self._inbox.put(_Connected(self._generation, present), control=True)
        except Exception:
            log.exception("error in on_connect")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        try:
            self._generation += 1
            self._connected = False
            if self._stopping:
                log.info("disconnected from the broker")
            else:
                log.warning("disconnected from the broker (%s); reconnecting", reason)
        except Exception:
            log.exception("error in on_disconnect")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._inbox.put(
                _Inbound(
                    self._generation, msg.topic, bytes(msg.payload), msg.mid, msg.qos,
                    bool(msg.retain),
                ),
                len(msg.payload),
            )
        except Exception:
            log.exception("error queueing a message on %s", getattr(msg, "topic", "?"))

    def _subscriptions(self) -> list[tuple[str, Any]]:
        """Model (first), updates and statuses, QoS 1.

        The model topic is read for its retained message (delivered with the retain flag on
        each subscribe): a newer one of our epoch means the state was restored from an older
        copy; our own live publishes arrive without the flag and are ignored (not noLocal:
        Mosquitto then withholds the retained model our client id left). With MQTT 5 updates
        are subscribed retain-as-published, so an update a device published with the retain
        flag is refused also when delivered live, not only on a resubscribe (MQTT 3.1.1 has
        no such option: there only the resubscribe deliveries carry the flag).
        """
        topics = (self.topics.model, self.topics.update_wildcard, self.topics.status_wildcard)
        extra = [(self.topics.secagg_in_wildcard, 1)] if self.secagg is not None else []
        extra += [(t, 1) for t in (self.he.subscriptions if self.he is not None else ())]
        if self._settings.protocol != "5":
            return [(t, 1) for t in topics] + extra
        return [
            (self.topics.model, mqtt.SubscribeOptions(1)),
            (self.topics.update_wildcard, mqtt.SubscribeOptions(1, retainAsPublished=True)),
            (self.topics.status_wildcard, mqtt.SubscribeOptions(1)),
            *extra,
        ]

    # -- main thread -----------------------------------------------------------------------
    def _publish(self, items: list[Outgoing]) -> None:
        for item in items:
            if not self._connected:
                self._pending.append(item)
                continue
            for pub in publications(
                item.topic, item.payload, item.retain, self.config.max_message_bytes
            ):
                info = self.client.publish(pub.topic, pub.payload, qos=item.qos,
                                           retain=pub.retain)
                if item.retain:
                    self._last_infos = [i for i in self._last_infos if not _delivered(i)]
                    self._last_infos.append(info)

    def _handle_connected(self, event: _Connected) -> None:
        if event.generation != self._generation:
            return
        self._connected = True
        log.info(
            "connected to %s:%d as %s (session %s)", self._settings.host, self._settings.port,
            self._settings.client_id, "resumed" if event.session_present else "new",
        )
        pending, self._pending = self._pending, []
        # Republish the current retained messages on every (re)connect, also when the session
        # survived: a broker restored from an older autosave keeps our session but may hold a
        # stale retained round/model (devices would act on an old round until the next one).
        pending = [p for p in pending if not p.retain]
        pending = self.engine.current_messages(time.time()) + pending
        self._last_infos = []  # the republished retained messages supersede earlier ones
        self._publish(pending)

    def _handle_inbound(self, item: _Inbound) -> None:
        device = self.topics.device_of(item.topic)
        kind = item.topic.rsplit("/", 2)[-2] if item.topic.count("/") >= 2 else ""
        now = time.time()
        secure = self.topics.secagg_device_of(item.topic) if self.secagg is not None else None
        try:
            if self.secagg is not None and secure is not None:
                self._publish(self.secagg.on_message(secure, item.payload, now))
            elif self.secagg is not None and device is not None and kind == "update":
                self._publish(self.secagg.refuse_update(device))
            elif device is not None and kind == "update" and item.retain and not item.payload:
                log.debug("%s cleared its retained update", device)  # the fix, not an update
            elif device is not None and kind == "update" and is_chunk(item.payload):
                if not self._handle_chunk(item, device, now):
                    return  # completed but not journaled: no PUBACK
            elif device is not None and kind == "update":
                if not self._handle_update(item, device, now):
                    return  # not journaled: no PUBACK
                if self._ticking:
                    self._tick(now)
            elif device is not None and kind == "status":
                self._publish(self.engine.on_status(device, item.payload, now))
            elif self.he is not None and item.topic in self.he.subscriptions:
                self.he.on_message(item.topic, item.payload)
                if self._ticking:
                    self._tick(now)
            elif item.topic == self.topics.model:
                if item.retain:
                    self._publish(self.engine.on_model(item.payload, now))
            else:
                log.debug("ignoring a message on %s", item.topic)
        except StateError:
            raise  # the state is not writable: stop without acknowledging
        except Exception:
            log.exception("error handling a message on %s (acknowledged, dropped)", item.topic)
        self._ack(item)

    def _handle_update(self, item: _Inbound, device: str, now: float) -> bool:
        """Journal (or reject) one update and publish its ack; False when it could not be
        journaled on a full disk (parked: not acknowledged, retried by :meth:`_tick`)."""
        try:
            ack = self.engine.handle_update(device, item.payload, now, retained=item.retain)
        except StorageFullError as exc:
            if item not in self._parked:
                log.error(
                    "state directory %s is full: update %s of %s not acknowledged, will be "
                    "redelivered", exc.directory, exc.update_id or "?", exc.device or device,
                )
                self._parked.append(item)
            return False
        except (sqlite3.Error, OSError) as exc:  # never acknowledge what may not be journaled
            raise StateError(f"update on {item.topic} not journaled: {exc}") from exc
        out = self.engine.ack_outgoing(ack)
        self._publish([out] if out else [])
        return True

    def _handle_chunk(self, item: _Inbound, device: str, now: float) -> bool:
        """Hold one chunk of an update durably (then it may be acknowledged) or reject it
        with an ack that names the reason; the chunk that completes a transfer hands the whole
        payload to :meth:`_handle_update`, acknowledged once journaled (docs/protocol.md)."""
        if item.retain:
            self._reject_chunk(device, WireError(
                "a chunk published with the retain flag", RejectReason.RETAINED))
            return True
        try:
            whole = self._chunks.feed(device, item.payload, now)
        except WireError as exc:
            self._reject_chunk(device, exc)
            return True
        except OSError as exc:  # never acknowledge a chunk that may not be on disk
            log.error(
                "chunk from %s not stored (%s): not acknowledged; the device sends its update "
                "again when no ack comes", device, exc,
            )
            return False
        if whole is None:
            return True
        if not self._handle_update(replace(item, payload=whole), device, now):
            return False
        self._chunks.finish(device, transfer_id(whole))
        if self._ticking:
            self._tick(now)
        return True

    def _reject_chunk(self, device: str, exc: WireError) -> None:
        log.warning("rejected a chunk from %s: %s (%s)", device, exc.reason, exc.code)
        self.engine.metrics.updates_rejected.labels(reason=exc.code).inc()
        ack = AckMessage(
            fleet=self.config.fleet, round_id=0, device=device, update_id="", accepted=False,
            code=exc.code, reason=exc.reason, created_at=time.time(),
        )
        out = self.engine.ack_outgoing(ack)
        self._publish([out] if out else [])

    def _retry_parked(self, now: float) -> bool:
        """Retry the updates a full disk kept from the journal; True once none is left."""
        parked, self._parked = self._parked, []
        done = 0
        for i, item in enumerate(parked):
            if item.generation != self._generation:
                continue  # its connection is gone: the broker redelivers it
            device = self.topics.device_of(item.topic) or ""
            try:
                ack = self.engine.handle_update(device, item.payload, now, retained=item.retain)
            except StorageFullError as exc:
                log.debug("still full: %s", exc)
                self._parked = parked[i:]
                return False
            out = self.engine.ack_outgoing(ack)
            self._publish([out] if out else [])
            self._ack(item)
            self._chunks.finish(device, transfer_id(item.payload))  # if it came in chunks
            done += 1
        if done:
            log.info("state directory has space again: %d waiting update(s) handled", done)
        return True

    def _tick(self, now: float) -> None:
        """Retry parked updates first; then open/close/abandon rounds, unless the disk is full."""
        expired = self._chunks.expire(now)
        if expired:
            self.engine.metrics.chunk_transfers_expired.inc(expired)
        if self._parked and not self._retry_parked(now):
            return
        try:
            out = self.engine.tick(now)
        except StorageFullError as exc:
            if self._full is None:
                log.error(
                    "%s: the round stays as it is, retrying every %gs",
                    exc, self.config.tick_interval,
                )
            else:
                log.debug("still full: %s", exc)
            self._full = exc
            return
        if self._full is not None:
            log.info("state directory %s has space again", self._full.directory)
            self._full = None
        self._publish(out + (self.he.take_outgoing() if self.he is not None else []))
        if self.secagg is not None:
            self._publish(self.secagg.tick(now))

    def _ack(self, item: _Inbound) -> None:
        if item.qos == 0:
            return
        if item.generation != self._generation:
            return  # the connection it came on is gone: the broker will redeliver it
        self.client.ack(item.mid, item.qos)

    def _report(self) -> None:
        for result in self.engine.pop_results():
            if result.status == "closed" and result.round_id % self.config.log_every == 0:
                acc = result.metrics.get("accuracy")
                log.info(
                    "round %d closed: %d participants (%d examples), accuracy %s, "
                    "bytes in %d out %d, %.1fs -> model v%s",
                    result.round_id, result.participants, result.num_examples,
                    "n/a" if acc is None else f"{acc:.4f}", result.bytes_in, result.bytes_out,
                    result.seconds, result.version,
                )
            if self.on_round is not None:
                try:
                    self.on_round(result)
                except Exception:
                    log.exception("on_round callback failed")

    def run(self, stop_event: threading.Event | None = None) -> int:
        """Serve until ``stop_event`` is set, the configured rounds are done, or a fatal error.

        Always connects and republishes the retained model (and round, or clears it) first,
        also when all rounds were done before the start. Returns 0 on a clean stop, 1 when
        the state could not be written.
        """
        stop = stop_event or threading.Event()
        self._watch.on_fatal = stop.set
        cfg = self.config
        if cfg.metrics_port:
            self.engine.metrics.serve(cfg.metrics_port, cfg.metrics_host)
        self._publish(self.engine.start(time.time(), tick=False))
        connect(self.client, self._settings, asynchronous=True)
        self.client.loop_start()
        code = 0
        next_tick = float("inf")  # first tick once connected and the backlog had a moment
        done_since = 0.0
        try:
            while not stop.is_set():
                item = self._inbox.get(timeout=cfg.tick_interval)
                if isinstance(item, _Connected):
                    self._handle_connected(item)
                    if next_tick == float("inf"):
                        next_tick = time.monotonic() + _BACKLOG_GRACE
                elif isinstance(item, _Inbound):
                    self._handle_inbound(item)
                if time.monotonic() >= next_tick:
                    self._ticking = True
                    next_tick = time.monotonic() + cfg.tick_interval
                    self._tick(time.time())
                self._report()
                if self.engine.done and self._ticking and not self._parked:
                    done_since = done_since or time.monotonic()
                    if self._retained_delivered():
                        break  # connected, republished and delivered, the backlog answered
                    if time.monotonic() - done_since > _FINAL_DELIVERY_WAIT:
                        log.warning(
                            "all rounds done, but the final model did not reach the broker "
                            "within %.0fs: the next start republishes it", _FINAL_DELIVERY_WAIT,
                        )
                        break
            if self.engine.done and not stop.is_set():
                self._drain()
                log.info("all %d round(s) done", cfg.rounds)
        except StateError as exc:
            log.error("stopping: %s", exc)
            code = 1
        finally:
            self._shutdown()
        self._watch.raise_if_failed()  # bad credentials / TLS at start-up: exit 1, one line
        return code

    def _retained_delivered(self) -> bool:
        """Connected, nothing waiting to be published, every retained publish acknowledged
        by the broker (QoS 1 PUBACK)."""
        if not self._connected or self._pending:
            return False
        return all(_delivered(info) for info in self._last_infos)

    def _drain(self) -> None:
        """Answer what already arrived (late updates get a definitive ack) before leaving."""
        while True:
            item = self._inbox.get(0)
            if item is None:
                return
            if isinstance(item, _Inbound):
                self._handle_inbound(item)

    def _shutdown(self) -> None:
        self._stopping = True
        self._inbox.close()  # a network thread blocked in put must not hold up loop_stop
        if self._connected:
            deadline = time.monotonic() + 10.0
            for info in self._last_infos:
                while not _delivered(info) and time.monotonic() < deadline:
                    time.sleep(0.02)
        with contextlib.suppress(Exception):  # already gone
            self.client.disconnect()
        self.client.loop_stop()
        self.engine.store.close()


def run(
    config: AggregatorConfig,
    stop_event: threading.Event | None = None,
    on_round: OnRound | None = None,
) -> int:
    """Run the aggregator until stopped (SIGTERM/SIGINT in the main thread) or done."""
    stop = stop_event or threading.Event()
    restore: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def _handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            restore[sig] = signal.signal(sig, _handler)
    try:
        service = AggregatorService(config, on_round=on_round)
        return service.run(stop)
    finally:
        for sig, old in restore.items():
            signal.signal(sig, old)
