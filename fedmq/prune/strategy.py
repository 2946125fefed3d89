"""The server side of pruning: the schedule, the strategy wrapper that owns the mask, and the
accumulator that folds masked updates (docs/pruning.md).

:class:`PruneStrategy` wraps the configured strategy. It tells devices to send the masked
codec (int8 -> ``masked-int8``, float16 -> ``masked-f16``), folds their updates through
:class:`MaskedFold`, and after each aggregation sets every pruned weight to exactly 0 (server
momentum or an adaptive optimiser cannot revive one). Every ``every`` aggregations while the
schedule ramps up, it re-chooses the mask by magnitude at the sparsity of
:meth:`PruneSchedule.sparsity_at` (Zhu & Gupta's cubic ramp ``s_t = s_f (1 - (1 - t/T)^3)``),
so the model it publishes and the mask of the next round agree. The mask and the step count
are part of the strategy state, saved with each model version: a restart announces the same
mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import ConfigError, Rejected, RejectReason
from fedmq.prune.mask import PruneMask, decode_mask, magnitude_mask
from fedmq.tensor import Tensor
from fedmq.update.accumulate import Accumulated, Accumulator, CheckedUpdate, Weights
from fedmq.update.codecs import get_codec
from fedmq.update.codecs.masked import MaskedCodec, masked_codec_for
from fedmq.update.strategies import Strategy, StrategyWrapper
from fedmq.wire import TrainingConfig

__all__ = [
    "MaskedFold",
    "PruneSchedule",
    "PruneStrategy",
    "check_prune_settings",
    "prunable_tensors",
    "with_pruning",
]

log = logging.getLogger(__name__)

_UNPRUNABLE = ("fedprox", "fedsgd")  # their rounds use train_prox / gradient, not the mask
_STEP = "prune/step"
_MASK = "prune/mask"


@dataclass(frozen=True)
class PruneSchedule:
    """``target``: final sparsity of the pruned tensors (0 = off); reached after
    ``schedule_rounds`` aggregations along a cubic ramp; the mask is re-chosen every
    ``every`` aggregations (and at ``schedule_rounds``), then kept."""

    target: float = 0.0
    schedule_rounds: int = 10
    every: int = 2

    def __post_init__(self) -> None:
        if not (isinstance(self.target, int | float) and 0.0 <= self.target <= 0.99):
            raise ConfigError(f"prune_target must be in [0, 0.99], got {self.target!r}")
        for key, value in (("prune_schedule_rounds", self.schedule_rounds),
                           ("prune_every", self.every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")

    @property
    def enabled(self) -> bool:
        return self.target > 0.0

    def sparsity_at(self, step: int) -> float:
        """The sparsity after ``step`` aggregations (0 at step 0, ``target`` from
        ``schedule_rounds`` on)."""
        t = min(max(step, 0), self.schedule_rounds) / self.schedule_rounds
        return float(self.target * (1.0 - (1.0 - t) ** 3))

    def due(self, step: int) -> bool:
        """Whether the mask is re-chosen after aggregation ``step`` (1, 2, ...)."""
        return 1 <= step <= self.schedule_rounds and (
            step % self.every == 0 or step == self.schedule_rounds
        )


def check_prune_settings(
    schedule: PruneSchedule, codec: str, strategy: str, dp: bool
) -> None:
    """Raise :class:`ConfigError` unless the aggregator's settings can run pruned rounds
    (or, pruning off, do not ask for a masked codec by hand)."""
    if not schedule.enabled:
        if isinstance(get_codec(codec), MaskedCodec):
            raise ConfigError(
                f"codec {codec} is what pruned rounds send: set prune_target (and codec int8 "
                "or float16) instead"
            )
        return
    try:
        masked_codec_for(codec)
    except ValueError as exc:
        raise ConfigError(f"prune_target > 0: {exc}") from None
    if dp:
        raise ConfigError("prune_target > 0 with dp is not supported (DP clips dense updates)")
    if strategy in _UNPRUNABLE:
        raise ConfigError(
            f"prune_target > 0 with strategy {strategy!r} is not supported: the device trains "
            "pruned rounds with the masked train step; use fedavg, fedavgm, fedadam, ..."
        )


def with_pruning(
    strategy: Strategy, schedule: PruneSchedule, shapes: Mapping[str, tuple[int, ...]]
) -> Strategy:
    """``strategy`` wrapped in :class:`PruneStrategy` when pruning is on, else itself."""
    return PruneStrategy(strategy, schedule, shapes) if schedule.enabled else strategy


def prunable_tensors(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
    """The tensors pruning applies to: kernels (2 or more dimensions); biases and
    normalisation vectors stay whole (few values, large effect)."""
    return tuple(n for n, s in shapes.items() if len(s) >= 2 and math.prod(s) > 0)


class MaskedFold:
    """An accumulator for a pruned round: checks each masked update against the round's mask
    (mask id, value count per tensor) and scatters it into the inner accumulator as the dense
    codec's tensors (zeros at the pruned positions), which the inner one checks and folds."""

    def __init__(self, inner: Accumulator, mask: PruneMask) -> None:
        self.inner = inner
        self.mask = mask
        self._bound: dict[str, MaskedCodec] = {}  # the masked codecs bound to the mask

    @property
    def count(self) -> int:
        return self.inner.count

    @property
    def total_weight(self) -> float:
        return self.inner.total_weight

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self.inner.shapes

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate:
        impl = get_codec(codec)
        if not isinstance(impl, MaskedCodec):
            raise Rejected(
                f"this round is pruned: updates are masked-int8 or masked-f16, not {codec}",
                RejectReason.BAD_CODEC,
            )
        bound = self._bound.get(codec)
        if bound is None:
            bound = self._bound[codec] = impl.with_mask(self.mask)
        shapes = self.shapes
        dense: list[Tensor] = []
        for t in tensors:
            shape = shapes.get(t.name)
            if shape is None:
                raise Rejected(f"unknown tensor {t.name!r}", RejectReason.SHAPE)
            bound.validate(t, shape)
            dense.append(bound.dense(t))
        return self.inner.check(dense, bound.dense_name, weight)

    def add(self, checked: CheckedUpdate) -> None:
        self.inner.add(checked)

    def fold(self, tensors: Iterable[Tensor], codec: str, weight: float) -> None:
        self.add(self.check(tensors, codec, weight))

    def result(self) -> Accumulated:
        return self.inner.result()

    def merge(self, other: Any) -> None:
        self.inner.merge(other.inner if isinstance(other, MaskedFold) else other)

    def to_bytes(self) -> bytes:
        return self.inner.to_bytes()


class PruneStrategy(StrategyWrapper):
    """Magnitude pruning around ``inner``; see the module docstring."""

    def __init__(
        self, inner: Strategy, schedule: PruneSchedule, shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        if not schedule.enabled:
            raise ConfigError("PruneStrategy needs prune_target > 0")
        super().__init__(inner)
        self.schedule = schedule
        self.shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        self.prunable = prunable_tensors(self.shapes)
        if not self.prunable:
            raise ConfigError("prune_target > 0 but the model has no kernel (2-D or more) "
                              "to prune")
        self.mask = PruneMask()
        self.step = 0
        self._mask_bytes = self.mask.encode()

    @property
    def name(self) -> str:
        return f"prune({self.inner.name})"

    @property
    def mask_bytes(self) -> bytes:
        """The current mask's encoding (what the round announcement carries)."""
        return self._mask_bytes

    @property
    def sparsity(self) -> float:
        """Fraction of all trainable weights the current mask prunes."""
        return self.mask.sparsity(self.shapes)

    def _set_mask(self, mask: PruneMask) -> None:
        self.mask = mask
        self._mask_bytes = mask.encode()

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        cfg = self.inner.configure(round_id, base)
        try:
            codec = masked_codec_for(cfg.codec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return TrainingConfig(**{**cfg.to_dict(), "codec": codec})

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return MaskedFold(self.inner.new_accumulator(shapes), self.mask)

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights:
        new = self.mask.apply(self.inner.aggregate(global_weights, result))
        self.step += 1
        if self.schedule.due(self.step):
            target = self.schedule.sparsity_at(self.step)
            current = self.mask.sparsity({n: self.shapes[n] for n in self.prunable})
            if target > current:
                self._set_mask(magnitude_mask(new, target, self.prunable))
                new = self.mask.apply(new)
                log.info(
                    "pruning: mask %08x chosen after aggregation %d: %.1f%% of the kernels "
                    "pruned (%.1f%% of all weights; target %.1f%% after %d)",
                    self.mask.mask_id, self.step, 100 * target, 100 * self.sparsity,
                    100 * self.schedule.target, self.schedule.schedule_rounds,
                )
        return new

    def state(self) -> Weights:
        return {
            **self.inner.state(),
            _STEP: np.array([self.step], np.int64),
            _MASK: np.frombuffer(self._mask_bytes, np.uint8).copy(),
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state({k: v for k, v in state.items() if not k.startswith("prune/")})
        step, mask = state.get(_STEP), state.get(_MASK)
        self.step = 0 if step is None else int(np.asarray(step).reshape(-1)[0])
        if mask is None:
            self._set_mask(PruneMask())
            return
        decoded = decode_mask(np.asarray(mask, np.uint8).tobytes(), self.shapes)
        if set(decoded.kept) - set(self.prunable):
            raise ConfigError("the stored pruning mask prunes tensors that are not kernels")
        self._set_mask(decoded)
