"""Read the operator list of a ``.tflite`` file without TensorFlow, LiteRT or ``flatbuffers``.

A ``.tflite`` file is a FlatBuffer whose root is the schema's ``Model`` table. Operator codes
live in ``Model.operator_codes`` (field 1) and are shared by every subgraph, so this list
covers all signatures (``train``, ``infer``, ...), unlike the interpreter's op details, which
only see the main subgraph. Each ``OperatorCode`` has ``deprecated_builtin_code`` (int8,
field 0), ``custom_code`` (string, field 1), ``version`` (field 2) and ``builtin_code``
(int32, field 3); the effective code is ``max(builtin_code, deprecated_builtin_code)``, the
rule of TFLite's ``GetBuiltinCode`` (schema_utils.cc): old files only set the deprecated
int8, new ones set both, capping the int8 at 127 for codes above it.

Every read is bounds-checked; a truncated or malformed file raises :class:`ModelError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fedmq.errors import ModelError
from fedmq.models.builtin_ops import CUSTOM_CODE, builtin_op_name

__all__ = ["OperatorCode", "operator_codes", "tflite_op_names"]

_IDENTIFIER = b"TFL3"
_MODEL_OPERATOR_CODES = 1
_OPCODE_DEPRECATED_BUILTIN = 0
_OPCODE_CUSTOM = 1
_OPCODE_BUILTIN = 3

_I8 = struct.Struct("<b")
_U16 = struct.Struct("<H")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class OperatorCode:
    """One entry of ``Model.operator_codes``: the effective builtin code and custom name."""

    builtin_code: int
    custom_code: str | None

    @property
    def name(self) -> str:
        """Custom ops by their own name (``FlexConv2D``), builtin ops by schema name."""
        if self.builtin_code == CUSTOM_CODE:
            return self.custom_code or "CUSTOM"
        return builtin_op_name(self.builtin_code)


class _Reader:
    """Bounds-checked little-endian FlatBuffer access over one buffer."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def _get(self, fmt: struct.Struct, pos: int) -> int:
        if pos < 0 or pos + fmt.size > len(self.data):
            raise ModelError(f"malformed .tflite: read of {fmt.size} bytes at {pos} out of bounds")
        value: int = fmt.unpack_from(self.data, pos)[0]
        return value

    def _deref(self, pos: int) -> int:
        """Follow the uoffset stored at ``pos`` (relative to ``pos``)."""
        return pos + self._get(_U32, pos)

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field ``index`` of the table at ``table`` (None if absent)."""
        vtable = table - self._get(_I32, table)
        vtable_size = self._get(_U16, vtable)
        if vtable_size < 4 or vtable_size % 2:
            raise ModelError(f"malformed .tflite: vtable size {vtable_size} at {vtable}")
        slot = 4 + 2 * index
        if slot + 2 > vtable_size:
            return None  # written by an older schema: field absent
        offset = self._get(_U16, vtable + slot)
        return table + offset if offset else None

    def table(self, table: int, index: int) -> int | None:
        pos = self.field(table, index)
        return None if pos is None else self._deref(pos)

    def vector(self, pos: int, elem_size: int) -> tuple[int, int]:
        """(position of the first element, length) of the vector at ``pos``."""
        length = self._get(_U32, pos)
        start = pos + 4
        if start + length * elem_size > len(self.data):
            raise ModelError(f"malformed .tflite: vector of {length} at {pos} out of bounds")
        return start, length

    def string(self, pos: int) -> str:
        start, length = self.vector(pos, 1)
        try:
            return bytes(self.data[start : start + length]).decode()
        except UnicodeDecodeError:
            raise ModelError(f"malformed .tflite: string at {pos} is not UTF-8") from None

    def int8(self, pos: int) -> int:
        return self._get(_I8, pos)

    def int32(self, pos: int) -> int:
        return self._get(_I32, pos)

    def uoffset_target(self, pos: int) -> int:
        return self._deref(pos)


def operator_codes(data: bytes) -> list[OperatorCode]:
    """``Model.operator_codes`` of a ``.tflite`` file's bytes, in file order."""
    if len(data) < 8 or data[4:8] != _IDENTIFIER:
        raise ModelError("not a .tflite model (no TFL3 file identifier)")
    r = _Reader(data)
    model = r.uoffset_target(0)
    vec = r.table(model, _MODEL_OPERATOR_CODES)
    if vec is None:
        return []
    start, length = r.vector(vec, 4)
    out: list[OperatorCode] = []
    for i in range(length):
        oc = r.uoffset_target(start + 4 * i)
        pos = r.field(oc, _OPCODE_BUILTIN)
        builtin = r.int32(pos) if pos is not None else 0
        pos = r.field(oc, _OPCODE_DEPRECATED_BUILTIN)
        deprecated = r.int8(pos) if pos is not None else 0
        pos = r.table(oc, _OPCODE_CUSTOM)
        custom = r.string(pos) if pos is not None else None
        out.append(OperatorCode(max(builtin, deprecated), custom))
    return out


def tflite_op_names(data: bytes) -> list[str]:
    """Sorted, distinct operator names (custom ops such as ``FlexConv2D`` by their name)."""
    return sorted({oc.name for oc in operator_codes(data)})
