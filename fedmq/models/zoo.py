"""Model zoo: compact classifiers written with ops that convert to TFLite *builtins*.

The pip LiteRT runtimes have no Flex delegate, so the training step must avoid ops whose
gradients need TensorFlow kernels (see docs/facts.md, "On-device training with LiteRT"):

- relu is ``maximum(x, 0)`` (``ReluGrad`` is Flex);
- a 3x3 'same' convolution is im2col: the nine ``tf.slice``-shifted views of the padded
  input are concatenated along channels and multiplied by the ``[9*Cin, Cout]`` kernel in
  ONE matmul (Conv2D's filter gradient is Flex). For the first layer, whose input needs no
  gradient, the patches come from a CONV_2D with a constant one-hot filter (XNNPACK-fast);
- 2x2 average pooling is ``avg_pool2d`` with a custom gradient (nearest-neighbour upsampling
  divided by 4; ``AvgPoolGrad`` is Flex);
- every matmul and its gradients are rank-3 BATCH_MATMULs (:func:`matmul`): the
  FULLY_CONNECTED the converter otherwise emits has variable weights, which LiteRT's XNNPACK
  delegate does not take, and the training step runs ~1.5x slower;
- recurrent layers are unrolled by hand; per-step tensors come from ``tf.unstack`` /
  ``tf.split`` (Python indexing yields ``StridedSliceGrad``, Flex);
- the loss is ``sum(w * -sum(one_hot(y) * log_softmax(logits))) / max(sum(w), 1)`` where
  ``w`` is a per-example weight, so a zero-padded last batch gives the exact loss.

Weight layouts follow Keras (conv kernels HWIO, LSTM gates i,f,c,o, GRU reset_after with a
``[2, 3H]`` bias) so a Keras backend can share the same tensors.

The configuration, presets, weight layouts and initialisers here are pure numpy;
TensorFlow is imported only by :func:`forward`, :func:`loss_fn` and :func:`build_module`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.models.spec import ModelSpec, TensorSpec

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "KINDS",
    "PRESETS",
    "ModelConfig",
    "build_module",
    "forward",
    "head_names",
    "init_weights",
    "loss_fn",
    "matmul",
    "preset",
    "weight_layout",
    "weighted_cross_entropy",
]

log = logging.getLogger(__name__)

KINDS = ("mlp", "cnn", "lstm", "gru")


@dataclass(frozen=True)
class ModelConfig:
    """Parameters of one zoo model (what ``export_model`` needs besides an output dir).

    - ``mlp``: ``input_shape`` is flattened; ``hidden`` are the dense widths.
    - ``cnn``: ``input_shape`` is ``(H, W, C)``; ``channels`` are the 3x3 conv widths (each
      conv is followed by relu and 2x2 average pooling); ``hidden`` are the dense widths.
    - ``lstm`` / ``gru``: ``input_shape`` is ``(steps, features)``; ``hidden[0]`` is the
      number of units; the logits come from the last hidden state.

    ``head_only`` freezes the feature extractor: only the head (``out`` layer, and for the
    cnn also the dense layers after the convs) is trained and federated.
    """

    name: str
    kind: str
    input_shape: tuple[int, ...]
    num_classes: int = 10
    hidden: tuple[int, ...] = (64,)
    channels: tuple[int, ...] = ()
    train_batch: int = 32
    infer_batch: int = 128
    head_only: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"unknown model kind {self.kind!r}; known: {', '.join(KINDS)}")
        for attr in ("input_shape", "hidden", "channels"):
            value = tuple(getattr(self, attr))
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ModelError(f"{attr} must be positive integers, got {value!r}")
            object.__setattr__(self, attr, value)
        if not self.input_shape:
            raise ModelError("input_shape must not be empty")
        if self.num_classes < 2:
            raise ModelError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.train_batch < 1 or self.infer_batch < 1:
            raise ModelError("train_batch and infer_batch must be positive")
        if self.kind == "cnn":
            if len(self.input_shape) != 3:
                raise ModelError(f"cnn input_shape must be (H, W, C), got {self.input_shape}")
            if not self.channels:
                raise ModelError("cnn needs at least one conv layer (channels)")
            h, w, _ = self.input_shape
            div = 2 ** len(self.channels)
            if h % div or w % div:
                raise ModelError(
                    f"cnn input {h}x{w} must be divisible by {div} for {len(self.channels)} "
                    "2x2 poolings"
                )
        elif self.channels:
            raise ModelError(f"channels only apply to cnn, not {self.kind}")
        if self.kind in ("lstm", "gru"):
            if len(self.input_shape) != 2:
                raise ModelError(
                    f"{self.kind} input_shape must be (steps, features), got {self.input_shape}"
                )
            if len(self.hidden) != 1:
                raise ModelError(f"{self.kind} takes exactly one hidden width (its units)")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "hidden": list(self.hidden),
            "channels": list(self.channels),
            "head_only": self.head_only,
            "seed": self.seed,
            **self.extra,
        }

    def to_spec(self) -> ModelSpec:
        layout = weight_layout(self)
        trainable = head_names(self) if self.head_only else tuple(t.name for t in layout)
        return ModelSpec(
            name=self.name,
            kind=self.kind,
            input_shape=self.input_shape,
            input_dtype="float32",
            num_classes=self.num_classes,
            train_batch=self.train_batch,
            infer_batch=self.infer_batch,
            weights=layout,
            trainable=trainable,
            extra={"config": self.to_json()},
        )


PRESETS: dict[str, ModelConfig] = {
    "digits-mlp": ModelConfig(
        name="digits-mlp", kind="mlp", input_shape=(64,), hidden=(64,), train_batch=16
    ),
    "fmnist-mlp": ModelConfig(
        name="fmnist-mlp", kind="mlp", input_shape=(28, 28, 1), hidden=(128, 64)
    ),
    "fmnist-cnn": ModelConfig(
        name="fmnist-cnn",
        kind="cnn",
        input_shape=(28, 28, 1),
        channels=(16, 32),
        hidden=(64,),
    ),
    "fmnist-lstm": ModelConfig(name="fmnist-lstm", kind="lstm", input_shape=(28, 28), hidden=(64,)),
    "fmnist-gru": ModelConfig(name="fmnist-gru", kind="gru", input_shape=(28, 28), hidden=(64,)),
}


def preset(name: str, /, **overrides: Any) -> ModelConfig:
    """A preset config, optionally with fields replaced (``hidden=(32,)``, ``seed=3`` ...)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    changes = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**changes) if changes else base


# -- weight layout --------------------------------------------------------------------------
def _dense_layers(cfg: ModelConfig, fan_in: int) -> list[TensorSpec]:
    out: list[TensorSpec] = []
    for i, width in enumerate(cfg.hidden if cfg.kind in ("mlp", "cnn") else (), start=1):
        out += [
            TensorSpec(f"dense{i}_kernel", (fan_in, width)),
            TensorSpec(f"dense{i}_bias", (width,)),
        ]
        fan_in = width
    out += [
        TensorSpec("out_kernel", (fan_in, cfg.num_classes)),
        TensorSpec("out_bias", (cfg.num_classes,)),
    ]
    return out


def weight_layout(cfg: ModelConfig) -> tuple[TensorSpec, ...]:
    """Every variable of the model, in canonical order."""
    if cfg.kind == "mlp":
        return tuple(_dense_layers(cfg, math.prod(cfg.input_shape)))
    if cfg.kind == "cnn":
        h, w, cin = cfg.input_shape
        convs: list[TensorSpec] = []
        for i, cout in enumerate(cfg.channels, start=1):
            convs += [
                TensorSpec(f"conv{i}_kernel", (3, 3, cin, cout)),
                TensorSpec(f"conv{i}_bias", (cout,)),
            ]
            cin, h, w = cout, h // 2, w // 2
        return (*convs, *_dense_layers(cfg, h * w * cin))
    feats = cfg.input_shape[1]
    units = cfg.hidden[0]
    gates = 4 if cfg.kind == "lstm" else 3
    bias_shape = (gates * units,) if cfg.kind == "lstm" else (2, gates * units)
    rnn = [
        TensorSpec(f"{cfg.kind}_kernel", (feats, gates * units)),
        TensorSpec(f"{cfg.kind}_recurrent_kernel", (units, gates * units)),
        TensorSpec(f"{cfg.kind}_bias", bias_shape),
    ]
    return (*rnn, *_dense_layers(cfg, units))


def head_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Weights trained when the feature extractor is frozen (``head_only``)."""
    heads = ("out_", "dense") if cfg.kind == "cnn" else ("out_",)
    return tuple(t.name for t in weight_layout(cfg) if t.name.startswith(heads))


# -- initial weights (deterministic by seed) -----------------------------------------------
def _glorot(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 4:  # HWIO conv kernel
        receptive = shape[0] * shape[1]
        fan_in, fan_out = receptive * shape[2], receptive * shape[3]
    else:
        fan_in, fan_out = shape[0], shape[-1]
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


def _orthogonal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    q = q if rows >= cols else q.T
    return np.ascontiguousarray(q[:rows, :cols], dtype=np.float32)


def init_weights(cfg: ModelConfig, seed: int | None = None) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels, orthogonal recurrent kernels, zero biases (LSTM forget bias 1)."""
    rng = np.random.default_rng(cfg.seed if seed is None else seed)
    out: dict[str, np.ndarray] = {}
    for ts in weight_layout(cfg):
        if ts.name.endswith("recurrent_kernel"):
            out[ts.name] = _orthogonal(rng, ts.shape)
        elif ts.name.endswith("kernel"):
            out[ts.name] = _glorot(rng, ts.shape)
        else:
            bias = np.zeros(ts.shape, dtype=np.float32)
            if ts.name == "lstm_bias":
                units = cfg.hidden[0]
                bias[units : 2 * units] = 1.0
            out[ts.name] = bias
    return out


# -- forward pass and loss (TensorFlow) -----------------------------------------------------
def _relu(tf_: Any, x: tf.Tensor) -> tf.Tensor:
    return tf_.maximum(x, 0.0)


_PLAIN_MATMULS = False


@contextlib.contextmanager
def plain_matmuls() -> Iterator[None]:
    """Within it, :func:`matmul` traces a plain 2-D ``tf.matmul``: for an inference-only
    graph on constant weights (``fedmq model export --pruned``) the converter makes those
    FULLY_CONNECTED, whose constant kernels it can store sparse. Training graphs keep the
    rank-3 form."""
    global _PLAIN_MATMULS
    before, _PLAIN_MATMULS = _PLAIN_MATMULS, True
    try:
        yield
    finally:
        _PLAIN_MATMULS = before


def matmul(tf_: Any, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``a @ b`` for 2-D tensors whose gradients are rank-3 batch matmuls.

    Autodiff writes ``grad @ b.T`` as a MatMul with ``transpose_b``, and the converter turns
    reshape + matmul + reshape into FULLY_CONNECTED; with non-constant weights LiteRT runs
    that without XNNPACK, 2-3x slower than the BATCH_MATMUL it keeps for rank-3 operands
    ``[1, M, K]`` (forward and both gradients).
    """

    @tf_.custom_gradient  # type: ignore[misc,unused-ignore]
    def _mm(x: tf.Tensor, w: tf.Tensor) -> tuple[tf.Tensor, Any]:
        m, k = (int(d) for d in x.shape)
        n = int(w.shape[1])

        def grad(dy: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            dy3 = tf_.reshape(dy, [1, m, n])
            dx = tf_.matmul(dy3, tf_.reshape(w, [1, k, n]), adjoint_b=True)
            dw = tf_.matmul(tf_.reshape(x, [1, m, k]), dy3, adjoint_a=True)
            return tf_.reshape(dx, [m, k]), tf_.reshape(dw, [k, n])

        y = tf_.matmul(tf_.reshape(x, [1, m, k]), tf_.reshape(w, [1, k, n]))
        return tf_.reshape(y, [m, n]), grad

    if _PLAIN_MATMULS:
        return tf_.matmul(a, b)
    return _mm(a, b)


def _dense_stack(tf_: Any, cfg: ModelConfig, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    if cfg.kind in ("mlp", "cnn"):
        for i in range(1, len(cfg.hidden) + 1):
            x = _relu(tf_, matmul(tf_, x, p[f"dense{i}_kernel"]) + p[f"dense{i}_bias"])
    return matmul(tf_, x, p["out_kernel"]) + p["out_bias"]


def _im2col_onehot(cin: int) -> np.ndarray:
    """Constant ``[3, 3, cin, 9*cin]`` filter whose 'same' convolution yields the im2col
    patches, channel ``(3*dy + dx)*cin + c`` (the HWIO kernel's row order)."""
    eye = np.zeros((3, 3, cin, 9 * cin), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            for c in range(cin):
                eye[dy, dx, c, (3 * dy + dx) * cin + c] = 1.0
    return eye


def _conv3x3_same(
    tf_: Any, x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor, *, is_input: bool = False
) -> tf.Tensor:
    """im2col: 9 shifted slices concatenated on channels, then one matmul.

    For the model input (no gradient flows into it) the patches come from a convolution
    with a constant one-hot filter instead: a CONV_2D with static weights that LiteRT
    delegates to XNNPACK, much faster than concatenating nine 1-channel slices.
    """
    b, h, w, cin = (int(d) for d in x.shape)
    cout = int(kernel.shape[-1])
    if is_input:
        patches = tf_.nn.conv2d(x, tf_.constant(_im2col_onehot(cin)), 1, "SAME")
    else:
        padded = tf_.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
        views = [
            tf_.slice(padded, [0, dy, dx, 0], [b, h, w, cin]) for dy in range(3) for dx in range(3)
        ]
        patches = tf_.concat(views, axis=3)
    patches = tf_.reshape(patches, [b * h * w, 9 * cin])
    y = matmul(tf_, patches, tf_.reshape(kernel, [9 * cin, cout])) + bias
    return tf_.reshape(y, [b, h, w, cout])


def _avgpool2(tf_: Any, x: tf.Tensor) -> tf.Tensor:
    """2x2 average pooling: AVERAGE_POOL_2D forward, nearest-neighbour upsampling / 4 as the
    (exact) gradient, both builtins; ``AvgPoolGrad`` itself would be Flex. This is ~5x faster
    in LiteRT than reshape + ``reduce_mean``."""

    @tf_.custom_gradient  # type: ignore[misc,unused-ignore]
    def pool(v: tf.Tensor) -> tuple[tf.Tensor, Any]:
        _, h, w, _ = (int(d) for d in v.shape)

        def grad(dy: tf.Tensor) -> tf.Tensor:
            return tf_.image.resize(dy, [h, w], method="nearest") * 0.25

        return tf_.nn.avg_pool2d(v, 2, 2, "VALID"), grad

    return pool(x)


def _lstm(tf_: Any, cfg: ModelConfig, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    b, steps, feats = (int(d) for d in x.shape)
    units = cfg.hidden[0]
    proj = tf_.reshape(
        matmul(tf_, tf_.reshape(x, [b * steps, feats]), p["lstm_kernel"]) + p["lstm_bias"],
        [b, steps, 4 * units],
    )
    h = c = None
    for z_x in tf_.unstack(proj, axis=1):
        z = z_x if h is None else z_x + matmul(tf_, h, p["lstm_recurrent_kernel"])
        i, f, g, o = tf_.split(z, 4, axis=1)
        i, f, g, o = tf_.sigmoid(i), tf_.sigmoid(f), tf_.tanh(g), tf_.sigmoid(o)
        c = i * g if c is None else f * c + i * g
        h = o * tf_.tanh(c)
    return h


def _gru(tf_: Any, cfg: ModelConfig, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """Keras GRU with ``reset_after=True`` (gates z, r, h)."""
    b, steps, feats = (int(d) for d in x.shape)
    units = cfg.hidden[0]
    in_bias, rec_bias = tf_.unstack(p["gru_bias"], axis=0)
    proj = tf_.reshape(
        matmul(tf_, tf_.reshape(x, [b * steps, feats]), p["gru_kernel"]) + in_bias,
        [b, steps, 3 * units],
    )
    h = None
    for x_t in tf_.unstack(proj, axis=1):
        xz, xr, xh = tf_.split(x_t, 3, axis=1)
        if h is None:
            hz, hr, hh = tf_.split(tf_.broadcast_to(rec_bias, [b, 3 * units]), 3, axis=1)
        else:
            hz, hr, hh = tf_.split(matmul(tf_, h, p["gru_recurrent_kernel"]) + rec_bias, 3, axis=1)
        z = tf_.sigmoid(xz + hz)
        r = tf_.sigmoid(xr + hr)
        cand = tf_.tanh(xh + r * hh)
        h = (1.0 - z) * cand if h is None else z * h + (1.0 - z) * cand
    return h


def forward(cfg: ModelConfig, params: Mapping[str, Any], x: Any) -> tf.Tensor:
    """Logits for a batch ``x`` of static shape ``[B, *input_shape]``."""
    import tensorflow as tf_

    b = int(x.shape[0])
    if cfg.kind == "mlp":
        feats = tf_.reshape(x, [b, math.prod(cfg.input_shape)])
    elif cfg.kind == "cnn":
        feats = tf_.reshape(x, [b, *cfg.input_shape])
        for i in range(1, len(cfg.channels) + 1):
            conv = _conv3x3_same(
                tf_, feats, params[f"conv{i}_kernel"], params[f"conv{i}_bias"], is_input=i == 1
            )
            feats = _avgpool2(tf_, _relu(tf_, conv))
        feats = tf_.reshape(feats, [b, -1])
    elif cfg.kind == "lstm":
        feats = _lstm(tf_, cfg, params, x)
    else:
        feats = _gru(tf_, cfg, params, x)
    return _dense_stack(tf_, cfg, params, feats)


def loss_fn(cfg: ModelConfig, logits: Any, y: Any, w: Any) -> tf.Tensor:
    """Weighted mean cross-entropy: ``sum(w * ce) / max(sum(w), 1)``."""
    return weighted_cross_entropy(logits, y, w, cfg.num_classes)


def weighted_cross_entropy(logits: Any, y: Any, w: Any, num_classes: int) -> tf.Tensor:
    """``sum(w * -sum(one_hot(y) * log_softmax(logits))) / max(sum(w), 1)`` (builtin ops
    only, forward and gradient)."""
    import tensorflow as tf_

    logp = tf_.nn.log_softmax(logits)
    ce = -tf_.reduce_sum(tf_.one_hot(y, num_classes, dtype=logp.dtype) * logp, axis=1)
    return tf_.reduce_sum(w * ce) / tf_.maximum(tf_.reduce_sum(w), 1.0)


# -- trainable tf.Module ----------------------------------------------------------------------
def build_module(cfg: ModelConfig, weights: Mapping[str, np.ndarray]) -> Any:
    """A ``tf.Module`` holding the variables, with ``train``/``infer``/``get_weights``/
    ``set_weights`` ``tf.function``s of fixed batch size (the export signatures).

    ``train(x, y, w, lr)`` does one plain-SGD step on the trainable variables and returns the
    loss before the update. ``get_weights``/``set_weights`` cover every variable. The
    optional ``set_global``/``train_prox``/``gradient`` are :mod:`fedmq.models.variants`.
    """
    import tensorflow as tf_

    from fedmq.models.variants import add_variant_signatures

    spec = cfg.to_spec()
    missing = [n for n in spec.weight_names if n not in weights]
    if missing:
        raise ModelError(f"initial weights lack {missing}")
    trainable = set(spec.trainable)
    f32 = tf_.float32

    class TrainableModel(tf_.Module):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            super().__init__(name=cfg.name.replace("-", "_").replace(".", "_"))
            self.cfg = cfg
            self.spec = spec
            self.variables_by_name = {
                n: tf_.Variable(
                    np.asarray(weights[n], dtype=np.float32), name=n, trainable=n in trainable
                )
                for n in spec.weight_names
            }
            x_spec = tf_.TensorSpec([cfg.train_batch, *cfg.input_shape], f32, name="x")
            self.train = tf_.function(
                self._train,
                input_signature=[
                    x_spec,
                    tf_.TensorSpec([cfg.train_batch], tf_.int32, name="y"),
                    tf_.TensorSpec([cfg.train_batch], f32, name="w"),
                    tf_.TensorSpec([], f32, name="lr"),
                ],
            )
            self.infer = tf_.function(
                self._infer,
                input_signature=[
                    tf_.TensorSpec([cfg.infer_batch, *cfg.input_shape], f32, name="x")
                ],
            )
            self.get_weights = tf_.function(self._get_weights, input_signature=[])
            self.set_weights = tf_.function(
                self._set_weights,
                input_signature=[tf_.TensorSpec(t.shape, f32, name=t.name) for t in spec.weights],
            )
            add_variant_signatures(
                self, spec, lambda p, x, y, w: loss_fn(cfg, forward(cfg, p, x), y, w)
            )

        def params(self) -> dict[str, tf.Tensor]:
            return {n: tf_.convert_to_tensor(v) for n, v in self.variables_by_name.items()}

        def _train(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, lr: tf.Tensor) -> Any:
            train_vars = [self.variables_by_name[n] for n in spec.trainable]
            with tf_.GradientTape() as tape:
                loss = loss_fn(cfg, forward(cfg, self.params(), x), y, w)
            grads = tape.gradient(loss, train_vars)
            for var, grad in zip(train_vars, grads, strict=True):
                var.assign_sub(lr * grad)
            return {"loss": loss}

        def _infer(self, x: tf.Tensor) -> Any:
            return {"logits": forward(cfg, self.params(), x)}

        def _get_weights(self) -> Any:
            return {n: tf_.identity(v) for n, v in self.variables_by_name.items()}

        def _set_weights(self, *values: tf.Tensor) -> Any:
            for name, value in zip(spec.weight_names, values, strict=True):
                self.variables_by_name[name].assign(value)
            return {"ok": tf_.constant(1, dtype=tf_.int32)}

    return TrainableModel()
