"""An exact, order-free weighted sum: integer (fixed-point) accumulation of ``weight * delta``.

:class:`~fedmq.update.accumulate.WeightedSum` adds in float32, so a sum split over several
workers and merged differs from the one-process sum in the last bits. :class:`FixedPointSum`
quantizes each update ONCE (``rint(weight * delta * 2**scale_bits)`` in float64, to int64)
and adds integers, and keeps the total weight the same way: integer addition is associative,
so the result is bit-identical whatever the order of the updates, the number of partial
sums and the order they are merged in. The sharded ingest (docs/scaling.md) uses it.

Resolution: each ``weight * delta`` value is rounded to a multiple of ``2**-scale_bits``,
so the mean's absolute error is at most ``2**-(scale_bits + 1)`` per value when every weight
is at least 1 (``scale_bits`` 24: 3e-8; 3e-6 relative for a delta of 0.01). Range: the
int64 sum of each value stays below ``2**62`` (checked per update before it is added, like
the float32 overflow bound of the other accumulators): with 24 bits,
``sum(weight * |delta|) < 2.7e11``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.update.accumulate import (
    Accumulated,
    CheckedUpdate,
    Shapes,
    _ModelChecked,
    _nonneg_int,
)

__all__ = ["DEFAULT_SCALE_BITS", "FixedPointSum"]

DEFAULT_SCALE_BITS = 24
_LIMIT = float(2**62)  # headroom under int64 for the rounding of each update


class FixedPointSum(_ModelChecked):
    """Integer sum of ``rint(weight * delta * 2**scale_bits)`` and of the weights likewise;
    see the module docstring. :meth:`remove` takes back an update it added (exactly)."""

    kind = "fixed_point_sum"

    def __init__(self, template: Shapes, scale_bits: int = DEFAULT_SCALE_BITS) -> None:
        if isinstance(scale_bits, bool) or not isinstance(scale_bits, int):
            raise ValueError(f"scale_bits must be an integer, got {scale_bits!r}")
        if not 8 <= scale_bits <= 40:
            raise ValueError(f"scale_bits must be 8..40, got {scale_bits}")
        super().__init__(template)
        self.scale_bits = scale_bits
        self._scale = float(2**scale_bits)
        self._sum = {n: np.zeros(s, np.int64) for n, s in self._shapes.items()}
        self._weight_q = 0  # the total weight in the same fixed point (a Python int)
        self._scratch = {n: np.zeros(s, np.float32) for n, s in self._shapes.items()}

    # -- the range check: int64 instead of float32 ------------------------------------------
    def _check_range(self, magnitudes: Iterable[float], weight: float) -> None:
        for name, m in zip(self._shapes, magnitudes, strict=True):
            if not (self._bound[name] + m) * self._scale <= _LIMIT:  # also false for inf, nan
                raise Rejected(
                    f"tensor {name!r} with weight {weight:g} could overflow the fixed-point "
                    f"sum (2**{self.scale_bits} units per value)",
                    RejectReason.NON_FINITE,
                )

    def quantize(self, checked: CheckedUpdate) -> dict[str, np.ndarray]:
        """The int64 contribution of one checked update, its delta times its ``scale``
        (deterministic: the same update always gives the same integers)."""
        out: dict[str, np.ndarray] = {}
        for t in checked.tensors:
            buf = self._scratch[t.name]
            buf[...] = 0.0
            checked.codec.add_into(buf, t, 1.0, None)  # the decoded delta, in float32
            # ``scale``: a norm clip (accumulate.scaled) shrinks the delta, not the weight.
            scaled = buf.astype(np.float64) * (checked.weight * checked.scale * self._scale)
            out[t.name] = np.rint(scaled).astype(np.int64)
        return out

    def _weight_units(self, weight: float) -> int:
        return round(weight * self._scale)

    def _add(self, checked: CheckedUpdate) -> None:
        for name, q in self.quantize(checked).items():
            self._sum[name] += q
        self._weight_q += self._weight_units(checked.weight)

    def remove(self, checked: CheckedUpdate) -> None:
        """Take back an update :meth:`add` added (a commit that was refused): exact."""
        if checked.owner is not self:
            raise ValueError("this update was checked by another accumulator")
        if self._count < 1:
            raise ValueError("nothing to remove")
        for name, q in self.quantize(checked).items():
            self._sum[name] -= q
        self._weight_q -= self._weight_units(checked.weight)
        for name, m in zip(self._shapes, checked.magnitudes, strict=True):
            self._bound[name] = max(0.0, self._bound[name] - m)
        self._total_weight = self._weight_q / self._scale
        self._count -= 1

    @property
    def total_weight(self) -> float:
        return self._weight_q / self._scale

    def result(self) -> Accumulated:
        if self._count == 0 or self._weight_q <= 0:
            raise ValueError("no update was folded")
        # mean = (sum / 2**s) / (weight_q / 2**s) = sum / weight_q: one float64 division.
        w = float(self._weight_q)
        mean = {n: (s.astype(np.float64) / w).astype(np.float32) for n, s in self._sum.items()}
        return Accumulated(self._count, self.total_weight, mean)

    def merge(self, other: FixedPointSum) -> None:
        """Add ``other``'s partial (same model and scale): exact, in any order."""
        if type(other) is not type(self) or dict(other.shapes) != self._shapes:
            raise ValueError("only accumulators of the same kind and model merge")
        if other.scale_bits != self.scale_bits:
            raise ValueError(
                f"fixed-point scales differ: 2**{self.scale_bits} and 2**{other.scale_bits}"
            )
        self._check_range([other._bound[n] for n in self._shapes], other.total_weight or 1.0)
        for name, s in other._sum.items():
            self._sum[name] += s
        self._weight_q += other._weight_q
        self._merge_counts(other)
        self._total_weight = self._weight_q / self._scale

    def digest_sums(self) -> dict[str, np.ndarray]:
        """The integer sums (copies), e.g. for a test to compare partials exactly."""
        return {n: s.copy() for n, s in self._sum.items()}

    def to_bytes(self) -> bytes:
        obj: dict[str, Any] = self._header()
        obj.update(
            scale_bits=self.scale_bits,
            count=self._count,
            weight_q=self._weight_q,
            bound=dict(self._bound),
            sum={n: s.astype("<i8").tobytes() for n, s in self._sum.items()},
        )
        out = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def from_bytes(
        cls, data: bytes, template: Shapes, max_bytes: int = 1 << 30
    ) -> FixedPointSum:
        """Read :meth:`to_bytes` back for ``template``; :class:`WireError` when damaged."""
        obj = cls._read(data, template, max_bytes)
        scale_bits = obj.get("scale_bits")
        if isinstance(scale_bits, bool) or not isinstance(scale_bits, int):
            raise WireError("serialised fixed-point sum: scale_bits must be an integer")
        try:
            acc = cls(template, scale_bits)
        except ValueError as exc:
            raise WireError(f"serialised fixed-point sum: {exc}") from exc
        count = _nonneg_int(obj, "count")
        weight_q = _nonneg_int(obj, "weight_q")
        if (count == 0) != (weight_q == 0):
            raise WireError("serialised fixed-point sum: count and weight disagree")
        bound, raw = obj.get("bound"), obj.get("sum")
        if not isinstance(bound, dict) or set(bound) != set(acc._shapes):
            raise WireError("serialised fixed-point sum: bound must name every tensor")
        if not isinstance(raw, dict) or set(raw) != set(acc._shapes):
            raise WireError("serialised fixed-point sum: sum must hold every tensor")
        for name, shape in acc._shapes.items():
            b, blob = bound[name], raw[name]
            if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b < _LIMIT:
                raise WireError(f"serialised fixed-point sum: bad bound of {name!r}")
            size = int(np.prod(shape, dtype=np.int64))
            if not isinstance(blob, bytes) or len(blob) != 8 * size:
                raise WireError(f"serialised fixed-point sum: bad sum of {name!r}")
            sums = np.frombuffer(blob, "<i8").reshape(shape)
            # Every update adds at most weight * |delta| * 2**scale_bits + 0.5 per value, so a
            # sum beyond its bound is damage (and could wrap the int64 additions of a merge).
            top = float(np.abs(sums.astype(np.float64)).max(initial=0.0))
            if top > float(b) * acc._scale * (1 + 1e-9) + count:
                raise WireError(f"serialised fixed-point sum: sum of {name!r} exceeds its bound")
            acc._sum[name][...] = sums
            acc._bound[name] = float(b)
        acc._count, acc._weight_q = count, weight_q
        acc._total_weight = weight_q / acc._scale
        return acc
