"""The ingest alone (no coordinator): checks, journal, fold and acks of one open round."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import RejectReason, StateError
from fedmq.update.accumulate import WeightedSum
from fedmq.wire import TrainingConfig, decode_ack
from tests.fakes import exact_delta, make_update

T0 = 1_000.0
TEMPLATE = {"w": (3, 4), "b": (4,)}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def _ingest(store: Store) -> Ingest:
    cfg = AggregatorConfig(fleet="f", state_dir=store.root, eval_dataset="none",
                           codec="float32", max_update_bytes=64 * 1024)
    metrics = AggregatorMetrics()
    return Ingest(cfg, store, TEMPLATE, RoundTraffic(metrics), metrics)


def _open(store: Store, ingest: Ingest, round_id: int = 1) -> RoundState:
    plan = RoundPlan(round_id=round_id, base_version=0, selected=(), target=3, min_updates=1,
                     opened_at=T0, deadline=T0 + 60, abandon_at=T0 + 90,
                     config=TrainingConfig(codec="float32"))
    store.create_round(round_id, 0, plan.to_json(), T0)
    state = RoundState("f", plan, 100)
    ingest.begin(state, WeightedSum(TEMPLATE))
    return state


def test_folds_journals_and_hands_back_the_exact_sum(store: Store) -> None:
    ingest = _ingest(store)
    state = _open(store, ingest)
    deltas = [exact_delta(TEMPLATE, s) for s in range(2)]
    payloads = [make_update("f", 1, 0, f"d{i}", d, n, update_id=f"u{i}")
                for i, (d, n) in enumerate(zip(deltas, (1, 3), strict=True))]
    for i, payload in enumerate(payloads):
        ack = ingest.handle_update(f"d{i}", payload, T0 + 1)
        assert (ack.accepted, ack.code, ack.update_id) == (True, "ok", f"u{i}")
    assert [e.update_id for e in store.journal(1)] == ["u0", "u1"]
    assert (state.count, state.num_examples) == (2, 4)
    assert ingest.traffic.bytes_in == sum(len(p) for p in payloads)
    fold = ingest.end()
    for name in TEMPLATE:
        want = (deltas[0][name] + 3 * deltas[1][name]) / np.float32(4)
        np.testing.assert_array_equal(fold.mean()[name], want)
    assert ingest.round is None and ingest.fold is None
    # the round has ended in the ingest: the same device's next update is refused
    late = ingest.handle_update("d0", make_update("f", 1, 0, "d0", deltas[0], 1), T0 + 2)
    assert (late.accepted, late.code, late.round_id) == (False, RejectReason.ROUND_CLOSED, 1)
    assert len(list(store.journal(1))) == 2


def test_without_an_open_round_every_update_is_refused_in_order(store: Store) -> None:
    ingest = _ingest(store)
    ingest.last_round_id = 4
    d = exact_delta(TEMPLATE, 0)
    codes = [
        ingest.handle_update("a", make_update(fleet, rid, 0, dev, d, 1), T0).code
        for fleet, rid, dev in (("g", 9, "b"), ("f", 9, "b"), ("f", 4, "a"), ("f", 5, "a"))
    ]
    assert codes == [RejectReason.WRONG_FLEET, RejectReason.DEVICE_MISMATCH,
                     RejectReason.ROUND_CLOSED, RejectReason.WRONG_ROUND]
    assert store.reject_counts(4) == {
        RejectReason.WRONG_FLEET: 1, RejectReason.DEVICE_MISMATCH: 1,
        RejectReason.ROUND_CLOSED: 1, RejectReason.WRONG_ROUND: 1,
    }
    out = ingest.ack_outgoing(ingest.handle_update("a", b"\x00junk", T0))
    assert out is not None and out.topic == "fl/f/ack/a" and not out.retain
    assert decode_ack(out.payload).code == RejectReason.MALFORMED
    assert ingest.traffic.bytes_out == len(out.payload)


def test_refold_restores_count_and_sum_after_a_restart(store: Store) -> None:
    first = _ingest(store)
    _open(store, first)
    deltas = [exact_delta(TEMPLATE, 10 + s) for s in range(2)]
    for i, d in enumerate(deltas):
        assert first.handle_update(f"d{i}", make_update("f", 1, 0, f"d{i}", d, 2), T0).accepted
    want = first.end().mean()
    second = _ingest(store)  # a new process over the same state directory
    plan = RoundPlan.from_json(store.open_round().plan)  # type: ignore[union-attr]
    second.begin(RoundState("f", plan, 100), WeightedSum(TEMPLATE))
    assert second.refold() == 2
    assert second.round is not None and second.round.devices == {"d0", "d1"}
    assert second.fold is not None
    for name in TEMPLATE:
        np.testing.assert_array_equal(second.fold.mean()[name], want[name])
    dup = second.handle_update("d0", make_update("f", 1, 0, "d0", deltas[0], 2), T0)
    assert dup.code == RejectReason.DUPLICATE


def test_one_open_round_at_a_time(store: Store) -> None:
    ingest = _ingest(store)
    state = _open(store, ingest)
    with pytest.raises(StateError, match="still open"):
        ingest.begin(state, WeightedSum(TEMPLATE))
    ingest.end()
    with pytest.raises(StateError, match="no open round"):
        ingest.end()
    with pytest.raises(StateError, match="no open round"):
        ingest.refold()
