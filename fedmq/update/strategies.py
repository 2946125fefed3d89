"""Server-side strategies: the global weights and the mean delta to the next weights.

FedAvg adds the mean delta (server learning rate 1), FedAvgM adds server momentum, FedAdam
uses Adam on the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmq.errors import ConfigError
from fedmq.update.accumulate import Weights

__all__ = ["FedAdam", "FedAvg", "FedAvgM", "Strategy", "make_strategy"]


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
