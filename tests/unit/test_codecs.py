"""Codecs: exactness, sizes, and the int8 codec's unbiased stochastic rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq import wire
from fedmq.errors import RejectReason, WireError
from fedmq.update import codecs


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(0, 0.02, (64, 32)).astype(np.float32),
        "b": rng.normal(0, 0.01, (32,)).astype(np.float32),
    }


def _stateless() -> list[str]:
    """Codecs that encode without device state (sparse ones: test_codecs_sparse.py)."""
    return [c for c in codecs.codec_names() if not codecs.get_codec(c).stateful]


def test_float32_is_exact_and_sizes_shrink() -> None:
    d = _delta()
    rng = np.random.default_rng(1)
    sizes = {}
    for codec in _stateless():
        enc = codecs.encode_delta(d, codec, rng)
        sizes[codec] = codecs.encoded_nbytes(enc)
        back = codecs.decode_tensors(enc, codec)
        assert set(back) == set(d)
        if codec == "float32":
            for k in d:
                np.testing.assert_array_equal(back[k], d[k])
    raw = codecs.raw_nbytes(d)
    assert sizes["float32"] == raw
    assert sizes["float16"] * 2 == raw
    assert sizes["int8"] * 4 == raw
    assert sizes["int4"] == raw // 8 + 4 * (64 * 32 // 64 + 1)  # nibbles + a scale per block


def test_int8_error_bounded_by_one_step() -> None:
    d = _delta(3)
    enc = codecs.encode_delta(d, "int8", np.random.default_rng(0))
    for t in enc:
        step = t.params["scale"]
        err = np.abs(codecs.decode_tensor(t, "int8") - d[t.name]).max()
        assert err <= step * 1.0001


def test_int8_stochastic_rounding_is_unbiased() -> None:
    # A value between two grid points is rounded up or down in proportion: the mean of many
    # encodings converges to the value, unlike round-to-nearest which is biased.
    x = np.full(200_000, 0.3, np.float32)
    x[0] = 1.0  # sets scale = 1/127, so 0.3 = 38.1 steps
    t = codecs.encode_tensor("x", x, "int8", np.random.default_rng(7))
    dec = codecs.decode_tensor(t, "int8")[1:]
    assert abs(float(dec.mean()) - 0.3) < 2e-4
    nearest = np.round(0.3 * 127) / 127
    assert abs(nearest - 0.3) > 5e-4  # what deterministic rounding would give


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(max_dims=3, max_side=6),
        elements=st.floats(-1e3, 1e3, width=32),
    )
)
@settings(max_examples=100, deadline=None)
def test_round_trip_through_the_wire(x: np.ndarray) -> None:
    for codec in _stateless():
        t = codecs.encode_tensor("t", x, codec, np.random.default_rng(0))
        msg = wire.UpdateMessage("f", 1, 0, "d", "u", 1, codec, (t,))
        back = codecs.decode_tensor(wire.decode_update(wire.encode(msg)).tensors[0], codec)
        assert back.shape == x.shape
        tol = {
            "float32": 0.0,
            "float16": 1e-3 * (np.abs(x).max(initial=0) + 1),
            "int8": (np.abs(x).max(initial=0) / 127) * 1.0001,
            "int4": (np.abs(x).max(initial=0) / 7) * 1.0001,
            # masked codecs under the registry's empty mask (nothing pruned): as dense
            "masked-int8": (np.abs(x).max(initial=0) / 127) * 1.0001,
            "masked-f16": 1e-3 * (np.abs(x).max(initial=0) + 1),
        }[codec]
        assert np.abs(back - x).max(initial=0) <= tol + 1e-6


def test_zero_tensor_and_bad_input() -> None:
    t = codecs.encode_tensor("z", np.zeros(5, np.float32), "int8", np.random.default_rng(0))
    assert t.params["scale"] == 0.0
    np.testing.assert_array_equal(codecs.decode_tensor(t, "int8"), 0)
    with pytest.raises(WireError) as e:
        codecs.encode_tensor("n", np.array([np.nan], np.float32), "int8", np.random.default_rng(0))
    assert e.value.code == RejectReason.NON_FINITE
    with pytest.raises(WireError):
        codecs.encode_tensor("h", np.array([1e6], np.float32), "float16", np.random.default_rng(0))
    with pytest.raises(WireError) as e:
        codecs.decode_tensor(t, "float32")
    assert e.value.code == RejectReason.BAD_CODEC


def test_int8_of_subnormal_values_stays_finite() -> None:
    x = np.array([1e-45, -1e-45, 0.0], np.float32)  # 127 / max|x| overflows float32
    with np.errstate(all="raise"):
        t = codecs.encode_tensor("tiny", x, "int8", np.random.default_rng(0))
    q = t.array()
    assert set(np.unique(q)) <= {-127, 0, 127}
    assert np.abs(codecs.decode_tensor(t, "int8") - x).max() <= 2e-45
