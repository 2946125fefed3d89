"""Pruning signatures of an exported model: a weight mask enforced inside the train step
(needs TensorFlow to export; builtin ops only, no Flex).

- ``set_mask(**{name: mask}) -> {ok}``: one float32 mask (0 or 1) per trainable tensor,
  held in a third set of variables (all ones after export: the dense model);
- ``train_masked(x, y, w, lr) -> {loss}``: one SGD step followed by the mask multiply,
  ``v <- (v - lr * grad) * mask``: a pruned weight is exactly 0 after every step, whatever
  it held before, and with an all-ones mask the step is ``train``'s bit for bit.

The mask is a multiply (MUL), not a gather, so the step's ops are the plain train step's
plus one MUL per tensor. The server owns the mask (:mod:`fedmq.prune`); the device loads it
with ``set_mask`` before a pruned round (``edge_agent.pruning``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedmq.models.spec import ModelSpec

__all__ = ["MASK_SIGNATURES", "add_mask_signatures"]

MASK_SIGNATURES = ("set_mask", "train_masked")

LossOf = Callable[[Mapping[str, Any], Any, Any, Any], Any]


def add_mask_signatures(module: Any, spec: ModelSpec, loss_of: LossOf) -> None:
    """Give ``module`` (with ``variables_by_name`` and ``params()``) ``set_mask`` and
    ``train_masked``; ``loss_of(params, x, y, w)`` is the loss its ``train`` uses."""
    import tensorflow as tf_

    f32 = tf_.float32
    names = list(spec.trainable)
    shapes = {t.name: t.shape for t in spec.weights}
    module.mask_by_name = {
        n: tf_.Variable(np.ones(shapes[n], np.float32), name=f"mask_{n}", trainable=False)
        for n in names
    }

    def train_masked(x: Any, y: Any, w: Any, lr: Any) -> Any:
        train_vars = [module.variables_by_name[n] for n in names]
        with tf_.GradientTape() as tape:
            loss = loss_of(module.params(), x, y, w)
        grads = [tf_.convert_to_tensor(g) for g in tape.gradient(loss, train_vars)]
        for n, var, grad in zip(names, train_vars, grads, strict=True):
            var.assign((var - lr * grad) * module.mask_by_name[n])
        return {"loss": loss}

    def set_mask(*values: Any) -> Any:
        for n, value in zip(names, values, strict=True):
            module.mask_by_name[n].assign(value)
        return {"ok": tf_.constant(1, dtype=tf_.int32)}

    module.train_masked = tf_.function(
        train_masked,
        input_signature=[
            tf_.TensorSpec([spec.train_batch, *spec.input_shape], f32, name="x"),
            tf_.TensorSpec([spec.train_batch], tf_.int32, name="y"),
            tf_.TensorSpec([spec.train_batch], f32, name="w"),
            tf_.TensorSpec([], f32, name="lr"),
        ],
    )
    module.set_mask = tf_.function(
        set_mask, input_signature=[tf_.TensorSpec(shapes[n], f32, name=n) for n in names]
    )
