"""Bring your own Keras model: import a Sequential or functional Keras model as the same
on-device-trainable bundle the zoo exports (needs TensorFlow and Keras 3).

Every supported layer is re-written with the zoo's builtin-op building blocks (see
:mod:`fedmq.models.zoo`), so the ``train`` step converts to TFLite *builtins* only:

- Dense: one :func:`~fedmq.models.zoo.matmul` (rank-3 BATCH_MATMUL, forward and gradients);
- Conv1D / Conv2D (any kernel size and strides; dilation 1, groups 1; padding 'valid',
  'same', and 'causal' for Conv1D): im2col from ``tf.slice`` views concatenated on
  channels (every stride-th patch kept, by reshape and slice), then one matmul with the
  kernel (Keras HWIO layout, so its weights are used as they are); DepthwiseConv1D/2D the
  same patches times the kernel summed over the window (MUL + SUM), SeparableConv1D/2D
  that followed by the pointwise matmul;
- Max/AveragePooling1D/2D (strides = pool size; 'valid', or 'same' when the size divides):
  reshape to rank 3 and ``reduce_max`` / ``reduce_mean`` (whose gradients are builtins; a
  max tie shares the gradient where Keras gives it to one element);
  GlobalAverage/GlobalMaxPooling1D/2D: ``reduce_mean`` / ``reduce_max``;
- Flatten / Reshape: reshape; Dropout, SpatialDropout1D/2D: identity in ``train`` and
  ``infer`` (no random ops on the device; the update is deterministic);
- BatchNormalization (last axis): the frozen moving statistics as an affine layer,
  ``x * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))`` in ``train`` and
  ``infer`` (Keras's inference mode; the fine-tuning idiom). gamma and beta train when the
  layer is selected; the moving statistics are always constants and never travel;
- LSTM (tanh / sigmoid, gates i,f,c,o) and GRU (``reset_after=True``, gates z,r,h) unrolled
  by hand, ``return_sequences`` either way; recurrent dropout is off like Dropout;
- Embedding: GATHER; its gradient's sparse rows are summed into a dense table gradient with
  UNSORTED_SEGMENT_SUM (both builtins; a one-hot matmul also converts but costs a
  ``[tokens, vocab]`` matrix). The bundle's input is float32: ids are cast to int32 (exact
  up to 2**24); an id outside ``[0, input_dim)`` makes LiteRT's GATHER fail, as Keras does;
  ``mask_zero`` is not supported;
- Concatenate, Add, Subtract, Multiply, Average (functional models);
- activations relu (``maximum(x, 0)``), sigmoid, tanh, linear; a softmax on the model's
  output layer is folded into the loss: ``infer`` returns the logits before it.

Weights are named ``<layer name>_<variable name>`` (lowercase, ``[a-z0-9_]``), e.g.
``dense_1_kernel``. The trained ("federated") weights are the trainable weights of the
selected layers (default: every layer Keras marks trainable; ``trainable_from`` or
``train_layers`` select by layer name); everything else, and every non-trainable Keras
weight, is a constant inside the ``.tflite``. ``initial.npz`` holds the Keras model's own
values of the federated weights.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmq.errors import ModelError
from fedmq.models.spec import ModelBundle, ModelSpec, TensorSpec, save_bundle

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "ALTERNATIVES",
    "SUPPORTED_LAYERS",
    "KerasImport",
    "UnsupportedLayerError",
    "check_keras_model",
    "export_keras",
    "import_keras_model",
    "keras_tensor_name",
    "load_keras_model",
]

log = logging.getLogger(__name__)

SUPPORTED_LAYERS: tuple[str, ...] = (
    "InputLayer",
    "Dense",
    "Conv1D",
    "Conv2D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
    "MaxPooling1D",
    "MaxPooling2D",
    "AveragePooling1D",
    "AveragePooling2D",
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "Flatten",
    "Reshape",
    "Dropout",
    "SpatialDropout1D",
    "SpatialDropout2D",
    "BatchNormalization",
    "LSTM",
    "GRU",
    "Embedding",
    "Activation",
    "ReLU",
    "Softmax",
    "Concatenate",
    "Add",
    "Subtract",
    "Multiply",
    "Average",
)

# What to use instead of a layer class that is not supported.
ALTERNATIVES: dict[str, str] = {
    "Conv3D": "Conv2D",
    "Conv1DTranspose": "Conv1D",
    "Conv2DTranspose": "Conv2D",
    "SimpleRNN": "GRU or LSTM",
    "Bidirectional": "a single LSTM/GRU",
    "TimeDistributed": "Dense (it applies to the last axis of a sequence)",
    "LayerNormalization": "BatchNormalization (frozen statistics)",
    "GroupNormalization": "BatchNormalization (frozen statistics)",
    "UnitNormalization": "BatchNormalization (frozen statistics)",
    "LeakyReLU": "ReLU or Activation('relu')",
    "PReLU": "ReLU or Activation('relu')",
    "ELU": "ReLU or Activation('relu')",
    "GaussianNoise": "Dropout, or augment the data before training",
    "GaussianDropout": "Dropout",
    "AlphaDropout": "Dropout",
    "Rescaling": "scaling the data before it reaches the model",
    "Normalization": "normalising the data before it reaches the model",
    "ZeroPadding1D": "Conv1D with padding='same'",
    "ZeroPadding2D": "Conv2D with padding='same'",
    "Cropping1D": "Reshape, or crop the data before the model",
    "Cropping2D": "Reshape, or crop the data before the model",
    "UpSampling1D": "Reshape",
    "UpSampling2D": "Reshape",
    "Permute": "Reshape",
    "RepeatVector": "Reshape",
    "Lambda": "built-in layers (a Lambda's code cannot be converted)",
    "Attention": "Dense layers and pooling",
    "MultiHeadAttention": "Dense layers and pooling",
    "Sequential": "the nested model's layers, flattened into one model",
    "Functional": "the nested model's layers, flattened into one model",
}

_ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh", "softmax")
_MERGES = ("Concatenate", "Add", "Subtract", "Multiply", "Average")
_CONVS = (
    "Conv1D",
    "Conv2D",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
)
_ACT_LAYERS = ("Dense", *_CONVS, "Activation")
_IDENTITY = ("InputLayer", "Dropout", "SpatialDropout1D", "SpatialDropout2D")
_TENSOR_CHARS = re.compile(r"[^a-z0-9_]+")


class UnsupportedLayerError(ModelError):
    """The model has a layer (or a layer option) the importer cannot convert."""


@dataclass(frozen=True)
class KerasImport:
    """A model read for export: its spec and every weight value (federated or constant).

    ``layer_tensors`` maps each layer name to ``{variable name: tensor name}``.
    """

    model: Any
    spec: ModelSpec
    values: dict[str, np.ndarray]
    layer_tensors: dict[str, dict[str, str]]
    softmax_folded: bool

    def __post_init__(self) -> None:
        missing = [n for n in self.spec.weight_names if n not in self.values]
        if missing:
            raise ModelError(f"no values for weights {missing}")

    @property
    def constants(self) -> tuple[str, ...]:
        """Tensor names baked into the graph as constants."""
        trained = set(self.spec.weight_names)
        return tuple(n for n in self.values if n not in trained)


# -- loading and checking ---------------------------------------------------------------------
def load_keras_model(path: str | os.PathLike[str]) -> Any:
    """``keras.saving.load_model(path, compile=False)``; any failure is a ModelError."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Keras model file {p} does not exist")
    import keras

    try:
        return keras.saving.load_model(p, compile=False)
    except Exception as exc:  # keras raises ValueError, TypeError, OSError ... for bad files
        detail = " ".join(str(exc).split())[:500]
        if "Lambda" in detail:
            detail += " (fedmq never loads unsafely: replace the Lambda with built-in layers)"
        raise ModelError(f"cannot load Keras model {p}: {detail}") from None


def _class_name(layer: Any) -> str:
    """The Keras class name, or ``module.Class`` for a class defined outside Keras."""
    cls = type(layer)
    if cls.__module__.startswith("keras."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__name__}"


def _activation_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", repr(fn)))


def _layer_activation(layer: Any) -> str:
    """The activation a layer's output ends in (``linear`` for none)."""
    kind = type(layer).__name__
    if kind in _ACT_LAYERS:
        return _activation_name(layer.activation)
    return {"Softmax": "softmax", "ReLU": "relu", "LSTM": "tanh", "GRU": "tanh"}.get(kind, "linear")


def _layers(model: Any) -> list[Any]:
    """Every operation of the model in graph order (keras.ops calls of a functional model
    included, so that the check sees them), without the InputLayer."""
    ops = getattr(model, "operations", None) or model.layers
    return [op for op in ops if type(op).__name__ != "InputLayer"]


def _output_layer(model: Any) -> Any:
    history = getattr(model.outputs[0], "_keras_history", None)
    if history is not None:
        return history.operation
    return _layers(model)[-1]


def _why_not(layer: Any, *, is_output: bool) -> str | None:
    """Why ``layer`` cannot be converted (None if it can)."""
    kind = _class_name(layer)
    cfg = layer.get_config()
    if kind in _ACT_LAYERS:
        name = _activation_name(layer.activation)
        if name not in _ACTIVATIONS:
            return f"activation {name!r} (supported: {', '.join(_ACTIVATIONS)})"
        if name == "softmax" and not is_output:
            return "softmax before the output layer (only a final softmax is supported)"
    if kind == "Softmax" and not is_output:
        return "softmax before the output layer (only a final softmax is supported)"
    if cfg.get("data_format", "channels_last") != "channels_last":
        return "data_format channels_first (use channels_last)"
    if kind in _CONVS:
        if any(d != 1 for d in cfg["dilation_rate"]):
            return f"dilation_rate {tuple(cfg['dilation_rate'])} (use 1)"
        if cfg.get("groups", 1) != 1:
            return f"groups {cfg['groups']} (use 1)"
        if cfg["padding"] not in ("valid", "same", "causal"):
            return f"padding {cfg['padding']!r}"
    if kind.endswith(("Pooling1D", "Pooling2D")) and not kind.startswith("Global"):
        pool, strides = tuple(cfg["pool_size"]), tuple(cfg["strides"] or cfg["pool_size"])
        if pool != strides:
            return f"pool_size {pool} with strides {strides} (use strides = pool_size)"
        if cfg["padding"] == "same":
            spatial = tuple(layer.input.shape[1:-1])
            if any(d is None or d % p for d, p in zip(spatial, pool, strict=True)):
                return f"padding 'same' on size {spatial} not divisible by {pool} (use 'valid')"
    if kind == "BatchNormalization":
        rank = len(layer.input.shape)
        if cfg["axis"] not in (-1, rank - 1) and cfg["axis"] != [rank - 1]:
            return f"axis {cfg['axis']} (only the last axis is supported)"
    if kind in ("LSTM", "GRU"):
        if _activation_name(layer.cell.recurrent_activation) != "sigmoid":
            return "recurrent_activation other than sigmoid"
        if _activation_name(layer.cell.activation) != "tanh":
            return "activation other than tanh"
        for flag in ("go_backwards", "stateful", "return_state"):
            if cfg.get(flag):
                return f"{flag}=True"
        if kind == "GRU" and not cfg.get("reset_after", True):
            return "reset_after=False (use the default reset_after=True)"
    if kind == "Embedding" and cfg.get("mask_zero"):
        return "mask_zero=True (pad with an id the model learns to ignore)"
    if kind == "ReLU" and (
        cfg.get("max_value") is not None
        or cfg.get("negative_slope", 0.0)
        or cfg.get("threshold", 0.0)
    ):
        return "max_value/negative_slope/threshold (use a plain ReLU)"
    if kind == "Concatenate" and cfg["axis"] not in (-1, len(layer.output.shape) - 1):
        return f"axis {cfg['axis']} (concatenate on the last axis)"
    return None


def check_keras_model(model: Any) -> None:
    """Raise :class:`UnsupportedLayerError` naming the first layer that cannot be converted
    (its class, its name and what to use instead); also checks the model's signature."""
    import keras

    if not isinstance(model, keras.Model):
        raise ModelError(f"expected a keras.Model, got {type(model).__name__}")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ModelError(f"model {model.name!r} is not built: start it with keras.Input(shape)")
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(
            f"model {model.name!r} has {len(inputs)} inputs and "
            f"{len(outputs)} outputs; exactly one of each is supported"
        )
    out_layer = _output_layer(model)
    for layer in _layers(model):
        kind = _class_name(layer)
        if not isinstance(layer, keras.layers.Layer):
            raise UnsupportedLayerError(
                f"operation {layer.name!r} (keras.ops {type(layer).__name__}) is not supported "
                "for on-device training; use the layer form instead (keras.layers.Add, "
                "Concatenate, Multiply, Reshape, Activation ...)"
            )
        if kind not in SUPPORTED_LAYERS:
            base = kind.rsplit(".", 1)[-1]
            if isinstance(layer, keras.Model):
                base = "Sequential" if isinstance(layer, keras.Sequential) else "Functional"
            instead = ALTERNATIVES.get(base)
            hint = (
                f"use {instead} instead"
                if instead
                else f"supported layers: {', '.join(SUPPORTED_LAYERS[1:])}"
            )
            raise UnsupportedLayerError(
                f"layer {layer.name!r} ({kind}) is not supported for on-device training; {hint}"
            )
        reason = _why_not(layer, is_output=layer is out_layer)
        if reason is not None:
            raise UnsupportedLayerError(f"layer {layer.name!r} ({kind}) has unsupported {reason}")
    in_shape = tuple(model.inputs[0].shape[1:])
    if not in_shape or any(d is None for d in in_shape):
        raise ModelError(f"model input shape {in_shape} must be fully defined (no None)")
    out_shape = tuple(model.outputs[0].shape[1:])
    if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < 2:
        raise ModelError(
            f"model output must be [batch, classes] with classes >= 2, got {out_shape}"
        )
    out_act = _layer_activation(out_layer)
    if out_act not in ("linear", "softmax"):
        raise UnsupportedLayerError(
            f"output layer {out_layer.name!r} ({_class_name(out_layer)}) ends in {out_act}; "
            "the output must be logits (linear) or a softmax"
        )


# -- weights and their selection --------------------------------------------------------------
def keras_tensor_name(layer_name: str, var_name: str) -> str:
    """``<layer>_<variable>`` as a bundle tensor name (``[a-z][a-z0-9_]{0,63}``)."""
    name = _TENSOR_CHARS.sub("_", f"{layer_name}_{var_name}".lower()).strip("_")
    if not name or not name[0].isalpha():
        name = f"l_{name}"
    return name[:64]


def _var_leaf(var: Any) -> str:
    return str(var.path).rsplit("/", 1)[-1]


def _selected_layers(
    layers: list[Any], trainable_from: str | None, train_layers: Sequence[str] | None
) -> set[str]:
    names = [layer.name for layer in layers]
    with_weights = {layer.name for layer in layers if layer.trainable_weights}
    if trainable_from is not None and train_layers is not None:
        raise ModelError("give trainable_from or train_layers, not both")
    if trainable_from is not None:
        if trainable_from not in names:
            raise ModelError(f"no layer {trainable_from!r}; layers: {', '.join(names)}")
        chosen = set(names[names.index(trainable_from) :]) & with_weights
    elif train_layers is not None:
        unknown = [n for n in train_layers if n not in names]
        if unknown:
            raise ModelError(f"no layers {unknown}; layers: {', '.join(names)}")
        empty = [n for n in train_layers if n not in with_weights]
        if empty:
            raise ModelError(f"layers {empty} have no trainable weights")
        chosen = set(train_layers)
    else:
        chosen = with_weights
    if not chosen:
        raise ModelError("no layer with trainable weights is selected")
    return chosen


def import_keras_model(
    model: Any,
    *,
    name: str | None = None,
    trainable_from: str | None = None,
    train_layers: Sequence[str] | None = None,
    train_batch: int = 32,
    infer_batch: int = 128,
) -> KerasImport:
    """Check ``model`` (:func:`check_keras_model`), name its weights and pick the federated
    ones. No TensorFlow graph is built yet."""
    check_keras_model(model)
    layers = _layers(model)
    chosen = _selected_layers(layers, trainable_from, train_layers)
    values: dict[str, np.ndarray] = {}
    layer_tensors: dict[str, dict[str, str]] = {}
    weights: list[TensorSpec] = []
    for layer in layers:
        trainable_ids = {id(v) for v in layer.trainable_weights}
        mapping: dict[str, str] = {}
        for var in layer.weights:
            tname = keras_tensor_name(layer.name, _var_leaf(var))
            if tname in values:
                raise ModelError(f"two weights are both named {tname!r}; rename a layer")
            value = np.asarray(var.numpy())
            if value.dtype != np.float32:
                raise ModelError(f"weight {var.path} is {value.dtype}; only float32 works")
            values[tname] = np.ascontiguousarray(value)
            mapping[_var_leaf(var)] = tname
            if layer.name in chosen and id(var) in trainable_ids:
                weights.append(TensorSpec(tname, tuple(int(d) for d in value.shape)))
        layer_tensors[layer.name] = mapping
    out_layer = _output_layer(model)
    folded = _layer_activation(out_layer) == "softmax"
    frozen_layers = [layer.name for layer in layers if layer.weights and layer.name not in chosen]
    spec = ModelSpec(
        name=name or model.name,
        kind="keras",
        input_shape=tuple(int(d) for d in model.inputs[0].shape[1:]),
        input_dtype="float32",
        num_classes=int(model.outputs[0].shape[-1]),
        train_batch=train_batch,
        infer_batch=infer_batch,
        weights=tuple(weights),
        trainable=tuple(w.name for w in weights),
        extra={
            "source": "keras",
            "keras_class": type(model).__name__,
            "layers": [f"{layer.name}:{_class_name(layer)}" for layer in layers],
            "frozen_layers": frozen_layers,
            "softmax_folded": folded,
            "batchnorm": "frozen moving statistics",
            "dropout": "identity",
        },
    )
    return KerasImport(
        model=model, spec=spec, values=values, layer_tensors=layer_tensors, softmax_folded=folded
    )


# -- the TensorFlow forward pass ----------------------------------------------------------------
def _act(tf_: Any, name: str, x: tf.Tensor, *, fold_softmax: bool) -> tf.Tensor:
    if name == "relu":
        return tf_.maximum(x, 0.0)
    if name == "sigmoid":
        return tf_.sigmoid(x)
    if name == "tanh":
        return tf_.tanh(x)
    if name == "softmax" and not fold_softmax:
        return tf_.nn.softmax(x)
    return x


def _dense_last_axis(tf_: Any, x: tf.Tensor, kernel: tf.Tensor) -> tf.Tensor:
    from fedmq.models.zoo import matmul

    shape = [int(d) for d in x.shape]
    k, n = (int(d) for d in kernel.shape)
    rows = math.prod(shape[:-1])
    y = matmul(tf_, tf_.reshape(x, [rows, k]), kernel)
    return tf_.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y


def _conv_pads(size: int, k: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(before, after, outputs) of one spatial axis, as TensorFlow pads; ``after`` also
    holds the extra zeros that make the stride-1 patch count a multiple of ``stride``."""
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        before, after = total // 2, total - total // 2
    elif padding == "causal":
        before, after = k - 1, 0
    else:
        before = after = 0
    out = (size + before + after - k) // stride + 1
    after += max(0, out * stride - (size + before + after - k + 1))
    return before, after, out


def _subsample(tf_: Any, t: tf.Tensor, strides: list[int], outs: list[int]) -> tf.Tensor:
    """Every ``stride``-th position of each spatial axis (from 0), with rank-3 reshapes and
    ``tf.slice`` (whose gradient is PAD; a strided slice's would be Flex)."""
    shape = [int(d) for d in t.shape]
    b, c = shape[0], shape[-1]
    crop = [o * s for o, s in zip(outs, strides, strict=True)]
    if crop != shape[1:-1]:
        t = tf_.slice(t, [0] * len(shape), [b, *crop, c])
    rows = b
    for axis, (o, s) in enumerate(zip(outs, strides, strict=True)):
        inner = math.prod(crop[axis + 1 :]) * c
        if s > 1:
            t = tf_.slice(tf_.reshape(t, [rows * o, s, inner]), [0, 0, 0], [rows * o, 1, inner])
        rows *= o
        crop[axis] = o
    return tf_.reshape(t, [b, *outs, c])


def _patches(tf_: Any, layer: Any, x: tf.Tensor, ksize: list[int]) -> tf.Tensor:
    """im2col patches ``[B, *out, K*C]`` (offset-major, channel-minor: the row order of a
    Keras kernel reshaped to ``[K*C, ...]``), every stride-th one for strides > 1."""
    cfg = layer.get_config()
    strides = [int(s) for s in cfg["strides"]]
    cin = int(x.shape[-1])
    plan = [
        _conv_pads(int(size), k, s, cfg["padding"])
        for size, k, s in zip(x.shape[1:-1], ksize, strides, strict=True)
    ]
    if any(before or after for before, after, _ in plan):
        x = tf_.pad(x, [[0, 0], *[[before, after] for before, after, _ in plan], [0, 0]])
    b = int(x.shape[0])
    spatial = [int(d) for d in x.shape[1:-1]]
    full = [n - k + 1 for n, k in zip(spatial, ksize, strict=True)]
    offsets: list[tuple[int, ...]] = [()]
    for k in ksize:
        offsets = [(*o, d) for o in offsets for d in range(k)]
    views = [tf_.slice(x, [0, *o, 0], [b, *full, cin]) for o in offsets]
    patches = views[0] if len(views) == 1 else tf_.concat(views, axis=len(ksize) + 1)
    if any(s > 1 for s in strides):
        patches = _subsample(tf_, patches, strides, [out for _, _, out in plan])
    return patches


def _conv(tf_: Any, layer: Any, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """im2col convolution: the patches times the kernel, one matmul."""
    kernel = p["kernel"]
    ksize = [int(d) for d in kernel.shape[:-2]]
    cin, cout = int(kernel.shape[-2]), int(kernel.shape[-1])
    patches = _patches(tf_, layer, x, ksize)
    y = _dense_last_axis(tf_, patches, tf_.reshape(kernel, [math.prod(ksize) * cin, cout]))
    return y + p["bias"] if "bias" in p else y


def _depthwise(tf_: Any, layer: Any, kernel: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """Depthwise convolution: per channel, the patches times the kernel summed over the
    window (MUL + SUM); output channel ``c * multiplier + m`` like TensorFlow's."""
    ksize = [int(d) for d in kernel.shape[:-2]]
    cin, mult = int(kernel.shape[-2]), int(kernel.shape[-1])
    patches = _patches(tf_, layer, x, ksize)
    lead = [int(d) for d in patches.shape[:-1]]
    window = math.prod(ksize)
    p4 = tf_.reshape(patches, [math.prod(lead), window, cin, 1])
    y = tf_.reduce_sum(p4 * tf_.reshape(kernel, [1, window, cin, mult]), axis=1)
    return tf_.reshape(y, [*lead, cin * mult])


def _pool(tf_: Any, layer: Any, x: tf.Tensor, reduce: Callable[..., tf.Tensor]) -> tf.Tensor:
    """Non-overlapping pooling as rank-3 reshapes and reductions (builtin gradients)."""
    pool = [int(d) for d in layer.get_config()["pool_size"]]
    shape = [int(d) for d in x.shape]
    b, c = shape[0], shape[-1]
    outs = [s // k for s, k in zip(shape[1:-1], pool, strict=True)]
    crop = [o * k for o, k in zip(outs, pool, strict=True)]
    if crop != shape[1:-1]:
        x = tf_.slice(x, [0] * len(shape), [b, *crop, c])
    if len(pool) == 1:
        y = reduce(tf_.reshape(x, [b * outs[0], pool[0], c]), axis=1)
        return tf_.reshape(y, [b, outs[0], c])
    (ho, wo), (ph, pw) = outs, pool
    y = reduce(tf_.reshape(x, [b * ho, ph, wo * pw * c]), axis=1)
    y = reduce(tf_.reshape(y, [b * ho * wo, pw, c]), axis=1)
    return tf_.reshape(y, [b, ho, wo, c])


def _global_pool(tf_: Any, x: tf.Tensor, reduce: Callable[..., tf.Tensor], keep: bool) -> tf.Tensor:
    shape = [int(d) for d in x.shape]
    y = reduce(tf_.reshape(x, [shape[0], math.prod(shape[1:-1]), shape[-1]]), axis=1)
    return tf_.reshape(y, [shape[0], *([1] * (len(shape) - 2)), shape[-1]]) if keep else y


def _batchnorm(tf_: Any, layer: Any, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    inv = tf_.math.rsqrt(p["moving_variance"] + float(layer.epsilon))
    if "gamma" in p:
        inv = inv * p["gamma"]
    shift = -p["moving_mean"] * inv
    if "beta" in p:
        shift = shift + p["beta"]
    return x * inv + shift


def _project(tf_: Any, x: tf.Tensor, kernel: tf.Tensor, bias: tf.Tensor | None) -> tf.Tensor:
    """``x @ kernel (+ bias)`` for every step of ``[B, T, F]`` at once: ``[B, T, G]``."""
    y = _dense_last_axis(tf_, x, kernel)
    return y if bias is None else y + bias


def _lstm(tf_: Any, layer: Any, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    from fedmq.models.zoo import matmul

    proj = _project(tf_, x, p["kernel"], p.get("bias"))
    h = c = None
    states = []
    for z_x in tf_.unstack(proj, axis=1):
        z = z_x if h is None else z_x + matmul(tf_, h, p["recurrent_kernel"])
        i, f, g, o = tf_.split(z, 4, axis=1)
        i, f, g, o = tf_.sigmoid(i), tf_.sigmoid(f), tf_.tanh(g), tf_.sigmoid(o)
        c = i * g if c is None else f * c + i * g
        h = o * tf_.tanh(c)
        states.append(h)
    return tf_.stack(states, axis=1) if layer.return_sequences else h


def _gru(tf_: Any, layer: Any, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    from fedmq.models.zoo import matmul

    b = int(x.shape[0])
    units = int(p["recurrent_kernel"].shape[0])
    if "bias" in p:
        in_bias, rec_bias = tf_.unstack(p["bias"], axis=0)
    else:
        in_bias = rec_bias = tf_.zeros([3 * units], tf_.float32)
    proj = _project(tf_, x, p["kernel"], in_bias)
    h = None
    states = []
    for x_t in tf_.unstack(proj, axis=1):
        xz, xr, xh = tf_.split(x_t, 3, axis=1)
        if h is None:
            rec = tf_.broadcast_to(rec_bias, [b, 3 * units])
        else:
            rec = matmul(tf_, h, p["recurrent_kernel"]) + rec_bias
        hz, hr, hh = tf_.split(rec, 3, axis=1)
        z = tf_.sigmoid(xz + hz)
        r = tf_.sigmoid(xr + hr)
        cand = tf_.tanh(xh + r * hh)
        h = (1.0 - z) * cand if h is None else z * h + (1.0 - z) * cand
        states.append(h)
    return tf_.stack(states, axis=1) if layer.return_sequences else h


def _embedding(tf_: Any, p: Mapping[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
    """GATHER rows of the table; the gradient (sparse rows) is made dense with
    UNSORTED_SEGMENT_SUM, a builtin: no one-hot ``[tokens, vocab]`` matrix."""
    return tf_.gather(p["embeddings"], tf_.cast(x, tf_.int32))


def _apply(
    tf_: Any, layer: Any, p: Mapping[str, tf.Tensor], args: list[Any], *, is_output: bool
) -> tf.Tensor:
    """One layer's output in builtin-friendly TensorFlow ops."""
    kind = type(layer).__name__
    if kind in _MERGES:
        xs = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else args
        if kind == "Concatenate":
            return tf_.concat(xs, axis=len(xs[0].shape) - 1)
        if kind == "Subtract":
            return xs[0] - xs[1]
        out = xs[0]
        for t in xs[1:]:
            out = out * t if kind == "Multiply" else out + t
        return out / float(len(xs)) if kind == "Average" else out
    x = args[0]
    b = int(x.shape[0])
    if kind in _IDENTITY:
        y = x
    elif kind == "Dense":
        y = _dense_last_axis(tf_, x, p["kernel"])
        y = y + p["bias"] if "bias" in p else y
    elif kind in ("Conv1D", "Conv2D"):
        y = _conv(tf_, layer, p, x)
    elif kind in ("DepthwiseConv1D", "DepthwiseConv2D"):
        y = _depthwise(tf_, layer, p["kernel"], x)
        y = y + p["bias"] if "bias" in p else y
    elif kind in ("SeparableConv1D", "SeparableConv2D"):
        y = _depthwise(tf_, layer, p["depthwise_kernel"], x)
        pointwise = p["pointwise_kernel"]
        y = _dense_last_axis(tf_, y, tf_.reshape(pointwise, [int(d) for d in pointwise.shape[-2:]]))
        y = y + p["bias"] if "bias" in p else y
    elif kind in ("MaxPooling1D", "MaxPooling2D"):
        y = _pool(tf_, layer, x, tf_.reduce_max)
    elif kind in ("AveragePooling1D", "AveragePooling2D"):
        y = _pool(tf_, layer, x, tf_.reduce_mean)
    elif kind.startswith("Global"):
        reduce = tf_.reduce_max if "Max" in kind else tf_.reduce_mean
        y = _global_pool(tf_, x, reduce, bool(layer.get_config().get("keepdims")))
    elif kind == "Flatten":
        y = tf_.reshape(x, [b, -1])
    elif kind == "Reshape":
        y = tf_.reshape(x, [b, *layer.target_shape])
    elif kind == "BatchNormalization":
        y = _batchnorm(tf_, layer, p, x)
    elif kind == "LSTM":
        y = _lstm(tf_, layer, p, x)
    elif kind == "GRU":
        y = _gru(tf_, layer, p, x)
    elif kind == "Embedding":
        y = _embedding(tf_, p, x)
    elif kind == "ReLU":
        y = tf_.maximum(x, 0.0)
    elif kind == "Softmax":
        y = x if is_output else tf_.nn.softmax(x)
    elif kind == "Activation":
        y = x
    else:  # check_keras_model lets nothing else through
        raise UnsupportedLayerError(f"layer {layer.name!r} ({kind}) is not supported")
    if kind in _ACT_LAYERS:
        y = _act(tf_, _activation_name(layer.activation), y, fold_softmax=is_output)
    return y


def forward(plan: KerasImport, params: Mapping[str, Any], x: Any) -> tf.Tensor:
    """Logits for a batch ``x`` of static shape ``[B, *input_shape]``; ``params`` maps every
    tensor name (federated and constant) to a tensor."""
    import keras
    import tensorflow as tf_

    model = plan.model
    out_layer = _output_layer(model)

    def layer_params(layer: Any) -> dict[str, Any]:
        return {leaf: params[t] for leaf, t in plan.layer_tensors.get(layer.name, {}).items()}

    def run(layer: Any) -> Callable[..., tf.Tensor]:
        def call(*args: Any, **_kwargs: Any) -> tf.Tensor:
            return _apply(tf_, layer, layer_params(layer), list(args), is_output=layer is out_layer)

        return call

    if isinstance(model, keras.Sequential):
        y = x
        for layer in _layers(model):
            y = run(layer)(y)
        return y
    outputs = model._run_through_graph([x], operation_fn=run)
    return outputs[0] if isinstance(outputs, list | tuple) else outputs


# -- the trainable module and the export ------------------------------------------------------
def build_keras_module(plan: KerasImport) -> Any:
    """A ``tf.Module`` with the zoo's four signatures: ``train``, ``infer``, ``get_weights``,
    ``set_weights``; federated weights are variables, every other weight a constant."""
    import tensorflow as tf_

    from fedmq.models.variants import add_variant_signatures
    from fedmq.models.zoo import weighted_cross_entropy

    spec = plan.spec
    f32 = tf_.float32

    class KerasTrainableModel(tf_.Module):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            super().__init__(name=spec.name.replace("-", "_").replace(".", "_"))
            self.variables_by_name = {
                n: tf_.Variable(plan.values[n], name=n, trainable=True) for n in spec.weight_names
            }
            self.constant_values = {n: plan.values[n] for n in plan.constants}
            x_spec = tf_.TensorSpec([spec.train_batch, *spec.input_shape], f32, name="x")
            self.train = tf_.function(
                self._train,
                input_signature=[
                    x_spec,
                    tf_.TensorSpec([spec.train_batch], tf_.int32, name="y"),
                    tf_.TensorSpec([spec.train_batch], f32, name="w"),
                    tf_.TensorSpec([], f32, name="lr"),
                ],
            )
            self.infer = tf_.function(
                self._infer,
                input_signature=[
                    tf_.TensorSpec([spec.infer_batch, *spec.input_shape], f32, name="x")
                ],
            )
            self.get_weights = tf_.function(self._get_weights, input_signature=[])
            self.set_weights = tf_.function(
                self._set_weights,
                input_signature=[tf_.TensorSpec(t.shape, f32, name=t.name) for t in spec.weights],
            )
            add_variant_signatures(
                self,
                spec,
                lambda p, x, y, w: weighted_cross_entropy(
                    forward(plan, p, x), y, w, spec.num_classes
                ),
            )

        def params(self) -> dict[str, tf.Tensor]:
            out = {n: tf_.constant(v) for n, v in self.constant_values.items()}
            out.update({n: tf_.convert_to_tensor(v) for n, v in self.variables_by_name.items()})
            return out

        def _train(self, x: tf.Tensor, y: tf.Tensor, w: tf.Tensor, lr: tf.Tensor) -> Any:
            train_vars = [self.variables_by_name[n] for n in spec.trainable]
            with tf_.GradientTape() as tape:
                logits = forward(plan, self.params(), x)
                loss = weighted_cross_entropy(logits, y, w, spec.num_classes)
            grads = tape.gradient(loss, train_vars)
            for var, grad in zip(train_vars, grads, strict=True):
                # an Embedding's gradient is IndexedSlices: densify (UNSORTED_SEGMENT_SUM)
                var.assign_sub(lr * tf_.convert_to_tensor(grad))
            return {"loss": loss}

        def _infer(self, x: tf.Tensor) -> Any:
            return {"logits": forward(plan, self.params(), x)}

        def _get_weights(self) -> Any:
            return {n: tf_.identity(v) for n, v in self.variables_by_name.items()}

        def _set_weights(self, *values: tf.Tensor) -> Any:
            for n, value in zip(spec.weight_names, values, strict=True):
                self.variables_by_name[n].assign(value)
            return {"ok": tf_.constant(1, dtype=tf_.int32)}

    return KerasTrainableModel()


def export_keras(
    model: Any,
    out_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    trainable_from: str | None = None,
    train_layers: Sequence[str] | None = None,
    train_batch: int = 32,
    infer_batch: int = 128,
    saved_model_dir: str | os.PathLike[str] | None = None,
) -> ModelBundle:
    """Export a Keras model (or a ``.keras`` file path) as a builtin-ops-only bundle.

    The model is checked layer by layer before any conversion work; ``initial.npz`` holds
    the model's own values of the federated weights.
    """
    from fedmq.models.export import check_tflite_ops, convert_module

    if isinstance(model, str | os.PathLike):
        model = load_keras_model(model)
    plan = import_keras_model(
        model,
        name=name,
        trainable_from=trainable_from,
        train_layers=train_layers,
        train_batch=train_batch,
        infer_batch=infer_batch,
    )
    import tensorflow as tf_

    tflite = convert_module(build_keras_module(plan), saved_model_dir=saved_model_dir)
    ops = check_tflite_ops(tflite, plan.spec)
    spec = ModelSpec.from_json(
        {
            **plan.spec.to_json(),
            "extra": {
                **plan.spec.extra,
                "exported_with": f"tensorflow {tf_.__version__}",
                "ops": ops,
            },
        }
    )
    bundle = save_bundle(
        Path(out_dir), spec, tflite, {n: plan.values[n] for n in spec.weight_names}
    )
    log.info(
        "exported Keras model %s (%d layers, %d federated params, %d constant) to %s: "
        "%d bytes, builtin ops only",
        spec.name,
        len(spec.extra["layers"]),
        spec.num_trainable_params,
        sum(plan.values[n].size for n in plan.constants),
        out_dir,
        len(tflite),
    )
    return bundle
