"""The ``fedbuff`` round policy: staleness rule, the policy's plan and readiness, and the real
coordinator + ingest over a real state directory folding stale updates with exact weights,
refusing too-stale ones with a reason, and re-folding an open buffer exactly after a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.bundles import resolve_bundle
from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.policies import FEDBUFF_HORIZON, FedBuffRounds, RoundContext
from aggregator.round_state import RoundPlan, RoundState
from aggregator.staleness import StalenessRule
from aggregator.store import Store
from fedmq.errors import ConfigError, Rejected, RejectReason
from fedmq.models.spec import ModelBundle
from fedmq.wire import TrainingConfig, decode_model, decode_round
from tests.fakes import exact_delta, make_update, model_weights

T0 = 1_000.0


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none",
        "codec": "float32", "round_policy": "fedbuff", "buffer_size": 2, "max_staleness": 1,
        "staleness_exponent": 1.0, "weight_cap_multiplier": 0.0,
        "max_update_bytes": 64 * 1024,
    }
    base.update(kw)
    return AggregatorConfig(**base)


# -- the staleness rule ----------------------------------------------------------------------
def test_staleness_factor_exact_numbers() -> None:
    half = StalenessRule(max_staleness=5)  # the default exponent 0.5
    assert [half.factor(s) for s in (0, 1, 3, 8)] == [1.0, 2**-0.5, 0.5, 1 / 3]
    assert StalenessRule(5, exponent=1.0).factor(3) == 0.25
    assert StalenessRule(5, exponent=0.0).factor(4) == 1.0  # no weighting
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        half.factor(-1)


def test_staleness_bounds_and_reasons() -> None:
    rule = StalenessRule(max_staleness=2)
    assert rule.staleness(7, 7) == 0 and rule.staleness(7, 5) == 2
    with pytest.raises(Rejected) as stale:
        rule.staleness(7, 4)
    assert stale.value.code == RejectReason.WRONG_BASE
    assert stale.value.reason == (
        "stale: base version 4 is 3 version(s) behind the current version 7 (max_staleness 2)"
    )
    with pytest.raises(Rejected, match="newer than the current version 7") as future:
        rule.staleness(7, 8)
    assert future.value.code == RejectReason.WRONG_BASE
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessRule(-1)
    with pytest.raises(ValueError, match="exponent"):
        StalenessRule(1, exponent=float("nan"))


def test_config_keys_are_validated(tmp_path: Path) -> None:
    for bad in ({"buffer_size": 0}, {"max_staleness": -1}, {"staleness_exponent": -0.5},
                {"flush_after": float("inf")}):
        with pytest.raises(ConfigError):
            _config(tmp_path, **bad)


# -- the policy ------------------------------------------------------------------------------
def _ctx(now: float = 100.0) -> RoundContext:
    return RoundContext(round_id=5, base_version=4, online=frozenset(), now=now,
                        training=TrainingConfig())


def test_plan_opens_at_once_for_any_device_and_round_trips(tmp_path: Path) -> None:
    policy = FedBuffRounds(_config(tmp_path, buffer_size=3, max_staleness=4))
    plan = policy.plan(_ctx())  # nobody online: a buffer waits for no one
    assert (plan.round_id, plan.base_version, plan.selected) == (5, 4, ())
    assert (plan.target, plan.min_updates) == (3, 1)
    assert plan.deadline == plan.abandon_at == 100.0 + FEDBUFF_HORIZON
    assert plan.staleness == StalenessRule(4, 1.0)
    assert RoundPlan.from_json(plan.to_json()) == plan
    ann = plan.announcement("f")
    assert (ann.round_id, ann.base_version, ann.selected) == (5, 4, ())


def test_ready_every_k_and_never_abandoned_with_updates(tmp_path: Path) -> None:
    policy = FedBuffRounds(_config(tmp_path, buffer_size=2))
    state = RoundState("f", policy.plan(_ctx()))
    assert not policy.is_ready(state, 1e6) and not policy.is_abandoned(state, 1e6)
    state.record("u1", "a", 1)
    assert not policy.is_ready(state, 1e6) and not policy.is_abandoned(state, 1e12)
    state.record("u2", "b", 1)
    assert policy.is_ready(state, 100.0)


def test_flush_after_applies_a_partial_buffer_and_keeps_an_empty_one(tmp_path: Path) -> None:
    policy = FedBuffRounds(_config(tmp_path, buffer_size=3, flush_after=30.0))
    empty = RoundState("f", policy.plan(_ctx()))
    assert empty.plan.deadline == 100.0 + FEDBUFF_HORIZON  # devices never see it as past
    assert not policy.is_ready(empty, 1e6) and not policy.is_abandoned(empty, 1e6)
    empty.record("u1", "a", 1)  # the first update after 30 s: applied at the next tick
    assert policy.is_ready(empty, 1e6)
    one = RoundState("f", policy.plan(_ctx()))
    one.record("u1", "a", 1)
    assert not policy.is_ready(one, 129.9) and policy.is_ready(one, 130.0)
    assert not policy.is_abandoned(one, 1e12)


# -- coordinator + ingest --------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


def _services(cfg: AggregatorConfig, store: Store, bundle: ModelBundle) -> Coordinator:
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    metrics = AggregatorMetrics()
    ingest = Ingest(cfg, store, template, RoundTraffic(metrics), metrics)
    return Coordinator(cfg, store, bundle, ingest)


def _models(out: list[Any]) -> list[Any]:
    return [decode_model(o.payload) for o in out if o.topic == "fl/f/model"]


def test_stale_updates_fold_with_their_weight_and_survive_a_restart(
    tmp_path: Path, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aggregator")
    cfg = _config(tmp_path)  # K = 2, max_staleness 1, factor (1 + s) ** -1
    store = Store(cfg.state_dir)
    coord = _services(cfg, store, bundle)
    assert isinstance(coord.policy, FedBuffRounds)
    out = coord.start(T0)
    w0 = model_weights(_models(out)[0])
    [ann] = [decode_round(o.payload) for o in out if o.topic == "fl/f/round"]
    assert (ann.round_id, ann.base_version, ann.selected) == (1, 0, ())
    shapes = {t.name: t.shape for t in bundle.spec.trainable_specs}
    d = [exact_delta(shapes, s) for s in range(6)]
    send = coord.ingest.handle_update

    # Buffer 1 (version 0): a and b, fresh.
    assert send("a", make_update("f", 1, 0, "a", d[0], 1, update_id="a1"), T0 + 1).accepted
    assert coord.tick(T0 + 2) == []  # one of two: no device is waited for, none is closed
    assert send("b", make_update("f", 1, 0, "b", d[1], 3, update_id="b1"), T0 + 3).accepted
    out = coord.tick(T0 + 4)
    [v1] = _models(out)
    assert [decode_round(o.payload).base_version for o in out if o.topic == "fl/f/round"] == [1]
    w1 = model_weights(v1)
    for name in shapes:
        np.testing.assert_array_equal(w1[name], w0[name] + (d[0][name] + 3 * d[1][name]) / 4)

    # Buffer 2 (version 1): c trained on version 0 (round 1): staleness 1, weight 2 x 1/2.
    ack = send("c", make_update("f", 1, 0, "c", d[2], 2, update_id="c1"), T0 + 5)
    assert (ack.accepted, ack.code, ack.round_id) == (True, "ok", 1)
    note = "staleness 1: weight 2.0 x (1 + 1) ** -1.0 = 1.0, folded into round 2"
    assert ack.reason == note
    assert f"update c1 from c trained on version 0 (round 1): {note}" in caplog.messages
    assert [(e.update_id, e.round_id, e.weight) for e in store.journal(2)] == [("c1", 2, 1.0)]
    # A redelivery is a duplicate of buffer 2, not a second fold.
    dup = send("c", make_update("f", 1, 0, "c", d[2], 2, update_id="c1"), T0 + 6)
    assert (dup.accepted, dup.code, dup.round_id) == (True, RejectReason.DUPLICATE, 2)
    # c again with a newer update in the same buffer: refused with a reason, not a duplicate.
    again = send("c", make_update("f", 2, 1, "c", d[3], 1, update_id="c2"), T0 + 7)
    assert (again.accepted, again.code) == (False, RejectReason.WRONG_ROUND)
    assert "already has an update in the buffer of round 2" in again.reason
    # A base that does not match its round, and a future round.
    lie = send("e", make_update("f", 1, 1, "e", d[3], 1, update_id="e1"), T0 + 8)
    assert (lie.code, lie.reason) == (
        RejectReason.WRONG_BASE, "base version 1: round 1 trained on version 0"
    )
    future = send("e", make_update("f", 3, 1, "e", d[3], 1, update_id="e2"), T0 + 8)
    assert (future.code, future.reason) == (
        RejectReason.WRONG_ROUND, "future round 3: round 2 is open"
    )
    assert coord.ingest.round is not None and coord.ingest.round.count == 1

    # Crash mid-buffer: a new coordinator on the same state re-folds c1 with weight 1.
    store.close()
    store = Store(cfg.state_dir)
    coord = _services(cfg, store, bundle)
    coord.start(T0 + 10)
    assert coord.round is not None and coord.round.round_id == 2 and coord.round.count == 1
    assert [c.weight for c in coord.ingest.contributions] == [1.0]
    send = coord.ingest.handle_update
    assert send("d", make_update("f", 2, 1, "d", d[4], 1, update_id="d2"), T0 + 11).accepted
    [v2] = _models(coord.tick(T0 + 12))
    assert (v2.version, v2.round_id, v2.metrics["participants"]) == (2, 2, 2.0)
    w2 = model_weights(v2)
    for name in shapes:
        np.testing.assert_array_equal(w2[name], w1[name] + (1 * d[2][name] + d[4][name]) / 2)
    assert [c[1] for c in store.contributions(2)] == ["c1", "d2"]

    # Buffer 3 (version 2): round 1 (version 0) is 2 versions behind, max_staleness 1.
    old = send("b", make_update("f", 1, 0, "b", d[5], 1, update_id="b-old"), T0 + 13)
    assert (old.accepted, old.code, old.reason) == (
        False, RejectReason.WRONG_BASE,
        "stale: base version 0 is 2 version(s) behind the current version 2 (max_staleness 1)",
    )
    store.close()


def test_default_exponent_weight_is_journaled_exactly(tmp_path: Path, bundle: ModelBundle) -> None:
    cfg = _config(tmp_path, staleness_exponent=0.5, max_staleness=3, buffer_size=1)
    store = Store(cfg.state_dir)
    coord = _services(cfg, store, bundle)
    coord.start(T0)
    shapes = {t.name: t.shape for t in bundle.spec.trainable_specs}
    send = coord.ingest.handle_update
    assert send("a", make_update("f", 1, 0, "a", exact_delta(shapes, 1), 4), T0).accepted
    coord.tick(T0 + 1)  # version 1, buffer 2
    ack = send("b", make_update("f", 1, 0, "b", exact_delta(shapes, 2), 3, update_id="b1"),
               T0 + 2)
    assert [e.weight for e in store.journal(2)] == [3 * 2**-0.5]
    assert ack.reason == (
        "staleness 1: weight 3.0 x (1 + 1) ** -0.5 = 2.121320343559643, folded into round 2"
    )
    assert float("2.121320343559643") == 3 * 2**-0.5
    store.close()
