"""``int4``: 4-bit symmetric quantisation with stochastic rounding, two values per byte.

Values are cut into blocks of ``block`` elements (the ``block`` param; the last block may
be shorter); each block has its own scale ``max|x| / 7`` (float32, ``extra["scales"]``,
``ceil(n / block)`` of them) and ``q = floor(x / scale + u)``, ``u ~ U[0, 1)``, so
``E[q * scale] = x`` (unbiased). ``data`` is ``ceil(n / 2)`` bytes of nibbles
(:mod:`.lowbit`). A block as long as the tensor is a per-tensor scale. The registered
``int4`` uses :data:`DEFAULT_BLOCK` (docs/codecs.md: per-block vs per-tensor measured on
real deltas).
"""

from __future__ import annotations

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import Codec, finite_input
from fedmq.update.codecs.lowbit import INT4_LEVELS, pack_nibbles, unpack_nibbles

__all__ = ["DEFAULT_BLOCK", "Int4"]

DEFAULT_BLOCK = 64
_MAX_BLOCK = 1 << 31
_MAX_SCALE = 1e30
_F32_MAX = float(np.finfo(np.float32).max)
_Q_PEAK = 8.0  # largest |q| a nibble holds (-8 is a valid wire value even if encode never makes it)


class Int4(Codec):
    name = "int4"

    def __init__(self, block: int | None = DEFAULT_BLOCK) -> None:
        """``block=None``: one scale per tensor."""
        if block is not None and not 1 <= block < _MAX_BLOCK:
            raise ValueError(f"int4 block must be 1..{_MAX_BLOCK - 1}, got {block}")
        self.block = block

    def encode_tensor(self, name: str, values: np.ndarray, rng: np.random.Generator) -> Tensor:
        x = finite_input(name, values).reshape(-1)
        n = x.size
        block = max(1, n) if self.block is None else self.block
        nblocks = -(-n // block)
        blocks = np.zeros(nblocks * block, np.float32)
        blocks[:n] = x
        rows = blocks.reshape(nblocks, block)
        max_abs = np.abs(rows).max(axis=1) if n else np.zeros(0, np.float32)
        scales = (max_abs.astype(np.float64) / INT4_LEVELS).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(max_abs > 0, INT4_LEVELS / max_abs.astype(np.float64), 0.0)
        if inv.size and float(inv.max()) >= _F32_MAX:  # subnormal inputs: scale in float64
            scaled = (rows.astype(np.float64) * inv[:, None]).astype(np.float32)
        else:
            scaled = rows * inv.astype(np.float32)[:, None]
        scaled += rng.random(scaled.shape, dtype=np.float32)
        np.floor(scaled, out=scaled)
        np.clip(scaled, -INT4_LEVELS, INT4_LEVELS, out=scaled)
        return Tensor(name, "uint8", tuple(int(d) for d in np.shape(values)),
                      pack_nibbles(scaled.reshape(-1)[:n]), {"block": float(block)},
                      {"scales": scales.astype("<f4").tobytes()})

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        name = tensor.name
        if tensor.shape != shape:
            raise WireError(f"tensor {name!r} has shape {list(tensor.shape)}, the model has "
                            f"{list(shape)}", RejectReason.SHAPE)
        if tensor.dtype != "uint8":
            raise WireError(f"tensor {name!r} is {tensor.dtype} but the update's codec is "
                            f"{self.name}", RejectReason.BAD_CODEC)
        if set(tensor.params) != {"block"} or set(tensor.extra) != {"scales"}:
            raise WireError(f"tensor {name!r}: int4 takes param block and extra scales, got "
                            f"{sorted(tensor.params)} and {sorted(tensor.extra)}",
                            RejectReason.BAD_CODEC)
        block = tensor.params["block"]
        if not (1 <= block < _MAX_BLOCK and float(block).is_integer()):
            raise WireError(f"tensor {name!r}: bad int4 block {block}", RejectReason.BAD_CODEC)
        n = tensor.size
        if tensor.count != (n + 1) // 2:
            raise WireError(f"tensor {name!r}: {tensor.count} bytes of 4-bit values for "
                            f"{n} values", RejectReason.SHAPE)
        scales_raw = tensor.extra["scales"]
        nblocks = -(-n // int(block))
        if len(scales_raw) != 4 * nblocks:
            raise WireError(f"tensor {name!r}: {len(scales_raw)} scale bytes for {nblocks} "
                            "blocks", RejectReason.SHAPE)
        scales = np.frombuffer(scales_raw, "<f4")
        if scales.size and not bool(((scales >= 0) & (scales < _MAX_SCALE)).all()):
            raise WireError(f"tensor {name!r}: bad int4 scale (NaN, negative or huge)",
                            RejectReason.BAD_CODEC)
        if n % 2 and int(tensor.data[-1]) >> 4:
            raise WireError(f"tensor {name!r}: the padding nibble is not zero",
                            RejectReason.BAD_CODEC)

    def _scales(self, tensor: Tensor) -> tuple[int, np.ndarray]:
        return int(tensor.params["block"]), np.frombuffer(tensor.extra["scales"], "<f4")

    def decode(self, tensor: Tensor) -> np.ndarray:
        out = np.empty(tensor.size, np.float32)
        self._write(out, tensor)
        return out.reshape(tensor.shape)

    def _write(self, out: np.ndarray, tensor: Tensor, coef: float = 1.0) -> None:
        """``out[:] = coef * decode(tensor)`` (flat float32 ``out``), one pass per block row."""
        n = tensor.size
        if n == 0:
            return
        block, scales = self._scales(tensor)
        q = unpack_nibbles(tensor.data, n, tensor.name)
        factors = scales * np.float32(coef)
        full = n // block
        if full:
            np.multiply(q[: full * block].reshape(full, block), factors[:full, None],
                        out=out[: full * block].reshape(full, block))
        if full * block < n:
            np.multiply(q[full * block:], factors[full], out=out[full * block:])

    def bound(self, tensor: Tensor) -> float:
        _, scales = self._scales(tensor)
        return _Q_PEAK * float(scales.max()) if scales.size else 0.0

    def squared_norm(self, tensor: Tensor) -> float:
        """``sum_b scale_b^2 * q_b.q_b`` from the nibbles (exact integer sums per block)."""
        n = tensor.size
        if n == 0:
            return 0.0
        block, scales = self._scales(tensor)
        q = unpack_nibbles(tensor.data, n, tensor.name).astype(np.int32)
        sq = np.add.reduceat(q * q, np.arange(0, n, block), dtype=np.int64)
        s = scales.astype(np.float64)
        return float(np.dot(sq.astype(np.float64), s * s))

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        out = np.empty(acc.size, np.float32) if scratch is None else scratch.reshape(-1)
        self._write(out, tensor, coef)
        acc += out.reshape(acc.shape)
