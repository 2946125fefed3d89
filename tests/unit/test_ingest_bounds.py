"""One device must not steer the fleet (issue 8, finding 2): the update norm bound and the
capped fold weights, with real encoded updates, the real engine and a real Store."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.bounds import BoundsConfig, FleetBounds, update_norm
from aggregator.config import AggregatorConfig, load_aggregator_config
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq.errors import ConfigError, Rejected, RejectReason, SecurityError
from fedmq.models.spec import ModelBundle
from fedmq.signing import DeviceKey, Registry
from fedmq.update import codecs
from tests.engine_kit import engine_config, published_weights, scaled_delta
from tests.fakes import exact_delta, make_update

T0 = 1_000.0
HONEST = {"h0": 100, "h1": 120, "h2": 80, "h3": 150}  # claimed num_examples


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


ROUND = {"selection": "any", "clients_per_round": 5, "min_updates": 5, "round_timeout": 60.0,
         "abandon_after": 30.0}


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    return engine_config(tmp_path, **(ROUND | kw))


def _flat(w: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(w[n], np.float64).ravel() for n in sorted(w)])


# -- pure pieces ------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", codecs.codec_names())
def test_update_norm_is_the_norm_of_the_decoded_delta(codec: str) -> None:
    rng = np.random.default_rng(3)
    delta = {"w": rng.normal(0, 0.3, (40, 7)).astype(np.float32),
             "b": rng.normal(0, 2.0, (7,)).astype(np.float32), "z": np.zeros(0, np.float32)}
    tensors = codecs.get_codec(codec).encode(delta, rng).tensors
    decoded = codecs.decode_tensors(tensors, codec)
    want = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in decoded.values())))
    assert update_norm(tensors, codec) == pytest.approx(want, rel=1e-6)
    huge = codecs.encode_delta({"w": np.full(10, 3e38, np.float32)}, "float32", rng)
    assert update_norm(huge, "float32") == pytest.approx(3e38 * np.sqrt(10))  # no overflow


def test_adaptive_norm_bound_warm_up_attacker_and_fleet_wide_growth() -> None:
    b = FleetBounds(BoundsConfig(norm_multiplier=3.0, bounds_warmup=3, norm_action="reject"))
    for dev in ("a", "b"):
        b.check_norm(dev, 1.0)
    assert b.norm_limit() is None  # warm-up: two devices known, three needed
    b.check_norm("evil", 1000.0)  # still warming up: accepted (documented)
    b.check_norm("c", 1.0)
    assert b.norm_limit() == (3.0, "3 x median 1 of 4 device(s)")
    with pytest.raises(Rejected) as err:
        b.check_norm("evil", 1000.0)
    assert err.value.code == RejectReason.NORM_BOUND
    assert err.value.reason == (
        "update L2 norm 1000 exceeds the bound 3 (3 x median 1 of 4 device(s))"
    )
    # One entry per device: the attacker's rejected norms do not move the median ...
    for _ in range(5):
        with pytest.raises(Rejected):
            b.check_norm("evil", 1000.0)
    assert b.norm_limit() == (3.0, "3 x median 1 of 4 device(s)")
    # ... but when the honest fleet's norms all grow (a higher lr), it follows them.
    with pytest.raises(Rejected):
        b.check_norm("a", 5.0)  # a, b, c, evil at 5, 1, 1, 1000: median 3
    b.check_norm("b", 5.0)  # under 9: accepted
    assert b.norm_limit() == (15.0, "3 x median 5 of 4 device(s)")
    again = FleetBounds.from_json(b.config, b.to_json())  # the pool survives a restart
    assert again.norm_limit() == b.norm_limit()


def test_fixed_norm_bound_claims_window_and_config_checks() -> None:
    fixed = FleetBounds(BoundsConfig(norm_bound="fixed", max_update_norm=2.0,
                                     norm_action="reject"))
    fixed.check_norm("a", 2.0)
    with pytest.raises(Rejected, match=r"2\.5 exceeds the bound 2 \(max_update_norm\)"):
        fixed.check_norm("a", 2.5)
    off = FleetBounds(BoundsConfig(norm_bound="off", bounds_warmup=1))
    off.check_norm("a", 1.0)
    off.check_norm("b", 1e30)
    assert off.norm_limit() is None
    w = FleetBounds(BoundsConfig(weight_cap_multiplier=2.0, bounds_window=3, bounds_warmup=2))
    assert w.weight("a", 10**7) == 10**7  # warm-up: no claims known
    assert w.weight("a", 500, registry_cap=40) == 40
    for dev, n in (("a", 10), ("b", 30), ("c", 20), ("d", 1000)):
        w.observe_claim(dev, n)  # window 3: "a" drops out
    assert w.weight("x", 10**7) == 2 * 30  # median of b, c, d = 30
    assert w.weight("x", 7) == 7
    with pytest.raises(ValueError):
        BoundsConfig(norm_bound="fixed")
    for bad in ({"norm_bound": "median"}, {"norm_multiplier": 0.5},
                {"weight_cap_multiplier": 0.5}, {"bounds_warmup": 0}, {"norm_action": "drop"},
                {"max_model_weight": float("inf")}, {"max_update_norm": -1.0}):
        with pytest.raises(ConfigError):
            load_aggregator_config(overrides=bad, environ={})


def test_registry_max_weight(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    reg = Registry(path)
    key = DeviceKey.generate().public_hex
    reg.enroll("a", key)
    reg.enroll("b", key)
    data = json.loads(path.read_text())
    data["devices"]["a"]["max_weight"] = 500
    path.write_text(json.dumps(data))
    fresh = Registry(path)
    assert (fresh.max_weight("a"), fresh.max_weight("b")) == (500, None)
    data["devices"]["b"]["max_weight"] = "lots"
    path.write_text(json.dumps(data))
    expected = "device 'b' has max_weight 'lots', expected an integer >= 1"
    with pytest.raises(SecurityError, match=re.escape(expected)):
        Registry(path).devices()


# -- the attack of finding 2, through the real engine ------------------------------------------
def test_one_device_claiming_ten_million_examples_gets_an_honest_share(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    cfg = _config(tmp_path, norm_action="reject")  # the clip case: tests/unit/test_norm_clip.py
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    out = engine.start(T0)
    w0 = published_weights(out)
    shapes = {k: v.shape for k, v in w0.items()}
    # Round 1: the honest fleet (the warm-up of the medians).
    for i, (dev, n) in enumerate(HONEST.items()):
        ack = engine.handle_update(dev, make_update("f", 1, 0, dev, exact_delta(shapes, i), n),
                                   T0 + 1)
        assert ack.accepted
    assert engine.tick(T0 + 2) == [] and engine.pop_results() == []  # five wanted, four in
    honest1 = make_update("f", 1, 0, "h4", exact_delta(shapes, 4), 110)
    assert engine.handle_update("h4", honest1, T0 + 2).accepted
    w1 = published_weights(engine.tick(T0 + 3))
    # Round 2: the attacker goes first, after the warm-up.
    honest = {dev: exact_delta(shapes, 10 + i) for i, dev in enumerate(HONEST)}
    scaled = make_update("f", 2, 1, "evil", scaled_delta(honest["h0"], 1000), 100, update_id="big")
    ack = engine.handle_update("evil", scaled, T0 + 4)
    assert (ack.accepted, ack.code) == (False, RejectReason.NORM_BOUND), ack.reason
    assert ack.reason.startswith("update L2 norm ") and "x median" in ack.reason
    assert engine.metrics.value(
        "fedmq_updates_rejected_total", {"reason": RejectReason.NORM_BOUND}
    ) == 1
    target_delta = exact_delta(shapes, 99)  # an honest-looking norm, aimed at a target
    target = {n: w1[n] + target_delta[n] for n in shapes}
    evil = make_update("f", 2, 1, "evil", target_delta, 10_000_000, update_id="evil-u")
    assert engine.handle_update("evil", evil, T0 + 5).accepted
    for dev, n in HONEST.items():
        payload = make_update("f", 2, 1, dev, honest[dev], n, update_id=f"{dev}-2")
        assert engine.handle_update(dev, payload, T0 + 5).accepted
    cap = 2.0 * 110  # weight_cap_multiplier x median of the claims (100, 120, 80, 150, 110)
    weights = {e.update_id: e.weight for e in engine.store.journal(2)}
    assert weights == {"evil-u": cap, **{f"{d}-2": float(n) for d, n in HONEST.items()}}
    assert engine.metrics.value("fedmq_update_weights_capped_total") == 1
    engine.store.close()  # the process dies before the round closes ...
    engine = Engine(cfg, Store(cfg.state_dir), bundle)  # ... and re-folds the journal
    assert engine.start(T0 + 6, tick=False) and engine.round is not None
    w2 = published_weights(engine.tick(T0 + 7))
    engine.store.close()

    total = cap + sum(HONEST.values())
    for name in shapes:
        honest_sum = sum(n * honest[d][name] for d, n in HONEST.items())
        want = w1[name] + (honest_sum + cap * target_delta[name]) / total
        np.testing.assert_allclose(w2[name], want, rtol=1e-6, atol=1e-6)
    honest_mean = {
        n: w1[n] + sum(k * honest[d][n] for d, k in HONEST.items()) / sum(HONEST.values())
        for n in shapes
    }
    moved = np.linalg.norm(_flat(w2) - _flat(honest_mean))
    span = np.linalg.norm(_flat(target) - _flat(honest_mean))
    # The attacker pulls the model by its capped share of the weight, no more ...
    assert moved / span == pytest.approx(cap / total, rel=1e-4)
    assert cap / total < 0.33
    # ... so the model stays far closer to the honest mean than to the attacker's target.
    assert np.linalg.norm(_flat(w2) - _flat(target)) > 2 * moved


def test_registry_caps_the_fold_weight(tmp_path: Path, bundle: ModelBundle) -> None:
    path = tmp_path / "devices.json"
    reg = Registry(path)
    for dev in ("a", "b"):
        reg.enroll(dev, DeviceKey.generate().public_hex)
    data = json.loads(path.read_text())
    data["devices"]["a"]["max_weight"] = 3
    path.write_text(json.dumps(data))
    cfg = _config(tmp_path, registry=str(path), require_signatures=False, min_updates=2,
                  clients_per_round=2)
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    try:
        w0 = published_weights(engine.start(T0))
        shapes = {k: v.shape for k, v in w0.items()}
        da, db = exact_delta(shapes, 1), exact_delta(shapes, 2)
        assert engine.handle_update("a", make_update("f", 1, 0, "a", da, 1000), T0).accepted
        assert engine.handle_update("b", make_update("f", 1, 0, "b", db, 1), T0).accepted
        w1 = published_weights(engine.tick(T0 + 1))
        for name in shapes:  # weights 3 and 1: exact in float32
            want = w0[name] + (3 * da[name] + db[name]) / np.float32(4)
            np.testing.assert_array_equal(w1[name], want)
        assert engine.store.contributions(1)[0][2] == 1000  # the claim is kept as claimed
    finally:
        engine.store.close()


def test_a_journal_without_the_weight_column_refolds_with_num_examples(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    """State directories of older versions: the column is added, NULL = num_examples."""
    cfg = _config(tmp_path, min_updates=2, clients_per_round=2)
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    w0 = published_weights(engine.start(T0))
    engine.store.close()
    shapes = {k: v.shape for k, v in w0.items()}
    deltas = [exact_delta(shapes, 1), exact_delta(shapes, 2)]
    db = sqlite3.connect(cfg.state_dir / "state.db")
    db.execute("ALTER TABLE journal DROP COLUMN weight")  # the journal of an older version
    for i, n in enumerate((1, 3)):
        payload = make_update("f", 1, 0, f"d{i}", deltas[i], n, update_id=f"u{i}")
        db.execute(
            "INSERT INTO journal (update_id, round_id, device, num_examples, payload, "
            "received_at) VALUES (?, 1, ?, ?, ?, ?)", (f"u{i}", f"d{i}", n, payload, T0),
        )
    db.commit()
    db.close()
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    try:
        engine.start(T0 + 1, tick=False)
        assert [e.weight for e in engine.store.journal(1)] == [None, None]
        w1 = published_weights(engine.tick(T0 + 2))
        for name in shapes:
            want = w0[name] + (deltas[0][name] + 3 * deltas[1][name]) / np.float32(4)
            np.testing.assert_array_equal(w1[name], want)
    finally:
        engine.store.close()


def test_round_bounds_freeze_the_limits_of_fleet_bounds() -> None:
    """The sharded ingest's frozen limits decide like FleetBounds at the moment they froze."""
    from aggregator.bounds import RoundBounds

    pool = FleetBounds(BoundsConfig(bounds_warmup=3))
    assert pool.round_bounds() == RoundBounds("clip", None, None)  # warming up
    for device, norm, claim in (("a", 1.0, 100), ("b", 2.0, 120), ("c", 4.0, 80)):
        pool.observe_norm(device, norm)
        pool.observe_claim(device, claim)
    frozen = RoundBounds.from_json(pool.round_bounds().to_json())
    assert frozen.norm_limit is not None and frozen.norm_limit[0] == 6.0  # 3 x median 2
    assert frozen.weight_cap == 200.0  # 2 x median 100
    for claimed, cap in ((10_000_000, None), (150, 90), (50, None)):
        assert frozen.weight(claimed, cap) == pool.weight("z", claimed, cap)
    assert frozen.check_norm(5.0) == 1.0
    assert 600.0 * frozen.check_norm(600.0) <= 6.0
    with pytest.raises(Rejected, match="exceeds the bound 6"):
        RoundBounds("reject", (6.0, "x"), None).check_norm(6.5)
