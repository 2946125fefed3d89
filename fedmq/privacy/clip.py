"""L2 clipping of an update (all tensors together) and the quantisation slack of its norm.

A device clips its float32 delta to norm ``C`` before encoding; a quantising codec then
moves each value by less than one quantisation step, so the decoded update's norm can exceed
``C`` by at most :func:`quantization_slack` (the L2 norm of one step per value). The
aggregator re-clips whatever it folds to exactly ``C`` (docs/privacy.md, "Clip bound").
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["clip_factor", "clip_to_norm", "l2_norm", "quantization_slack"]


def l2_norm(weights: Mapping[str, np.ndarray]) -> float:
    """The L2 norm over every tensor, summed in float64."""
    return math.sqrt(sum(float(np.square(w, dtype=np.float64).sum()) for w in weights.values()))


def clip_factor(norm: float, clip: float) -> float:
    """The factor that scales an update of L2 ``norm`` to at most ``clip`` (1 when within)."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be > 0, got {clip}")
    if not math.isfinite(norm):
        raise ValueError(f"the update's norm is not finite ({norm})")
    return 1.0 if norm <= clip else clip / norm


def clip_to_norm(
    weights: Mapping[str, np.ndarray], clip: float
) -> tuple[dict[str, np.ndarray], float]:
    """``weights`` scaled to L2 norm at most ``clip`` (float32) and the norm before."""
    norm = l2_norm(weights)
    factor = clip_factor(norm, clip)
    if factor == 1.0:
        return {n: np.asarray(w, np.float32) for n, w in weights.items()}, norm
    # float32 rounding of the product can leave the norm a few ulps above clip: aim below.
    f = np.float32(factor * (1 - 1e-6))
    return {n: (np.asarray(w, np.float32) * f).astype(np.float32) for n, w in weights.items()}, norm


def quantization_slack(steps: Mapping[str, tuple[int, float]]) -> float:
    """Upper bound of ``||decoded - clipped||_2`` for per-tensor quantisation: ``steps``
    maps a tensor to (values, step size); each value moves by less than one step."""
    return math.sqrt(sum(n * s * s for n, s in steps.values()))
