"""FedNova's streaming accumulator: normalized averaging in O(model) memory.

FedNova (Wang et al. 2020, the FedAvg-with-SGD case) steps by
``tau_eff * sum_i p_i d_i / tau_i`` with ``p_i = n_i / sum_j n_j`` and
``tau_eff = sum_i p_i tau_i`` (``d_i``: device i's delta, ``n_i``: its weight, ``tau_i``:
its local SGD steps). Expanding ``p_i`` gives

    step = (sum_i n_i tau_i / W) * (sum_i (n_i / tau_i) d_i) / W,   W = sum_i n_i

so three running sums suffice: the tensor sum ``S = sum (n_i / tau_i) d_i`` (a
:class:`~fedmq.update.accumulate.WeightedSum` folded with weight ``n_i / tau_i``) and two
scalars, ``W`` and ``T = sum n_i tau_i``. Nothing is buffered; the result equals
:func:`fedmq.update.strategies.fednova_delta` within float32 rounding of the sum.

The ingest hands the step count with each update (:func:`check_update`,
:func:`fold_update`); an update without one is refused for a FedNova round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update.accumulate import (
    Accumulated,
    Accumulator,
    CheckedUpdate,
    Shapes,
    WeightedSum,
    _nonneg_float,
    scaled,
)

__all__ = ["NormalizedSum", "StepsChecked", "check_update", "fold_update"]

_MAX_STEPS = 10**9


@dataclass(frozen=True)
class StepsChecked(CheckedUpdate):
    """A checked update of a :class:`NormalizedSum`: ``weight`` is the example weight
    ``n_i`` (what the journal records), ``steps`` its ``tau_i``; the tensors are folded with
    ``n_i / tau_i`` (the ``magnitudes`` are for that weight)."""

    steps: int = 1


class NormalizedSum(WeightedSum):
    """The sums of FedNova's normalized update; see the module docstring."""

    kind = "normalized_sum"

    def __init__(self, template: Shapes) -> None:
        super().__init__(template)
        self._weighted_steps = 0.0  # T = sum n_i tau_i

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate:
        raise Rejected(
            "a FedNova round needs the update's local step count ('steps')",
            RejectReason.MALFORMED,
        )

    def check_steps(
        self, tensors: Iterable[Tensor], codec: str, weight: float, steps: int
    ) -> StepsChecked:
        """Check an update of example weight ``weight`` that took ``steps`` local steps."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= _MAX_STEPS:
            raise Rejected(
                "a FedNova round needs the update's local step count ('steps' >= 1), got "
                f"{steps!r}",
                RejectReason.MALFORMED,
            )
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        inner = super().check(tensors, codec, weight / steps)
        return StepsChecked(
            inner.tensors, inner.codec, float(weight), inner.magnitudes, self, steps=steps
        )

    def add(self, checked: CheckedUpdate) -> None:
        if not isinstance(checked, StepsChecked) or checked.owner is not self:
            raise ValueError("this update was not checked by this NormalizedSum")
        self._check_range(checked.magnitudes, checked.weight)
        self._add(checked)
        for name, m in zip(self._shapes, checked.magnitudes, strict=True):
            self._bound[name] += m
        self._total_weight += checked.weight
        self._weighted_steps += checked.weight * checked.steps
        self._count += 1

    def _add(self, checked: CheckedUpdate) -> None:
        assert isinstance(checked, StepsChecked)
        fold_weight = checked.weight / checked.steps * checked.scale
        for t in checked.tensors:
            checked.codec.add_into(self._sum[t.name], t, fold_weight, self._scratch[t.name])

    def fold_steps(self, tensors: Iterable[Tensor], codec: str, weight: float, steps: int) -> None:
        self.add(self.check_steps(tensors, codec, weight, steps))

    @property
    def tau_eff(self) -> float:
        """``sum_i p_i tau_i`` of the updates folded so far."""
        if self._total_weight <= 0:
            raise ValueError("no update was folded")
        return self._weighted_steps / self._total_weight

    def result(self) -> Accumulated:
        if self._count == 0 or self._total_weight <= 0:
            raise ValueError("no update was folded")
        w = self._total_weight
        scale = np.float32(self._weighted_steps / (w * w))  # tau_eff / W
        step = {n: (s * scale).astype(np.float32) for n, s in self._sum.items()}
        return Accumulated(self._count, w, step)

    def merge(self, other: Any) -> None:
        super().merge(other)
        self._weighted_steps += other._weighted_steps

    def to_bytes(self) -> bytes:
        obj = msgpack.unpackb(super().to_bytes(), raw=False)
        obj["weighted_steps"] = self._weighted_steps
        out = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def from_bytes(
        cls, data: bytes, template: Shapes, max_bytes: int = 1 << 30
    ) -> NormalizedSum:
        acc = super().from_bytes(data, template, max_bytes)
        assert isinstance(acc, NormalizedSum)
        obj = cls._read(data, template, max_bytes)
        steps = _nonneg_float(obj.get("weighted_steps"), "weighted_steps")
        if (acc.count == 0) != (steps == 0) or steps < acc.total_weight:
            raise WireError("serialised accumulator: weighted_steps disagrees with the weight")
        acc._weighted_steps = steps
        return acc


def check_update(
    fold: Accumulator, tensors: Iterable[Tensor], codec: str, weight: float, steps: int
) -> CheckedUpdate:
    """``fold.check`` for an update reporting ``steps`` (0 = none); a :class:`NormalizedSum`
    takes the steps, every other accumulator ignores them."""
    if isinstance(fold, NormalizedSum):
        return fold.check_steps(tensors, codec, weight, steps)
    return fold.check(tensors, codec, weight)


def fold_update(
    fold: Accumulator,
    tensors: Iterable[Tensor],
    codec: str,
    weight: float,
    steps: int,
    scale: float = 1.0,
) -> None:
    """``fold.fold`` with the update's ``steps`` (as :func:`check_update`), its decoded delta
    times ``scale`` (a norm clip, :func:`~fedmq.update.accumulate.scaled`)."""
    fold.add(scaled(check_update(fold, tensors, codec, weight, steps), scale))
