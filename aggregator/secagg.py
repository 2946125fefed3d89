"""Secure-aggregation rounds (``round_policy = "secagg"``, docs/privacy.md).

:class:`SecAggRounds` is the round policy: a synchronous round whose announcement carries
``secagg_clip`` (the round-fixed int8 scale is ``secagg_clip / 127``), closed as soon as the
unmasked sum is folded and abandoned when the secure protocol fails.
:class:`SecAggDriver` runs the protocol for the open round over MQTT: it feeds device
messages (``secagg/in/<device>``) to a :class:`fedmq.secagg.server.SecAggServer`, answers a
rejected one on the device's ack topic (counted in ``fedmq_updates_rejected``), closes each
phase when every expected device is in or at its deadline (a device that misses a phase is
dropped, never waited for), publishes the roster and the survivors retained on
``secagg/out`` and each device's relayed shares retained on ``secagg/out/<device>``, and
folds the unmasked mean into the round's accumulator once per survivor (weight 1: every
device weighs the same, as the server cannot weigh masked inputs).

The protocol state lives in memory only: a secure round open when the aggregator restarts
is abandoned (its devices' keys are gone with their round), and the next round starts over.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aggregator.outgoing import Outgoing
from aggregator.policies import RoundContext, SyncRounds
from aggregator.round_state import RoundPlan, RoundState
from fedmq.errors import ConfigError, Rejected, RejectReason
from fedmq.secagg.messages import decode_signed
from fedmq.secagg.server import SecAggResult, SecAggServer
from fedmq.signing import Registry
from fedmq.tensor import Tensor
from fedmq.wire import AckMessage

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig
    from aggregator.engine import Engine

__all__ = ["SECAGG_POLICY", "SecAggDriver", "SecAggRounds", "check_secagg_config", "flat_order"]

log = logging.getLogger(__name__)

SECAGG_POLICY = "secagg"


def flat_order(template: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    """The order tensors are flattened into the masked vector: by name (device and
    aggregator agree without relying on the bundle's order)."""
    return sorted(template.items())


def check_secagg_config(config: AggregatorConfig) -> None:
    """Raise ConfigError unless the config can run secure rounds."""
    if config.round_policy != SECAGG_POLICY:
        return
    if config.registry is None:
        raise ConfigError("round_policy = \"secagg\" needs a registry: every phase message is "
                          "signed with the device's enrolled key")
    if config.dp and (config.dp_clip_mode != "fixed" or config.dp_local_noise > 0):
        raise ConfigError("round_policy = \"secagg\" with dp needs dp_clip_mode = \"fixed\" "
                          "and no dp_local_noise: adaptive clipping needs each device's clip "
                          "bit, which secure rounds do not reveal")
    if config.secagg_min_survivors > config.clients_per_round:
        raise ConfigError("secagg_min_survivors exceeds clients_per_round")


class SecAggRounds(SyncRounds):
    """Synchronous rounds run as secure rounds; the driver reports success or failure."""

    def __init__(self, config: AggregatorConfig) -> None:
        super().__init__(config)
        self.clip = config.secagg_clip
        self.phase_timeout = config.secagg_phase_timeout
        #: round id -> why its secure protocol failed (set by the driver)
        self.failed: dict[int, str] = {}

    def plan(self, ctx: RoundContext) -> RoundPlan | None:
        plan = super().plan(ctx)
        if plan is None:
            return None
        params = {**plan.config.params, "secagg_clip": self.clip}
        # keys and shares before the training deadline, unmasking after it
        abandon_at = plan.abandon_at + 2 * self.phase_timeout
        return dataclasses.replace(plan, config=dataclasses.replace(plan.config, params=params),
                                   abandon_at=abandon_at)

    def is_ready(self, state: RoundState, now: float) -> bool:
        return state.count >= state.plan.min_updates

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        return state.round_id in self.failed or now >= state.plan.abandon_at


@dataclass
class _Session:
    server: SecAggServer
    plan: RoundPlan
    deadline: float  # of the current phase


class SecAggDriver:
    """The secure protocol of the engine's open round; see the module docstring."""

    def __init__(self, config: AggregatorConfig, engine: Engine, started_at: float) -> None:
        policy = engine.coordinator.policy
        if not isinstance(policy, SecAggRounds) or config.registry is None:
            raise ConfigError("the secure-aggregation driver needs round_policy = \"secagg\" "
                              "and a registry")
        self.config = config
        self.engine = engine
        self.policy = policy
        self.registry = Registry(Path(config.registry))
        self.topics = config.topics
        self.order = flat_order(dict(engine.template))
        self.length = sum(math.prod(s) for _, s in self.order)
        self.started_at = started_at
        self.session: _Session | None = None
        self.results: list[SecAggResult] = []  # unmasked sums of closed secure rounds

    # ------------------------------------------------------------------ inbound
    def on_message(self, device: str, payload: bytes, now: float) -> list[Outgoing]:
        """A device's phase message: taken, or rejected with an ack that names the reason."""
        s = self.session
        if s is not None and s.server.phase in ("done", "abandoned") and self._late(s, payload):
            log.debug("secure round %d: a late message from %s, not needed", s.plan.round_id,
                      device)
            return []
        try:
            if s is None or s.server.phase in ("done", "abandoned"):
                raise Rejected("no secure round is collecting messages",
                               RejectReason.WRONG_PHASE)
            kind = s.server.receive(payload, device)
        except Rejected as exc:
            return self._reject(device, s.plan.round_id if s else 0, exc)
        log.debug("round %d: %s from %s", s.plan.round_id, kind, device)
        return self.tick(now) if s.server.complete() else []

    @staticmethod
    def _late(s: _Session, payload: bytes) -> bool:
        """A well-formed message of this (finished) round: arrived after it was no longer
        needed (unmasking ends as soon as enough shares are in)."""
        try:
            _, msg = decode_signed(payload, s.server.limits)
        except Rejected:
            return False
        return (msg.round_id, msg.epoch) == (s.plan.round_id, s.plan.epoch)

    def _reject(self, device: str, round_id: int, exc: Rejected) -> list[Outgoing]:
        log.warning("secure round %d: rejected a message from %s: %s (%s)", round_id, device,
                    exc.reason, exc.code)
        self.engine.metrics.updates_rejected.labels(reason=exc.code).inc()
        ack = AckMessage(self.config.fleet, round_id, device, f"secagg:{round_id}", False,
                         exc.code, exc.reason)
        out = self.engine.ack_outgoing(ack)
        return [out] if out else []

    # ------------------------------------------------------------------ timer
    def tick(self, now: float) -> list[Outgoing]:
        state = self.engine.round
        if state is None:  # the session stays: late messages of its round are recognised
            return []
        s = self.session
        if s is None or s.plan.round_id != state.round_id or s.plan.epoch != state.plan.epoch:
            return self._begin(state, now)
        server = s.server
        if server.phase in ("done", "abandoned"):
            return []
        if not (server.complete() or now >= s.deadline):
            return []
        phase = server.phase
        items = server.close_phase()
        out = [self._outgoing(target, payload) for target, payload in items]
        if server.phase == "masked":  # devices train meanwhile: wait for the round deadline
            s.deadline = max(s.plan.deadline, now + self.policy.phase_timeout)
        else:
            s.deadline = now + self.policy.phase_timeout
        log.info("secure round %d: %s phase closed (%s); now %s", s.plan.round_id, phase,
                 self._counts(server), server.phase)
        if server.phase == "done":
            self._finish(s, state)
        elif server.phase == "abandoned":
            self._fail(s, server.reason)
        return out

    def _begin(self, state: RoundState, now: float) -> list[Outgoing]:
        plan = state.plan
        self.session = _Session(
            SecAggServer(self.config.fleet, plan.epoch, plan.round_id,
                         clip=float(plan.config.params.get("secagg_clip", self.policy.clip)),
                         length=self.length, public_key=self.registry.public_key,
                         min_survivors=self.config.secagg_min_survivors,
                         selected=plan.selected),
            plan, now + self.policy.phase_timeout)
        if plan.opened_at < self.started_at:
            self._fail(self.session, "the aggregator restarted: secure-round state is not "
                                     "kept across restarts")
        return []

    def _outgoing(self, target: str, payload: bytes) -> Outgoing:
        topic = self.topics.secagg_out if target == "server" else self.topics.secagg_relay(target)
        return self.engine.coordinator.traffic.emit(topic, payload, retain=True)

    @staticmethod
    def _counts(server: SecAggServer) -> str:
        return (f"{len(server.keys)} keys, {len(server.shares)} shares, "
                f"{len(server.masked)} masked, {len(server.unmasked)} unmasked")

    def _fail(self, s: _Session, reason: str) -> None:
        s.server.phase = "abandoned"
        self.policy.failed[s.plan.round_id] = reason
        log.warning("secure round %d abandoned: %s", s.plan.round_id, reason)

    def _finish(self, s: _Session, state: RoundState) -> None:
        try:
            result = s.server.result()
        except Rejected as exc:
            self._fail(s, f"{exc.reason} ({exc.code})")
            return
        fold = self.engine.fold
        if fold is None:
            self._fail(s, "the round has no accumulator")
            return
        n = len(result.survivors)
        if n < s.plan.min_updates:
            self._fail(s, f"{n} survivors, below the round's quorum {s.plan.min_updates}")
            return
        mean = result.sum.astype(np.float64) * (result.scale / n)
        tensors, start = [], 0
        for name, shape in self.order:
            size = math.prod(shape)
            values = mean[start : start + size].astype(np.float32).reshape(shape)
            tensors.append(Tensor.from_array(name, values))
            start += size
        try:
            # Weight 1 each: the fold's count is the survivors. Under DP the fold is the
            # ClippedSum, whose noise goes on this sum at the close (central noise after
            # unmasking); the mean of clipped updates is within the clip, so it is folded as is.
            for _ in result.survivors:
                fold.fold(tensors, "float32", 1.0)
        except Rejected as exc:
            self._fail(s, f"the unmasked mean does not fold: {exc.reason} ({exc.code})")
            return
        for device in result.survivors:
            claimed = s.server.masked[device][0]
            examples = max(1, min(claimed, self.config.max_claimed_examples))
            state.record(f"secagg-{s.plan.round_id}-{device}", device, examples)
        self.results.append(result)
        log.info("secure round %d unmasked: %d survivors, %d dropped after sharing (%s)",
                 s.plan.round_id, n, len(result.dropped), ", ".join(result.dropped) or "none")

    def refuse_update(self, device: str) -> list[Outgoing]:
        """A plain update in a secure federation: never folded (it would reveal the
        device's update to the aggregator), answered with a reason."""
        state = self.engine.round
        return self._reject(device, state.round_id if state else 0, Rejected(
            "this federation runs secure rounds: send the masked input on "
            f"{self.topics.secagg_in(device)}, not an update", RejectReason.WRONG_PHASE))
