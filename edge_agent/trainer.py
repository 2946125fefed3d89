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
    "VariantTrainer",
    "check_fit_args",
    "mean_gradient",
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


@runtime_checkable
class VariantTrainer(Protocol):
    """A backend that may also train with a proximal term (FedProx) and compute gradients
    (FedSGD). ``variants`` names what this model supports (``"prox"``, ``"gradient"``,
    ``"mask"``: pruned rounds, with ``set_mask(masks | None)``, edge_agent.pruning): a
    bundle exported before the signatures existed has none."""

    @property
    def variants(self) -> frozenset[str]: ...

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
        """:meth:`Trainer.fit` on ``loss + (mu/2) ||w - w0||^2``, ``w0`` the weights at the
        call (the round's global weights, just set)."""
        ...

    def gradient(
        self, x: np.ndarray, y: np.ndarray, *, max_examples: int, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], TrainMetrics]:
        """The gradient of the mean loss over at most ``max_examples`` examples (drawn with
        ``rng``) at the current weights, which stay unchanged."""
        ...


def _check_xy(spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or len(labels) != len(x):
        raise ModelError(f"labels of shape {labels.shape} do not match {len(x)} examples")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ModelError(f"labels outside [0, {spec.num_classes})")
    if labels.dtype.kind not in "iu":
        raise ModelError(f"labels must be integers, got {labels.dtype}")
    return labels.astype(np.int32, copy=False)


def check_fit_args(epochs: int, lr: float, mu: float = 0.0) -> None:
    """Refuse bad training arguments (``mu``: the FedProx weight) with a ModelError."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ModelError(f"epochs must be a positive integer, got {epochs!r}")
    if not math.isfinite(lr) or lr <= 0:
        raise ModelError(f"learning rate must be positive and finite, got {lr!r}")
    if not (math.isfinite(mu) and mu >= 0):
        raise ModelError(f"mu must be finite and >= 0, got {mu!r}")


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


def mean_gradient(
    xs: np.ndarray,
    labels: np.ndarray,
    *,
    max_examples: int,
    batch: int,
    rng: np.random.Generator,
    xb: np.ndarray,
    yb: np.ndarray,
    grad: Callable[[int], tuple[float, Mapping[str, np.ndarray]]],
) -> tuple[dict[str, np.ndarray], TrainMetrics]:
    """Gradient of the mean loss over ``min(n, max_examples)`` examples (a random subset,
    drawn with ``rng``): batch gradients (each of its ``m``-example mean loss) weighted by
    ``m``, summed in float64, divided by the count. Shared by every backend."""
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ModelError(f"max_examples must be a positive integer, got {max_examples!r}")
    n = len(xs)
    if n == 0:
        raise ModelError("cannot compute a gradient on zero examples")
    order = rng.permutation(n)[:max_examples]
    total = len(order)
    sums: dict[str, np.ndarray] = {}
    loss_sum, steps = 0.0, 0
    start = time.perf_counter()
    for lo in range(0, total, batch):
        idx = order[lo : lo + batch]
        m = len(idx)
        np.take(xs, idx, axis=0, out=xb[:m])
        np.take(labels, idx, out=yb[:m])
        loss, g = grad(m)
        if not math.isfinite(loss):
            raise ModelError(f"loss is not finite ({loss}) at the current weights")
        loss_sum += loss * m
        for name, value in g.items():
            acc = sums.setdefault(name, np.zeros(value.shape, np.float64))
            acc += np.asarray(value, np.float64) * m
        steps += 1
    seconds = time.perf_counter() - start
    out = {name: (acc / total).astype(np.float32) for name, acc in sums.items()}
    return out, TrainMetrics(loss=loss_sum / total, examples=total, steps=steps, seconds=seconds)


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
        self._log_fit(metrics)
        return metrics

    @property
    def variants(self) -> frozenset[str]:
        have = self.model.variants
        out = set()
        if {"set_global", "train_prox"} <= have:
            out.add("prox")
        if "gradient" in have:
            out.add("gradient")
        if {"set_mask", "train_masked"} <= have:
            out.add("mask")
        return frozenset(out)

    def set_mask(self, masks: Mapping[str, np.ndarray] | None) -> None:
        """Pruning (docs/pruning.md): :meth:`fit` trains with the model's ``train_masked``
        under ``masks`` (0/1 per trainable tensor) until ``set_mask(None)``."""
        self.model.set_mask(masks)

    def _pad(self, m: int) -> None:
        # The signature's batch is fixed: pad the last partial batch with weight 0.
        self._wb[:m] = 1.0
        if m < self.spec.train_batch:
            self._xb[m:] = 0.0
            self._yb[m:] = 0
            self._wb[m:] = 0.0

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
        check_fit_args(epochs, lr, mu)
        xs = self.model.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        self.model.set_global(self.model.get_weights())
        xb, yb, wb = self._xb, self._yb, self._wb

        def step(m: int) -> float:
            self._pad(m)
            return self.model.train_prox_step(xb, yb, wb, lr, mu)

        b = self.spec.train_batch
        metrics = sgd_epochs(xs, labels, epochs=epochs, batch=b, rng=rng, xb=xb, yb=yb, step=step)
        self._log_fit(metrics)
        return metrics

    def gradient(
        self, x: np.ndarray, y: np.ndarray, *, max_examples: int, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], TrainMetrics]:
        xs = self.model.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        xb, yb, wb = self._xb, self._yb, self._wb

        def grad(m: int) -> tuple[float, Mapping[str, np.ndarray]]:
            self._pad(m)
            return self.model.gradient(xb, yb, wb)

        return mean_gradient(
            xs, labels, max_examples=max_examples, batch=self.spec.train_batch, rng=rng,
            xb=xb, yb=yb, grad=grad,
        )

    def _log_fit(self, metrics: TrainMetrics) -> None:
        log.debug(
            "fit %s: %d examples, %d steps, loss %.4f, %.0f examples/s",
            self.spec.name,
            metrics.examples,
            metrics.steps,
            metrics.loss,
            metrics.examples_per_second,
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalMetrics:
        xs = self.model.prepare_inputs(x)
        labels = _check_xy(self.spec, xs, y)
        loss, acc = self.model.evaluate(xs, labels)
        return EvalMetrics(loss=loss, accuracy=acc, examples=len(labels))
