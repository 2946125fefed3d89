"""User Keras models (not from the zoo) exported with ``fedmq model export --keras``.

The reference for every check is the user's own Keras model: its ``predict`` (the pretrained
weights carried over), and one SGD step computed eagerly with GradientTape on its variables
in inference mode (BatchNormalization uses its moving statistics, Dropout is off: the
documented training mode of the import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmq.errors import ConfigError, ModelError
from fedmq.models import ModelBundle, load_bundle
from fedmq.models.keras_import import (
    UnsupportedLayerError,
    check_keras_model,
    export_keras,
    keras_tensor_name,
)
from fedmq.models.litert import TFLiteModel, flex_ops, tflite_op_names

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")
layers = keras.layers

TRAIN_BATCH, INFER_BATCH = 4, 3


def sensor_model() -> Any:
    """Conv1D (same, causal, strided), DepthwiseConv1D, pooling and GlobalAveragePooling:
    a sensor classifier with a softmax output."""
    inp = keras.Input((12, 3))
    x = layers.Conv1D(4, 3, padding="same", activation="relu", name="conv_a")(inp)
    x = layers.MaxPooling1D(2, name="pool_a")(x)
    x = layers.DepthwiseConv1D(3, padding="same", name="dw")(x)
    x = layers.Conv1D(5, 2, padding="causal", activation="tanh", name="conv_b")(x)
    x = layers.AveragePooling1D(2, name="pool_b")(x)
    x = layers.Conv1D(4, 2, strides=2, padding="valid", name="conv_c")(x)
    x = layers.GlobalAveragePooling1D(name="gap")(x)
    out = layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="sensor")


def mlp_model() -> Any:
    """Dense + BatchNormalization + Dropout MLP (Sequential) with logits out."""
    return keras.Sequential(
        [
            keras.Input((2, 3)),
            layers.Flatten(name="flat"),
            layers.Dense(8, activation="relu", name="dense_a"),
            layers.BatchNormalization(name="bn"),
            layers.Dropout(0.5, name="drop"),
            layers.Dense(6, activation="sigmoid", name="dense_b"),
            layers.Dense(3, name="head"),
        ],
        name="mlp",
    )


def sequence_model() -> Any:
    """Embedding + LSTM (sequences) + GRU over token ids."""
    return keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            layers.Embedding(10, 4, name="embed"),
            layers.LSTM(4, return_sequences=True, name="lstm"),
            layers.GRU(3, name="gru"),
            layers.Dense(3, name="head"),
        ],
        name="seq",
    )


def branches_model() -> Any:
    """Functional: two Dense branches concatenated, added, a softmax head."""
    inp = keras.Input((6,))
    a = layers.Dense(4, activation="relu", name="branch_a")(inp)
    b = layers.Dense(4, activation="sigmoid", name="branch_b")(inp)
    both = layers.Concatenate(name="cat")([a, b])
    summed = layers.Add(name="sum")([a, b])
    x = layers.Concatenate(name="cat2")([both, summed])
    out = layers.Dense(3, activation="softmax", name="head")(x)
    return keras.Model(inp, out, name="branches")


def image_model() -> Any:
    """Reshape, Conv2D (same, strided same, valid), DepthwiseConv2D, SeparableConv2D,
    pooling 2D, global max pooling."""
    return keras.Sequential(
        [
            keras.Input((72,)),
            layers.Reshape((6, 6, 2), name="img"),
            layers.Conv2D(3, 3, padding="same", activation="relu", name="conv_a"),
            layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw"),
            layers.MaxPooling2D(2, name="pool_a"),
            layers.Conv2D(4, 2, strides=2, padding="same", name="conv_s"),
            layers.SeparableConv2D(4, 2, padding="same", activation="relu", name="sep"),
            layers.Conv2D(4, 2, padding="valid", name="conv_b"),
            layers.Activation("tanh", name="act"),
            layers.GlobalMaxPooling2D(name="gmp"),
            layers.Dense(3, name="head"),
        ],
        name="image",
    )


MODELS: dict[str, Callable[[], Any]] = {
    "sensor": sensor_model,
    "mlp": mlp_model,
    "seq": sequence_model,
    "branches": branches_model,
    "image": image_model,
}
# (model, export options)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sensor": ("sensor", {}),
    "mlp": ("mlp", {}),
    "seq": ("seq", {}),
    "branches": ("branches", {}),
    "image": ("image", {}),
    "mlp-head": ("mlp", {"trainable_from": "head"}),
    "branches-two": ("branches", {"train_layers": ["branch_b", "head"]}),
}


def pretrained(kind: str, seed: int = 0) -> Any:
    """The user's model with random "pretrained" weights (BN statistics included)."""
    model = MODELS[kind]()
    rng = np.random.default_rng(seed)
    values = []
    for var in model.weights:
        shape = tuple(var.shape)
        if var.path.endswith("moving_variance"):
            values.append(rng.uniform(0.5, 2.0, shape).astype(np.float32))
        else:
            values.append(rng.normal(0.0, 0.5, shape).astype(np.float32))
    model.set_weights(values)
    return model


def inputs(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    model_in = MODELS[kind]().inputs[0]
    shape = tuple(model_in.shape[1:])
    if kind == "seq":
        x = rng.integers(0, 10, size=(n, *shape)).astype(np.float32)
    else:
        x = rng.normal(0.0, 1.0, size=(n, *shape)).astype(np.float32)
    return x, rng.integers(0, 3, size=n).astype(np.int32)


def keras_input(kind: str, x: np.ndarray) -> np.ndarray:
    return x.astype(np.int32) if kind == "seq" else x


def tensor_names(model: Any) -> dict[str, Any]:
    return {
        keras_tensor_name(layer.name, var.path.rsplit("/", 1)[-1]): var
        for layer in model.layers
        for var in layer.weights
    }


def softmax_out(model: Any) -> bool:
    return bool(model.name in ("sensor", "branches"))


def reference_step(
    model: Any, trainable: tuple[str, ...], x: np.ndarray, y: np.ndarray, w: np.ndarray, lr: float
) -> tuple[float, dict[str, np.ndarray]]:
    variables = tensor_names(model)
    train_vars = [variables[n] for n in trainable]
    with tf.GradientTape() as tape:
        out = model(x, training=False)
        if softmax_out(model):
            ce = -tf.math.log(tf.reduce_sum(out * tf.one_hot(y, 3), axis=1))
        else:
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
        loss = tf.reduce_sum(w * ce) / tf.maximum(tf.reduce_sum(w), 1.0)
    grads = tape.gradient(loss, train_vars)
    new = {
        n: np.asarray(v.numpy()) - lr * np.asarray(tf.convert_to_tensor(g))
        for n, v, g in zip(trainable, train_vars, grads, strict=True)
    }
    return float(loss), new


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-12)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ModelBundle]:
    root = tmp_path_factory.mktemp("keras-exports")
    cache: dict[str, ModelBundle] = {}

    def get(case: str) -> ModelBundle:
        if case not in cache:
            kind, opts = CASES[case]
            cache[case] = export_keras(
                pretrained(kind),
                root / case,
                name=f"user-{case}",
                train_batch=TRAIN_BATCH,
                infer_batch=INFER_BATCH,
                **opts,
            )
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_builtin_ops_only(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    ops = tflite_op_names(bundle.tflite_path)
    assert flex_ops(ops) == []
    assert ops == bundle.spec.extra["ops"]
    assert "BATCH_MATMUL" in ops
    if case in MODELS:  # every weight is a variable: no slow FULLY_CONNECTED
        assert "FULLY_CONNECTED" not in ops
    if case == "seq":  # Embedding: gather, densified gradient
        assert {"GATHER", "UNSORTED_SEGMENT_SUM"} <= set(ops)
    assert load_bundle(bundle.path).spec == bundle.spec


@pytest.mark.parametrize("case", list(CASES))
def test_pretrained_weights_carry_over(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    kind = CASES[case][0]
    model = pretrained(kind)
    variables = tensor_names(model)
    for name in bundle.spec.weight_names:
        np.testing.assert_array_equal(bundle.initial_weights[name], variables[name].numpy())
    x, _ = inputs(kind, 7, seed=1)  # infer_batch 3: chunks of 3, 3 and a padded 1
    got = TFLiteModel(bundle).predict(x)
    expected = np.asarray(model.predict(keras_input(kind, x), verbose=0))
    if softmax_out(model):
        got = np.asarray(tf.nn.softmax(got))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_train_steps_match_tensorflow(case: str, exported: Callable[[str], ModelBundle]) -> None:
    bundle = exported(case)
    kind = CASES[case][0]
    spec = bundle.spec
    model = pretrained(kind)
    variables = tensor_names(model)
    tfl = TFLiteModel(bundle)
    lr = 0.3
    for step in range(2):
        x, y = inputs(kind, TRAIN_BATCH, seed=20 + step)
        w = np.ones(TRAIN_BATCH, np.float32)
        w[-1] = 0.0  # a padded row must not count
        before = {n: variables[n].numpy().copy() for n in spec.trainable}
        loss = tfl.train_step(x, y, w, lr)
        ref_loss, new_ref = reference_step(model, spec.trainable, keras_input(kind, x), y, w, lr)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        got = tfl.get_weights()
        assert list(got) == list(spec.trainable)
        for name in spec.trainable:
            assert rel_err(got[name], new_ref[name]) < 1e-5, (step, name)
            delta_ref = new_ref[name] - before[name]
            assert np.linalg.norm(delta_ref) > 0, name
            # the step itself, up to float32 rounding of the weights it was added to
            err = float(np.linalg.norm(got[name] - before[name] - delta_ref))
            tol = 1e-4 * float(np.linalg.norm(delta_ref)) + 1e-6 * float(
                np.linalg.norm(before[name])
            )
            assert err < tol, (step, name)
            variables[name].assign(new_ref[name])
    # frozen layers are constants: the model still predicts like Keras with the new weights
    x, _ = inputs(kind, 5, seed=40)
    got_p = tfl.predict(x)
    expected = np.asarray(model.predict(keras_input(kind, x), verbose=0))
    if softmax_out(model):
        got_p = np.asarray(tf.nn.softmax(got_p))
    np.testing.assert_allclose(got_p, expected, rtol=1e-4, atol=1e-5)


def test_head_only_selection(exported: Callable[[str], ModelBundle]) -> None:
    head = exported("mlp-head").spec
    assert head.weight_names == ("head_kernel", "head_bias")
    assert head.trainable == head.weight_names
    assert head.extra["frozen_layers"] == ["dense_a", "bn", "dense_b"]
    full = exported("mlp").spec
    assert full.weight_names == (
        "dense_a_kernel", "dense_a_bias", "bn_gamma", "bn_beta",
        "dense_b_kernel", "dense_b_bias", "head_kernel", "head_bias",
    )  # fmt: skip
    two = exported("branches-two").spec
    assert two.weight_names == ("branch_b_kernel", "branch_b_bias", "head_kernel", "head_bias")
    # the frozen layers' weights are inside the .tflite, not in the bundle's arrays
    assert set(exported("mlp-head").initial_weights) == {"head_kernel", "head_bias"}


def test_selection_errors(tmp_path: Path) -> None:
    model = pretrained("mlp")
    with pytest.raises(ModelError, match=r"no layer 'nope'; layers: flat, dense_a"):
        export_keras(model, tmp_path / "a", trainable_from="nope")
    with pytest.raises(ModelError, match=r"layers \['drop'\] have no trainable weights"):
        export_keras(model, tmp_path / "b", train_layers=["drop", "head"])
    with pytest.raises(ModelError, match="not both"):
        export_keras(model, tmp_path / "c", trainable_from="head", train_layers=["head"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            layers.LayerNormalization(name="ln"),
            "layer 'ln' (LayerNormalization) is not supported for on-device training; "
            "use BatchNormalization (frozen statistics) instead",
        ),
        (
            layers.Conv1D(2, 3, dilation_rate=2, name="c"),
            "layer 'c' (Conv1D) has unsupported dilation_rate (2,) (use 1)",
        ),
        (
            layers.Dense(4, activation="gelu", name="g"),
            "layer 'g' (Dense) has unsupported activation 'gelu'",
        ),
    ],
)
def test_unsupported_layer_named_first(layer: Any, message: str) -> None:
    model = keras.Sequential(
        [keras.Input((6, 2)), layers.Dense(2, name="ok"), layer, layers.Flatten(),
         layers.LayerNormalization(name="later"), layers.Dense(3)]
    )  # fmt: skip
    with pytest.raises(UnsupportedLayerError) as err:
        check_keras_model(model)
    assert str(err.value).startswith(message)


def test_keras_ops_and_nested_models_are_named() -> None:
    inp = keras.Input((4,))
    a = layers.Dense(3, name="a")(inp)
    b = layers.Dense(3, name="b")(inp)
    summed = a + b  # a keras.ops call, not a layer
    ops_model = keras.Model(inp, layers.Dense(2, name="out")(summed))
    with pytest.raises(UnsupportedLayerError, match=r"\(keras.ops Add\) is not supported.*"
                       r"use the layer form instead \(keras.layers.Add"):  # fmt: skip
        check_keras_model(ops_model)
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(3)], name="inner")
    nested = keras.Sequential([keras.Input((4,)), inner, layers.Dense(2)])
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'inner' \(Sequential\) is not supported for on-device training; "
        r"use the nested model's layers, flattened into one model instead",
    ):
        check_keras_model(nested)
    with pytest.raises(ModelError, match="not built"):
        check_keras_model(keras.Sequential([layers.Dense(2)]))


def test_lambda_and_custom_layers_refused(tmp_path: Path) -> None:
    from fedmq.models.keras_import import load_keras_model

    lam = keras.Sequential(
        [keras.Input((4,)), layers.Lambda(lambda t: t * 2.0, name="dbl"), layers.Dense(2)]
    )
    with pytest.raises(UnsupportedLayerError, match=r"layer 'dbl' \(Lambda\) is not supported"):
        check_keras_model(lam)
    lam.save(tmp_path / "lam.keras")
    with pytest.raises(ModelError, match=r"cannot load Keras model .*replace the Lambda"):
        load_keras_model(tmp_path / "lam.keras")  # its code is never run
    with pytest.raises(ModelError, match=r"Keras model file .*nope.keras does not exist"):
        load_keras_model(tmp_path / "nope.keras")

    class Doubler(layers.Layer):
        def call(self, x: Any) -> Any:
            return x * 2.0

    custom = keras.Sequential([keras.Input((4,)), Doubler(name="mine"), layers.Dense(2)])
    with pytest.raises(
        UnsupportedLayerError,
        match=r"layer 'mine' \(tests.unit.test_keras_import.Doubler\) is not supported for "
        r"on-device training; supported layers: Dense, Conv1D",
    ):
        check_keras_model(custom)


def test_cli_export_keras(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from fedmq_ops.model_cli import add_model_subcommands

    path = tmp_path / "m.keras"
    pretrained("mlp").save(path)
    parser = argparse.ArgumentParser(prog="fedmq")
    add_model_subcommands(parser.add_subparsers(dest="command", required=True))
    argv = ["model", "export", "--keras", str(path), "--out", str(tmp_path / "b")]
    args = parser.parse_args([*argv, "--trainable-from", "dense_b", "--train-batch", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "builtin only" in out
    assert "constants    layers dense_a, bn (frozen, not federated)" in out
    spec = TFLiteModel(tmp_path / "b").spec
    assert spec.name == "mlp"
    assert spec.trainable == ("dense_b_kernel", "dense_b_bias", "head_kernel", "head_bias")
    assert spec.train_batch == 2
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--preset", "digits-mlp"])
    args = parser.parse_args([*argv, "--hidden", "8", "--head-only"])
    with pytest.raises(ConfigError, match=r"^--hidden, --head-only: only for --preset"):
        args.func(args)


def test_cli_unsupported_layer_one_line(tmp_path: Path) -> None:
    model = keras.Sequential(
        [keras.Input((4,)), layers.Dense(4, name="d"), layers.PReLU(name="act"),
         layers.Dense(2)]
    )  # fmt: skip
    path = tmp_path / "bad.keras"
    model.save(path)
    out = tmp_path / "bundle"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(
        [sys.executable, "-m", "fedmq_ops", "model", "export", "--keras", str(path),
         "--out", str(out)],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "fedmq" in ln and "ERROR" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith(
        "layer 'act' (PReLU) is not supported for on-device training; "
        "use ReLU or Activation('relu') instead"
    )
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_litert_trainer_loss_falls(exported: Callable[[str], ModelBundle]) -> None:
    from edge_agent.trainer import LiteRTTrainer

    trainer = LiteRTTrainer(load_bundle(exported("sensor").path))
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, size=48).astype(np.int32)
    x = rng.normal(0.0, 0.3, size=(48, 12, 3)).astype(np.float32)
    x[:, :, 0] += (y[:, None] - 1.0) * 1.5  # channel 0 carries the class
    before = trainer.evaluate(x, y)
    trainer.fit(x, y, epochs=5, lr=0.1, rng=np.random.default_rng(0))
    after = trainer.evaluate(x, y)
    assert after.loss < 0.8 * before.loss, (before, after)
    assert after.accuracy > before.accuracy


def reference_grads(
    model: Any, trainable: tuple[str, ...], x: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    variables = tensor_names(model)
    train_vars = [variables[n] for n in trainable]
    with tf.GradientTape() as tape:
        out = model(x, training=False)
        if softmax_out(model):
            ce = -tf.math.log(tf.reduce_sum(out * tf.one_hot(y, 3), axis=1))
        else:
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=out)
        loss = tf.reduce_sum(w * ce) / tf.maximum(tf.reduce_sum(w), 1.0)
    grads = tape.gradient(loss, train_vars)
    return float(loss), {
        n: np.asarray(tf.convert_to_tensor(g)) for n, g in zip(trainable, grads, strict=True)
    }


@pytest.mark.parametrize("case", list(CASES))
def test_gradient_and_prox_match_tensorflow(
    case: str, exported: Callable[[str], ModelBundle]
) -> None:
    """The FedSGD ``gradient``, FedProx ``train_prox`` and pruning ``train_masked``
    signatures of an imported model."""
    bundle = exported(case)
    kind = CASES[case][0]
    spec = bundle.spec
    model = pretrained(kind)
    variables = tensor_names(model)
    tfl = TFLiteModel(bundle)
    assert tfl.variants == {"set_global", "train_prox", "gradient", "set_mask", "train_masked"}
    x, y = inputs(kind, TRAIN_BATCH, seed=60)
    w = np.ones(TRAIN_BATCH, np.float32)
    w[-1] = 0.0
    loss, grads = tfl.gradient(x, y, w)
    ref_loss, ref = reference_grads(model, spec.trainable, keras_input(kind, x), y, w)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for n in spec.trainable:
        assert np.linalg.norm(ref[n]) > 0, n
        assert rel_err(grads[n], ref[n]) < 1e-5, n
    start = {n: variables[n].numpy().copy() for n in spec.trainable}
    rng = np.random.default_rng(61)
    global_w = {n: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for n, v in start.items()}
    tfl.set_global(global_w)
    lr, mu = 0.3, 0.5
    assert tfl.train_prox_step(x, y, w, lr, mu) == pytest.approx(ref_loss, rel=1e-5)
    got = tfl.get_weights()
    for n in spec.trainable:
        expect = start[n] - lr * (ref[n] + mu * (start[n] - global_w[n]))
        assert rel_err(got[n], expect) < 1e-5, n
    # pruning: the same step from the same weights, then the mask multiply
    masks = {n: (rng.random(v.shape) < 0.5).astype(np.float32) for n, v in start.items()}
    tfl.set_weights({**tfl.get_weights(include_frozen=True), **start})
    tfl.set_mask(masks)
    assert tfl.train_step(x, y, w, lr) == pytest.approx(ref_loss, rel=1e-5)
    got = tfl.get_weights()
    for n in spec.trainable:
        assert rel_err(got[n], (start[n] - lr * ref[n]) * masks[n]) < 1e-5, n
        assert not got[n][masks[n] == 0].any(), n
