"""Pure round state for the aggregator: the plan of one round and what it has accepted.

No I/O and no clock: callers pass ``now``. :func:`check_route` is the one fleet/device/round
check of an :class:`~fedmq.wire.UpdateMessage`; :class:`RoundState` checks the rest against
the plan (in the order of docs/protocol.md). Both raise :class:`~fedmq.errors.Rejected` with
a :class:`~fedmq.errors.RejectReason` code. When a round is ready or abandoned is for the
round policy to say (``aggregator.policies``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aggregator.staleness import StalenessRule
from fedmq.errors import Rejected, RejectReason, StateError
from fedmq.wire import RoundAnnouncement, TrainingConfig, UpdateMessage

__all__ = ["FINAL_REJECTIONS", "RoundPlan", "RoundState", "check_route", "select_devices"]

# Rejections of an update of the open round that end the device's part in it: the edge agent
# settles every rejected update (edge_agent.core on_ack) and trains once per round, so a
# synchronous round need not wait for it. Not here: answers about another round or a copy
# (wrong_round, round_closed, duplicate), and authentication failures (unsigned,
# bad_signature, unknown_device: without a valid signature the update may not be the
# device's, and a forger must not end a device's round).
FINAL_REJECTIONS = frozenset({
    RejectReason.WRONG_BASE, RejectReason.SHAPE, RejectReason.NON_FINITE,
    RejectReason.BAD_CODEC, RejectReason.NORM_BOUND, RejectReason.MALFORMED,
})


@dataclass(frozen=True)
class RoundPlan:
    """What a round was opened with; ``selected`` empty = any device may contribute.

    ``target`` and ``min_updates`` (the quorum), ``deadline`` and ``abandon_at`` are read by
    the round policy that made the plan (the synchronous rule is in
    :class:`aggregator.policies.SyncRounds`). ``staleness`` set (the ``fedbuff`` policy):
    the round is a buffer that also takes updates of earlier rounds, trained on a base up to
    ``staleness.max_staleness`` versions behind ``base_version``, at a reduced weight.
    """

    round_id: int
    base_version: int
    selected: tuple[str, ...]
    target: int
    min_updates: int
    opened_at: float
    deadline: float
    abandon_at: float
    config: TrainingConfig
    epoch: str = ""  # the aggregator state's epoch the round belongs to
    staleness: StalenessRule | None = None  # None: only updates of this round and base

    def __post_init__(self) -> None:
        if self.round_id < 0 or self.base_version < 0:
            raise ValueError("round_id and base_version must be >= 0")
        if len(set(self.selected)) != len(self.selected):
            raise ValueError("selected devices must be unique")
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be >= 1, got {self.min_updates}")
        if self.target < self.min_updates:
            raise ValueError(f"target {self.target} is below min_updates {self.min_updates}")
        if self.selected and self.min_updates > len(self.selected):
            raise ValueError(
                f"min_updates {self.min_updates} exceeds the {len(self.selected)} selected devices"
            )
        times = (self.opened_at, self.deadline, self.abandon_at)
        if not all(math.isfinite(t) for t in times):
            raise ValueError("round times must be finite")
        if not self.opened_at <= self.deadline <= self.abandon_at:
            raise ValueError("round times must satisfy opened_at <= deadline <= abandon_at")

    def announcement(self, fleet: str, model_id: str = "") -> RoundAnnouncement:
        return RoundAnnouncement(
            fleet=fleet,
            round_id=self.round_id,
            base_version=self.base_version,
            deadline=self.deadline,
            config=self.config,
            selected=self.selected,
            min_updates=self.min_updates,
            model_id=model_id,
            opened_at=self.opened_at,
            epoch=self.epoch,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "round_id": self.round_id,
            "base_version": self.base_version,
            "selected": list(self.selected),
            "target": self.target,
            "min_updates": self.min_updates,
            "opened_at": self.opened_at,
            "deadline": self.deadline,
            "abandon_at": self.abandon_at,
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            **({} if self.staleness is None else {"staleness": self.staleness.to_json()}),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RoundPlan:
        try:
            return cls(
                round_id=int(obj["round_id"]),
                base_version=int(obj["base_version"]),
                selected=tuple(str(d) for d in obj["selected"]),
                target=int(obj["target"]),
                min_updates=int(obj["min_updates"]),
                opened_at=float(obj["opened_at"]),
                deadline=float(obj["deadline"]),
                abandon_at=float(obj["abandon_at"]),
                config=TrainingConfig.from_dict(obj["config"]),
                epoch=str(obj.get("epoch", "")),
                staleness=(
                    None if obj.get("staleness") is None
                    else StalenessRule.from_json(obj["staleness"])
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"stored round plan is invalid: {exc}") from exc


class RoundState:
    """Accepted updates of one open round (ids, devices, weight): O(devices), no tensors."""

    def __init__(
        self, fleet: str, plan: RoundPlan, max_claimed_examples: int | None = None
    ) -> None:
        self.fleet = fleet
        self.plan = plan
        self.max_claimed_examples = max_claimed_examples
        self._update_ids: set[str] = set()
        self._devices: set[str] = set()
        self._selected = frozenset(plan.selected)
        # Selected devices whose update for this round was finally rejected (FINAL_REJECTIONS):
        # the device settles it and does not train again for the round, so none will come.
        self._refused: set[str] = set()
        self.num_examples = 0

    @property
    def round_id(self) -> int:
        return self.plan.round_id

    @property
    def count(self) -> int:
        return len(self._update_ids)

    @property
    def devices(self) -> frozenset[str]:
        return frozenset(self._devices)

    def has_update(self, update_id: str) -> bool:
        return update_id in self._update_ids

    def check(
        self,
        msg: UpdateMessage,
        topic_device: str | None = None,
        check_tensors: Callable[[UpdateMessage], None] | None = None,
        base_of: Callable[[int], int | None] | None = None,
        *,
        eval_only_device: bool = False,
    ) -> None:
        """Raise :class:`Rejected` unless ``msg`` may be folded into this round.

        ``eval_only_device``: ``msg`` is the evaluation-only report of a device whose status
        says it never trains; it holds no training slot, so the selection does not apply.

        The update's codec must be the one the round asked for (``bad_codec``).
        ``check_tensors`` validates shapes and codec against the model (it runs after the
        round checks and before the examples cap, as in docs/protocol.md). With a
        ``staleness`` rule, ``base_of(round_id)`` is the base version an earlier round was
        opened on (None: no such round): an update of an earlier round must name it.
        """
        p = self.plan
        if p.staleness is None:
            check_route(msg, topic_device, self.fleet, open_round=p.round_id, epoch=p.epoch)
            if msg.base_version != p.base_version:
                raise Rejected(
                    f"base version {msg.base_version}: round {p.round_id} trains on "
                    f"version {p.base_version}",
                    RejectReason.WRONG_BASE,
                )
        else:
            self._check_stale(msg, topic_device, p.staleness, base_of)
        if self._selected and msg.device not in self._selected and not eval_only_device:
            raise Rejected(
                f"device {msg.device!r} is not selected for round {p.round_id}",
                RejectReason.NOT_SELECTED,
            )
        if msg.update_id in self._update_ids:
            raise Rejected(
                f"update {msg.update_id!r} was already accepted", RejectReason.DUPLICATE
            )
        if msg.device in self._devices:
            if p.staleness is not None:  # another update id of an earlier round: not a copy
                raise Rejected(
                    f"device {msg.device!r} already has an update in the buffer of round "
                    f"{p.round_id}: one update per device per buffer, train on the next model",
                    RejectReason.WRONG_ROUND,
                )
            raise Rejected(
                f"device {msg.device!r} already contributed to round {p.round_id}",
                RejectReason.DUPLICATE,
            )
        if msg.codec != p.config.codec:
            raise Rejected(
                f"update codec {msg.codec} differs from round {p.round_id}'s codec "
                f"{p.config.codec}",
                RejectReason.BAD_CODEC,
            )
        if check_tensors is not None:
            check_tensors(msg)
        if (self.max_claimed_examples is not None
                and msg.num_examples > self.max_claimed_examples):
            raise Rejected(
                f"num_examples {msg.num_examples} exceeds the cap of {self.max_claimed_examples}",
                RejectReason.MALFORMED,
            )

    def _check_stale(
        self,
        msg: UpdateMessage,
        topic_device: str | None,
        rule: StalenessRule,
        base_of: Callable[[int], int | None] | None,
    ) -> None:
        """The round and base checks of a buffer: this round or an earlier one whose base is
        at most ``rule.max_staleness`` versions behind (``wrong_base_version`` otherwise)."""
        p = self.plan
        check_route(msg, topic_device, self.fleet, epoch=p.epoch)
        if msg.round_id > p.round_id:
            raise Rejected(
                f"future round {msg.round_id}: round {p.round_id} is open",
                RejectReason.WRONG_ROUND,
            )
        rule.staleness(p.base_version, msg.base_version)
        base = p.base_version if msg.round_id == p.round_id else (
            None if base_of is None else base_of(msg.round_id)
        )
        if base is None:
            raise Rejected(
                f"round {msg.round_id} is unknown: round {p.round_id} is open",
                RejectReason.WRONG_ROUND,
            )
        if msg.base_version != base:
            raise Rejected(
                f"base version {msg.base_version}: round {msg.round_id} trained on "
                f"version {base}",
                RejectReason.WRONG_BASE,
            )

    def weight_factor(self, msg: UpdateMessage) -> float:
        """The staleness factor of a checked update's fold weight (1.0 without a rule)."""
        rule = self.plan.staleness
        if rule is None:
            return 1.0
        return rule.factor(self.plan.base_version - msg.base_version)

    def record(self, update_id: str, device: str, num_examples: int) -> None:
        """Count an accepted update (call after it was journaled and folded)."""
        if update_id in self._update_ids or device in self._devices:
            raise StateError(f"update {update_id!r} of {device!r} is already recorded")
        if num_examples < 1:
            raise StateError(f"num_examples must be >= 1, got {num_examples}")
        self._update_ids.add(update_id)
        self._devices.add(device)
        self.num_examples += num_examples

    def all_selected_in(self) -> bool:
        return bool(self._selected) and self._selected <= self._devices

    @property
    def refused(self) -> frozenset[str]:
        return frozenset(self._refused)

    def refuse(self, device: str) -> bool:
        """Note that a selected device's update was finally rejected; True when newly noted
        (a device not selected, or already in, changes nothing)."""
        if device not in self._selected or device in self._devices or device in self._refused:
            return False
        self._refused.add(device)
        return True

    def all_selected_answered(self) -> bool:
        """Every selected device is in or was finally rejected: nothing more will come."""
        return bool(self._selected) and self._selected <= (self._devices | self._refused)


def check_route(
    msg: UpdateMessage,
    topic_device: str | None,
    fleet: str | None = None,
    *,
    open_round: int | None = None,
    last_round: int | None = None,
    epoch: str | None = None,
) -> None:
    """The fleet/device/round check, in the order of docs/protocol.md; raise :class:`Rejected`.

    Only what is given is checked, in this order: ``fleet`` (``wrong_fleet``), then the
    payload device against the broker-authenticated ``topic_device`` (``device_mismatch``),
    then the round: with ``open_round`` the update must be for it (``wrong_round``, stale or
    future); with ``last_round`` instead, no round is open, so every update is refused
    (``round_closed`` for a round up to ``last_round``, else ``wrong_round``). With ``epoch``,
    an update that names another epoch is ``wrong_round`` before its round id is compared
    (round ids restart in a new epoch); an update without an epoch is checked by round id.
    """
    if fleet is not None and msg.fleet != fleet:
        raise Rejected(
            f"update is for fleet {msg.fleet!r}, this is {fleet!r}", RejectReason.WRONG_FLEET
        )
    if topic_device is not None and msg.device != topic_device:
        raise Rejected(
            f"payload device {msg.device!r} differs from topic device {topic_device!r}",
            RejectReason.DEVICE_MISMATCH,
        )
    if epoch is not None and msg.epoch and msg.epoch != epoch:
        raise Rejected(
            f"update is for epoch {msg.epoch!r} (round {msg.round_id}), the aggregator is in "
            f"epoch {epoch!r}" + ("" if open_round is None else f" (round {open_round} is open)"),
            RejectReason.WRONG_ROUND,
        )
    if open_round is not None:
        if msg.round_id != open_round:
            when = "stale" if msg.round_id < open_round else "future"
            raise Rejected(
                f"{when} round {msg.round_id}: round {open_round} is open",
                RejectReason.WRONG_ROUND,
            )
    elif last_round is not None:
        if msg.round_id <= last_round:
            raise Rejected(f"round {msg.round_id} is closed", RejectReason.ROUND_CLOSED)
        raise Rejected(f"round {msg.round_id} is not open", RejectReason.WRONG_ROUND)


def select_devices(online: Iterable[str], k: int, seed: int, round_id: int) -> tuple[str, ...]:
    """A seeded sample of ``k`` of the ``online`` devices (all of them when fewer), sorted.

    Deterministic in (set of devices, k, seed, round_id); independent of iteration order.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    pool = sorted(set(online))
    if k >= len(pool):
        return tuple(pool)
    rng = random.Random(f"fedmq-select:{seed}:{round_id}")
    return tuple(sorted(rng.sample(pool, k)))
