"""FedYogi and FedAdagrad against Reddi et al. 2021 Algorithm 2 written out by hand; state
survives a restart of the real engine over the same state directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.engine import resolve_bundle
from aggregator.store import Store
from fedmq.errors import ConfigError
from fedmq.models.spec import ModelBundle
from fedmq.update.accumulate import Accumulated
from fedmq.update.strategies import (
    FedAdagrad,
    FedAdam,
    FedYogi,
    StrategyOptions,
    make_strategy,
)
from tests.fakes import exact_delta, model_weights
from tests.unit.test_engine import T0, Harness, _config, _models

SHAPES = {"w": (4, 3), "b": (3,)}


def _deltas(rounds: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [
        {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in range(rounds)
    ]


def _by_hand(kind: str, deltas: list[dict[str, np.ndarray]], lr: float, tau: float,
             b1: float, b2: float, correct: bool) -> dict[str, np.ndarray]:
    """Algorithm 2 in float64: m_-1 = 0, v_-1 = tau^2 (Yogi, Adagrad), x += lr m/(sqrt v+tau)."""
    x = {k: np.zeros(s) for k, s in SHAPES.items()}
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.full(s, tau * tau) for k, s in SHAPES.items()}
    for t, d32 in enumerate(deltas, start=1):
        for k in SHAPES:
            d = d32[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * d
            if kind == "fedyogi":
                v[k] = v[k] - (1 - b2) * d * d * np.sign(v[k] - d * d)
            else:
                v[k] = v[k] + d * d
            mh, vh = m[k], v[k]
            if correct:
                mh = mh / (1 - b1**t)
                if kind == "fedyogi":
                    vh = vh / (1 - b2**t)
            x[k] = x[k] + lr * mh / (np.sqrt(vh) + tau)
    return x


@pytest.mark.parametrize("kind", ["fedyogi", "fedadagrad"])
@pytest.mark.parametrize("correct", [False, True])
def test_adaptive_servers_follow_algorithm_2_over_rounds(kind: str, correct: bool) -> None:
    deltas = _deltas(6)
    strategy = make_strategy(
        kind, options=StrategyOptions(server_lr=0.03, bias_correction=correct)
    )
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for d in deltas:
        g = strategy.aggregate(g, Accumulated(2, 2.0, d))
    want = _by_hand(kind, deltas, 0.03, 1e-3, 0.9, 0.99, correct)
    for k in SHAPES:
        np.testing.assert_allclose(g[k], want[k], rtol=2e-5, atol=1e-7)
    assert int(strategy.state()["step"][0]) == 6


def test_yogi_and_adagrad_differ_from_adam_where_the_paper_says() -> None:
    """Adagrad's v only grows; Yogi's v moves towards d^2 by (1 - beta2) d^2 per round."""
    d = {"w": np.full((4, 3), 0.5, np.float32), "b": np.zeros(3, np.float32)}
    yogi, ada = FedYogi(), FedAdagrad()
    g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    yogi.aggregate(g, Accumulated(1, 1.0, d))
    ada.aggregate(g, Accumulated(1, 1.0, d))
    tau2 = np.float32(1e-3) * np.float32(1e-3)
    np.testing.assert_allclose(yogi.state()["v/w"], tau2 + np.float32(0.01) * 0.25, rtol=1e-6)
    np.testing.assert_allclose(ada.state()["v/w"], tau2 + 0.25, rtol=1e-6)
    np.testing.assert_array_equal(yogi.state()["v/b"], np.full(3, tau2))  # zero d: v stays


def test_state_round_trip_gives_the_same_next_round() -> None:
    deltas = _deltas(4)
    for cls in (FedAdam, FedYogi, FedAdagrad):
        a = cls(bias_correction=True)
        g = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        for d in deltas[:3]:
            g = a.aggregate(g, Accumulated(1, 1.0, d))
        b = cls(bias_correction=True)
        b.load_state(a.state())
        ga, gb = a.aggregate(g, Accumulated(1, 1.0, deltas[3])), b.aggregate(
            g, Accumulated(1, 1.0, deltas[3])
        )
        for k in SHAPES:
            np.testing.assert_array_equal(ga[k], gb[k])


def test_defaults_and_validation() -> None:
    for name in ("fedadam", "fedyogi", "fedadagrad"):
        s = make_strategy(name)
        assert isinstance(s, FedAdam | FedYogi | FedAdagrad)
        assert (s.server_lr, s.tau, s.beta1, s.beta2, s.bias_correction) == (
            0.01, 1e-3, 0.9, 0.99, False)
    with pytest.raises(ConfigError, match="tau"):
        FedYogi(tau=0.0)
    with pytest.raises(ConfigError, match="beta2"):
        FedAdagrad(beta2=1.0)
    with pytest.raises(ConfigError, match="tau"):
        StrategyOptions(tau=-1.0)


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


def _two_rounds(tmp_path: Path, bundle: ModelBundle, strategy: str, restart: bool,
                **kw: object) -> dict[str, np.ndarray]:
    cfg = _config(tmp_path, strategy=strategy, min_updates=2, clients_per_round=2, **kw)
    h = Harness(cfg, bundle)
    shapes = h.shapes
    for i, dev in enumerate(("a", "b")):
        assert h.update(dev, exact_delta(shapes, i), 1 + i).accepted
    assert [m.version for m in _models(h.engine.tick(T0 + 2))] == [1]
    if restart:  # the process stops between rounds; a new one reads the same state dir
        h.close()
        h = Harness(cfg, bundle)
        assert [m.version for m in _models(h.out)] == [1]
    for i, dev in enumerate(("a", "b")):
        assert h.update(dev, exact_delta(shapes, 10 + i), 2, round_id=2, base=1,
                        uid=f"{dev}2").accepted
    [model] = _models(h.engine.tick(T0 + 3))
    assert model.version == 2
    h.close()
    return model_weights(model)


@pytest.mark.parametrize(
    ("strategy", "kw"),
    [("fedadam", {}), ("fedyogi", {}), ("fedadagrad", {}),
     ("fedyogi", {"bias_correction": True, "server_lr": 0.05})],
)
def test_restart_between_rounds_gives_bit_identical_weights(
    tmp_path: Path, bundle: ModelBundle, strategy: str, kw: dict[str, object]
) -> None:
    straight = _two_rounds(tmp_path / "straight", bundle, strategy, False, **kw)
    restarted = _two_rounds(tmp_path / "restarted", bundle, strategy, True, **kw)
    w0 = bundle.initial_trainable()
    for name, value in straight.items():
        np.testing.assert_array_equal(restarted[name], value)
        assert not np.array_equal(value, w0[name])  # the rounds did move the model
    store = Store(tmp_path / "restarted" / "state")
    state = store.server_state()
    store.close()
    assert int(state["step"][0]) == 2 and {k.split("/")[0] for k in state} == {"m", "v", "step"}
