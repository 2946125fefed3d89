"""The device's state machine without a network: payloads and a clock in, messages out.

:class:`EdgeCore` is the edge twin of the aggregator's ``Engine``. The MQTT shell
(:mod:`edge_agent.agent`) feeds it what arrives (``on_message`` or ``on_model`` /
``on_round`` / ``on_ack``), the connection changes (``on_connected`` /
``on_disconnected``) and a timer (``tick``), each with the wall-clock time ``now``; it
publishes the :class:`Publish` actions the core returns and runs the :class:`TrainJob`
actions on its worker thread with :meth:`EdgeCore.train` (which calls the
:class:`~edge_agent.trainer.Trainer`, then returns more actions). Training is returned as a
job rather than run inside ``on_round`` so that the shell decides where the long call runs
and the "training" status is published before it starts; :func:`carry_out` is that loop.

The path of one update: round announced -> :func:`~edge_agent.decide.decide` -> train ->
encode (codec) -> :func:`seal_update` (sign + encode) -> outbox (with the codec state, one
atomic write) -> publish -> ack (settled once per update id) or resend with backoff ->
expired after ``max_resends`` resends. Round identity is (epoch, round id): a model or round
of another epoch (a restored or re-initialised aggregator) makes the device follow that
epoch; an epoch it left is never followed again.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.decide import SkipReason, decide
from edge_agent.evaluation import DeviceEvaluation, eval_status, is_private_round
from edge_agent.he import encode_he, is_he
from edge_agent.outbox import Outbox, OutboxEntry
from edge_agent.pruning import encode_masked, prepare_round, supported_codecs
from edge_agent.state import ACCEPTED, EXPIRED, StateStore, rejected
from edge_agent.textfile import check_textfile_path, write_textfile
from edge_agent.trainer import Trainer, TrainMetrics, VariantTrainer
from fedmq.data.local import LocalData, PluginData
from fedmq.data.plugin import InputSpec, PluginDataError
from fedmq.data.sampling import sample_size
from fedmq.errors import FedmqError, ModelError, RejectReason, WireError
from fedmq.evaluation import EvalReport
from fedmq.memory import peak_rss_mb
from fedmq.models.spec import check_weights
from fedmq.privacy.device import privatize_delta
from fedmq.prune.mask import PruneMask
from fedmq.signing import DeviceKey, sign_update
from fedmq.topics import Topics
from fedmq.update.codecs import decode_tensor, pack_state, unpack_state
from fedmq.update.codecs.residual import encode_round
from fedmq.wire import (
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    Tensor,
    TrainingConfig,
    UpdateMessage,
    decode_ack,
    decode_model,
    decode_round,
    encode,
)

if TYPE_CHECKING:
    from edge_agent.secagg import SecureRounds

__all__ = [
    "Action",
    "CoreSettings",
    "EdgeCore",
    "Publish",
    "TrainJob",
    "carry_out",
    "encode_with_state",
    "max_update_age",
    "resend_interval",
    "seal_update",
]

log = logging.getLogger(__name__)

#: Resend intervals double from ``ack_timeout`` up to this multiple of it.
MAX_BACKOFF_FACTOR = 8


@dataclass(frozen=True)
class Publish:
    """One message for the shell to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class TrainJob:
    """Train for this round: the shell calls :meth:`EdgeCore.train` with it."""

    announcement: RoundAnnouncement

    @property
    def round_id(self) -> int:
        return self.announcement.round_id


Action = Publish | TrainJob


@dataclass(frozen=True)
class CoreSettings:
    """What the core needs of the agent's configuration."""

    fleet: str
    device_id: str
    topics: Topics
    ack_timeout: float = 60.0
    max_resends: int = 5
    seed: int = 0
    train_delay: float = 0.0  # seconds slept before each training (a slower device)
    num_threads: int = 1
    # node_exporter textfile (NAME.prom) rewritten after every round; None = none
    metrics_textfile: Path | None = None

    def __post_init__(self) -> None:
        if self.metrics_textfile is not None:
            check_textfile_path(self.metrics_textfile)
        if not (math.isfinite(self.ack_timeout) and self.ack_timeout > 0):
            raise ValueError(f"ack_timeout must be > 0, got {self.ack_timeout}")
        if self.max_resends < 0:
            raise ValueError(f"max_resends must be >= 0, got {self.max_resends}")
        if not (math.isfinite(self.train_delay) and self.train_delay >= 0):
            raise ValueError(f"train_delay must be >= 0, got {self.train_delay}")
        if self.topics.fleet != self.fleet:
            raise ValueError("topics are for another fleet")


def resend_interval(ack_timeout: float, attempts: int) -> float:
    """How long to wait for an ack after the ``attempts``-th send (doubling, capped)."""
    return ack_timeout * min(2 ** max(attempts - 1, 0), MAX_BACKOFF_FACTOR)


def max_update_age(ack_timeout: float, max_resends: int) -> float:
    """The whole resend schedule: an update older than this is not re-sent again (it
    expires), so restarts do not give it a fresh budget each time."""
    return sum(resend_interval(ack_timeout, k) for k in range(1, max_resends + 2))


def encode_with_state(
    delta: Mapping[str, np.ndarray], codec: str, rng: np.random.Generator, state: bytes,
    params: Mapping[str, object] | None = None, round_id: int = 0,
) -> tuple[tuple[Tensor, ...], bytes]:
    """Encode ``delta`` with ``codec`` (set up by the round's ``params``) from the device's
    committed codec ``state`` (bytes of :func:`~fedmq.update.codecs.base.pack_state`, empty
    for none yet); the tensors and the state this update leaves, stored with it in the
    outbox. Stateless codecs leave an empty state; the residual policy in ``params`` says
    what a residual does over skipped rounds (:mod:`fedmq.update.codecs.residual`)."""
    encoded = encode_round(
        codec, delta, rng, unpack_state(state) if state else None, params or {}, round_id
    )
    return encoded.tensors, pack_state(encoded.state) if encoded.state else b""


def seal_update(msg: UpdateMessage, key: DeviceKey | None) -> bytes:
    """The bytes to store and publish for ``msg``: signed with ``key`` (if any), encoded."""
    return encode(msg) if key is None else sign_update(msg, key)


@dataclass(frozen=True)
class RoundDelta:
    """What one round's local training produced, before encoding."""

    delta: dict[str, np.ndarray]
    examples: int
    steps: int
    dp_metrics: dict[str, float]
    report: EvalReport | None
    rng: np.random.Generator
    mask: PruneMask | None = None  # pruned rounds: only the kept weights travel


@dataclass
class _Sent:
    """Sends of one outbox update by this process."""

    last_sent: float
    attempts: int
    moved_on_resent: bool = False  # re-sent once already because its round moved on


@dataclass
class _Status:
    state: str = "online"
    round_id: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    last_skip: dict[str, int | str] | None = None  # the last round skipped for bad data


class EdgeCore:
    """One device's round handling, training, outbox and acks (single-threaded)."""

    def __init__(
        self,
        settings: CoreSettings,
        store: StateStore,
        outbox: Outbox,
        trainer: Trainer,
        data: LocalData,
        key: DeviceKey | None = None,
        evaluation: DeviceEvaluation | None = None,
    ) -> None:
        self.settings = settings
        self.evaluation = evaluation  # federated evaluation (edge_agent.evaluation); None = off
        self.store = store
        self.outbox = outbox
        self.trainer = trainer
        self.data = data
        self._key = key
        self.device_id = settings.device_id
        self.topics = settings.topics
        self.connected = False
        self._global: dict[str, np.ndarray] | None = None
        self._model_version: int | None = None
        self._round: RoundAnnouncement | None = None
        self._sent: dict[str, _Sent] = {}
        self._failed_rounds: set[int] = set()
        self._last_decision: tuple[int, str] | None = None
        self._status = _Status()
        self.secure: SecureRounds | None = None  # secure rounds (edge_agent.secagg), if set
        if isinstance(data, PluginData):  # the plugin is given the model's input each round
            spec = trainer.spec
            data.bind(self.device_id, InputSpec(spec.input_shape, spec.input_dtype,
                                                spec.num_classes))
        self._reconcile()

    # ------------------------------------------------------------------ view
    @property
    def model_version(self) -> int | None:
        """The version of the global model held in memory (None: none yet)."""
        return self._model_version

    @property
    def current_round(self) -> RoundAnnouncement | None:
        return self._round

    @property
    def epoch(self) -> str:
        return self.store.epoch

    @property
    def status_state(self) -> str:
        return self._status.state

    def counters(self) -> dict[str, int]:
        return self.store.counters()

    # ------------------------------------------------------------------ start-up
    def _reconcile(self) -> None:
        """Bring outbox and state together after a crash between two of their writes."""
        epoch = self.store.epoch
        self._drop_other_epochs(epoch)  # the epoch was adopted, the drop was interrupted
        for entry in self.outbox.pending():
            if self.store.outcome(entry.update_id) not in (None, EXPIRED):
                # Settled (counted) but not yet removed when the process stopped.
                self.outbox.remove(entry.update_id)
            elif entry.epoch == epoch and self.store.submitted_update(entry.round_id) is None:
                # Stored but the submission not yet recorded: never train this round again.
                self.store.record_submission(entry.round_id, entry.update_id)

    # ------------------------------------------------------------------ status
    def status_payload(self, state: str, now: float) -> bytes:
        """The retained status message (also the last will, with state 'offline')."""
        spec = self.trainer.spec
        metrics = dict(self._status.metrics)
        metrics.update({k: float(v) for k, v in self.store.counters().items()})
        capabilities: dict[str, object] = {
            "model": spec.name,
            "examples": len(self.data),
            "threads": self.settings.num_threads,
            "codecs": supported_codecs(self.trainer),
        }
        if self.evaluation is not None and self.evaluation.eval_only:
            capabilities["eval_only"] = True  # never selected to train (docs/protocol.md)
        if self._status.last_skip is not None:
            capabilities["last_skip"] = dict(self._status.last_skip)
        return encode(
            StatusMessage(
                fleet=self.settings.fleet,
                device=self.device_id,
                state=state,
                runtime=self.trainer.runtime_name,
                capabilities=capabilities,
                metrics=metrics,
                round_id=self._status.round_id,
                created_at=now,
                epoch=self.store.epoch,
                model_version=self.store.model_version,
            )
        )

    def _status_out(self, state: str, now: float, round_id: int | None = None) -> list[Action]:
        self._status.state = state
        if round_id is not None:
            self._status.round_id = round_id
        if not self.connected:
            return []
        topic = self.topics.status(self.device_id)
        return [Publish(topic, self.status_payload(state, now), qos=1, retain=True)]

    # ------------------------------------------------------------------ connection
    def on_connected(self, now: float) -> list[Action]:
        """The session is up: publish the status, send what waits in the outbox."""
        self.connected = True
        state = "training" if self._status.state == "training" else "online"
        return self._status_out(state, now) + self._flush(now)

    def on_disconnected(self) -> None:
        self.connected = False

    # ------------------------------------------------------------------ messages
    def on_message(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """Dispatch by topic; a message that does not decode is logged once and counted."""
        if not payload:  # a retained message being cleared
            return []
        if self.secure is not None and self.secure.handles(topic):
            return list(self.secure.on_message(topic, payload))
        try:
            if topic == self.topics.model:
                return self.on_model(payload, now)
            if topic == self.topics.round:
                return self.on_round(payload, now)
            if topic == self.topics.ack(self.device_id):
                return self.on_ack(payload, now)
        except WireError as exc:
            self.store.bump("bad_messages")
            log.warning("ignoring bad message on %s: %s (%s)", topic, exc.reason, exc.code)
            return []
        log.debug("ignoring message on %s", topic)
        return []

    def _follow_epoch(self, epoch: str, what: str) -> bool:
        """False when ``epoch`` is one this device left; adopts a new one (True)."""
        current = self.store.epoch
        if epoch == current:
            return True
        if self.store.is_retired(epoch):
            log.info(
                "ignoring %s of epoch %r: this device left that epoch for %r", what, epoch,
                current,
            )
            return False
        self.store.adopt_epoch(epoch)
        dropped = self._drop_other_epochs(epoch)
        self._global, self._model_version, self._round = None, None, None
        self._failed_rounds.clear()
        self._last_decision = None
        if not current and not dropped:
            log.info("following aggregator epoch %r", epoch)
        else:
            log.warning(
                "aggregator epoch changed from %r to %r (its state was restored or "
                "re-initialised): round bookkeeping starts over, %d old update(s) dropped",
                current, epoch, dropped,
            )
        return True

    def _drop_other_epochs(self, epoch: str) -> int:
        """Drop outbox updates of epochs other than ``epoch``: no aggregator folds them."""
        dropped = 0
        for entry in self.outbox.pending():
            if entry.epoch == epoch:
                continue
            self.outbox.remove(entry.update_id)
            self._sent.pop(entry.update_id, None)
            self.store.bump("updates_dropped")
            dropped += 1
            log.warning(
                "outbox: dropping unacknowledged update %s of round %d of epoch %r: the "
                "aggregator is now in epoch %r and can never fold it",
                entry.update_id, entry.round_id, entry.epoch, epoch,
            )
        return dropped

    def on_model(self, payload: bytes, now: float) -> list[Action]:
        msg = decode_model(payload)
        if msg.fleet != self.settings.fleet:
            log.warning("ignoring model for fleet %r", msg.fleet)
            return []
        if not self._follow_epoch(msg.epoch, f"model version {msg.version}"):
            return []
        if msg.version == self._model_version:
            return []
        held = self.store.model_version
        if held is not None and msg.version < held:
            log.info(
                "ignoring model version %d: this device already had version %d of this epoch "
                "(a retained model from an older broker save?)", msg.version, held,
            )
            return []
        weights = self._model_weights(msg)
        if weights is None:
            return []
        self._global = weights
        self._model_version = msg.version
        self.store.set_model_version(msg.version)
        log.info("global model version %d (round %d) received", msg.version, msg.round_id)
        return self._consider_round(now)

    def _model_weights(self, msg: ModelMessage) -> dict[str, np.ndarray] | None:
        spec = self.trainer.spec
        try:
            raw = {t.name: decode_tensor(t, "float32") for t in msg.tensors}
            return check_weights(
                spec, {n: raw[n] for n in spec.trainable if n in raw}, names=spec.trainable
            )
        except (WireError, ModelError) as exc:
            self.store.bump("bad_messages")
            log.error("ignoring model version %d: does not fit %s: %s", msg.version, spec.name, exc)
            return None

    def on_round(self, payload: bytes, now: float) -> list[Action]:
        ann = decode_round(payload)
        if ann.fleet != self.settings.fleet:
            log.warning("ignoring round announcement for fleet %r", ann.fleet)
            return []
        if not self._follow_epoch(ann.epoch, f"round {ann.round_id}"):
            return []
        previous = self._round
        if previous is not None and ann.round_id < previous.round_id:
            # Round ids only increase within an epoch: a stale retained message (a broker
            # that lost its last state in a crash).
            log.warning(
                "ignoring announcement of round %d: round %d is newer", ann.round_id,
                previous.round_id,
            )
            return []
        self._round = ann
        out: list[Action] = []
        if previous is None or previous.round_id != ann.round_id:
            log.info(
                "round %d open: base version %d, %d epoch(s), lr %g, codec %s, %s",
                ann.round_id, ann.base_version, ann.config.epochs, ann.config.lr,
                ann.config.codec,
                f"{len(ann.selected)} selected" if ann.selected else "any device",
            )
            # Updates of earlier rounds still unanswered: ask now for a definitive answer
            # (folded -> duplicate, else wrong_round / round_closed) instead of guessing.
            out += self._flush(now, moved_on=ann.round_id)
        if self.secure is not None:
            out += self.secure.on_round(ann)
        return out + self._consider_round(now)

    def _consider_round(self, now: float) -> list[Action]:
        ann = self._round
        if ann is None or ann.round_id in self._failed_rounds:
            return []
        if self.secure is not None and self.secure.is_secure(ann) \
                and not self.secure.wants_training(ann):
            return []
        eval_only = self.evaluation is not None and self.evaluation.eval_only
        if eval_only and is_private_round(ann.config.params):
            if self._last_decision != (ann.round_id, "eval_only_private"):
                self._last_decision = (ann.round_id, "eval_only_private")
                log.info("round %d: skip: a DP round, in which an eval_only device neither "
                         "trains nor reports", ann.round_id)
            return []
        decision = decide(
            ann, self.device_id, self.store.snapshot(), self._model_version,
            fleet=self.settings.fleet, now=now, eval_only=eval_only,
        )
        if not decision.train:
            key = (ann.round_id, str(decision.reason))
            if key != self._last_decision:
                self._last_decision = key
                level = (
                    logging.DEBUG if decision.reason is SkipReason.ALREADY_SUBMITTED
                    else logging.INFO
                )
                log.log(level, "round %d: %s", ann.round_id, decision)
            return []
        return [*self._status_out("training", now, ann.round_id), TrainJob(ann)]

    # ------------------------------------------------------------------ training
    def train(self, job: TrainJob, now: float) -> list[Action]:
        """Train for ``job``'s round, store the update durably, and send it; then refresh
        the metrics textfile (when configured) whatever the outcome."""
        actions = self._train(job, now)
        self._export_textfile(job.announcement.round_id, now)
        return actions

    def _export_textfile(self, round_id: int, now: float) -> None:
        path = self.settings.metrics_textfile
        if path is None:
            return
        m = self._status.metrics
        values: dict[str, float] = {
            "fedmq_agent_last_round": round_id,
            "fedmq_agent_last_round_timestamp_seconds": now,
            "fedmq_agent_model_version": self.model_version or 0,
            "fedmq_agent_outbox_pending": len(self.outbox),
            "fedmq_agent_updates_accepted_total": self.store.counter("updates_accepted"),
            "fedmq_agent_updates_rejected_total": self.store.counter("updates_rejected"),
            "fedmq_agent_updates_resent_total": self.store.counter("updates_resent"),
            "fedmq_agent_train_failures_total": self.store.counter("train_failures"),
        }
        for key, name, scale in (
            ("loss", "fedmq_agent_train_loss", 1.0),
            ("train_seconds", "fedmq_agent_train_seconds", 1.0),
            ("examples", "fedmq_agent_train_examples", 1.0),
            ("update_bytes", "fedmq_agent_update_bytes", 1.0),
            ("peak_rss_mb", "fedmq_agent_peak_rss_bytes", 1024.0 * 1024.0),
        ):
            if key in m:
                values[name] = m[key] * scale
        write_textfile(path, values, {"device": self.device_id, "fleet": self.settings.fleet})

    def _train(self, job: TrainJob, now: float) -> list[Action]:
        ann = job.announcement
        r = ann.round_id
        if self._global is None or self._round is None or self._round.round_id != r:
            log.info("round %d: no longer current when its training was due; skipped", r)
            return self._status_out("idle", now, r)
        try:
            if self.secure is not None and self.secure.is_secure(ann):
                return self._train_secure(ann, self._global, now)
            entry = self._train_round(ann, self._global, now)
        except PluginDataError as exc:
            # The device's own data is unusable this round: no update; the next round asks
            # the plugin again. The status says why.
            self._failed_rounds.add(r)
            self.store.bump("data_skips")
            self._status.last_skip = {"round": r, "reason": str(exc)}
            log.error("round %d skipped: %s", r, exc)
            return self._status_out("idle", now, r)
        except (FedmqError, ValueError) as exc:
            self._failed_rounds.add(r)
            self.store.bump("train_failures")
            log.error("round %d: training failed: %s", r, exc)
            return self._status_out("idle", now, r)
        m = self._status.metrics
        m["update_bytes"] = float(len(entry.payload))
        if "train_seconds" not in m:  # an eval_only device's report
            log.info("round %d: evaluated the global model: accuracy %.4f on %d held-out "
                     "example(s); report %s", r, m["eval_accuracy"], int(m["eval_examples"]),
                     entry.update_id)
            return self._send(entry, now) + self._status_out("idle", now, r)
        log.info(
            "round %d: trained %d epoch(s): loss %.4f, %d examples in %.2fs; update %s "
            "(%s, %d bytes)",
            r, ann.config.epochs, m["loss"], int(m["examples"]), m["train_seconds"],
            entry.update_id, ann.config.codec, len(entry.payload),
        )
        return self._send(entry, now) + self._status_out("idle", now, r)

    def _train_secure(
        self, ann: RoundAnnouncement, global_weights: Mapping[str, np.ndarray], now: float
    ) -> list[Action]:
        """A secure round: the delta goes to the secure client, not the outbox (its masked
        input is only meaningful within the round's protocol)."""
        assert self.secure is not None
        rd = self._round_delta(ann, global_weights)
        delta, m, dp_metrics = rd.delta, rd.examples, rd.dp_metrics
        log.info("round %d: trained %d epoch(s) for a secure round: loss %.4f, %d examples",
                 ann.round_id, ann.config.epochs, self._status.metrics["loss"], m)
        out: list[Action] = list(self.secure.on_delta(
            ann, delta, m, {**self._status.metrics, **dp_metrics}))
        return out + self._status_out("idle", now, ann.round_id)

    def _round_delta(
        self, ann: RoundAnnouncement, global_weights: Mapping[str, np.ndarray]
    ) -> RoundDelta:
        """Train the round: the delta clipped as DP asks, its example and step counts, the DP
        metrics, the device's evaluation report and the round's generator for the encoding."""
        r, cfg = ann.round_id, ann.config
        ev = self._round_evaluation(ann)
        if self.settings.train_delay:
            time.sleep(self.settings.train_delay)
        x, y = self.data.round_batch(r)
        m = sample_size(len(x), cfg.sample_fraction, cfg.max_examples)
        x, y = x[:m], y[:m]  # round_batch is shuffled
        self.trainer.set_weights(global_weights)
        mask = prepare_round(self.trainer, ann)  # pruned rounds: docs/pruning.md
        before = ev.measure(self.trainer) if ev is not None else None
        # Seeded by (seed, device, round): a round's training and rounding are reproducible,
        # differ between devices, and a retrained round after a crash gives the same update.
        rng = np.random.default_rng(
            [self.settings.seed, zlib.crc32(self.device_id.encode()), r]
        )
        delta, metrics = self._local_step(r, cfg, x, y, global_weights, rng)
        trained = ev is not None and ev.personal and cfg.params.get("mode", "delta") == "delta"
        report = DeviceEvaluation.report(
            before, ev.measure(self.trainer) if ev is not None and trained else None
        )
        # DP rounds (docs/privacy.md): clip to the announced bound BEFORE encoding.
        delta, dp_metrics = privatize_delta(delta, cfg.params, rng)
        self._status.metrics = {
            "loss": float(metrics.loss) if math.isfinite(metrics.loss) else 0.0,
            "train_seconds": float(metrics.seconds),
            "examples": float(metrics.examples),
            "steps": float(metrics.steps),
            "peak_rss_mb": peak_rss_mb(),
            **eval_status(report),
        }
        return RoundDelta(delta, int(m), int(metrics.steps), dp_metrics, report, rng, mask)

    def _round_evaluation(self, ann: RoundAnnouncement) -> DeviceEvaluation | None:
        """The device's evaluation for this round (none in DP rounds)."""
        return self.evaluation if not is_private_round(ann.config.params) else None

    def _train_round(
        self, ann: RoundAnnouncement, global_weights: Mapping[str, np.ndarray], now: float
    ) -> OutboxEntry:
        r, cfg = ann.round_id, ann.config
        ev = self._round_evaluation(ann)
        if ev is not None and ev.eval_only:
            self.trainer.set_weights(global_weights)
            return self._evaluate_only(ann, ev.report(ev.measure(self.trainer)), now)
        rd = self._round_delta(ann, global_weights)
        delta, m, dp_metrics, rng = rd.delta, rd.examples, rd.dp_metrics, rd.rng
        if is_he(cfg.codec):  # encrypted round: pre-scaled by the weight (docs/privacy.md)
            tensors, codec_state = encode_he(delta, int(m)), b""
        elif rd.mask is not None:  # only the kept weights travel; masked codecs keep no state
            tensors, codec_state = encode_masked(delta, cfg.codec, rd.mask, rng), b""
        else:
            tensors, codec_state = encode_with_state(
                delta, cfg.codec, rng, self.outbox.codec_state.blob, cfg.params, r
            )
        msg = UpdateMessage(
            fleet=self.settings.fleet,
            round_id=r,
            base_version=ann.base_version,
            device=self.device_id,
            update_id=uuid.uuid4().hex,
            num_examples=int(m),
            codec=cfg.codec,
            tensors=tensors,
            metrics={**self._status.metrics, **dp_metrics},
            created_at=now,
            epoch=ann.epoch,
            steps=rd.steps,  # FedNova normalises by it (0 = none)
            evaluation=rd.report,
        )
        # Durable before it leaves the device: a crash now means a resend, never a loss.
        entry = self.outbox.put(
            r, msg.update_id, seal_update(msg, self._key), epoch=ann.epoch,
            codec_state=codec_state, written_at=now,
        )
        self.store.record_submission(r, msg.update_id)
        return entry

    def _evaluate_only(
        self, ann: RoundAnnouncement, report: EvalReport | None, now: float
    ) -> OutboxEntry:
        """An ``eval_only`` device's round: its report in an update without tensors."""
        if report is None:
            raise ModelError(f"round {ann.round_id}: the evaluation gave no usable figures")
        self._status.metrics = {"examples": 0.0, **eval_status(report)}
        msg = UpdateMessage(
            fleet=self.settings.fleet, round_id=ann.round_id, base_version=ann.base_version,
            device=self.device_id, update_id=uuid.uuid4().hex, num_examples=report.count,
            codec=ann.config.codec, tensors=(), created_at=now, epoch=ann.epoch,
            evaluation=report,
        )
        entry = self.outbox.put(ann.round_id, msg.update_id, seal_update(msg, self._key),
                                epoch=ann.epoch, written_at=now)
        self.store.record_submission(ann.round_id, msg.update_id)
        return entry

    def _local_step(
        self,
        r: int,
        cfg: TrainingConfig,
        x: np.ndarray,
        y: np.ndarray,
        global_weights: Mapping[str, np.ndarray],
        rng: np.random.Generator,
    ) -> tuple[dict[str, np.ndarray], TrainMetrics]:
        """The round's update and metrics, as its params ask (docs/strategies.md):
        ``mode = "gradient"`` (FedSGD) sends the mean-loss gradient over at most
        ``grad_examples`` examples; ``mu > 0`` (FedProx) trains with the proximal term;
        otherwise plain SGD. A model without the signature the round needs refuses it."""
        params = cfg.params
        trainer = self.trainer
        variants = trainer.variants if isinstance(trainer, VariantTrainer) else frozenset()
        mode = params.get("mode", "delta")
        if mode == "gradient":
            if "gradient" not in variants:
                raise ModelError(
                    f"round {r} asks for a gradient (FedSGD) but model {trainer.spec.name!r} "
                    "has no gradient signature: export it again; round skipped"
                )
            limit = params.get("grad_examples", len(x))
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ModelError(f"round {r}: grad_examples must be a positive integer")
            assert isinstance(trainer, VariantTrainer)
            return trainer.gradient(x, y, max_examples=limit, rng=rng)
        if mode != "delta":
            raise ModelError(f"round {r}: unknown mode {mode!r} in the round's params")
        mu = params.get("mu", 0.0)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or mu < 0:
            raise ModelError(f"round {r}: mu must be a number >= 0, got {mu!r}")
        if mu > 0:
            if "prox" not in variants:
                raise ModelError(
                    f"round {r} asks for FedProx (mu = {mu}) but model {trainer.spec.name!r} "
                    "has no train_prox signature: export it again; round skipped"
                )
            assert isinstance(trainer, VariantTrainer)
            metrics = trainer.fit_prox(x, y, epochs=cfg.epochs, lr=cfg.lr, rng=rng, mu=float(mu))
        else:
            metrics = trainer.fit(x, y, epochs=cfg.epochs, lr=cfg.lr, rng=rng)
        local = trainer.get_weights()
        delta = {n: local[n] - global_weights[n] for n in trainer.spec.trainable}
        return delta, metrics

    # ------------------------------------------------------------------ sending
    def _send(self, entry: OutboxEntry, now: float) -> list[Action]:
        sent = self._sent.get(entry.update_id)
        attempts = sent.attempts if sent else 0
        if not self.connected:
            log.info(
                "offline: update %s of round %d waits in the outbox", entry.update_id,
                entry.round_id,
            )
            return []
        self._sent[entry.update_id] = _Sent(now, attempts + 1)
        if attempts:
            self.store.bump("updates_resent")
            log.info(
                "re-sent update %s of round %d (attempt %d)",
                entry.update_id, entry.round_id, attempts + 1,
            )
        return [Publish(self.topics.update(self.device_id), entry.payload, qos=1)]

    def _due(self, sent: _Sent, now: float) -> bool:
        return now - sent.last_sent >= resend_interval(self.settings.ack_timeout, sent.attempts)

    def resend_due(self, now: float) -> bool:
        """Cheap check (no disk reads) whether some sent update waited out its interval."""
        return any(self._due(s, now) for s in self._sent.values())

    def tick(self, now: float) -> list[Action]:
        """Resend updates whose ack is overdue; give up on those out of attempts."""
        if not self.resend_due(now):
            return []
        return self._flush(now)

    def _flush(self, now: float, moved_on: int | None = None) -> list[Action]:
        """Send pending updates that need it.

        Never sent by this process (a restart, or it was offline): send. Sent: resend when
        its interval passed, or at once when the round first moved on past it
        (``moved_on``; once per update: rounds may move on every second, docs/rounds.md);
        after ``max_resends`` resends (or once older than the whole schedule,
        :func:`max_update_age`) and one more interval, give up (expired).
        """
        if not self.connected:
            return []
        out: list[Action] = []
        epoch = self.store.epoch
        max_age = max_update_age(self.settings.ack_timeout, self.settings.max_resends)
        for entry in self.outbox.pending():
            if entry.epoch != epoch:
                continue  # dropped when this device adopted the current epoch
            sent = self._sent.get(entry.update_id)
            if sent is None:
                out += self._send(entry, now)
                continue
            stale = (
                moved_on is not None and entry.round_id < moved_on and not sent.moved_on_resent
            )
            if not (stale or self._due(sent, now)):
                continue
            if sent.attempts > self.settings.max_resends or now - entry.written_at > max_age:
                if self._due(sent, now):
                    self._expire(entry)
                continue
            out += self._send(entry, now)
            after = self._sent.get(entry.update_id)
            if after is not None:
                after.moved_on_resent = sent.moved_on_resent or stale
        return out

    def _expire(self, entry: OutboxEntry) -> None:
        attempts = self._sent.pop(entry.update_id).attempts
        self.store.settle(entry.update_id, EXPIRED)
        self.outbox.remove(entry.update_id)
        log.warning(
            "update %s of round %d expired: no answer from the aggregator after %d send(s); "
            "dropped from the outbox", entry.update_id, entry.round_id, attempts,
        )

    # ------------------------------------------------------------------ acks
    def on_ack(self, payload: bytes, now: float) -> list[Action]:
        ack = decode_ack(payload)
        if ack.device != self.device_id or ack.fleet != self.settings.fleet:
            log.warning("ignoring ack for %s/%s", ack.fleet, ack.device)
            return []
        # ``duplicate`` means the aggregator holds this device's update for that round (this
        # device never sends two update ids for one round): folded, whatever the flag says
        # (aggregators before the duplicate-is-accepted change answered accepted=False).
        if self.secure is not None and self.secure.is_secure_ack(ack):
            return list(self.secure.on_ack(ack))
        folded = ack.accepted or ack.code == RejectReason.DUPLICATE
        outcome = ACCEPTED if folded else rejected(ack.code)
        if not ack.update_id and not ack.accepted:
            # A chunk the aggregator refused (it carries no update id): the update is sent
            # again, whole, when its ack does not come (docs/protocol.md, chunked transfer).
            self.store.bump("chunks_rejected")
            log.warning("the aggregator rejected a chunk: %s: %s", ack.code, ack.reason)
            return []
        in_outbox = self.outbox.get(ack.update_id) is not None
        if not in_outbox and self.store.outcome(ack.update_id) is None:
            log.debug("ack for update %s that this device does not know", ack.update_id)
            return []
        # Settle (count, durably, once per update id) before clearing the outbox: whoever
        # sees the outbox empty also sees why, and a crash in between counts nothing twice.
        before = self.store.settle(ack.update_id, outcome)
        if before is None or before == EXPIRED:
            self._log_outcome(ack.update_id, ack.round_id, folded, ack.code, ack.reason,
                              late=before == EXPIRED)
        else:
            log.debug("repeated ack for update %s (already %s)", ack.update_id, before)
        self._sent.pop(ack.update_id, None)
        if in_outbox:
            self.outbox.remove(ack.update_id)
        return []

    @staticmethod
    def _log_outcome(
        update_id: str, round_id: int, accepted: bool, code: str, reason: str, late: bool
    ) -> None:
        late_note = " (after it had expired)" if late else ""
        if accepted and code == RejectReason.DUPLICATE:
            log.info("update %s of round %d accepted: the aggregator had already folded it%s",
                     update_id, round_id, late_note)
        elif accepted:
            log.info("update %s of round %d accepted%s", update_id, round_id, late_note)
        else:
            log.warning(
                "update %s of round %d rejected: %s: %s%s",
                update_id, round_id, code, reason or "(no reason given)", late_note,
            )


def carry_out(
    core: EdgeCore,
    actions: Iterable[Action],
    publish: Callable[[Publish], None],
    clock: Callable[[], float] = time.time,
) -> None:
    """Publish the core's messages in order; run training jobs and carry out what they
    return (the shell's worker thread and the unit tests both use this loop)."""
    pending = list(actions)
    while pending:
        action = pending.pop(0)
        if isinstance(action, Publish):
            publish(action)
        else:
            pending = core.train(action, clock()) + pending
