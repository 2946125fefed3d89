"""FedProx's configure, FedSGD's server step (SGD and Adam), FedNova's normalized average."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from fedmq.errors import ConfigError
from fedmq.update import codecs
from fedmq.update.accumulate import Accumulated, WeightedSum
from fedmq.update.strategies import (
    FedNova,
    FedProx,
    FedSGD,
    StepsDelta,
    StrategyOptions,
    fednova_delta,
    make_strategy,
)
from fedmq.wire import TrainingConfig

BASE = TrainingConfig(epochs=2, lr=0.1, codec="int8", params={"other": 1})


def test_fedprox_puts_mu_in_the_round_params_and_aggregates_like_fedavg() -> None:
    s = make_strategy("fedprox", options=StrategyOptions(prox_mu=0.25))
    assert isinstance(s, FedProx) and s.name == "fedprox"
    cfg = s.configure(3, BASE)
    assert dict(cfg.params) == {"other": 1, "mu": 0.25}
    assert (cfg.epochs, cfg.lr, cfg.codec) == (2, 0.1, "int8")
    assert TrainingConfig.from_dict(cfg.to_dict()).params["mu"] == 0.25  # survives the wire
    g = {"w": np.array([1.0, 2.0], np.float32)}
    mean = {"w": np.array([0.5, -1.0], np.float32)}
    out = s.aggregate(g, Accumulated(2, 3.0, mean))
    np.testing.assert_array_equal(out["w"], np.array([1.5, 1.0], np.float32))
    assert AggregatorConfig(strategy="fedprox", prox_mu=0.5).strategy_options().prox_mu == 0.5
    with pytest.raises(ConfigError, match="prox_mu"):
        AggregatorConfig(strategy="fedprox", prox_mu=-1.0)


def test_fedsgd_asks_for_gradients_and_steps_against_the_mean() -> None:
    s = make_strategy("fedsgd", server_lr=0.5)
    assert isinstance(s, FedSGD)
    assert dict(s.configure(1, BASE).params) == {"other": 1, "mode": "gradient",
                                                  "grad_examples": 64}
    acc = WeightedSum({"w": (2,)})
    acc.fold(codecs.encode_delta({"w": np.array([1.0, 4.0], np.float32)}, "float32",
                                 np.random.default_rng(0)), "float32", 1.0)
    acc.fold(codecs.encode_delta({"w": np.array([3.0, 0.0], np.float32)}, "float32",
                                 np.random.default_rng(0)), "float32", 3.0)
    out = s.aggregate({"w": np.array([10.0, 10.0], np.float32)}, acc.result())
    # mean gradient [2.5, 1.0]; w - 0.5 g
    np.testing.assert_array_equal(out["w"], np.array([8.75, 9.5], np.float32))


def test_fedsgd_adam_matches_the_formula_and_restores_its_state() -> None:
    opts = StrategyOptions(server_lr=0.1, server_adam=True, beta1=0.9, beta2=0.99, tau=1e-3)
    a, b = make_strategy("fedsgd", options=opts), make_strategy("fedsgd", options=opts)
    w = {"w": np.array([1.0, -1.0], np.float32)}
    grads = [np.array([0.2, -0.4], np.float32), np.array([0.1, 0.3], np.float32)]
    wa = a.aggregate(w, Accumulated(1, 1.0, {"w": grads[0]}))
    b.load_state(a.state())  # a restart between the rounds
    wa2 = a.aggregate(wa, Accumulated(1, 1.0, {"w": grads[1]}))
    wb2 = b.aggregate(wa, Accumulated(1, 1.0, {"w": grads[1]}))
    np.testing.assert_array_equal(wa2["w"], wb2["w"])
    # round 1 by hand: m = 0.1 g, v = 0.01 g^2, bias-corrected m_hat = g, v_hat = g^2
    g = grads[0].astype(np.float64)
    np.testing.assert_allclose(wa["w"], w["w"] - 0.1 * g / (np.abs(g) + 1e-3), rtol=1e-6)


def test_fednova_matches_the_formula_with_hand_numbers() -> None:
    ups = [
        StepsDelta({"w": np.array([2.0, 4.0], np.float32)}, weight=1.0, steps=1),
        StepsDelta({"w": np.array([6.0, 0.0], np.float32)}, weight=3.0, steps=3),
    ]
    # p = (1/4, 3/4); tau_eff = 1/4 + 9/4 = 2.5; sum p d / tau = [0.5, 1] + [1.5, 0] = [2, 1]
    np.testing.assert_array_equal(fednova_delta(ups)["w"], np.array([5.0, 2.5], np.float32))
    out = FedNova(server_lr=0.5).aggregate_steps({"w": np.zeros(2, np.float32)}, ups)
    np.testing.assert_array_equal(out["w"], np.array([2.5, 1.25], np.float32))
    # FedAvg of the same would be [5, 1]: the device that took more steps counts less
    with pytest.raises(ValueError, match="steps"):
        StepsDelta({"w": np.zeros(2, np.float32)}, weight=1.0, steps=0)


def test_fednova_with_equal_steps_is_fedavg() -> None:
    rng = np.random.default_rng(7)
    shapes = {"k": (4, 3), "b": (3,)}
    acc = WeightedSum(shapes)
    ups = []
    for weight in (5.0, 2.0, 9.0):
        delta = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in shapes.items()}
        acc.fold(codecs.encode_delta(delta, "float32", rng), "float32", weight)
        ups.append(StepsDelta(delta, weight, steps=7))
    g = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in shapes.items()}
    fedavg = make_strategy("fedavg").aggregate(g, acc.result())
    nova = FedNova().aggregate_steps(g, ups)
    for n in shapes:
        np.testing.assert_allclose(nova[n], fedavg[n], rtol=1e-6, atol=1e-7)
