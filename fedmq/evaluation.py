"""Federated evaluation: what a device reports about the global model, and how the
aggregator combines the reports of a round (pure; docs/strategies.md, "Federated evaluation").

A device evaluates the global model it trains from (the round's base model) on a local
held-out split that never leaves it, and optionally the model after its local training on
the same split (``personal_*``: personalized accuracy). :class:`EvalReport` travels in the
update message (field ``eval``, :mod:`fedmq.wire`); :func:`combine` turns the reports of a
round into the figures of its round record: the example-weighted mean loss and accuracy
plus the minimum, median and maximum accuracy across devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EVAL_KEYS", "MAX_EVAL_EXAMPLES", "EvalReport", "combine"]

#: The largest held-out example count a report may claim.
MAX_EVAL_EXAMPLES = 2**40
_FIELDS = ("loss", "accuracy", "count", "personal_loss", "personal_accuracy")
#: The round-record keys :func:`combine` can produce (metrics, status and report read them).
EVAL_KEYS = (
    "fed_loss", "fed_accuracy", "fed_accuracy_min", "fed_accuracy_median", "fed_accuracy_max",
    "fed_eval_examples", "fed_eval_devices", "fed_personal_loss", "fed_personal_accuracy",
    "fed_personal_accuracy_min", "fed_personal_accuracy_median", "fed_personal_accuracy_max",
)


def _number(raw: Mapping[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key!r} must be a number")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{key!r} is not finite")
    return out


@dataclass(frozen=True)
class EvalReport:
    """One device's evaluation on its held-out split of ``count`` examples: ``loss`` (mean
    cross-entropy) and ``accuracy`` of the global model, and the same after local training
    (``personal_loss``/``personal_accuracy``, None when the device did not train)."""

    loss: float
    accuracy: float
    count: int
    personal_loss: float | None = None
    personal_accuracy: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise ValueError("'count' must be an integer")
        if not 1 <= self.count <= MAX_EVAL_EXAMPLES:
            raise ValueError(f"'count' must be in [1, {MAX_EVAL_EXAMPLES}], got {self.count}")
        _check_pair(self.loss, self.accuracy, "")
        if (self.personal_loss is None) != (self.personal_accuracy is None):
            raise ValueError("'personal_loss' and 'personal_accuracy' come together")
        if self.personal_loss is not None and self.personal_accuracy is not None:
            _check_pair(self.personal_loss, self.personal_accuracy, "personal_")

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "loss": float(self.loss), "accuracy": float(self.accuracy), "count": self.count,
        }
        if self.personal_loss is not None and self.personal_accuracy is not None:
            out["personal_loss"] = float(self.personal_loss)
            out["personal_accuracy"] = float(self.personal_accuracy)
        return out

    @classmethod
    def from_map(cls, raw: Any) -> EvalReport:
        """Strict inverse of :meth:`to_map` (:class:`ValueError` naming the bad field)."""
        if not isinstance(raw, Mapping):
            raise ValueError("an evaluation report must be a map")
        unknown = set(raw) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(map(str, unknown))}")
        count = raw.get("count")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError("'count' must be an integer")
        personal = "personal_loss" in raw or "personal_accuracy" in raw
        return cls(
            loss=_number(raw, "loss"),
            accuracy=_number(raw, "accuracy"),
            count=count,
            personal_loss=_number(raw, "personal_loss") if personal else None,
            personal_accuracy=_number(raw, "personal_accuracy") if personal else None,
        )


def _check_pair(loss: float, accuracy: float, prefix: str) -> None:
    for key, value in (("loss", loss), ("accuracy", accuracy)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"'{prefix}{key}' must be a number")
        if not math.isfinite(value):
            raise ValueError(f"'{prefix}{key}' is not finite")
    if loss < 0:
        raise ValueError(f"'{prefix}loss' must be >= 0, got {loss}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"'{prefix}accuracy' must be in [0, 1], got {accuracy}")


def combine(reports: Iterable[EvalReport]) -> dict[str, float]:
    """The round's federated figures (keys of :data:`EVAL_KEYS`; {} without a report):
    ``fed_loss``/``fed_accuracy`` weighted by each device's held-out count, the min, median
    and max accuracy across devices, the examples and devices counted, and the same for the
    personalized figures of the devices that reported them."""
    items = list(reports)
    if not items:
        return {}
    out = _summary([(r.loss, r.accuracy, r.count) for r in items], "fed_")
    out["fed_eval_examples"] = float(sum(r.count for r in items))
    out["fed_eval_devices"] = float(len(items))
    personal = [
        (r.personal_loss, r.personal_accuracy, r.count)
        for r in items
        if r.personal_loss is not None and r.personal_accuracy is not None
    ]
    if personal:
        out.update(_summary(personal, "fed_personal_"))
    return out


def _summary(rows: list[tuple[float, float, int]], prefix: str) -> dict[str, float]:
    total = math.fsum(float(n) for _, _, n in rows)
    accuracies = np.array([a for _, a, _ in rows], np.float64)
    return {
        f"{prefix}loss": math.fsum(loss * n for loss, _, n in rows) / total,
        f"{prefix}accuracy": math.fsum(a * n for _, a, n in rows) / total,
        f"{prefix}accuracy_min": float(accuracies.min()),
        f"{prefix}accuracy_median": float(np.median(accuracies)),
        f"{prefix}accuracy_max": float(accuracies.max()),
    }
