"""Sparse and low-bit codecs: int4, top-k (f16/int8/int4 values) and stc; their positions
(bitmap or varint gaps), strict checks of received tensors, error feedback on the device
(the residual and what it does over skipped rounds) and the fold without a dense copy."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent.core import encode_with_state
from fedmq import wire
from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum
from fedmq.update.codecs.int4 import Int4
from fedmq.update.codecs.lowbit import pack_nibbles
from fedmq.update.codecs.positions import (
    bitmap_bytes,
    decode_positions,
    encode_positions,
    gaps_bytes,
    varint_decode,
    varint_encode,
)
from fedmq.update.codecs.residual import ROUND_KEY, ResidualPolicy, skipped_rounds, stamp
from fedmq.update.codecs.topk import TopK, topk_count

SPARSE = ("topk-f16", "topk-int8", "topk-int4", "stc")
RNG = np.random.default_rng


def _topk(codec: str, fraction: float) -> TopK:
    impl = codecs.get_codec(codec).configure({"topk_fraction": fraction})
    assert isinstance(impl, TopK)
    return impl


def _wire(codec: str, tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    msg = wire.UpdateMessage("f", 1, 0, "d", "u", 1, codec, tensors)
    return wire.decode_update(wire.encode(msg)).tensors


def _value_error(codec: str, t: Tensor, sent: np.ndarray) -> float:
    """Largest error one sent value may have in ``codec``."""
    if codec == "topk-f16":
        return float(np.abs(sent).max(initial=0.0)) * 2**-10 + 2**-24
    if codec == "stc":
        return math.inf
    return float(t.params["scale"]) * 1.0001 + 1e-30


# -- registry, params --------------------------------------------------------------------------
def test_the_new_codecs_are_registered_and_take_the_fraction_from_the_round() -> None:
    names = codecs.codec_names()
    assert {"int4", *SPARSE} <= set(names)
    assert [codecs.get_codec(c).stateful for c in ("int4", *SPARSE)] == [False] + [True] * 4
    assert wire.TrainingConfig(codec="stc", params={"topk_fraction": 0.05}).codec == "stc"
    delta = {"w": RNG(0).normal(size=(10, 20)).astype(np.float32)}
    for fraction, k in ((0.01, 2), (0.05, 10), (0.1, 20), (1.0, 200)):
        t = _topk("topk-int8", fraction).encode(delta, RNG(0)).tensors[0]
        assert t.params["k"] == k == topk_count(200, fraction)
    assert codecs.get_codec("topk-f16").configure({"lr_decay": 0.5}) is codecs.get_codec(
        "topk-f16")  # params it does not know: unchanged
    for bad in (0.0, 1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="topk_fraction"):
            codecs.get_codec("stc").configure({"topk_fraction": bad})


# -- positions ---------------------------------------------------------------------------------
@given(st.lists(st.integers(0, 2**32 - 1), max_size=50))
@settings(max_examples=200, deadline=None)
def test_varints_round_trip(values: list[int]) -> None:
    data = varint_encode(np.array(values, np.uint64))
    assert varint_decode(data, "x").tolist() == values
    assert len(data) == sum(max(1, math.ceil(v.bit_length() / 7)) for v in values)


@given(st.integers(1, 3000).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n))))
@settings(max_examples=200, deadline=None)
def test_positions_round_trip_in_the_smaller_field(case: tuple[int, set[int]]) -> None:
    n, chosen = case
    pos = np.array(sorted(chosen), np.int64)
    extra = encode_positions(pos, n)
    sizes = {"bitmap": (n + 7) // 8, "gaps": len(gaps_bytes(pos))}
    (field,) = extra
    assert len(extra[field]) == min(sizes.values()) == sizes[field]
    assert decode_positions(extra, n, pos.size, "t").tolist() == pos.tolist()
    other = "gaps" if field == "bitmap" else "bitmap"
    raw = bitmap_bytes(pos, n) if other == "bitmap" else gaps_bytes(pos)
    assert decode_positions({other: raw}, n, pos.size, "t").tolist() == pos.tolist()


def test_the_bitmap_wins_above_about_one_position_in_eight() -> None:
    n = 100_000
    picked = {}
    for density in (0.01, 0.05, 0.1, 0.12, 0.13, 0.2, 0.5):
        pos = np.sort(RNG(1).choice(n, int(density * n), replace=False))
        picked[density] = next(iter(encode_positions(pos, n)))
    assert picked == {0.01: "gaps", 0.05: "gaps", 0.1: "gaps", 0.12: "gaps",
                      0.13: "bitmap", 0.2: "bitmap", 0.5: "bitmap"}


# -- round trips (hypothesis) ------------------------------------------------------------------
_arrays = hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=12),
                     elements=st.floats(-1e3, 1e3, width=32))


@given(x=_arrays, fraction=st.sampled_from([0.01, 0.1, 0.5, 1.0]),
       codec=st.sampled_from(SPARSE))
@settings(max_examples=300, deadline=None)
def test_sparse_round_trip_keeps_the_largest_at_exact_positions(
    x: np.ndarray, fraction: float, codec: str
) -> None:
    impl = _topk(codec, fraction)
    (t,) = _wire(codec, impl.encode({"x": x}, RNG(0)).tensors)
    impl.validate(t, x.shape)
    flat = x.reshape(-1)
    k = topk_count(flat.size, fraction)
    assert t.params["k"] == k
    dec = impl.decode(t).reshape(-1)
    pos = decode_positions(t.extra, flat.size, k, "x")
    mask = np.zeros(flat.size, bool)
    mask[pos] = True
    assert not dec[~mask].any()
    if k < flat.size:  # every value left out is no larger than every value sent
        assert np.abs(flat[~mask]).max(initial=0) <= np.abs(flat[mask]).min(initial=np.inf)
    if codec == "stc":
        mu = np.float32(np.abs(flat[pos]).mean()) if k else np.float32(0)
        np.testing.assert_array_equal(dec[pos], np.where(flat[pos] < 0, -mu, mu))
    else:
        assert np.abs(dec[pos] - flat[pos]).max(initial=0) <= _value_error(codec, t, flat[pos])
    assert impl.bound(t) >= np.abs(dec).max(initial=0)
    want = float(np.dot(dec.astype(np.float64), dec.astype(np.float64)))
    assert impl.squared_norm(t) == pytest.approx(want, rel=1e-6, abs=1e-30)


@given(x=_arrays, block=st.sampled_from([None, 1, 3, 64, 256]))
@settings(max_examples=200, deadline=None)
def test_int4_round_trip_is_within_one_step_of_its_block(x: np.ndarray, block: int | None) -> None:
    impl = Int4(block)
    t = impl.encode_tensor("x", x, RNG(0))
    (t,) = _wire("int4", (t,))
    impl.validate(t, x.shape)
    assert len(t.data) == (x.size + 1) // 2
    dec = impl.decode(t).reshape(-1)
    scales = np.frombuffer(t.extra["scales"], "<f4")
    step = np.repeat(scales, int(t.params["block"]))[: x.size]
    assert (np.abs(dec - x.reshape(-1)) <= step * 1.0001 + 1e-30).all()
    assert impl.bound(t) >= np.abs(dec).max(initial=0)
    want = float(np.dot(dec.astype(np.float64), dec.astype(np.float64)))
    assert impl.squared_norm(t) == pytest.approx(want, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("block", [None, 64])
def test_int4_stochastic_rounding_is_unbiased(block: int | None) -> None:
    # 0.3 of max 1.0 is 2.1 steps of 1/7: nearest rounding would give 2/7 = 0.2857.
    x = np.full(200_000, 0.3, np.float32)
    x[::64] = 1.0  # every block's scale is 1/7
    impl = Int4(block)
    dec = impl.decode(impl.encode_tensor("x", x, RNG(7)))
    rest = np.ones(x.size, bool)
    rest[::64] = False
    assert abs(float(dec[rest].mean()) - 0.3) < 2e-3
    assert abs(2 / 7 - 0.3) > 1e-2
    means = [float(impl.decode(impl.encode_tensor("x", x[:128], RNG(s)))[1:64].mean())
             for s in range(400)]
    assert abs(float(np.mean(means)) - 0.3) < 2e-3


def test_topk_int_values_are_unbiased_too() -> None:
    x = np.full(5000, 0.3, np.float32)
    x[0] = 1.0
    for codec in ("topk-int8", "topk-int4"):
        impl = _topk(codec, 1.0)
        dec = impl.decode(impl.encode({"x": x}, RNG(3)).tensors[0])
        assert abs(float(dec[1:].mean()) - 0.3) < 3e-3


# -- error feedback ----------------------------------------------------------------------------
@given(seed=st.integers(0, 2**31), fraction=st.sampled_from([0.01, 0.1, 0.3]),
       codec=st.sampled_from(SPARSE))
@settings(max_examples=100, deadline=None)
def test_sent_plus_new_residual_is_delta_plus_old_residual(
    seed: int, fraction: float, codec: str
) -> None:
    rng = RNG(seed)
    impl = _topk(codec, fraction)
    shapes = {"w": (17, 9), "b": (9,)}
    old = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    delta = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
    enc = impl.encode(delta, rng, old)
    for t in enc.tensors:
        total = (delta[t.name] + old[t.name]).reshape(-1)
        sent = impl.decode(t).reshape(-1)
        new = enc.state[t.name].reshape(-1)
        pos = decode_positions(t.extra, total.size, int(t.params["k"]), t.name)
        rest = np.ones(total.size, bool)
        rest[pos] = False
        np.testing.assert_array_equal(new[rest], total[rest])  # not sent: kept exactly
        if codec == "topk-f16":
            np.testing.assert_array_equal(sent[pos] + new[pos], total[pos])
        else:
            np.testing.assert_allclose(sent[pos] + new[pos], total[pos], rtol=0, atol=1e-6)


def test_residual_policies_over_skipped_rounds() -> None:
    residual = {"w": np.array([1.0, -2.0, 4.0], np.float32)}
    state = codecs.unpack_state(codecs.pack_state(stamp(residual, 2**33 + 5)))
    assert skipped_rounds(state, 2**33 + 6) == 0
    assert skipped_rounds(state, 2**33 + 9) == 3
    assert skipped_rounds(residual, 9) == 0  # no stamp: nothing known to be skipped
    same = {"w": [1.0, -2.0, 4.0]}
    def carried(policy: ResidualPolicy, r: int) -> dict[str, list[float]]:
        return {k: v.tolist() for k, v in policy.carry(state, r).items()}
    assert carried(ResidualPolicy("keep"), 2**33 + 9) == same
    assert carried(ResidualPolicy("reset"), 2**33 + 6) == same
    assert carried(ResidualPolicy("reset"), 2**33 + 7) == {}
    assert carried(ResidualPolicy("decay", 0.5), 2**33 + 6) == same
    assert carried(ResidualPolicy("decay", 0.5), 2**33 + 8) == {"w": [0.25, -0.5, 1.0]}
    assert carried(ResidualPolicy("off"), 2**33 + 6) == {}
    assert ResidualPolicy.from_params({}) == ResidualPolicy("decay", 0.5)
    for bad in ({"residual_policy": "forget"}, {"residual_policy": 1},
                {"residual_decay": 1.5}, {"residual_decay": "x"}):
        with pytest.raises(ValueError, match="residual_"):
            ResidualPolicy.from_params(bad)


def test_a_residual_that_no_longer_fits_is_dropped_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    impl = _topk("topk-f16", 0.5)
    old = {"w": np.ones(3, np.float32)}
    with caplog.at_level("WARNING", logger="fedmq.update.codecs.topk"):
        enc = impl.encode({"w": np.array([0.0, 2.0], np.float32)}, RNG(0), old)
    assert enc.state["w"].tolist() == [0.0, 0.0]
    assert [r.getMessage() for r in caplog.records] == [
        "residual of 'w' has 3 values, the delta 2: dropped (the model changed)"]


def test_the_device_carries_the_residual_by_the_rounds_params() -> None:
    delta = {"w": np.array([0.5, -3.0, 0.25, 1.0], np.float32)}
    params: Mapping[str, object] = {"topk_fraction": 0.25}
    tensors, state = encode_with_state(delta, "topk-f16", RNG(0), b"", params, 4)
    assert codecs.decode_tensor(tensors[0], "topk-f16").tolist() == [0, -3.0, 0, 0]
    stored = codecs.unpack_state(state)
    assert stored["w"].tolist() == [0.5, 0.0, 0.25, 1.0]
    assert skipped_rounds(stored, 5) == 0 and ROUND_KEY in stored
    # next round: the residual's 1.0 plus this delta's 0.5 beats the new 1.25
    nxt = {"w": np.array([0.0, 0.0, 0.0, 0.5], np.float32)}
    tensors, state = encode_with_state(nxt, "topk-f16", RNG(0), state, params, 5)
    assert codecs.decode_tensor(tensors[0], "topk-f16").tolist() == [0, 0, 0, 1.5]
    # skipped rounds 5..7 with reset: the residual is dropped
    reset = {**params, "residual_policy": "reset"}
    tensors, state = encode_with_state(nxt, "topk-f16", RNG(0), state, reset, 9)
    assert codecs.decode_tensor(tensors[0], "topk-f16").tolist() == [0, 0, 0, 0.5]
    off = {**params, "residual_policy": "off"}
    assert encode_with_state(delta, "topk-f16", RNG(0), state, off, 10)[1] == b""
    assert encode_with_state(delta, "int4", RNG(0), b"", params, 10)[1] == b""


# -- strict checks -----------------------------------------------------------------------------
def _sparse(codec: str, n: int = 20, fraction: float = 0.1) -> Tensor:
    x = np.linspace(-1, 1, n, dtype=np.float32)
    return _topk(codec, fraction).encode({"t": x}, RNG(0)).tensors[0]


def _with(t: Tensor, **changes: object) -> Tensor:
    fields = {"name": t.name, "dtype": t.dtype, "shape": t.shape, "data": t.data,
              "params": dict(t.params), "extra": dict(t.extra)}
    fields.update(changes)
    return Tensor(**fields)  # type: ignore[arg-type]


def _cases() -> list[tuple[str, str, Tensor, RejectReason]]:
    f16 = _sparse("topk-f16")  # k = 2 of 20: gaps
    k2 = {"k": 2.0}
    two = np.ones(2, "<f2").tobytes()
    i4 = _sparse("topk-int4", fraction=0.15)  # k = 3: odd, one padding nibble
    stc = _sparse("stc")
    dense4 = Int4(8).encode_tensor("t", np.linspace(-1, 1, 21, dtype=np.float32), RNG(0))
    nan_scales = np.frombuffer(dense4.extra["scales"], "<f4").copy()
    nan_scales[1] = np.nan
    s, b = RejectReason.SHAPE, RejectReason.BAD_CODEC
    return [
        ("position out of range", "topk-f16",
         _with(f16, extra={"gaps": varint_encode(np.array([3, 17]))}), s),
        ("duplicated position", "topk-f16",
         _with(f16, extra={"gaps": varint_encode(np.array([3, 0]))}), s),
        ("k larger than the tensor", "topk-f16",
         _with(f16, params={"k": 21.0}, data=np.ones(21, "<f2").tobytes(),
               extra={"bitmap": b"\xff\xff\xff"}), s),
        ("k not whole", "topk-f16", _with(f16, params={"k": 1.5}), b),
        ("k disagrees with positions", "topk-f16",
         _with(f16, extra={"gaps": varint_encode(np.array([3]))}), s),
        ("k disagrees with values", "topk-f16", _with(f16, data=np.ones(3, "<f2").tobytes()), s),
        ("dangling varint", "topk-f16", _with(f16, extra={"gaps": b"\x03\x80"}), b),
        ("overlong varint", "topk-f16", _with(f16, extra={"gaps": b"\x03\x81\x00"}), b),
        ("six-byte varint", "topk-f16",
         _with(f16, extra={"gaps": b"\x03" + b"\x81" * 5 + b"\x00"}), b),
        ("trailing bytes", "topk-f16",
         _with(f16, extra={"gaps": varint_encode(np.array([3, 4, 1]))}), s),
        ("bitmap too short", "topk-f16", _with(f16, extra={"bitmap": b"\x03\x00"}), s),
        ("bitmap padding bit", "topk-f16",
         _with(f16, params=k2, data=two, extra={"bitmap": b"\x01\x00\x10"}), s),
        ("both position fields", "topk-f16",
         _with(f16, extra={**f16.extra, "bitmap": bitmap_bytes(np.array([0, 19]), 20)}), b),
        ("no position field", "topk-f16", _with(f16, extra={}), b),
        ("an unknown field", "topk-f16", _with(f16, extra={**f16.extra, "x": b""}), b),
        ("wrong dtype", "topk-f16", _with(f16, dtype="int8", data=b"\x01\x01"), b),
        ("missing scale", "topk-int8", _with(_sparse("topk-int8"), params=k2), b),
        ("negative scale", "topk-int8",
         _with(_sparse("topk-int8"), params={"k": 2.0, "scale": -1.0}), b),
        ("int4 value count", "topk-int4", _with(i4, data=i4.data + b"\x88"), s),
        ("int4 padding nibble", "topk-int4",
         _with(i4, data=i4.data[:-1] + bytes([i4.data[-1] | 0x90])), b),
        ("sign count", "stc", _with(stc, data=b"\x00\x00"), s),
        ("sign padding bits", "stc", _with(stc, data=b"\x04"), b),
        ("wrong model shape", "stc", _with(stc, shape=(4, 5)), s),
        ("int4 NaN scale", "int4", _with(dense4, extra={"scales": nan_scales.tobytes()}), b),
        ("int4 scale count", "int4", _with(dense4, extra={"scales": dense4.extra["scales"][4:]}),
         s),
        ("int4 data count", "int4", _with(dense4, data=dense4.data[:-1]), s),
        ("int4 padding nibble", "int4",
         _with(dense4, data=dense4.data[:-1] + bytes([dense4.data[-1] | 0x70])), b),
        ("int4 block not whole", "int4", _with(dense4, params={"block": 2.5}), b),
        ("int4 block zero", "int4", _with(dense4, params={"block": 0.0}), b),
        ("int4 without scales", "int4", _with(dense4, extra={}), b),
    ]


@pytest.mark.parametrize(("what", "codec", "tensor", "reason"), _cases(),
                         ids=[c[0] for c in _cases()])
def test_damaged_tensors_are_refused_with_a_reason(
    what: str, codec: str, tensor: Tensor, reason: RejectReason
) -> None:
    shape = (21,) if codec == "int4" else (20,)
    good = Int4(8).encode_tensor("t", np.zeros(21, np.float32), RNG(0)) if codec == "int4" \
        else _sparse(codec)
    codecs.get_codec(codec).validate(good, shape)  # the undamaged tensor passes
    fold = WeightedSum({"t": shape})
    with pytest.raises(WireError) as err:
        fold.check([tensor], codec, 1.0)
    assert err.value.code == reason, err.value
    assert fold.count == 0


def test_unsorted_positions_cannot_be_written() -> None:
    # A gap is unsigned: an earlier position after a later one has no encoding; the bitmap
    # has no order at all. What comes closest (a zero gap) is a duplicate, refused above.
    assert decode_positions({"gaps": varint_encode(np.array([5, 1]))}, 20, 2, "t").tolist() \
        == [5, 6]


# -- the fold ----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", SPARSE)
def test_sparse_updates_fold_exactly_at_their_positions(codec: str) -> None:
    shapes = {"w": (50, 40), "b": (40,)}
    impl = _topk(codec, 0.05)
    acc = WeightedSum(shapes)
    want = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    rng = RNG(5)
    for i in range(4):
        delta = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in shapes.items()}
        tensors = _wire(codec, impl.encode(delta, rng).tensors)
        acc.fold(tensors, codec, float(i + 1))
        for t in tensors:
            want[t.name] += np.float32(i + 1) * impl.decode(t)
    for k in shapes:
        np.testing.assert_allclose(acc.result().mean[k], want[k] / 10, rtol=1e-6, atol=1e-9)


def test_adding_a_sparse_update_makes_no_dense_copy() -> None:
    n = 1_000_000
    acc = np.zeros(n, np.float32)
    x = RNG(0).normal(size=n).astype(np.float32)
    impl = _topk("topk-int8", 0.01)
    t = impl.encode({"w": x}, RNG(0)).tensors[0]
    assert "gaps" in t.extra
    impl.add_into(acc, t, 2.0)  # warm up
    tracemalloc.start()
    impl.add_into(acc, t, 2.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    k = int(t.params["k"])
    # O(k) scratch (varint decoding, ~55 bytes per position); a dense copy would be 4n bytes
    assert peak < 64 * k < n, peak
    np.testing.assert_array_equal(acc != 0, impl.decode(t) != 0)


def test_pack_nibbles_layout() -> None:
    assert pack_nibbles(np.array([-8, 7, 0])) == bytes([0xF0, 0x08])
