"""Federated evaluation: the report's strict decoding, the combine arithmetic, the ingest
keeping one report per device of the round's base model (also eval-only reports, across a
restart), and the device's held-out split."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.evaluation import RoundEvaluations, set_gauges
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from edge_agent.config import AgentConfig
from edge_agent.evaluation import device_evaluation
from fedmq.data.datasets import Dataset
from fedmq.data.local import LocalData
from fedmq.errors import ConfigError, DataError, RejectReason, WireError
from fedmq.evaluation import EvalReport, combine
from fedmq.update.accumulate import WeightedSum
from fedmq.wire import TrainingConfig, UpdateMessage, decode_update, encode
from tests.fakes import exact_delta, make_update

T0 = 1_000.0
TEMPLATE = {"w": (3, 4), "b": (4,)}


# ------------------------------------------------------------------------------ report
def test_report_round_trips_and_decodes_strictly() -> None:
    r = EvalReport(0.5, 0.75, 40, 0.25, 0.875)
    assert EvalReport.from_map(r.to_map()) == r
    assert EvalReport.from_map(EvalReport(1.0, 0.5, 3).to_map()).personal_loss is None
    for bad, why in (
        ({"loss": 0.1, "accuracy": 0.5}, "count"),
        ({"loss": 0.1, "accuracy": 0.5, "count": True}, "count"),
        ({"loss": 0.1, "accuracy": 0.5, "count": 0}, "count"),
        ({"loss": 0.1, "accuracy": 1.01, "count": 3}, "accuracy"),
        ({"loss": float("inf"), "accuracy": 0.5, "count": 3}, "finite"),
        ({"loss": -1.0, "accuracy": 0.5, "count": 3}, "loss"),
        ({"loss": 0.1, "accuracy": 0.5, "count": 3, "personal_loss": 0.1}, "personal"),
        ({"loss": 0.1, "accuracy": 0.5, "count": 3, "extra": 1}, "unknown"),
        ([0.1, 0.5, 3], "map"),
    ):
        with pytest.raises(ValueError, match=why):
            EvalReport.from_map(bad)


def _update(evaluation: object = None, tensors: bool = True) -> bytes:
    msg = UpdateMessage(
        fleet="f", round_id=1, base_version=0, device="d", update_id="u", num_examples=5,
        codec="float32", tensors=(), evaluation=EvalReport(0.5, 0.5, 2),
    )
    obj = msgpack.unpackb(encode(msg), raw=False)
    if evaluation is not None:
        obj["eval"] = evaluation
    if not tensors:
        obj.pop("eval")
    return bytes(msgpack.packb(obj, use_bin_type=True))


def test_update_eval_field_is_strict_and_required_without_tensors() -> None:
    assert decode_update(_update()).evaluation == EvalReport(0.5, 0.5, 2)
    with pytest.raises(WireError, match="eval"):
        decode_update(_update({"loss": 0.5, "accuracy": 2.0, "count": 2}))
    with pytest.raises(WireError, match="without tensors") as info:
        decode_update(_update(tensors=False))
    assert info.value.code == RejectReason.SHAPE


# ------------------------------------------------------------------------------ combine
def test_combine_weights_by_count_and_spreads_across_devices() -> None:
    got = combine([
        EvalReport(1.0, 0.5, 10, 0.5, 0.75),
        EvalReport(2.0, 0.25, 30),
        EvalReport(0.5, 1.0, 60, 0.25, 1.0),
    ])
    assert got["fed_loss"] == pytest.approx((10 * 1.0 + 30 * 2.0 + 60 * 0.5) / 100)
    assert got["fed_accuracy"] == pytest.approx((5 + 7.5 + 60) / 100)
    assert (got["fed_accuracy_min"], got["fed_accuracy_median"], got["fed_accuracy_max"]) == (
        0.25, 0.5, 1.0)
    assert (got["fed_eval_examples"], got["fed_eval_devices"]) == (100.0, 3.0)
    # personalized figures only over the devices that trained (10 and 60 examples)
    assert got["fed_personal_accuracy"] == pytest.approx((7.5 + 60) / 70)
    assert got["fed_personal_loss"] == pytest.approx((5 + 15) / 70)
    assert got["fed_personal_accuracy_median"] == pytest.approx(0.875)
    assert combine([]) == {}


def test_round_keeps_one_report_per_device_of_its_base_model() -> None:
    ev = RoundEvaluations(base_version=4, round_id=5)
    tensors_msg = UpdateMessage("f", 5, 4, "a", "u1", 1, "float32", (),
                                evaluation=EvalReport(1.0, 0.5, 10))
    assert ev.note(tensors_msg)
    assert ev.note(UpdateMessage("f", 5, 4, "a", "u2", 1, "float32", (),
                                 evaluation=EvalReport(1.0, 0.75, 10)))  # replaces a's
    assert not ev.note(UpdateMessage("f", 3, 2, "b", "u3", 1, "float32", (),
                                     evaluation=EvalReport(1.0, 0.0, 10)))  # older model
    assert not ev.note(UpdateMessage("f", 5, 4, "c", "u4", 1, "float32", ()))
    figures = ev.figures()
    assert (figures["fed_accuracy"], figures["fed_eval_devices"]) == (0.75, 1.0)
    assert figures["fed_eval_version"] == 4.0
    metrics = AggregatorMetrics()
    set_gauges(metrics, figures)
    assert metrics.value("fedmq_federated_accuracy", {"model": "global", "stat": "mean"}) == 0.75
    assert metrics.value("fedmq_federated_eval_devices") == 1.0


# ------------------------------------------------------------------------------ ingest
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


def _begin(store: Store, ingest: Ingest, create: bool = True) -> None:
    plan = RoundPlan(round_id=1, base_version=0, selected=(), target=3, min_updates=1,
                     opened_at=T0, deadline=T0 + 60, abandon_at=T0 + 90,
                     config=TrainingConfig(codec="float32"))
    if create:
        store.create_round(1, 0, plan.to_json(), T0)
    ingest.begin(RoundState("f", plan, 1000), WeightedSum(TEMPLATE))


def _eval_only(device: str, report: EvalReport, base: int = 0) -> bytes:
    return encode(UpdateMessage("f", 1, base, device, f"e-{device}", report.count, "float32",
                                (), evaluation=report))


def test_ingest_combines_training_and_eval_only_reports_across_a_restart(
    store: Store,
) -> None:
    first = _ingest(store)
    _begin(store, first)
    trained = make_update("f", 1, 0, "a", exact_delta(TEMPLATE, 0), 8,
                          evaluation=EvalReport(0.5, 0.5, 20, 0.25, 0.75))
    assert first.handle_update("a", trained, T0).accepted
    ack = first.handle_update("e", _eval_only("e", EvalReport(1.5, 0.25, 60)), T0)
    assert (ack.accepted, ack.code) == (True, "ok") and "nothing folded" in ack.reason
    stale = first.handle_update("x", _eval_only("x", EvalReport(1.0, 1.0, 5), base=3), T0)
    assert (stale.accepted, stale.code) == (False, RejectReason.WRONG_BASE)
    # the eval-only report is neither journaled nor counted towards the round's target
    assert [e.device for e in store.journal(1)] == ["a"]
    assert first.round is not None and first.round.count == 1
    want = first.evaluations.figures()
    assert want["fed_accuracy"] == pytest.approx((0.5 * 20 + 0.25 * 60) / 80)
    assert want["fed_personal_accuracy"] == 0.75 and want["fed_eval_devices"] == 2.0
    first.end()
    second = _ingest(store)  # a restart: the journal and the meta table bring them back
    _begin(store, second, create=False)
    assert second.refold() == 1
    assert second.evaluations.figures() == want
    # a resent eval-only report is a duplicate (accepted, changes nothing): counted once
    again = second.handle_update("e", _eval_only("e", EvalReport(0.1, 0.99, 60)), T0)
    assert (again.accepted, again.code) == (True, RejectReason.DUPLICATE)
    assert second.evaluations.figures() == want


# ------------------------------------------------------------------------------ device
def _data(n: int = 50) -> LocalData:
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    return LocalData(Dataset(x, (np.arange(n) % 3).astype(np.int32), 3, "toy"), seed=7,
                     client_index=2)


def test_heldout_split_is_disjoint_reproducible_and_never_trained_on() -> None:
    train, held = _data().split_heldout(0.2)
    assert (len(train), len(held)) == (40, 10)
    rows = {tuple(r) for r in train.dataset.x}
    assert rows.isdisjoint({tuple(r) for r in held.x})
    assert len(rows | {tuple(r) for r in held.x}) == 50
    _, again = _data().split_heldout(0.2)
    np.testing.assert_array_equal(held.x, again.x)
    for r in range(5):  # the rounds draw only from the training part
        x, _ = train.round_batch(r)
        assert {tuple(v) for v in x} <= rows
    with pytest.raises(DataError):
        _data(1).split_heldout(0.2)


def test_agent_eval_settings(tmp_path: Path) -> None:
    data = _data()
    cfg = AgentConfig(state_dir=tmp_path, eval_fraction=0.1)
    train, ev = device_evaluation(cfg, data)
    assert ev is not None and (len(train), ev.count, ev.personal) == (45, 5, True)
    train, ev = device_evaluation(AgentConfig(state_dir=tmp_path, eval_only=True), data)
    assert train is data and ev is not None and ev.eval_only and ev.count == 50
    assert device_evaluation(AgentConfig(state_dir=tmp_path), data) == (data, None)
    with pytest.raises(ConfigError, match="eval_fraction"):
        AgentConfig(state_dir=tmp_path, eval_fraction=0.9)
    with pytest.raises(ConfigError, match="eval_only"):
        AgentConfig(state_dir=tmp_path, eval_only=True, eval_fraction=0.1)
