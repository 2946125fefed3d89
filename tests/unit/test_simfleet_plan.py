"""The simulated fleet's plan: every choice a pure function of the seed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedmq.errors import ConfigError
from fedmq.signing import Registry
from fedmq.update import codecs
from fedmq_ops.simfleet import Arrival, FleetPlan, FleetSpec, ShardSettings, enroll_fleet
from fedmq_ops.simfleet.shard import Shard

SHAPES = {"w": (8, 4), "b": (4,)}


def test_dropout_is_an_exact_count_chosen_afresh_each_round() -> None:
    plan = FleetPlan(1000, seed=3, dropout=0.1)
    r1, r2 = plan.dropped(1), plan.dropped(2)
    assert len(r1) == len(r2) == 100 and r1 != r2
    assert r1 <= set(plan.device_ids())
    assert len(plan.senders(1)) == 900 and not set(plan.senders(1)) & r1
    assert FleetPlan(1000, seed=3, dropout=0.1).dropped(1) == r1  # same seed, same choice
    assert FleetPlan(10, dropout=0.0).dropped(1) == frozenset()


def test_shards_partition_the_fleet() -> None:
    plan = FleetPlan(10)
    shards = [plan.shard(i, 3) for i in range(3)]
    assert sorted(d for s in shards for d in s) == plan.device_ids()
    assert [len(s) for s in shards] == [4, 3, 3]
    with pytest.raises(ConfigError):
        plan.shard(3, 3)


def test_arrivals() -> None:
    assert Arrival.parse("at-once") == Arrival("at-once")
    spread = Arrival.parse("spread:30")
    assert spread == Arrival("spread", 30.0) and str(spread) == "spread:30"
    for bad in ("spread", "spread:x", "soon", "at-once:3", "spread:-1"):
        with pytest.raises(ConfigError):
            Arrival.parse(bad)
    plan = FleetPlan(50, arrival=spread)
    offsets = [plan.offset(d, 1) for d in plan.device_ids()]
    assert all(0 <= o <= 30 for o in offsets) and len(set(offsets)) == 50
    assert FleetPlan(5).offset("sim-00001", 1) == 0.0


def test_a_resend_rebuilds_the_same_update() -> None:
    plan = FleetPlan(4, seed=9, examples=(5, 7))
    a = plan.encoded_delta("sim-00001", 2, SHAPES, "int8")
    b = plan.encoded_delta("sim-00001", 2, SHAPES, "int8")
    assert a == b and a != plan.encoded_delta("sim-00001", 3, SHAPES, "int8")
    assert plan.update_id("sim-00001", "e", 2) == plan.update_id("sim-00001", "e", 2)
    assert plan.update_id("sim-00001", "e", 2) != plan.update_id("sim-00001", "f", 2)
    assert all(5 <= plan.num_examples(d, 1) <= 7 for d in plan.device_ids())
    assert {t.name: t.shape for t in a} == {"w": (8, 4), "b": (4,)}


def test_expected_mean_is_the_weighted_mean_of_what_is_sent() -> None:
    plan = FleetPlan(3, seed=1)
    devices = plan.device_ids()
    mean = plan.expected_mean(devices, 1, SHAPES, "float32")
    weights = [plan.num_examples(d, 1) for d in devices]
    deltas = [plan.synthetic_delta(d, 1, SHAPES) for d in devices]
    for name in SHAPES:
        want = sum(w * d[name].astype(np.float64) for w, d in zip(weights, deltas, strict=True))
        np.testing.assert_allclose(mean[name], want / sum(weights), rtol=1e-12)
    # int8: the mean of the dequantized tensors, not of the raw deltas
    q = plan.expected_mean(devices, 1, SHAPES, "int8")
    t = plan.encoded_delta(devices[0], 1, SHAPES, "int8")
    assert codecs.decode_tensor(t[0], "int8").shape == SHAPES[t[0].name]
    assert not np.array_equal(q["w"], mean["w"])


def test_enrolment_writes_every_key_once(tmp_path: Path) -> None:
    plan = FleetPlan(25, seed=2)
    reg = tmp_path / "devices.json"
    assert enroll_fleet(plan, reg) == 25
    assert enroll_fleet(plan, reg) == 0
    assert Registry(reg).devices() == {d: plan.key(d).public_hex for d in plan.device_ids()}
    with pytest.raises(ConfigError, match="another key"):
        enroll_fleet(FleetPlan(25, seed=3), reg)


def test_spec_round_trips_through_json() -> None:
    spec = FleetSpec(
        FleetPlan(40, seed=4, dropout=0.2, arrival=Arrival("spread", 2.5), examples=(2, 3)),
        ShardSettings(port=1234, fleet="x", passwords={"sim-00001": "pw"}, sign=True,
                      brokers=("n1:1883", "n2:1884")), 3,
    )
    assert FleetSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ConfigError):
        FleetSpec(FleetPlan(2), ShardSettings(), 3)


def test_devices_spread_over_the_brokers_by_id() -> None:
    plan = FleetPlan(300, seed=1)
    brokers = ("127.0.0.1:4001", "127.0.0.1:4002", "127.0.0.1:4003")
    shard = Shard(plan, plan.device_ids(), ShardSettings(brokers=brokers))
    again = Shard(plan, plan.device_ids()[::-1], ShardSettings(brokers=brokers))
    chosen = {d.id: shard._broker(d) for d in shard.devices}
    assert chosen == {d.id: again._broker(d) for d in again.devices}  # by id, not position
    counts = Counter(port for _, port in chosen.values())
    assert set(counts) == {4001, 4002, 4003} and min(counts.values()) > 60
    plain = Shard(plan, plan.device_ids()[:3], ShardSettings(host="h", port=9))
    assert {plain._broker(d) for d in plain.devices} == {("h", 9)}
