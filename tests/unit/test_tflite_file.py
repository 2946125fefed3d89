"""The dependency-free ``.tflite`` operator reader (fedmq.models.tflite_file)."""

from __future__ import annotations

import importlib
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.errors import ModelError
from fedmq.models import load_bundle, prebuilt_bundle_path, prebuilt_names
from fedmq.models.builtin_ops import BUILTIN_OPS, CUSTOM_CODE, builtin_op_name
from fedmq.models.litert import flex_ops, tflite_op_names
from fedmq.models.tflite_file import OperatorCode, operator_codes

PREBUILT = prebuilt_names()


def _schema() -> ModuleType | None:
    for name in (
        "ai_edge_litert.schema_py_generated",
        "tensorflow.lite.python.schema_py_generated",
    ):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def schema_op_names(schema: Any, data: bytes) -> list[str]:
    """The reference: the flatbuffers-generated schema reader (the former runtime code path)."""
    root = schema.Model.GetRootAs(data, 0)
    by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    names = set()
    for i in range(root.OperatorCodesLength()):
        oc = root.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        if code == schema.BuiltinOperator.CUSTOM:
            names.add((oc.CustomCode() or b"CUSTOM").decode())
        else:
            names.add(by_code.get(code, f"BUILTIN_{code}"))
    return sorted(names)


@pytest.fixture(scope="module")
def schema() -> Any:
    mod = _schema()
    if mod is None:
        pytest.skip("no TFLite schema module (ai-edge-litert or tensorflow) installed")
    return mod


def build_tflite(opcodes: list[tuple[int | None, int | None, str | None]]) -> bytes:
    """A minimal valid ``.tflite`` flatbuffer: a Model with only ``operator_codes``.

    Each entry is (deprecated_builtin_code int8, builtin_code int32, custom_code); None leaves
    the field out, and the vtable is cut after the last present field, like a file written
    by an older schema.
    """
    buf = bytearray(b"\0\0\0\0TFL3")

    def u32_at(pos: int, value: int) -> None:
        struct.pack_into("<I", buf, pos, value)

    model_vt = len(buf)
    buf += struct.pack("<HHHH", 8, 8, 0, 4)  # version absent, operator_codes at +4
    model = len(buf)
    u32_at(0, model)
    buf += struct.pack("<i", model - model_vt)
    field = len(buf)
    buf += bytes(4)
    vec = len(buf)
    u32_at(field, vec - field)
    buf += struct.pack("<I", len(opcodes))
    slots = len(buf)
    buf += bytes(4 * len(opcodes))
    for i, (deprecated, builtin, custom) in enumerate(opcodes):
        # table: soffset | builtin_code int32 @4 | custom_code uoffset @8 | deprecated int8 @12
        offsets = [
            12 if deprecated is not None else 0,
            8 if custom is not None else 0,
            0,  # version
            4 if builtin is not None else 0,
        ]
        while offsets and offsets[-1] == 0:
            offsets.pop()
        vt = len(buf)
        buf += struct.pack(f"<HH{len(offsets)}H", 4 + 2 * len(offsets), 16, *offsets)
        while len(buf) % 4:
            buf += b"\0"
        table = len(buf)
        u32_at(slots + 4 * i, table - (slots + 4 * i))
        buf += struct.pack("<iiIb3x", table - vt, builtin or 0, 0, deprecated or 0)
        if custom is not None:
            s = len(buf)
            u32_at(table + 8, s - (table + 8))
            raw = custom.encode()
            buf += struct.pack("<I", len(raw)) + raw + b"\0"
            while len(buf) % 4:
                buf += b"\0"
    return bytes(buf)


SYNTHETIC = [
    (0, 0, None),  # ADD
    (3, None, None),  # CONV_2D, old file: only the deprecated int8 code
    (127, 150, None),  # code above 127: deprecated capped at 127 (placeholder)
    (CUSTOM_CODE, CUSTOM_CODE, "FlexConv2DBackpropFilter"),
    (CUSTOM_CODE, None, "my_custom_op"),
    (None, CUSTOM_CODE, None),  # custom without a name
]


@pytest.mark.parametrize("name", PREBUILT)
def test_prebuilt_matches_schema_reader(name: str, schema: Any) -> None:
    data = load_bundle(prebuilt_bundle_path(name)).tflite_bytes()
    got = tflite_op_names(data)
    assert got == schema_op_names(schema, data)
    assert flex_ops(got) == []


def test_prebuilt_bundles_exist() -> None:
    assert {"digits-mlp", "fmnist-cnn"} <= set(PREBUILT)


def test_sees_ops_of_every_signature() -> None:
    """The train signature's ops are in the list (the interpreter only lists subgraph 0's)."""
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    ops = tflite_op_names(bundle.tflite_path)
    assert {"ONE_HOT", "LOG_SOFTMAX", "ASSIGN_VARIABLE", "BATCH_MATMUL"} <= set(ops)
    assert ops == sorted(bundle.spec.extra["ops"])


def test_synthetic_model_and_flex_detection() -> None:
    data = build_tflite(SYNTHETIC)
    assert operator_codes(data) == [
        OperatorCode(0, None),
        OperatorCode(3, None),
        OperatorCode(150, None),
        OperatorCode(CUSTOM_CODE, "FlexConv2DBackpropFilter"),
        OperatorCode(CUSTOM_CODE, "my_custom_op"),
        OperatorCode(CUSTOM_CODE, None),
    ]
    ops = tflite_op_names(data)
    assert ops == sorted(
        ["ADD", "CONV_2D", BUILTIN_OPS[150], "FlexConv2DBackpropFilter", "my_custom_op", "CUSTOM"]
    )
    assert sorted(flex_ops(ops)) == ["CUSTOM", "FlexConv2DBackpropFilter", "my_custom_op"]


def test_synthetic_model_matches_schema_reader(schema: Any) -> None:
    data = build_tflite(SYNTHETIC)
    assert tflite_op_names(data) == schema_op_names(schema, data)


def test_no_operator_codes_and_unknown_code() -> None:
    assert tflite_op_names(build_tflite([])) == []
    assert tflite_op_names(build_tflite([(None, 10_000, None)])) == ["BUILTIN_10000"]
    assert builtin_op_name(-1) == "BUILTIN_-1"


def test_builtin_table_agrees_with_installed_schema(schema: Any) -> None:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for code, name in enumerate(BUILTIN_OPS):
        assert names.get(code) == name, code
    assert BUILTIN_OPS[CUSTOM_CODE] == "CUSTOM"


@pytest.mark.parametrize(
    "data",
    [b"", b"TFL3", b"\0\0\0\0TFL3", b"garbage that is long enough", bytes(64)],
    ids=["empty", "short", "header-only", "garbage", "zeros"],
)
def test_garbage_raises_model_error(data: bytes) -> None:
    with pytest.raises(ModelError):
        tflite_op_names(data)


def test_every_truncation_raises_or_reads_only_present_bytes() -> None:
    data = build_tflite(SYNTHETIC)
    full = tflite_op_names(data)
    for n in range(len(data)):
        try:
            got = tflite_op_names(data[:n])
        except ModelError:
            continue
        # only cutting the last table's unused tail (absent fields, padding) may succeed
        assert n >= len(data) - 8 and got == full, n


def test_truncated_prebuilt_raises_model_error() -> None:
    data = load_bundle(prebuilt_bundle_path("digits-mlp")).tflite_bytes()
    # The converter writes operator_codes last in the buffer (= at the file's end), so every
    # cut loses some of them: fine steps near the end, coarse ones elsewhere.
    cuts = list(range(0, len(data) - 4096, 61)) + list(range(len(data) - 4096, len(data)))
    for n in cuts:
        with pytest.raises(ModelError):
            tflite_op_names(data[:n])


def test_missing_file_raises_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        tflite_op_names(tmp_path / "nope.tflite")


def test_corrupted_bytes_never_crash() -> None:
    data = build_tflite(SYNTHETIC)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        buf = bytearray(data)
        for pos in rng.integers(8, len(buf), size=3):
            buf[pos] = int(rng.integers(0, 256))
        try:
            ops = tflite_op_names(bytes(buf))
        except ModelError:
            continue
        assert all(isinstance(op, str) for op in ops)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_crash(tail: bytes) -> None:
    data = tail[:4] + b"TFL3" + tail[4:]
    try:
        ops = tflite_op_names(data)
    except ModelError:
        return
    assert all(isinstance(op, str) for op in ops)


def test_needs_no_schema_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a tflite-runtime-only device: no ai_edge_litert/tensorflow schema, no flatbuffers."""
    for name in (
        "ai_edge_litert.schema_py_generated",
        "tensorflow.lite.python.schema_py_generated",
        "flatbuffers",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail
    bundle = load_bundle(prebuilt_bundle_path("fmnist-cnn"))
    assert tflite_op_names(bundle.tflite_path) == sorted(bundle.spec.extra["ops"])
