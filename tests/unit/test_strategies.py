"""Strategies: same numbers as before the seam, configure, wrap, registry."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from fedmq.errors import ConfigError
from fedmq.update import codecs
from fedmq.update.accumulate import Accumulated, WeightedSum, Weights
from fedmq.update.strategies import (
    ClipMeanDelta,
    FedAdam,
    FedAvg,
    FedAvgM,
    StrategyWrapper,
    make_strategy,
    register_strategy,
    strategy_names,
    unregister_strategy,
)
from fedmq.wire import TrainingConfig

SHAPES = {"w": (6, 5), "b": (5,)}


# The formulas as they were before strategies aggregated an accumulated result.
def _old_fedavg(g: Mapping[str, np.ndarray], d: Weights, lr: float) -> Weights:
    return {n: (g[n] + np.float32(lr) * x).astype(np.float32) for n, x in d.items()}


def _old_fedavgm(g: Mapping[str, np.ndarray], d: Weights, vel: Weights, lr: float,
                 mom: float) -> Weights:
    out = {}
    for n, x in d.items():
        v = vel.get(n)
        v = x.copy() if v is None else np.float32(mom) * v + x
        vel[n] = v
        out[n] = (g[n] + np.float32(lr) * v).astype(np.float32)
    return out


def _old_fedadam(g: Mapping[str, np.ndarray], d: Weights, ms: Weights, vs: Weights,
                 lr: float) -> Weights:
    out = {}
    b1, b2 = np.float32(0.9), np.float32(0.99)
    for n, x in d.items():
        m = b1 * ms.get(n, np.zeros_like(x)) + (1 - b1) * x
        v = b2 * vs.get(n, np.zeros_like(x)) + (1 - b2) * x * x
        ms[n], vs[n] = m, v
        out[n] = (g[n] + np.float32(lr) * m / (np.sqrt(v) + np.float32(1e-3))).astype(np.float32)
    return out


def _rounds(n: int) -> list[Accumulated]:
    rng = np.random.default_rng(3)
    out = []
    for _ in range(n):
        acc = WeightedSum(SHAPES)
        for w in (3.0, 5.0):
            delta = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
            acc.fold(codecs.encode_delta(delta, "int8", rng), "int8", w)
        out.append(acc.result())
    return out


def test_builtin_strategies_give_the_old_numbers_round_after_round() -> None:
    g0 = {k: np.random.default_rng(1).normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    results = _rounds(4)
    for name, lr in [("fedavg", 0.7), ("fedavgm", 1.0), ("fedadam", 0.01)]:
        strategy = make_strategy(name, server_lr=lr, momentum=0.8)
        g_new, g_old = dict(g0), dict(g0)
        vel: Weights = {}
        ms: Weights = {}
        vs: Weights = {}
        for r in results:
            g_new = strategy.aggregate(g_new, r)
            if name == "fedavg":
                g_old = _old_fedavg(g_old, r.mean, lr)
            elif name == "fedavgm":
                g_old = _old_fedavgm(g_old, r.mean, vel, lr, 0.8)
            else:
                g_old = _old_fedadam(g_old, r.mean, ms, vs, lr)
            for k in SHAPES:
                np.testing.assert_array_equal(g_new[k], g_old[k])


def test_default_configure_and_accumulator() -> None:
    base = TrainingConfig(epochs=2, lr=0.1, codec="float16")
    for s in (FedAvg(), FedAvgM(), FedAdam()):
        assert s.configure(7, base) is base
        assert isinstance(s.new_accumulator(SHAPES), WeightedSum)


class _Prox(StrategyWrapper):
    """Tells devices a FedProx mu, changing nothing else."""

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        cfg = self.inner.configure(round_id, base)
        return TrainingConfig(**{**cfg.__dict__, "params": {**cfg.params, "mu": 0.01}})


def test_wrappers_delegate_and_stack() -> None:
    inner = FedAvgM(momentum=0.5)
    wrapped = ClipMeanDelta(_Prox(inner), max_norm=0.5)
    assert wrapped.name == "clipmeandelta(_prox(fedavgm))"
    cfg = wrapped.configure(1, TrainingConfig())
    assert cfg.params == {"mu": 0.01} and cfg.epochs == 1
    g = {"w": np.zeros(4, np.float32)}
    mean = {"w": np.array([3.0, 4.0, 0.0, 0.0], np.float32)}  # norm 5
    out = wrapped.aggregate(g, Accumulated(2, 2.0, mean))
    np.testing.assert_allclose(out["w"], [0.3, 0.4, 0.0, 0.0], rtol=1e-6)
    assert set(wrapped.state()) == {"velocity/w"}  # the inner state passes through
    fresh = ClipMeanDelta(_Prox(FedAvgM(momentum=0.5)), max_norm=0.5)
    fresh.load_state(wrapped.state())
    np.testing.assert_array_equal(fresh.aggregate(out, Accumulated(1, 1.0, mean))["w"],
                                  wrapped.aggregate(out, Accumulated(1, 1.0, mean))["w"])
    small = {"w": np.array([0.1, 0.0, 0.0, 0.0], np.float32)}
    np.testing.assert_array_equal(ClipMeanDelta(FedAvg(), 0.5).aggregate(
        g, Accumulated(1, 1.0, small))["w"], small["w"])
    with pytest.raises(ConfigError):
        ClipMeanDelta(FedAvg(), 0.0)


def test_the_registry_feeds_make_strategy_and_the_aggregator_config() -> None:
    assert strategy_names()[:3] == ("fedavg", "fedavgm", "fedadam")
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("clipped")
    with pytest.raises(ConfigError, match="strategy must be one of"):
        AggregatorConfig(strategy="clipped")
    register_strategy(
        "clipped",
        lambda *, server_lr, momentum: ClipMeanDelta(FedAvg(server_lr or 1.0), max_norm=1.0),
    )
    try:
        assert make_strategy("clipped").name == "clipmeandelta(fedavg)"
        assert AggregatorConfig(strategy="clipped").strategy == "clipped"
        with pytest.raises(ValueError, match="already registered"):
            register_strategy("clipped", lambda *, server_lr, momentum: FedAvg())
    finally:
        unregister_strategy("clipped")
    assert "clipped" not in strategy_names()
