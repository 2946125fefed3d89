"""The open round's federated evaluation: the devices' reports on the round's base model.

Each accepted update may carry an :class:`~fedmq.evaluation.EvalReport` (the device's
held-out loss and accuracy of the model the round was opened on, and after its local
training). :class:`RoundEvaluations` keeps one report per device for the open round (a
device's later report replaces its earlier one, so a re-fold after a restart never counts
one twice), and :meth:`~RoundEvaluations.figures` gives the round record's ``fed_*`` keys
(:func:`fedmq.evaluation.combine`). Reports of updates trained on an older model (a FedBuff
buffer folds those) evaluated another model: they are not mixed in. Memory is O(devices).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aggregator.metrics import AggregatorMetrics
from fedmq.evaluation import EVAL_KEYS, EvalReport, combine
from fedmq.wire import UpdateMessage

__all__ = ["RoundEvaluations", "set_gauges"]

log = logging.getLogger(__name__)


class RoundEvaluations:
    """The evaluation reports of one round, opened on model ``base_version``."""

    def __init__(self, base_version: int | None = None) -> None:
        self.base_version = base_version
        self._reports: dict[str, EvalReport] = {}

    def __len__(self) -> int:
        return len(self._reports)

    def note(self, msg: UpdateMessage) -> bool:
        """Keep ``msg``'s report if it evaluated this round's base model; whether kept."""
        report = msg.evaluation
        if report is None:
            return False
        if self.base_version is not None and msg.base_version != self.base_version:
            log.debug(
                "evaluation of %s on version %d not counted in a round on version %d",
                msg.device, msg.base_version, self.base_version,
            )
            return False
        self._reports[msg.device] = report
        return True

    def figures(self) -> dict[str, float]:
        """The round record's federated figures ({} when no device reported)."""
        out = combine(self._reports.values())
        if out and self.base_version is not None:
            out["fed_eval_version"] = float(self.base_version)
        return out


def set_gauges(metrics: AggregatorMetrics, figures: Mapping[str, float]) -> None:
    """Set the federated-evaluation gauges from a round's figures (untouched without any)."""
    if "fed_accuracy" not in figures:
        return
    for model, prefix in (("global", "fed_"), ("personal", "fed_personal_")):
        if f"{prefix}accuracy" not in figures:
            continue
        metrics.federated_loss.labels(model=model).set(figures[f"{prefix}loss"])
        for stat, key in (("mean", "accuracy"), ("min", "accuracy_min"),
                          ("median", "accuracy_median"), ("max", "accuracy_max")):
            metrics.federated_accuracy.labels(model=model, stat=stat).set(
                figures[f"{prefix}{key}"]
            )
    metrics.federated_eval_examples.set(figures["fed_eval_examples"])
    metrics.federated_eval_devices.set(figures["fed_eval_devices"])


assert all(k.startswith("fed_") for k in EVAL_KEYS)
