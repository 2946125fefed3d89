"""Sparse positions on the wire: a bitmap or delta-coded varints, whichever is smaller.

A sparse tensor names the flat positions it stores (strictly increasing, each below the
tensor's size ``n``) in one of two ``extra`` fields:

- ``bitmap``: ``ceil(n / 8)`` bytes, bit ``i % 8`` (least significant first) of byte
  ``i // 8`` set when position ``i`` is stored; the padding bits past ``n`` are zero.
- ``gaps``: unsigned LEB128 varints, the first position then each position minus the one
  before (>= 1: a zero gap would be a duplicated position; a decreasing position cannot be
  written). Canonical (no overlong encodings), at most 5 bytes each, no trailing bytes.

:func:`encode_positions` picks the smaller (a tie goes to the bitmap, whose size is fixed).
Varints cost about one byte per position while the positions are closer than 128 apart, so
the bitmap wins above a density of about 1/8 (docs/codecs.md has the measured crossover).
:func:`decode_positions` checks a received field strictly and raises :class:`WireError`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedmq.errors import RejectReason, WireError

__all__ = [
    "POSITION_FIELDS",
    "bitmap_bytes",
    "decode_positions",
    "encode_positions",
    "gaps_bytes",
    "varint_decode",
    "varint_encode",
]

POSITION_FIELDS = frozenset({"bitmap", "gaps"})
_MAX_VARINT = 5  # uint32 values
_LIMITS = np.array([1 << 7, 1 << 14, 1 << 21, 1 << 28], np.uint64)


def varint_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of non-negative integers below 2**32, vectorised."""
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    nbytes = 1 + (v[:, None] >= _LIMITS[None, :]).sum(axis=1)
    ends = np.cumsum(nbytes)
    starts = ends - nbytes
    out = np.empty(int(ends[-1]), np.uint8)
    for j in range(_MAX_VARINT):
        has = nbytes > j
        if not has.any():
            break
        chunk = (v[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (nbytes[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + j] = (chunk | more).astype(np.uint8)
    return out.tobytes()


def varint_decode(data: bytes, what: str) -> np.ndarray:
    """The integers (int64) of canonical LEB128 ``data``; :class:`WireError` when damaged."""
    b = np.frombuffer(data, np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size == 0 or int(ends[-1]) != b.size - 1:
        raise WireError(f"{what}: a varint runs past the end", RejectReason.BAD_CODEC)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if int(lengths.max()) > _MAX_VARINT:
        raise WireError(f"{what}: a varint is longer than {_MAX_VARINT} bytes",
                        RejectReason.BAD_CODEC)
    if bool(((lengths > 1) & (b[ends] == 0)).any()):
        raise WireError(f"{what}: an overlong varint", RejectReason.BAD_CODEC)
    shift = (np.arange(b.size, dtype=np.int64) - np.repeat(starts, lengths)) * 7
    parts = (b & 0x7F).astype(np.int64) << shift
    return np.add.reduceat(parts, starts)


def bitmap_bytes(positions: np.ndarray, n: int) -> bytes:
    bits = np.zeros(n, np.bool_)
    bits[positions] = True
    return np.packbits(bits, bitorder="little").tobytes()


def gaps_bytes(positions: np.ndarray) -> bytes:
    p = np.asarray(positions, np.int64)
    if p.size == 0:
        return b""
    gaps = np.empty_like(p)
    gaps[0] = p[0]
    gaps[1:] = np.diff(p)
    return varint_encode(gaps)


def encode_positions(positions: np.ndarray, n: int) -> dict[str, bytes]:
    """The smaller of the two fields for strictly increasing ``positions`` below ``n``."""
    gaps = gaps_bytes(positions)
    if len(gaps) < (n + 7) // 8:
        return {"gaps": gaps}
    return {"bitmap": bitmap_bytes(positions, n)}


def decode_positions(extra: Mapping[str, bytes], n: int, k: int, name: str) -> np.ndarray:
    """The ``k`` strictly increasing flat positions (int64, each < ``n``) of a tensor's
    ``extra`` (exactly one of ``bitmap``/``gaps``); raises :class:`WireError`."""
    fields = POSITION_FIELDS & set(extra)
    if len(fields) != 1:
        raise WireError(f"tensor {name!r}: a sparse tensor has exactly one of bitmap/gaps",
                        RejectReason.BAD_CODEC)
    if "bitmap" in fields:
        raw = np.frombuffer(extra["bitmap"], np.uint8)
        if raw.size != (n + 7) // 8:
            raise WireError(f"tensor {name!r}: bitmap of {raw.size} bytes for {n} positions",
                            RejectReason.SHAPE)
        bits = np.unpackbits(raw, bitorder="little")
        if bits[n:].any():
            raise WireError(f"tensor {name!r}: bitmap bits set past position {n}",
                            RejectReason.SHAPE)
        positions = np.flatnonzero(bits).astype(np.int64)
    else:
        gaps = varint_decode(extra["gaps"], f"tensor {name!r} positions")
        if gaps.size and int(gaps.max()) >= n:
            raise WireError(f"tensor {name!r}: a position is out of range for {n} values",
                            RejectReason.SHAPE)
        if gaps.size > 1 and int(gaps[1:].min()) < 1:
            raise WireError(f"tensor {name!r}: duplicated position", RejectReason.SHAPE)
        positions = np.cumsum(gaps)
        if positions.size and int(positions[-1]) >= n:
            raise WireError(f"tensor {name!r}: position {int(positions[-1])} is out of range "
                            f"for {n} values", RejectReason.SHAPE)
    if positions.size != k:
        raise WireError(f"tensor {name!r}: {positions.size} positions but k={k}",
                        RejectReason.SHAPE)
    return positions
