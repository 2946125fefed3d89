"""Evaluate global weights on a held-out set with the model's own ``.tflite`` (LiteRT).

No TensorFlow: :class:`fedmq.models.litert.TFLiteModel` runs the bundle's ``infer`` signature.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from fedmq.errors import DataError
from fedmq.models.spec import ModelBundle

__all__ = ["Evaluator", "TFLiteEvaluator", "evaluate", "load_eval_set", "make_evaluator"]

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Weights (the federated tensors) -> metrics such as ``accuracy`` and ``loss``."""

    def __call__(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]: ...


def load_eval_set(name: str, eval_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The test split of a named dataset (or an ``.npz`` with ``x``/``y``), at most
    ``eval_examples`` examples (a seeded subset when larger; 0 = all)."""
    from fedmq.data.datasets import load_dataset, load_npz

    if name.endswith(".npz") or Path(name).is_file():
        ds = load_npz(name)
    else:
        _, ds = load_dataset(name)
    x, y = ds.x, ds.y
    if len(x) == 0:
        raise DataError(f"evaluation set {name!r} is empty")
    if 0 < eval_examples < len(x):
        idx = np.sort(np.random.default_rng(seed).choice(len(x), eval_examples, replace=False))
        x, y = x[idx], y[idx]
    return np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int32)


class TFLiteEvaluator:
    """Loads the bundle once; each call sets the weights and evaluates (loss, accuracy)."""

    def __init__(self, bundle: ModelBundle, x: np.ndarray, y: np.ndarray) -> None:
        from fedmq.models.litert import TFLiteModel

        self._model = TFLiteModel(bundle, num_threads=1)
        self._x = self._model.prepare_inputs(x)
        self._y = y
        log.info("evaluating on %d held-out examples", len(y))

    @property
    def num_examples(self) -> int:
        return len(self._y)

    def __call__(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        self._model.set_weights(weights)
        loss, acc = self._model.evaluate(self._x, self._y)
        return {"accuracy": float(acc), "loss": float(loss)}


def make_evaluator(
    bundle: ModelBundle, eval_dataset: str, eval_examples: int, seed: int = 0
) -> TFLiteEvaluator | None:
    """The evaluator of the ``eval_dataset``/``eval_examples`` settings (None for ``"none"``):
    the single-process aggregator's and the sharded coordinator's."""
    if eval_dataset == "none":
        return None
    x, y = load_eval_set(eval_dataset, eval_examples, seed)
    return TFLiteEvaluator(bundle, x, y)


def evaluate(evaluator: Evaluator | None, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """``evaluator``'s figures of ``weights``; {} without one or when it fails (one ERROR
    line: evaluation must never stop the federation)."""
    if evaluator is None:
        return {}
    try:
        return evaluator(weights)
    except Exception as exc:
        log.error("evaluation failed: %s", exc)
        return {}
