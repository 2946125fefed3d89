"""Update codecs: the delta (local minus global weights) to wire tensors and back.

Each codec is one module built on :class:`~fedmq.update.codecs.base.Codec` and known through
the registry (:func:`register`, :func:`get_codec`, :func:`codec_names`). Built in:

- ``float32`` (:mod:`.float32`): raw values.
- ``float16`` (:mod:`.float16`): half precision (values beyond float16's range are refused).
- ``int8`` (:mod:`.int8`): symmetric per-tensor quantisation with unbiased stochastic rounding.
- ``int4`` (:mod:`.int4`): 4-bit, per-block scales, unbiased stochastic rounding.
- ``topk-f16``, ``topk-int8``, ``topk-int4``, ``stc`` (:mod:`.topk`): sparse top-k with an
  error-feedback residual kept on the device (:mod:`.residual`: what it does while the
  device skips rounds). See docs/codecs.md.
- ``masked-int8``, ``masked-f16`` (:mod:`.masked`): the kept weights of a pruned model,
  positions implied by the round's mask (docs/pruning.md).

The helpers below look the codec up by name; use ``get_codec(name).encode(delta, rng,
state)`` for codecs that keep device state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedmq.tensor import Tensor
from fedmq.update.codecs.base import (
    Codec,
    CodecState,
    DenseCodec,
    Encoded,
    pack_state,
    unpack_state,
)
from fedmq.update.codecs.float16 import Float16
from fedmq.update.codecs.float32 import Float32
from fedmq.update.codecs.int4 import Int4
from fedmq.update.codecs.int8 import Int8
from fedmq.update.codecs.masked import MaskedF16, MaskedInt8
from fedmq.update.codecs.registry import codec_names, get_codec, register, unregister
from fedmq.update.codecs.topk import Stc, TopKF16, TopKInt4, TopKInt8

__all__ = [
    "Codec",
    "CodecState",
    "DenseCodec",
    "Encoded",
    "codec_names",
    "decode_tensor",
    "decode_tensors",
    "encode_delta",
    "encode_tensor",
    "encoded_nbytes",
    "get_codec",
    "pack_state",
    "raw_nbytes",
    "register",
    "unpack_state",
    "unregister",
]

_BUILTINS: tuple[Codec, ...] = (
    Float32(), Float16(), Int8(), Int4(), TopKF16(), TopKInt8(), TopKInt4(), Stc(),
    MaskedInt8(), MaskedF16(),
)
for _builtin in _BUILTINS:
    register(_builtin, replace=True)


def encode_tensor(name: str, values: np.ndarray, codec: str, rng: np.random.Generator) -> Tensor:
    """Encode one float tensor with the stateless ``codec``."""
    return get_codec(codec).encode_tensor(name, values, rng)


def encode_delta(
    delta: Mapping[str, np.ndarray], codec: str, rng: np.random.Generator
) -> tuple[Tensor, ...]:
    """Encode every tensor of an update with a stateless codec, in the mapping's order."""
    c = get_codec(codec)
    if c.stateful:
        raise ValueError(f"codec {codec} keeps device state: use get_codec().encode(..., state)")
    return c.encode(delta, rng).tensors


def decode_tensor(tensor: Tensor, codec: str) -> np.ndarray:
    """The float32 values a wire tensor stands for (a new array), checked against its own
    shape first: a tensor of another codec is a ``bad_codec`` :class:`WireError`."""
    c = get_codec(codec)
    c.validate(tensor, tensor.shape)
    return c.decode(tensor)


def decode_tensors(tensors: Iterable[Tensor], codec: str) -> dict[str, np.ndarray]:
    return {t.name: decode_tensor(t, codec) for t in tensors}


def encoded_nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of tensor data on the wire (the message adds a small constant header)."""
    return sum(len(t.data) + sum(len(v) for v in t.extra.values()) for t in tensors)


def raw_nbytes(weights: Mapping[str, np.ndarray]) -> int:
    """Bytes of the same tensors as float32."""
    return sum(int(np.asarray(v).size) * 4 for v in weights.values())
