"""DP rounds for simulated devices: the same device step as the edge agent
(:func:`fedmq.privacy.device.privatize_delta`: clip the delta's L2 norm to the round's
``dp_clip`` before encoding, report the ``dp_unclipped`` bit for adaptive clipping, add local
noise when ``dp_local_noise`` asks), plus a fault for tests of the aggregator's bound: a
misbehaving device sends its delta unclipped.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmq.privacy.device import privatize_delta

__all__ = ["privatize_round"]


def privatize_round(
    delta: Mapping[str, np.ndarray], params: Mapping[str, object], rng: np.random.Generator,
    misbehave: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(the delta to encode, the update's metrics) for a round with ``params``. Outside DP
    rounds the delta is unchanged and there are no metrics. ``misbehave``: the delta goes out
    unclipped (the params are still checked). ValueError for malformed DP params."""
    private, metrics = privatize_delta(delta, params, rng)
    if misbehave:
        return dict(delta), metrics
    return private, metrics
