"""Keras training backend: for devices that carry full TensorFlow, and for users who bring
their own Keras model.

This is the only module of the edge agent that imports TensorFlow / Keras; the agent imports
it lazily when ``backend = "keras"``.

Two ways to build a :class:`KerasTrainer`:

- ``KerasTrainer(bundle_or_config)``: from a fedmq bundle (directory, prebuilt name or
  :class:`~fedmq.models.spec.ModelBundle`) or a zoo :class:`~fedmq.models.zoo.ModelConfig`.
  The equivalent *real* Keras model is built (``Conv2D`` + ``AveragePooling2D``, ``Dense``,
  ``LSTM``, ``GRU(reset_after=True)``) and its variables map 1:1 to the bundle's tensor
  names, so updates are interchangeable with LiteRT devices. The activations are
  ``maximum(x, 0)`` like the zoo (its gradient at exactly 0 is 1, ``tf.nn.relu``'s is 0), so
  both backends run the same SGD math.
- :meth:`KerasTrainer.from_model`: any Keras model (compiled or not; its compiled loss and
  optimizer are not used). Weight names are ``w<index>_<variable name>`` in
  ``model.weights`` order, stable across processes. ``trainable`` selects the federated
  subset (fine-tuning: a frozen feature extractor plus a trainable head).

Training is plain SGD with the round's learning rate, in batches of ``spec.train_batch``,
reshuffled with the given generator exactly as :class:`~edge_agent.trainer.LiteRTTrainer`
does (the last partial batch is a smaller batch whose loss is its mean).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from edge_agent.trainer import (
    EvalMetrics,
    TrainMetrics,
    _check_xy,
    check_fit_args,
    mean_gradient,
    sgd_epochs,
)
from fedmq.errors import ModelError
from fedmq.models.litert import softmax_cross_entropy
from fedmq.models.spec import (
    ModelBundle,
    ModelSpec,
    TensorSpec,
    check_weights,
    load_bundle,
    prebuilt_bundle_path,
)
from fedmq.models.zoo import ModelConfig, init_weights

__all__ = [
    "KerasTrainer",
    "build_keras_model",
    "config_from_spec",
    "keras_weight_names",
    "set_tf_threads",
]

log = logging.getLogger(__name__)

_LEAF = re.compile(r"[^a-z0-9_]+")


@keras.saving.register_keras_serializable(package="fedmq", name="relu0")
def relu0(x: Any) -> Any:
    """``maximum(x, 0)``: the zoo's relu (gradient 1 at exactly 0, like the LiteRT export)."""
    return keras.ops.maximum(x, 0.0)


def set_tf_threads(num_threads: int | None) -> None:
    """Ask TensorFlow for ``num_threads`` intra-op threads (only possible before it runs
    anything; later calls are logged and ignored)."""
    if num_threads is None:
        return
    try:
        tf.config.threading.set_intra_op_parallelism_threads(num_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1 if num_threads == 1 else 2)
    except RuntimeError as exc:  # TF already initialised
        log.debug("cannot change TensorFlow threads now: %s", exc)


# -- zoo models as real Keras models ----------------------------------------------------------
def config_from_spec(spec: ModelSpec) -> ModelConfig:
    """The zoo :class:`ModelConfig` a bundle was exported from (``spec.extra["config"]``)."""
    raw = spec.extra.get("config")
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise ModelError(f"bundle {spec.name} carries no zoo config (not exported by fedmq?)")
    known = {"kind", "hidden", "channels", "head_only", "seed"}
    try:
        cfg = ModelConfig(
            name=spec.name,
            kind=str(raw["kind"]),
            input_shape=spec.input_shape,
            num_classes=spec.num_classes,
            hidden=tuple(raw.get("hidden", (64,))),
            channels=tuple(raw.get("channels", ())),
            train_batch=spec.train_batch,
            infer_batch=spec.infer_batch,
            head_only=bool(raw.get("head_only", False)),
            seed=int(raw.get("seed", 0)),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bundle {spec.name}: bad zoo config {dict(raw)!r}: {exc}") from None
    layout = cfg.to_spec()
    if layout.weights != spec.weights or layout.trainable != spec.trainable:
        raise ModelError(f"bundle {spec.name}: weights do not match its zoo config")
    return cfg


def build_keras_model(cfg: ModelConfig) -> tuple[keras.Model, dict[str, keras.Variable]]:
    """The Keras model equivalent to zoo model ``cfg`` and ``{tensor name: variable}``.

    Layers are named after the tensors (``conv1``, ``dense1``, ``lstm``, ``out``), whose
    ``kernel`` / ``bias`` / ``recurrent_kernel`` are exactly the zoo's layouts.
    """
    inputs = keras.Input(shape=cfg.input_shape, name="x")
    x: Any = inputs
    layers: list[keras.layers.Layer] = []
    if cfg.kind == "cnn":
        for i, cout in enumerate(cfg.channels, start=1):
            conv = keras.layers.Conv2D(cout, 3, padding="same", activation=relu0, name=f"conv{i}")
            layers.append(conv)
            x = keras.layers.AveragePooling2D(2, name=f"pool{i}")(conv(x))
        x = keras.layers.Flatten(name="flatten")(x)
    elif cfg.kind == "mlp":
        if len(cfg.input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
    elif cfg.kind == "lstm":
        rnn = keras.layers.LSTM(cfg.hidden[0], name="lstm")
        layers.append(rnn)
        x = rnn(x)
    else:
        rnn = keras.layers.GRU(cfg.hidden[0], reset_after=True, name="gru")
        layers.append(rnn)
        x = rnn(x)
    if cfg.kind in ("mlp", "cnn"):
        for i, width in enumerate(cfg.hidden, start=1):
            dense = keras.layers.Dense(width, activation=relu0, name=f"dense{i}")
            layers.append(dense)
            x = dense(x)
    out = keras.layers.Dense(cfg.num_classes, name="out")
    layers.append(out)
    model = keras.Model(inputs, out(x), name=cfg.name.replace("-", "_").replace(".", "_"))
    variables: dict[str, keras.Variable] = {}
    for layer in layers:
        for var in layer.weights:
            variables[f"{layer.name}_{_leaf(var)}"] = var
    expected = [t.name for t in cfg.to_spec().weights]
    if sorted(variables) != sorted(expected):
        raise ModelError(f"Keras model of {cfg.name} has {sorted(variables)}, zoo {expected}")
    for ts in cfg.to_spec().weights:
        if tuple(variables[ts.name].shape) != ts.shape:
            raise ModelError(
                f"Keras {ts.name} has shape {tuple(variables[ts.name].shape)}, zoo {ts.shape}"
            )
    return model, {n: variables[n] for n in expected}


def _leaf(var: keras.Variable) -> str:
    name = str(var.path).rsplit("/", 1)[-1].lower()
    return _LEAF.sub("_", name).strip("_") or "var"


def keras_weight_names(model: keras.Model) -> list[str]:
    """Stable tensor names of ``model.weights``: ``w<index>_<variable name>``."""
    names = []
    for i, var in enumerate(model.weights):
        name = f"w{i:03d}_{_leaf(var)}"[:64]
        names.append(name)
    return names


def _is_softmax_output(model: keras.Model) -> bool:
    last = model.layers[-1] if model.layers else None
    act = getattr(last, "activation", None)
    if act is keras.activations.softmax:
        return True
    return isinstance(last, keras.layers.Softmax)


# -- the trainer ------------------------------------------------------------------------------
class KerasTrainer:
    """:class:`~edge_agent.trainer.Trainer` on a Keras model (TensorFlow backend).

    ``source`` is a bundle (directory, prebuilt name or loaded), or a zoo config (initial
    weights from its seed, or ``weights``). Use :meth:`from_model` for an arbitrary model.
    """

    spec: ModelSpec
    model: keras.Model

    def __init__(
        self,
        source: ModelBundle | ModelConfig | str | os.PathLike[str],
        *,
        weights: Mapping[str, np.ndarray] | None = None,
        num_threads: int | None = None,
    ) -> None:
        set_tf_threads(num_threads)
        if isinstance(source, ModelConfig):
            cfg = source
            spec = cfg.to_spec()
            initial = init_weights(cfg)
        else:
            bundle = source if isinstance(source, ModelBundle) else _load(source)
            spec = bundle.spec
            cfg = config_from_spec(spec)
            initial = dict(bundle.initial_weights)
        if weights is not None:
            initial.update(check_weights(spec, weights, partial=True))
        model, variables = build_keras_model(cfg)
        self._setup(model, spec, variables, from_logits=True)
        self.set_weights(initial)

    @classmethod
    def from_model(
        cls,
        model: keras.Model,
        *,
        name: str,
        trainable: Iterable[str | keras.layers.Layer] | None = None,
        train_batch: int = 32,
        infer_batch: int = 128,
        from_logits: bool | None = None,
        num_threads: int | None = None,
    ) -> KerasTrainer:
        """Wrap any single-input classifier ``model`` (output ``[B, num_classes]``).

        ``trainable``: the federated subset, as layers, layer names, Keras variable paths or
        derived tensor names (:func:`keras_weight_names`); default: ``model.trainable_weights``.
        Layers left entirely out are set ``trainable = False`` (so e.g. BatchNorm runs in
        inference mode, the Keras fine-tuning idiom). ``from_logits`` defaults to False when
        the last layer is a softmax, else True.
        """
        set_tf_threads(num_threads)
        if not isinstance(model, keras.Model):
            raise ModelError(f"from_model needs a keras.Model, got {type(model).__name__}")
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ModelError("from_model supports models with one input and one output")
        in_shape = tuple(model.inputs[0].shape[1:])
        out_shape = tuple(model.outputs[0].shape[1:])
        if any(d is None for d in in_shape):
            raise ModelError(f"model input shape {in_shape} must be fully defined")
        if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < 2:
            raise ModelError(f"model output must be [batch, classes], got {out_shape}")
        names = keras_weight_names(model)
        variables = dict(zip(names, model.weights, strict=True))
        if len(variables) != len(names):
            raise ModelError("derived weight names are not unique")
        for n, var in variables.items():
            if np.dtype(var.dtype) != np.float32:
                raise ModelError(f"weight {n} ({var.path}) is {var.dtype}; only float32 works")
        selected = _select(model, variables, trainable)
        if not selected:
            raise ModelError("no trainable weights selected")
        if trainable is not None:
            keep = {id(variables[n]) for n in selected}
            for layer in model.layers:
                if layer.weights and not any(id(v) in keep for v in layer.weights):
                    layer.trainable = False
        spec = ModelSpec(
            name=name,
            kind="keras",
            input_shape=tuple(int(d) for d in in_shape),
            input_dtype="float32",
            num_classes=int(out_shape[0]),
            train_batch=train_batch,
            infer_batch=infer_batch,
            weights=tuple(
                TensorSpec(n, tuple(int(d) for d in v.shape)) for n, v in variables.items()
            ),
            trainable=tuple(selected),
            extra={"keras_class": type(model).__name__},
        )
        if from_logits is None:
            from_logits = not _is_softmax_output(model)
        trainer = cls.__new__(cls)
        trainer._setup(model, spec, variables, from_logits=from_logits)
        return trainer

    def _setup(
        self,
        model: keras.Model,
        spec: ModelSpec,
        variables: Mapping[str, keras.Variable],
        *,
        from_logits: bool,
    ) -> None:
        self.model = model
        self.spec = spec
        self.from_logits = from_logits
        self._vars = dict(variables)
        self._masks: dict[str, tf.Tensor] = {}  # pruning (set_mask): applied after each step
        train_vars = [self._vars[n] for n in spec.trainable]
        num_classes = spec.num_classes
        x_sig = tf.TensorSpec([None, *spec.input_shape], tf.float32)

        def loss_of(out: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
            onehot = tf.one_hot(y, num_classes, dtype=tf.float32)
            if from_logits:
                logp = tf.nn.log_softmax(out)
            else:
                logp = tf.math.log(tf.clip_by_value(out, 1e-7, 1.0))
            return tf.reduce_mean(-tf.reduce_sum(onehot * logp, axis=1))

        @tf.function(
            input_signature=[x_sig, tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.float32)]
        )
        def train_step(x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_of(model(x, training=True), y)
            grads = tape.gradient(loss, train_vars)
            for var, grad in zip(train_vars, grads, strict=True):
                if grad is not None:
                    var.assign_sub(lr * grad)
            return loss

        globals_ = [tf.Variable(tf.zeros_like(v), trainable=False) for v in train_vars]
        f32 = tf.TensorSpec([], tf.float32)

        @tf.function(input_signature=[x_sig, tf.TensorSpec([None], tf.int32), f32, f32])
        def prox_step(x: tf.Tensor, y: tf.Tensor, lr: tf.Tensor, mu: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = loss_of(model(x, training=True), y)
            grads = tape.gradient(loss, train_vars)
            for var, grad, g0 in zip(train_vars, grads, globals_, strict=True):
                if grad is not None:
                    var.assign_sub(lr * (grad + mu * (var - g0)))
            return loss

        @tf.function(input_signature=[x_sig, tf.TensorSpec([None], tf.int32)])
        def grad_step(x: tf.Tensor, y: tf.Tensor) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_of(model(x, training=True), y)
            grads = tape.gradient(loss, train_vars)
            return loss, [
                tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                for v, g in zip(train_vars, grads, strict=True)
            ]

        @tf.function(input_signature=[x_sig])
        def infer(x: tf.Tensor) -> tf.Tensor:
            return model(x, training=False)

        self._globals = globals_
        self._prox_step: Callable[..., Any] = prox_step
        self._grad_step: Callable[..., Any] = grad_step
        self._train_step: Callable[..., Any] = train_step
        self._infer: Callable[..., Any] = infer
        self._lr = np.zeros((), dtype=np.float32)
        log.debug(
            "Keras trainer %s: %d weights, %d trainable, from_logits=%s",
            spec.name, len(spec.weights), len(spec.trainable), from_logits,
        )

    @property
    def keras_paths(self) -> dict[str, str]:
        """``{tensor name: Keras variable path}`` (paths hold Keras' per-process layer
        names, so they are not part of the spec)."""
        return {n: str(v.path) for n, v in self._vars.items()}

    # -- Trainer Protocol ---------------------------------------------------------------------
    @property
    def runtime_name(self) -> str:
        return "keras"

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load weights: all trainable tensors are required, frozen ones optional."""
        checked = check_weights(self.spec, weights, partial=True)
        missing = [n for n in self.spec.trainable if n not in checked]
        if missing:
            raise ModelError(f"set_weights is missing trainable weights {missing}")
        for name, value in checked.items():
            self._vars[name].assign(value)

    def get_weights(self, *, include_frozen: bool = False) -> dict[str, np.ndarray]:
        """Copies of the trainable weights (all weights with ``include_frozen``)."""
        names = self.spec.weight_names if include_frozen else self.spec.trainable
        return {
            n: np.array(keras.ops.convert_to_numpy(self._vars[n]), dtype=np.float32, copy=True)
            for n in names
        }

    def prepare_inputs(self, x: np.ndarray) -> np.ndarray:
        """``x`` as float32 ``[N, *input_shape]`` (flat rows are reshaped)."""
        x = np.asarray(x, dtype=np.float32)
        shape = self.spec.input_shape
        if x.shape[1:] != shape:
            per = math.prod(shape)
            if x.ndim < 1 or x.size != len(x) * per:
                raise ModelError(f"inputs of shape {x.shape} do not match model input {shape}")
            x = x.reshape((len(x), *shape))
        return x

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, rng: np.random.Generator
    ) -> TrainMetrics:
        check_fit_args(epochs, lr)
        xs = self.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        self._lr[()] = lr
        lr_t = tf.constant(self._lr)
        b = self.spec.train_batch
        xb = np.empty((b, *self.spec.input_shape), dtype=np.float32)
        yb = np.empty(b, dtype=np.int32)

        def step(m: int) -> float:
            # Keras takes the partial last batch as it is (same gradient as LiteRT's padding).
            loss = float(self._train_step(xb[:m], yb[:m], lr_t))
            self._apply_mask()
            return loss

        metrics = sgd_epochs(xs, labels, epochs=epochs, batch=b, rng=rng, xb=xb, yb=yb, step=step)
        log.debug(
            "fit %s (keras): %d examples, %d steps, loss %.4f, %.0f examples/s",
            self.spec.name, metrics.examples, metrics.steps, metrics.loss,
            metrics.examples_per_second,
        )
        return metrics

    # -- pruning (docs/pruning.md) -------------------------------------------------------------
    def set_mask(self, masks: Mapping[str, np.ndarray] | None) -> None:
        """Train :meth:`fit` steps under ``masks`` (0/1 per trainable tensor; unnamed ones
        whole): after each SGD step ``v <- v * mask``, i.e. ``(v - lr grad) * mask`` as
        LiteRT's ``train_masked``; ``None`` trains every weight again."""
        if masks is None:
            self._masks = {}
            return
        shapes = {t.name: t.shape for t in self.spec.weights}
        out: dict[str, tf.Tensor] = {}
        for n, m in masks.items():
            if n not in self.spec.trainable:
                raise ModelError(f"set_mask names a tensor that is not trainable: {n!r}")
            value = np.asarray(m, np.float32)
            if value.shape != shapes[n]:
                raise ModelError(f"mask of {n} has shape {value.shape}, the model {shapes[n]}")
            out[n] = tf.constant(value)
        self._masks = out
        self._apply_mask()

    def _apply_mask(self) -> None:
        for n, m in self._masks.items():
            var = self._vars[n]
            var.assign(var * m)

    # -- VariantTrainer -----------------------------------------------------------------------
    @property
    def variants(self) -> frozenset[str]:
        return frozenset({"prox", "gradient", "mask"})

    def fit_prox(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int,
        lr: float,
        rng: np.random.Generator,
        mu: float,
    ) -> TrainMetrics:
        """:meth:`fit` with the FedProx term towards the weights at the call."""
        check_fit_args(epochs, lr, mu)
        xs = self.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        for g0, name in zip(self._globals, self.spec.trainable, strict=True):
            g0.assign(self._vars[name])
        lr_t = tf.constant(np.float32(lr))
        mu_t = tf.constant(np.float32(mu))
        b = self.spec.train_batch
        xb = np.empty((b, *self.spec.input_shape), dtype=np.float32)
        yb = np.empty(b, dtype=np.int32)

        def step(m: int) -> float:
            return float(self._prox_step(xb[:m], yb[:m], lr_t, mu_t))

        return sgd_epochs(xs, labels, epochs=epochs, batch=b, rng=rng, xb=xb, yb=yb, step=step)

    def gradient(
        self, x: np.ndarray, y: np.ndarray, *, max_examples: int, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], TrainMetrics]:
        """Mean-loss gradient over at most ``max_examples`` examples (see
        :func:`~edge_agent.trainer.mean_gradient`)."""
        xs = self.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        b = self.spec.train_batch
        xb = np.empty((b, *self.spec.input_shape), dtype=np.float32)
        yb = np.empty(b, dtype=np.int32)
        names = self.spec.trainable

        def grad(m: int) -> tuple[float, Mapping[str, np.ndarray]]:
            loss, grads = self._grad_step(xb[:m], yb[:m])
            return float(loss), {
                n: np.asarray(g, np.float32) for n, g in zip(names, grads, strict=True)
            }

        return mean_gradient(
            xs, labels, max_examples=max_examples, batch=b, rng=rng, xb=xb, yb=yb, grad=grad
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Model outputs ``[N, num_classes]`` (logits, or probabilities for a softmax model),
        in chunks of ``infer_batch``."""
        xs = self.prepare_inputs(x)
        b = self.spec.infer_batch
        out = np.empty((len(xs), self.spec.num_classes), dtype=np.float32)
        for lo in range(0, len(xs), b):
            out[lo : lo + b] = np.asarray(self._infer(xs[lo : lo + b]))
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalMetrics:
        xs = self.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        if len(labels) == 0:
            raise ModelError("cannot evaluate on zero examples")
        out = self.predict(xs)
        lab = labels.astype(np.int64)
        if self.from_logits:
            loss = float(softmax_cross_entropy(out, lab).mean())
        else:
            p = np.clip(out[np.arange(len(lab)), lab].astype(np.float64), 1e-7, 1.0)
            loss = float(-np.log(p).mean())
        acc = float((out.argmax(axis=1) == lab).mean())
        return EvalMetrics(loss=loss, accuracy=acc, examples=len(lab))


def _load(source: str | os.PathLike[str]) -> ModelBundle:
    path = Path(source).expanduser()
    if path.exists():
        return load_bundle(path)
    return load_bundle(prebuilt_bundle_path(str(source)))


def _select(
    model: keras.Model,
    variables: Mapping[str, keras.Variable],
    trainable: Iterable[str | keras.layers.Layer] | None,
) -> list[str]:
    """Derived names of the federated variables, in ``model.weights`` order."""
    by_id = {id(v): n for n, v in variables.items()}
    if trainable is None:
        chosen = {by_id[id(v)] for v in model.trainable_weights if id(v) in by_id}
    else:
        if isinstance(trainable, str):
            raise ModelError("trainable must be a sequence of names or layers, not a string")
        by_path = {str(v.path): n for n, v in variables.items()}
        layers = {layer.name: layer for layer in _all_layers(model)}
        chosen = set()
        for item in trainable:
            if isinstance(item, keras.layers.Layer):
                found = [by_id[id(v)] for v in item.weights if id(v) in by_id]
            elif item in variables:
                found = [item]
            elif item in by_path:
                found = [by_path[item]]
            elif item in layers:
                found = [by_id[id(v)] for v in layers[item].weights if id(v) in by_id]
            else:
                raise ModelError(f"trainable {item!r} is no layer, variable path or weight name")
            if not found:
                raise ModelError(f"trainable {item!r} has no weights")
            chosen.update(found)
    return [n for n in variables if n in chosen]


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out: list[keras.layers.Layer] = []
    stack = list(model.layers)
    while stack:
        layer = stack.pop(0)
        out.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return out
