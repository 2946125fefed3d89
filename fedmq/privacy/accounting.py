"""The privacy accountant: epsilon of DP-FedAvg rounds, by Google's ``dp-accounting``.

One round of DP-FedAvg is a sampled Gaussian mechanism: the devices of the round are drawn
by the sampler (:data:`SAMPLINGS`: ``poisson``, each device independently with rate
``q = k / n``, accounted as :class:`PoissonSampledDpEvent` with add-or-remove-one
neighbours; ``fixed``, ``k`` of ``n`` without replacement, accounted as
:class:`SampledWithoutReplacementDpEvent` with replace-one neighbours), and their clipped sum
gets Gaussian noise of sd ``z * C``. Adaptive clipping also releases a noised count of
clipped updates (sd ``sigma_b``, sensitivity 1); the two releases together are one Gaussian
mechanism of noise multiplier :func:`effective_noise_multiplier` (Andrew et al. 2021,
section 3.1). Under replace-one neighbours the clipped sum's sensitivity is 2C, so a fixed-size
round is accounted with half the noise multiplier. ``R`` rounds are the ``R``-fold self-composition.

``dp-accounting`` pins ``attrs<24`` and is in the aggregator's extra only: it is imported
when a function here is called, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "PrivacyPlan",
    "calibrate_noise_multiplier",
    "effective_noise_multiplier",
    "epsilon_curve",
    "local_epsilon",
]

SAMPLINGS = ("poisson", "fixed")
ACCOUNTANTS = ("rdp", "pld")


def effective_noise_multiplier(
    z: float, clip_count_sd: float | None, sum_sensitivity: float = 1.0
) -> float:
    """The noise multiplier (noise sd over L2 sensitivity) of one round's releases: the sum
    (noise ``z C``, sensitivity ``sum_sensitivity * C``: 1 for add-or-remove-one neighbours,
    2 for replace-one) and, with adaptive clipping, the clip count (noise ``sigma_b``,
    sensitivity 1), together ``((s/z)^2 + sigma_b^-2)^-1/2``."""
    if z == 0:
        return 0.0
    inv2 = (sum_sensitivity / z) ** 2
    if clip_count_sd is not None:
        inv2 += clip_count_sd**-2
    return 1.0 / math.sqrt(inv2)


@dataclass(frozen=True)
class PrivacyPlan:
    """What the accountant needs: a fleet of ``population`` devices, ``per_round`` devices
    per round (``poisson``: expected), ``noise_multiplier`` z, the clip-count noise
    (adaptive clipping; None = fixed clip), ``delta`` and which accountant."""

    population: int
    per_round: int
    noise_multiplier: float
    delta: float
    sampling: str = "poisson"
    accountant: str = "rdp"
    clip_count_sd: float | None = None

    def __post_init__(self) -> None:
        if self.population < 1 or not 1 <= self.per_round <= self.population:
            raise ValueError(
                f"per_round must be in [1, population], got {self.per_round} of "
                f"{self.population}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.accountant == "pld" and self.sampling == "fixed":
            raise ValueError("the PLD accountant here accounts Poisson sampling only: use rdp")
        sd = self.clip_count_sd
        if sd is not None and not (math.isfinite(sd) and sd > 0):
            raise ValueError(f"clip_count_sd must be > 0, got {sd}")

    @property
    def rate(self) -> float:
        """The sampling rate ``q = per_round / population``."""
        return self.per_round / self.population

    @property
    def sum_sensitivity(self) -> float:
        """The clipped sum's L2 sensitivity in units of C: 1 for Poisson sampling
        (add-or-remove-one), 2 for fixed-size sampling (replace-one neighbours)."""
        return 1.0 if self.sampling == "poisson" else 2.0

    def round_noise_multiplier(self, z: float) -> float:
        """What the accountant is told about one round of noise multiplier ``z``."""
        return effective_noise_multiplier(z, self.clip_count_sd, self.sum_sensitivity)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (0 rounds: 0; no noise: inf)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        if rounds == 0:
            return 0.0
        z = self.round_noise_multiplier(self.noise_multiplier)
        if z == 0:
            return math.inf
        return _epsilon(self, z, rounds)


def _round_event(plan: PrivacyPlan, z: float) -> Any:
    import dp_accounting

    gaussian = dp_accounting.GaussianDpEvent(z)
    if plan.sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(plan.rate, gaussian)
    return dp_accounting.SampledWithoutReplacementDpEvent(
        plan.population, plan.per_round, gaussian
    )


def _accountant(plan: PrivacyPlan) -> Any:
    import dp_accounting

    relation = dp_accounting.NeighboringRelation
    if plan.accountant == "pld":
        return dp_accounting.pld.PLDAccountant(relation.ADD_OR_REMOVE_ONE)
    neighbours = relation.ADD_OR_REMOVE_ONE if plan.sampling == "poisson" else relation.REPLACE_ONE
    return dp_accounting.rdp.RdpAccountant(neighboring_relation=neighbours)


def _epsilon(plan: PrivacyPlan, z: float, rounds: int) -> float:
    import dp_accounting

    acc = _accountant(plan)
    acc.compose(dp_accounting.SelfComposedDpEvent(_round_event(plan, z), rounds))
    return float(acc.get_epsilon(plan.delta))


def epsilon_curve(plan: PrivacyPlan, rounds: Sequence[int]) -> list[tuple[int, float]]:
    """``(r, epsilon after r rounds)`` for each ``r`` of ``rounds``."""
    return [(r, plan.epsilon(r)) for r in rounds]


def calibrate_noise_multiplier(
    plan: PrivacyPlan, rounds: int, target_epsilon: float
) -> float:
    """The smallest z (``dp_accounting.calibrate_dp_mechanism``) for which ``rounds`` rounds
    of ``plan`` (its ``noise_multiplier`` ignored) stay within ``target_epsilon``."""
    import dp_accounting

    if not (math.isfinite(target_epsilon) and target_epsilon > 0) or rounds < 1:
        raise ValueError("target_epsilon must be > 0 and rounds >= 1")

    def event(z: float) -> Any:
        zeff = plan.round_noise_multiplier(z)
        return dp_accounting.SelfComposedDpEvent(_round_event(plan, zeff), rounds)

    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(plan), event, target_epsilon, plan.delta,
        dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=1e-4,
    )
    return float(z)


def local_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon of local DP: each device's release (clipped to C, noise sd
    ``noise_multiplier * C`` added on the device) is a Gaussian mechanism of L2 sensitivity
    2C (replace-one: any update within the ball), composed over ``rounds`` participations,
    at ``delta``; no sampling amplification is claimed (the device knows it took part)."""
    import dp_accounting

    if rounds == 0:
        return 0.0
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    # Sensitivity 2C, noise sd zC: a Gaussian event of multiplier z / 2 at sensitivity 1.
    acc.compose(dp_accounting.GaussianDpEvent(noise_multiplier / 2), rounds)
    return float(acc.get_epsilon(delta))
