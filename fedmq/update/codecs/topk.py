"""Sparse top-k codecs with error feedback: ``topk-f16``, ``topk-int8``, ``topk-int4``
and ``stc`` (sparse ternary compression).

Per tensor, the device adds the residual it kept (what earlier updates did not send) to the
delta, keeps the ``k = ceil(fraction * n)`` largest magnitudes (at least one value of a
non-empty tensor; per tensor, not global, so small tensors such as biases always travel) and
sends their positions (:mod:`.positions`: bitmap or varint gaps, whichever is smaller) and
values in the codec's value format; whatever it did not send (the other positions and the
quantisation error of the sent values) is the new residual, the codec state.

Wire layout (``shape`` is the model tensor's, ``params["k"]`` the number of positions):

========== ======== ======================== =================== =====================
codec      dtype    data                     params              extra
========== ======== ======================== =================== =====================
topk-f16   float16  k values                 k                   bitmap or gaps
topk-int8  int8     k values                 k, scale            bitmap or gaps
topk-int4  uint8    ceil(k/2) nibble bytes   k, scale            bitmap or gaps
stc        uint8    ceil(k/8) sign bytes     k, scale (mean |v|) bitmap or gaps
========== ======== ======================== =================== =====================

int8 and int4 values use unbiased stochastic rounding with one scale ``max|v| / levels``
over the k values; ``stc`` sends the sign of each (bit set = negative, least significant
bit first, zero padding) and one mean magnitude. The fraction comes from the round's
``params["topk_fraction"]`` (:meth:`TopK.configure`); the aggregator needs no setting: it
reads k from each tensor and checks it against the model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import Codec, CodecState, Encoded, finite_input
from fedmq.update.codecs.lowbit import INT4_LEVELS, pack_nibbles, stochastic_levels, unpack_nibbles
from fedmq.update.codecs.positions import POSITION_FIELDS, decode_positions, encode_positions
from fedmq.update.codecs.registry import codec_names, get_codec

__all__ = [
    "DEFAULT_FRACTION",
    "FRACTION_PARAM",
    "Stc",
    "TopK",
    "TopKF16",
    "TopKInt4",
    "TopKInt8",
    "check_topk_fraction",
    "topk_codec_names",
    "topk_count",
    "topk_params",
]

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.01
FRACTION_PARAM = "topk_fraction"
_F16_MAX = float(np.finfo(np.float16).max)
_MAX_SCALE = 1e30


def topk_count(n: int, fraction: float) -> int:
    """Values kept of an ``n``-value tensor: ``ceil(fraction * n)``, at least 1 (if n > 0)."""
    return min(n, max(1, math.ceil(fraction * n))) if n else 0


def topk_codec_names() -> tuple[str, ...]:
    """The registered codecs that take a ``topk_fraction`` (top-k and stc)."""
    return tuple(n for n in codec_names() if isinstance(get_codec(n), TopK))


def check_topk_fraction(codec: str, fraction: float | None) -> None:
    """An operator's ``topk_fraction`` setting for rounds in ``codec``: None (the codec's
    default) or a number in (0, 1] with a top-k codec; anything else is a ConfigError."""
    if fraction is None:
        return
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
        math.isfinite(fraction) and 0.0 < fraction <= 1.0
    ):
        raise ConfigError(f"{FRACTION_PARAM} must be a number in (0, 1], got {fraction!r}")
    if codec not in topk_codec_names():
        raise ConfigError(
            f"{FRACTION_PARAM} applies only to the top-k codecs "
            f"({', '.join(topk_codec_names())}), not to codec {codec!r}"
        )


def topk_params(fraction: float | None) -> dict[str, float]:
    """The round params that announce ``fraction`` (none for the codec's default)."""
    return {} if fraction is None else {FRACTION_PARAM: float(fraction)}


class TopK(Codec):
    """Top-k by magnitude in one value format (``values``: f16, int8, int4 or sign)."""

    stateful = True
    values: ClassVar[str]
    dtype: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset({"scale"})
    peak: ClassVar[float]  # largest |stored value| per unit of scale

    def __init__(self, fraction: float = DEFAULT_FRACTION) -> None:
        if isinstance(fraction, bool) or not (
            isinstance(fraction, int | float) and 0.0 < fraction <= 1.0
        ):
            raise ValueError(f"{FRACTION_PARAM} must be in (0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def configure(self, params: Mapping[str, object]) -> TopK:
        fraction = params.get(FRACTION_PARAM, self.fraction)
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise ValueError(f"{FRACTION_PARAM} must be a number, got {fraction!r}")
        return self if fraction == self.fraction else type(self)(float(fraction))

    # ------------------------------------------------------------------ device side
    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
        state: CodecState | None = None,
    ) -> Encoded:
        state = state or {}
        tensors: list[Tensor] = []
        residual: dict[str, np.ndarray] = {}
        for name, values in delta.items():
            x = finite_input(name, values).reshape(-1)
            old = state.get(name)
            if old is not None and old.size == x.size:
                x = x + old.reshape(-1)
            elif old is not None:
                log.warning("residual of %r has %d values, the delta %d: dropped (the model "
                            "changed)", name, old.size, x.size)
            k = topk_count(x.size, self.fraction)
            idx = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k:]) if k else (
                np.zeros(0, np.int64))
            tensor, sent = self._encode_values(name, tuple(np.shape(values)), x, idx, rng)
            rest = x.copy()
            rest[idx] = x[idx] - sent
            residual[name] = rest.reshape(np.shape(values))
            tensors.append(tensor)
        return Encoded(tuple(tensors), residual)

    def _encode_values(
        self, name: str, shape: tuple[int, ...], x: np.ndarray, idx: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[Tensor, np.ndarray]:
        """The wire tensor and the float32 values it sends at ``idx``."""
        v = x[idx]
        k = idx.size
        extra = encode_positions(idx, x.size)
        params: dict[str, float] = {"k": float(k)}
        if self.values == "f16":
            h = np.clip(v, -_F16_MAX, _F16_MAX).astype(np.float16)
            return Tensor(name, "float16", shape, h.astype("<f2").tobytes(), params,
                          extra), h.astype(np.float32)
        if self.values == "sign":
            mu = float(np.abs(v).mean()) if k else 0.0
            neg = v < 0
            params["scale"] = mu
            data = np.packbits(neg, bitorder="little").tobytes()
            sent = np.where(neg, -np.float32(mu), np.float32(mu)).astype(np.float32)
            return Tensor(name, "uint8", shape, data, params, extra), sent
        levels = 127 if self.values == "int8" else INT4_LEVELS
        q, scale = stochastic_levels(v, levels, rng)
        params["scale"] = scale
        sent = q * np.float32(scale)
        data = q.astype(np.int8).tobytes() if self.values == "int8" else pack_nibbles(q)
        return Tensor(name, self.dtype, shape, data, params, extra), sent

    # ------------------------------------------------------------------ aggregator side
    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        name = tensor.name
        if tensor.shape != shape:
            raise WireError(f"tensor {name!r} has shape {list(tensor.shape)}, the model has "
                            f"{list(shape)}", RejectReason.SHAPE)
        if tensor.dtype != self.dtype:
            raise WireError(f"tensor {name!r} is {tensor.dtype} but the update's codec is "
                            f"{self.name}", RejectReason.BAD_CODEC)
        want = self.params | {"k"}
        if set(tensor.params) != want or not set(tensor.extra) <= POSITION_FIELDS:
            raise WireError(f"tensor {name!r}: codec {self.name} takes params {sorted(want)} "
                            f"and extra bitmap or gaps, got {sorted(tensor.params)} and "
                            f"{sorted(tensor.extra)}", RejectReason.BAD_CODEC)
        n = tensor.size
        k_raw = tensor.params["k"]
        if not float(k_raw).is_integer() or k_raw < 0:
            raise WireError(f"tensor {name!r}: bad k {k_raw}", RejectReason.BAD_CODEC)
        if k_raw > n:
            raise WireError(f"tensor {name!r}: k={int(k_raw)} is larger than its {n} values",
                            RejectReason.SHAPE)
        k = int(k_raw)
        if "scale" in want and not 0.0 <= tensor.params["scale"] < _MAX_SCALE:
            raise WireError(f"tensor {name!r}: bad scale {tensor.params['scale']}",
                            RejectReason.BAD_CODEC)
        if tensor.count != self._stored(k):
            raise WireError(f"tensor {name!r}: {tensor.count} stored {tensor.dtype} values for "
                            f"k={k}", RejectReason.SHAPE)
        if self.values == "int4":
            unpack_nibbles(tensor.data, k, name)
        elif self.values == "sign" and k % 8 and int(tensor.data[-1]) >> (k % 8):
            raise WireError(f"tensor {name!r}: sign padding bits are set",
                            RejectReason.BAD_CODEC)
        decode_positions(tensor.extra, n, k, name)

    def _stored(self, k: int) -> int:
        if self.values == "int4":
            return (k + 1) // 2
        if self.values == "sign":
            return (k + 7) // 8
        return k

    def _sparse(self, tensor: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions, float32 values) of a validated tensor."""
        k = int(tensor.params["k"])
        idx = decode_positions(tensor.extra, tensor.size, k, tensor.name)
        if self.values == "f16":
            return idx, tensor.values().astype(np.float32)
        scale = np.float32(tensor.params["scale"])
        if self.values == "int8":
            return idx, tensor.values().astype(np.float32) * scale
        if self.values == "int4":
            return idx, unpack_nibbles(tensor.data, k, tensor.name).astype(np.float32) * scale
        bits = np.unpackbits(np.frombuffer(tensor.data, np.uint8), bitorder="little")[:k]
        return idx, np.where(bits.astype(bool), -scale, scale).astype(np.float32)

    def decode(self, tensor: Tensor) -> np.ndarray:
        out = np.zeros(tensor.size, np.float32)
        idx, v = self._sparse(tensor)
        out[idx] = v
        return out.reshape(tensor.shape)

    def bound(self, tensor: Tensor) -> float:
        k = int(tensor.params["k"])
        if k == 0:
            return 0.0
        if self.values == "f16":
            return float(np.abs(tensor.values().astype(np.float32)).max())
        return self.peak * float(tensor.params["scale"])

    def squared_norm(self, tensor: Tensor) -> float:
        if self.values == "sign":
            return int(tensor.params["k"]) * float(tensor.params["scale"]) ** 2
        v = self._sparse(tensor)[1].astype(np.float64)
        return float(np.dot(v, v))

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        idx, v = self._sparse(tensor)
        v *= np.float32(coef)
        if acc.flags.c_contiguous:
            flat = acc.reshape(-1)  # a view; positions are unique after validation
            flat[idx] += v
        else:
            dense = np.zeros(acc.size, np.float32)
            dense[idx] = v
            acc += dense.reshape(acc.shape)


class TopKF16(TopK):
    name = "topk-f16"
    values = "f16"
    dtype = "float16"
    params = frozenset()
    peak = _F16_MAX


class TopKInt8(TopK):
    name = "topk-int8"
    values = "int8"
    dtype = "int8"
    peak = 128.0


class TopKInt4(TopK):
    name = "topk-int4"
    values = "int4"
    dtype = "uint8"
    peak = 8.0


class Stc(TopK):
    """Sparse ternary compression: top-k, then each kept value's sign and one mean
    magnitude per tensor."""

    name = "stc"
    values = "sign"
    dtype = "uint8"
    peak = 1.0
