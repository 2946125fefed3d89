"""Optional training signatures of an exported model: FedProx and FedSGD (needs TensorFlow).

Added next to the four base signatures (``train``, ``infer``, ``get_weights``,
``set_weights``), which stay as they were, so a bundle exported before these existed still
loads; the agent checks which of these a bundle has (:data:`VARIANT_SIGNATURES`):

- ``set_global(**{name: tensor}) -> {ok}``: the round's global weights (the trainable
  tensors), held in a second set of variables;
- ``train_prox(x, y, w, lr, mu) -> {loss}``: one SGD step on
  ``loss + (mu / 2) * sum ||v - v_global||^2`` over the trainable variables; ``loss`` is the
  data loss before the step (the same number ``train`` returns), the proximal term is not
  added to it; with ``mu = 0`` the step is ``train``'s, bit for bit;
- ``gradient(x, y, w) -> {loss, name: gradient}``: the gradient of the weighted mean loss
  at the current weights, one tensor per trainable variable; the variables are unchanged;
- ``set_mask`` / ``train_masked``: pruning (:mod:`fedmq.models.masking`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.models.masking import MASK_SIGNATURES, add_mask_signatures
from fedmq.models.spec import ModelSpec

__all__ = ["VARIANT_SIGNATURES", "add_variant_signatures"]

VARIANT_SIGNATURES = ("set_global", "train_prox", "gradient", *MASK_SIGNATURES)

LossOf = Callable[[Mapping[str, Any], Any, Any, Any], Any]


def add_variant_signatures(module: Any, spec: ModelSpec, loss_of: LossOf) -> None:
    """Give ``module`` (with ``variables_by_name`` and ``params()``) the optional signatures.

    ``loss_of(params, x, y, w)`` is the model's weighted loss, the one its ``train`` uses.
    """
    import tensorflow as tf_

    f32 = tf_.float32
    names = list(spec.trainable)
    shapes = {t.name: t.shape for t in spec.weights}
    module.global_by_name = {
        n: tf_.Variable(np.zeros(shapes[n], np.float32), name=f"global_{n}", trainable=False)
        for n in names
    }
    x_spec = tf_.TensorSpec([spec.train_batch, *spec.input_shape], f32, name="x")
    y_spec = tf_.TensorSpec([spec.train_batch], tf_.int32, name="y")
    w_spec = tf_.TensorSpec([spec.train_batch], f32, name="w")

    def grads_of(x: Any, y: Any, w: Any) -> tuple[Any, list[Any]]:
        train_vars = [module.variables_by_name[n] for n in names]
        with tf_.GradientTape() as tape:
            loss = loss_of(module.params(), x, y, w)
        # an Embedding's gradient is IndexedSlices: densify (UNSORTED_SEGMENT_SUM)
        grads = [tf_.convert_to_tensor(g) for g in tape.gradient(loss, train_vars)]
        return loss, grads

    def train_prox(x: Any, y: Any, w: Any, lr: Any, mu: Any) -> Any:
        loss, grads = grads_of(x, y, w)
        for n, grad in zip(names, grads, strict=True):
            var = module.variables_by_name[n]
            var.assign_sub(lr * (grad + mu * (var - module.global_by_name[n])))
        return {"loss": loss}

    def gradient(x: Any, y: Any, w: Any) -> Any:
        loss, grads = grads_of(x, y, w)
        return {"loss": loss, **dict(zip(names, grads, strict=True))}

    def set_global(*values: Any) -> Any:
        for n, value in zip(names, values, strict=True):
            module.global_by_name[n].assign(value)
        return {"ok": tf_.constant(1, dtype=tf_.int32)}

    module.train_prox = tf_.function(
        train_prox, input_signature=[x_spec, y_spec, w_spec,
                                     tf_.TensorSpec([], f32, name="lr"),
                                     tf_.TensorSpec([], f32, name="mu")]
    )
    module.gradient = tf_.function(gradient, input_signature=[x_spec, y_spec, w_spec])
    module.set_global = tf_.function(
        set_global, input_signature=[tf_.TensorSpec(shapes[n], f32, name=n) for n in names]
    )
    add_mask_signatures(module, spec, loss_of)
