"""Accumulators: a running weighted sum of updates, folded as they arrive.

Memory is O(model), not O(devices): each decoded update is added and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.update.codecs import CODECS, _int8_scale
from fedmq.wire import Tensor

__all__ = ["WeightedSum", "Weights"]

Weights = dict[str, np.ndarray]
# Largest magnitude a finite value of these wire dtypes can have.
_DTYPE_PEAK = {"float16": 65504.0, "int8": 128.0, "uint8": 255.0}
_F32_MAX = float(np.finfo(np.float32).max)


class WeightedSum:
    """Sum over updates of ``weight * delta`` plus the total weight, folded one at a time."""

    def __init__(self, template: Mapping[str, tuple[int, ...]]) -> None:
        if not template:
            raise ValueError("template must name at least one tensor")
        self._shapes = {name: tuple(shape) for name, shape in template.items()}
        self._sum = {n: np.zeros(s, np.float32) for n, s in self._shapes.items()}
        self._scratch = {n: np.empty(s, np.float32) for n, s in self._shapes.items()}
        # Per tensor, an upper bound of max|sum| (sum of weight * max|delta| folded so far):
        # an update that could push the float32 sum to infinity is refused before folding.
        self._bound = dict.fromkeys(self._shapes, 0.0)
        self.total_weight = 0.0
        self.count = 0

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._shapes

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float | None = None) -> None:
        """Raise :class:`WireError` unless ``tensors`` match the model exactly (and, given the
        ``weight`` it would be folded with, unless it could overflow the float32 sum)."""
        tensors = tuple(tensors)
        if codec not in CODECS:
            raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
        seen: set[str] = set()
        for t in tensors:
            shape = self._shapes.get(t.name)
            if shape is None:
                raise WireError(f"unknown tensor {t.name!r}", RejectReason.SHAPE)
            if t.shape != shape:
                raise WireError(
                    f"tensor {t.name!r} has shape {list(t.shape)}, the model has {list(shape)}",
                    RejectReason.SHAPE,
                )
            if t.dtype != codec:
                raise WireError(
                    f"tensor {t.name!r} is {t.dtype} but the update's codec is {codec}",
                    RejectReason.BAD_CODEC,
                )
            if codec == "int8":
                _int8_scale(t)
            seen.add(t.name)
        missing = set(self._shapes) - seen
        if missing:
            raise WireError(f"missing tensors {sorted(missing)}", RejectReason.SHAPE)
        if weight is not None:
            self._check_range(self._magnitudes(tensors, codec, weight), weight)

    @staticmethod
    def _magnitudes(tensors: Iterable[Tensor], codec: str, weight: float) -> dict[str, float]:
        """``weight * max|decoded values|`` of each tensor (float64, may be inf)."""
        out: dict[str, float] = {}
        for t in tensors:
            arr = t.array()
            if not arr.size:
                peak = 0.0
            elif t.dtype in _DTYPE_PEAK:
                # The dtype bounds the values: no scan (float16 reductions are slow).
                peak = _DTYPE_PEAK[t.dtype]
            else:
                peak = max(abs(float(arr.max())), abs(float(arr.min())))
            scale = _int8_scale(t) if codec == "int8" else 1.0
            out[t.name] = float(weight) * scale * peak
        return out

    def _check_range(self, magnitudes: Mapping[str, float], weight: float) -> None:
        for name, m in magnitudes.items():
            if not self._bound[name] + m <= _F32_MAX:  # also false for inf and nan
                raise WireError(
                    f"tensor {name!r} with weight {weight:g} could overflow the float32 sum",
                    RejectReason.NON_FINITE,
                )

    def fold(self, tensors: Iterable[Tensor], codec: str, weight: float) -> None:
        """Add ``weight * decode(tensors)``; checks everything before touching the sum."""
        tensors = tuple(tensors)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        self.check(tensors, codec)
        magnitudes = self._magnitudes(tensors, codec, weight)
        self._check_range(magnitudes, weight)
        for name, m in magnitudes.items():
            self._bound[name] += m
        for t in tensors:
            acc = self._sum[t.name]
            scratch = self._scratch[t.name]
            coef = np.float32(weight * (_int8_scale(t) if codec == "int8" else 1.0))
            np.multiply(t.array(), coef, out=scratch, casting="unsafe")
            acc += scratch
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Weights:
        if self.count == 0 or self.total_weight <= 0:
            raise ValueError("no update was folded")
        inv = np.float32(1.0 / self.total_weight)
        return {n: s * inv for n, s in self._sum.items()}
