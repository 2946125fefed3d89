"""Update codecs: the delta (local minus global weights) to wire tensors and back.

- ``float32``: raw values.
- ``float16``: half precision (2x smaller; values beyond float16's range are rejected).
- ``int8``: symmetric per-tensor quantisation, ``scale = max|x| / 127``, with stochastic
  rounding ``q = floor(x / scale + u)``, ``u ~ U[0, 1)``, so ``E[q * scale] = x`` (unbiased).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.wire import Tensor

__all__ = [
    "CODECS",
    "decode_tensor",
    "decode_tensors",
    "encode_delta",
    "encode_tensor",
    "encoded_nbytes",
    "raw_nbytes",
]

CODECS = ("float32", "float16", "int8")
_F16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)
# Which wire dtype each codec must use; anything else is a malformed update.
_CODEC_DTYPE = {"float32": "float32", "float16": "float16", "int8": "int8"}


def encode_tensor(name: str, values: np.ndarray, codec: str, rng: np.random.Generator) -> Tensor:
    """Encode one float tensor with ``codec``."""
    x = np.asarray(values, dtype=np.float32)
    if not np.isfinite(x).all():
        raise WireError(f"tensor {name!r} holds NaN or infinite values", RejectReason.NON_FINITE)
    if codec == "float32":
        return Tensor.from_array(name, x)
    if codec == "float16":
        if x.size and float(np.abs(x).max()) > _F16_MAX:
            raise WireError(f"tensor {name!r} overflows float16", RejectReason.BAD_CODEC)
        return Tensor.from_array(name, x.astype(np.float16))
    if codec == "int8":
        return _encode_int8(name, x, rng)
    raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)


def _encode_int8(name: str, x: np.ndarray, rng: np.random.Generator) -> Tensor:
    max_abs = float(np.abs(x).max()) if x.size else 0.0
    if max_abs == 0.0:
        return Tensor.from_array(name, np.zeros(x.shape, np.int8), {"scale": 0.0})
    scale = max_abs / 127.0
    inv = 127.0 / max_abs
    if inv < _F32_MAX:
        scaled = x * np.float32(inv)
    else:  # subnormal inputs: 1/scale does not fit float32, scale in float64
        scaled = (x.astype(np.float64) * inv).astype(np.float32)
    scaled += rng.random(x.shape, dtype=np.float32)
    np.floor(scaled, out=scaled)
    np.clip(scaled, -127, 127, out=scaled)
    return Tensor.from_array(name, scaled.astype(np.int8), {"scale": scale})


def encode_delta(
    delta: Mapping[str, np.ndarray], codec: str, rng: np.random.Generator
) -> tuple[Tensor, ...]:
    """Encode every tensor of an update, in the mapping's order."""
    if codec not in CODECS:
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    return tuple(encode_tensor(name, value, codec, rng) for name, value in delta.items())


def decode_tensor(tensor: Tensor, codec: str) -> np.ndarray:
    """The float32 values a wire tensor stands for (a new array)."""
    expected = _CODEC_DTYPE.get(codec)
    if expected is None:
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    if tensor.dtype != expected:
        raise WireError(
            f"tensor {tensor.name!r} has dtype {tensor.dtype}, codec {codec} needs {expected}",
            RejectReason.BAD_CODEC,
        )
    values = tensor.array()
    if codec == "int8":
        scale = _int8_scale(tensor)
        return values.astype(np.float32) * np.float32(scale)
    return values.astype(np.float32)


def _int8_scale(tensor: Tensor) -> float:
    scale = tensor.params.get("scale")
    if scale is None:
        raise WireError(
            f"tensor {tensor.name!r}: int8 needs a 'scale' param", RejectReason.BAD_CODEC
        )
    if not 0.0 <= scale < 1e30:
        raise WireError(f"tensor {tensor.name!r}: bad int8 scale {scale}", RejectReason.BAD_CODEC)
    return float(scale)


def decode_tensors(tensors: Iterable[Tensor], codec: str) -> dict[str, np.ndarray]:
    return {t.name: decode_tensor(t, codec) for t in tensors}


def encoded_nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of tensor data on the wire (the message adds a small constant header)."""
    return sum(len(t.data) for t in tensors)


def raw_nbytes(weights: Mapping[str, np.ndarray]) -> int:
    """Bytes of the same tensors as float32."""
    return sum(int(np.asarray(v).size) * 4 for v in weights.values())
