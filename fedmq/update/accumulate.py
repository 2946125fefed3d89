"""Accumulators: the seam between ingest (updates as they arrive) and the strategy.

An accumulator checks an update against the model ONCE (:meth:`Accumulator.check`: tensor
names and shapes through the codec, and that it cannot overflow the float32 sum), adds the
checked update without re-checking (:meth:`Accumulator.add`), counts updates and weight,
produces the :class:`Accumulated` result a strategy consumes, merges with another
accumulator of the same kind (partial sums of several workers) and serialises itself
(:meth:`Accumulator.to_bytes`, ``from_bytes`` bounded and validated).

- :class:`WeightedSum` (the default): the running sum of ``weight * delta``; memory is
  O(model), each update is added and dropped.
- :class:`BufferedUpdates`: a bounded buffer of checked updates, O(buffer x model), for
  strategies that need every update (median, trimmed mean, Krum). A full buffer refuses the
  update (``round_closed``).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import numpy as np

from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.tensor import Tensor, tensor_from_map
from fedmq.update.codecs import Codec, get_codec

__all__ = [
    "Accumulated",
    "Accumulator",
    "BufferedUpdates",
    "CheckedUpdate",
    "WeightedDelta",
    "WeightedSum",
    "Weights",
    "scaled",
]

Weights = dict[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]
_F32_MAX = float(np.finfo(np.float32).max)
_FORMAT = 1


@dataclass(frozen=True)
class CheckedUpdate:
    """An update one accumulator checked: its tensors in model order, codec, weight and the
    per-tensor ``weight * scale * bound`` magnitudes. Only that accumulator adds it.

    ``scale`` (<= 1, see :func:`scaled`) multiplies the decoded delta, not the weight: the
    update counts with its full weight in the total but its delta is shrunk (a norm clip).
    """

    tensors: tuple[Tensor, ...]
    codec: Codec
    weight: float
    magnitudes: tuple[float, ...]
    owner: object = field(repr=False, compare=False)
    scale: float = 1.0


def scaled(checked: CheckedUpdate, factor: float) -> CheckedUpdate:
    """``checked`` with its decoded delta to be folded times ``factor`` (0 < factor <= 1):
    a clip applied inside the codec's fold, O(model) memory, any codec (sparse included)."""
    if factor == 1.0:
        return checked
    if not (math.isfinite(factor) and 0 < factor <= 1):
        raise ValueError(f"a delta scale must be in (0, 1], got {factor}")
    return dataclasses.replace(
        checked,
        scale=checked.scale * factor,
        magnitudes=tuple(m * factor for m in checked.magnitudes),
    )


@dataclass(frozen=True)
class WeightedDelta:
    """One decoded update (float32 delta) and its weight."""

    delta: Weights
    weight: float


@dataclass(frozen=True)
class Accumulated:
    """What a strategy aggregates: the participant ``count``, ``total_weight``, the weighted
    ``mean`` delta, and every decoded update when the accumulator keeps them (else None)."""

    count: int
    total_weight: float
    mean: Weights
    updates: tuple[WeightedDelta, ...] | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or not (math.isfinite(self.total_weight) and self.total_weight > 0):
            raise ValueError("an accumulated result needs at least one update of positive weight")


class Accumulator(Protocol):
    """Between ingest and strategy; see the module docstring."""

    @property
    def shapes(self) -> Shapes: ...

    @property
    def count(self) -> int: ...

    @property
    def total_weight(self) -> float: ...

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate: ...

    def add(self, checked: CheckedUpdate) -> None: ...

    def fold(self, tensors: Iterable[Tensor], codec: str, weight: float) -> None: ...

    def result(self) -> Accumulated: ...

    def merge(self, other: Any) -> None: ...

    def to_bytes(self) -> bytes: ...


class _ModelChecked(ABC):
    """The one model check and float32 overflow bound shared by the accumulators."""

    kind: str

    def __init__(self, template: Shapes) -> None:
        if not template:
            raise ValueError("template must name at least one tensor")
        self._shapes = {name: tuple(int(d) for d in shape) for name, shape in template.items()}
        # Per tensor, an upper bound of max|sum| (sum of weight * bound of the updates added):
        # an update that could push the float32 sum to infinity is refused before it is added.
        self._bound = dict.fromkeys(self._shapes, 0.0)
        self._count = 0
        self._total_weight = 0.0

    @property
    def shapes(self) -> Shapes:
        return self._shapes

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate:
        """Raise :class:`Rejected` unless ``tensors`` encode the model exactly with ``codec``
        and, added with ``weight``, cannot overflow the float32 sum; the checked update."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        c = get_codec(codec)
        by_name: dict[str, Tensor] = {}
        for t in tensors:
            shape = self._shapes.get(t.name)
            if shape is None:
                raise Rejected(f"unknown tensor {t.name!r}", RejectReason.SHAPE)
            if t.name in by_name:
                raise Rejected(f"tensor {t.name!r} appears twice", RejectReason.SHAPE)
            c.validate(t, shape)
            by_name[t.name] = t
        missing = set(self._shapes) - set(by_name)
        if missing:
            raise Rejected(f"missing tensors {sorted(missing)}", RejectReason.SHAPE)
        ordered = tuple(by_name[n] for n in self._shapes)
        magnitudes = tuple(float(weight) * c.bound(t) for t in ordered)
        self._check_range(magnitudes, weight)
        self._check_room()
        return CheckedUpdate(ordered, c, float(weight), magnitudes, self)

    def _check_range(self, magnitudes: Iterable[float], weight: float) -> None:
        for name, m in zip(self._shapes, magnitudes, strict=True):
            if not self._bound[name] + m <= _F32_MAX:  # also false for inf and nan
                raise Rejected(
                    f"tensor {name!r} with weight {weight:g} could overflow the float32 sum",
                    RejectReason.NON_FINITE,
                )

    def _check_room(self) -> None:  # noqa: B027 - optional hook, a no-op when unbounded
        """Raise when the accumulator cannot take one more update (bounded kinds)."""

    def add(self, checked: CheckedUpdate) -> None:
        """Add an update :meth:`check` returned; only the (cheap) overflow bound is re-tested,
        in case other updates were added since the check."""
        if checked.owner is not self:
            raise ValueError("this update was checked by another accumulator")
        self._check_range(checked.magnitudes, checked.weight)
        self._check_room()
        self._add(checked)
        for name, m in zip(self._shapes, checked.magnitudes, strict=True):
            self._bound[name] += m
        self._total_weight += checked.weight
        self._count += 1

    def fold(self, tensors: Iterable[Tensor], codec: str, weight: float) -> None:
        """:meth:`check` then :meth:`add`."""
        self.add(self.check(tensors, codec, weight))

    def mean(self) -> Weights:
        """The weighted mean delta (``result().mean``)."""
        return self.result().mean

    def _merge_common(self, other: _ModelChecked) -> None:
        if type(other) is not type(self) or dict(other.shapes) != self._shapes:
            raise ValueError("only accumulators of the same kind and model merge")
        for name in self._shapes:
            if not self._bound[name] + other._bound[name] <= _F32_MAX:
                raise Rejected(
                    f"tensor {name!r}: merged sums could overflow float32",
                    RejectReason.NON_FINITE,
                )

    def _merge_counts(self, other: _ModelChecked) -> None:
        for name in self._shapes:
            self._bound[name] += other._bound[name]
        self._count += other._count
        self._total_weight += other._total_weight

    @abstractmethod
    def _add(self, checked: CheckedUpdate) -> None: ...

    @abstractmethod
    def result(self) -> Accumulated: ...

    @abstractmethod
    def to_bytes(self) -> bytes: ...

    def _header(self) -> dict[str, Any]:
        return {
            "accumulator": self.kind,
            "format": _FORMAT,
            "shapes": {n: list(s) for n, s in self._shapes.items()},
        }

    @classmethod
    def _read(
        cls, data: bytes, template: Shapes, max_bytes: int
    ) -> dict[str, Any]:
        if not isinstance(data, bytes) or len(data) > max_bytes:
            raise WireError(f"serialised accumulator is not bytes of at most {max_bytes}")
        try:
            obj = msgpack.unpackb(
                data, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=max_bytes
            )
        except Exception as exc:  # msgpack raises several types on garbage
            raise WireError(f"serialised accumulator is not msgpack: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("accumulator") != cls.kind:
            raise WireError(f"not a serialised {cls.kind} accumulator")
        if obj.get("format") != _FORMAT:
            raise WireError(f"unsupported {cls.kind} format {obj.get('format')!r}")
        shapes = obj.get("shapes")
        expected = {n: list(s) for n, s in template.items()}
        if shapes != expected:
            raise WireError(f"serialised {cls.kind} is for tensors {shapes}, not {expected}")
        return obj


def _nonneg_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WireError(f"serialised accumulator: {key!r} must be an integer >= 0")
    return value


def _nonneg_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireError(f"serialised accumulator: {what} must be a number")
    out = float(value)
    if not (math.isfinite(out) and 0 <= out <= _F32_MAX):
        raise WireError(f"serialised accumulator: {what} must be finite and >= 0")
    return out


class WeightedSum(_ModelChecked):
    """Sum over updates of ``weight * delta`` plus the total weight, added one at a time.

    :meth:`merge` adds another sum: equal to one accumulator fed every update whenever the
    float32 additions are exact (otherwise within float32 rounding of the reordered sum).
    """

    kind = "weighted_sum"

    def __init__(self, template: Shapes) -> None:
        super().__init__(template)
        self._sum = {n: np.zeros(s, np.float32) for n, s in self._shapes.items()}
        self._scratch = {n: np.empty(s, np.float32) for n, s in self._shapes.items()}

    def _add(self, checked: CheckedUpdate) -> None:
        for t in checked.tensors:
            checked.codec.add_into(
                self._sum[t.name], t, checked.weight * checked.scale, self._scratch[t.name]
            )

    def result(self) -> Accumulated:
        if self._count == 0 or self._total_weight <= 0:
            raise ValueError("no update was folded")
        inv = np.float32(1.0 / self._total_weight)
        mean = {n: s * inv for n, s in self._sum.items()}
        return Accumulated(self._count, self._total_weight, mean)

    def merge(self, other: WeightedSum) -> None:
        """Add ``other``'s partial sum (same model) into this one."""
        self._merge_common(other)
        for name, s in other._sum.items():
            self._sum[name] += s
        self._merge_counts(other)

    def to_bytes(self) -> bytes:
        obj = self._header()
        obj.update(
            count=self._count,
            total_weight=self._total_weight,
            bound=dict(self._bound),
            sum=[Tensor.from_array(n, s).to_map() for n, s in self._sum.items()],
        )
        out = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def from_bytes(
        cls, data: bytes, template: Shapes, max_bytes: int = 1 << 30
    ) -> WeightedSum:
        """Read :meth:`to_bytes` back for ``template``; :class:`WireError` when damaged."""
        obj = cls._read(data, template, max_bytes)
        acc = cls(template)
        count = _nonneg_int(obj, "count")
        total = _nonneg_float(obj.get("total_weight"), "total_weight")
        if (count == 0) != (total == 0):
            raise WireError("serialised accumulator: count and total_weight disagree")
        bound = obj.get("bound")
        if not isinstance(bound, dict) or set(bound) != set(acc._shapes):
            raise WireError("serialised accumulator: bound must name every tensor")
        raw = obj.get("sum")
        if not isinstance(raw, list) or len(raw) != len(acc._shapes):
            raise WireError("serialised accumulator: sum must hold every tensor")
        for item in raw:
            t = tensor_from_map(item, max_bytes)
            shape = acc._shapes.get(t.name)
            if shape is None or t.dtype != "float32" or t.shape != shape or not t.dense:
                raise WireError(f"serialised accumulator: bad sum tensor {t.name!r}")
            b = _nonneg_float(bound[t.name], f"bound of {t.name!r}")
            arr = t.array()
            if arr.size and float(np.abs(arr).max()) > b:
                raise WireError(f"serialised accumulator: sum of {t.name!r} exceeds its bound")
            acc._sum[t.name][...] = arr
            acc._bound[t.name] = b
        acc._count, acc._total_weight = count, total
        return acc


class BufferedUpdates(_ModelChecked):
    """At most ``capacity`` checked updates, kept as received (wire tensors); the result
    decodes them all (O(capacity x model) float32) and also gives the weighted mean, computed
    exactly as :class:`WeightedSum` computes it."""

    kind = "buffered"

    def __init__(self, template: Shapes, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        super().__init__(template)
        self.capacity = capacity
        self._items: list[CheckedUpdate] = []

    def _check_room(self) -> None:
        if self._count >= self.capacity:
            raise Rejected(
                f"the round's update buffer is full ({self.capacity} updates)",
                RejectReason.ROUND_CLOSED,
            )

    def _add(self, checked: CheckedUpdate) -> None:
        self._items.append(checked)

    def result(self) -> Accumulated:
        if not self._items:
            raise ValueError("no update was folded")
        sums = {n: np.zeros(s, np.float32) for n, s in self._shapes.items()}
        scratch = {n: np.empty(s, np.float32) for n, s in self._shapes.items()}
        updates = []
        for item in self._items:
            delta: Weights = {}
            for t in item.tensors:
                item.codec.add_into(sums[t.name], t, item.weight * item.scale, scratch[t.name])
                decoded = item.codec.decode(t)
                delta[t.name] = decoded if item.scale == 1.0 else decoded * np.float32(item.scale)
            updates.append(WeightedDelta(delta, item.weight))
        inv = np.float32(1.0 / self._total_weight)
        mean = {n: s * inv for n, s in sums.items()}
        return Accumulated(self._count, self._total_weight, mean, tuple(updates))

    def merge(self, other: BufferedUpdates) -> None:
        """Append ``other``'s updates (after this one's): the result equals one buffer fed
        this one's updates, then the other's."""
        self._merge_common(other)
        if self._count + other._count > self.capacity:
            raise Rejected(
                f"merged buffers hold {self._count + other._count} updates, more than "
                f"{self.capacity}",
                RejectReason.ROUND_CLOSED,
            )
        self._items += [
            CheckedUpdate(i.tensors, i.codec, i.weight, i.magnitudes, self, i.scale)
            for i in other._items
        ]
        self._merge_counts(other)

    def to_bytes(self) -> bytes:
        obj = self._header()
        obj.update(
            capacity=self.capacity,
            updates=[
                {
                    "codec": i.codec.name,
                    "weight": i.weight,
                    "tensors": [t.to_map() for t in i.tensors],
                    **({} if i.scale == 1.0 else {"scale": i.scale}),
                }
                for i in self._items
            ],
        )
        out = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def from_bytes(
        cls, data: bytes, template: Shapes, max_bytes: int = 1 << 30
    ) -> BufferedUpdates:
        """Read :meth:`to_bytes` back for ``template``, checking every update again."""
        obj = cls._read(data, template, max_bytes)
        capacity = _nonneg_int(obj, "capacity")
        raw = obj.get("updates")
        if capacity < 1 or not isinstance(raw, list) or len(raw) > capacity:
            raise WireError("serialised buffer: bad capacity or update list")
        acc = cls(template, capacity)
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("codec"), str):
                raise WireError("serialised buffer: an update must be a map with a codec")
            tensors = item.get("tensors")
            if not isinstance(tensors, list):
                raise WireError("serialised buffer: an update must list its tensors")
            weight = _nonneg_float(item.get("weight"), "weight")
            if weight <= 0:
                raise WireError("serialised buffer: weights must be > 0")
            scale = _nonneg_float(item.get("scale", 1.0), "scale")
            if not 0 < scale <= 1:
                raise WireError("serialised buffer: scales must be in (0, 1]")
            try:
                acc.add(scaled(
                    acc.check([tensor_from_map(t, max_bytes) for t in tensors], item["codec"],
                              weight),
                    scale,
                ))
            except WireError:
                raise
            except Rejected as exc:  # an update that does not fit the model: damaged bytes
                raise WireError(f"serialised buffer: {exc.reason}", exc.code) from exc
        return acc
