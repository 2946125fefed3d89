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
from fedmq.evaluation import EvalReport
from fedmq.wire import (
    AckMessage,
    Limits,
    ModelMessage,
    RoundAnnouncement,
    SignedUpdate,
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
    # Codec-defined layouts: fewer stored values than the shape, and named byte fields.
    extra = draw(st.dictionaries(st.sampled_from(["index", "mask"]), st.binary(max_size=8),
                                 max_size=2))
    stored = draw(st.integers(0, arr.size)) if extra else arr.size
    return Tensor.from_array(draw(names), arr.reshape(-1)[:stored], params, extra, shape)


@st.composite
def eval_reports(draw: st.DrawFn) -> EvalReport:
    personal = draw(st.booleans())
    unit = st.floats(0, 1)
    return EvalReport(
        loss=draw(st.floats(0, 1e6)), accuracy=draw(unit), count=draw(st.integers(1, 2**40)),
        personal_loss=draw(st.floats(0, 1e6)) if personal else None,
        personal_accuracy=draw(unit) if personal else None,
    )


@st.composite
def updates(draw: st.DrawFn) -> UpdateMessage:
    evaluation = draw(st.none() | eval_reports())
    ts = draw(st.lists(tensors(), min_size=0 if evaluation else 1, max_size=4,
                       unique_by=lambda t: t.name))
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
        steps=draw(st.just(0) | st.integers(1, wire.MAX_STEPS)),
        evaluation=evaluation,
    )


@given(updates())
@settings(max_examples=150, deadline=None)
def test_update_round_trip(msg: UpdateMessage) -> None:
    assert wire.decode_update(wire.encode(msg)) == msg


@given(updates(), st.binary(min_size=1, max_size=512))
@settings(max_examples=100, deadline=None)
def test_signed_envelope_round_trip(msg: UpdateMessage, sig: bytes) -> None:
    body = wire.encode(msg)
    received = wire.receive_update(wire.encode(SignedUpdate(body, sig)))
    assert received == wire.ReceivedUpdate(msg, body, sig)
    assert wire.decode_update(wire.encode(SignedUpdate(body, sig))) == msg
    assert wire.receive_update(body) == wire.ReceivedUpdate(msg, body, None)


@given(tensors())
@settings(max_examples=100, deadline=None)
def test_model_round_trip(t: Tensor) -> None:
    t = Tensor(t.name, t.dtype, t.shape, t.data, t.params) if t.dense else t
    msg = ModelMessage("fleet", 3, 2, "digits-mlp", (t,), {"accuracy": 0.5}, 12.5)
    if not t.dense:  # model weights are dense: a sparse layout is refused
        with pytest.raises(WireError) as e:
            wire.decode_model(wire.encode(msg))
        assert e.value.code == RejectReason.SHAPE
        return
    assert wire.decode_model(wire.encode(msg)) == msg


@given(
    st.lists(device_ids, max_size=20, unique=True),
    st.integers(1, 50),
    finite.filter(lambda x: x > 0),
)
@settings(max_examples=60, deadline=None)
def test_round_round_trip(selected: list[str], epochs: int, lr: float) -> None:
    cfg = TrainingConfig(epochs=epochs, lr=min(lr, 100.0), codec="int8", max_examples=100,
                         params={"mu": 0.01, "k": 5, "mode": "prox", "on": True})
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


# Golden bytes pin format v2: a change here is a wire-format change (bump SCHEMA_VERSION).
GOLDEN_UPDATE = (
    "8ca17602a474797065a6757064617465a5666c656574a3666c74a5726f756e6403ac626173655f766572"
    "73696f6e02a6646576696365a464657631a97570646174655f6964a475303031ac6e756d5f6578616d70"
    "6c65730aa5636f646563a4696e7438a774656e736f72739185a46e616d65a177a56474797065a4696e74"
    "38a57368617065920103a6706172616d7381a57363616c65cb3f50624dd2f1a9fca464617461c403ff00"
    "81a76d65747269637381a46c6f7373cb3fe0000000000000aa637265617465645f6174cb41d000000000"
    "0000"
)
# The same update in format v1 (before the signed envelope): refused as schema_version.
GOLDEN_UPDATE_V1 = GOLDEN_UPDATE[:6] + "01" + GOLDEN_UPDATE[8:]
# Envelope {v: 2, type: "signed", body: <GOLDEN_UPDATE bytes>, sig: bytes 0..63}.
GOLDEN_SIG = bytes(range(64))
GOLDEN_SIGNED = (
    "84a17602a474797065a67369676e6564a4626f6479c4d4" + GOLDEN_UPDATE + "a3736967c440"
    + GOLDEN_SIG.hex()
)


def _golden_update() -> UpdateMessage:
    t = Tensor.from_array("w", np.array([[-1, 0, -127]], np.int8), {"scale": 0.001})
    return UpdateMessage("flt", 3, 2, "dev1", "u001", 10, "int8", (t,), {"loss": 0.5}, 1073741824.0)


def test_golden_bytes_pinned() -> None:
    assert wire.encode(_golden_update()).hex() == GOLDEN_UPDATE
    assert wire.decode_update(bytes.fromhex(GOLDEN_UPDATE)) == _golden_update()
    body = bytes.fromhex(GOLDEN_UPDATE)
    assert wire.encode(SignedUpdate(body, GOLDEN_SIG)).hex() == GOLDEN_SIGNED
    received = wire.receive_update(bytes.fromhex(GOLDEN_SIGNED))
    assert received == wire.ReceivedUpdate(_golden_update(), body, GOLDEN_SIG)


def test_version_1_is_refused_bare_signed_or_inside_an_envelope() -> None:
    _reject(bytes.fromhex(GOLDEN_UPDATE_V1), RejectReason.SCHEMA)
    v1_body = bytes.fromhex(GOLDEN_UPDATE_V1)
    _reject(wire.encode(SignedUpdate(v1_body, GOLDEN_SIG)), RejectReason.SCHEMA)
    envelope = msgpack.unpackb(bytes.fromhex(GOLDEN_SIGNED), raw=False)
    envelope["v"] = 1
    _reject(_pack(envelope), RejectReason.SCHEMA)
    # v1 carried the signature inside the update map: such a payload is refused first
    v1_signed = {**msgpack.unpackb(v1_body, raw=False), "signature": GOLDEN_SIG}
    _reject(_pack(v1_signed), RejectReason.SCHEMA)


@pytest.mark.parametrize(
    "change",
    [
        {"body": "text"},
        {"body": b""},
        {"sig": b""},
        {"sig": b"s" * 513},
        {"sig": None},
        {"body": None},
        {"body": bytes.fromhex(GOLDEN_SIGNED)},  # an envelope in an envelope
        {"body": b"\xc1garbage"},
    ],
)
def test_bad_envelopes_are_rejected(change: dict[str, object]) -> None:
    envelope = msgpack.unpackb(bytes.fromhex(GOLDEN_SIGNED), raw=False)
    envelope.update(change)
    _reject(_pack({k: v for k, v in envelope.items() if v is not None}))


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
    for version in (1, 3, -1):
        m = _base_map()
        m["v"] = version
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


def test_data_must_be_whole_values_and_shapes_sane() -> None:
    # Whether the values fill the model shape is the codec's check (test_accumulate): the
    # wire only refuses bytes that are not whole values of the dtype, and absurd shapes.
    _reject(_with_tensor(dtype="float32", shape=[1], data=b"\x00" * 3), RejectReason.SHAPE)
    _reject(_with_tensor(dtype="float16", shape=[1], data=b"\x00" * 3), RejectReason.SHAPE)
    _reject(_with_tensor(shape=[-1]), RejectReason.SHAPE)
    _reject(_with_tensor(shape=[1] * 9), RejectReason.SHAPE)
    _reject(_with_tensor(shape=[2**20, 2**20]), RejectReason.TOO_LARGE)
    _reject(_with_tensor(extra={"index": "not bytes"}))
    _reject(_with_tensor(extra={str(i): b"" for i in range(9)}))
    _reject(_with_tensor(extra=[b"x"]))
    assert wire.decode_update(_with_tensor(shape=[2, 3])).tensors[0].count == 3


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


def test_training_config_has_one_serialisation() -> None:
    cfg = TrainingConfig(3, 0.1, "float16", 50, 0.5, {"mu": 0.01, "k": 4})
    assert TrainingConfig.from_dict(cfg.to_dict()) == cfg
    old_plan = {k: v for k, v in cfg.to_dict().items() if k != "params"}  # before params
    assert TrainingConfig.from_dict(old_plan) == TrainingConfig(3, 0.1, "float16", 50, 0.5)
    for bad in [
        {**cfg.to_dict(), "epochs": True},
        {**cfg.to_dict(), "epochs": "3"},
        {**cfg.to_dict(), "lr": "0.1"},
        {**cfg.to_dict(), "codec": "zip"},
        {**cfg.to_dict(), "params": {"mu": float("nan")}},
        {**cfg.to_dict(), "params": {"": 1}},
        {**cfg.to_dict(), "params": {"x": [1]}},
        {**cfg.to_dict(), "params": {str(i): 1 for i in range(33)}},
        {**cfg.to_dict(), "surprise": 1},
        [1, 2],
    ]:
        with pytest.raises(ValueError):
            TrainingConfig.from_dict(bad)


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


# ---------------------------------------------------------------- compressed downlink
GOLDEN_DELTA = (
    "8ba17602a474797065ab6d6f64656c2d64656c7461a5666c656574a3666c74a776657273696f6e05ac6261"
    "73655f76657273696f6e04a5726f756e6404a86d6f64656c5f6964a26d31a5636f646563a4696e7438a774"
    "656e736f72739185a46e616d65a177a56474797065a4696e7438a57368617065920103a6706172616d7381"
    "a57363616c65cb3f50624dd2f1a9fca464617461c403ff0081aa637265617465645f6174cb41d000000000"
    "0000a565706f6368a26531"
)
GOLDEN_INDEX = (
    "8da17602a474797065ab6d6f64656c2d696e646578a5666c656574a3666c74a776657273696f6e05a5726f"
    "756e6404a86d6f64656c5f6964a26d31a5636f646563a4696e7438b0736e617073686f745f76657273696f"
    "6e03ae736e617073686f745f6279746573cd0fa0a664656c7461739392037892047992057aa76d65747269"
    "637381a86163637572616379cb3fe0000000000000aa637265617465645f6174cb41d0000000000000a565"
    "706f6368a26531"
)


def _golden_delta() -> wire.ModelDelta:
    t = Tensor.from_array("w", np.array([[-1, 0, -127]], np.int8), {"scale": 0.001})
    return wire.ModelDelta("flt", 5, 4, 4, "m1", "int8", (t,), 1073741824.0, "e1")


def _golden_index() -> wire.ModelIndex:
    return wire.ModelIndex("flt", 5, 4, "m1", "int8", 3, 4000, ((3, 120), (4, 121), (5, 122)),
                           {"accuracy": 0.5}, 1073741824.0, "e1")


def test_downlink_golden_bytes_pinned() -> None:
    assert wire.encode(_golden_delta()).hex() == GOLDEN_DELTA
    assert wire.decode_model_delta(bytes.fromhex(GOLDEN_DELTA)) == _golden_delta()
    assert wire.encode(_golden_index()).hex() == GOLDEN_INDEX
    assert wire.decode_model_index(bytes.fromhex(GOLDEN_INDEX)) == _golden_index()
    assert wire.message_type(bytes.fromhex(GOLDEN_INDEX)) == "model-index"


def _delta_map(**changes: object) -> bytes:
    obj = msgpack.unpackb(bytes.fromhex(GOLDEN_DELTA), raw=False)
    obj.update(changes)
    return _pack({k: v for k, v in obj.items() if v is not None})


def _index_map(**changes: object) -> bytes:
    obj = msgpack.unpackb(bytes.fromhex(GOLDEN_INDEX), raw=False)
    obj.update(changes)
    return _pack({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("payload", "code", "match"),
    [
        (_delta_map(base_version=3), RejectReason.WRONG_BASE, "base version 3"),
        (_delta_map(version=0, base_version=0), RejectReason.MALFORMED, "version"),
        (_delta_map(codec="int9"), RejectReason.BAD_CODEC, "unknown codec"),
        (_delta_map(type="model"), RejectReason.MALFORMED, "expected a 'model-delta'"),
        (_delta_map(v=1), RejectReason.SCHEMA, "schema version"),
        (_delta_map(tensors=None), RejectReason.MALFORMED, "tensors"),
        (_delta_map(epoch="\x00"), RejectReason.MALFORMED, "epoch"),
    ],
)
def test_bad_model_deltas_are_refused(payload: bytes, code: str, match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        wire.decode_model_delta(payload)
    assert info.value.code == code


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (_index_map(snapshot_version=6), "snapshot version 6"),
        (_index_map(deltas=[[3, 120], [5, 122]]), "misses the deltas"),
        (_index_map(deltas=[[4, 1], [3, 1], [5, 1]]), "out of order"),
        (_index_map(deltas=[[3, 1], [4, 1], [5, 1], [6, 1]]), "out of order"),
        (_index_map(deltas=[[3, 1], [4, 0], [5, 1]]), "bytes"),
        (_index_map(deltas=[[3, 1, 2]]), "pairs"),
        (_index_map(deltas=[[v, 1] for v in range(1, 1100)], version=2000), "1024"),
        (_index_map(snapshot_bytes=0), "snapshot_bytes"),
        (_index_map(metrics={"accuracy": float("nan")}), "not finite"),
        (_index_map(codec="int9"), "unknown codec"),
    ],
)
def test_bad_model_indexes_are_refused(payload: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.decode_model_index(payload)


# ---------------------------------------------------------------- site gateways
# A gateway's partial (docs/scaling.md, "Site gateways"); `partial` is opaque to the wire
# (the FixedPointSum serialisation, checked against the model by the receiver).
GOLDEN_SITE_PARTIAL = (
    "8ba17602a474797065ac736974652d7061727469616ca5666c656574a3666c74a565706f6368a26531a572"
    "6f756e6404ac626173655f76657273696f6e03a767617465776179a467772d31aa7061727469616c5f6964"
    "a27031a76465766963657392a26431a26432a77061727469616cc4020102aa637265617465645f6174cb41"
    "d0000000000000"
)
GOLDEN_SIGNED_SITE_PARTIAL = (
    "84a17602a474797065a67369676e6564a4626f6479c488" + GOLDEN_SITE_PARTIAL + "a3736967c440"
    + GOLDEN_SIG.hex()
)


def _golden_site_partial() -> wire.SitePartial:
    return wire.SitePartial("flt", "e1", 4, 3, "gw-1", "p1", ("d1", "d2"), b"\x01\x02",
                            1073741824.0)


def test_site_partial_golden_bytes_pinned() -> None:
    assert wire.encode(_golden_site_partial()).hex() == GOLDEN_SITE_PARTIAL
    body = bytes.fromhex(GOLDEN_SITE_PARTIAL)
    assert wire.decode_site_partial(body) == _golden_site_partial()
    assert wire.message_type(body) == "site-partial"
    assert wire.encode(SignedUpdate(body, GOLDEN_SIG)).hex() == GOLDEN_SIGNED_SITE_PARTIAL
    received = wire.receive_site_partial(bytes.fromhex(GOLDEN_SIGNED_SITE_PARTIAL))
    assert received == wire.ReceivedSitePartial(_golden_site_partial(), body, GOLDEN_SIG)
    # a site partial is not an update, and an update is not a site partial
    _reject(body, RejectReason.MALFORMED)
    with pytest.raises(WireError, match="expected a 'site-partial'"):
        wire.receive_site_partial(bytes.fromhex(GOLDEN_SIGNED))


def _site_map(**changes: object) -> bytes:
    obj = msgpack.unpackb(bytes.fromhex(GOLDEN_SITE_PARTIAL), raw=False)
    obj.update(changes)
    return _pack({k: v for k, v in obj.items() if v is not None})


@pytest.mark.parametrize(
    ("payload", "code", "match"),
    [
        (_site_map(v=1), RejectReason.SCHEMA, "schema version"),
        (_site_map(epoch=None), RejectReason.MALFORMED, "epoch"),
        (_site_map(epoch=""), RejectReason.MALFORMED, "epoch"),
        (_site_map(devices=[]), RejectReason.MALFORMED, "1-100000 devices"),
        (_site_map(devices=["d2", "d1"]), RejectReason.MALFORMED, "sorted and unique"),
        (_site_map(devices=["d1", "d1"]), RejectReason.MALFORMED, "sorted and unique"),
        (_site_map(devices=["d/1"]), RejectReason.MALFORMED, "device id"),
        (_site_map(devices="d1"), RejectReason.MALFORMED, "devices"),
        (_site_map(gateway="gw+"), RejectReason.MALFORMED, "gateway"),
        (_site_map(partial=b""), RejectReason.MALFORMED, "partial"),
        (_site_map(partial="x"), RejectReason.MALFORMED, "partial"),
        (_site_map(partial_id="\x00"), RejectReason.MALFORMED, "partial_id"),
        (_site_map(round=-1), RejectReason.MALFORMED, "round"),
        (_site_map(base_version=True), RejectReason.MALFORMED, "base_version"),
        (_site_map(created_at=float("inf")), RejectReason.NON_FINITE, "created_at"),
        (_site_map(pickle=b"x"), RejectReason.MALFORMED, "unknown site partial fields"),
    ],
)
def test_bad_site_partials_are_refused(payload: bytes, code: str, match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        wire.decode_site_partial(payload)
    assert info.value.code == code


def test_site_partial_device_list_is_bounded_before_it_is_read() -> None:
    devices = [f"d{i:06d}" for i in range(11)]
    with pytest.raises(WireError, match="1-10 devices") as info:
        wire.decode_site_partial(_site_map(devices=devices), Limits(max_devices=10))
    assert info.value.code == RejectReason.TOO_LARGE


@given(devices=st.lists(device_ids, min_size=1, max_size=30, unique=True),
       partial=st.binary(min_size=1, max_size=64), round_id=st.integers(0, 2**40))
def test_site_partial_round_trip(devices: list[str], partial: bytes, round_id: int) -> None:
    msg = wire.SitePartial("f", "e" * 16, round_id, 7, "gw", "p" * 64, tuple(sorted(devices)),
                           partial, 1.5)
    assert wire.decode_site_partial(wire.encode(msg)) == msg
