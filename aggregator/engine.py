"""The round engine without MQTT: payloads and a clock in, messages to publish out.

The service feeds it raw update payloads (:meth:`Engine.handle_update`), status payloads
(:meth:`Engine.on_status`) and timer ticks (:meth:`Engine.tick`); the engine answers with
:class:`Outgoing` messages (acks, the retained model and round announcements). An accepted
update is journaled durably before :meth:`handle_update` returns, so the caller may send the
MQTT PUBACK afterwards. Memory is O(model): decoded updates are folded and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.evaluate import Evaluator
from aggregator.metrics import AggregatorMetrics
from aggregator.round_state import RoundPlan, RoundState, select_devices
from aggregator.store import Store
from fedmq.errors import ConfigError, RejectReason, SecurityError, StateError, WireError
from fedmq.models.spec import ModelBundle, load_bundle, prebuilt_bundle_path
from fedmq.signing import Registry, verify_update
from fedmq.topics import Topics, validate_name
from fedmq.update.accumulate import Accumulator, CheckedUpdate
from fedmq.update.strategies import Strategy, make_strategy
from fedmq.wire import (
    AckMessage,
    Limits,
    ModelMessage,
    ReceivedUpdate,
    Tensor,
    UpdateMessage,
    decode_status,
    decode_update,
    encode,
    receive_update,
)

__all__ = [
    "Engine",
    "Outgoing",
    "RoundResult",
    "content_digest",
    "model_id_of",
    "resolve_bundle",
]

log = logging.getLogger(__name__)

_ONLINE_STATES = frozenset({"online", "training", "idle"})


@dataclass(frozen=True)
class Outgoing:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class RoundResult:
    """What happened to a round that ended (``status`` closed or abandoned)."""

    round_id: int
    status: str
    version: int | None
    participants: int
    num_examples: int
    bytes_in: int
    bytes_out: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def resolve_bundle(model: str) -> ModelBundle:
    """A bundle directory, or the name of a bundle shipped with fedmq."""
    path = Path(model).expanduser()
    if path.exists():
        return load_bundle(path)
    return load_bundle(prebuilt_bundle_path(model))


def model_id_of(bundle: ModelBundle) -> str:
    return f"{bundle.spec.name}@{bundle.tflite_sha256()[:16]}"


def _peek_ids(payload: bytes, max_bytes: int) -> tuple[int | None, str]:
    """Best effort (round, update_id) of a rejected payload, for the ack."""
    if len(payload) > max_bytes:
        return None, ""
    try:
        obj = msgpack.unpackb(payload, raw=False, max_ext_len=0, strict_map_key=False)
    except Exception:  # garbage of any kind: nothing to peek at
        return None, ""
    if isinstance(obj, dict) and obj.get("type") == "signed" and isinstance(obj.get("body"), bytes):
        return _peek_ids(obj["body"], max_bytes)  # the ids are in the envelope's body
    if not isinstance(obj, dict):
        return None, ""
    rid = obj.get("round")
    uid = obj.get("update_id")
    ok_round = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 2**62
    round_id = rid if ok_round else None
    update_id = uid if isinstance(uid, str) and len(uid) <= 64 and uid.isprintable() else ""
    return round_id, update_id


class Engine:
    """Round lifecycle of docs/protocol.md over a :class:`Store`; no network I/O."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        bundle: ModelBundle,
        evaluator: Evaluator | None = None,
        metrics: AggregatorMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.bundle = bundle
        self.evaluator = evaluator
        self.metrics = metrics or AggregatorMetrics()
        self.topics: Topics = config.topics
        self.model_id = model_id_of(bundle)
        self.template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        self.strategy: Strategy = make_strategy(
            config.strategy, config.server_lr, config.server_momentum
        )
        self.limits = Limits(max_bytes=config.max_update_bytes)
        self.registry = Registry(Path(config.registry)) if config.registry else None
        self.require_signatures = config.signatures_required
        self.online: set[str] = set()
        self.version = -1
        self.weights: dict[str, np.ndarray] = {}
        self.model_metrics: dict[str, float] = {}
        self.round: RoundState | None = None
        self.fold: Accumulator | None = None
        self.last_round_id = 0
        self.closed_rounds = 0
        self._round_bytes_in = 0
        self._round_bytes_out = 0
        self._results: list[RoundResult] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, now: float, tick: bool = True) -> list[Outgoing]:
        """Load (or create) the state; rebuild the open round; return what to publish.

        With ``tick`` False no round is opened, closed or abandoned yet: the service first
        lets the broker deliver the updates it kept while the aggregator was down.
        """
        self._check_registry()
        stored_id = self.store.get_meta("model_id")
        if stored_id is None:
            self.store.set_meta("model_id", self.model_id)
            self.store.set_meta("fleet", self.config.fleet)
        elif stored_id != self.model_id:
            raise StateError(
                f"state directory {self.store.root} belongs to model {stored_id}, "
                f"not {self.model_id}: use another state_dir"
            )
        current = self.store.current_model()
        if current is None:
            weights = self.bundle.initial_trainable()
            metrics = self._evaluate(weights)
            current = self.store.save_initial_model(weights, metrics, now)
            log.info("created model version 0 from the %s bundle", self.bundle.spec.name)
        self.version = current.version
        self.weights = self.store.load_weights(current.version)
        self._check_weights(self.weights, f"model file {current.path}")
        self.model_metrics = dict(current.metrics)
        self.strategy.load_state(self.store.server_state())
        self.last_round_id = self.store.last_round_id() or 0
        self.closed_rounds = self.store.closed_rounds()
        self.metrics.model_version.set(self.version)
        self._set_quality_gauges(self.model_metrics)
        out = [self._model_out(now)]
        record = self.store.open_round()
        if record is not None:
            plan = RoundPlan.from_json(record.plan)
            if plan.base_version != self.version:
                log.warning(
                    "open round %d is based on version %d, current is %d: abandoning it",
                    plan.round_id, plan.base_version, self.version,
                )
                self.store.abandon_round(plan.round_id, now)
            else:
                self._begin(plan)
                self._refold(plan.round_id)
                out.append(self._round_out(now))
        self._started = True
        if tick:
            out += self.tick(now)
        return out

    def _check_registry(self) -> None:
        if self.registry is None:
            if self.config.require_signatures is False:
                return
            log.warning("no device registry: updates are not authenticated (set `registry`)")
            return
        try:
            enrolled = len(self.registry.devices())
        except SecurityError as exc:
            raise ConfigError(str(exc)) from exc
        mode = "required" if self.require_signatures else "checked when present"
        if enrolled == 0:
            log.warning(
                "registry %s has no enrolled device yet: every update is rejected until "
                "`fedmq enroll` adds some", self.registry.path,
            )
        log.info("update signatures %s; %d device(s) enrolled", mode, enrolled)

    def _check_weights(self, weights: Mapping[str, np.ndarray], what: str) -> None:
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got != self.template:
            raise StateError(f"{what} holds tensors {got}, the model has {self.template}")

    def _refold(self, round_id: int) -> None:
        assert self.round is not None and self.fold is not None
        n = 0
        for entry in self.store.journal(round_id):
            try:
                msg = decode_update(entry.payload, self.limits)
                self.fold.fold(msg.tensors, msg.codec, float(msg.num_examples))
            except (WireError, ValueError) as exc:
                raise StateError(
                    f"journaled update {entry.update_id!r} is unreadable: {exc}"
                ) from exc
            self.round.record(entry.update_id, entry.device, entry.num_examples)
            self._round_bytes_in += len(entry.payload)
            n += 1
        log.info("round %d reopened with %d journaled update(s) re-folded", round_id, n)

    @property
    def done(self) -> bool:
        """True once ``config.rounds`` rounds have closed (never with ``rounds=0``)."""
        return self.config.rounds > 0 and self.closed_rounds >= self.config.rounds

    def pop_results(self) -> list[RoundResult]:
        out, self._results = self._results, []
        return out

    # -- inputs ----------------------------------------------------------------------------
    def on_status(self, topic_device: str, payload: bytes, now: float) -> None:
        """Track online devices from their (retained) status messages."""
        before = len(self.online)
        if not payload:
            self.online.discard(topic_device)
        else:
            try:
                status = decode_status(payload)
            except WireError as exc:
                log.debug("ignoring bad status from %s: %s", topic_device, exc)
                return
            if status.fleet != self.config.fleet or status.device != topic_device:
                log.debug("ignoring status of %s on the topic of %s", status.device, topic_device)
                return
            if status.state in _ONLINE_STATES:
                self.online.add(topic_device)
            else:
                self.online.discard(topic_device)
        if len(self.online) != before:
            self.metrics.online_devices.set(len(self.online))
            log.debug("%d device(s) online", len(self.online))

    def handle_update(self, topic_device: str, payload: bytes, now: float) -> AckMessage:
        """Decode, check, journal (durably), fold; the ack to send.

        Raises :class:`StateError` only when the journal cannot be written: the update is
        then neither acknowledged nor counted (the broker redelivers it later).
        """
        started = time.perf_counter()
        self.metrics.bytes_in.inc(len(payload))
        try:
            validate_name(topic_device, "device")
        except ConfigError as exc:
            return self._reject(topic_device, payload, WireError(str(exc)), now)
        try:
            received = receive_update(payload, self.limits)
        except WireError as exc:
            return self._reject(topic_device, payload, exc, now)
        msg = received.message
        try:
            self._authenticate(received, topic_device)
            checked = self._check(msg, topic_device)
        except WireError as exc:
            return self._reject(topic_device, payload, exc, now, msg)
        assert self.round is not None and self.fold is not None
        self.store.append_update(
            msg.update_id, msg.round_id, msg.device, msg.num_examples, payload, now
        )
        self.fold.add(checked)
        self.round.record(msg.update_id, msg.device, msg.num_examples)
        self._round_bytes_in += len(payload)
        self.metrics.updates_accepted.inc()
        self.metrics.fold_seconds.observe(time.perf_counter() - started)
        log.debug(
            "accepted update %s from %s for round %d (%d examples, %d/%d)",
            msg.update_id, msg.device, msg.round_id, msg.num_examples,
            self.round.count, self.round.plan.target,
        )
        return AckMessage(
            fleet=self.config.fleet, round_id=msg.round_id, device=topic_device,
            update_id=msg.update_id, accepted=True, code="ok", reason="", created_at=now,
        )

    def _authenticate(self, received: ReceivedUpdate, topic_device: str) -> None:
        """Signature check: after decoding, before any check that depends on round state.

        The topic device is the broker-authenticated identity (ACL), so a payload naming
        another device is a mismatch before anything else; then the signature must verify
        with the key enrolled for that device. Only then do the fleet and round checks run,
        so an unauthenticated sender learns nothing about the open round from the ack.
        """
        if self.registry is None:
            return
        msg = received.message
        if msg.device != topic_device:
            raise WireError(
                f"payload device {msg.device!r} differs from topic device {topic_device!r}",
                RejectReason.DEVICE_MISMATCH,
            )
        try:
            public_key = self.registry.public_key(msg.device)
        except SecurityError as exc:  # unreadable at start-up was caught by start()
            log.error("device registry: %s", exc)
            public_key = None
        if not self.require_signatures and (public_key is None or not received.signature):
            return  # migration mode: only signed updates of enrolled devices are verified
        try:
            verify_update(received, public_key)
        except SecurityError as exc:  # an enrolled key that is not a valid Ed25519 key
            log.error("registry key of %s is unusable: %s", msg.device, exc)
            raise WireError(
                f"device {msg.device!r} has no usable enrolled key", RejectReason.UNKNOWN_DEVICE
            ) from exc

    def _check(self, msg: UpdateMessage, topic_device: str) -> CheckedUpdate:
        if self.round is None or self.fold is None:
            if msg.fleet != self.config.fleet:
                raise WireError(f"update is for fleet {msg.fleet!r}", RejectReason.WRONG_FLEET)
            if msg.device != topic_device:
                raise WireError(
                    f"payload device {msg.device!r} differs from topic device {topic_device!r}",
                    RejectReason.DEVICE_MISMATCH,
                )
            if msg.round_id <= self.last_round_id:
                raise WireError(f"round {msg.round_id} is closed", RejectReason.ROUND_CLOSED)
            raise WireError(f"round {msg.round_id} is not open", RejectReason.WRONG_ROUND)
        fold = self.fold
        checked: list[CheckedUpdate] = []

        def check_tensors(m: UpdateMessage) -> None:
            checked.append(fold.check(m.tensors, m.codec, float(m.num_examples)))

        self.round.check(msg, topic_device, check_tensors)
        return checked[0]

    def _reject(
        self,
        device: str,
        payload: bytes,
        err: WireError,
        now: float,
        msg: UpdateMessage | None = None,
    ) -> AckMessage:
        if msg is not None:
            round_id: int | None = msg.round_id
            update_id = msg.update_id
        else:
            round_id, update_id = _peek_ids(payload, self.limits.max_bytes)
        current = self.round.round_id if self.round is not None else self.last_round_id
        self.metrics.updates_rejected.labels(reason=err.code).inc()
        self.store.add_reject(current, err.code)
        log.warning(
            "rejected update %s from %s (%d bytes, round %s): %s: %s",
            update_id or "?", device, len(payload),
            "?" if round_id is None else round_id, err.code, err.reason,
        )
        return AckMessage(
            fleet=self.config.fleet,
            round_id=current if round_id is None else round_id,
            device=device, update_id=update_id, accepted=False, code=err.code,
            reason=err.reason[:1000], created_at=now,
        )

    def ack_outgoing(self, ack: AckMessage) -> Outgoing | None:
        """The ack as a message to publish (None when the device id cannot be a topic)."""
        try:
            topic = self.topics.ack(ack.device)
        except ConfigError:
            return None
        return self._emit(topic, encode(ack), retain=False)

    # -- timer -----------------------------------------------------------------------------
    def tick(self, now: float) -> list[Outgoing]:
        """Close, abandon or open rounds as due; what to publish."""
        if not self._started:
            raise StateError("engine.start() was not called")
        out: list[Outgoing] = []
        if self.round is not None:
            if self.round.is_ready(now):
                out += self._close(now)
            elif self.round.is_abandoned(now):
                out += self._abandon(now)
        if self.round is None and not self.done and len(self.online) >= self.config.min_devices:
            out += self._open(now)
        return out

    def current_messages(self, now: float) -> list[Outgoing]:
        """The retained state (model and open round): to republish after a session loss."""
        out = [self._model_out(now)]
        if self.round is not None:
            out.append(self._round_out(now))
        return out

    # -- transitions -----------------------------------------------------------------------
    def _begin(self, plan: RoundPlan) -> None:
        self.round = RoundState(self.config.fleet, plan, self.config.max_examples_per_update)
        self.fold = self.strategy.new_accumulator(self.template)
        self._round_bytes_in = 0
        self._round_bytes_out = 0
        self.metrics.current_round.set(plan.round_id)

    def _open(self, now: float) -> list[Outgoing]:
        cfg = self.config
        round_id = self.last_round_id + 1
        selected: tuple[str, ...] = ()
        if cfg.selection == "sample" and self.online:
            selected = select_devices(self.online, cfg.clients_per_round, cfg.seed, round_id)
            if len(selected) < cfg.min_updates:
                selected = ()  # too few online for a quorum of named devices: open the round
        target = len(selected) if selected else cfg.clients_per_round
        deadline = now + cfg.round_timeout
        plan = RoundPlan(
            round_id=round_id,
            base_version=self.version,
            selected=selected,
            target=target,
            min_updates=min(cfg.min_updates, target),
            opened_at=now,
            deadline=deadline,
            abandon_at=deadline + cfg.abandon_after,
            config=self.strategy.configure(round_id, cfg.training_config()),
        )
        self.store.create_round(round_id, self.version, plan.to_json(), now)
        self.last_round_id = round_id
        self._begin(plan)
        log.info(
            "round %d opened on version %d: %s, quorum %d, deadline in %.0fs",
            round_id, self.version,
            f"{len(selected)} selected" if selected else f"any device, target {target}",
            plan.min_updates, cfg.round_timeout,
        )
        return [self._round_out(now)]

    def _close(self, now: float) -> list[Outgoing]:
        assert self.round is not None and self.fold is not None
        state, fold = self.round, self.fold
        new_weights = self.strategy.aggregate(self.weights, fold.result())
        quality = self._evaluate(new_weights)
        seconds = max(0.0, now - state.plan.opened_at)
        metrics = {
            **quality,
            "participants": float(state.count),
            "num_examples": float(state.num_examples),
            "bytes_in": float(self._round_bytes_in),
            "round_seconds": seconds,
        }
        # Encoded before it is stored so the round's downlink (announcement, acks and this
        # model) is part of its persisted statistics; published only after the commit.
        model_payload = self._model_payload(
            self.version + 1, state.round_id, new_weights, metrics, now
        )
        metrics["bytes_out"] = float(self._round_bytes_out + len(model_payload))
        stored = self.store.close_round(
            state.round_id, new_weights, metrics, self.strategy.state(), now
        )
        if stored.version != self.version + 1:
            raise StateError(f"stored version {stored.version} after version {self.version}")
        self.version, self.weights, self.model_metrics = stored.version, new_weights, metrics
        self.closed_rounds += 1
        self.round, self.fold = None, None
        out = [self._emit(self.topics.model, model_payload)]
        if self.done:
            out.append(self._emit(self.topics.round, b""))  # clear the retained round
        self.metrics.rounds_completed.inc()
        self.metrics.participants.observe(state.count)
        self.metrics.round_seconds.observe(seconds)
        self.metrics.model_version.set(self.version)
        self._set_quality_gauges(quality)
        self._results.append(
            RoundResult(
                round_id=state.round_id, status="closed", version=self.version,
                participants=state.count, num_examples=state.num_examples,
                bytes_in=self._round_bytes_in, bytes_out=self._round_bytes_out,
                seconds=seconds, metrics=metrics,
            )
        )
        return out

    def _abandon(self, now: float) -> list[Outgoing]:
        assert self.round is not None
        state = self.round
        self.store.abandon_round(state.round_id, now)
        self.round, self.fold = None, None
        self.metrics.rounds_abandoned.inc()
        log.warning(
            "round %d abandoned: %d of %d required update(s) by its deadline",
            state.round_id, state.count, state.plan.min_updates,
        )
        self._results.append(
            RoundResult(
                round_id=state.round_id, status="abandoned", version=None,
                participants=state.count, num_examples=state.num_examples,
                bytes_in=self._round_bytes_in, bytes_out=self._round_bytes_out,
                seconds=max(0.0, now - state.plan.opened_at),
            )
        )
        return []

    # -- helpers ---------------------------------------------------------------------------
    def _evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        try:
            return self.evaluator(weights)
        except Exception as exc:  # evaluation must never stop the federation
            log.error("evaluation failed: %s", exc)
            return {}

    def _set_quality_gauges(self, metrics: Mapping[str, float]) -> None:
        if "accuracy" in metrics:
            self.metrics.accuracy.set(metrics["accuracy"])
        if "loss" in metrics:
            self.metrics.loss.set(metrics["loss"])

    def _emit(self, topic: str, payload: bytes, retain: bool = True) -> Outgoing:
        self.metrics.bytes_out.inc(len(payload))
        self._round_bytes_out += len(payload)
        return Outgoing(topic, payload, qos=1, retain=retain)

    def _model_payload(
        self,
        version: int,
        round_id: int,
        weights: Mapping[str, np.ndarray],
        metrics: Mapping[str, float],
        now: float,
    ) -> bytes:
        msg = ModelMessage(
            fleet=self.config.fleet,
            version=version,
            round_id=round_id,
            model_id=self.model_id,
            tensors=tuple(Tensor.from_array(n, weights[n]) for n in self.template),
            metrics=dict(metrics),
            created_at=now,
        )
        return encode(msg)

    def _model_out(self, now: float) -> Outgoing:
        round_id = self.store.model(self.version).round_id or 0
        payload = self._model_payload(
            self.version, round_id, self.weights, self.model_metrics, now
        )
        return self._emit(self.topics.model, payload)

    def _round_out(self, now: float) -> Outgoing:
        assert self.round is not None
        ann = self.round.plan.announcement(self.config.fleet, self.model_id)
        return self._emit(self.topics.round, encode(ann))


def content_digest(weights: Mapping[str, np.ndarray]) -> str:
    """A short digest of weights (log lines, tests)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]
