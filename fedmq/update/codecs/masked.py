"""``masked-int8``, ``masked-f16``: the kept weights of a pruned model, positions implied by
the round's mask (no position bytes on the wire).

In a pruned round (docs/pruning.md) every device and the aggregator hold the same mask
(:class:`fedmq.prune.mask.PruneMask`, sent with the round announcement). A tensor carries
only the values at the kept positions, in increasing flat order: ``kept`` int8 values with
the int8 codec's stochastic rounding and ``scale`` param (``masked-int8``) or ``kept``
float16 values (``masked-f16``). Its ``mask`` param is the mask's id (CRC-32), so an update
made under another mask is refused instead of being added at the wrong positions.

A codec instance is bound to one mask (:meth:`MaskedCodec.with_mask`): it checks that a
tensor's value count and mask id match it and decodes at its positions. The registered
instances are bound to the empty mask (every weight kept: a dense update under mask id
``PruneMask().mask_id``). In a pruned round the aggregator's pruning accumulator
(:class:`fedmq.prune.strategy.MaskedFold`) binds the round's mask, checks, and scatters the
values into the dense codec's tensor before folding; the norm and bound come from the
values alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.prune.mask import PruneMask
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import Codec, CodecState, Encoded, finite_input
from fedmq.update.codecs.float16 import Float16
from fedmq.update.codecs.int8 import Int8

__all__ = ["MASKED_CODECS", "MaskedCodec", "MaskedF16", "MaskedInt8", "masked_codec_for"]

_MAX_SCALE = 1e30
_Q_PEAK = 128.0
_F16_MAX = float(np.finfo(np.float16).max)
_INT8 = Int8()


class MaskedCodec(Codec):
    """Values at the kept positions of the round's mask; see the module docstring."""

    dtype: ClassVar[str]
    dense_name: ClassVar[str]  # the dense codec whose tensor the values scatter into
    params: ClassVar[frozenset[str]]

    def __init__(self, mask: PruneMask | None = None) -> None:
        self.mask = PruneMask() if mask is None else mask
        self.mask_id = self.mask.mask_id

    def with_mask(self, mask: PruneMask) -> MaskedCodec:
        """This codec bound to ``mask`` (encode, decode and the full count check)."""
        return type(self)(mask)

    # -- encoding (device) -----------------------------------------------------------------
    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
        state: CodecState | None = None,
    ) -> Encoded:
        return Encoded(tuple(self.encode_tensor(n, v, rng) for n, v in delta.items()))

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = finite_input(name, values)
        pos = self.mask.positions(name)
        kept = x.reshape(-1) if pos is None else x.reshape(-1)[pos]
        return self._encode_values(name, kept, x.shape, rng)

    def _encode_values(
        self, name: str, kept: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
    ) -> Tensor:
        raise NotImplementedError

    # -- checks (aggregator) ---------------------------------------------------------------
    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        if tensor.shape != shape:
            raise WireError(
                f"tensor {tensor.name!r} has shape {list(tensor.shape)}, the model has "
                f"{list(shape)}", RejectReason.SHAPE,
            )
        if tensor.dtype != self.dtype or set(tensor.params) != self.params or tensor.extra:
            raise WireError(
                f"tensor {tensor.name!r}: codec {self.name} takes {self.dtype} values, params "
                f"{sorted(self.params)} and no extra fields, got {tensor.dtype}, "
                f"{sorted(tensor.params)} and {sorted(tensor.extra)}", RejectReason.BAD_CODEC,
            )
        mask_id = tensor.params["mask"]
        if not (0 <= mask_id < 2**32 and mask_id == int(mask_id)):
            raise WireError(f"tensor {tensor.name!r}: bad mask id {mask_id}",
                            RejectReason.BAD_CODEC)
        if tensor.count > tensor.size:
            raise WireError(
                f"tensor {tensor.name!r}: {tensor.count} values for {tensor.size} weights",
                RejectReason.SHAPE,
            )
        if int(mask_id) != self.mask_id:
            raise WireError(
                f"tensor {tensor.name!r} was encoded under mask {int(mask_id):08x}, the "
                f"round's mask is {self.mask_id:08x}", RejectReason.BAD_CODEC,
            )
        kept = self.mask.count(tensor.name, tensor.size)
        if tensor.count != kept:
            raise WireError(
                f"tensor {tensor.name!r}: {tensor.count} values, the round's mask keeps "
                f"{kept}", RejectReason.SHAPE,
            )

    def _scale(self, tensor: Tensor) -> float:
        return 1.0

    def decode(self, tensor: Tensor) -> np.ndarray:
        out = np.zeros(tensor.size, np.float32)
        values = tensor.values().astype(np.float32) * np.float32(self._scale(tensor))
        pos = self.mask.positions(tensor.name)
        if pos is None:
            out[:] = values
        else:
            out[pos] = values
        return out.reshape(tensor.shape)

    def dense(self, tensor: Tensor) -> Tensor:
        """The same tensor in the dense codec (:attr:`dense_name`): values scattered into
        zeros at the kept positions, params without ``mask``. Call after :meth:`validate`."""
        values = tensor.values()
        pos = self.mask.positions(tensor.name)
        if pos is None:
            full = values.reshape(tensor.shape)
        else:
            full = np.zeros(tensor.size, values.dtype)
            full[pos] = values
            full = full.reshape(tensor.shape)
        params = {k: v for k, v in tensor.params.items() if k != "mask"}
        return Tensor.from_array(tensor.name, full, params)

    def squared_norm(self, tensor: Tensor) -> float:
        q = tensor.values().reshape(-1).astype(np.float64)
        s = self._scale(tensor)
        return s * s * float(np.dot(q, q))


class MaskedInt8(MaskedCodec):
    name = "masked-int8"
    dtype = "int8"
    dense_name = Int8.name
    params = frozenset({"scale", "mask"})

    def _encode_values(
        self, name: str, kept: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
    ) -> Tensor:
        t = _INT8.encode_tensor(name, kept, rng)  # int8's quantisation, kept values only
        return Tensor.from_array(name, t.array(), {"scale": t.params["scale"],
                                                   "mask": float(self.mask_id)}, shape=shape)

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        super().validate(tensor, shape)
        scale = tensor.params["scale"]
        if not 0.0 <= scale < _MAX_SCALE:
            raise WireError(f"tensor {tensor.name!r}: bad int8 scale {scale}",
                            RejectReason.BAD_CODEC)

    def _scale(self, tensor: Tensor) -> float:
        return float(tensor.params.get("scale", 0.0))

    def bound(self, tensor: Tensor) -> float:
        return _Q_PEAK * self._scale(tensor) if tensor.count else 0.0


class MaskedF16(MaskedCodec):
    name = "masked-f16"
    dtype = "float16"
    dense_name = Float16.name
    params = frozenset({"mask"})

    def _encode_values(
        self, name: str, kept: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator
    ) -> Tensor:
        if kept.size and float(np.abs(kept).max()) > _F16_MAX:
            raise WireError(f"tensor {name!r} overflows float16", RejectReason.BAD_CODEC)
        return Tensor.from_array(name, kept.astype(np.float16), {"mask": float(self.mask_id)},
                                 shape=shape)

    def bound(self, tensor: Tensor) -> float:
        return _F16_MAX if tensor.count else 0.0


MASKED_CODECS: dict[str, str] = {"int8": MaskedInt8.name, "float16": MaskedF16.name}


def masked_codec_for(codec: str) -> str:
    """The masked codec that sends ``codec``'s values in a pruned round (int8 ->
    masked-int8, float16 -> masked-f16); a masked codec is its own; ValueError otherwise."""
    if codec in MASKED_CODECS.values():
        return codec
    try:
        return MASKED_CODECS[codec]
    except KeyError:
        raise ValueError(
            f"pruning sends int8 or float16 values (as {', '.join(MASKED_CODECS.values())}),"
            f" not codec {codec!r}"
        ) from None
