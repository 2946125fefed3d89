"""Strategies: what devices are told each round, and accumulated updates -> next weights.

A :class:`Strategy` configures each round (:meth:`~Strategy.configure`: the
:class:`~fedmq.wire.TrainingConfig` devices get, including free-form ``params``), chooses the
accumulator its rounds fold into (:meth:`~Strategy.new_accumulator`), aggregates the
accumulator's :class:`~fedmq.update.accumulate.Accumulated` result into the next global
weights (:meth:`~Strategy.aggregate`) and keeps its server state (``state``/``load_state``).
A :class:`StrategyWrapper` delegates all of it to an inner strategy and overrides what it
changes (DP noise, norm bounding): :class:`ClipMeanDelta` is the worked example.

FedAvg adds the mean delta (server learning rate 1), FedNova the step-normalized one (a
streaming :class:`~fedmq.update.normalized.NormalizedSum`), FedAvgM adds server momentum, FedAdam,
FedYogi and FedAdagrad are Reddi et al.'s adaptive servers (:class:`AdaptiveServer`). The
robust aggregators and wrappers (median, trimmed mean, Multi-Krum, norm bounding, outlier
zeroing) are in :mod:`fedmq.update.robust`. :func:`make_strategy` reads the registry
(:func:`register_strategy`, :func:`register_strategy_with_options`, :func:`strategy_names`)
and applies the wrappers :class:`StrategyOptions` asks for; docs/strategies.md lists them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedmq.errors import ConfigError
from fedmq.update.accumulate import Accumulated, Accumulator, WeightedSum, Weights
from fedmq.update.normalized import NormalizedSum
from fedmq.wire import TrainingConfig

__all__ = [
    "CLIP_MODES",
    "AdaptiveServer",
    "ClipMeanDelta",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedNova",
    "FedProx",
    "FedSGD",
    "FedYogi",
    "MeanDeltaStrategy",
    "Strategy",
    "StrategyFactory",
    "StrategyOptions",
    "StepsDelta",
    "StrategyWrapper",
    "fednova_delta",
    "make_strategy",
    "register_strategy",
    "register_strategy_with_options",
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
class AdaptiveServer(MeanDeltaStrategy):
    """Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2: the weighted mean
    delta is the pseudo-gradient ``d``; ``m <- beta1 m + (1 - beta1) d``, ``v`` by the
    subclass's rule, ``w <- w + server_lr * m / (sqrt(v) + tau)``.

    Algorithm 2 has no bias correction; ``bias_correction=True`` (off by default) divides
    ``m`` by ``1 - beta1^t`` and, for Adam and Yogi whose ``v`` is an exponential average,
    ``v`` by ``1 - beta2^t`` (``t``: rounds aggregated, kept in the state as ``step``).
    """

    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False
    name: str = "adaptive"
    #: v before the first round (Algorithm 2 asks v_-1 >= tau^2); FedAdam keeps its 0.
    _v_initial_is_tau_squared = True
    #: whether ``v`` is an exponential average (bias-corrected by ``1 - beta2^t``).
    _v_is_average = True

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        for key in ("server_lr", "tau"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{self.name}: {key} must be > 0, got {value}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(f"{self.name}: {key} must be in [0, 1), got {value}")
        self._m: Weights = {}
        self._v: Weights = {}
        self._step = 0

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _initial_v(self, d: np.ndarray) -> np.ndarray:
        if self._v_initial_is_tau_squared:
            return np.full_like(d, np.float32(self.tau) * np.float32(self.tau))
        return np.zeros_like(d)

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        out: Weights = {}
        b1 = np.float32(self.beta1)
        self._step += 1
        for n, d in mean_delta.items():
            m = b1 * self._m.get(n, np.zeros_like(d)) + (1 - b1) * d
            v = self._second_moment(self._v[n] if n in self._v else self._initial_v(d), d)
            self._m[n], self._v[n] = m, v
            if self.bias_correction:
                m = m / np.float32(1 - self.beta1**self._step)
                if self._v_is_average:
                    v = v / np.float32(1 - self.beta2**self._step)
            step = np.float32(self.server_lr) * m / (np.sqrt(v) + np.float32(self.tau))
            out[n] = (global_weights[n] + step).astype(np.float32)
        return out

    def state(self) -> Weights:
        return {
            **{f"m/{n}": v for n, v in self._m.items()},
            **{f"v/{n}": v for n, v in self._v.items()},
            "step": np.array([self._step], np.int64),
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self._v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")}
        step = state.get("step")
        self._step = 0 if step is None else int(np.asarray(step).reshape(-1)[0])


@dataclass
class FedAdam(AdaptiveServer):
    """Adam on the server: ``v <- beta2 v + (1 - beta2) d^2`` from ``v = 0`` (as before
    FedYogi/FedAdagrad existed; Algorithm 2's ``v_-1 >= tau^2`` is used by those two)."""

    name: str = "fedadam"
    _v_initial_is_tau_squared = False

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        b2 = np.float32(self.beta2)
        return b2 * v + (1 - b2) * d * d


@dataclass
class FedYogi(AdaptiveServer):
    """Yogi on the server: ``v <- v - (1 - beta2) d^2 sign(v - d^2)`` from ``v = tau^2``."""

    name: str = "fedyogi"

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        d2 = d * d
        return v - (1 - np.float32(self.beta2)) * d2 * np.sign(v - d2)


@dataclass
class FedAdagrad(AdaptiveServer):
    """Adagrad on the server: ``v <- v + d^2`` from ``v = tau^2`` (``beta2`` unused)."""

    name: str = "fedadagrad"
    _v_is_average = False

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        return v + d * d


@dataclass
class FedProx(FedAvg):
    """Li et al. 2020, "Federated Optimization in Heterogeneous Networks": FedAvg whose
    devices minimise ``loss + (mu/2) ||w - w_global||^2``; :meth:`configure` puts ``mu`` in
    the round's params (a device whose model lacks the ``train_prox`` signature skips the
    round). ``mu = 0`` is FedAvg."""

    mu: float = 0.01
    name: str = "fedprox"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"fedprox: prox_mu must be >= 0, got {self.mu}")

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        return dataclasses.replace(base, params={**base.params, "mu": float(self.mu)})


@dataclass
class FedSGD(MeanDeltaStrategy):
    """Gradient aggregation (McMahan et al. 2017, FedSGD): devices send the gradient of
    their mean loss at the global weights over at most ``grad_examples`` examples
    (``mode = "gradient"`` in the round's params); the example-weighted mean ``g`` is a
    gradient: ``w <- w - server_lr * g``, or Adam on ``g`` with ``adam = True``
    (``m <- b1 m + (1-b1) g``, ``v <- b2 v + (1-b2) g^2``, bias-corrected,
    ``w <- w - server_lr * m_hat / (sqrt(v_hat) + tau)``)."""

    server_lr: float = 0.1
    grad_examples: int = 64
    adam: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    tau: float = 1e-8
    name: str = "fedsgd"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"fedsgd: server_lr must be > 0, got {self.server_lr}")
        _integer(self.grad_examples, 1, "grad_examples")
        self._m: Weights = {}
        self._v: Weights = {}
        self._step = 0

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        params = {**base.params, "mode": "gradient", "grad_examples": self.grad_examples}
        return dataclasses.replace(base, params=params)

    def apply(self, global_weights: Mapping[str, np.ndarray], mean_delta: Weights) -> Weights:
        lr = np.float32(self.server_lr)
        if not self.adam:
            return {
                n: (global_weights[n] - lr * g).astype(np.float32) for n, g in mean_delta.items()
            }
        self._step += 1
        b1, b2 = np.float32(self.beta1), np.float32(self.beta2)
        c1 = np.float32(1 - self.beta1**self._step)
        c2 = np.float32(1 - self.beta2**self._step)
        out: Weights = {}
        for n, g in mean_delta.items():
            m = b1 * self._m.get(n, np.zeros_like(g)) + (1 - b1) * g
            v = b2 * self._v.get(n, np.zeros_like(g)) + (1 - b2) * g * g
            self._m[n], self._v[n] = m, v
            step = lr * (m / c1) / (np.sqrt(v / c2) + np.float32(self.tau))
            out[n] = (global_weights[n] - step).astype(np.float32)
        return out

    def state(self) -> Weights:
        if not self.adam:
            return {}
        return {
            **{f"m/{n}": v for n, v in self._m.items()},
            **{f"v/{n}": v for n, v in self._v.items()},
            "step": np.array([self._step], np.int64),
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._m = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("m/")}
        self._v = {k[2:]: np.asarray(v, np.float32) for k, v in state.items() if k.startswith("v/")}
        step = state.get("step")
        self._step = 0 if step is None else int(np.asarray(step).reshape(-1)[0])


@dataclass(frozen=True)
class StepsDelta:
    """One device's decoded delta, fold weight (example count) and local SGD step count."""

    delta: Weights
    weight: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be > 0, got {self.weight}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")


def fednova_delta(updates: Sequence[StepsDelta]) -> Weights:
    """Wang et al. 2020 (FedNova), the FedAvg-with-SGD case: with ``p_i = n_i / sum n``,
    ``tau_eff = sum_i p_i tau_i`` and the step ``tau_eff * sum_i p_i d_i / tau_i`` (float64
    sums, float32 result). Equal step counts give FedAvg's weighted mean delta."""
    if not updates:
        raise ValueError("FedNova needs at least one update")
    total = math.fsum(u.weight for u in updates)
    p = [u.weight / total for u in updates]
    tau_eff = math.fsum(pi * u.steps for pi, u in zip(p, updates, strict=True))
    out: Weights = {}
    for name in updates[0].delta:
        acc = np.zeros(updates[0].delta[name].shape, np.float64)
        for pi, u in zip(p, updates, strict=True):
            acc += (pi / u.steps) * np.asarray(u.delta[name], np.float64)
        out[name] = (tau_eff * acc).astype(np.float32)
    return out


@dataclass
class FedNova(FedAvg):
    """FedNova: ``w <- w + server_lr * fednova_delta(updates)``, streamed. Devices report
    their local step count with each update (``steps``); the round folds into a
    :class:`~fedmq.update.normalized.NormalizedSum` (O(model), no buffer) whose result is
    FedNova's normalized step, which :class:`FedAvg` then applies. :meth:`aggregate_steps`
    computes the same from decoded updates in-process (bench/bench_local_variants.py)."""

    server_lr: float = 1.0
    name: str = "fednova"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"fednova: server_lr must be > 0, got {self.server_lr}")

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return NormalizedSum(shapes)

    def aggregate_steps(
        self, global_weights: Mapping[str, np.ndarray], updates: Sequence[StepsDelta]
    ) -> Weights:
        return self.apply(global_weights, fednova_delta(updates))


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


CLIP_MODES = ("off", "fixed", "adaptive")


@dataclass(frozen=True)
class StrategyOptions:
    """Every strategy setting the aggregator reads (docs/strategies.md lists them).

    ``server_lr`` None = the strategy's default. Adaptive servers: ``beta1``, ``beta2``,
    ``tau``, ``bias_correction``. Robust ones: ``robust_buffer`` (updates kept per round),
    ``trim`` (fraction trimmed each side), ``krum_f`` (Byzantine devices assumed), ``krum_m``
    (updates averaged; 0 = n - f). Wrappers: ``clip_updates`` (``off``/``fixed``/
    ``adaptive``) with ``clip_norm`` or ``clip_multiplier``; ``zero_outliers_k`` (0 = off).
    ``fedprox``: ``prox_mu``. ``fedsgd``: ``grad_examples``, ``server_adam`` (with ``beta1``,
    ``beta2``, ``tau``). ``fednova``: ``server_lr`` only (no wrappers: it streams).
    """

    server_lr: float | None = None
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    bias_correction: bool = False
    robust_buffer: int = 64
    trim: float = 0.1
    krum_f: int = 1
    krum_m: int = 0
    clip_updates: str = "off"
    clip_norm: float = 0.0
    clip_multiplier: float = 1.0
    zero_outliers_k: float = 0.0
    prox_mu: float = 0.01
    grad_examples: int = 64
    server_adam: bool = False

    def __post_init__(self) -> None:
        lr = self.server_lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"server_lr must be > 0, got {lr}")
        for key in ("momentum", "beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in [0, 1), got {getattr(self, key)}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        _integer(self.robust_buffer, 1, "robust_buffer")
        _integer(self.krum_f, 0, "krum_f")
        _integer(self.krum_m, 0, "krum_m")
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {self.trim}")
        if self.clip_updates not in CLIP_MODES:
            raise ConfigError(
                f"clip_updates must be one of {CLIP_MODES}, got {self.clip_updates!r}"
            )
        if self.clip_updates == "fixed" and not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            raise ConfigError(f'clip_updates = "fixed" needs clip_norm > 0, got {self.clip_norm}')
        if not (math.isfinite(self.clip_multiplier) and self.clip_multiplier > 0):
            raise ConfigError(f"clip_multiplier must be > 0, got {self.clip_multiplier}")
        if not (math.isfinite(self.zero_outliers_k) and self.zero_outliers_k >= 0):
            raise ConfigError(f"zero_outliers_k must be >= 0, got {self.zero_outliers_k}")
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ConfigError(f"prox_mu must be >= 0, got {self.prox_mu}")
        _integer(self.grad_examples, 1, "grad_examples")

    def min_updates_needed(self, strategy: str) -> int:
        """The fewest updates a round of ``strategy`` must aggregate (Krum: 2f + 3)."""
        return 2 * self.krum_f + 3 if strategy == "krum" else 1


def _integer(value: int, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


_STRATEGIES: dict[str, Callable[[StrategyOptions], Strategy]] = {}


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> None:
    """Make a strategy known to :func:`make_strategy` and the aggregator's config."""
    register_strategy_with_options(
        name,
        lambda o: factory(server_lr=o.server_lr, momentum=o.momentum),
        replace=replace,
    )


def register_strategy_with_options(
    name: str, factory: Callable[[StrategyOptions], Strategy], *, replace: bool = False
) -> None:
    """Like :func:`register_strategy` for a factory that reads every :class:`StrategyOptions`."""
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


def make_strategy(
    name: str,
    server_lr: float | None = None,
    momentum: float = 0.9,
    *,
    options: StrategyOptions | None = None,
) -> Strategy:
    """Strategy by registered name (``fedavg``, ``fedavgm``, ``fedadam``, ``fedyogi``,
    ``fedadagrad``, ``fedprox``, ``fednova``, ``fedsgd``, ``median``, ``trimmed_mean``,
    ``krum`` and any added), wrapped as ``options`` asks (outermost first: outlier
    zeroing, then norm bounding).
    ``options`` replaces ``server_lr`` and ``momentum`` when given."""
    factory = _STRATEGIES.get(name)
    if factory is None:
        raise ConfigError(f"unknown strategy {name!r} ({', '.join(_STRATEGIES)})")
    opts = options or StrategyOptions(server_lr=server_lr, momentum=momentum)
    strategy = factory(opts)
    wrapped = opts.clip_updates != "off" or opts.zero_outliers_k > 0
    if wrapped and isinstance(strategy.new_accumulator({"probe": (1,)}), NormalizedSum):
        raise ConfigError(
            f"strategy {name!r} normalises each update by its step count while it streams; "
            "clip_updates and zero_outliers_k buffer the updates instead: not supported together"
        )
    if opts.clip_updates != "off":
        strategy = _robust.NormBound(
            strategy,
            fixed=opts.clip_norm if opts.clip_updates == "fixed" else None,
            multiplier=opts.clip_multiplier,
            capacity=opts.robust_buffer,
        )
    if opts.zero_outliers_k > 0:
        strategy = _robust.ZeroOutliers(strategy, opts.zero_outliers_k, opts.robust_buffer)
    return strategy


def _default(lr: float | None, default: float) -> float:
    return default if lr is None else lr


def _adaptive(cls: type[AdaptiveServer]) -> Callable[[StrategyOptions], Strategy]:
    def build(o: StrategyOptions) -> Strategy:
        return cls(
            server_lr=_default(o.server_lr, 0.01), beta1=o.beta1, beta2=o.beta2, tau=o.tau,
            bias_correction=o.bias_correction,
        )

    return build


_builtin: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda *, server_lr, momentum: FedAvg(server_lr=_default(server_lr, 1.0)),
    "fedavgm": lambda *, server_lr, momentum: FedAvgM(
        server_lr=_default(server_lr, 1.0), momentum=momentum
    ),
}
for _name, _factory in _builtin.items():
    register_strategy(_name, _factory)
for _key, _cls in (("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)):
    register_strategy_with_options(_key, _adaptive(_cls))
register_strategy_with_options(
    "fedprox", lambda o: FedProx(server_lr=_default(o.server_lr, 1.0), mu=o.prox_mu)
)
register_strategy_with_options(
    "fednova", lambda o: FedNova(server_lr=_default(o.server_lr, 1.0))
)
register_strategy_with_options(
    "fedsgd",
    lambda o: FedSGD(
        server_lr=_default(o.server_lr, 0.1), grad_examples=o.grad_examples,
        adam=o.server_adam, beta1=o.beta1, beta2=o.beta2, tau=o.tau,
    ),
)

# The robust strategies (median, trimmed_mean, krum) register themselves; they build on the
# seams above, hence this import after them.
from fedmq.update import robust as _robust  # noqa: E402
