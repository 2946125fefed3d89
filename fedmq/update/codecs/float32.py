"""``float32``: the delta's raw values (exact, 4 bytes per parameter)."""

from __future__ import annotations

import numpy as np

from fedmq.tensor import Tensor
from fedmq.update.codecs.base import DenseCodec, dense_squared_norm, finite_input

__all__ = ["Float32"]


class Float32(DenseCodec):
    name = "float32"
    dtype = "float32"

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        return Tensor.from_array(name, finite_input(name, values))

    def decode(self, tensor: Tensor) -> np.ndarray:
        return tensor.array().astype(np.float32)

    def bound(self, tensor: Tensor) -> float:
        arr = tensor.values()
        if not arr.size:
            return 0.0
        return max(abs(float(arr.max())), abs(float(arr.min())))

    def squared_norm(self, tensor: Tensor) -> float:
        return dense_squared_norm(tensor.array().reshape(-1))  # no copy

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        out = np.empty_like(acc) if scratch is None else scratch
        np.multiply(tensor.array(), np.float32(coef), out=out, casting="unsafe")
        acc += out
