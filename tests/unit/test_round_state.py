"""Pure round state: plan validation, checks with the right reject codes, selection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.round_state import RoundPlan, RoundState, check_route, select_devices
from fedmq.errors import Rejected, RejectReason, StateError, WireError
from fedmq.wire import Tensor, TrainingConfig, UpdateMessage


def _plan(selected: tuple[str, ...] = (), target: int = 3, min_updates: int = 2) -> RoundPlan:
    return RoundPlan(
        round_id=5, base_version=4, selected=selected, target=target, min_updates=min_updates,
        opened_at=100.0, deadline=160.0, abandon_at=200.0,
        config=TrainingConfig(codec="float32"),
    )


def _msg(device: str = "d1", update_id: str = "u1", **kw: Any) -> UpdateMessage:
    fields: dict[str, object] = {
        "fleet": "f", "round_id": 5, "base_version": 4, "device": device,
        "update_id": update_id, "num_examples": 10, "codec": "float32",
        "tensors": (Tensor.from_array("w", np.zeros(2, np.float32)),),
    }
    fields.update(kw)
    return UpdateMessage(**fields)  # type: ignore[arg-type]


def _code(state: RoundState, msg: UpdateMessage, topic: str | None = None) -> str:
    with pytest.raises(Rejected) as info:
        state.check(msg, topic)
    assert info.value.reason
    return info.value.code


def test_accepts_a_good_update_and_records_it() -> None:
    s = RoundState("f", _plan())
    s.check(_msg(), "d1")
    s.record("u1", "d1", 10)
    assert s.count == 1 and s.num_examples == 10 and s.devices == {"d1"}


@pytest.mark.parametrize(
    ("kw", "topic", "code"),
    [
        ({"fleet": "g"}, "d1", RejectReason.WRONG_FLEET),
        ({}, "d2", RejectReason.DEVICE_MISMATCH),
        ({"round_id": 4}, "d1", RejectReason.WRONG_ROUND),
        ({"round_id": 6}, "d1", RejectReason.WRONG_ROUND),
        ({"base_version": 3}, "d1", RejectReason.WRONG_BASE),
    ],
)
def test_reject_codes(kw: dict[str, Any], topic: str, code: str) -> None:
    assert _code(RoundState("f", _plan()), _msg(**kw), topic) == code


def test_order_fleet_before_round() -> None:
    assert _code(RoundState("f", _plan()), _msg(fleet="g", round_id=1), "d1") == "wrong_fleet"


@pytest.mark.parametrize(
    ("kw", "args", "code"),
    [
        # the signature path: the payload device against the topic's, nothing else
        ({"fleet": "g", "round_id": 99}, {"topic_device": "d1"}, None),
        ({"fleet": "g"}, {"topic_device": "d2"}, RejectReason.DEVICE_MISMATCH),
        # fleet first, then device, then round
        ({"fleet": "g"}, {"topic_device": "d2", "fleet": "f", "open_round": 6},
         RejectReason.WRONG_FLEET),
        ({"round_id": 99}, {"topic_device": "d2", "fleet": "f", "open_round": 6},
         RejectReason.DEVICE_MISMATCH),
        ({}, {"topic_device": "d1", "fleet": "f", "open_round": 6}, RejectReason.WRONG_ROUND),
        ({}, {"topic_device": "d1", "fleet": "f", "open_round": 5}, None),
        # no round open: up to the last round it is closed, later ones are not open
        ({}, {"topic_device": "d1", "fleet": "f", "last_round": 5}, RejectReason.ROUND_CLOSED),
        ({}, {"topic_device": "d1", "fleet": "f", "last_round": 4}, RejectReason.WRONG_ROUND),
        ({"fleet": "g"}, {"topic_device": "d1", "fleet": "f", "last_round": 4},
         RejectReason.WRONG_FLEET),
    ],
)
def test_check_route_order(kw: dict[str, Any], args: dict[str, Any], code: str | None) -> None:
    msg = _msg(**kw)
    topic = args.pop("topic_device", None)
    if code is None:
        check_route(msg, topic, **args)
        return
    with pytest.raises(Rejected) as info:
        check_route(msg, topic, **args)
    assert info.value.code == code and info.value.reason


def test_not_selected_and_duplicates() -> None:
    s = RoundState("f", _plan(selected=("d1", "d2"), target=2))
    assert _code(s, _msg(device="d3"), "d3") == RejectReason.NOT_SELECTED
    s.check(_msg(), "d1")
    s.record("u1", "d1", 10)
    assert _code(s, _msg(), "d1") == RejectReason.DUPLICATE  # same update id
    assert _code(s, _msg(update_id="u2"), "d1") == RejectReason.DUPLICATE  # same device
    with pytest.raises(StateError):
        s.record("u1", "d2", 1)


def test_examples_cap_and_tensor_check_order() -> None:
    calls: list[str] = []

    def check_tensors(m: UpdateMessage) -> None:
        calls.append(m.update_id)
        raise WireError("bad shape", RejectReason.SHAPE)

    s = RoundState("f", _plan(), max_claimed_examples=5)
    with pytest.raises(Rejected) as info:
        s.check(_msg(num_examples=6), "d1", check_tensors)
    assert info.value.code == RejectReason.SHAPE and calls == ["u1"]
    assert _code(s, _msg(num_examples=6), "d1") == RejectReason.MALFORMED
    s.check(_msg(num_examples=5), "d1")


def test_plan_validation_and_json_roundtrip() -> None:
    p = _plan(selected=("a", "b"), target=2)
    assert RoundPlan.from_json(p.to_json()) == p
    ann = p.announcement("f", "m@1")
    assert ann.round_id == 5 and ann.selected == ("a", "b") and ann.min_updates == 2
    with pytest.raises(ValueError):
        _plan(target=1, min_updates=2)
    with pytest.raises(ValueError):
        _plan(selected=("a",), target=1, min_updates=2)
    with pytest.raises(ValueError):
        RoundPlan(1, 0, (), 1, 1, 10.0, 5.0, 20.0, TrainingConfig())
    with pytest.raises(StateError):
        RoundPlan.from_json({"round_id": 1})


@settings(max_examples=100, deadline=None)
@given(
    devices=st.sets(st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), max_size=30),
    k=st.integers(0, 40),
    seed=st.integers(0, 2**31),
    round_id=st.integers(0, 10_000),
)
def test_select_devices_properties(devices: set[str], k: int, seed: int, round_id: int) -> None:
    chosen = select_devices(devices, k, seed, round_id)
    assert len(chosen) == min(k, len(devices))
    assert set(chosen) <= devices and len(set(chosen)) == len(chosen)
    assert list(chosen) == sorted(chosen)
    assert select_devices(sorted(devices, reverse=True), k, seed, round_id) == chosen


def test_select_devices_varies_by_round() -> None:
    pool = [f"d{i}" for i in range(50)]
    picks = {select_devices(pool, 5, 1, r) for r in range(20)}
    assert len(picks) > 10
    with pytest.raises(ValueError):
        select_devices(pool, -1, 0, 0)
