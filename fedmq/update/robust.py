"""Robust aggregation: rules over the round's buffered updates, and the strategies using them.

Every rule here needs each update of the round, so it works over a
:class:`~fedmq.update.accumulate.BufferedUpdates` accumulator: memory O(buffer x model),
the buffer holding at most ``robust_buffer`` updates. Past that bound the accumulator
refuses the update with ``round_closed`` ("the round's update buffer is full (N updates)"),
which the device sees on its ack topic; nothing is dropped after it was acked.

- :class:`Median`: coordinate-wise median of the deltas (unweighted).
- :class:`TrimmedMean`: per coordinate, drop the ``floor(trim * n)`` smallest and largest
  values, average the rest (unweighted).
- :class:`MultiKrum`: score each update by the summed squared L2 distances to its
  ``n - f - 2`` nearest others, average (weighted by examples) the ``m`` lowest-scored.
- :class:`NormBound` (a wrapper): clip each update's delta to L2 norm ``bound`` before the
  inner strategy aggregates; ``bound`` fixed or ``multiplier x`` the median norm of this
  round's updates. It always buffers (it asks for a :class:`BufferedUpdates` when the inner
  strategy would stream a :class:`WeightedSum`), and the inner strategy gets the weighted
  mean of the clipped deltas.
- :class:`ZeroOutliers` (a wrapper): per coordinate ``j``, with ``med_j`` the median of the
  round's values and ``mad_j`` the median of ``|d_ij - med_j|``, set ``d_ij = 0`` where
  ``|d_ij - med_j| > k * mad_j``; the inner strategy gets the zeroed updates and their mean.

The server step of the three aggregators is ``w + server_lr * aggregate`` (default 1).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedmq.update.accumulate import (
    Accumulated,
    Accumulator,
    BufferedUpdates,
    WeightedDelta,
    Weights,
)
from fedmq.update.strategies import (
    Strategy,
    StrategyOptions,
    StrategyWrapper,
    register_strategy_with_options,
)
from fedmq.wire import TrainingConfig

__all__ = [
    "BufferedStrategy",
    "Median",
    "MultiKrum",
    "NormBound",
    "TrimmedMean",
    "ZeroOutliers",
    "buffered_updates",
    "clip_to_norm",
    "coordinate_median",
    "krum_select",
    "trimmed_mean",
    "update_norm",
    "weighted_mean",
    "zero_outliers",
]

log = logging.getLogger(__name__)

Shapes = Mapping[str, tuple[int, ...]]


# -- the rules ---------------------------------------------------------------------------------
def buffered_updates(result: Accumulated, who: str) -> tuple[WeightedDelta, ...]:
    """The decoded updates of ``result``; ValueError when its accumulator did not keep them."""
    if result.updates is None:
        raise ValueError(f"{who} needs every update of the round (a BufferedUpdates accumulator)")
    if not result.updates:
        raise ValueError(f"{who}: the round has no update")
    return result.updates


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of a delta over all its tensors (accumulated in float64)."""
    return math.sqrt(sum(float(np.square(d, dtype=np.float64).sum()) for d in delta.values()))


def weighted_mean(updates: Sequence[WeightedDelta]) -> Weights:
    """``sum(weight * delta) / sum(weight)`` in float32, in the order given."""
    names = list(updates[0].delta)
    total = sum(u.weight for u in updates)
    sums = {n: np.zeros_like(updates[0].delta[n], np.float32) for n in names}
    for u in updates:
        for n in names:
            sums[n] += np.float32(u.weight) * u.delta[n]
    inv = np.float32(1.0 / total)
    return {n: s * inv for n, s in sums.items()}


def _stack(updates: Sequence[WeightedDelta], name: str) -> np.ndarray:
    return np.stack([np.asarray(u.delta[name], np.float32) for u in updates])


def coordinate_median(updates: Sequence[WeightedDelta]) -> Weights:
    """Per coordinate, the median over updates (the mean of the two middle ones for even n)."""
    return {
        n: np.median(_stack(updates, n), axis=0).astype(np.float32) for n in updates[0].delta
    }


def trimmed_mean(updates: Sequence[WeightedDelta], trim: float) -> Weights:
    """Per coordinate, the mean of the values left once the ``floor(trim * n)`` smallest and
    as many largest are dropped."""
    n = len(updates)
    k = math.floor(trim * n)
    out: Weights = {}
    for name in updates[0].delta:
        kept = np.sort(_stack(updates, name), axis=0)[k : n - k]
        out[name] = (kept.sum(axis=0, dtype=np.float64) / (n - 2 * k)).astype(np.float32)
    return out


def krum_select(updates: Sequence[WeightedDelta], f: int, m: int) -> list[int]:
    """Multi-Krum (Blanchard et al. 2017): indices of the ``m`` updates with the lowest score,
    a score being the sum of squared L2 distances to the ``n - f - 2`` nearest other updates
    (ties: the earlier update). Needs ``n >= 2f + 3`` and ``1 <= m <= n``."""
    n = len(updates)
    if n < 2 * f + 3:
        raise ValueError(f"Krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    if not 1 <= m <= n:
        raise ValueError(f"Krum selects 1..{n} updates, asked for {m}")
    flat = np.stack(
        [np.concatenate([np.ravel(u.delta[k]) for k in updates[0].delta]) for u in updates]
    ).astype(np.float64)
    sq = np.square(flat).sum(axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    scores = []
    for i in range(n):
        others = np.delete(dist[i], i)
        scores.append(float(np.sort(others)[: n - f - 2].sum()))
    return sorted(int(i) for i in np.argsort(np.array(scores), kind="stable")[:m])


def clip_to_norm(
    updates: Sequence[WeightedDelta], bound: float
) -> tuple[tuple[WeightedDelta, ...], int]:
    """Each delta scaled to L2 norm ``bound`` when above it; (updates, how many clipped)."""
    out, clipped = [], 0
    for u in updates:
        norm = update_norm(u.delta)
        if norm > bound:
            factor = np.float32(bound / norm)
            out.append(WeightedDelta({n: d * factor for n, d in u.delta.items()}, u.weight))
            clipped += 1
        else:
            out.append(u)
    return tuple(out), clipped


def zero_outliers(
    updates: Sequence[WeightedDelta], k: float
) -> tuple[tuple[WeightedDelta, ...], int]:
    """Coordinates with ``|d - median| > k * MAD`` (per coordinate, over the updates) set to
    0; (updates, how many values were zeroed)."""
    zeroed: list[Weights] = [{} for _ in updates]
    count = 0
    for name in updates[0].delta:
        stack = _stack(updates, name)
        med = np.median(stack, axis=0)
        dev = np.abs(stack - med)
        mad = np.median(dev, axis=0)
        mask = dev > np.float32(k) * mad
        count += int(mask.sum())
        cleaned = np.where(mask, np.float32(0), stack).astype(np.float32)
        for i in range(len(updates)):
            zeroed[i][name] = cleaned[i]
    return tuple(WeightedDelta(z, u.weight) for z, u in zip(zeroed, updates, strict=True)), count


# -- strategies --------------------------------------------------------------------------------
@dataclass
class BufferedStrategy:
    """Base of the robust aggregators: a bounded buffer, ``w + server_lr * combine(updates)``,
    no server state."""

    capacity: int = 64
    server_lr: float = 1.0
    name: str = "buffered"

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        return base

    def new_accumulator(self, shapes: Shapes) -> Accumulator:
        return BufferedUpdates(shapes, self.capacity)

    def combine(self, updates: Sequence[WeightedDelta]) -> Weights:
        raise NotImplementedError

    def aggregate(self, global_weights: Mapping[str, np.ndarray], result: Accumulated) -> Weights:
        delta = self.combine(buffered_updates(result, self.name))
        lr = np.float32(self.server_lr)
        return {n: (global_weights[n] + lr * d).astype(np.float32) for n, d in delta.items()}

    def state(self) -> Weights:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


@dataclass
class Median(BufferedStrategy):
    """Coordinate-wise median (Yin et al. 2018)."""

    name: str = "median"

    def combine(self, updates: Sequence[WeightedDelta]) -> Weights:
        return coordinate_median(updates)


@dataclass
class TrimmedMean(BufferedStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018), ``trim`` in [0, 0.5) each side."""

    trim: float = 0.1
    name: str = "trimmed_mean"

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {self.trim}")

    def combine(self, updates: Sequence[WeightedDelta]) -> Weights:
        return trimmed_mean(updates, self.trim)


@dataclass
class MultiKrum(BufferedStrategy):
    """Multi-Krum: the weighted mean of the ``m`` updates :func:`krum_select` keeps
    (``m = 0``: ``n - f``; ``m = 1`` is Krum)."""

    f: int = 1
    m: int = 0
    name: str = "krum"

    def combine(self, updates: Sequence[WeightedDelta]) -> Weights:
        m = self.m or len(updates) - self.f
        chosen = krum_select(updates, self.f, m)
        log.info("krum: kept updates %s of %d", chosen, len(updates))
        return weighted_mean([updates[i] for i in chosen])


class _BufferingWrapper(StrategyWrapper):
    """A wrapper that rewrites each buffered update before the inner strategy aggregates."""

    def __init__(self, inner: Strategy, capacity: int) -> None:
        super().__init__(inner)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity

    def new_accumulator(self, shapes: Shapes) -> Accumulator:
        acc = self.inner.new_accumulator(shapes)
        return acc if isinstance(acc, BufferedUpdates) else BufferedUpdates(shapes, self.capacity)

    def rewrite(self, updates: Sequence[WeightedDelta]) -> tuple[WeightedDelta, ...]:
        raise NotImplementedError

    def aggregate(self, global_weights: Mapping[str, np.ndarray], result: Accumulated) -> Weights:
        updates = self.rewrite(buffered_updates(result, self.name))
        return self.inner.aggregate(
            global_weights,
            Accumulated(result.count, result.total_weight, weighted_mean(updates), updates),
        )


class NormBound(_BufferingWrapper):
    """Clips each update's delta to L2 norm ``fixed``, or (``fixed`` None) to ``multiplier``
    times the median norm of the round's updates."""

    def __init__(
        self, inner: Strategy, *, fixed: float | None, multiplier: float = 1.0,
        capacity: int = 64,
    ) -> None:
        super().__init__(inner, capacity)
        if fixed is not None and not (math.isfinite(fixed) and fixed > 0):
            raise ValueError(f"a fixed norm bound must be > 0, got {fixed}")
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise ValueError(f"multiplier must be > 0, got {multiplier}")
        self.fixed, self.multiplier = fixed, multiplier

    def bound(self, updates: Sequence[WeightedDelta]) -> float:
        if self.fixed is not None:
            return self.fixed
        return self.multiplier * statistics.median(update_norm(u.delta) for u in updates)

    def rewrite(self, updates: Sequence[WeightedDelta]) -> tuple[WeightedDelta, ...]:
        bound = self.bound(updates)
        if bound <= 0:  # every update (or the median one) is zero: nothing to scale
            return tuple(updates)
        out, clipped = clip_to_norm(updates, bound)
        if clipped:
            log.info("norm bound %.6g: clipped %d of %d updates", bound, clipped, len(updates))
        return out


class ZeroOutliers(_BufferingWrapper):
    """Zeroes coordinates more than ``k`` median absolute deviations from the median."""

    def __init__(self, inner: Strategy, k: float, capacity: int = 64) -> None:
        super().__init__(inner, capacity)
        if not (math.isfinite(k) and k > 0):
            raise ValueError(f"k must be > 0, got {k}")
        self.k = k

    def rewrite(self, updates: Sequence[WeightedDelta]) -> tuple[WeightedDelta, ...]:
        out, zeroed = zero_outliers(updates, self.k)
        if zeroed:
            log.info("outlier zeroing (k=%g): zeroed %d values over %d updates",
                     self.k, zeroed, len(updates))
        return out


def _lr(options: StrategyOptions) -> float:
    return 1.0 if options.server_lr is None else options.server_lr


register_strategy_with_options(
    "median", lambda o: Median(capacity=o.robust_buffer, server_lr=_lr(o))
)
register_strategy_with_options(
    "trimmed_mean",
    lambda o: TrimmedMean(capacity=o.robust_buffer, server_lr=_lr(o), trim=o.trim),
)
register_strategy_with_options(
    "krum",
    lambda o: MultiKrum(capacity=o.robust_buffer, server_lr=_lr(o), f=o.krum_f, m=o.krum_m),
)
