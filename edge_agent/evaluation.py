"""The device's side of federated evaluation (docs/strategies.md, "Federated evaluation").

With ``eval_fraction > 0`` the agent holds out that fraction of its local examples
(:meth:`fedmq.data.local.LocalData.split_heldout`): they are never trained on and never
leave the device. Each round the device evaluates the global model it trains from on them
and, after its local training, the trained model (personalized figures, ``eval_personal``);
the :class:`~fedmq.evaluation.EvalReport` travels in the update message. An ``eval_only``
device never trains: it evaluates the round's global model on all its examples and sends a
report with no tensors (the aggregator records it and folds nothing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from edge_agent.config import AgentConfig
from edge_agent.trainer import EvalMetrics, Trainer
from fedmq.data.datasets import Dataset
from fedmq.data.local import LocalData
from fedmq.errors import ModelError
from fedmq.evaluation import EvalReport

__all__ = ["DeviceEvaluation", "device_evaluation", "eval_status", "is_private_round"]

log = logging.getLogger(__name__)


def is_private_round(params: Mapping[str, object]) -> bool:
    """Whether the round's params ask for DP (``dp_clip``): its figures are not accounted
    for by the privacy accountant, so no evaluation leaves the device in such a round."""
    return "dp_clip" in params


@dataclass(frozen=True)
class DeviceEvaluation:
    """The held-out examples and what to evaluate on them."""

    heldout: Dataset
    personal: bool = True
    eval_only: bool = False

    @property
    def count(self) -> int:
        return len(self.heldout)

    def measure(self, trainer: Trainer) -> EvalMetrics | None:
        """The trainer's current model on the held-out examples (None, logged, when the
        figures are unusable: a diverged model's non-finite loss)."""
        try:
            got = trainer.evaluate(self.heldout.x, np.asarray(self.heldout.y, np.int32))
        except (ModelError, ValueError) as exc:
            log.warning("held-out evaluation failed: %s", exc)
            return None
        if not math.isfinite(got.loss) or got.examples < 1:
            log.warning("held-out evaluation gave loss %r on %d examples: not reported",
                        got.loss, got.examples)
            return None
        return got

    @staticmethod
    def report(
        global_: EvalMetrics | None, personal: EvalMetrics | None = None
    ) -> EvalReport | None:
        """The report of these figures (None without the global figures)."""
        if global_ is None:
            return None
        return EvalReport(
            loss=float(global_.loss), accuracy=float(global_.accuracy),
            count=int(global_.examples),
            personal_loss=None if personal is None else float(personal.loss),
            personal_accuracy=None if personal is None else float(personal.accuracy),
        )


def eval_status(report: EvalReport | None) -> dict[str, float]:
    """The report's figures for the device's status metrics ({} without a report)."""
    if report is None:
        return {}
    out = {"eval_loss": report.loss, "eval_accuracy": report.accuracy,
           "eval_examples": float(report.count)}
    if report.personal_loss is not None and report.personal_accuracy is not None:
        out["personal_loss"] = report.personal_loss
        out["personal_accuracy"] = report.personal_accuracy
    return out


def device_evaluation(
    config: AgentConfig, data: LocalData
) -> tuple[LocalData, DeviceEvaluation | None]:
    """(the data to train on, the evaluation) as the agent's config asks: ``eval_only``
    evaluates on every local example, ``eval_fraction > 0`` holds that fraction out,
    otherwise no evaluation and the data unchanged. A DataError when it cannot split."""
    if config.eval_only:
        log.info("eval_only: this device evaluates each round's model on its %d examples "
                 "and never trains", len(data))
        return data, DeviceEvaluation(data.dataset, personal=False, eval_only=True)
    if config.eval_fraction <= 0:
        return data, None
    train, heldout = data.split_heldout(config.eval_fraction)
    log.info("federated evaluation: %d of %d local examples held out (never trained on)",
             len(heldout), len(data))
    return train, DeviceEvaluation(heldout, personal=config.eval_personal)
