"""Local training backends of the edge agent.

:class:`Trainer` is what the agent drives in a round: load the global weights, ``fit`` on the
local data, read back the federated tensors (``spec.trainable``), ``evaluate``.
:class:`LiteRTTrainer` runs the bundle's ``train``/``infer`` signatures in LiteRT (no
TensorFlow on the device). Other backends (Keras) implement the same Protocol.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from fedmq.errors import ModelError
from fedmq.models.litert import TFLiteModel
from fedmq.models.spec import ModelBundle, ModelSpec, load_bundle

__all__ = [
    "EvalMetrics",
    "LiteRTTrainer",
    "TrainMetrics",
    "Trainer",
    "check_fit_args",
    "sgd_epochs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainMetrics:
    """Result of :meth:`Trainer.fit`: ``loss`` is the example-weighted mean over the last
    epoch (each batch's loss taken before its update)."""

    loss: float
    examples: int
    steps: int
    seconds: float

    def __post_init__(self) -> None:
        if self.examples < 0 or self.steps < 0 or self.seconds < 0:
            raise ValueError("examples, steps and seconds must be non-negative")

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else math.inf


@dataclass(frozen=True)
class EvalMetrics:
    loss: float
    accuracy: float
    examples: int

    def __post_init__(self) -> None:
        if self.examples < 0:
            raise ValueError("examples must be non-negative")
        if not 0.0 <= self.accuracy <= 1.0:
            raise ValueError(f"accuracy {self.accuracy} outside [0, 1]")


@runtime_checkable
class Trainer(Protocol):
    """A local training backend for one model."""

    @property
    def spec(self) -> ModelSpec: ...

    @property
    def runtime_name(self) -> str: ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load the federated tensors (``spec.trainable``; float32, exact shapes)."""
        ...

    def get_weights(self) -> dict[str, np.ndarray]:
        """Copies of the federated tensors (``spec.trainable``)."""
        ...

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, rng: np.random.Generator
    ) -> TrainMetrics:
        """Plain SGD for ``epochs`` epochs, reshuffled with ``rng`` each epoch, in batches of
        ``spec.train_batch`` (the last partial batch is padded with zero-weight examples)."""
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalMetrics: ...


def _check_xy(spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != len(x):
        raise ModelError(f"labels of shape {labels.shape} do not match {len(x)} examples")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ModelError(f"labels outside [0, {spec.num_classes})")
    if labels.dtype.kind not in "iu":
        raise ModelError(f"labels must be integers, got {labels.dtype}")
    return labels.astype(np.int32, copy=False)


def check_fit_args(epochs: int, lr: float) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ModelError(f"epochs must be a positive integer, got {epochs!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ModelError(f"learning rate must be positive and finite, got {lr!r}")


def sgd_epochs(
    xs: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch: int,
    rng: np.random.Generator,
    xb: np.ndarray,
    yb: np.ndarray,
    step: Callable[[int], float],
) -> TrainMetrics:
    """Shuffled mini-batch epochs, shared by every backend so that they draw the same
    permutations from ``rng`` and train on the same batches: each batch is gathered into the
    first ``m`` rows of ``xb``/``yb`` and ``step(m)`` trains on it, returning its loss."""
    n = len(xs)
    if n == 0:
        raise ModelError("cannot train on zero examples")
    steps, epoch_loss = 0, 0.0
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(n)
        total = 0.0
        for lo in range(0, n, batch):
            idx = order[lo : lo + batch]
            m = len(idx)
            np.take(xs, idx, axis=0, out=xb[:m])
            np.take(labels, idx, out=yb[:m])
            loss = step(m)
            if not math.isfinite(loss):
                raise ModelError(f"training diverged (loss {loss}) at step {steps}; lower lr")
            total += loss * m
            steps += 1
        epoch_loss = total / n
    seconds = time.perf_counter() - start
    return TrainMetrics(loss=epoch_loss, examples=n * epochs, steps=steps, seconds=seconds)


class LiteRTTrainer:
    """:class:`Trainer` on a LiteRT interpreter (ai-edge-litert / tflite-runtime)."""

    def __init__(
        self, bundle: ModelBundle | str | os.PathLike[str], num_threads: int | None = None
    ) -> None:
        if not isinstance(bundle, ModelBundle):
            bundle = load_bundle(bundle)
        self.bundle = bundle
        self.model = TFLiteModel(bundle, num_threads=num_threads)
        b = bundle.spec.train_batch
        self._xb = np.zeros((b, *bundle.spec.input_shape), dtype=np.float32)
        self._yb = np.zeros(b, dtype=np.int32)
        self._wb = np.zeros(b, dtype=np.float32)

    @property
    def spec(self) -> ModelSpec:
        return self.bundle.spec

    @property
    def runtime_name(self) -> str:
        return self.model.runtime_name

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.model.set_weights(weights)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.model.get_weights()

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, rng: np.random.Generator
    ) -> TrainMetrics:
        check_fit_args(epochs, lr)
        xs = self.model.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        xb, yb, wb = self._xb, self._yb, self._wb
        b = self.spec.train_batch

        def step(m: int) -> float:
            # The signature's batch is fixed: pad the last partial batch with weight 0.
            wb[:m] = 1.0
            if m < b:
                xb[m:] = 0.0
                yb[m:] = 0
                wb[m:] = 0.0
            return self.model.train_step(xb, yb, wb, lr)

        metrics = sgd_epochs(xs, labels, epochs=epochs, batch=b, rng=rng, xb=xb, yb=yb, step=step)
        log.debug(
            "fit %s: %d examples, %d steps, loss %.4f, %.0f examples/s",
            self.spec.name,
            metrics.examples,
            metrics.steps,
            metrics.loss,
            metrics.examples_per_second,
        )
        return metrics

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalMetrics:
        xs = self.model.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        loss, acc = self.model.evaluate(xs, labels)
        return EvalMetrics(loss=loss, accuracy=acc, examples=len(labels))
