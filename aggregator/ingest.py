"""One update in, one ack out: decode, authenticate, check, journal, fold.

:class:`Ingest` owns the accumulator of the open round. It never opens or closes a round
and knows no strategy: the coordinator hands it the open round (:meth:`Ingest.begin`) and
takes the accumulator back when the round ends (:meth:`Ingest.end`). An accepted update is
journaled durably before :meth:`Ingest.handle_update` returns, so the caller may send the
MQTT PUBACK afterwards. Memory is O(model): decoded updates are folded and dropped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

import msgpack

from aggregator.bounds import Contribution, FleetBounds, update_norm
from aggregator.config import AggregatorConfig
from aggregator.evaluation import RoundEvaluations
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import Outgoing, RoundTraffic
from aggregator.round_state import FINAL_REJECTIONS, RoundState, check_route
from aggregator.store import Store
from fedmq.errors import (
    ConfigError,
    Rejected,
    RejectReason,
    SecurityError,
    StateError,
    StorageFullError,
    WireError,
)
from fedmq.privacy.dp_fedavg import ClippedSum
from fedmq.signing import Registry, verify_update
from fedmq.topics import Topics, validate_name
from fedmq.update.accumulate import Accumulator, CheckedUpdate, scaled
from fedmq.update.normalized import check_update, fold_update
from fedmq.wire import (
    AckMessage,
    Limits,
    ReceivedUpdate,
    UpdateMessage,
    decode_update,
    encode,
    receive_update,
)

__all__ = ["Ingest"]

log = logging.getLogger(__name__)

_BOUNDS_META = "ingest_bounds"  # the fleet's recent norms and claims (aggregator.bounds)
_EVAL_ONLY_META = "eval_only_reports"  # the open round's eval-only reports (not journaled)
_REFUSED_META = "round_refused"  # selected devices of the open round finally rejected


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


def _staleness_note(state: RoundState, msg: UpdateMessage, weight: float, folded: float) -> str:
    """How a buffer weighted an update of an earlier base ("" for a fresh one): the ack's
    reason and the log line, so a device (and a test) sees the exact weight folded."""
    rule = state.plan.staleness
    stale = state.plan.base_version - msg.base_version
    if rule is None or (stale == 0 and msg.round_id == state.round_id):
        return ""
    return (
        f"staleness {stale}: weight {weight!r} x (1 + {stale}) ** -{rule.exponent!r} = "
        f"{folded!r}, folded into round {state.round_id}"
    )


class Ingest:
    """Checks, journals and folds updates into the open round; see the module docstring."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        template: Mapping[str, tuple[int, ...]],
        traffic: RoundTraffic,
        metrics: AggregatorMetrics,
    ) -> None:
        self.config = config
        self.store = store
        self.template = dict(template)
        self.traffic = traffic
        self.metrics = metrics
        self.topics: Topics = config.topics
        self.limits = Limits(max_bytes=config.max_update_bytes)
        self.registry = Registry(Path(config.registry)) if config.registry else None
        self.require_signatures = config.signatures_required
        self.round: RoundState | None = None
        self.fold: Accumulator | None = None
        # The accepted updates of the open round (norm, claimed and used weight): O(devices).
        self.contributions: list[Contribution] = []
        # The devices' evaluation reports of the open round (aggregator.evaluation): O(devices).
        self.evaluations = RoundEvaluations()
        self.bounds = FleetBounds.from_json(
            config.bounds_config(), store.get_meta(_BOUNDS_META)
        )
        # The newest round id ever opened: updates up to it are `round_closed` when no
        # round is open. Set by the coordinator at start, then by begin().
        self.last_round_id = 0
        # Online devices whose retained status says they only evaluate (capability
        # eval_only): kept by the coordinator, which never selects them to train.
        self.eval_only_devices: set[str] = set()

    # -- the open round (driven by the coordinator) ----------------------------------------
    def begin(self, state: RoundState, accumulator: Accumulator) -> None:
        """Accept updates for ``state``'s round into ``accumulator`` (fresh, from the strategy)."""
        if self.round is not None:
            raise StateError(f"round {self.round.round_id} is still open in the ingest")
        if accumulator.count:
            raise StateError("the ingest needs an empty accumulator")
        self.round = state
        self.fold = accumulator
        self.contributions = []
        self.evaluations = RoundEvaluations(state.plan.base_version, state.round_id)
        self.last_round_id = max(self.last_round_id, state.round_id)

    def refold(self) -> int:
        """Re-fold the open round's journaled updates (after a restart); how many."""
        if self.round is None or self.fold is None:
            raise StateError("no open round to re-fold")
        n = 0
        for entry in self.store.journal(self.round.round_id):
            weight = float(entry.num_examples) if entry.weight is None else entry.weight
            try:
                msg = decode_update(entry.payload, self.limits)
                fold_update(self.fold, msg.tensors, msg.codec, weight, msg.steps, entry.scale)
                if isinstance(self.fold, ClippedSum):
                    self.fold.note_metrics(msg.metrics)
            except (Rejected, ValueError) as exc:
                raise StateError(
                    f"journaled update {entry.update_id!r} is unreadable: {exc}"
                ) from exc
            norm = update_norm(msg.tensors, msg.codec)
            self.bounds.observe_norm(entry.device, norm)
            self.bounds.observe_claim(entry.device, entry.num_examples)
            self.contributions.append(Contribution(
                entry.update_id, entry.device, entry.num_examples, weight, norm * entry.scale
            ))
            self.round.record(entry.update_id, entry.device, entry.num_examples)
            self.evaluations.note(msg)
            self.traffic.bytes_in += len(entry.payload)
            n += 1
        self.evaluations.load_eval_only(self.store.get_meta(_EVAL_ONLY_META))
        self._load_refused()
        log.info("round %d reopened with %d journaled update(s) re-folded", self.round.round_id, n)
        return n

    def end(self) -> Accumulator:
        """Stop accepting for the open round; its accumulator (the round closes or is dropped)."""
        if self.fold is None:
            raise StateError("no open round to end")
        fold = self.fold
        self.round, self.fold = None, None
        self.save_bounds()
        return fold

    def save_bounds(self) -> None:
        """Persist the fleet's recent norms and claims (the medians' pool) in the state."""
        self.store.set_meta(_BOUNDS_META, self.bounds.to_json())

    # -- start-up --------------------------------------------------------------------------
    def check_registry(self) -> None:
        """Log the signature mode; an unreadable registry is a ConfigError."""
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

    # -- updates ---------------------------------------------------------------------------
    def handle_update(
        self, topic_device: str, payload: bytes, now: float, *, retained: bool = False
    ) -> AckMessage:
        """Decode, check, journal (durably), fold; the ack to send.

        ``retained``: the broker delivered it with the retain flag (a device parked it on its
        update topic): rejected ``retained``, never folded. An update id already folded (in
        any round) is answered ``accepted=True, code=duplicate`` with that round.

        Raises :class:`StateError` only when the journal cannot be written
        (:class:`StorageFullError` on a full disk, naming the update): the update is then
        neither folded, acknowledged nor counted (the broker keeps it for redelivery).
        """
        started = time.perf_counter()
        self.metrics.bytes_in.inc(len(payload))
        try:
            validate_name(topic_device, "device")
        except ConfigError as exc:
            return self._reject(topic_device, payload, WireError(str(exc)), now)
        if retained:
            err = Rejected(
                "updates must not be retained: clear it with an empty retained message on "
                f"{self.topics.update(topic_device)}",
                RejectReason.RETAINED,
            )
            return self._reject(topic_device, payload, err, now)
        try:
            received = receive_update(payload, self.limits)
        except WireError as exc:
            return self._reject(topic_device, payload, exc, now)
        msg = received.message
        try:
            self._authenticate(received, topic_device)
            duplicate = self._already_folded(msg, topic_device, now)
            if duplicate is not None:
                return duplicate
            if not msg.tensors:  # an eval_only device's report (the wire requires its eval)
                return self._evaluation_only(msg, topic_device, len(payload), now)
            if msg.device in self.eval_only_devices:
                raise Rejected(
                    f"device {msg.device!r} says eval_only in its status: it is never "
                    "selected to train, so its update with tensors is refused (an eval-only "
                    "report carries no tensors)", RejectReason.NOT_SELECTED,
                )
            weight = self.bounds.weight(
                msg.device, msg.num_examples, self._registry_cap(msg.device)
            )
            checked = self._check(msg, topic_device, weight)
            norm = update_norm(checked.tensors, msg.codec)  # the one norm of this update
            clip = self.bounds.check_norm(msg.device, norm)
        except Rejected as exc:
            return self._reject(topic_device, payload, exc, now, msg)
        assert self.round is not None and self.fold is not None
        # Journaled in the open round (a buffer also folds updates of earlier rounds), with
        # the weight actually folded (capped, staleness-weighted): a restart re-folds it.
        try:
            self.store.append_update(
                msg.update_id, self.round.round_id, msg.device, msg.num_examples, payload, now,
                checked.weight, clip,
            )
        except StorageFullError as exc:
            raise StorageFullError(
                exc.directory, exc.detail, update_id=msg.update_id, device=msg.device
            ) from exc
        self.fold.add(scaled(checked, clip))
        if isinstance(self.fold, ClippedSum):  # DP: the device's clip bit (adaptive clip)
            self.fold.note_metrics(msg.metrics)
        self.round.record(msg.update_id, msg.device, msg.num_examples)
        self.evaluations.note(msg)
        self.bounds.observe_claim(msg.device, msg.num_examples)
        self.contributions.append(
            Contribution(msg.update_id, msg.device, msg.num_examples, checked.weight, norm * clip)
        )
        if math.isfinite(norm):  # NaN: an encrypted update's norm is unknown
            self.metrics.update_norm.observe(norm)
        note = _staleness_note(self.round, msg, weight, checked.weight)
        reason = note
        if clip < 1.0:
            self.metrics.updates_clipped.inc()
            clipped = (
                f"update L2 norm {norm:.4g} over the bound: delta folded scaled by {clip:.6g} "
                f"(to norm {norm * clip:.4g})"
            )
            log.info("update %s from %s: %s", msg.update_id, msg.device, clipped)
            reason = f"{note}; {clipped}" if note else clipped
        if weight < msg.num_examples:
            self.metrics.weights_capped.inc()
            log.info(
                "update %s from %s claims %d examples: folded with weight %.6g (capped)",
                msg.update_id, msg.device, msg.num_examples, weight,
            )
        if note:
            log.info(
                "update %s from %s trained on version %d (round %d): %s",
                msg.update_id, msg.device, msg.base_version, msg.round_id, note,
            )
        self.traffic.bytes_in += len(payload)
        self.metrics.updates_accepted.inc()
        self.metrics.fold_seconds.observe(time.perf_counter() - started)
        log.debug(
            "accepted update %s from %s for round %d (%d examples, %d/%d)",
            msg.update_id, msg.device, msg.round_id, msg.num_examples,
            self.round.count, self.round.plan.target,
        )
        return AckMessage(
            fleet=self.config.fleet, round_id=msg.round_id, device=topic_device,
            update_id=msg.update_id, accepted=True, code="ok", reason=reason, created_at=now,
        )

    def _evaluation_only(
        self, msg: UpdateMessage, topic_device: str, size: int, now: float
    ) -> AckMessage:
        """Record an eval-only device's report for the open round (checked like an update,
        nothing folded; stored durably in the meta table before the ack, so a restart keeps
        it). A device whose status says eval_only is taken even when not selected; a second
        report of the device in the round is answered ``duplicate`` and changes nothing. It
        never counts toward the round's quorum or target (the round state does not record it)."""
        if self.round is None:
            check_route(msg, topic_device, self.config.fleet, last_round=self.last_round_id)
            raise Rejected(f"round {msg.round_id} is not open", RejectReason.WRONG_ROUND)
        self.round.check(
            msg, topic_device, None, base_of=self._round_base,
            eval_only_device=msg.device in self.eval_only_devices,
        )
        if self.evaluations.has_eval_only(msg.device):
            self.metrics.updates_duplicate.inc()
            log.info("evaluation of round %d from %s (%s) was already recorded: answered "
                     "duplicate", self.round.round_id, msg.device, msg.update_id)
            return AckMessage(
                fleet=self.config.fleet, round_id=msg.round_id, device=topic_device,
                update_id=msg.update_id, accepted=True, code=RejectReason.DUPLICATE,
                reason=f"the evaluation of {msg.device} for round {msg.round_id} was "
                       "already recorded", created_at=now,
            )
        if not self.evaluations.note(msg):
            raise Rejected(
                f"evaluation of version {msg.base_version}: round {self.round.round_id} "
                f"evaluates version {self.round.plan.base_version}", RejectReason.WRONG_BASE,
            )
        self.store.set_meta(_EVAL_ONLY_META, self.evaluations.eval_only_json())
        self.traffic.bytes_in += size
        log.info("evaluation of round %d from %s recorded (eval only: nothing folded)",
                 self.round.round_id, msg.device)
        return AckMessage(
            fleet=self.config.fleet, round_id=msg.round_id, device=topic_device,
            update_id=msg.update_id, accepted=True, code="ok",
            reason="evaluation recorded; nothing folded", created_at=now,
        )

    def _note_refused(self, device: str, msg: UpdateMessage, code: str) -> None:
        """A selected device's update of the open (synchronous) round finally rejected: note
        it (durably, for a restart) so the round need not wait for it (docs/rounds.md)."""
        state = self.round
        if (
            state is None or state.plan.staleness is not None or code not in FINAL_REJECTIONS
            or msg.device != device or msg.round_id != state.round_id
            or (msg.epoch and msg.epoch != state.plan.epoch)
            or not state.refuse(device)
        ):
            return
        self.store.set_meta(_REFUSED_META, json.dumps(
            {"round": state.round_id, "epoch": state.plan.epoch, "devices": sorted(state.refused)}
        ))
        log.info(
            "round %d: %s's update was finally rejected (%s): the round does not wait for it "
            "(%d of %d selected device(s) answered)", state.round_id, device, code,
            len(state.devices | state.refused), len(state.plan.selected),
        )

    def _load_refused(self) -> None:
        """After a restart: the open round's finally rejected devices (see _note_refused)."""
        assert self.round is not None
        text = self.store.get_meta(_REFUSED_META)
        if text is None:
            return
        try:
            obj = json.loads(text)
            plan = self.round.plan
            if int(obj["round"]) == plan.round_id and obj.get("epoch", "") == plan.epoch:
                for device in obj["devices"]:
                    self.round.refuse(str(device))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("stored refused devices are unreadable (%s): waiting for all", exc)

    def ack_outgoing(self, ack: AckMessage) -> Outgoing | None:
        """The ack as a message to publish (None when the device id cannot be a topic)."""
        try:
            topic = self.topics.ack(ack.device)
        except ConfigError:
            return None
        return self.traffic.emit(topic, encode(ack), retain=False)

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
        check_route(msg, topic_device)
        try:
            public_key = self.registry.public_key(msg.device)
        except SecurityError as exc:  # unreadable at start-up was caught by check_registry()
            log.error("device registry: %s", exc)
            public_key = None
        if not self.require_signatures and (public_key is None or not received.signature):
            return  # migration mode: only signed updates of enrolled devices are verified
        try:
            verify_update(received, public_key)
        except SecurityError as exc:  # an enrolled key that is not a valid Ed25519 key
            log.error("registry key of %s is unusable: %s", msg.device, exc)
            raise Rejected(
                f"device {msg.device!r} has no usable enrolled key", RejectReason.UNKNOWN_DEVICE
            ) from exc

    def _registry_cap(self, device: str) -> int | None:
        if self.registry is None:
            return None
        try:
            return self.registry.max_weight(device)
        except SecurityError as exc:  # unreadable at start-up was caught by check_registry()
            log.error("device registry: %s", exc)
            return None

    def _already_folded(
        self, msg: UpdateMessage, topic_device: str, now: float
    ) -> AckMessage | None:
        """The ``duplicate`` answer for an update id this device already had folded, in
        whatever round (a redelivery, or a re-send after a lost ack); None otherwise."""
        if msg.fleet != self.config.fleet or msg.device != topic_device:
            return None
        folded = self.store.folded_update(msg.update_id)
        if folded is None or folded[1] != msg.device:
            return None
        round_id = folded[0]
        self.metrics.updates_duplicate.inc()
        log.info(
            "update %s from %s was already folded in round %d: answered duplicate",
            msg.update_id, msg.device, round_id,
        )
        return AckMessage(
            fleet=self.config.fleet, round_id=round_id, device=topic_device,
            update_id=msg.update_id, accepted=True, code=RejectReason.DUPLICATE,
            reason=f"update {msg.update_id} was already folded in round {round_id}",
            created_at=now,
        )

    def _check(self, msg: UpdateMessage, topic_device: str, weight: float) -> CheckedUpdate:
        if self.round is None or self.fold is None:
            check_route(msg, topic_device, self.config.fleet, last_round=self.last_round_id)
            raise Rejected(f"round {msg.round_id} is not open", RejectReason.WRONG_ROUND)
        fold, state = self.fold, self.round
        checked: list[CheckedUpdate] = []

        def check_tensors(m: UpdateMessage) -> None:
            w = weight * state.weight_factor(m)
            checked.append(check_update(fold, m.tensors, m.codec, w, m.steps))

        state.check(msg, topic_device, check_tensors, base_of=self._round_base)
        return checked[0]

    def _round_base(self, round_id: int) -> int | None:
        """The base version round ``round_id`` was opened on (None: not in the state)."""
        try:
            return self.store.round(round_id).base_version
        except StateError:
            return None

    def _reject(
        self,
        device: str,
        payload: bytes,
        err: Rejected,
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
        if msg is not None:
            self._note_refused(device, msg, err.code)
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
