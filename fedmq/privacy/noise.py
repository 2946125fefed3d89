"""Gaussian noise for the clipped sum, and Andrew et al.'s adaptive clip (pure state).

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private
Learning with Adaptive Clipping", Algorithm 1, geometric update): each device reports the
bit ``b = [norm <= C]``; the server adds ``N(0, sigma_b^2)`` to the count of bits, divides by
the expected number of participants and moves ``C <- C * exp(-eta * (b_mean - gamma))``,
so ``C`` tracks the ``gamma`` quantile of the update norms. The noise on the count is
accounted (:func:`fedmq.privacy.accounting.effective_noise_multiplier`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["AdaptiveClip", "add_gaussian_noise"]


def add_gaussian_noise(
    weights: Mapping[str, np.ndarray], sd: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``weights`` plus independent ``N(0, sd^2)`` on every value (float32 out; the noise is
    drawn in float64)."""
    if not (math.isfinite(sd) and sd >= 0):
        raise ValueError(f"noise sd must be >= 0, got {sd}")
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        noise = rng.normal(0.0, sd, size=np.shape(w)) if sd > 0 else 0.0
        out[name] = (np.asarray(w, np.float64) + noise).astype(np.float32)
    return out


@dataclass(frozen=True)
class AdaptiveClip:
    """The clip schedule: ``target_quantile`` gamma, ``learning_rate`` eta, the count's
    noise sd ``count_sd`` sigma_b; :meth:`next_clip` is one update of C."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_sd: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (math.isfinite(self.count_sd) and self.count_sd > 0):
            raise ValueError(f"count_sd must be > 0, got {self.count_sd}")

    def next_clip(
        self, clip: float, unclipped: int, expected: float, rng: np.random.Generator
    ) -> tuple[float, float]:
        """(the next C, the noised fraction of unclipped updates) after a round in which
        ``unclipped`` devices reported ``norm <= C``, ``expected`` devices expected."""
        noised = (unclipped + float(rng.normal(0.0, self.count_sd))) / expected
        return clip * math.exp(-self.learning_rate * (noised - self.target_quantile)), noised
