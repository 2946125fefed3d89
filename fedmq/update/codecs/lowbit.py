"""Low-bit helpers shared by the int4 and sparse codecs: unbiased stochastic rounding to
``2 * levels + 1`` symmetric steps and two 4-bit values per byte.

A 4-bit value ``q`` in ``[-8, 7]`` is stored as the nibble ``q + 8``; element ``2i`` is the
low nibble of byte ``i``, element ``2i + 1`` the high nibble; an odd count leaves the last
high nibble 0 (checked on receipt).
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import RejectReason, WireError

__all__ = ["INT4_LEVELS", "pack_nibbles", "stochastic_levels", "unpack_nibbles"]

INT4_LEVELS = 7
_F32_MAX = float(np.finfo(np.float32).max)


def stochastic_levels(
    x: np.ndarray, levels: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """``(q, scale)`` with ``q`` integers in ``[-levels, levels]`` (float32 array) and
    ``E[q * scale] = x``: ``scale = max|x| / levels``, ``q = floor(x / scale + u)``."""
    flat = np.asarray(x, np.float32)
    max_abs = float(np.abs(flat).max()) if flat.size else 0.0
    if max_abs == 0.0:
        return np.zeros(flat.shape, np.float32), 0.0
    inv = levels / max_abs
    if inv < _F32_MAX:
        scaled = flat * np.float32(inv)
    else:  # subnormal inputs: scale in float64
        scaled = (flat.astype(np.float64) * inv).astype(np.float32)
    scaled += rng.random(flat.shape, dtype=np.float32)
    np.floor(scaled, out=scaled)
    np.clip(scaled, -levels, levels, out=scaled)
    return scaled, max_abs / levels


def pack_nibbles(q: np.ndarray) -> bytes:
    """Integers in ``[-8, 7]`` (any int/float array) to ``ceil(n / 2)`` bytes."""
    u = (np.asarray(q).reshape(-1).astype(np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, np.uint8)])
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(data: bytes, count: int, name: str) -> np.ndarray:
    """The ``count`` values (int8, ``[-8, 7]``) of :func:`pack_nibbles` bytes; a wrong
    length or a non-zero padding nibble is a :class:`WireError`."""
    raw = np.frombuffer(data, np.uint8)
    if raw.size != (count + 1) // 2:
        raise WireError(f"tensor {name!r}: {raw.size} bytes of 4-bit values for {count} "
                        "values", RejectReason.SHAPE)
    if count % 2 and raw.size and int(raw[-1]) >> 4:
        raise WireError(f"tensor {name!r}: the padding nibble is not zero",
                        RejectReason.BAD_CODEC)
    out = np.empty(raw.size * 2, np.int8)
    out[0::2] = (raw & 0x0F).astype(np.int8)
    out[1::2] = (raw >> 4).astype(np.int8)
    out -= 8
    return out[:count]
