"""The coordinator with a scripted round policy: it opens, closes and abandons as told."""

from __future__ import annotations

import logging
from collections.abc import Iterator
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
from aggregator.policies import RoundContext
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import RejectReason, StateError
from fedmq.models.spec import ModelBundle
from fedmq.wire import StatusMessage, decode_model, decode_round, encode
from tests.fakes import exact_delta, make_update, model_weights

T0 = 1_000.0


class Scripted:
    """A round policy whose answers the test sets; it records what it was asked."""

    def __init__(self) -> None:
        self.open = True
        self.ready = False
        self.abandon = False
        self.round_shift = 0
        self.asked: list[RoundContext] = []

    def plan(self, ctx: RoundContext) -> RoundPlan | None:
        self.asked.append(ctx)
        if not self.open:
            return None
        return RoundPlan(
            round_id=ctx.round_id + self.round_shift, base_version=ctx.base_version,
            selected=(), target=5, min_updates=1, opened_at=ctx.now, deadline=ctx.now + 60,
            abandon_at=ctx.now + 90, config=ctx.training,
        )

    def is_ready(self, state: RoundState, now: float) -> bool:
        return self.ready

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        return self.abandon


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def _coordinator(store: Store, bundle: ModelBundle, policy: Scripted) -> Coordinator:
    cfg = AggregatorConfig(fleet="f", state_dir=store.root, eval_dataset="none",
                           codec="float32", max_update_bytes=64 * 1024)
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    metrics = AggregatorMetrics()
    ingest = Ingest(cfg, store, template, RoundTraffic(metrics), metrics)
    return Coordinator(cfg, store, bundle, ingest, policy=policy)


def test_opens_only_when_the_policy_plans_a_round(store: Store, bundle: ModelBundle) -> None:
    policy = Scripted()
    policy.open = False
    coord = _coordinator(store, bundle, policy)
    out = coord.start(T0)
    assert [o.topic for o in out] == ["fl/f/model"] and store.open_round() is None
    coord.on_status("a", encode(StatusMessage(fleet="f", device="a", state="online")), T0)
    policy.open = True
    [ann] = [decode_round(o.payload) for o in coord.tick(T0 + 1)]
    assert (ann.round_id, ann.base_version, ann.min_updates) == (1, 0, 1)
    last = policy.asked[-1]
    assert (last.round_id, last.base_version, last.online, last.now) == (
        1, 0, frozenset({"a"}), T0 + 1
    )
    assert coord.ingest.round is coord.round and store.open_round() is not None


def test_a_plan_for_another_round_is_refused(store: Store, bundle: ModelBundle) -> None:
    policy = Scripted()
    policy.round_shift = 1
    coord = _coordinator(store, bundle, policy)
    with pytest.raises(StateError, match="planned round 2 on version 0, expected round 1"):
        coord.start(T0)
    assert store.open_round() is None


def test_close_takes_the_accumulator_back(store: Store, bundle: ModelBundle) -> None:
    policy = Scripted()
    coord = _coordinator(store, bundle, policy)
    out = coord.start(T0)
    w0 = model_weights(decode_model(out[0].payload))
    announced = len(out[1].payload)
    delta = exact_delta(coord.template, 3)
    payload = make_update("f", 1, 0, "a", delta, 2)
    ack = coord.ingest.handle_update("a", payload, T0 + 1)
    ack_out = coord.ingest.ack_outgoing(ack)
    assert ack.accepted and ack_out is not None
    assert coord.tick(T0 + 2) == []  # the policy says: not yet
    policy.ready = True
    out = coord.tick(T0 + 3)
    model = decode_model(out[0].payload)
    for name, value in model_weights(model).items():
        np.testing.assert_array_equal(value, w0[name] + delta[name])
    [res] = coord.pop_results()
    assert (res.status, res.version, res.participants, res.num_examples) == ("closed", 1, 1, 2)
    assert res.bytes_in == len(payload)
    assert res.bytes_out == announced + len(ack_out.payload) + len(out[0].payload)
    assert coord.round is not None and coord.round.round_id == 2 and coord.round.count == 0
    assert coord.ingest.round is coord.round


def test_abandon_when_the_policy_says_so(store: Store, bundle: ModelBundle) -> None:
    policy = Scripted()
    coord = _coordinator(store, bundle, policy)
    coord.start(T0)
    policy.abandon = True
    out = coord.tick(T0 + 5)
    assert [(r.round_id, r.base_version) for r in map(decode_round, (o.payload for o in out))] \
        == [(2, 0)]
    [res] = coord.pop_results()
    assert (res.round_id, res.status, res.version) == (1, "abandoned", None)
    assert store.round(1).status == "abandoned"
    late = make_update("f", 1, 0, "a", exact_delta(coord.template, 0), 1)
    assert coord.ingest.handle_update("a", late, T0 + 6).code == RejectReason.WRONG_ROUND


def _status(device: str, **caps: Any) -> bytes:
    return encode(StatusMessage(fleet="f", device=device, state="online", capabilities=caps))


def test_only_devices_supporting_the_rounds_codec_are_offered(
    store: Store, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    policy = Scripted()
    policy.open = False
    coord = _coordinator(store, bundle, policy)  # the round's codec: float32
    coord.start(T0)
    coord.on_status("new", _status("new", codecs=["float32", "int4"]), T0)
    coord.on_status("old", _status("old"), T0)  # no `codecs`: float32/float16/int8
    coord.on_status("tiny", _status("tiny", codecs=["int4", "topk-int8"]), T0)
    coord.on_status("bad", _status("bad", codecs="float32"), T0)  # not a list
    caplog.set_level(logging.INFO, logger="aggregator.coordinator")
    caplog.clear()
    policy.asked.clear()  # start() asked with nobody online
    for t in range(3):  # three ticks of the same (unopened) round 1
        coord.tick(T0 + 1 + t)
    assert [ctx.online for ctx in policy.asked] == [frozenset({"new", "old"})] * 3
    lines = [r.getMessage() for r in caplog.records if "not selecting" in r.getMessage()]
    assert lines == ["round 1: not selecting bad, tiny: no support for codec float32"]
    coord.on_status("tiny", _status("tiny", codecs=["float32"]), T0 + 5)
    policy.open = True
    coord.tick(T0 + 6)
    assert policy.asked[-1].online == frozenset({"new", "old", "tiny"})
