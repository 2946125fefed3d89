"""The model-publication guard: never publish a model the fleet's own devices would refuse.

Before a closed round's model is stored and published, the coordinator encodes it and hands
the payload to :func:`check_publishable`, which decodes it exactly as an edge agent does
(``decode_model`` with its default limits: finite tensors and metrics; the fleet; every
tensor as float32 through ``decode_tensor``; ``check_weights`` against the bundle's spec)
and adds a sanity bound: every weight finite and ``|w| <= max_model_weight``. A candidate
that fails is neither stored nor published: the round is abandoned (``unpublishable_model``)
and :func:`largest_contributions` names the updates most likely to blame, by the size of
their share of the weighted sum (weight x L2 norm).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from aggregator.bounds import Contribution
from fedmq.errors import FedmqError, ModelError, WireError
from fedmq.models.spec import ModelSpec, check_weights
from fedmq.update.codecs import decode_tensor
from fedmq.wire import ModelMessage, decode_model

__all__ = [
    "UnpublishableModel",
    "check_publishable",
    "describe_contributions",
    "finite_metrics",
    "largest_contributions",
]


class UnpublishableModel(FedmqError):
    """A candidate model that devices would refuse (or that fails the sanity bound)."""


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics without NaN or infinite values (a model message carries finite ones only)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def check_publishable(
    payload: bytes, fleet: str, spec: ModelSpec, max_model_weight: float
) -> ModelMessage:
    """Decode ``payload`` as a device would; raise :class:`UnpublishableModel` with the
    device's reason (or the sanity bound's) when it would be refused."""
    try:
        msg = decode_model(payload)
        if msg.fleet != fleet:
            raise UnpublishableModel(f"the model names fleet {msg.fleet!r}, not {fleet!r}")
        raw = {t.name: decode_tensor(t, "float32") for t in msg.tensors}
        weights = check_weights(
            spec, {n: raw[n] for n in spec.trainable if n in raw}, names=spec.trainable
        )
    except (WireError, ModelError) as exc:
        code = f" ({exc.code})" if isinstance(exc, WireError) else ""
        raise UnpublishableModel(f"a device would refuse it: {exc}{code}") from exc
    for name, value in weights.items():
        peak = float(np.abs(value).max()) if value.size else 0.0
        if not peak <= max_model_weight:
            raise UnpublishableModel(
                f"weight {name} reaches |w| = {peak:.4g}, above max_model_weight "
                f"{max_model_weight:g}"
            )
    return msg


def largest_contributions(
    contributions: Iterable[Contribution], limit: int = 5
) -> list[Contribution]:
    """The ``limit`` updates with the largest weight x norm (non-finite first)."""

    def size(c: Contribution) -> float:
        value = c.weighted_norm
        return math.inf if math.isnan(value) else value

    return sorted(contributions, key=size, reverse=True)[:limit]


def describe_contributions(contributions: Iterable[Contribution]) -> str:
    """``device (update id): norm N, weight W`` for a log line."""
    return "; ".join(
        f"{c.device} ({c.update_id}): norm {c.norm:.4g}, weight {c.weight:.6g} "
        f"of {c.num_examples} claimed"
        for c in contributions
    ) or "none"
