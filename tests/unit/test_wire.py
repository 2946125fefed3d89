"""Wire format: round trips (hypothesis), pinned golden bytes, strict rejection."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq import wire
from fedmq.errors import RejectReason, WireError
from fedmq.wire import (
    AckMessage,
    Limits,
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    Tensor,
    TrainingConfig,
    UpdateMessage,
)

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_/", min_size=1, max_size=20)
device_ids = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,15}", fullmatch=True)
finite = st.floats(allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tensors(draw: st.DrawFn) -> Tensor:
    dtype = draw(st.sampled_from(["float32", "float16", "int8", "uint8"]))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    n = math.prod(shape)
    if dtype in ("float32", "float16"):
        width = 32 if dtype == "float32" else 16
        vals = draw(
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False, width=width),
                min_size=n,
                max_size=n,
            )
        )
    else:
        lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
        vals = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    arr = np.array(vals, dtype=wire.ALLOWED_DTYPES[dtype]).reshape(shape)
    params = draw(st.dictionaries(st.sampled_from(["scale", "zero"]), finite, max_size=2))
    return Tensor.from_array(draw(names), arr, params)


@st.composite
def updates(draw: st.DrawFn) -> UpdateMessage:
    ts = draw(st.lists(tensors(), max_size=4, unique_by=lambda t: t.name))
    return UpdateMessage(
        fleet=draw(device_ids),
        round_id=draw(st.integers(0, 2**40)),
        base_version=draw(st.integers(0, 2**40)),
        device=draw(device_ids),
        update_id=draw(st.text("0123456789abcdef", min_size=1, max_size=32)),
        num_examples=draw(st.integers(1, 10**9)),
        codec=draw(st.sampled_from(["float32", "int8"])),
        tensors=tuple(ts),
        metrics=draw(st.dictionaries(names, finite, max_size=3)),
        created_at=draw(st.floats(0, 2e9)),
        signature=draw(st.none() | st.binary(min_size=64, max_size=64)),
    )


@given(updates())
@settings(max_examples=150, deadline=None)
def test_update_round_trip(msg: UpdateMessage) -> None:
    assert wire.decode_update(wire.encode(msg)) == msg


@given(tensors())
@settings(max_examples=100, deadline=None)
def test_model_round_trip(t: Tensor) -> None:
    msg = ModelMessage("fleet", 3, 2, "digits-mlp", (t,), {"accuracy": 0.5}, 12.5)
    assert wire.decode_model(wire.encode(msg)) == msg


@given(
    st.lists(device_ids, max_size=20, unique=True),
    st.integers(1, 50),
    finite.filter(lambda x: x > 0),
)
@settings(max_examples=60, deadline=None)
def test_round_round_trip(selected: list[str], epochs: int, lr: float) -> None:
    cfg = TrainingConfig(epochs=epochs, lr=min(lr, 100.0), codec="int8", max_examples=100)
    msg = RoundAnnouncement("f", 7, 6, 1e9, cfg, tuple(selected), 2, "m", 5.0)
    assert wire.decode_round(wire.encode(msg)) == msg


def test_ack_and_status_round_trip() -> None:
    ack = AckMessage("f", 1, "dev-1", "abc", False, RejectReason.DUPLICATE, "already folded", 3.0)
    assert wire.decode_ack(wire.encode(ack)) == ack
    caps = {"threads": 2, "model": "digits-mlp", "tags": ["a"]}
    st_msg = StatusMessage(
        "f", "dev-1", "online", "ai-edge-litert 2.3.0", caps, {"loss": 0.5}, 4, 9.0
    )
    assert wire.decode_status(wire.encode(st_msg)) == st_msg


# Golden bytes pin format v1: a change here is a wire-format change (bump SCHEMA_VERSION).
GOLDEN_UPDATE = (
    "8ca17601a474797065a6757064617465a5666c656574a3666c74a5726f756e6403ac626173655f766572"
    "73696f6e02a6646576696365a464657631a97570646174655f6964a475303031ac6e756d5f6578616d70"
    "6c65730aa5636f646563a4696e7438a774656e736f72739185a46e616d65a177a56474797065a4696e74"
    "38a57368617065920103a6706172616d7381a57363616c65cb3f50624dd2f1a9fca464617461c403ff00"
    "81a76d65747269637381a46c6f7373cb3fe0000000000000aa637265617465645f6174cb41d000000000"
    "0000"
)


def _golden_update() -> UpdateMessage:
    t = Tensor.from_array("w", np.array([[-1, 0, -127]], np.int8), {"scale": 0.001})
    return UpdateMessage("flt", 3, 2, "dev1", "u001", 10, "int8", (t,), {"loss": 0.5}, 1073741824.0)


def test_golden_bytes_pinned() -> None:
    assert wire.encode(_golden_update()).hex() == GOLDEN_UPDATE
    assert wire.decode_update(bytes.fromhex(GOLDEN_UPDATE)) == _golden_update()


def _base_map() -> dict[str, object]:
    return msgpack.unpackb(bytes.fromhex(GOLDEN_UPDATE), raw=False)  # type: ignore[no-any-return]


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _reject(payload: bytes, code: str | None = None, limits: Limits | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        wire.decode_update(payload, limits)
    assert info.value.reason
    if code is not None:
        assert info.value.code == code, info.value.reason
    return info.value


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"garbage bytes \x00\xff",
        _pack([1, 2, 3]),
        _pack("x"),
        _pack({"v": 1}),
        b"\x81\xa1v",
    ],
)
def test_garbage_is_rejected(payload: bytes) -> None:
    _reject(payload)


def test_schema_version_checked() -> None:
    m = _base_map()
    m["v"] = 2
    _reject(_pack(m), RejectReason.SCHEMA)


def test_size_limit_before_unpacking() -> None:
    err = _reject(b"\x00" * 2000, RejectReason.TOO_LARGE, Limits(max_bytes=1000))
    assert "1000" in err.reason


def test_extension_types_refused() -> None:
    m = _base_map()
    m["metrics"] = msgpack.ExtType(42, b"evil")
    _reject(_pack(m))


def _with_tensor(**changes: object) -> bytes:
    m = _base_map()
    t = dict(m["tensors"][0])  # type: ignore[index]
    t.update(changes)
    m["tensors"] = [t]
    return _pack(m)


def test_shape_and_length_must_agree() -> None:
    _reject(_with_tensor(shape=[2, 3]), RejectReason.SHAPE)
    _reject(_with_tensor(shape=[-1]), RejectReason.SHAPE)
    _reject(_with_tensor(shape=[1] * 9), RejectReason.SHAPE)


def test_dtype_allowlist() -> None:
    _reject(_with_tensor(dtype="object"), RejectReason.BAD_CODEC)
    _reject(_with_tensor(dtype="float64", data=b"\x00" * 24), RejectReason.BAD_CODEC)


def test_non_finite_values_rejected() -> None:
    nan = np.array([np.nan, 1.0, 2.0], np.float32).tobytes()
    _reject(_with_tensor(dtype="float32", shape=[3], data=nan), RejectReason.NON_FINITE)
    inf = np.array([np.inf], np.float16).tobytes()
    _reject(_with_tensor(dtype="float16", shape=[1], data=inf), RejectReason.NON_FINITE)
    _reject(_with_tensor(params={"scale": float("nan")}), RejectReason.NON_FINITE)


def test_field_types_checked() -> None:
    for key, bad in [
        ("round", "3"),
        ("round", -1),
        ("num_examples", 0),
        ("device", "a/b"),
        ("device", "+"),
        ("codec", "zip"),
        ("num_examples", True),
        ("tensors", {}),
    ]:
        m = _base_map()
        m[key] = bad
        _reject(_pack(m))


def test_duplicate_tensor_names_rejected() -> None:
    m = _base_map()
    m["tensors"] = [m["tensors"][0], m["tensors"][0]]  # type: ignore[index]
    _reject(_pack(m), RejectReason.SHAPE)


def test_wrong_message_type() -> None:
    ack = wire.encode(AckMessage("f", 1, "d", "u", True))
    _reject(ack)
    assert wire.message_type(ack) == "ack"


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash(payload: bytes) -> None:
    for decode in (
        wire.decode_update,
        wire.decode_model,
        wire.decode_round,
        wire.decode_ack,
        wire.decode_status,
    ):
        try:
            decode(payload)
        except WireError as err:
            assert err.reason


def test_signing_bytes_exclude_signature() -> None:
    msg = _golden_update()
    signed = UpdateMessage(**{**msg.__dict__, "signature": b"s" * 64})
    assert wire.signing_bytes(signed) == wire.signing_bytes(msg) == wire.encode(msg)


def test_epoch_round_trips_is_optional_and_bounded() -> None:
    t = Tensor.from_array("w", np.ones(2, np.float32))
    cfg = TrainingConfig(codec="float32")
    model = ModelMessage("f", 3, 2, "m", (t,), epoch="0123456789abcdef")
    ann = RoundAnnouncement("f", 4, 3, 10.0, cfg, epoch="0123456789abcdef")
    upd = UpdateMessage("f", 4, 3, "d", "u", 1, "float32", (t,), epoch="0123456789abcdef")
    status = StatusMessage("f", "d", "idle", round_id=4, epoch="e1", model_version=3)
    assert wire.decode_model(wire.encode(model)) == model
    assert wire.decode_round(wire.encode(ann)) == ann
    assert wire.decode_update(wire.encode(upd)) == upd
    assert wire.decode_status(wire.encode(status)) == status
    # absent = "" (and None for the status' model_version); "" is not encoded at all, so an
    # update without an epoch signs the same bytes as before epochs existed
    plain = dataclasses.replace(upd, epoch="")
    assert "epoch" not in msgpack.unpackb(wire.encode(plain))
    assert wire.decode_update(wire.encode(plain)).epoch == ""
    bare = wire.decode_status(wire.encode(StatusMessage("f", "d", "idle")))
    assert (bare.epoch, bare.model_version) == ("", None)
    for bad in ("x" * 65, "bad\nepoch", 7):
        obj = msgpack.unpackb(wire.encode(upd))
        obj["epoch"] = bad
        with pytest.raises(WireError, match="epoch"):
            wire.decode_update(msgpack.packb(obj))
