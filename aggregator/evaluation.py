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

import json
import logging
from collections.abc import Mapping

from aggregator.metrics import AggregatorMetrics
from fedmq.evaluation import EVAL_KEYS, EvalReport, combine
from fedmq.wire import UpdateMessage

__all__ = ["RoundEvaluations", "set_gauges"]

log = logging.getLogger(__name__)


class RoundEvaluations:
    """The evaluation reports of one round, opened on model ``base_version``.

    Reports of eval-only devices (updates without tensors, never journaled) are also kept
    in :meth:`eval_only_json`, which the ingest stores so a restart keeps them.
    """

    def __init__(self, base_version: int | None = None, round_id: int | None = None) -> None:
        self.base_version = base_version
        self.round_id = round_id
        self._reports: dict[str, EvalReport] = {}
        self._eval_only: set[str] = set()

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
        if not msg.tensors:
            self._eval_only.add(msg.device)
        return True

    def has_eval_only(self, device: str) -> bool:
        """Whether ``device``'s evaluation-only report of this round is already kept."""
        return device in self._eval_only

    def figures(self) -> dict[str, float]:
        """The round record's federated figures ({} when no device reported)."""
        out = combine(self._reports.values())
        if out and self.base_version is not None:
            out["fed_eval_version"] = float(self.base_version)
        return out

    def eval_only_json(self) -> str:
        """The eval-only reports of this round (for the state's meta table)."""
        return json.dumps({
            "round": self.round_id,
            "reports": {d: self._reports[d].to_map() for d in sorted(self._eval_only)},
        })

    def load_eval_only(self, raw: str | None) -> int:
        """Restore the eval-only reports :meth:`eval_only_json` stored for this round (those
        of another round are ignored); how many."""
        if raw is None:
            return 0
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or obj.get("round") != self.round_id:
                return 0
            reports = {str(d): EvalReport.from_map(r) for d, r in obj["reports"].items()}
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            log.warning("stored eval-only reports are unreadable (%s): ignored", exc)
            return 0
        self._reports.update(reports)
        self._eval_only.update(reports)
        return len(reports)


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
