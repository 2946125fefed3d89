"""One device must not stall the fleet: the round's codec is enforced and a candidate model
that the devices would refuse is never published (issue 8, finding 1).

Real encoded updates, the real engine over a real Store, the bundle's own ``.tflite`` as the
evaluator and the devices' own model checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Outgoing, resolve_bundle
from aggregator.evaluate import TFLiteEvaluator, load_eval_set
from aggregator.store import Store
from fedmq.errors import RejectReason
from fedmq.models.spec import ModelBundle, check_weights
from fedmq.update.codecs import decode_tensor
from fedmq.wire import ModelMessage, decode_model, decode_round
from tests.fakes import exact_delta, make_update, model_weights

T0 = 1_000.0


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


@pytest.fixture(scope="module")
def evaluator(bundle: ModelBundle) -> TFLiteEvaluator:
    x, y = load_eval_set("digits", 300)
    return TFLiteEvaluator(bundle, x, y)


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none", "codec": "int8",
        "selection": "any", "clients_per_round": 3, "min_updates": 3, "round_timeout": 60.0,
        "abandon_after": 30.0, "max_update_bytes": 256 * 1024,
    }
    base.update(kw)
    return AggregatorConfig(**base)


def _models(out: list[Outgoing]) -> list[bytes]:
    return [o.payload for o in out if o.topic.endswith("/model")]


def device_accepts(payload: bytes, bundle: ModelBundle) -> ModelMessage:
    """What an edge agent does with a model payload (edge_agent.agent._on_model)."""
    msg = decode_model(payload)
    spec = bundle.spec
    raw = {t.name: decode_tensor(t, "float32") for t in msg.tensors}
    check_weights(spec, {n: raw[n] for n in spec.trainable if n in raw}, names=spec.trainable)
    return msg


def _small(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    return {k: v / np.float32(64) for k, v in exact_delta(shapes, seed).items()}


def _bomb(shapes: Mapping[str, tuple[int, ...]], value: float) -> dict[str, np.ndarray]:
    return {n: np.full(s, value, np.float32) for n, s in shapes.items()}


def test_float32_update_on_an_int8_round_is_bad_codec(
    tmp_path: Path, bundle: ModelBundle, evaluator: TFLiteEvaluator
) -> None:
    engine = Engine(_config(tmp_path), Store(tmp_path / "state"), bundle, evaluator)
    try:
        out = engine.start(T0)
        w0 = model_weights(device_accepts(_models(out)[0], bundle))
        shapes = {k: v.shape for k, v in w0.items()}
        bomb = make_update("f", 1, 0, "evil", _bomb(shapes, 1e38), 1, "float32", "evil-u")
        ack = engine.handle_update("evil", bomb, T0 + 1)
        assert (ack.accepted, ack.code) == (False, RejectReason.BAD_CODEC)
        assert "float32" in ack.reason and "int8" in ack.reason
        for i in range(3):
            payload = make_update("f", 1, 0, f"d{i}", _small(shapes, i), 10, "int8")
            assert engine.handle_update(f"d{i}", payload, T0 + 2).accepted
        [model] = _models(engine.tick(T0 + 3))
        msg = device_accepts(model, bundle)  # every device takes the new model
        assert msg.version == 1 and np.isfinite(msg.metrics["loss"])
        assert engine.metrics.value(
            "fedmq_updates_rejected_total", {"reason": RejectReason.BAD_CODEC}
        ) == 1
    finally:
        engine.store.close()


def _announced(out: list[Outgoing]) -> list[tuple[int, int]]:
    return [
        (r.round_id, r.base_version)
        for r in (decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload)
    ]


def test_a_model_the_devices_would_refuse_is_not_published(
    tmp_path: Path, bundle: ModelBundle, evaluator: TFLiteEvaluator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 1 with the codec matching: huge but finite float32 values from one device."""
    cfg = _config(tmp_path, codec="float32", strategy="fedavgm")
    engine = Engine(cfg, Store(tmp_path / "state"), bundle, evaluator)
    try:
        out = engine.start(T0)
        w0 = model_weights(device_accepts(_models(out)[0], bundle))
        shapes = {k: v.shape for k, v in w0.items()}
        bomb = make_update("f", 1, 0, "evil", _bomb(shapes, 1e36), 1, "float32", "evil-u")
        assert engine.handle_update("evil", bomb, T0 + 1).accepted  # finite, fits the sum
        for i in range(2):
            payload = make_update("f", 1, 0, f"d{i}", _small(shapes, i), 10, "float32")
            assert engine.handle_update(f"d{i}", payload, T0 + 2).accepted
        with caplog.at_level("ERROR", logger="aggregator.coordinator"):
            out = engine.tick(T0 + 3)
        assert _models(out) == []  # nothing published ...
        assert engine.store.current_model().version == 0  # type: ignore[union-attr]
        assert engine.store.round(1).status == "abandoned"  # ... nor stored
        assert _announced(out) == [(2, 0)]  # the next round opens on the unchanged model
        assert engine.version == 0
        for name, value in engine.weights.items():
            np.testing.assert_array_equal(value, w0[name])
        assert engine.strategy.state() == {}  # the momentum of the refused round is dropped
        [line] = [r for r in caplog.records if r.levelname == "ERROR"]
        text = line.getMessage()
        assert "round 1 abandoned: its model (version 1) is unpublishable" in text
        evil_norm = float(np.sqrt(sum(np.sum(np.float64(1e36) ** 2 * np.ones(s)) for s in
                                      shapes.values())))
        assert text.index("evil (evil-u): norm ") < text.index("d0")  # the largest first
        assert f"norm {evil_norm:.4g}" in text
        m = engine.metrics
        assert m.value("fedmq_rounds_abandoned_total", {"reason": "unpublishable_model"}) == 1
        assert m.value("fedmq_rounds_abandoned_total", {"reason": "no_quorum"}) == 0
        assert m.value(
            "fedmq_unpublishable_update_norm", {"device": "evil", "update_id": "evil-u"}
        ) == pytest.approx(evil_norm)
        [res] = engine.pop_results()
        assert (res.round_id, res.status, res.version) == (1, "abandoned", None)
        # the fleet goes on: round 2 closes normally on version 0
        for i in range(3):
            payload = make_update("f", 2, 0, f"d{i}", _small(shapes, i), 10, "float32")
            assert engine.handle_update(f"d{i}", payload, T0 + 4).accepted
        [model] = _models(engine.tick(T0 + 5))
        msg = device_accepts(model, bundle)
        assert (msg.version, msg.round_id) == (1, 2) and np.isfinite(msg.metrics["loss"])
    finally:
        engine.store.close()


def test_sanity_bound_and_non_finite_metrics(tmp_path: Path, bundle: ModelBundle) -> None:
    """|w| above max_model_weight is refused; NaN metrics are left out of the message."""

    def nan_loss(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return {"accuracy": 0.5, "loss": float("nan"), "other": float("inf")}

    cfg = _config(tmp_path, codec="float32", min_updates=1, clients_per_round=1)
    engine = Engine(cfg, Store(tmp_path / "state"), bundle, nan_loss)
    try:
        out = engine.start(T0)
        v0 = device_accepts(_models(out)[0], bundle)  # version 0 too: finite metrics only
        assert dict(v0.metrics) == {"accuracy": 0.5}
        shapes = {t.name: t.shape for t in v0.tensors}
        big = make_update("f", 1, 0, "a", _bomb(shapes, 2e4), 1, "float32")
        assert engine.handle_update("a", big, T0 + 1).accepted
        out = engine.tick(T0 + 2)
        assert _models(out) == [] and _announced(out) == [(2, 0)]
        ok = make_update("f", 2, 0, "a", _small(shapes, 0), 1, "float32")
        assert engine.handle_update("a", ok, T0 + 3).accepted
        [model] = _models(engine.tick(T0 + 4))
        msg = device_accepts(model, bundle)
        assert msg.version == 1 and "loss" not in msg.metrics and "other" not in msg.metrics
        assert engine.store.current_model().metrics["accuracy"] == 0.5  # type: ignore[union-attr]
    finally:
        engine.store.close()
