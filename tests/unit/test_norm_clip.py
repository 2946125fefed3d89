"""An honest device over the norm bound must neither stall nor lose its round (the FMNIST
benchmark finding: a non-IID device with far more data was rejected ``norm_bound`` and the
synchronous round waited 600 s for it).

1. A synchronous round stops waiting for a selected device whose update was finally
   rejected: it closes at once with its quorum, else is abandoned at once (restart-safe).
2. ``norm_action = "clip"`` (the default) folds an update over the bound scaled down to it,
   with every codec and accumulator, the factor journaled so a restart re-folds the same.
Real encoded updates, the real engine and a real Store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.bounds import BoundsConfig, FleetBounds, update_norm
from aggregator.config import AggregatorConfig, load_aggregator_config
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq.errors import ConfigError, RejectReason
from fedmq.models.spec import ModelBundle
from fedmq.update import codecs
from fedmq.update.accumulate import BufferedUpdates, WeightedSum, scaled
from fedmq.update.normalized import NormalizedSum, check_update
from fedmq.wire import StatusMessage, decode_update, encode
from tests.engine_kit import engine_config, published_weights, scaled_delta
from tests.fakes import exact_delta, make_update

T0 = 1_000.0
HONEST = {"h0": 100, "h1": 120, "h2": 80, "h3": 150}


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


ROUND = {"selection": "any", "clients_per_round": 5, "min_updates": 5, "round_timeout": 600.0,
         "abandon_after": 60.0}


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    return engine_config(tmp_path, **(ROUND | kw))


def _decoded(payload: bytes) -> dict[str, np.ndarray]:
    msg = decode_update(payload)
    return codecs.decode_tensors(msg.tensors, msg.codec)


def _norm(d: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in d.values())))


# -- 1. a synchronous round does not wait for a finally rejected device ----------------------
def _sync_engine(tmp_path: Path, bundle: ModelBundle, **kw: Any) -> Engine:
    cfg = _config(tmp_path, selection="sample", clients_per_round=4, min_devices=4,
                  norm_bound="fixed", max_update_norm=500.0, norm_action="reject", **kw)
    return Engine(cfg, Store(cfg.state_dir), bundle)


def _open_sync_round(engine: Engine, restart: bool = False) -> dict[str, tuple[int, ...]]:
    if restart:
        engine.start(T0, tick=False)
    else:
        engine.start(T0)
        for dev in ("a", "b", "c", "d"):
            engine.on_status(dev, encode(StatusMessage(fleet="f", device=dev, state="online")), T0)
        engine.tick(T0)
    assert engine.round is not None and engine.round.plan.selected == ("a", "b", "c", "d")
    return {k: v.shape for k, v in engine.weights.items()}


def test_sync_round_closes_at_once_when_the_missing_device_was_finally_rejected(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    engine = _sync_engine(tmp_path, bundle, min_updates=3)
    shapes = _open_sync_round(engine)
    w0 = engine.weights
    deltas = {dev: exact_delta(shapes, i) for i, dev in enumerate("abc")}
    for dev in "ab":
        assert engine.handle_update(dev, make_update("f", 1, 0, dev, deltas[dev], 10),
                                    T0 + 1).accepted
    big = make_update("f", 1, 0, "d", scaled_delta(deltas["a"], 1000), 10)
    ack = engine.handle_update("d", big, T0 + 2)
    assert (ack.accepted, ack.code) == (False, RejectReason.NORM_BOUND)
    # An answer about another round does not end d's part in this one.
    stale = make_update("f", 7, 0, "c", deltas["c"], 10)
    assert engine.handle_update("c", stale, T0 + 2).code == RejectReason.WRONG_ROUND
    assert engine.tick(T0 + 3) == []  # c has not answered yet
    engine.store.close()  # the process dies: the refusal of d must survive it
    engine = _sync_engine(tmp_path, bundle, min_updates=3)
    _open_sync_round(engine, restart=True)
    assert engine.round is not None and engine.round.refused == {"d"}
    assert engine.handle_update("c", make_update("f", 1, 0, "c", deltas["c"], 10),
                                T0 + 4).accepted
    w1 = published_weights(engine.tick(T0 + 5))  # at once, not at the deadline T0 + 600
    [res] = engine.pop_results()
    assert (res.status, res.participants) == ("closed", 3)
    for name in shapes:  # three equal weights: exact multiples of 1/16 summed, / 3
        want = w0[name] + (deltas["a"][name] + deltas["b"][name] + deltas["c"][name]) \
            * np.float32(10) / np.float32(30)
        np.testing.assert_allclose(w1[name], want, rtol=1e-6, atol=1e-7)
    engine.store.close()


def test_sync_round_without_quorum_is_abandoned_at_once_with_a_reason(
    tmp_path: Path, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _sync_engine(tmp_path, bundle, min_updates=4)
    shapes = _open_sync_round(engine)
    for i, dev in enumerate("abc"):
        assert engine.handle_update(dev, make_update("f", 1, 0, dev, exact_delta(shapes, i), 10),
                                    T0 + 1).accepted
    assert engine.tick(T0 + 2) == []
    big = make_update("f", 1, 0, "d", scaled_delta(exact_delta(shapes, 0), 1000), 10)
    assert engine.handle_update("d", big, T0 + 3).code == RejectReason.NORM_BOUND
    with caplog.at_level(logging.WARNING):
        engine.tick(T0 + 4)
    [res] = engine.pop_results()
    assert (res.status, res.participants) == ("abandoned", 3)
    assert "round 1 abandoned: 3 of 4 required update(s) and every selected device answered " \
        "(1 finally rejected)" in caplog.text
    engine.store.close()


# -- 2. norm_action = "clip" ------------------------------------------------------------------
def test_check_norm_clips_or_rejects() -> None:
    clip = FleetBounds(BoundsConfig(norm_bound="fixed", max_update_norm=2.0))
    assert clip.config.norm_action == "clip"  # the default
    assert clip.check_norm("a", 1.5) == 1.0
    factor = clip.check_norm("a", 8.0)
    assert 8.0 * factor == pytest.approx(2.0, rel=1e-8) and 8.0 * factor <= 2.0
    with pytest.raises(Exception, match="exceeds the bound"):
        clip.check_norm("a", float("inf"))
    reject = FleetBounds(BoundsConfig(norm_bound="fixed", max_update_norm=2.0,
                                      norm_action="reject"))
    with pytest.raises(Exception, match="exceeds the bound 2"):
        reject.check_norm("a", 8.0)
    with pytest.raises(ConfigError):
        load_aggregator_config(overrides={"norm_action": "shrink"}, environ={})


@pytest.mark.parametrize("codec", codecs.codec_names())
def test_a_scaled_fold_is_the_decoded_delta_times_the_factor(codec: str) -> None:
    rng = np.random.default_rng(5)
    shapes = {"w": (30, 6), "b": (6,)}
    delta = {n: rng.normal(0, 0.5, s).astype(np.float32) for n, s in shapes.items()}
    tensors = codecs.get_codec(codec).encode(delta, rng).tensors
    decoded = codecs.decode_tensors(tensors, codec)
    factor = 0.125
    for acc in (WeightedSum(shapes), BufferedUpdates(shapes, 2), NormalizedSum(shapes)):
        acc.add(scaled(check_update(acc, tensors, codec, 4.0, 2), factor))
        acc.add(check_update(acc, tensors, codec, 4.0, 2))
        result = acc.result()
        assert result.total_weight == 8.0  # the clip shrinks the delta, never the weight
        for n in shapes:  # (FedNova: tau_eff / tau_i = 1, the same mean)
            want = decoded[n] * np.float32((1 + factor) / 2)
            np.testing.assert_allclose(result.mean[n], want, rtol=1e-5, atol=1e-7)
        if isinstance(acc, BufferedUpdates):
            assert result.updates is not None
            np.testing.assert_allclose(result.updates[0].delta["w"], decoded["w"] * factor,
                                       rtol=1e-6)
            again = BufferedUpdates.from_bytes(acc.to_bytes(), shapes).result()
            for n in shapes:
                np.testing.assert_array_equal(again.mean[n], result.mean[n])


def test_a_1000x_update_is_clipped_to_the_bound_and_refolded_identically(
    tmp_path: Path, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(tmp_path, codec="int8")  # defaults: adaptive bound, 3 x median, clip
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    w0 = published_weights(engine.start(T0))
    shapes = {k: v.shape for k, v in w0.items()}
    for i, (dev, n) in enumerate({**HONEST, "h4": 110}.items()):  # warm-up of the median
        payload = make_update("f", 1, 0, dev, exact_delta(shapes, i), n, codec="int8")
        assert engine.handle_update(dev, payload, T0 + 1).accepted
    w1 = published_weights(engine.tick(T0 + 2))
    norms = sorted(
        update_norm(decode_update(make_update("f", 1, 0, d, exact_delta(shapes, i), 1,
                                              codec="int8")).tensors, "int8")
        for i, d in enumerate([*HONEST, "h4"])
    )
    bound = 3.0 * norms[2]  # 3 x the median of the five honest norms
    # Round 2: the attacker's update scaled 1000x, then the honest devices.
    payloads = {
        dev: make_update("f", 2, 1, dev, exact_delta(shapes, 10 + i), n, codec="int8",
                         update_id=f"{dev}-2")
        for i, (dev, n) in enumerate(HONEST.items())
    }
    payloads["evil"] = make_update("f", 2, 1, "evil", scaled_delta(exact_delta(shapes, 10), 1000),
                                   100, codec="int8", update_id="big")
    with caplog.at_level(logging.INFO, logger="aggregator.ingest"):
        ack = engine.handle_update("evil", payloads["evil"], T0 + 3)
    assert (ack.accepted, ack.code) == (True, "ok"), ack.reason
    assert "over the bound: delta folded scaled by" in ack.reason
    assert "update big from evil: update L2 norm" in caplog.text
    assert engine.metrics.value("fedmq_updates_clipped_total") == 1
    assert engine.metrics.value(
        "fedmq_updates_rejected_total", {"reason": RejectReason.NORM_BOUND}
    ) == 0
    for dev in HONEST:
        assert engine.handle_update(dev, payloads[dev], T0 + 4).accepted
    scales = {e.update_id: e.scale for e in engine.store.journal(2)}
    big_norm = _norm(_decoded(payloads["evil"]))
    assert {u: s for u, s in scales.items() if u != "big"} == dict.fromkeys(
        (f"{d}-2" for d in HONEST), 1.0)
    assert big_norm * scales["big"] == pytest.approx(bound, rel=1e-6)
    engine.store.close()  # the process dies before the round closes ...
    engine = Engine(cfg, Store(cfg.state_dir), bundle)  # ... and re-folds the journal
    assert engine.start(T0 + 5, tick=False) and engine.round is not None
    limit = engine.ingest.bounds.norm_limit()  # the re-fold moved the median ...
    assert limit is not None and limit[0] != pytest.approx(bound, rel=1e-3)
    w2 = published_weights(engine.tick(T0 + 6))  # ... but the journaled scale is what is re-folded
    engine.store.close()
    weights = {**{f"{d}-2": float(n) for d, n in HONEST.items()}, "big": 100.0}
    devs = {**{f"{d}-2": d for d in HONEST}, "big": "evil"}
    total = sum(weights.values())
    want = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
    for uid, w in weights.items():
        dec = _decoded(payloads[devs[uid]])
        for n in shapes:
            want[n] += w * scales[uid] * dec[n]
    for n in shapes:
        np.testing.assert_allclose(w2[n], w1[n] + want[n] / total, rtol=1e-5, atol=1e-6)
    # The attacker moved the model no more than an honest device at the bound would have.
    evil_move = 100.0 * _norm({n: scales["big"] * _decoded(payloads["evil"])[n]
                               for n in shapes}) / total
    assert evil_move <= 100.0 * bound / total * (1 + 1e-6)
