"""The device's part of DP-FedAvg: clip the round's delta to the announced bound before it
is encoded, report the clip bit (adaptive clipping) and, for local DP, add the noise here.

The round's :class:`~fedmq.wire.TrainingConfig` ``params`` say what to do: ``dp_clip``
(C > 0; absent = no DP this round) and ``dp_local_noise`` (z_local >= 0: noise sd
``z_local * C`` on every value, on the device).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmq.privacy.clip import clip_to_norm
from fedmq.privacy.dp_fedavg import UNCLIPPED_METRIC
from fedmq.privacy.noise import add_gaussian_noise

__all__ = ["privatize_delta"]


def _positive(params: Mapping[str, object], key: str, allow_zero: bool) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"round param {key} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or out < 0 or (out == 0 and not allow_zero):
        raise ValueError(f"round param {key} must be {'>=' if allow_zero else '>'} 0, got {out}")
    return out


def privatize_delta(
    delta: Mapping[str, np.ndarray], params: Mapping[str, object], rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(the delta to encode, metrics to add to the update): clipped to ``dp_clip`` (and
    noised with ``dp_local_noise``) when the round asks, else ``delta`` unchanged and no
    metrics. ValueError for a malformed param."""
    clip = _positive(params, "dp_clip", allow_zero=False)
    local = _positive(params, "dp_local_noise", allow_zero=True)
    if clip is None:
        if local:
            raise ValueError("round param dp_local_noise needs dp_clip")
        return dict(delta), {}
    clipped, norm = clip_to_norm(delta, clip)
    metrics = {UNCLIPPED_METRIC: 1.0 if norm <= clip else 0.0}
    if local:
        clipped = add_gaussian_noise(clipped, local * clip, rng)
    return clipped, metrics
