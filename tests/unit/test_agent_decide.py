"""decide(): when a device trains for an announced round."""

from __future__ import annotations

import pytest

from edge_agent.decide import SkipReason, decide
from edge_agent.state import AgentState
from fedmq.wire import RoundAnnouncement, TrainingConfig


def ann(round_id: int = 5, base: int = 4, selected: tuple[str, ...] = (),
        deadline: float = 1000.0, fleet: str = "f") -> RoundAnnouncement:
    return RoundAnnouncement(fleet, round_id, base, deadline, TrainingConfig(), selected)


def state(**submitted: str) -> AgentState:
    return AgentState("dev", {int(k[1:]): v for k, v in submitted.items()})


def test_trains_when_selected_with_the_base_model() -> None:
    d = decide(ann(), "dev", state(), 4)
    assert d.train and d.reason is None and str(d) == "train"
    assert decide(ann(selected=("dev", "x")), "dev", state(), 4).train


def test_eval_only_device_reports_on_rounds_that_select_others() -> None:
    """The selection names training devices; an eval-only device evaluates every round (its
    other skip reasons still hold)."""
    assert decide(ann(selected=("other",)), "dev", state(), 4, eval_only=True).train
    stale = decide(ann(selected=("other",)), "dev", state(), 5, eval_only=True)
    assert stale.reason is SkipReason.STALE
    done = decide(ann(selected=("other",)), "dev", state(r5="u"), 4, eval_only=True)
    assert done.reason is SkipReason.ALREADY_SUBMITTED


@pytest.mark.parametrize(
    ("announcement", "st", "version", "reason"),
    [
        (ann(selected=("other",)), state(), 4, SkipReason.NOT_SELECTED),
        (ann(), state(r5="u"), 4, SkipReason.ALREADY_SUBMITTED),
        (ann(), state(), None, SkipReason.NO_MODEL),
        (ann(), state(), 3, SkipReason.NO_MODEL),
        (ann(), state(), 5, SkipReason.STALE),  # the model moved past the round's base
        (ann(round_id=5), state(r7="u"), 4, SkipReason.STALE),  # a later round already done
        (ann(fleet="g"), state(), 4, SkipReason.WRONG_FLEET),
    ],
)
def test_skip_reasons(
    announcement: RoundAnnouncement, st: AgentState, version: int | None, reason: SkipReason
) -> None:
    d = decide(announcement, "dev", st, version, fleet="f")
    assert not d.train
    assert d.reason is reason
    assert d.detail and reason.value in str(d)


def test_deadline_only_counts_with_a_clock() -> None:
    assert decide(ann(deadline=100.0), "dev", state(), 4).train
    d = decide(ann(deadline=100.0), "dev", state(), 4, now=160.0)
    assert d.reason is SkipReason.STALE and "deadline" in d.detail
    assert decide(ann(deadline=100.0), "dev", state(), 4, now=99.0).train


def test_waiting_for_model_flag() -> None:
    assert decide(ann(), "dev", state(), None).waiting_for_model
    assert not decide(ann(selected=("x",)), "dev", state(), None).waiting_for_model
