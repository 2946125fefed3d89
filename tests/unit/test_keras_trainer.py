"""Keras training backend: same SGD math as LiteRT on the zoo bundles; arbitrary Keras models
with a frozen feature extractor (needs TensorFlow)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.agent import build_trainer
from edge_agent.config import AgentConfig
from edge_agent.trainer import LiteRTTrainer, Trainer
from fedmq.errors import ConfigError, ModelError
from fedmq.models import ModelBundle, load_bundle, prebuilt_bundle_path
from fedmq.models.zoo import preset

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
kt = pytest.importorskip("edge_agent.keras_trainer")
KerasTrainer = kt.KerasTrainer


def _data(bundle: ModelBundle, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in [0, 1] with many exact zeros (like image backgrounds: relu at 0 matters)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, *bundle.spec.input_shape)).astype(np.float32)
    x[x < 0.4] = 0.0
    y = rng.integers(0, bundle.spec.num_classes, size=n)
    return x, y


@pytest.mark.parametrize("name", ["digits-mlp", "fmnist-cnn", "fmnist-lstm"])
def test_one_epoch_matches_litert(name: str) -> None:
    bundle = load_bundle(prebuilt_bundle_path(name))
    lite = LiteRTTrainer(bundle, num_threads=1)
    ker = KerasTrainer(bundle)
    assert isinstance(ker, Trainer)
    assert ker.spec == bundle.spec
    start = lite.get_weights()
    assert list(ker.get_weights()) == list(bundle.spec.trainable)
    for name_, value in ker.get_weights().items():
        np.testing.assert_array_equal(value, start[name_])
    count = 3 * bundle.spec.train_batch + 5  # a partial last batch
    x, y = _data(bundle, count)
    m_lite = lite.fit(x, y, epochs=1, lr=0.05, rng=np.random.default_rng(7))
    m_ker = ker.fit(x, y, epochs=1, lr=0.05, rng=np.random.default_rng(7))
    assert m_ker.steps == m_lite.steps == 4
    assert m_ker.examples == m_lite.examples == count
    assert m_ker.loss == pytest.approx(m_lite.loss, abs=1e-5)
    after_lite, after_ker = lite.get_weights(), ker.get_weights()
    for n_ in bundle.spec.trainable:
        assert not np.array_equal(after_lite[n_], start[n_])  # training moved it
        np.testing.assert_allclose(after_ker[n_], after_lite[n_], rtol=0, atol=2e-6)
    ev_l, ev_k = lite.evaluate(x, y), ker.evaluate(x, y)
    assert ev_k.loss == pytest.approx(ev_l.loss, abs=1e-5)
    assert ev_k.accuracy == pytest.approx(ev_l.accuracy, abs=1.5 / count)


def test_updates_interchange_with_litert() -> None:
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    ker = KerasTrainer("digits-mlp")
    lite = LiteRTTrainer(bundle, num_threads=1)
    x, y = _data(bundle, 64)
    ker.fit(x, y, epochs=1, lr=0.1, rng=np.random.default_rng(0))
    lite.set_weights(ker.get_weights())
    logits_k = ker.predict(x)
    logits_l = lite.model.predict(x)
    np.testing.assert_allclose(logits_k, logits_l, atol=1e-5)


def test_zoo_config_head_only_trains_the_head_only() -> None:
    cfg = preset("digits-mlp", head_only=True)
    ker = KerasTrainer(cfg)
    assert ker.spec.trainable == ("out_kernel", "out_bias")
    before = ker.get_weights(include_frozen=True)
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(40, 64)).astype(np.float32)
    y = rng.integers(0, 10, size=40)
    ker.fit(x, y, epochs=1, lr=0.1, rng=rng)
    after = ker.get_weights(include_frozen=True)
    np.testing.assert_array_equal(after["dense1_kernel"], before["dense1_kernel"])
    assert not np.array_equal(after["out_kernel"], before["out_kernel"])
    assert set(ker.get_weights()) == {"out_kernel", "out_bias"}


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pytest.importorskip("sklearn")
    from fedmq.data.datasets import load_digits

    train, test = load_digits(seed=0)
    return train.x, train.y, test.x, test.y


def _feature_head_model(seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(64,))
    feats = keras.layers.Dense(48, activation="relu", name="features")(inputs)
    logits = keras.layers.Dense(10, name="head")(feats)
    return keras.Model(inputs, logits)


def test_from_model_head_only_on_digits() -> None:
    x, y, xt, yt = _digits()
    model = _feature_head_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")  # not used
    trainer = KerasTrainer.from_model(model, name="digits-head", trainable=["head"])
    spec = trainer.spec
    assert spec.weight_names == ("w000_kernel", "w001_bias", "w002_kernel", "w003_bias")
    assert spec.trainable == ("w002_kernel", "w003_bias")
    assert trainer.keras_paths["w002_kernel"] == "head/kernel"
    assert spec.input_shape == (64,) and spec.num_classes == 10
    assert trainer.from_logits
    frozen_before = trainer.get_weights(include_frozen=True)
    before = trainer.evaluate(xt, yt)
    metrics = trainer.fit(x, y, epochs=5, lr=0.5, rng=np.random.default_rng(0))
    after = trainer.evaluate(xt, yt)
    assert metrics.examples == 5 * len(x)
    assert after.accuracy > before.accuracy + 0.3
    assert after.accuracy > 0.65  # random frozen features: a linear probe, not a CNN
    got = trainer.get_weights()
    assert set(got) == {"w002_kernel", "w003_bias"}
    all_after = trainer.get_weights(include_frozen=True)
    for n in spec.frozen:
        np.testing.assert_array_equal(all_after[n], frozen_before[n])
    assert not np.array_equal(got["w002_kernel"], frozen_before["w002_kernel"])
    # the federated tensors load back: a second device starts where this one ended
    other = KerasTrainer.from_model(_feature_head_model(), name="digits-head", trainable=["head"])
    other.set_weights({**all_after})
    assert other.evaluate(xt, yt).accuracy == pytest.approx(after.accuracy)


def test_from_model_softmax_output_and_names_are_stable() -> None:
    def build() -> Any:
        return keras.Sequential(
            [
                keras.Input(shape=(8, 8)),
                keras.layers.Flatten(),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    a = KerasTrainer.from_model(build(), name="seq", train_batch=16)
    b = KerasTrainer.from_model(build(), name="seq", train_batch=16)
    assert a.spec.weight_names == b.spec.weight_names  # independent of Keras' layer counters
    assert a.spec.trainable == a.spec.weight_names
    assert not a.from_logits
    x, y, _, _ = _digits()
    x = x[:256].reshape(-1, 8, 8)
    first = a.fit(x, y[:256], epochs=1, lr=0.2, rng=np.random.default_rng(0))
    last = a.fit(x, y[:256], epochs=3, lr=0.2, rng=np.random.default_rng(1))
    assert last.loss < first.loss
    ev = a.evaluate(x, y[:256])
    assert 0.0 <= ev.loss < first.loss


def test_from_model_errors() -> None:
    model = _feature_head_model()
    with pytest.raises(ModelError, match="no layer"):
        KerasTrainer.from_model(model, name="m", trainable=["nope"])
    with pytest.raises(ModelError, match="not a string"):
        KerasTrainer.from_model(model, name="m", trainable="head")
    trainer = KerasTrainer.from_model(model, name="m", trainable=[model.get_layer("head")])
    with pytest.raises(ModelError, match="missing trainable"):
        trainer.set_weights({"w002_kernel": np.zeros((48, 10), np.float32)})
    with pytest.raises(ModelError, match="positive"):
        trainer.fit(np.zeros((4, 64), np.float32), np.zeros(4, int), epochs=1, lr=0.0,
                    rng=np.random.default_rng(0))


def test_agent_config_backend(tmp_path: object) -> None:
    assert AgentConfig().backend == "litert"
    with pytest.raises(ConfigError, match="backend"):
        AgentConfig(backend="torch")
    trainer = build_trainer(AgentConfig(backend="keras", model="digits-mlp"))
    assert isinstance(trainer, KerasTrainer)
    assert trainer.runtime_name == "keras"
    assert isinstance(build_trainer(AgentConfig(model="digits-mlp")), LiteRTTrainer)


@pytest.mark.parametrize("name", ["digits-mlp", "fmnist-cnn"])
def test_prox_and_gradient_match_litert(name: str) -> None:
    """The Keras backend's FedProx epochs and mean gradient are LiteRT's (same batches)."""
    from edge_agent.trainer import VariantTrainer

    bundle = load_bundle(prebuilt_bundle_path(name))
    lite = LiteRTTrainer(bundle, num_threads=1)
    ker = KerasTrainer(bundle)
    assert isinstance(ker, VariantTrainer) and isinstance(lite, VariantTrainer)
    assert lite.variants == ker.variants == {"prox", "gradient", "mask"}
    start = lite.get_weights()
    count = 2 * bundle.spec.train_batch + 5
    x, y = _data(bundle, count, seed=1)
    g_lite, m_lite = lite.gradient(x, y, max_examples=count - 3, rng=np.random.default_rng(5))
    g_ker, m_ker = ker.gradient(x, y, max_examples=count - 3, rng=np.random.default_rng(5))
    assert m_lite.examples == m_ker.examples == count - 3 and m_lite.steps == m_ker.steps == 3
    assert m_ker.loss == pytest.approx(m_lite.loss, abs=1e-5)
    for n_ in bundle.spec.trainable:
        assert np.linalg.norm(g_lite[n_]) > 0
        np.testing.assert_allclose(g_ker[n_], g_lite[n_], rtol=0, atol=2e-6)
        np.testing.assert_array_equal(lite.get_weights()[n_], start[n_])  # unchanged
    m_lite = lite.fit_prox(x, y, epochs=2, lr=0.05, rng=np.random.default_rng(7), mu=2.0)
    m_ker = ker.fit_prox(x, y, epochs=2, lr=0.05, rng=np.random.default_rng(7), mu=2.0)
    assert m_ker.loss == pytest.approx(m_lite.loss, abs=1e-5)
    plain = LiteRTTrainer(bundle, num_threads=1)
    plain.fit(x, y, epochs=2, lr=0.05, rng=np.random.default_rng(7))
    for n_ in bundle.spec.trainable:
        np.testing.assert_allclose(ker.get_weights()[n_], lite.get_weights()[n_],
                                   rtol=0, atol=2e-6)
        # the proximal pull keeps it closer to the start than plain SGD
        assert np.linalg.norm(lite.get_weights()[n_] - start[n_]) < np.linalg.norm(
            plain.get_weights()[n_] - start[n_])


@pytest.mark.parametrize("name", ["digits-mlp", "fmnist-cnn"])
def test_masked_training_matches_litert_and_keeps_pruned_weights_zero(name: str) -> None:
    """Pruned rounds (docs/pruning.md): Keras applies the mask after each step as LiteRT's
    train_masked does; pruned weights are exactly zero after training on both."""
    from fedmq.prune.mask import magnitude_mask
    from fedmq.prune.strategy import prunable_tensors

    bundle = load_bundle(prebuilt_bundle_path(name))
    shapes = {t.name: t.shape for t in bundle.spec.weights if t.name in bundle.spec.trainable}
    mask = magnitude_mask(bundle.initial_weights, 0.8, prunable_tensors(shapes))
    lite = LiteRTTrainer(bundle, num_threads=1)
    ker = KerasTrainer(bundle)
    assert "mask" in lite.variants and "mask" in ker.variants
    start = mask.apply(lite.get_weights())
    x, y = _data(bundle, 2 * bundle.spec.train_batch + 3)
    for t in (lite, ker):
        t.set_weights(start)
        t.set_mask(mask.float_masks())
        t.fit(x, y, epochs=1, lr=0.05, rng=np.random.default_rng(7))
    after_lite, after_ker = lite.get_weights(), ker.get_weights()
    for n_ in bundle.spec.trainable:
        np.testing.assert_allclose(after_ker[n_], after_lite[n_], rtol=0, atol=2e-6)
        if n_ in mask.kept:
            assert not after_lite[n_][~mask.kept[n_]].any() and not after_ker[n_][
                ~mask.kept[n_]].any()
            assert not np.array_equal(after_lite[n_], start[n_])
    with pytest.raises(ModelError, match="not trainable"):
        ker.set_mask({"nope": np.ones(2)})
