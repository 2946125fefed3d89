"""LiteRT runtime and trainer on the packaged digits-mlp bundle (no TensorFlow needed)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import pytest

from edge_agent.trainer import EvalMetrics, LiteRTTrainer, Trainer, TrainMetrics
from fedmq.errors import ModelError
from fedmq.models import ModelBundle, load_bundle, prebuilt_bundle_path
from fedmq.models.litert import RUNTIMES, TFLiteModel, flex_ops, runtime_name, tflite_op_names
from fedmq_ops.model_cli import add_model_subcommands


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return load_bundle(prebuilt_bundle_path("digits-mlp"))


@pytest.fixture()
def model(bundle: ModelBundle) -> TFLiteModel:
    return TFLiteModel(bundle, num_threads=1)


def learnable(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Ten Gaussian blobs in 64-D: separable, so a few epochs must lower the loss."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(0.0, 1.0, size=(10, 64))
    y = rng.integers(0, 10, size=n)
    x = centers[y] + rng.normal(0.0, 0.7, size=(n, 64))
    return x.astype(np.float32), y.astype(np.int64)


def test_runtime_is_known_and_model_is_builtin_only(bundle: ModelBundle) -> None:
    assert runtime_name() in RUNTIMES
    ops = tflite_op_names(bundle.tflite_path)
    assert "BATCH_MATMUL" in ops
    assert flex_ops(ops) == []
    assert flex_ops(["ADD", "FlexConv2DBackpropFilter"]) == ["FlexConv2DBackpropFilter"]


def test_starts_from_initial_weights(bundle: ModelBundle, model: TFLiteModel) -> None:
    got = model.get_weights()
    assert list(got) == list(bundle.spec.trainable)
    for name, value in got.items():
        np.testing.assert_array_equal(value, bundle.initial_weights[name])


def test_set_get_round_trip_and_copies(bundle: ModelBundle, model: TFLiteModel) -> None:
    rng = np.random.default_rng(1)
    new = {t.name: rng.normal(size=t.shape).astype(np.float32) for t in bundle.spec.weights}
    model.set_weights(new)
    first = model.get_weights()
    for name in new:
        np.testing.assert_array_equal(first[name], new[name])
    x, y = learnable(16)
    model.train_step(x, y, np.ones(16, np.float32), 0.1)
    second = model.get_weights()
    # the first read must not alias interpreter memory that the step overwrote
    for name in new:
        np.testing.assert_array_equal(first[name], new[name])
    assert any(not np.array_equal(first[n], second[n]) for n in new)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda w: w.update(out_bias=np.zeros(11, np.float32)), "shape"),
        (lambda w: w.update(bogus=np.zeros(3, np.float32)), "unknown"),
        (lambda w: w.pop("out_kernel"), "missing"),
        (lambda w: w.update(out_bias=np.zeros(10, np.float64)), "dtype"),
        (lambda w: w.update(out_bias=np.full(10, np.nan, np.float32)), "non-finite"),
    ],
)
def test_set_weights_rejects(
    bundle: ModelBundle,
    model: TFLiteModel,
    mutate: Callable[[dict[str, np.ndarray]], object],
    reason: str,
) -> None:
    weights = dict(bundle.initial_weights)
    mutate(weights)
    with pytest.raises(ModelError, match=reason):
        model.set_weights(weights)


def test_train_step_rejects_wrong_batch(model: TFLiteModel) -> None:
    x, y = learnable(15)
    with pytest.raises(ModelError, match="shape"):
        model.train_step(x, y, np.ones(15, np.float32), 0.1)


def test_zero_weight_rows_do_not_change_the_step(bundle: ModelBundle) -> None:
    """A padded batch (w=0 rows, any content) trains exactly like its real rows."""
    x, y = learnable(16, seed=3)
    w = np.ones(16, np.float32)
    w[10:] = 0.0
    a, b = TFLiteModel(bundle), TFLiteModel(bundle)
    xa, xb = x.copy(), x.copy()
    xb[10:] = 1e3  # garbage in the padding
    ya, yb = y.copy(), y.copy()
    yb[10:] = 0
    la = a.train_step(xa, ya, w, 0.2)
    lb = b.train_step(xb, yb, w, 0.2)
    assert la == pytest.approx(lb, rel=1e-6)
    for name, value in a.get_weights().items():
        np.testing.assert_allclose(b.get_weights()[name], value, rtol=1e-6, atol=1e-7)


def test_predict_pads_and_chunks(model: TFLiteModel) -> None:
    x, _ = learnable(300)  # infer_batch 128: two full chunks + 44
    logits = model.predict(x)
    assert logits.shape == (300, 10)
    np.testing.assert_allclose(model.predict(x[:5]), logits[:5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(x[250:]), logits[250:], rtol=1e-5, atol=1e-6)


def test_trainer_learns(bundle: ModelBundle) -> None:
    trainer = LiteRTTrainer(bundle, num_threads=1)
    assert isinstance(trainer, Trainer)
    assert trainer.runtime_name == runtime_name()
    x, y = learnable(200)  # 200 = 12 full batches of 16 + one padded batch of 8
    xt, yt = learnable(300, seed=9)
    before = trainer.evaluate(xt, yt)
    assert isinstance(before, EvalMetrics)
    assert before.examples == 300
    metrics = trainer.fit(x, y, epochs=4, lr=0.05, rng=np.random.default_rng(0))
    assert isinstance(metrics, TrainMetrics)
    assert (metrics.examples, metrics.steps) == (800, 4 * 13)
    after = trainer.evaluate(xt, yt)
    assert after.loss < 0.5 * before.loss
    assert after.accuracy > 0.9
    assert metrics.loss < before.loss


def test_fit_is_deterministic_given_rng(bundle: ModelBundle) -> None:
    x, y = learnable(50)
    results = []
    for _ in range(2):
        trainer = LiteRTTrainer(bundle)
        trainer.fit(x, y, epochs=2, lr=0.05, rng=np.random.default_rng(7))
        results.append(trainer.get_weights())
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_fit_validates_inputs(bundle: ModelBundle) -> None:
    trainer = LiteRTTrainer(bundle)
    x, y = learnable(20)
    rng = np.random.default_rng(0)
    with pytest.raises(ModelError, match="epochs"):
        trainer.fit(x, y, epochs=0, lr=0.1, rng=rng)
    with pytest.raises(ModelError, match="learning rate"):
        trainer.fit(x, y, epochs=1, lr=float("nan"), rng=rng)
    with pytest.raises(ModelError, match="labels"):
        trainer.fit(x, y[:-1], epochs=1, lr=0.1, rng=rng)
    with pytest.raises(ModelError, match="labels outside"):
        trainer.fit(x, y + 10, epochs=1, lr=0.1, rng=rng)
    with pytest.raises(ModelError, match="do not match model input"):
        trainer.fit(x[:, :63], y, epochs=1, lr=0.1, rng=rng)


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmq")
    add_model_subcommands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_model_info(capsys: pytest.CaptureFixture[str]) -> None:
    args = _cli().parse_args(["model", "info", "digits-mlp"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "4,810" in out
    assert "builtin only" in out
    path = str(prebuilt_bundle_path("digits-mlp"))
    args = _cli().parse_args(["model", "info", "--json", path])
    assert args.func(args) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 4810
    assert info["non_builtin_ops"] == []
    assert info["runtime"] == runtime_name()
