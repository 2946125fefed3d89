"""The codec interface: how one update codec stores, checks, decodes, bounds and sums tensors.

A codec turns a float32 delta into wire tensors on the device and, on the aggregator, checks
a received tensor against the model shape, bounds its largest magnitude and adds it into a
running float32 sum. The fold never branches on codec names: it calls these methods.

Codec state on the device (e.g. an error-feedback residual) is a :data:`CodecState`, a map
of float32 arrays. :meth:`Codec.encode` takes the state stored with the previous update and
returns the new state beside the tensors without mutating its input; the device stores the
new state in the same atomic write as the outbox entry of that update (so a crash either
keeps both or neither) and passes it to the next encode. :func:`pack_state` /
:func:`unpack_state` are the bytes of a state. Stateless codecs return an empty state.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import msgpack
import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor, tensor_from_map

__all__ = [
    "dense_squared_norm",
    "Codec",
    "CodecState",
    "DenseCodec",
    "Encoded",
    "finite_input",
    "pack_state",
    "unpack_state",
]

CodecState = Mapping[str, np.ndarray]
_EMPTY: CodecState = {}


@dataclass(frozen=True)
class Encoded:
    """An encoded delta: its wire tensors and the codec state to store with them."""

    tensors: tuple[Tensor, ...]
    state: CodecState = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("an encoded delta names each tensor once")
        for key, value in self.state.items():
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise ValueError(f"codec state {key!r} must be a float32 array")


class Codec(ABC):
    """One update codec. Subclasses set ``name`` (1-16 characters, the wire's ``codec``)."""

    name: ClassVar[str]
    stateful: ClassVar[bool] = False

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
        state: CodecState | None = None,
    ) -> Encoded:
        """Encode every tensor of ``delta`` (in its order); stateless codecs ignore state."""
        return Encoded(tuple(self.encode_tensor(n, v, rng) for n, v in delta.items()))

    def configure(self, params: Mapping[str, object]) -> Codec:
        """This codec set up for a round's ``TrainingConfig.params`` (the device calls it
        before :meth:`encode`); raises ``ValueError`` on a bad setting. Codecs without
        settings return ``self``; others ignore params they do not know."""
        return self

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        """Encode one float tensor (stateless codecs; stateful ones override :meth:`encode`)."""
        raise NotImplementedError(f"codec {self.name} encodes whole deltas with a state")

    @abstractmethod
    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        """Raise :class:`WireError` unless ``tensor`` is a well-formed encoding of a tensor of
        the model ``shape`` (dtype, element count and byte lengths, params, extra fields)."""

    @abstractmethod
    def decode(self, tensor: Tensor) -> np.ndarray:
        """The float32 values (model shape, a new array) of a validated tensor."""

    @abstractmethod
    def bound(self, tensor: Tensor) -> float:
        """An upper bound of max|decode(tensor)| (float, may be inf), without a scan where the
        storage bounds it."""

    def squared_norm(self, tensor: Tensor) -> float:
        """``||decode(tensor)||^2`` of a validated tensor (float64 when float32 overflows).
        Codecs override it when the storage gives it without a decoded copy."""
        return dense_squared_norm(self.decode(tensor).reshape(-1))

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        """``acc += coef * decode(tensor)`` in float32; ``scratch`` (acc's shape) avoids an
        allocation. Codecs override it when they can add without decoding first."""
        values = self.decode(tensor)
        out = np.empty_like(acc) if scratch is None else scratch
        np.multiply(values, np.float32(coef), out=out)
        acc += out


class DenseCodec(Codec):
    """A codec whose tensor is ``prod(shape)`` values of one wire dtype, named params only."""

    dtype: ClassVar[str]
    params: ClassVar[frozenset[str]] = frozenset()

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        if tensor.shape != shape:
            raise WireError(
                f"tensor {tensor.name!r} has shape {list(tensor.shape)}, the model has "
                f"{list(shape)}",
                RejectReason.SHAPE,
            )
        if tensor.dtype != self.dtype:
            raise WireError(
                f"tensor {tensor.name!r} is {tensor.dtype} but the update's codec is {self.name}",
                RejectReason.BAD_CODEC,
            )
        if not tensor.dense:
            raise WireError(
                f"tensor {tensor.name!r}: {len(tensor.data)} data bytes do not match shape "
                f"{list(shape)} of {self.dtype}",
                RejectReason.SHAPE,
            )
        if set(tensor.params) != self.params or tensor.extra:
            raise WireError(
                f"tensor {tensor.name!r}: codec {self.name} takes params "
                f"{sorted(self.params)} and no extra fields, got {sorted(tensor.params)} and "
                f"{sorted(tensor.extra)}",
                RejectReason.BAD_CODEC,
            )


def pack_state(state: CodecState) -> bytes:
    """The bytes of a codec state (msgpack; empty state -> a tiny map)."""
    tensors = [Tensor.from_array(k, np.asarray(v, np.float32)).to_map() for k, v in state.items()]
    out = msgpack.packb({"codec_state": 1, "tensors": tensors}, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def unpack_state(data: bytes, max_bytes: int = 256 * 1024 * 1024) -> CodecState:
    """A codec state from :func:`pack_state` bytes; raises :class:`WireError` when damaged."""
    if len(data) > max_bytes:
        raise WireError(f"codec state of {len(data)} bytes exceeds {max_bytes}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as exc:  # msgpack raises several types on garbage
        raise WireError(f"codec state is not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("codec_state") != 1:
        raise WireError("not a codec state")
    raw = obj.get("tensors")
    if not isinstance(raw, list):
        raise WireError("codec state has no tensor list")
    out: dict[str, np.ndarray] = {}
    for item in raw:
        t = tensor_from_map(item, max_bytes)
        if t.dtype != "float32" or t.name in out:
            raise WireError(f"codec state tensor {t.name!r} is not a unique float32 tensor")
        out[t.name] = np.array(t.array(), dtype=np.float32)
    return out if out else _EMPTY


def dense_squared_norm(values: np.ndarray) -> float:
    """``sum(values**2)`` of a flat float array: in float32, redone in float64 when the
    squares overflow (values near float32's limit)."""
    x = values if values.dtype == np.float32 else values.astype(np.float32)
    with np.errstate(over="ignore"):
        sq = float(np.dot(x, x))
    if not math.isfinite(sq):
        x64 = x.astype(np.float64)
        sq = float(np.dot(x64, x64))
    return sq


def finite_input(name: str, values: np.ndarray) -> np.ndarray:
    """``values`` as float32, refusing NaN and infinity (what every encoder needs first)."""
    x = np.asarray(values, dtype=np.float32)
    if not np.isfinite(x).all():
        raise WireError(f"tensor {name!r} holds NaN or infinite values", RejectReason.NON_FINITE)
    return x
