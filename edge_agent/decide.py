"""Pure decision logic: should this device train for an announced round?

No I/O, no clock unless given: the agent calls :func:`decide` with what it knows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edge_agent.state import AgentState
from fedmq.wire import RoundAnnouncement

__all__ = ["Decision", "SkipReason", "decide"]


class SkipReason(StrEnum):
    """Why a device does not train for a round."""

    WRONG_FLEET = "wrong_fleet"
    ALREADY_SUBMITTED = "already_submitted"
    STALE = "stale"
    NOT_SELECTED = "not_selected"
    NO_MODEL = "no_model"


@dataclass(frozen=True)
class Decision:
    """``train`` True, or False with a ``reason`` and a readable ``detail``."""

    train: bool
    reason: SkipReason | None = None
    detail: str = ""

    @property
    def waiting_for_model(self) -> bool:
        """True when the device should train as soon as the base model arrives."""
        return self.reason is SkipReason.NO_MODEL

    def __str__(self) -> str:
        return "train" if self.train else f"skip ({self.reason}): {self.detail}"


def _skip(reason: SkipReason, detail: str) -> Decision:
    return Decision(False, reason, detail)


def decide(
    announcement: RoundAnnouncement,
    device_id: str,
    state: AgentState,
    model_version: int | None,
    *,
    fleet: str | None = None,
    now: float | None = None,
    eval_only: bool = False,
) -> Decision:
    """Decide whether ``device_id`` trains (or, ``eval_only``, evaluates) for ``announcement``.

    ``state`` is the device's durable state (submissions), ``model_version`` the version of
    the global model it holds in memory (None: none yet). ``now`` (wall clock, optional)
    makes a round past its deadline stale. An ``eval_only`` device reports on every round:
    the selection names only training devices (its status says eval_only, so the aggregator
    takes its report unselected, docs/protocol.md).
    """
    ann = announcement
    r = ann.round_id
    if fleet is not None and ann.fleet != fleet:
        return _skip(SkipReason.WRONG_FLEET, f"round {r} is for fleet {ann.fleet!r}, not {fleet!r}")
    previous = state.submitted.get(r)
    if previous is not None:
        return _skip(SkipReason.ALREADY_SUBMITTED, f"update {previous} already sent for round {r}")
    newest = max(state.submitted, default=None)
    if newest is not None and r < newest:
        return _skip(SkipReason.STALE, f"round {r} is older than round {newest} already done")
    if now is not None and now > ann.deadline:
        return _skip(
            SkipReason.STALE, f"round {r} deadline passed {now - ann.deadline:.0f}s ago"
        )
    if model_version is not None and model_version > ann.base_version:
        return _skip(
            SkipReason.STALE,
            f"round {r} is based on version {ann.base_version}, model {model_version} is newer",
        )
    if ann.selected and device_id not in ann.selected and not eval_only:
        return _skip(
            SkipReason.NOT_SELECTED, f"round {r} selected {len(ann.selected)} other device(s)"
        )
    if model_version is None or model_version < ann.base_version:
        have = "no model" if model_version is None else f"model version {model_version}"
        return _skip(
            SkipReason.NO_MODEL,
            f"round {r} needs model version {ann.base_version}, have {have}",
        )
    return Decision(True)
