"""Many simulated devices in one process: one MQTT connection each, one thread for all.

Each device is its own paho client (its own client id, credentials, last will, subscriptions
and pending updates), but none runs paho's network thread: one :mod:`selectors` loop (epoll
on Linux) drives every socket with paho's ``loop_read`` / ``loop_write`` / ``loop_misc``,
registering a socket for writing only while paho has bytes queued for it (the
``on_socket_*`` callbacks). Connections are opened in batches so the broker's accept queue
never overflows.

A device speaks the real protocol: retained ``online`` status (``offline`` as last will and
on exit), QoS 1 subscriptions to the model, the round and its own ack topic; it takes part
in a round when it holds the round's base model, is selected (or nobody is named) and is not
dropped out (:meth:`FleetPlan.dropped`); it sends a real encoded (and, with keys, signed)
update at its arrival time, counts the aggregator's answer once per update id, resends the
same bytes after ``ack_timeout`` (doubling, capped at 8x) and gives up after
``max_resends``. Decoded models and rounds are shared by the devices of a process (every
device receives the same retained bytes; they are decoded once).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
import selectors
import socket
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import paho.mqtt.client as mqtt

from fedmq.errors import WireError
from fedmq.memory import peak_rss_mb
from fedmq.net.mqtt import parse_endpoint
from fedmq.signing import DeviceKey, sign_update
from fedmq.topics import Topics
from fedmq.update.codecs import codec_names, encode_delta, get_codec
from fedmq.wire import (
    RoundAnnouncement,
    StatusMessage,
    TrainingConfig,
    UpdateMessage,
    decode_ack,
    decode_model,
    decode_round,
    encode,
    message_type,
)
from fedmq_ops.simfleet.limits import raise_nofile
from fedmq_ops.simfleet.plan import FleetPlan
from fedmq_ops.simfleet.privacy import privatize_round

if TYPE_CHECKING:
    from fedmq_ops.simfleet.training import ShardTrainer

__all__ = ["RoundTally", "Shard", "ShardResult", "ShardSettings"]

log = logging.getLogger(__name__)

_MAX_BACKOFF_FACTOR = 8
_MISC_INTERVAL = 1.0
_RECONNECT_MAX = 30.0


@dataclass(frozen=True)
class ShardSettings:
    """How the devices of one process connect and behave."""

    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "sim"
    topic_prefix: str = ""
    protocol: str = "5"
    keepalive: int = 60
    # username = the device id when passwords are given (one for all, or one per device)
    password: str | None = None
    passwords: Mapping[str, str] | None = None
    sign: bool = False
    rounds: int = 1
    ack_timeout: float = 60.0
    max_resends: int = 5
    connect_batch: int = 64
    timeout: float = 600.0
    client_id_prefix: str = ""
    # the nodes of a broker cluster ("host:port" each) to spread the devices over: each
    # device connects to one, chosen by its id (empty: every device to host:port)
    brokers: tuple[str, ...] = ()
    # real training (fedmq_ops.simfleet.training) instead of synthetic deltas: a dataset name
    # (``digits``, ``fashion-mnist``), the model bundle or prebuilt name, the split scheme
    train_dataset: str = ""
    train_model: str = "digits-mlp"
    train_partition: str = "iid"
    # misbehaving devices (tests of the aggregator's DP bound): they never clip in DP rounds
    unclipped: frozenset[str] = frozenset()


@dataclass
class RoundTally:
    """What the devices of a process saw of one round (wall-clock times, time.time())."""

    opened_at: float = 0.0
    sent: int = 0
    accepted: int = 0
    dropouts: int = 0
    first_send: float = 0.0
    last_send: float = 0.0
    last_ack: float = 0.0
    model_seen: float = 0.0  # first arrival of the model this round produced

    def to_dict(self) -> dict[str, float]:
        return dict(vars(self))


@dataclass
class ShardResult:
    """One process's counts and costs (JSON-able via :meth:`to_dict`)."""

    devices: int = 0
    connected: int = 0  # now (0 after leaving)
    peak_connected: int = 0
    connect_seconds: float = 0.0
    sent: int = 0
    resent: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    expired: int = 0
    dropouts: int = 0
    acks_repeated: int = 0
    acks_unknown: int = 0
    disconnects: int = 0
    start_version: int | None = None
    final_version: int | None = None
    rounds: dict[int, RoundTally] = field(default_factory=dict)
    completed: bool = False
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    nofile_soft: int = 0
    nofile_hard: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["rounds"] = {str(k): v.to_dict() for k, v in sorted(self.rounds.items())}
        return out


@dataclass
class _Pending:
    round_id: int
    epoch: str
    base_version: int
    config: TrainingConfig
    attempts: int = 0
    payload: bytes | None = None  # kept only when trained (a resend must not train again)


class _Device:
    __slots__ = (
        "client",
        "connected",
        "connecting",
        "epoch",
        "id",
        "key",
        "model_version",
        "pending",
        "reconnect_delay",
        "refused",
        "round",
        "sock",
        "submitted",
    )

    def __init__(self, device_id: str, key: DeviceKey | None) -> None:
        self.id = device_id
        self.key = key
        self.client: mqtt.Client | None = None
        self.sock: Any = None
        self.connected = False
        self.connecting = False
        self.refused = False
        self.epoch: str | None = None
        self.model_version: int | None = None
        self.round: RoundAnnouncement | None = None
        self.submitted: set[tuple[str, int]] = set()
        self.pending: dict[str, _Pending] = {}
        self.reconnect_delay = 1.0


@dataclass(frozen=True)
class _Model:
    epoch: str
    version: int
    round_id: int
    shapes: dict[str, tuple[int, ...]]


class Shard:
    """The devices ``devices`` of ``plan``, run by :meth:`run` until ``settings.rounds``
    models were published after the first one they saw (or ``settings.timeout``)."""

    def __init__(self, plan: FleetPlan, devices: Sequence[str], settings: ShardSettings) -> None:
        self.plan = plan
        self.settings = settings
        self.topics = Topics(settings.fleet, settings.topic_prefix)
        self.devices = [_Device(d, plan.key(d) if settings.sign else None) for d in devices]
        self.result = ShardResult(devices=len(self.devices))
        self._sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._models: dict[bytes, _Model | None] = {}
        self._shapes: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
        self._rounds: dict[bytes, RoundAnnouncement | None] = {}
        self._selected: dict[int, frozenset[str]] = {}  # id(announcement) -> its selection
        self._pending = 0
        self._connecting = 0
        self._target: int | None = None
        self._stopping = False
        self._warned: set[str] = set()
        self._codecs = list(codec_names())
        self._weights: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self._trainer: ShardTrainer | None = None
        if settings.train_dataset:
            from fedmq_ops.simfleet.training import ShardTrainer

            self._trainer = ShardTrainer(settings.train_model, settings.train_dataset,
                                         settings.train_partition, plan.devices, devices,
                                         plan.seed)

    # ------------------------------------------------------------------ timers
    def _at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, fn))

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn()

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    # ------------------------------------------------------------------ clients
    def _status(self, d: _Device, state: str) -> bytes:
        return encode(StatusMessage(
            fleet=self.settings.fleet, device=d.id, state=state, runtime="simulated",
            capabilities={"codecs": self._codecs, "simulated": True},
            created_at=time.time(), epoch=d.epoch or "", model_version=d.model_version,
        ))

    def _make_client(self, d: _Device) -> mqtt.Client:
        s = self.settings
        proto = mqtt.MQTTv5 if s.protocol == "5" else mqtt.MQTTv311
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id_prefix + d.id,
                        protocol=proto, userdata=d)
        password = (s.passwords or {}).get(d.id, s.password)
        if password is not None:
            c.username_pw_set(d.id, password)
        c.will_set(self.topics.status(d.id), self._status(d, "offline"), qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_register_write
        c.on_socket_unregister_write = self._on_unregister_write
        return c

    def _on_socket_open(self, _c: mqtt.Client, d: _Device, sock: Any) -> None:
        d.sock = sock
        self._sel.register(sock, selectors.EVENT_READ, d)

    def _on_socket_close(self, _c: mqtt.Client, d: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)
        d.sock = None

    def _on_register_write(self, _c: mqtt.Client, d: _Device, sock: Any) -> None:
        self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, d)

    def _on_unregister_write(self, _c: mqtt.Client, d: _Device, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):  # closing
            self._sel.modify(sock, selectors.EVENT_READ, d)

    def _broker(self, d: _Device) -> tuple[str, int]:
        """The broker (host, port) of device ``d``: one of ``settings.brokers`` by its id."""
        s = self.settings
        if not s.brokers:
            return s.host, s.port
        return parse_endpoint(s.brokers[zlib.crc32(d.id.encode()) % len(s.brokers)],
                              "brokers")

    def _open(self, d: _Device) -> None:
        host, port = self._broker(d)
        try:
            if d.client is None:
                d.client = self._make_client(d)
                d.connecting = True
                d.client.connect(host, port, self.settings.keepalive)
            else:
                d.connecting = True
                d.client.reconnect()
            self._connecting += 1
        except OSError as exc:
            d.connecting = False
            self._warn_once(f"connect {type(exc).__name__}", "cannot connect to %s:%d: %s",
                            host, port, exc)
            self._retry(d)

    def _retry(self, d: _Device) -> None:
        if self._stopping:
            return
        delay, d.reconnect_delay = d.reconnect_delay, min(d.reconnect_delay * 2, _RECONNECT_MAX)
        self._at(time.time() + delay, lambda: self._open(d))

    def _on_connect(self, c: mqtt.Client, d: _Device, _flags: Any, reason: Any,
                    _props: Any) -> None:
        self._settle_connect(d)
        if reason.is_failure:
            d.refused = True
            self._warn_once(f"connack {reason}", "device %s: broker refused the connection: "
                            "%s (further refusals of this kind not logged)", d.id, reason)
            return
        d.connected = True
        d.reconnect_delay = 1.0
        self.result.connected += 1
        self.result.peak_connected = max(self.result.peak_connected, self.result.connected)
        t = self.topics
        c.subscribe([(t.model, 1), (t.round, 1), (t.ack(d.id), 1)])
        c.publish(t.status(d.id), self._status(d, "online"), qos=1, retain=True)
        # Updates sent before a connection loss wait for their resend timers.

    def _settle_connect(self, d: _Device) -> None:
        if d.connecting:
            d.connecting = False
            self._connecting -= 1

    def _on_disconnect(self, _c: mqtt.Client, d: _Device, _flags: Any, reason: Any,
                       _props: Any) -> None:
        was = d.connected
        d.connected = False
        if was:
            self.result.connected -= 1
        self._settle_connect(d)
        if self._stopping or d.refused:
            return
        self.result.disconnects += 1
        self._warn_once("disconnect", "device %s lost its connection (%s); reconnecting "
                        "(further losses are counted, not logged)", d.id, reason)
        self._retry(d)

    # ------------------------------------------------------------------ messages
    def _on_message(self, _c: mqtt.Client, d: _Device, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        if not payload:
            return
        topic = msg.topic
        now = time.time()
        if topic == self.topics.model:
            self._on_model(d, payload, now)
        elif topic == self.topics.round:
            self._on_round(d, payload, now)
        else:
            self._on_ack(d, payload, now)

    @staticmethod
    def _digest(payload: bytes) -> bytes:
        return hashlib.blake2b(payload, digest_size=16).digest()

    def _model(self, payload: bytes) -> _Model | None:
        key = self._digest(payload)
        if key not in self._models:
            model: _Model | None = None
            try:
                if message_type(payload) == "manifest":
                    self._warn_once("manifest", "the model arrives in chunks "
                                    "(max_message_bytes): the simulator does not reassemble "
                                    "chunked models; no device takes part")
                else:
                    m = decode_model(payload)
                    shapes = {t.name: tuple(t.shape) for t in m.tensors}
                    model = _Model(m.epoch, m.version, m.round_id, shapes)
                    self._shapes[(m.epoch, m.version)] = shapes
                    if self._trainer is not None:
                        if len(self._weights) > 2:
                            self._weights.pop(min(self._weights, key=lambda k: k[1]))
                        self._weights[(m.epoch, m.version)] = {
                            t.name: np.array(t.array(), dtype=np.float32) for t in m.tensors
                        }
            except WireError as exc:
                self._warn_once("bad model", "model message refused: %s", exc)
            if len(self._models) > 16:
                self._models.clear()
            self._models[key] = model
        return self._models[key]

    def _on_model(self, d: _Device, payload: bytes, now: float) -> None:
        m = self._model(payload)
        if m is None:
            return
        r = self.result
        if r.start_version is None:
            r.start_version = m.version
            self._target = m.version + self.settings.rounds
        if r.final_version is None or m.version > r.final_version:
            r.final_version = m.version
        if m.round_id and m.version > (r.start_version or 0):
            tally = r.rounds.setdefault(m.round_id, RoundTally())
            if not tally.model_seen:
                tally.model_seen = now
        if d.epoch != m.epoch:
            d.epoch, d.model_version = m.epoch, m.version
        elif d.model_version is None or m.version > d.model_version:
            d.model_version = m.version
        self._consider(d, now)

    def _on_round(self, d: _Device, payload: bytes, now: float) -> None:
        key = self._digest(payload)
        if key not in self._rounds:
            try:
                ann = decode_round(payload)
                self._rounds[key] = ann
                self._selected[id(ann)] = frozenset(ann.selected)
            except WireError as exc:
                self._warn_once("bad round", "round announcement refused: %s", exc)
                self._rounds[key] = None
        known = self._rounds[key]
        if known is None:
            return
        d.round = known
        self._consider(d, now)

    def _consider(self, d: _Device, now: float) -> None:
        """Take part in the device's current round if it can and has not yet."""
        ann = d.round
        if ann is None or self._stopping or ann.epoch != d.epoch:
            return
        if d.model_version != ann.base_version or (ann.epoch, ann.round_id) in d.submitted:
            return
        if self._target is not None and ann.base_version >= self._target:
            return  # the rounds asked for are done
        if ann.selected and d.id not in self._selected.get(id(ann), ()):
            return
        d.submitted.add((ann.epoch, ann.round_id))
        tally = self.result.rounds.setdefault(ann.round_id, RoundTally())
        tally.opened_at = ann.opened_at
        if d.id in self.plan.dropped(ann.round_id):
            tally.dropouts += 1
            self.result.dropouts += 1
            return
        if get_codec(ann.config.codec).stateful:
            self._warn_once(f"codec {ann.config.codec}", "round %d asks for codec %s, which "
                            "keeps device state: the simulator sends stateless codecs only",
                            ann.round_id, ann.config.codec)
            return
        when = max(now, ann.opened_at + self.plan.offset(d.id, ann.round_id))
        p = _Pending(ann.round_id, ann.epoch, ann.base_version, ann.config)
        self._at(when, lambda: self._send(d, p))

    def _payload(self, d: _Device, p: _Pending) -> tuple[str, bytes] | None:
        """The update's id and signed bytes (trained ones kept for resends), or None when the
        round's DP params are malformed (logged once; the device does not take part)."""
        uid = self.plan.update_id(d.id, p.epoch, p.round_id)
        if p.payload is not None:
            return uid, p.payload
        codec = p.config.codec
        seed, crc = self.plan.seed & 0xFFFFFFFF, zlib.crc32(d.id.encode())
        if self._trainer is None:
            shapes = self._shapes[(p.epoch, p.base_version)]
            delta = self.plan.synthetic_delta(d.id, p.round_id, shapes)
            examples = self.plan.num_examples(d.id, p.round_id)
        else:
            delta, examples = self._trainer.delta(
                d.id, p.round_id, self._weights[(p.epoch, p.base_version)], p.config)
        # DP rounds: clip (and locally noise) BEFORE encoding, exactly as the edge agent does
        # (docs/privacy.md); a no-op outside DP rounds, so the bytes are unchanged there.
        try:
            delta, metrics = privatize_round(
                delta, p.config.params, np.random.default_rng([seed, crc, p.round_id, 5]),
                d.id in self.settings.unclipped)
        except ValueError as exc:
            self._warn_once(f"dp {p.round_id}", "round %d: %s; no device takes part",
                            p.round_id, exc)
            return None
        tensors = encode_delta(delta, codec, np.random.default_rng([seed, crc, p.round_id, 4]))
        msg = UpdateMessage(
            fleet=self.settings.fleet, round_id=p.round_id, base_version=p.base_version,
            device=d.id, update_id=uid, num_examples=examples, codec=codec, tensors=tensors,
            epoch=p.epoch, metrics=metrics,
        )
        payload = sign_update(msg, d.key) if d.key is not None else encode(msg)
        if self._trainer is not None:  # synthetic deltas are rebuilt (seeded) for a resend
            p.payload = payload
        return uid, payload

    def _publish(self, d: _Device, payload: bytes) -> None:
        if d.client is not None and d.connected:
            d.client.publish(self.topics.update(d.id), payload, qos=1)

    def _send(self, d: _Device, p: _Pending) -> None:
        made = self._payload(d, p)
        if made is None:
            return
        uid, payload = made
        d.pending[uid] = p
        self._pending += 1
        self._publish(d, payload)
        now = time.time()
        self.result.sent += 1
        tally = self.result.rounds.setdefault(p.round_id, RoundTally())
        tally.sent += 1
        tally.first_send = tally.first_send or now
        tally.last_send = now
        self._at(now + self.settings.ack_timeout, lambda: self._resend(d, uid))

    def _resend(self, d: _Device, uid: str) -> None:
        p = d.pending.get(uid)
        if p is None:
            return
        if p.attempts >= self.settings.max_resends:
            del d.pending[uid]
            self._pending -= 1
            self.result.expired += 1
            log.warning("device %s: update %s of round %d expired without an answer after "
                        "%d resend(s)", d.id, uid, p.round_id, p.attempts)
            return
        p.attempts += 1
        self.result.resent += 1
        made = self._payload(d, p)  # the same bytes (seeded), or the kept trained payload
        if made is not None:
            self._publish(d, made[1])
        factor = min(2 ** p.attempts, _MAX_BACKOFF_FACTOR)
        self._at(time.time() + self.settings.ack_timeout * factor, lambda: self._resend(d, uid))

    def _on_ack(self, d: _Device, payload: bytes, now: float) -> None:
        try:
            ack = decode_ack(payload)
        except WireError as exc:
            self._warn_once("bad ack", "ack refused: %s", exc)
            return
        p = d.pending.pop(ack.update_id, None)
        r = self.result
        if p is None:
            if any(self.plan.update_id(d.id, e, rid) == ack.update_id for e, rid in d.submitted):
                r.acks_repeated += 1
            else:
                r.acks_unknown += 1
            return
        self._pending -= 1
        if ack.accepted or ack.code == "duplicate":
            r.accepted += 1
            tally = r.rounds.setdefault(p.round_id, RoundTally())
            tally.accepted += 1
            tally.last_ack = now
        else:
            r.rejected[ack.code] = r.rejected.get(ack.code, 0) + 1
            self._warn_once(f"reject {ack.code}", "device %s: update of round %d rejected "
                            "%s: %s (further rejects of this code are counted, not logged)",
                            d.id, p.round_id, ack.code, ack.reason)

    # ------------------------------------------------------------------ loop
    def _pump(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            d: _Device = key.data
            c = d.client
            if c is None:
                continue
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE and d.sock is not None:
                c.loop_write()

    def _misc(self) -> None:
        for d in self.devices:
            if d.sock is not None and d.client is not None:
                d.client.loop_misc()

    def _done(self) -> bool:
        r = self.result
        if self._target is None or r.final_version is None or r.final_version < self._target:
            return False
        return self._pending == 0

    def run(self) -> ShardResult:
        """Connect every device, take part in ``rounds`` rounds, leave; returns the counts."""
        r = self.result
        r.nofile_soft, r.nofile_hard = raise_nofile(len(self.devices) + 256)
        if r.nofile_soft < len(self.devices) + 64:
            log.warning("open-file limit %d is too low for %d connections: run fewer devices "
                        "per process (--processes)", r.nofile_soft, len(self.devices))
        cpu0 = os.times()
        t0 = time.time()
        end = t0 + self.settings.timeout
        todo = list(self.devices)
        todo.reverse()
        next_misc = t0 + _MISC_INTERVAL
        connected_at: float | None = None
        try:
            while True:
                now = time.time()
                while todo and self._connecting < self.settings.connect_batch:
                    self._open(todo.pop())
                if connected_at is None and not todo and r.connected >= len(self.devices):
                    connected_at = now
                    r.connect_seconds = now - t0
                    log.info("%d devices connected in %.1fs", len(self.devices), now - t0)
                if self._done() or now >= end:
                    break
                wait = 0.2 if not self._timers else min(0.2, max(0.0, self._timers[0][0] - now))
                self._pump(wait)
                now = time.time()
                self._run_timers(now)
                if now >= next_misc:
                    self._misc()
                    next_misc = now + _MISC_INTERVAL
            r.completed = self._done()
            if not r.completed:
                pending = self._pending
                log.error("simulated fleet: stopped after %.0fs without completing %d "
                          "round(s): model version %s of target %s, %d update(s) unanswered",
                          time.time() - t0, self.settings.rounds, r.final_version,
                          self._target, pending)
        finally:
            self._leave()
            r.wall_seconds = time.time() - t0
            cpu1 = os.times()
            r.cpu_seconds = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
            r.peak_rss_mb = peak_rss_mb()
        return r

    def _leave(self) -> None:
        """Publish an ``offline`` status for each device and disconnect cleanly."""
        self._stopping = True
        for d in self.devices:
            if d.client is not None and d.connected:
                d.client.publish(self.topics.status(d.id), self._status(d, "offline"),
                                 qos=0, retain=True)
                d.client.disconnect()
        end = time.time() + 15
        while time.time() < end and any(d.sock is not None for d in self.devices):
            self._pump(0.2)
        for d in self.devices:
            if d.sock is not None and d.client is not None:
                with contextlib.suppress(OSError):
                    d.sock.shutdown(socket.SHUT_RDWR)
        self._sel.close()


def tally_total(results: Sequence[ShardResult]) -> Counter[str]:
    """Counts summed over processes (for reports)."""
    total: Counter[str] = Counter()
    for r in results:
        for key in ("devices", "sent", "resent", "accepted", "expired", "dropouts",
                    "acks_repeated", "acks_unknown", "disconnects"):
            total[key] += int(getattr(r, key))
    return total
