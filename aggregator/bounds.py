"""Ingest bounds: one device must not steer the fleet (docs/protocol.md, "Ingest bounds").

Two bounds, both relative to the fleet so an operator need not guess absolute numbers:

- **Update norm.** The L2 norm of the decoded delta (:func:`update_norm`, computed once per
  update on the wire arrays, no float copy of an int8 update). Over the bound the update is
  clipped (``norm_action = "clip"``, the default, as norm-bounding defences do, Sun et al.
  2019): its decoded delta is folded scaled by ``bound / norm``, so an update of any size
  moves the model no more than an honest one at the bound, and an honest device whose
  non-IID share makes its update large still counts. The factor is journaled (the adaptive
  bound moves) so a restart re-folds the same scale. ``norm_action = "reject"`` refuses it
  ``norm_bound`` instead (the device does not resend). The bound is ``max_update_norm``
  (``norm_bound = "fixed"``), or ``norm_multiplier`` times the median of the fleet's recent
  norms (``"adaptive"``, with ``max_update_norm`` as an extra ceiling when set), or none
  (``"off"``).
- **Fold weight.** A device's claimed ``num_examples`` is folded with weight
  ``min(claimed, registry cap, weight_cap_multiplier * median of recent claims)``. The
  update is not changed, only its weight; the weight used is journaled so that a restart
  re-folds identically.

"Recent" is one value per device, its latest (norms of updates that passed every other check,
accepted or rejected for their norm; claims of accepted updates), for the ``bounds_window``
devices seen last: an attacker moves the median by one entry at most, and a fleet whose
honest norms all grow (a higher ``lr``, more ``epochs``) moves it within a round or two instead
of being locked out. Warm-up: a median bound applies only once ``bounds_warmup`` devices
have a value (the pool survives restarts in the state directory); before that only the fixed
ceiling, the registry caps and ``max_claimed_examples`` apply.

The decisions themselves are pure functions of the limits in force (:func:`clip_factor`,
:func:`capped_weight`); :class:`FleetBounds` moves the limits with every update (one
process), :class:`RoundBounds` freezes them for a whole round, so N sharded ingest workers
(docs/scaling.md) decide every update exactly alike whatever worker gets it.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmq.errors import Rejected, RejectReason, StateError
from fedmq.update.codecs import get_codec
from fedmq.wire import Tensor

__all__ = [
    "NORM_ACTIONS",
    "NORM_BOUNDS",
    "BoundsConfig",
    "Contribution",
    "FleetBounds",
    "RoundBounds",
    "capped_weight",
    "clip_factor",
    "update_norm",
]

log = logging.getLogger(__name__)

NORM_BOUNDS = ("adaptive", "fixed", "off")
NORM_ACTIONS = ("clip", "reject")


@dataclass(frozen=True)
class Contribution:
    """One accepted update of the open round: who, what it claimed, how it was folded."""

    update_id: str
    device: str
    num_examples: int  # as claimed by the device
    weight: float  # the fold weight actually used (capped)
    norm: float  # L2 norm of the decoded delta

    @property
    def weighted_norm(self) -> float:
        """``weight * norm``: the size of this update's share of the weighted sum."""
        return self.weight * self.norm


@dataclass(frozen=True)
class BoundsConfig:
    """The ingest bounds' settings (the aggregator config keys of the same names)."""

    norm_bound: str = "adaptive"
    norm_action: str = "clip"  # over the bound: "clip" (scale to it) or "reject"
    max_update_norm: float = 0.0  # 0 = no fixed ceiling
    norm_multiplier: float = 3.0
    weight_cap_multiplier: float = 2.0  # 0 = no relative weight cap
    bounds_window: int = 100
    bounds_warmup: int = 3

    def __post_init__(self) -> None:
        if self.norm_bound not in NORM_BOUNDS:
            raise ValueError(f"norm_bound must be one of {NORM_BOUNDS}, got {self.norm_bound!r}")
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(
                f"norm_action must be one of {NORM_ACTIONS}, got {self.norm_action!r}"
            )
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ValueError(f"max_update_norm must be >= 0, got {self.max_update_norm}")
        if self.norm_bound == "fixed" and self.max_update_norm == 0:
            raise ValueError('norm_bound = "fixed" needs max_update_norm > 0')
        if not (math.isfinite(self.norm_multiplier) and self.norm_multiplier >= 1):
            raise ValueError(f"norm_multiplier must be >= 1, got {self.norm_multiplier}")
        cap = self.weight_cap_multiplier
        if not (math.isfinite(cap) and (cap == 0 or cap >= 1)):
            raise ValueError(f"weight_cap_multiplier must be 0 (off) or >= 1, got {cap}")
        if self.bounds_window < 1:
            raise ValueError(f"bounds_window must be >= 1, got {self.bounds_window}")
        if not 1 <= self.bounds_warmup <= self.bounds_window:
            raise ValueError(
                f"bounds_warmup must be in [1, bounds_window], got {self.bounds_warmup}"
            )


def update_norm(tensors: Iterable[Tensor], codec: str) -> float:
    """L2 norm of the delta the tensors stand for (call after the codec checks passed);
    each codec computes its tensors' squared norms from their storage."""
    impl = get_codec(codec)
    return math.sqrt(sum(impl.squared_norm(t) for t in tensors))


def clip_factor(norm: float, limit: tuple[float, str] | None, action: str) -> float:
    """The factor to fold an update of L2 norm ``norm`` with under ``limit`` (the bound and
    how it was set; None = no bound): 1.0 within it, ``bound / norm`` over it with
    ``action == "clip"``; raise ``norm_bound`` over it with ``"reject"`` (or for a
    non-finite norm, or a bound of 0)."""
    if limit is None or norm <= limit[0]:
        return 1.0
    what = f"update L2 norm {norm:.4g} exceeds the bound {limit[0]:.4g} ({limit[1]})"
    if action == "reject" or not math.isfinite(norm) or limit[0] <= 0:
        raise Rejected(what, RejectReason.NORM_BOUND)
    # Rounded down a hair so the folded norm is at (never above) the bound in float64.
    return limit[0] / norm * (1 - 1e-9)


def capped_weight(claimed: int, registry_cap: int | None, relative_cap: float | None) -> float:
    """The fold weight: ``min(claimed, registry_cap, relative_cap)`` (None = no such cap)."""
    weight = float(claimed)
    if registry_cap is not None and registry_cap < weight:
        weight = float(registry_cap)
    if relative_cap is not None:
        weight = min(weight, relative_cap)
    return weight


@dataclass(frozen=True)
class RoundBounds:
    """The limits of one round, fixed when it opens (the sharded ingest): every worker
    clips, rejects and caps with the same values, so the round's sum does not depend on
    which worker folded which update. ``norm_limit`` None = no norm bound,
    ``weight_cap`` None = no relative weight cap."""

    norm_action: str = "clip"
    norm_limit: tuple[float, str] | None = None
    weight_cap: float | None = None

    def __post_init__(self) -> None:
        if self.norm_action not in NORM_ACTIONS:
            raise ValueError(
                f"norm_action must be one of {NORM_ACTIONS}, got {self.norm_action!r}"
            )
        if self.norm_limit is not None and not (
            math.isfinite(self.norm_limit[0]) and self.norm_limit[0] >= 0
        ):
            raise ValueError(f"a norm limit must be >= 0, got {self.norm_limit[0]}")
        if self.weight_cap is not None and not (
            math.isfinite(self.weight_cap) and self.weight_cap > 0
        ):
            raise ValueError(f"a weight cap must be > 0, got {self.weight_cap}")

    def check_norm(self, norm: float) -> float:
        """:func:`clip_factor` under this round's limit."""
        return clip_factor(norm, self.norm_limit, self.norm_action)

    def weight(self, claimed: int, registry_cap: int | None = None) -> float:
        """:func:`capped_weight` under this round's relative cap."""
        return capped_weight(claimed, registry_cap, self.weight_cap)

    def to_json(self) -> str:
        return json.dumps({
            "norm_action": self.norm_action,
            "norm_limit": None if self.norm_limit is None else list(self.norm_limit),
            "weight_cap": self.weight_cap,
        })

    @classmethod
    def from_json(cls, text: str) -> RoundBounds:
        try:
            obj = json.loads(text)
            limit = obj["norm_limit"]
            cap = obj["weight_cap"]
            return cls(
                norm_action=str(obj["norm_action"]),
                norm_limit=None if limit is None else (float(limit[0]), str(limit[1])),
                weight_cap=None if cap is None else float(cap),
            )
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise StateError(f"stored round bounds are unreadable: {exc}") from exc


class _Recent:
    """The latest value per device, for the ``window`` devices seen last."""

    def __init__(self, window: int, values: Mapping[str, float] | None = None) -> None:
        self.window = window
        self._values: dict[str, float] = {}
        for device, value in (values or {}).items():
            self.put(device, value)

    def put(self, device: str, value: float) -> None:
        self._values.pop(device, None)
        self._values[device] = value
        while len(self._values) > self.window:
            del self._values[next(iter(self._values))]

    def __len__(self) -> int:
        return len(self._values)

    def median(self) -> float:
        return float(statistics.median(self._values.values()))

    def to_json(self) -> dict[str, float]:
        return dict(self._values)


class FleetBounds:
    """The norm bound and the fold weight, from the fleet's recent values; see the module."""

    def __init__(self, config: BoundsConfig, state: Mapping[str, Any] | None = None) -> None:
        self.config = config
        state = state or {}
        self._norms = _Recent(config.bounds_window, state.get("norms"))
        self._claims = _Recent(config.bounds_window, state.get("claims"))

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def from_json(cls, config: BoundsConfig, text: str | None) -> FleetBounds:
        """Rebuild from :meth:`to_json` (``None``: a fresh state directory)."""
        if text is None:
            return cls(config)
        try:
            obj = json.loads(text)
            state = {
                key: {str(d): float(v) for d, v in obj[key].items() if math.isfinite(float(v))}
                for key in ("norms", "claims")
            }
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise StateError(f"stored ingest bounds are unreadable: {exc}") from exc
        return cls(config, state)

    def to_json(self) -> str:
        return json.dumps({"norms": self._norms.to_json(), "claims": self._claims.to_json()})

    # -- the norm bound --------------------------------------------------------------------
    def norm_limit(self) -> tuple[float, str] | None:
        """The bound an update's norm must not exceed now, and how it was set (None = none)."""
        c = self.config
        if c.norm_bound == "off":
            return None
        limits: list[tuple[float, str]] = []
        if c.max_update_norm > 0:
            limits.append((c.max_update_norm, "max_update_norm"))
        if c.norm_bound == "adaptive" and len(self._norms) >= c.bounds_warmup:
            median = self._norms.median()
            limits.append((
                c.norm_multiplier * median,
                f"{c.norm_multiplier:g} x median {median:.4g} of {len(self._norms)} device(s)",
            ))
        return min(limits) if limits else None

    def check_norm(self, device: str, norm: float) -> float:
        """The factor to fold the update's delta with: 1.0 within the bound, ``bound / norm``
        over it (``norm_action = "clip"``); raise ``norm_bound`` over it with ``"reject"`` (or
        for a non-finite norm). The norm is remembered either way."""
        limit = self.norm_limit()
        if math.isfinite(norm):
            self._norms.put(device, norm)
        return clip_factor(norm, limit, self.config.norm_action)

    def observe_norm(self, device: str, norm: float) -> None:
        """Remember an accepted update's norm without checking it (re-fold after restart)."""
        if math.isfinite(norm):
            self._norms.put(device, norm)

    # -- the fold weight -------------------------------------------------------------------
    def weight(self, device: str, claimed: int, registry_cap: int | None = None) -> float:
        """The weight to fold ``device``'s update with (see the module docstring)."""
        return capped_weight(claimed, registry_cap, self.weight_cap())

    def weight_cap(self) -> float | None:
        """The relative weight cap now (None: off, or still warming up)."""
        mult = self.config.weight_cap_multiplier
        if mult > 0 and len(self._claims) >= self.config.bounds_warmup:
            return mult * self._claims.median()
        return None

    def round_bounds(self) -> RoundBounds:
        """The limits now, frozen for a round (the sharded ingest)."""
        return RoundBounds(self.config.norm_action, self.norm_limit(), self.weight_cap())

    def observe_claim(self, device: str, claimed: int) -> None:
        """Remember an accepted update's claimed ``num_examples``."""
        self._claims.put(device, float(claimed))
