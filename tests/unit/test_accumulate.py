"""Aggregation math: the running fold equals the weighted mean; strategies."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum
from fedmq.update.strategies import FedAdam, FedAvg, FedAvgM, make_strategy
from fedmq.wire import Tensor

SHAPES = {"w": (8, 4), "b": (4,)}


def _deltas(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def test_fold_equals_weighted_mean_float32() -> None:
    ds = _deltas(5)
    weights = [10.0, 3.0, 7.0, 1.0, 40.0]
    acc = WeightedSum(SHAPES)
    rng = np.random.default_rng(0)
    for d, w in zip(ds, weights, strict=True):
        acc.fold(codecs.encode_delta(d, "float32", rng), "float32", w)
    mean = acc.mean()
    for k in SHAPES:
        expected = sum(w * d[k] for d, w in zip(ds, weights, strict=True)) / sum(weights)
        np.testing.assert_allclose(mean[k], expected, rtol=1e-5, atol=1e-6)
    assert acc.count == 5 and acc.total_weight == sum(weights)


def test_fold_int8_close_to_mean() -> None:
    ds = _deltas(20, 1)
    acc = WeightedSum(SHAPES)
    rng = np.random.default_rng(0)
    for d in ds:
        acc.fold(codecs.encode_delta(d, "int8", rng), "int8", 1.0)
    exact = {k: np.mean([d[k] for d in ds], axis=0) for k in SHAPES}
    for k in SHAPES:
        step = max(np.abs(d[k]).max() for d in ds) / 127
        assert np.abs(acc.mean()[k] - exact[k]).max() < step


def test_bad_updates_leave_the_sum_untouched() -> None:
    acc = WeightedSum(SHAPES)
    rng = np.random.default_rng(0)
    good = codecs.encode_delta(_deltas(1)[0], "float32", rng)
    acc.fold(good, "float32", 1.0)
    before = {k: v.copy() for k, v in acc.mean().items()}
    wrong_shape = (good[0], Tensor.from_array("b", np.zeros(5, np.float32)))
    missing = (good[0],)
    unknown = (*good, Tensor.from_array("extra", np.zeros(1, np.float32)))
    wrong_dtype = codecs.encode_delta(_deltas(1)[0], "int8", rng)
    for bad, codec, code in [
        (wrong_shape, "float32", RejectReason.SHAPE),
        (missing, "float32", RejectReason.SHAPE),
        (unknown, "float32", RejectReason.SHAPE),
        (wrong_dtype, "float32", RejectReason.BAD_CODEC),
    ]:
        with pytest.raises(WireError) as e:
            acc.fold(bad, codec, 1.0)
        assert e.value.code == code
    assert acc.count == 1
    for k in SHAPES:
        np.testing.assert_array_equal(acc.mean()[k], before[k])
    with pytest.raises(ValueError):
        acc.fold(good, "float32", float("nan"))


def test_strategies() -> None:
    g = {"w": np.ones((2, 2), np.float32)}
    d = {"w": np.full((2, 2), 0.5, np.float32)}
    np.testing.assert_allclose(FedAvg().apply(g, d)["w"], 1.5)
    m = FedAvgM(momentum=0.5)
    w1 = m.apply(g, d)
    w2 = m.apply(w1, d)  # velocity 0.5*0.5 + 0.5 = 0.75
    np.testing.assert_allclose(w2["w"], 1.5 + 0.75)
    restored = FedAvgM(momentum=0.5)
    restored.load_state(m.state())
    np.testing.assert_allclose(restored.apply(w2, d)["w"], m.apply(w2, d)["w"])
    a = FedAdam(server_lr=0.1)
    out = a.apply(g, d)
    assert (out["w"] > 1.0).all()
    assert make_strategy("fedavgm").name == "fedavgm"
    with pytest.raises(ConfigError):
        make_strategy("nope")
