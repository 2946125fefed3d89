"""The ring Z_(2^b) of masked int8 updates: its size, quantisation and tight packing.

A device's update is its delta clipped to the round's ``clip`` and quantised with the
round-fixed int8 scale ``clip / 127`` (stochastic rounding, unbiased within the clip), so
every device's integers share one scale and their integer sum is meaningful. Each value is
in [-127, 127]; the sum of ``n`` of them is in [-127 n, 127 n], which the ring holds as a
signed value when ``2^(b-1) > 127 n``: ``b = 8 + ceil(log2 n)`` gives ``2^(b-1) = 128 *
2^ceil(log2 n) >= 128 n``, so no headroom bit is needed (the sum's magnitude is at most
``127 n < 128 n``). ``n`` is the number of devices whose keys are in the round's roster,
an upper bound of the number summed.

Values are packed at ``b`` bits each, little-endian bit order, the last byte zero-padded.
"""

from __future__ import annotations

import math

import numpy as np

from fedmq.errors import Rejected, RejectReason

__all__ = ["Q_MAX", "pack", "packed_size", "quantize", "ring_bits", "to_signed", "unpack"]

Q_MAX = 127
_CHUNK = 1 << 16  # values per packing step: temporaries of 32 x this bytes


def ring_bits(n: int) -> int:
    return 8 + math.ceil(math.log2(max(n, 1)))


def quantize(delta: np.ndarray, clip: float, rng: np.random.Generator) -> np.ndarray:
    """int8 values of ``delta`` (flat float32) on the fixed scale ``clip / 127``."""
    if not clip > 0:
        raise ValueError("clip must be > 0")
    x = np.clip(np.asarray(delta, np.float32).reshape(-1), -clip, clip)
    x = x * np.float32(Q_MAX / clip) + rng.random(x.shape, dtype=np.float32)
    return np.clip(np.floor(x), -Q_MAX, Q_MAX).astype(np.int8)


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Ring elements (uint32 < 2^bits) as signed integers in [-2^(bits-1), 2^(bits-1))."""
    v = values.astype(np.int64)
    v[v >= 1 << (bits - 1)] -= 1 << bits
    return v


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """``values`` (uint32, each < 2^bits) at ``bits`` bits each."""
    v = np.ascontiguousarray(values, dtype="<u4")
    if bits == 32:
        return v.tobytes()
    out = bytearray()
    step = _CHUNK  # a multiple of 8, so every chunk but the last ends on a byte boundary
    for start in range(0, v.size, step):
        part = v[start : start + step].view(np.uint8).reshape(-1, 4)
        bitsarr = np.unpackbits(part, axis=1, bitorder="little")[:, :bits]
        out += np.packbits(bitsarr.reshape(-1), bitorder="little").tobytes()
    return bytes(out)


def unpack(data: bytes, bits: int, count: int) -> np.ndarray:
    """``count`` values of ``bits`` bits from ``data`` (exact length, zero padding)."""
    if len(data) != packed_size(count, bits):
        raise Rejected(
            f"masked data of {len(data)} bytes, expected {packed_size(count, bits)} "
            f"({count} values of {bits} bits)",
            RejectReason.SHAPE,
        )
    if bits == 32:
        return np.frombuffer(data, "<u4").astype(np.uint32)
    raw = np.frombuffer(data, np.uint8)
    pad = len(data) * 8 - count * bits
    if pad and raw[-1] >> (8 - pad):
        raise Rejected("masked data has nonzero padding bits", RejectReason.MALFORMED)
    out = np.empty(count, np.uint32)
    step = _CHUNK
    for start in range(0, count, step):
        n = min(step, count - start)
        lo = start * bits // 8
        chunk = raw[lo : lo + packed_size(n, bits)]
        b = np.unpackbits(chunk, bitorder="little")[: n * bits].reshape(n, bits)
        full = np.zeros((n, 32), np.uint8)
        full[:, :bits] = b
        out[start : start + n] = np.packbits(full, axis=1, bitorder="little").view("<u4")[:, 0]
    return out
