"""FedNova selectable: steps on the wire, the streaming NormalizedSum, the ingest handing
each update's steps to it (also on a re-fold after a restart), and the config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.update.codecs import encode_delta
from fedmq.update.normalized import NormalizedSum
from fedmq.update.strategies import (
    FedNova,
    StepsDelta,
    StrategyOptions,
    fednova_delta,
    make_strategy,
)
from fedmq.wire import MAX_STEPS, TrainingConfig, UpdateMessage, decode_update, encode
from tests.fakes import make_update

T0 = 1_000.0
TEMPLATE = {"w": (3, 4), "b": (4,)}


def _msg(steps: int = 0) -> UpdateMessage:
    delta = {"w": np.ones((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    return UpdateMessage(
        fleet="f", round_id=1, base_version=0, device="d", update_id="u", num_examples=5,
        codec="float32", tensors=encode_delta(delta, "float32", np.random.default_rng(0)),
        steps=steps,
    )


# ------------------------------------------------------------------------------ wire
def test_steps_round_trip_and_stay_off_the_wire_when_unset() -> None:
    assert decode_update(encode(_msg(7))).steps == 7
    assert decode_update(encode(_msg(MAX_STEPS))).steps == MAX_STEPS
    bare = msgpack.unpackb(encode(_msg()), raw=False)
    assert "steps" not in bare  # older messages keep their bytes
    assert decode_update(encode(_msg())).steps == 0


@pytest.mark.parametrize("bad", [0, -1, MAX_STEPS + 1, True, 2.0, "3", [1]])
def test_steps_are_decoded_strictly(bad: object) -> None:
    obj = msgpack.unpackb(encode(_msg(3)), raw=False)
    obj["steps"] = bad
    with pytest.raises(WireError, match="steps"):
        decode_update(msgpack.packb(obj, use_bin_type=True))


# ------------------------------------------------------------------------------ accumulator
def _deltas(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(size=s).astype(np.float32) for n, s in TEMPLATE.items()}


def test_normalized_sum_streams_fednova_delta() -> None:
    ups = [StepsDelta(_deltas(s), float(n), t) for s, n, t in ((0, 10, 1), (1, 30, 7),
                                                                 (2, 5, 40), (3, 55, 3))]
    acc = NormalizedSum(TEMPLATE)
    for u in ups:
        acc.fold_steps(encode_delta(u.delta, "float32", np.random.default_rng(0)), "float32",
                       u.weight, u.steps)
    want = fednova_delta(ups)
    got = acc.result()
    assert (got.count, got.total_weight) == (4, 100.0)
    assert acc.tau_eff == pytest.approx((10 * 1 + 30 * 7 + 5 * 40 + 55 * 3) / 100)
    for n in TEMPLATE:
        np.testing.assert_allclose(got.mean[n], want[n], rtol=1e-5, atol=1e-6)
    # equal steps: FedAvg's weighted mean exactly as the formula says
    same = NormalizedSum(TEMPLATE)
    for u in ups:
        same.fold_steps(encode_delta(u.delta, "float32", np.random.default_rng(0)),
                        "float32", u.weight, 4)
    mean = {n: sum(u.weight * u.delta[n] for u in ups) / 100 for n in TEMPLATE}
    for n in TEMPLATE:
        np.testing.assert_allclose(same.result().mean[n], mean[n], rtol=1e-5, atol=1e-6)


def test_normalized_sum_merges_and_serialises() -> None:
    a, b, whole = NormalizedSum(TEMPLATE), NormalizedSum(TEMPLATE), NormalizedSum(TEMPLATE)
    for acc, seed, n, t in ((a, 0, 4, 2), (b, 1, 8, 16)):
        for target in (acc, whole):
            target.fold_steps(encode_delta(_deltas(seed), "float32", np.random.default_rng(0)),
                              "float32", n, t)
    a.merge(b)
    back = NormalizedSum.from_bytes(a.to_bytes(), TEMPLATE)
    for n in TEMPLATE:
        np.testing.assert_array_equal(a.result().mean[n], whole.result().mean[n])
        np.testing.assert_array_equal(back.result().mean[n], whole.result().mean[n])
    assert back.tau_eff == whole.tau_eff == (4 * 2 + 8 * 16) / 12


def test_normalized_sum_refuses_an_update_without_steps() -> None:
    acc = NormalizedSum(TEMPLATE)
    tensors = encode_delta(_deltas(0), "float32", np.random.default_rng(0))
    with pytest.raises(Exception, match="step count") as info:
        acc.check(tensors, "float32", 1.0)
    assert getattr(info.value, "code", None) == RejectReason.MALFORMED
    with pytest.raises(Exception, match="step count"):
        acc.check_steps(tensors, "float32", 1.0, 0)


# ------------------------------------------------------------------------------ ingest
@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def _ingest(store: Store) -> Ingest:
    cfg = AggregatorConfig(fleet="f", state_dir=store.root, eval_dataset="none",
                           codec="float32", strategy="fednova", max_update_bytes=64 * 1024)
    metrics = AggregatorMetrics()
    return Ingest(cfg, store, TEMPLATE, RoundTraffic(metrics), metrics)


def _open(store: Store, ingest: Ingest) -> None:
    plan = RoundPlan(round_id=1, base_version=0, selected=(), target=3, min_updates=1,
                     opened_at=T0, deadline=T0 + 60, abandon_at=T0 + 90,
                     config=TrainingConfig(codec="float32"))
    store.create_round(1, 0, plan.to_json(), T0)
    ingest.begin(RoundState("f", plan, 1000), FedNova().new_accumulator(TEMPLATE))


ONES = {n: np.ones(s, np.float32) for n, s in TEMPLATE.items()}


def test_fednova_round_through_the_ingest_gives_the_exact_weights(store: Store) -> None:
    """Device a: 100 examples, 2 steps, delta 1; device b: 300 examples, 4 steps, delta 3,
    both real encoded messages through the ingest."""
    ingest = _ingest(store)
    _open(store, ingest)
    updates = (("a", 100, 2, 1.0), ("b", 300, 4, 3.0))
    for dev, n, steps, value in updates:
        delta = {k: v * np.float32(value) for k, v in ONES.items()}
        ack = ingest.handle_update(dev, make_update("f", 1, 0, dev, delta, n, steps=steps), T0)
        assert ack.accepted, ack.reason
    # p = (0.25, 0.75), tau_eff = 0.25*2 + 0.75*4 = 3.5,
    # step = 3.5 * (0.25 * 1/2 + 0.75 * 3/4) = 3.5 * 0.6875 = 2.40625 (FedAvg: 2.5)
    strategy = make_strategy("fednova", options=StrategyOptions(server_lr=1.0))
    fold = ingest.end()
    new = strategy.aggregate({k: np.zeros_like(v) for k, v in ONES.items()}, fold.result())
    for k in TEMPLATE:
        np.testing.assert_allclose(new[k], np.full(TEMPLATE[k], 2.40625, np.float32),
                                   rtol=1e-6)
    # the journal keeps the example weight; the steps travel in the journaled payload
    assert [e.weight for e in store.journal(1)] == [100.0, 300.0]


def test_fednova_round_refuses_an_update_without_steps(store: Store) -> None:
    ingest = _ingest(store)
    _open(store, ingest)
    ack = ingest.handle_update("a", make_update("f", 1, 0, "a", ONES, 10), T0)
    assert (ack.accepted, ack.code) == (False, RejectReason.MALFORMED)
    assert "step count" in ack.reason
    assert list(store.journal(1)) == []


def test_fednova_refold_after_a_restart_gives_the_same_step(store: Store) -> None:
    first = _ingest(store)
    _open(store, first)
    for dev, n, steps, seed in (("a", 7, 3, 0), ("b", 11, 9, 1), ("c", 2, 1, 2)):
        payload = make_update("f", 1, 0, dev, _deltas(seed), n, steps=steps)
        assert first.handle_update(dev, payload, T0).accepted
    want = first.end().result().mean
    second = _ingest(store)  # a new process over the same state directory
    plan = RoundPlan.from_json(store.open_round().plan)  # type: ignore[union-attr]
    second.begin(RoundState("f", plan, 1000), FedNova().new_accumulator(TEMPLATE))
    assert second.refold() == 3
    assert second.fold is not None
    for k in TEMPLATE:
        np.testing.assert_array_equal(second.fold.result().mean[k], want[k])


# ------------------------------------------------------------------------------ config
def test_fednova_is_selectable_and_refuses_buffering_wrappers(tmp_path: Path) -> None:
    cfg = AggregatorConfig(fleet="f", state_dir=tmp_path, eval_dataset="none",
                           strategy="fednova")
    assert isinstance(cfg.strategy_options(), StrategyOptions)
    assert isinstance(make_strategy("fednova"), FedNova)
    with pytest.raises(ConfigError, match="not supported together"):
        AggregatorConfig(fleet="f", state_dir=tmp_path, eval_dataset="none",
                         strategy="fednova", clip_updates="adaptive")
    with pytest.raises(ConfigError, match="not supported together"):
        make_strategy("fednova", options=StrategyOptions(zero_outliers_k=3.0))
