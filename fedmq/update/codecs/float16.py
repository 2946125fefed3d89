"""``float16``: half precision, 2 bytes per parameter; deltas beyond its range are refused."""

from __future__ import annotations

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import DenseCodec, finite_input

__all__ = ["Float16"]

_F16_MAX = float(np.finfo(np.float16).max)


class Float16(DenseCodec):
    name = "float16"
    dtype = "float16"

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = finite_input(name, values)
        if x.size and float(np.abs(x).max()) > _F16_MAX:
            raise WireError(f"tensor {name!r} overflows float16", RejectReason.BAD_CODEC)
        return Tensor.from_array(name, x.astype(np.float16))

    def decode(self, tensor: Tensor) -> np.ndarray:
        return tensor.array().astype(np.float32)

    def bound(self, tensor: Tensor) -> float:
        # The dtype bounds the (finite) values: no scan (float16 reductions are slow).
        return _F16_MAX if tensor.size else 0.0

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        out = np.empty_like(acc) if scratch is None else scratch
        np.multiply(tensor.array(), np.float32(coef), out=out, casting="unsafe")
        acc += out
