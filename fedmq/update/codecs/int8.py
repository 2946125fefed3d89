"""``int8``: symmetric per-tensor quantisation with stochastic rounding, 1 byte per parameter.

``scale = max|x| / 127`` (the ``scale`` param), ``q = floor(x / scale + u)``, ``u ~ U[0, 1)``,
so ``E[q * scale] = x`` (unbiased). Subnormal inputs, whose ``1 / scale`` does not fit
float32, are scaled in float64.
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import DenseCodec, finite_input

__all__ = ["Int8"]

_F32_MAX = float(np.finfo(np.float32).max)
_MAX_SCALE = 1e30
# Largest |q| a finite int8 can hold (-128 is a valid wire value even if encode never makes it).
_Q_PEAK = 128.0


class Int8(DenseCodec):
    name = "int8"
    dtype = "int8"
    params = frozenset({"scale"})

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = finite_input(name, values)
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

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        super().validate(tensor, shape)
        scale = tensor.params["scale"]
        if not 0.0 <= scale < _MAX_SCALE:
            raise WireError(
                f"tensor {tensor.name!r}: bad int8 scale {scale}", RejectReason.BAD_CODEC
            )

    def decode(self, tensor: Tensor) -> np.ndarray:
        return tensor.array().astype(np.float32) * np.float32(tensor.params["scale"])

    def bound(self, tensor: Tensor) -> float:
        return _Q_PEAK * float(tensor.params["scale"]) if tensor.size else 0.0

    def squared_norm(self, tensor: Tensor) -> float:
        """``scale^2 * q.q`` on the int8 values (no dequantised copy)."""
        q = tensor.array().reshape(-1).astype(np.float32)
        scale = float(tensor.params["scale"])
        return scale * scale * float(np.dot(q, q))

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        out = np.empty_like(acc) if scratch is None else scratch
        factor = np.float32(coef * float(tensor.params["scale"]))
        np.multiply(tensor.array(), factor, out=out, casting="unsafe")
        acc += out
