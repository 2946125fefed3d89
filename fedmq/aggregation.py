"""Aggregation math: a running weighted sum of updates and server-side strategies.

Updates are folded as they arrive (memory O(model), not O(devices)). The strategy then
turns the weighted mean of the deltas into the next global weights: FedAvg adds it
(server learning rate 1), FedAvgM adds server momentum, FedAdam uses Adam on the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmq.codecs import CODECS, _int8_scale
from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.wire import Tensor

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "Strategy",
    "WeightedSum",
    "make_strategy",
]

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


class Strategy(Protocol):
    """Turns the global weights and the mean delta into the next global weights."""

    name: str

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights: ...

    def state(self) -> Weights: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


@dataclass
class FedAvg:
    """McMahan et al. 2017: w <- w + server_lr * mean(delta)."""

    server_lr: float = 1.0
    name: str = "fedavg"

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        lr = np.float32(self.server_lr)
        return {n: (global_weights[n] + lr * d).astype(np.float32) for n, d in mean_delta.items()}

    def state(self) -> Weights:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


@dataclass
class FedAvgM:
    """FedAvg with server momentum (Hsu et al. 2019): v <- beta v + delta; w <- w + lr v."""

    server_lr: float = 1.0
    momentum: float = 0.9
    name: str = "fedavgm"

    def __post_init__(self) -> None:
        self._velocity: Weights = {}

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        out: Weights = {}
        for n, d in mean_delta.items():
            v = self._velocity.get(n)
            v = d.copy() if v is None else np.float32(self.momentum) * v + d
            self._velocity[n] = v
            out[n] = (global_weights[n] + np.float32(self.server_lr) * v).astype(np.float32)
        return out

    def state(self) -> Weights:
        return {f"velocity/{n}": v for n, v in self._velocity.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._velocity = {
            k.split("/", 1)[1]: np.asarray(v, np.float32)
            for k, v in state.items()
            if k.startswith("velocity/")
        }


@dataclass
class FedAdam:
    """Adaptive server optimiser (Reddi et al. 2021), the mean delta as pseudo-gradient."""

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    name: str = "fedadam"

    def __post_init__(self) -> None:
        self._m: Weights = {}
        self._v: Weights = {}

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        out: Weights = {}
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        for n, d in mean_delta.items():
            m = b1 * self._m.get(n, np.zeros_like(d)) + (1 - b1) * d
            v = b2 * self._v.get(n, np.zeros_like(d)) + (1 - b2) * d * d
            self._m[n], self._v[n] = m, v
            step = np.float32(self.server_lr) * m / (np.sqrt(v) + np.float32(self.tau))
            out[n] = (global_weights[n] + step).astype(np.float32)
        return out

    def state(self) -> Weights:
        return {
            **{f"m/{n}": v for n, v in self._m.items()},
            **{f"v/{n}": v for n, v in self._v.items()},
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self._v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")}


def make_strategy(name: str, server_lr: float | None = None, momentum: float = 0.9) -> Strategy:
    """Strategy by name: ``fedavg``, ``fedavgm`` or ``fedadam``."""
    if name == "fedavg":
        return FedAvg(server_lr=1.0 if server_lr is None else server_lr)
    if name == "fedavgm":
        return FedAvgM(server_lr=1.0 if server_lr is None else server_lr, momentum=momentum)
    if name == "fedadam":
        return FedAdam(server_lr=0.01 if server_lr is None else server_lr)
    raise ConfigError(f"unknown strategy {name!r} (fedavg, fedavgm, fedadam)")
