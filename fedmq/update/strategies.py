"""Strategies: what devices are told each round, and accumulated updates -> next weights.

A :class:`Strategy` configures each round (:meth:`~Strategy.configure`: the
:class:`~fedmq.wire.TrainingConfig` devices get, including free-form ``params``), chooses the
accumulator its rounds fold into (:meth:`~Strategy.new_accumulator`), aggregates the
accumulator's :class:`~fedmq.update.accumulate.Accumulated` result into the next global
weights (:meth:`~Strategy.aggregate`) and keeps its server state (``state``/``load_state``).
A :class:`StrategyWrapper` delegates all of it to an inner strategy and overrides what it
changes (DP noise, norm bounding): :class:`ClipMeanDelta` is the worked example.

FedAvg adds the mean delta (server learning rate 1), FedAvgM adds server momentum, FedAdam
uses Adam on the server. :func:`make_strategy` reads the registry
(:func:`register_strategy`, :func:`strategy_names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmq.errors import ConfigError
from fedmq.update.accumulate import Accumulated, Accumulator, WeightedSum, Weights
from fedmq.wire import TrainingConfig

__all__ = [
    "ClipMeanDelta",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "MeanDeltaStrategy",
    "Strategy",
    "StrategyFactory",
    "StrategyWrapper",
    "make_strategy",
    "register_strategy",
    "strategy_names",
    "unregister_strategy",
]


class Strategy(Protocol):
    """Configures rounds and turns their accumulated updates into the next global weights."""

    @property
    def name(self) -> str: ...

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        """The training config devices get for ``round_id`` (``base``: the operator's)."""
        ...

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        """A fresh accumulator for one round of a model with these tensor ``shapes``."""
        ...

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights: ...

    def state(self) -> Weights: ...

    def load_state(self, state: Mapping[str, np.ndarray]) -> None: ...


class MeanDeltaStrategy:
    """Base of strategies that use the weighted mean delta only: the operator's config
    unchanged, a streaming :class:`WeightedSum`, no state unless a subclass keeps one."""

    name = "mean-delta"

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        return base

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return WeightedSum(shapes)

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights:
        return self.apply(global_weights, result.mean)

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        raise NotImplementedError

    def state(self) -> Weights:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


@dataclass
class FedAvg(MeanDeltaStrategy):
    """McMahan et al. 2017: w <- w + server_lr * mean(delta)."""

    server_lr: float = 1.0
    name: str = "fedavg"

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        lr = np.float32(self.server_lr)
        return {n: (global_weights[n] + lr * d).astype(np.float32) for n, d in mean_delta.items()}


@dataclass
class FedAvgM(MeanDeltaStrategy):
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
class FedAdam(MeanDeltaStrategy):
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


class StrategyWrapper:
    """Delegates everything to ``inner``; subclasses override what they change. State keys of
    the inner strategy pass through unchanged (a wrapper with state of its own prefixes it)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return f"{type(self).__name__.lower()}({self.inner.name})"

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        return self.inner.configure(round_id, base)

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return self.inner.new_accumulator(shapes)

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights:
        return self.inner.aggregate(global_weights, result)

    def state(self) -> Weights:
        return self.inner.state()

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state(state)


class ClipMeanDelta(StrategyWrapper):
    """Server-side norm bounding: scales the mean delta down to L2 norm ``max_norm`` (over
    all tensors) before the inner strategy sees it; a smaller delta passes unchanged."""

    def __init__(self, inner: Strategy, max_norm: float) -> None:
        if not (math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(inner)
        self.max_norm = float(max_norm)

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights:
        norm = math.sqrt(
            sum(float(np.square(d, dtype=np.float64).sum()) for d in result.mean.values())
        )
        if norm <= self.max_norm:
            return self.inner.aggregate(global_weights, result)
        factor = np.float32(self.max_norm / norm)
        clipped = {n: (d * factor).astype(np.float32) for n, d in result.mean.items()}
        return self.inner.aggregate(
            global_weights,
            Accumulated(result.count, result.total_weight, clipped, result.updates),
        )


class StrategyFactory(Protocol):
    """Builds a strategy from the aggregator's options (``server_lr`` None = its default)."""

    def __call__(self, *, server_lr: float | None, momentum: float) -> Strategy: ...


_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> None:
    """Make a strategy known to :func:`make_strategy` and the aggregator's config."""
    if not name or not name.isidentifier():
        raise ValueError(f"a strategy name is an identifier, got {name!r}")
    if name in _STRATEGIES and not replace:
        raise ValueError(f"strategy {name!r} is already registered")
    _STRATEGIES[name] = factory


def unregister_strategy(name: str) -> None:
    """Forget a strategy (tests and plugins)."""
    _STRATEGIES.pop(name, None)


def strategy_names() -> tuple[str, ...]:
    return tuple(_STRATEGIES)


def make_strategy(name: str, server_lr: float | None = None, momentum: float = 0.9) -> Strategy:
    """Strategy by registered name: ``fedavg``, ``fedavgm``, ``fedadam`` and any added."""
    factory = _STRATEGIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown strategy {name!r} ({', '.join(_STRATEGIES)})")
    return factory(server_lr=server_lr, momentum=momentum)


def _default(lr: float | None, default: float) -> float:
    return default if lr is None else lr


_builtin: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda *, server_lr, momentum: FedAvg(server_lr=_default(server_lr, 1.0)),
    "fedavgm": lambda *, server_lr, momentum: FedAvgM(
        server_lr=_default(server_lr, 1.0), momentum=momentum
    ),
    "fedadam": lambda *, server_lr, momentum: FedAdam(server_lr=_default(server_lr, 0.01)),
}
for _name, _factory in _builtin.items():
    register_strategy(_name, _factory)
