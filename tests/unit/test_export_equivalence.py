"""Every zoo model: the exported .tflite trains and infers exactly like TensorFlow.

The reference is an *independent* Keras model built from standard layers (real Conv2D,
AveragePooling2D, LSTM, GRU, relu), loaded with the same weights; its SGD step is computed
eagerly with GradientTape and ``sparse_softmax_cross_entropy_with_logits``. This also pins
the weight layouts to Keras's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.errors import ModelError
from fedmq.models import ModelBundle, zoo
from fedmq.models.export import export_model
from fedmq.models.litert import TFLiteModel, flex_ops, tflite_op_names
from fedmq.models.zoo import ModelConfig, head_names, init_weights, preset

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

_MLP = ModelConfig(
    name="t-mlp", kind="mlp", input_shape=(3, 4), num_classes=3, hidden=(5, 4),
    train_batch=4, infer_batch=3, seed=1,
)  # fmt: skip
_CNN = ModelConfig(
    name="t-cnn", kind="cnn", input_shape=(8, 8, 2), num_classes=3, channels=(3, 4),
    hidden=(5,), train_batch=4, infer_batch=3, seed=2,
)  # fmt: skip
_RNN: dict[str, Any] = {
    "input_shape": (5, 3),
    "num_classes": 3,
    "hidden": (4,),
    "train_batch": 4,
    "infer_batch": 3,
}
CASES: dict[str, ModelConfig] = {
    "mlp": _MLP,
    "mlp-head": _MLP.replace(name="t-mlp-head", head_only=True),
    "cnn": _CNN,
    "cnn-head": _CNN.replace(name="t-cnn-head", head_only=True),
    "lstm": ModelConfig(name="t-lstm", kind="lstm", seed=3, **_RNN),
    "gru": ModelConfig(name="t-gru", kind="gru", seed=4, **_RNN),
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ModelBundle]:
    root = tmp_path_factory.mktemp("exports")
    cache: dict[str, ModelBundle] = {}

    def get(case: str) -> ModelBundle:
        if case not in cache:
            cache[case] = export_model(CASES[case], root / case)
        return cache[case]

    return get


def keras_reference(cfg: ModelConfig) -> Any:
    layers = keras.layers
    stack: list[Any] = [keras.Input(shape=cfg.input_shape, batch_size=None)]
    if cfg.kind == "mlp":
        stack.append(layers.Flatten())
    elif cfg.kind == "cnn":
        for ch in cfg.channels:
            stack += [
                layers.Conv2D(ch, 3, padding="same", activation="relu"),
                layers.AveragePooling2D(2),
            ]
        stack.append(layers.Flatten())
    elif cfg.kind == "lstm":
        stack.append(layers.LSTM(cfg.hidden[0]))
    else:
        stack.append(layers.GRU(cfg.hidden[0], reset_after=True))
    if cfg.kind in ("mlp", "cnn"):
        stack += [layers.Dense(h, activation="relu") for h in cfg.hidden]
    stack.append(layers.Dense(cfg.num_classes))
    return keras.Sequential(stack)


def random_weights(bundle: ModelBundle, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        t.name: rng.normal(0.0, 0.4, size=t.shape).astype(np.float32) for t in bundle.spec.weights
    }


def batch(cfg: ModelConfig, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, size=(n, *cfg.input_shape)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, size=n).astype(np.int32)
    return x, y


def reference_step(
    cfg: ModelConfig,
    names: tuple[str, ...],
    trainable: tuple[str, ...],
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    lr: float,
) -> tuple[float, dict[str, np.ndarray]]:
    model = keras_reference(cfg)
    model.set_weights([weights[n] for n in names])
    variables = dict(zip(names, model.weights, strict=True))
    train_vars = [variables[n] for n in trainable]
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        loss = tf.reduce_sum(w * ce) / tf.maximum(tf.reduce_sum(w), 1.0)
    grads = tape.gradient(loss, train_vars)
    new = {n: weights[n].copy() for n in names}
    for name, grad in zip(trainable, grads, strict=True):
        new[name] = weights[name] - lr * np.asarray(grad)
    return float(loss), new


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_ops_only(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    ops = tflite_op_names(bundle.tflite_path)
    assert flex_ops(ops) == []
    assert ops == bundle.spec.extra["ops"]
    assert "BATCH_MATMUL" in ops
    # FULLY_CONNECTED with variable weights misses XNNPACK in LiteRT (2-3x slower)
    assert "FULLY_CONNECTED" not in ops


@pytest.mark.parametrize("case", list(CASES))
def test_train_steps_match_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    names = spec.weight_names
    start = random_weights(bundle, seed=10)
    model = TFLiteModel(bundle)
    model.set_weights(start)
    ref = start
    lr = 0.3
    for step in range(2):
        x, y = batch(cfg, spec.train_batch, seed=20 + step)
        w = np.ones(spec.train_batch, np.float32)
        w[-1] = 0.0  # a padded row must not count
        loss = model.train_step(x, y, w, lr)
        ref_loss, new_ref = reference_step(cfg, names, spec.trainable, ref, x, y, w, lr)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        got = model.get_weights(include_frozen=True)
        for name in names:
            assert rel_err(got[name], new_ref[name]) < 1e-5, (step, name)
            delta_ref = new_ref[name] - ref[name]
            if name in spec.trainable:
                assert np.linalg.norm(delta_ref) > 0, name
                assert rel_err(got[name] - ref[name], delta_ref) < 1e-4, (step, name)
            else:
                np.testing.assert_array_equal(got[name], start[name])
        ref = new_ref
    assert list(model.get_weights()) == list(spec.trainable)


@pytest.mark.parametrize("case", list(CASES))
def test_infer_matches_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    cfg = CASES[case]
    weights = random_weights(bundle, seed=30)
    model = TFLiteModel(bundle)
    model.set_weights(weights)
    x, _ = batch(cfg, 7, seed=31)  # infer_batch 3: chunks of 3, 3 and a padded 1
    reference = keras_reference(cfg)
    reference.set_weights([weights[n] for n in bundle.spec.weight_names])
    expected = np.asarray(reference(x, training=False))
    np.testing.assert_allclose(model.predict(x), expected, rtol=1e-5, atol=1e-5)


def test_head_only_layout() -> None:
    assert head_names(CASES["cnn"]) == ("dense1_kernel", "dense1_bias", "out_kernel", "out_bias")
    assert head_names(CASES["mlp"]) == ("out_kernel", "out_bias")
    assert head_names(CASES["lstm"]) == ("out_kernel", "out_bias")
    spec = CASES["cnn-head"].to_spec()
    assert spec.frozen == ("conv1_kernel", "conv1_bias", "conv2_kernel", "conv2_bias")


def test_head_only_export_takes_pretrained_weights(tmp_path: Path) -> None:
    cfg = CASES["mlp-head"].replace(name="t-pre")
    pretrained = {"dense1_kernel": np.full((12, 5), 0.25, np.float32)}
    bundle = export_model(cfg, tmp_path / "b", initial_weights=pretrained)
    np.testing.assert_array_equal(
        bundle.initial_weights["dense1_kernel"], pretrained["dense1_kernel"]
    )
    model = TFLiteModel(bundle)
    got = model.get_weights(include_frozen=True)
    np.testing.assert_array_equal(got["dense1_kernel"], pretrained["dense1_kernel"])
    with pytest.raises(ModelError, match="shape"):
        export_model(
            cfg, tmp_path / "c", initial_weights={"dense1_kernel": np.zeros(3, np.float32)}
        )


def test_flex_needing_model_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo, "_relu", lambda tf_, x: tf_.nn.relu(x))  # ReluGrad is Flex-only
    with pytest.raises(ModelError, match="builtin"):
        export_model(CASES["mlp"].replace(name="t-flex"), tmp_path / "flex")
    assert not (tmp_path / "flex" / "model.tflite").exists()


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fedmq_ops.model_cli import add_model_subcommands

    parser = argparse.ArgumentParser(prog="fedmq")
    add_model_subcommands(parser.add_subparsers(dest="command", required=True))
    argv = ["model", "export", "--preset", "digits-mlp", "--out", str(tmp_path / "d")]
    args = parser.parse_args([*argv, "--hidden", "8", "--seed", "3", "--head-only"])
    assert args.func(args) == 0
    assert "builtin only" in capsys.readouterr().out
    spec = TFLiteModel(tmp_path / "d").spec
    assert spec.weight("dense1_kernel").shape == (64, 8)
    assert spec.trainable == ("out_kernel", "out_bias")
    assert spec.extra["config"]["seed"] == 3


def test_presets_and_initialisation() -> None:
    assert preset("fmnist-cnn").to_spec().num_params == 105_866
    cfg = preset("fmnist-lstm", hidden=(8,))
    a, b = init_weights(cfg, seed=5), init_weights(cfg, seed=5)
    c = init_weights(cfg, seed=6)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["lstm_kernel"], c["lstm_kernel"])
    np.testing.assert_array_equal(a["lstm_bias"][8:16], np.ones(8, np.float32))
    rk = a["lstm_recurrent_kernel"]  # (8, 32): rows orthonormal
    np.testing.assert_allclose(rk @ rk.T, np.eye(8), atol=1e-5)
    with pytest.raises(ModelError, match="unknown preset"):
        preset("nope")
    with pytest.raises(ModelError, match="divisible"):
        CASES["cnn"].replace(input_shape=(6, 6, 1))


# -- FedProx and FedSGD signatures (fedmq.models.variants) -------------------------------------
def reference_grads(
    cfg: ModelConfig,
    names: tuple[str, ...],
    trainable: tuple[str, ...],
    weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
) -> tuple[float, dict[str, np.ndarray]]:
    model = keras_reference(cfg)
    model.set_weights([weights[n] for n in names])
    variables = dict(zip(names, model.weights, strict=True))
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        loss = tf.reduce_sum(w * ce) / tf.maximum(tf.reduce_sum(w), 1.0)
    grads = tape.gradient(loss, [variables[n] for n in trainable])
    return float(loss), {n: np.asarray(g) for n, g in zip(trainable, grads, strict=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_prox_step_matches_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    """train_prox = SGD on loss + mu/2 ||v - v_global||^2: v - lr (grad + mu (v - v_global))."""
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    names = spec.weight_names
    start = random_weights(bundle, seed=11)
    global_w = random_weights(bundle, seed=12)
    model = TFLiteModel(bundle)
    assert model.variants == {"set_global", "train_prox", "gradient", "set_mask", "train_masked"}
    model.set_weights(start)
    model.set_global({n: global_w[n] for n in spec.trainable})
    ref = start
    lr, mu = 0.3, 0.7
    for step in range(2):
        x, y = batch(cfg, spec.train_batch, seed=30 + step)
        w = np.ones(spec.train_batch, np.float32)
        w[-1] = 0.0
        loss = model.train_prox_step(x, y, w, lr, mu)
        ref_loss, grads = reference_grads(cfg, names, spec.trainable, ref, x, y, w)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        new_ref = dict(ref)
        for n in spec.trainable:
            new_ref[n] = ref[n] - lr * (grads[n] + mu * (ref[n] - global_w[n]))
        got = model.get_weights(include_frozen=True)
        for name in names:
            assert rel_err(got[name], new_ref[name]) < 1e-5, (step, name)
            if name in spec.trainable:
                prox = mu * (ref[name] - global_w[name])
                assert np.linalg.norm(prox) > 0, name  # the term really acts
        ref = new_ref


@pytest.mark.parametrize("case", ["mlp", "cnn", "gru"])
def test_prox_with_mu_zero_is_train_bit_for_bit(
    case: str, exported: Callable[[str], ModelBundle]
) -> None:
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    start = random_weights(bundle, seed=13)
    plain, prox = TFLiteModel(bundle), TFLiteModel(bundle)
    for m in (plain, prox):
        m.set_weights(start)
    prox.set_global(random_weights(bundle, seed=14))  # far away: must not matter at mu = 0
    for step in range(3):
        x, y = batch(cfg, spec.train_batch, seed=40 + step)
        w = np.ones(spec.train_batch, np.float32)
        assert plain.train_step(x, y, w, 0.2) == prox.train_prox_step(x, y, w, 0.2, 0.0)
    a, b = plain.get_weights(include_frozen=True), prox.get_weights(include_frozen=True)
    for name in spec.weight_names:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_matches_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    start = random_weights(bundle, seed=15)
    model = TFLiteModel(bundle)
    model.set_weights(start)
    x, y = batch(cfg, spec.train_batch, seed=50)
    w = np.ones(spec.train_batch, np.float32)
    w[-1] = 0.0
    loss, grads = model.gradient(x, y, w)
    ref_loss, ref_grads = reference_grads(cfg, spec.weight_names, spec.trainable, start, x, y, w)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert list(grads) == list(spec.trainable)
    for n in spec.trainable:
        assert np.linalg.norm(ref_grads[n]) > 0, n
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n
    after = model.get_weights(include_frozen=True)  # gradient() leaves the weights alone
    for n in spec.weight_names:
        np.testing.assert_array_equal(after[n], start[n])


def random_masks(bundle: ModelBundle, seed: int, keep: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {t.name: t.shape for t in bundle.spec.weights}
    return {n: (rng.random(shapes[n]) < keep).astype(np.float32) for n in bundle.spec.trainable}


@pytest.mark.parametrize("case", list(CASES))
def test_masked_step_matches_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    """train_masked = the SGD step, then the mask multiply: (v - lr grad) * mask; the pruned
    weights are exactly 0 after each step (they start non-zero here: the multiply zeroes
    them, the device does not rely on the server's zeros)."""
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    names = spec.weight_names
    start = random_weights(bundle, seed=16)
    masks = random_masks(bundle, seed=17, keep=0.4)
    model = TFLiteModel(bundle)
    model.set_weights(start)
    model.set_mask(masks)
    ref, lr = start, 0.3
    for step in range(2):
        x, y = batch(cfg, spec.train_batch, seed=60 + step)
        w = np.ones(spec.train_batch, np.float32)
        w[-1] = 0.0
        loss = model.train_step(x, y, w, lr)
        ref_loss, grads = reference_grads(cfg, names, spec.trainable, ref, x, y, w)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        new_ref = dict(ref)
        for n in spec.trainable:
            new_ref[n] = (ref[n] - lr * grads[n]) * masks[n]
        got = model.get_weights(include_frozen=True)
        for name in names:
            assert rel_err(got[name], new_ref[name]) < 1e-5, (step, name)
        for n in spec.trainable:
            assert not got[n][masks[n] == 0].any(), n  # exactly zero, not merely small
            assert got[n][masks[n] == 1].all(), n
        ref = new_ref
    model.set_mask(None)  # back to the plain step: pruned weights may move again
    x, y = batch(cfg, spec.train_batch, seed=70)
    model.train_step(x, y, np.ones(spec.train_batch, np.float32), lr)
    moved = model.get_weights()
    assert any(moved[n][masks[n] == 0].any() for n in spec.trainable)


@pytest.mark.parametrize("case", ["mlp", "cnn", "lstm"])
def test_all_ones_mask_is_train_bit_for_bit(
    case: str, exported: Callable[[str], ModelBundle]
) -> None:
    bundle = exported(case)
    spec, cfg = bundle.spec, CASES[case]
    start = random_weights(bundle, seed=18)
    plain, masked = TFLiteModel(bundle), TFLiteModel(bundle)
    for m in (plain, masked):
        m.set_weights(start)
    masked.set_mask({})  # every tensor kept whole
    for step in range(3):
        x, y = batch(cfg, spec.train_batch, seed=80 + step)
        w = np.ones(spec.train_batch, np.float32)
        assert plain.train_step(x, y, w, 0.2) == masked.train_step(x, y, w, 0.2)
    a, b = plain.get_weights(include_frozen=True), masked.get_weights(include_frozen=True)
    for name in spec.weight_names:
        np.testing.assert_array_equal(a[name], b[name])


def test_set_mask_refuses_bad_masks(exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported("mlp")
    model = TFLiteModel(bundle)
    with pytest.raises(ModelError, match="not trainable"):
        model.set_mask({"nope": np.ones(3, np.float32)})
    name = bundle.spec.trainable[0]
    with pytest.raises(ModelError, match="shape"):
        model.set_mask({name: np.ones(7, np.float32)})
