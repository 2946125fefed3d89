"""The round lifecycle of docs/protocol.md over a :class:`Store`; no network I/O.

:class:`Coordinator` starts from (or restores) the state directory, asks its
:class:`~aggregator.policies.RoundPolicy` when to open, close or abandon a round, hands the
open round to the :class:`~aggregator.ingest.Ingest` and takes its accumulator back at the
close, applies the strategy, evaluates, persists and returns the messages to publish (the
retained model and round announcements).

Round identity: the state holds an *epoch* (16 random hex characters, made when the state
is created). Models and rounds carry it; round ids are only unique within an epoch. When the
retained model or a device's retained status shows this epoch with a model version or round
id beyond what the state holds, the state was restored from an older backup: the coordinator
moves to a new epoch (persisted, one WARNING line), moves the open round to it and returns
the model and round to republish, so devices that already used these round ids take part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator.bounds import Contribution
from aggregator.bundles import model_id_of
from aggregator.config import AggregatorConfig
from aggregator.downlink import Downlink, index_facts
from aggregator.evaluate import Evaluator, evaluate
from aggregator.evaluation import set_gauges as set_eval_gauges
from aggregator.guard import (
    UnpublishableModel,
    check_publishable,
    describe_contributions,
    finite_metrics,
    largest_contributions,
)
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.negotiation import LEGACY_CODECS, status_codecs, status_eval_only
from aggregator.outgoing import Outgoing, RoundTraffic
from aggregator.policies import RoundContext, RoundPolicy, make_round_policy
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import StateError, StorageFullError, WireError
from fedmq.models.spec import ModelBundle
from fedmq.privacy.dp_fedavg import DPFedAvg
from fedmq.prune.strategy import PruneStrategy, with_pruning
from fedmq.topics import Topics
from fedmq.update.strategies import Strategy, make_strategy
from fedmq.wire import ModelMessage, Tensor, decode_model, decode_status, encode

__all__ = ["Coordinator", "RoundResult"]

log = logging.getLogger(__name__)

_ONLINE_STATES = frozenset({"online", "training", "idle"})


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


class Coordinator:
    """Opens, closes and abandons rounds (as the policy says); see the module docstring."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        bundle: ModelBundle,
        ingest: Ingest,
        evaluator: Evaluator | None = None,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.bundle = bundle
        self.ingest = ingest
        self.evaluator = evaluator
        self.metrics: AggregatorMetrics = ingest.metrics
        self.traffic: RoundTraffic = ingest.traffic
        self.topics: Topics = config.topics
        self.model_id = model_id_of(bundle)
        self.template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        self.strategy: Strategy = make_strategy(
            config.strategy, options=config.strategy_options()
        )
        # Pruning (docs/pruning.md) wraps it: the mask, its schedule, the masked fold.
        self.strategy = with_pruning(self.strategy, config.prune_schedule(), self.template)
        dp = config.dp_options()
        # DP-FedAvg wraps the configured strategy (docs/privacy.md); None without `dp`.
        self.private: DPFedAvg | None = None
        if dp is not None:
            values = sum(math.prod(shape) for shape in self.template.values())
            self.private = DPFedAvg(self.strategy, dataclasses.replace(dp, model_values=values))
            self.strategy = self.private
        self.budget_exhausted = False
        self.downlink = Downlink(
            config.downlink_settings(), store.root, self.topics, self.template, config.fleet,
            self.model_id, self.traffic,
        )
        self.policy: RoundPolicy = policy or make_round_policy(config)
        self.online: set[str] = set()
        # What each online device's status says it can encode (aggregator.negotiation).
        self.codecs: dict[str, frozenset[str]] = {}
        # The online devices whose status says eval_only: never selected to train; the
        # ingest takes their evaluation-only reports unselected (the same set object).
        self.eval_only: set[str] = ingest.eval_only_devices
        # (round id, devices) last logged as unable to use that round's codec: once a round.
        self._unfit_logged: tuple[int, frozenset[str]] = (0, frozenset())
        self.version = -1
        self.weights: dict[str, np.ndarray] = {}
        self.model_metrics: dict[str, float] = {}
        self.round: RoundState | None = None
        self.last_round_id = 0
        self.closed_rounds = 0
        self.epoch = ""
        self._results: list[RoundResult] = []
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, now: float, tick: bool = True) -> list[Outgoing]:
        """Load (or create) the state; rebuild the open round; return what to publish.

        With ``tick`` False no round is opened, closed or abandoned yet: the service first
        lets the broker deliver the updates it kept while the aggregator was down.
        """
        self.ingest.check_registry()
        stored_id = self.store.get_meta("model_id")
        if stored_id is None:
            self.store.set_meta("model_id", self.model_id)
            self.store.set_meta("fleet", self.config.fleet)
        elif stored_id != self.model_id:
            raise StateError(
                f"state directory {self.store.root} belongs to model {stored_id}, "
                f"not {self.model_id}: use another state_dir"
            )
        epoch = self.store.get_meta("epoch")
        if epoch is None:  # a new state (or one from before epochs)
            epoch = secrets.token_hex(8)
            self.store.set_meta("epoch", epoch)
            log.info("state epoch %s", epoch)
        self.epoch = epoch
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
        self._set_epsilon_gauge()
        self.last_round_id = self.store.last_round_id() or 0
        self.ingest.last_round_id = self.last_round_id
        self.closed_rounds = self.store.closed_rounds()
        self.metrics.model_version.set(self.version)
        self.metrics.set_quality(self.model_metrics)
        out = self._model_out(now)
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
                # a round opened before epochs (or before a rotation) belongs to this epoch
                self._begin(dataclasses.replace(plan, epoch=self.epoch))
                self.ingest.refold()
                out.append(self._round_out(now))
        self._started = True
        if tick:
            out += self.tick(now)
        return out

    def _check_weights(self, weights: Mapping[str, np.ndarray], what: str) -> None:
        got = {k: tuple(v.shape) for k, v in weights.items()}
        if got != self.template:
            raise StateError(f"{what} holds tensors {got}, the model has {self.template}")

    @property
    def done(self) -> bool:
        """True once ``config.rounds`` rounds have closed (never with ``rounds=0``)."""
        return self.config.rounds > 0 and self.closed_rounds >= self.config.rounds

    def pop_results(self) -> list[RoundResult]:
        out, self._results = self._results, []
        return out

    # -- inputs ----------------------------------------------------------------------------
    def on_model(self, payload: bytes, now: float) -> list[Outgoing]:
        """The retained model found on the broker (delivered on subscribe, e.g. at start):
        a newer version of this epoch means the state was restored; what to publish."""
        if not payload:
            return []
        facts = index_facts(payload)  # a compressed downlink's index (aggregator.downlink)
        if facts is not None:
            fleet, epoch, version, round_id = facts
        else:
            try:
                msg = decode_model(payload)
            except WireError as exc:
                log.debug("ignoring a bad retained model: %s", exc)
                return []
            fleet, epoch, version, round_id = msg.fleet, msg.epoch, msg.version, msg.round_id
        if fleet != self.config.fleet:
            return []
        return self._check_epoch(epoch, version, round_id, "the retained model", now)

    def on_status(self, topic_device: str, payload: bytes, now: float) -> list[Outgoing]:
        """Track online devices from their (retained) status messages; a status that shows
        this epoch beyond the state rotates the epoch (what to publish)."""
        out: list[Outgoing] = []
        before = len(self.online)
        if not payload:
            self._offline(topic_device)
        else:
            try:
                status = decode_status(payload)
            except WireError as exc:
                log.debug("ignoring bad status from %s: %s", topic_device, exc)
                return out
            if status.fleet != self.config.fleet or status.device != topic_device:
                log.debug("ignoring status of %s on the topic of %s", status.device, topic_device)
                return out
            out = self._check_epoch(
                status.epoch, status.model_version, status.round_id,
                f"the status of {topic_device}", now,
            )
            try:
                eval_only = status_eval_only(status.capabilities)
                online = status.state in _ONLINE_STATES
            except ValueError as exc:
                log.warning("status of %s taken as offline: %s", topic_device, exc)
                eval_only, online = False, False
            if online:
                self.online.add(topic_device)
                if eval_only:
                    self.eval_only.add(topic_device)
                else:
                    self.eval_only.discard(topic_device)
                try:
                    self.codecs[topic_device] = status_codecs(status.capabilities)
                except ValueError as exc:
                    log.warning("device %s supports no codec: %s", topic_device, exc)
                    self.codecs[topic_device] = frozenset()
            else:
                self._offline(topic_device)
        if len(self.online) != before:
            self.metrics.online_devices.set(len(self.online))
            log.debug("%d device(s) online", len(self.online))
        return out

    def _offline(self, device: str) -> None:
        self.online.discard(device)
        self.codecs.pop(device, None)
        self.eval_only.discard(device)

    def _check_epoch(
        self, epoch: str, version: int | None, round_id: int | None, source: str, now: float
    ) -> list[Outgoing]:
        """Rotate the epoch when ``source`` saw this epoch further than the state is."""
        if not self._started or not epoch or epoch != self.epoch:
            return []
        ahead_version = version is not None and version > self.version
        ahead_round = round_id is not None and round_id > self.last_round_id
        if not (ahead_version or ahead_round):
            return []
        new = secrets.token_hex(8)
        try:
            self.store.set_meta("epoch", new)
        except StorageFullError as exc:  # not persisted, not used: the next sighting retries
            log.error("%s: new epoch not saved, the state stays in epoch %s for now", exc, epoch)
            return []
        log.warning(
            "%s shows model version %s, round %s of epoch %s, but the state in %s holds "
            "version %d, round %d: it was restored from an older copy; new epoch %s, so "
            "devices take part in the reused round ids",
            source, version, round_id, epoch, self.store.root, self.version,
            self.last_round_id, new,
        )
        self.epoch = new
        if self.round is not None:
            self.round.plan = dataclasses.replace(self.round.plan, epoch=new)
        return self.current_messages(now)

    # -- timer -----------------------------------------------------------------------------
    def tick(self, now: float) -> list[Outgoing]:
        """Close, abandon or open rounds as the policy says; what to publish.

        On a full disk it raises :class:`StorageFullError` naming the round and what was not
        done; the round and the model are then unchanged, in memory and on disk, and the
        next tick tries again.
        """
        if not self._started:
            raise StateError("engine.start() was not called")
        out: list[Outgoing] = []
        if self.round is not None:
            round_id = self.round.round_id
            if self.policy.is_ready(self.round, now):
                with _storage_full_context(f"round {round_id} not closed"):
                    out += self._close(now)
            elif self.policy.is_abandoned(self.round, now):
                with _storage_full_context(f"round {round_id} not abandoned"):
                    out += self._abandon(now)
        if self.round is None and not self.done and self._within_budget():
            with _storage_full_context(f"round {self.last_round_id + 1} not opened"):
                out += self._open(now)
        return out

    def _within_budget(self) -> bool:
        """False (one ERROR line, once) when the next DP round would exceed the budget: no
        round opens any more; the current model stays retained and served."""
        budget = self.config.dp_epsilon_budget
        if self.private is None or budget <= 0:
            return True
        if self.budget_exhausted:
            return False
        rounds = self.private.rounds
        after = self.private.epsilon(rounds + 1)
        if after <= budget:
            return True
        self.budget_exhausted = True
        self.metrics.dp_budget_exhausted.set(1)
        log.error(
            "privacy budget reached: round %d would bring epsilon from %.4g to %.4g at delta "
            "%g, above dp_epsilon_budget %g; no new round opens (model version %d stays "
            "current)",
            self.last_round_id + 1, self.private.epsilon(rounds), after,
            self.config.dp_delta, budget, self.version,
        )
        return False

    def _set_epsilon_gauge(self) -> None:
        if self.private is not None:
            self.metrics.dp_epsilon.set(self.private.epsilon())
            self.metrics.dp_epsilon_budget.set(self.config.dp_epsilon_budget)

    def current_messages(self, now: float) -> list[Outgoing]:
        """The retained state to republish on every (re)connect, finished or not: the model,
        and the open round's announcement or, with no round open, an empty retained message
        that clears whatever stale round the broker holds."""
        out = self._model_out(now)
        if self.round is not None:
            out.append(self._round_out(now))
        else:
            out.append(self.traffic.emit(self.topics.round, b""))
        return out

    # -- transitions -----------------------------------------------------------------------
    def _begin(self, plan: RoundPlan) -> None:
        self.round = RoundState(self.config.fleet, plan, self.config.max_claimed_examples)
        self.traffic.reset()
        self.ingest.begin(self.round, self.strategy.new_accumulator(self.template))
        self.metrics.current_round.set(plan.round_id)

    def _capable(self, round_id: int, codec: str) -> frozenset[str]:
        """The online devices that train and can encode ``codec``; the others are logged
        once a round. Eval-only devices are left out silently: they never take a training
        slot nor count toward ``min_devices``."""
        trainers = frozenset(self.online) - self.eval_only
        capable = frozenset(
            d for d in trainers if codec in self.codecs.get(d, LEGACY_CODECS)
        )
        unfit = trainers - capable
        logged = self._unfit_logged[1] if self._unfit_logged[0] == round_id else frozenset()
        if unfit - logged:
            log.info(
                "round %d: not selecting %s: no support for codec %s",
                round_id, ", ".join(sorted(unfit - logged)), codec,
            )
        self._unfit_logged = (round_id, logged | unfit)
        return capable

    def _open(self, now: float) -> list[Outgoing]:
        round_id = self.last_round_id + 1
        training = self.strategy.configure(round_id, self.config.training_config())
        ctx = RoundContext(
            round_id=round_id,
            base_version=self.version,
            online=self._capable(round_id, training.codec),
            now=now,
            training=training,
        )
        plan = self.policy.plan(ctx)
        if plan is None:
            return []
        plan = dataclasses.replace(plan, epoch=self.epoch)
        if (plan.round_id, plan.base_version) != (ctx.round_id, ctx.base_version):
            raise StateError(
                f"round policy planned round {plan.round_id} on version {plan.base_version}, "
                f"expected round {ctx.round_id} on version {ctx.base_version}"
            )
        self.store.create_round(plan.round_id, self.version, plan.to_json(), now)
        self.last_round_id = plan.round_id
        self._begin(plan)
        who = f"{len(plan.selected)} selected" if plan.selected else "any device"
        log.info(
            "round %d opened on version %d: %s, target %d, quorum %d, deadline in %.0fs",
            plan.round_id, self.version, who, plan.target, plan.min_updates, plan.deadline - now,
        )
        return [self._round_out(now)]

    def _close(self, now: float) -> list[Outgoing]:
        assert self.round is not None
        state = self.round
        contributions = list(self.ingest.contributions)
        fold = self.ingest.fold  # ended only once the close is stored (a full disk: retry)
        if fold is None:
            raise StateError(f"round {state.round_id} has no accumulator in the ingest")
        strategy_before = self.strategy.state()
        new_weights = self.strategy.aggregate(self.weights, fold.result())
        # With a compressed downlink the global model is what devices rebuild (downlink.py).
        staged = self.downlink.stage(
            self.version + 1, state.round_id, self.weights, new_weights, self.epoch, now
        )
        new_weights = staged.weights
        quality = finite_metrics(self._evaluate(new_weights))
        seconds = max(0.0, now - state.plan.opened_at)
        metrics = {
            **quality,
            "participants": float(state.count),
            "num_examples": float(state.num_examples),
            "bytes_in": float(self.traffic.bytes_in),
            "round_seconds": seconds,
            **self.ingest.evaluations.figures(),  # federated evaluation (fed_*)
        }
        if self.private is not None:  # after aggregate(): this round is released
            metrics["dp_epsilon"] = self.private.epsilon()
            metrics["dp_central_epsilon"] = self.private.central_epsilon()
            metrics["dp_clip"] = float(self.private.released_clip or self.private.clip)
            local = self.private.local_epsilon()
            if local is not None:
                metrics["dp_local_epsilon"] = local
        # Encoded before it is stored so the round's downlink (announcement, acks and this
        # model) is part of its persisted statistics; published only after the commit.
        model_payload = self._model_payload(
            self.version + 1, state.round_id, new_weights, metrics, now
        )
        try:
            check_publishable(
                model_payload, self.config.fleet, self.bundle.spec, self.config.max_model_weight
            )
        except UnpublishableModel as exc:
            return self._refuse_candidate(state, contributions, str(exc), now)
        metrics["bytes_out"] = float(self.traffic.bytes_out + len(model_payload))
        metrics["downlink_bytes"] = float(
            self.downlink.bytes_per_device(staged, model_payload, self.epoch, now)
        )
        try:
            stored = self.store.close_round(
                state.round_id, new_weights, metrics, self.strategy.state(), now
            )
        except StateError:
            self.strategy.load_state(strategy_before)  # as if the close was never tried
            raise
        self.ingest.end()
        if stored.version != self.version + 1:
            raise StateError(f"stored version {stored.version} after version {self.version}")
        self.version, self.weights, self.model_metrics = stored.version, new_weights, metrics
        self.closed_rounds += 1
        self.round = None
        out = self.downlink.publish(staged, model_payload, self.epoch, now)
        if self.done:
            out.append(self.traffic.emit(self.topics.round, b""))  # clear the retained round
        self.metrics.rounds_completed.inc()
        self.metrics.participants.observe(state.count)
        self.metrics.round_seconds.observe(seconds)
        self.metrics.model_version.set(self.version)
        self.metrics.set_quality(quality)
        set_eval_gauges(self.metrics, metrics)
        self._set_epsilon_gauge()
        self._results.append(
            RoundResult(
                round_id=state.round_id, status="closed", version=self.version,
                participants=state.count, num_examples=state.num_examples,
                bytes_in=self.traffic.bytes_in, bytes_out=self.traffic.bytes_out,
                seconds=seconds, metrics=metrics,
            )
        )
        return out

    def _abandon(self, now: float) -> list[Outgoing]:
        assert self.round is not None
        state = self.round
        evaluated = self.ingest.evaluations.figures()  # an eval-only round still measured
        self.store.abandon_round(state.round_id, now, evaluated)
        set_eval_gauges(self.metrics, evaluated)
        self.ingest.end()
        self.round = None
        self.metrics.rounds_abandoned.labels(reason="no_quorum").inc()
        when = "by its deadline" if now >= state.plan.abandon_at else (
            f"and every selected device answered ({len(state.refused)} finally rejected): "
            "no more can come"
        )
        log.warning(
            "round %d abandoned: %d of %d required update(s) %s",
            state.round_id, state.count, state.plan.min_updates, when,
        )
        self._results.append(
            RoundResult(
                round_id=state.round_id, status="abandoned", version=None,
                participants=state.count, num_examples=state.num_examples,
                bytes_in=self.traffic.bytes_in, bytes_out=self.traffic.bytes_out,
                seconds=max(0.0, now - state.plan.opened_at), metrics=evaluated,
            )
        )
        return []

    def _refuse_candidate(
        self, state: RoundState, contributions: list[Contribution], reason: str, now: float
    ) -> list[Outgoing]:
        """The round's model would be refused by the devices: abandon the round instead.

        Nothing is stored or published; the server optimiser's state goes back to the stored
        one; the next round opens on the unchanged model.
        """
        self.store.abandon_round(state.round_id, now)
        self.ingest.end()
        self.strategy.load_state(self.store.server_state())
        self.round = None
        worst = largest_contributions(contributions)
        self.metrics.rounds_abandoned.labels(reason="unpublishable_model").inc()
        self.metrics.unpublishable_update_norm.clear()
        for c in worst:
            self.metrics.unpublishable_update_norm.labels(
                device=c.device, update_id=c.update_id
            ).set(c.norm)
        log.error(
            "round %d abandoned: its model (version %d) is unpublishable: %s; version %d "
            "stays current; largest updates (weight x L2 norm): %s",
            state.round_id, self.version + 1, reason, self.version,
            describe_contributions(worst),
        )
        self._results.append(
            RoundResult(
                round_id=state.round_id, status="abandoned", version=None,
                participants=state.count, num_examples=state.num_examples,
                bytes_in=self.traffic.bytes_in, bytes_out=self.traffic.bytes_out,
                seconds=max(0.0, now - state.plan.opened_at),
            )
        )
        return []

    # -- helpers ---------------------------------------------------------------------------
    def _evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return evaluate(self.evaluator, weights)

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
            metrics=finite_metrics(metrics),
            created_at=now,
            epoch=self.epoch,
        )
        return encode(msg)

    def _model_out(self, now: float) -> list[Outgoing]:
        round_id = self.store.model(self.version).round_id or 0
        payload = self._model_payload(
            self.version, round_id, self.weights, self.model_metrics, now
        )
        return self.downlink.current(self.version, payload, self.epoch, now)

    def _round_out(self, now: float) -> Outgoing:
        assert self.round is not None
        ann = self.round.plan.announcement(self.config.fleet, self.model_id)
        if isinstance(self.strategy, PruneStrategy):  # the mask of the round's base model
            ann = dataclasses.replace(ann, prune_mask=self.strategy.mask_bytes)
        return self.traffic.emit(self.topics.round, encode(ann))


@contextlib.contextmanager
def _storage_full_context(what: str) -> Iterator[None]:
    """Re-raise a :class:`StorageFullError` with ``what`` was not done (for the one log line)."""
    try:
        yield
    except StorageFullError as exc:
        raise StorageFullError(exc.directory, f"{what} ({exc.detail})") from exc
