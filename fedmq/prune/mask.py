"""The pruning mask: which weights of each pruned tensor are kept, as a compact bitmap.

The server owns the mask (:mod:`fedmq.prune.strategy`) and sends it with every round
announcement of a pruned federation (``RoundAnnouncement.prune_mask``, docs/pruning.md).
Only tensors that are pruned appear; every other trainable tensor is kept whole.

Bytes (msgpack)::

    {"mask": 1, "tensors": [{"name": str, "size": int, "kept": int, "bits": bytes}, ...]}

``bits`` is ``ceil(size / 8)`` bytes, bit ``i`` (little-endian bit order within a byte) set
when flat weight ``i`` is kept; the padding bits of the last byte are 0; ``kept`` is the
number of set bits (at least 1). The mask's id is the CRC-32 of these bytes: updates name
the mask they were encoded under (the masked codecs' ``mask`` param), so an update made
under another mask is refused instead of being folded at the wrong positions.

:func:`decode_mask` is strict and bounded: size limit before unpacking, exact keys, names of
the model's trainable tensors each at most once, sizes equal to the model's, bitmap length,
padding bits, popcount; anything else is a :class:`~fedmq.errors.WireError` with a reason.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgpack
import numpy as np

from fedmq.errors import RejectReason, WireError

__all__ = ["MAX_MASK_BYTES", "PruneMask", "decode_mask", "magnitude_mask"]

#: Largest encoded mask accepted (a bitmap of 64 Mi weights plus headers).
MAX_MASK_BYTES = 8 * 1024 * 1024 + 64 * 1024
_ENTRY_KEYS = frozenset({"name", "size", "kept", "bits"})


@dataclass(frozen=True)
class PruneMask:
    """Kept weights per pruned tensor (bool arrays of the model's shapes)."""

    kept: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, m in self.kept.items():
            if not isinstance(m, np.ndarray) or m.dtype != np.bool_:
                raise ValueError(f"mask of {name!r} must be a bool array")

    def count(self, name: str, size: int) -> int:
        """How many values of tensor ``name`` (``size`` weights) are kept."""
        m = self.kept.get(name)
        return size if m is None else int(np.count_nonzero(m))

    def positions(self, name: str) -> np.ndarray | None:
        """Flat kept positions of ``name`` (increasing int64), or None: kept whole."""
        return self._positions.get(name)

    @functools.cached_property
    def _positions(self) -> dict[str, np.ndarray]:
        return {n: np.flatnonzero(m.reshape(-1)) for n, m in self.kept.items()}

    def apply(self, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``weights`` with every pruned weight set to exactly 0 (float32 copies)."""
        out = {}
        for n, w in weights.items():
            m = self.kept.get(n)
            arr = np.array(w, dtype=np.float32, copy=True)
            if m is not None:
                arr[~m] = 0.0
            out[n] = arr
        return out

    def float_masks(self) -> dict[str, np.ndarray]:
        """0/1 float32 masks of the pruned tensors (the model's ``set_mask`` inputs)."""
        return {n: m.astype(np.float32) for n, m in self.kept.items()}

    def sparsity(self, shapes: Mapping[str, tuple[int, ...]]) -> float:
        """Fraction of all weights of ``shapes`` that are pruned."""
        total = sum(math.prod(s) for s in shapes.values())
        pruned = sum(
            m.size - int(np.count_nonzero(m)) for n, m in self.kept.items() if n in shapes
        )
        return pruned / total if total else 0.0

    def encode(self) -> bytes:
        return self._encoded

    @functools.cached_property
    def _encoded(self) -> bytes:
        entries = []
        for name, m in self.kept.items():
            flat = m.reshape(-1)
            entries.append({
                "name": name,
                "size": int(flat.size),
                "kept": int(np.count_nonzero(flat)),
                "bits": np.packbits(flat, bitorder="little").tobytes(),
            })
        out = msgpack.packb({"mask": 1, "tensors": entries}, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @functools.cached_property
    def mask_id(self) -> int:
        """CRC-32 of :meth:`encode` (what updates name in their ``mask`` param)."""
        return zlib.crc32(self.encode())


def _bad(why: str) -> WireError:
    return WireError(f"bad pruning mask: {why}", RejectReason.MALFORMED)


def decode_mask(data: bytes, shapes: Mapping[str, tuple[int, ...]],
                max_bytes: int = MAX_MASK_BYTES) -> PruneMask:
    """The mask in ``data``, checked against the model's trainable ``shapes``; raises
    :class:`WireError` (``malformed``) naming what is wrong."""
    if not isinstance(data, bytes | bytearray):
        raise _bad("not bytes")
    if len(data) > max_bytes:
        raise _bad(f"{len(data)} bytes exceed the limit of {max_bytes}")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, max_ext_len=0,
                              max_bin_len=max_bytes, max_array_len=len(shapes) + 1)
    except Exception as exc:  # msgpack raises several types on garbage
        raise _bad(f"not msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict) or set(obj) != {"mask", "tensors"} or (
        type(obj["mask"]) is not int or obj["mask"] != 1  # True == 1: refuse bools
    ):
        raise _bad("not a version-1 mask map {mask: 1, tensors: [...]}")
    raw = obj["tensors"]
    if not isinstance(raw, list):
        raise _bad("tensors is not a list")
    kept: dict[str, np.ndarray] = {}
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise _bad(f"an entry must have exactly the keys {sorted(_ENTRY_KEYS)}")
        name, size, count, bits = (entry[k] for k in ("name", "size", "kept", "bits"))
        if not isinstance(name, str) or name not in shapes:
            raise _bad(f"tensor {name!r} is not a trainable tensor of the model")
        if name in kept:
            raise _bad(f"tensor {name!r} appears twice")
        shape = shapes[name]
        n = math.prod(shape)
        if isinstance(size, bool) or not isinstance(size, int) or size != n:
            raise _bad(f"tensor {name!r}: size {size!r}, the model has {n}")
        if not isinstance(bits, bytes) or len(bits) != (n + 7) // 8:
            got = len(bits) if isinstance(bits, bytes) else type(bits).__name__
            raise _bad(f"tensor {name!r}: bitmap of {got} bytes, expected {(n + 7) // 8}")
        flat = np.unpackbits(np.frombuffer(bits, np.uint8), bitorder="little")
        if flat[n:].any():
            raise _bad(f"tensor {name!r}: padding bits set")
        flat = flat[:n].astype(np.bool_)
        ones = int(np.count_nonzero(flat))
        if isinstance(count, bool) or not isinstance(count, int) or count != ones:
            raise _bad(f"tensor {name!r}: kept {count!r} but the bitmap keeps {ones}")
        if ones == 0:
            raise _bad(f"tensor {name!r}: every weight pruned")
        kept[name] = flat.reshape(shape)
    return PruneMask(kept)


def magnitude_mask(
    weights: Mapping[str, np.ndarray], sparsity: float, prunable: tuple[str, ...]
) -> PruneMask:
    """Keep the ``1 - sparsity`` largest |w| of each tensor in ``prunable`` (layer-wise
    uniform sparsity; ties broken by position, so the mask is deterministic). Weights
    already pruned (exactly 0) are the smallest and stay pruned."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    kept: dict[str, np.ndarray] = {}
    for name in prunable:
        w = np.asarray(weights[name], np.float32)
        flat = np.abs(w.reshape(-1))
        k = max(1, round(flat.size * (1.0 - sparsity)))
        m = np.zeros(flat.size, np.bool_)
        m[np.argsort(-flat, kind="stable")[:k]] = True
        kept[name] = m.reshape(w.shape)
    return PruneMask(kept)
