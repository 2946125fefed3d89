"""Aggregation math: the running fold equals the weighted mean; strategies."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedmq.errors import ConfigError, Rejected, RejectReason, WireError
from fedmq.update import codecs
from fedmq.update.accumulate import Accumulator, BufferedUpdates, WeightedSum
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
        with pytest.raises(Rejected) as e:
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


# ----------------------------------------------------------------------- the seam


def _exact(seed: int) -> dict[str, np.ndarray]:
    """Multiples of 1/16 in [-2, 2]: float32 sums of a few of them are exact."""
    rng = np.random.default_rng(seed)
    return {k: rng.integers(-32, 33, size=s).astype(np.float32) / np.float32(16)
            for k, s in SHAPES.items()}


def _feed(acc: Accumulator, seeds: range, codec: str = "float32") -> None:
    for i in seeds:
        tensors = codecs.encode_delta(_exact(i), codec, np.random.default_rng(i))
        acc.fold(tensors, codec, float(i % 3 + 1))


@pytest.mark.parametrize("kind", ["weighted_sum", "buffered"])
def test_merged_partial_sums_equal_one_accumulator_fed_everything(kind: str) -> None:
    def make() -> WeightedSum | BufferedUpdates:
        return WeightedSum(SHAPES) if kind == "weighted_sum" else BufferedUpdates(SHAPES, 12)

    whole, left, right = make(), make(), make()
    _feed(whole, range(12))
    _feed(left, range(7))
    _feed(right, range(7, 12))
    left.merge(right)  # type: ignore[arg-type]
    assert (left.count, left.total_weight) == (whole.count, whole.total_weight) == (12, 24.0)
    for k in SHAPES:
        np.testing.assert_array_equal(left.result().mean[k], whole.result().mean[k])
    with pytest.raises(ValueError):
        left.merge(WeightedSum({"w": (8, 4)}))  # type: ignore[arg-type]


def test_merge_refuses_sums_that_could_overflow() -> None:
    a, b = WeightedSum({"a": (2,)}), WeightedSum({"a": (2,)})
    huge = [Tensor.from_array("a", np.full(2, 2e38, np.float32))]
    a.fold(huge, "float32", 1.0)
    b.fold(huge, "float32", 1.0)
    with pytest.raises(Rejected) as e:
        a.merge(b)
    assert e.value.code == RejectReason.NON_FINITE
    assert a.count == 1


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_serialised_accumulators_read_back_to_the_same_result(codec: str) -> None:
    for acc in (WeightedSum(SHAPES), BufferedUpdates(SHAPES, 5)):
        _feed(acc, range(5), codec)
        data = acc.to_bytes()
        back = type(acc).from_bytes(data, SHAPES)
        assert (back.count, back.total_weight) == (acc.count, acc.total_weight)
        for k in SHAPES:
            np.testing.assert_array_equal(back.result().mean[k], acc.result().mean[k])
        # ... and keeps accumulating (including its overflow bound)
        _feed(back, range(5, 5 + (1 if isinstance(back, WeightedSum) else 0)), codec)


def test_damaged_serialisations_are_refused() -> None:
    acc = WeightedSum(SHAPES)
    _feed(acc, range(3))
    good = msgpack.unpackb(acc.to_bytes(), raw=False)

    def pack(obj: object) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]

    bad_sum = [dict(t) for t in good["sum"]]
    bad_sum[0]["data"] = np.full(32, 1e6, np.float32).tobytes()  # beyond its bound
    nan_sum = [dict(t) for t in good["sum"]]
    nan_sum[1]["data"] = np.full(4, np.nan, np.float32).tobytes()
    for damaged in [
        b"\xc1", pack([1]), pack({**good, "accumulator": "buffered"}),
        pack({**good, "format": 9}), pack({**good, "shapes": {"w": [8, 4]}}),
        pack({**good, "count": -1}), pack({**good, "count": 0}),
        pack({**good, "total_weight": float("inf")}), pack({**good, "sum": good["sum"][:1]}),
        pack({**good, "sum": bad_sum}), pack({**good, "sum": nan_sum}),
        pack({**good, "bound": {"w": 1.0}}),
    ]:
        with pytest.raises(WireError):
            WeightedSum.from_bytes(damaged, SHAPES)
    with pytest.raises(WireError):
        WeightedSum.from_bytes(acc.to_bytes(), SHAPES, max_bytes=100)
    with pytest.raises(WireError):
        WeightedSum.from_bytes(acc.to_bytes(), {"w": (8, 4)})
    buf = BufferedUpdates(SHAPES, 2)
    _feed(buf, range(2))
    obj = msgpack.unpackb(buf.to_bytes(), raw=False)
    for damaged_obj in [
        {**obj, "capacity": 1},
        {**obj, "updates": [{**obj["updates"][0], "codec": "zip"}]},
        {**obj, "updates": [{**obj["updates"][0], "weight": 0}]},
        {**obj, "updates": [{**obj["updates"][0], "tensors": obj["updates"][0]["tensors"][:1]}]},
    ]:
        with pytest.raises(WireError):
            BufferedUpdates.from_bytes(pack(damaged_obj), SHAPES)


def test_buffer_bound_is_enforced_with_a_clear_error() -> None:
    buf = BufferedUpdates(SHAPES, 2)
    _feed(buf, range(2))
    tensors = codecs.encode_delta(_exact(9), "float32", np.random.default_rng(0))
    with pytest.raises(Rejected) as e:
        buf.check(tensors, "float32", 1.0)
    assert e.value.code == RejectReason.ROUND_CLOSED and "full (2 updates)" in e.value.reason
    assert buf.count == 2
    with pytest.raises(ValueError):
        BufferedUpdates(SHAPES, 0)


def test_a_coordinate_wise_median_fits_over_the_buffer() -> None:
    buf = BufferedUpdates(SHAPES, 5)
    deltas = [_exact(i) for i in range(5)]
    for d in deltas:
        buf.fold(codecs.encode_delta(d, "float32", np.random.default_rng(0)), "float32", 1.0)
    result = buf.result()
    assert result.updates is not None and len(result.updates) == 5
    median = {k: np.median(np.stack([u.delta[k] for u in result.updates]), axis=0)
              for k in SHAPES}
    for k in SHAPES:
        np.testing.assert_array_equal(median[k], np.median(np.stack([d[k] for d in deltas]), 0))


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_fedavg_over_a_buffer_equals_fedavg_over_the_streaming_sum(codec: str) -> None:
    stream, buf = WeightedSum(SHAPES), BufferedUpdates(SHAPES, 6)
    for i, d in enumerate(_deltas(6, 4)):
        tensors = codecs.encode_delta(d, codec, np.random.default_rng(i))
        stream.fold(tensors, codec, float(i + 1))
        buf.fold(tensors, codec, float(i + 1))
    g = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    a, b = FedAvg().aggregate(g, stream.result()), FedAvg().aggregate(g, buf.result())
    for k in SHAPES:
        np.testing.assert_array_equal(a[k], b[k])
    assert stream.result().updates is None


def test_a_checked_update_is_added_by_its_own_accumulator_only() -> None:
    a, b = WeightedSum(SHAPES), WeightedSum(SHAPES)
    tensors = codecs.encode_delta(_exact(1), "float32", np.random.default_rng(0))
    checked = a.check(tensors, "float32", 2.0)
    with pytest.raises(ValueError):
        b.add(checked)
    a.add(checked)
    assert a.count == 1 and a.total_weight == 2.0


def test_check_then_add_re_tests_only_the_bound() -> None:
    # Two updates checked against the same empty sum, each fitting alone: the second add
    # must still refuse what would now overflow.
    acc = WeightedSum({"a": (1,)})
    t = [Tensor.from_array("a", np.full(1, 3e38, np.float32))]
    first, second = acc.check(t, "float32", 1.0), acc.check(t, "float32", 1.0)
    acc.add(first)
    with pytest.raises(Rejected) as e:
        acc.add(second)
    assert e.value.code == RejectReason.NON_FINITE and acc.count == 1


def test_codec_checks_dense_counts_params_and_extra_fields() -> None:
    acc = WeightedSum({"w": (2, 3)})
    short = Tensor("w", "int8", (2, 3), b"\x01" * 5, {"scale": 0.1})
    no_scale = Tensor("w", "int8", (2, 3), b"\x01" * 6)
    surplus = Tensor("w", "int8", (2, 3), b"\x01" * 6, {"scale": 0.1, "zero": 1.0})
    with_extra = Tensor("w", "float32", (2, 3), b"\x00" * 24, extra={"index": b""})
    negative_scale = Tensor("w", "int8", (2, 3), b"\x01" * 6, {"scale": -1.0})
    for t, codec, code in [
        (short, "int8", RejectReason.SHAPE),
        (no_scale, "int8", RejectReason.BAD_CODEC),
        (surplus, "int8", RejectReason.BAD_CODEC),
        (with_extra, "float32", RejectReason.BAD_CODEC),
        (negative_scale, "int8", RejectReason.BAD_CODEC),
        (Tensor("w", "float32", (2, 3), b"\x00" * 24), "zip", RejectReason.BAD_CODEC),
    ]:
        with pytest.raises(Rejected) as e:
            acc.check([t], codec, 1.0)
        assert e.value.code == code, (t, e.value.reason)
    assert acc.count == 0
