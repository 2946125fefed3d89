"""The wire tensor: a named block of raw little-endian values plus what its codec needs.

A :class:`Tensor` carries the model ``shape`` it stands for, ``data`` (whole elements of
``dtype``), ``params`` (named finite numbers such as int8's ``scale``) and ``extra`` (named
byte strings a codec may define, e.g. the positions of a sparse codec). For a dense tensor
``data`` holds exactly ``prod(shape)`` elements; other layouts (sparse values, packed 4-bit)
hold a codec-defined number, and the codec checks it against the model
(:mod:`fedmq.update.codecs`). This module checks only structure: types, bounds, whole
elements, and (:func:`check_finite`) that float data is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.errors import RejectReason, WireError

__all__ = [
    "ALLOWED_DTYPES",
    "MAX_EXTRA",
    "MAX_NDIM",
    "MAX_PARAMS",
    "Tensor",
    "check_finite",
    "tensor_from_map",
]

ALLOWED_DTYPES: Mapping[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
}
MAX_NDIM = 8
MAX_NAME = 128
MAX_PARAMS = 16
MAX_EXTRA = 8
_MAX_EXTRA_KEY = 32


@dataclass(frozen=True)
class Tensor:
    """One named tensor as carried on the wire (raw bytes, codec params and byte fields)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    params: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_structure(self)

    @property
    def size(self) -> int:
        """Elements of the model tensor this stands for (``prod(shape)``)."""
        return math.prod(self.shape)

    @property
    def count(self) -> int:
        """Elements stored in ``data``."""
        return len(self.data) // ALLOWED_DTYPES[self.dtype].itemsize

    @property
    def dense(self) -> bool:
        return self.count == self.size

    def values(self) -> np.ndarray:
        """A read-only flat view of the stored values (no copy), any layout."""
        return np.frombuffer(self.data, dtype=ALLOWED_DTYPES[self.dtype])

    def array(self) -> np.ndarray:
        """A read-only view of a dense tensor's values (no copy), shaped."""
        if not self.dense:
            raise WireError(
                f"tensor {self.name!r}: {self.count} {self.dtype} values do not fill shape "
                f"{list(self.shape)}",
                RejectReason.SHAPE,
            )
        return self.values().reshape(self.shape)

    @classmethod
    def from_array(
        cls,
        name: str,
        array: np.ndarray,
        params: Mapping[str, float] | None = None,
        extra: Mapping[str, bytes] | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> Tensor:
        """A tensor of ``array``'s values; ``shape`` defaults to the array's (dense)."""
        arr = np.asarray(array)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        key = _dtype_name(dtype)
        data = np.ascontiguousarray(arr, dtype=ALLOWED_DTYPES[key]).tobytes()
        dims = tuple(int(d) for d in (arr.shape if shape is None else shape))
        return cls(name, key, dims, data, dict(params or {}), dict(extra or {}))

    def to_map(self) -> dict[str, Any]:
        """The msgpack map of this tensor (``extra`` only when it has entries)."""
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "params": {k: float(v) for k, v in sorted(self.params.items())},
            "data": self.data,
        }
        if self.extra:
            out["extra"] = {k: bytes(v) for k, v in sorted(self.extra.items())}
        return out


def _dtype_name(dtype: np.dtype[Any]) -> str:
    for name, allowed in ALLOWED_DTYPES.items():
        if dtype == allowed:
            return name
    raise WireError(f"dtype {dtype} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")


def _check_structure(t: Tensor) -> None:
    name = t.name
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise WireError(f"tensor name {name!r} must be 1-{MAX_NAME} characters")
    if t.dtype not in ALLOWED_DTYPES:
        raise WireError(
            f"tensor {name!r}: dtype {t.dtype!r} is not allowed "
            f"(allowed: {', '.join(ALLOWED_DTYPES)})",
            RejectReason.BAD_CODEC,
        )
    if len(t.shape) > MAX_NDIM or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in t.shape
    ):
        raise WireError(f"tensor {name!r}: bad shape {list(t.shape)}", RejectReason.SHAPE)
    if not isinstance(t.data, bytes):
        raise WireError(f"tensor {name!r}: data must be bytes")
    itemsize = ALLOWED_DTYPES[t.dtype].itemsize
    if len(t.data) % itemsize:
        raise WireError(
            f"tensor {name!r}: {len(t.data)} data bytes are not whole {t.dtype} values",
            RejectReason.SHAPE,
        )
    if len(t.params) > MAX_PARAMS:
        raise WireError(f"tensor {name!r} has more than {MAX_PARAMS} params")
    for key, value in t.params.items():
        if not isinstance(key, str) or not key or len(key) > MAX_NAME:
            raise WireError(f"tensor {name!r} has a bad param name")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"tensor {name!r}: param {key!r} must be a number")
        if not math.isfinite(value):
            raise WireError(
                f"tensor {name!r}: param {key!r} is not finite", RejectReason.NON_FINITE
            )
    if len(t.extra) > MAX_EXTRA:
        raise WireError(f"tensor {name!r} has more than {MAX_EXTRA} extra fields")
    for key, blob in t.extra.items():
        if not isinstance(key, str) or not key or len(key) > _MAX_EXTRA_KEY:
            raise WireError(f"tensor {name!r} has a bad extra field name")
        if not isinstance(blob, bytes):
            raise WireError(f"tensor {name!r}: extra field {key!r} must be bytes")


def check_finite(t: Tensor) -> None:
    """Raise ``non_finite`` when float data holds NaN or infinity."""
    if t.dtype == "float16":
        # NaN/inf have an all-ones exponent; integer ops on the bits beat float16 isfinite 6x.
        bits = np.frombuffer(t.data, dtype="<u2")
        bad = bool(((bits & 0x7C00) == 0x7C00).any())
    elif t.dtype == "float32":
        bad = not bool(np.isfinite(t.values()).all())
    else:
        return
    if bad:
        raise WireError(f"tensor {t.name!r} holds NaN or infinite values", RejectReason.NON_FINITE)


def tensor_from_map(raw: Any, max_elements: int) -> Tensor:
    """A tensor from its msgpack map, structurally checked (bounded, finite floats)."""
    if not isinstance(raw, dict):
        raise WireError("a tensor must be a map")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise WireError(f"tensor name must be a string of 1-{MAX_NAME} characters")
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or len(dtype) > 16:
        raise WireError(f"tensor {name!r}: field 'dtype' must be a short string")
    shape_raw = raw.get("shape")
    if not isinstance(shape_raw, list):
        raise WireError(f"tensor {name!r}: field 'shape' must be a list")
    if len(shape_raw) > MAX_NDIM:
        raise WireError(f"tensor {name!r} has more than {MAX_NDIM} dimensions", RejectReason.SHAPE)
    shape = tuple(shape_raw)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise WireError(f"tensor {name!r}: bad shape {shape_raw}", RejectReason.SHAPE)
    if math.prod(shape) > max_elements:
        raise WireError(f"tensor {name!r} has too many elements", RejectReason.TOO_LARGE)
    data = raw.get("data")
    if not isinstance(data, bytes):
        raise WireError(f"tensor {name!r}: field 'data' must be bytes")
    params = raw.get("params", {})
    extra = raw.get("extra", {})
    if not isinstance(params, dict):
        raise WireError(f"tensor {name!r}: field 'params' must be a map")
    if not isinstance(extra, dict):
        raise WireError(f"tensor {name!r}: field 'extra' must be a map")
    tensor = Tensor(name, dtype, shape, data, params, extra)
    if tensor.count > max_elements:
        raise WireError(f"tensor {name!r} stores too many elements", RejectReason.TOO_LARGE)
    check_finite(tensor)
    return tensor
