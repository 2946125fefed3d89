"""FixedPointSum: exact whatever the order and sharding; serialisation; exact removal."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.errors import Rejected, WireError
from fedmq.tensor import Tensor
from fedmq.update.accumulate import WeightedSum
from fedmq.update.codecs import get_codec
from fedmq.update.fixedpoint import FixedPointSum

SHAPES = {"w": (16, 8), "b": (8,)}


def _updates(n: int, seed: int = 0) -> list[tuple[tuple[Tensor, ...], str, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        delta = {k: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 2)).astype(np.float32)
                 for k, s in SHAPES.items()}
        codec = ("float32", "float16", "int8")[i % 3]
        tensors = get_codec(codec).encode(delta, rng).tensors
        out.append((tuple(tensors), codec, float(rng.integers(1, 500))))
    return out


def _sum(updates: list[tuple[tuple[Tensor, ...], str, float]]) -> FixedPointSum:
    acc = FixedPointSum(SHAPES)
    for tensors, codec, w in updates:
        acc.fold(tensors, codec, w)
    return acc


def _same(a: FixedPointSum, b: FixedPointSum) -> None:
    ra, rb = a.result(), b.result()
    assert (ra.count, ra.total_weight) == (rb.count, rb.total_weight)
    for n in SHAPES:
        assert ra.mean[n].tobytes() == rb.mean[n].tobytes()
        assert np.array_equal(a.digest_sums()[n], b.digest_sums()[n])


def test_order_and_sharding_do_not_change_a_bit() -> None:
    ups = _updates(60)
    one = _sum(ups)
    rng = np.random.default_rng(1)
    for shards in (2, 3, 7):
        order = rng.permutation(len(ups))
        parts = [_sum([ups[i] for i in order[k::shards]]) for k in range(shards)]
        merged = FixedPointSum(SHAPES)
        for p in reversed(parts):
            merged.merge(FixedPointSum.from_bytes(p.to_bytes(), SHAPES))
        _same(one, merged)
    # and the float32 WeightedSum does differ when sharded (why the fixed point exists)
    ws_one, ws_a, ws_b = WeightedSum(SHAPES), WeightedSum(SHAPES), WeightedSum(SHAPES)
    for i, (t, c, w) in enumerate(ups):
        ws_one.fold(t, c, w)
        (ws_a if i % 2 else ws_b).fold(t, c, w)
    ws_a.merge(ws_b)
    assert any(not np.array_equal(ws_one.result().mean[n], ws_a.result().mean[n])
               for n in SHAPES)


def test_mean_is_close_to_the_float64_mean() -> None:
    ups = _updates(20)
    acc = _sum(ups)
    ref = {n: np.zeros(s) for n, s in SHAPES.items()}
    total = 0.0
    for tensors, codec, w in ups:
        for t in tensors:
            ref[t.name] += w * get_codec(codec).decode(t).astype(np.float64)
        total += w
    for n in SHAPES:
        np.testing.assert_allclose(acc.result().mean[n], ref[n] / total, rtol=1e-5, atol=1e-6)


def test_remove_takes_an_update_back_exactly() -> None:
    ups = _updates(5)
    acc = _sum(ups[:4])
    before = acc.to_bytes()
    checked = acc.check(*ups[4])
    acc.add(checked)
    acc.remove(checked)
    assert acc.count == 4
    assert acc.digest_sums()["w"].tobytes() == FixedPointSum.from_bytes(
        before, SHAPES).digest_sums()["w"].tobytes()
    assert acc.total_weight == sum(w for _, _, w in ups[:4])


def test_overflow_is_refused_before_it_is_added() -> None:
    acc = FixedPointSum(SHAPES)
    big = {k: np.full(s, 6e4, np.float32) for k, s in SHAPES.items()}
    tensors = get_codec("float32").encode(big, np.random.default_rng(0)).tensors
    with pytest.raises(Rejected, match="fixed-point"):
        acc.fold(tensors, "float32", 1e7)
    assert acc.count == 0


def test_damaged_bytes_are_a_wire_error() -> None:
    data = _sum(_updates(3)).to_bytes()
    for bad in (data[:-9], b"\x00" + data[1:], data.replace(b"scale_bits", b"scale_bitz")):
        with pytest.raises(WireError):
            FixedPointSum.from_bytes(bad, SHAPES)
    with pytest.raises(WireError):
        FixedPointSum.from_bytes(data, {"w": (16, 8), "b": (9,)})


def test_a_sum_beyond_its_declared_bound_is_a_wire_error() -> None:
    """A partial read back (a site gateway's, from the network) whose integers exceed the bound
    it declares would wrap the int64 additions of a merge: refused when read."""
    import msgpack

    acc = _sum(_updates(40))
    assert FixedPointSum.from_bytes(acc.to_bytes(), SHAPES).count == 40  # real sums fit
    for _ in range(30):  # removals keep the bound and the sums consistent
        tensors, codec, w = _updates(1, seed=9)[0]
        checked = acc.check(tensors, codec, w)
        acc.add(checked)
        acc.remove(checked)
    FixedPointSum.from_bytes(acc.to_bytes(), SHAPES)
    obj = msgpack.unpackb(acc.to_bytes(), raw=False)
    big = np.full(8, 2**62, np.int64)
    obj["sum"]["b"] = big.astype("<i8").tobytes()
    with pytest.raises(WireError, match="exceeds its bound"):
        FixedPointSum.from_bytes(msgpack.packb(obj, use_bin_type=True), SHAPES)


def test_a_scaled_update_folds_its_delta_times_the_factor_and_its_full_weight() -> None:
    from fedmq.update.accumulate import scaled

    (tensors, codec, w), = _updates(1, seed=3)
    acc = FixedPointSum(SHAPES)
    acc.add(scaled(acc.check(tensors, codec, w), 0.25))
    assert acc.total_weight == w  # the clip shrinks the delta, never the weight
    decoded = {t.name: get_codec(codec).decode(t) for t in tensors}
    for n in SHAPES:
        want = np.rint(decoded[n].astype(np.float64) * (w * 0.25 * 2**24)) / (w * 2**24)
        np.testing.assert_array_equal(acc.result().mean[n], want.astype(np.float32))
