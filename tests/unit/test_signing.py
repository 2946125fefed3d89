"""Ed25519 update signatures and the device registry."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq import wire
from fedmq.errors import Rejected, RejectReason, SecurityError
from fedmq.signing import DeviceKey, Registry, load_or_create_key, sign_update, verify_update
from fedmq.update import codecs


def _update(device: str = "dev-1") -> wire.UpdateMessage:
    t = codecs.encode_delta({"w": np.ones((3, 2), np.float32)}, "int8", np.random.default_rng(0))
    return wire.UpdateMessage("f", 4, 3, device, "u1", 10, "int8", t)


def _envelope(payload: bytes) -> tuple[bytes, bytes]:
    obj = msgpack.unpackb(payload, raw=False)
    assert obj["v"] == wire.SCHEMA_VERSION and obj["type"] == "signed"
    return obj["body"], obj["sig"]


def test_signed_update_verifies_after_the_wire() -> None:
    key = DeviceKey.generate()
    payload = sign_update(_update(), key)
    received = wire.receive_update(payload)
    assert received.message == _update()
    assert received.body == wire.encode(_update())  # the signed bytes are the update's own
    verify_update(received, key.public_hex)


def test_the_signature_covers_the_bytes_received_not_a_re_encoding() -> None:
    # A client whose msgpack differs from ours (here: a map with its keys in another order,
    # and float64 where we would write an int) still verifies: nothing is re-encoded.
    key = DeviceKey.generate()
    obj = msgpack.unpackb(wire.encode(_update()), raw=False)
    body = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    assert body != wire.encode(_update())
    payload = wire.encode(wire.SignedUpdate(body, key.sign(body)))
    received = wire.receive_update(payload)
    assert received.message == _update()
    verify_update(received, key.public_hex)


@pytest.mark.parametrize(
    "change",
    [
        {"round_id": 5},
        {"device": "dev-2"},
        {"num_examples": 11},
        {"update_id": "u2"},
        {"base_version": 2},
    ],
)
def test_any_change_breaks_the_signature(change: dict[str, object]) -> None:
    key = DeviceKey.generate()
    _, sig = _envelope(sign_update(_update(), key))
    tampered = wire.encode(replace(_update(), **change))  # type: ignore[arg-type]
    received = wire.receive_update(wire.encode(wire.SignedUpdate(tampered, sig)))
    with pytest.raises(Rejected) as e:
        verify_update(received, key.public_hex)
    assert e.value.code == RejectReason.BAD_SIGNATURE


def test_tensor_bytes_are_covered() -> None:
    key = DeviceKey.generate()
    body, sig = _envelope(sign_update(_update(), key))
    t = _update().tensors[0]
    flipped = wire.Tensor(t.name, t.dtype, t.shape, bytes([t.data[0] ^ 1]) + t.data[1:], t.params)
    forged = wire.encode(replace(_update(), tensors=(flipped,)))
    assert len(forged) == len(body) and forged != body
    with pytest.raises(Rejected) as e:
        verify_update(wire.receive_update(wire.encode(wire.SignedUpdate(forged, sig))),
                      key.public_hex)
    assert e.value.code == RejectReason.BAD_SIGNATURE


def test_unsigned_unknown_and_other_key() -> None:
    key, other = DeviceKey.generate(), DeviceKey.generate()
    with pytest.raises(Rejected) as e:
        verify_update(wire.receive_update(wire.encode(_update())), key.public_hex)
    assert e.value.code == RejectReason.UNSIGNED
    with pytest.raises(Rejected) as e:
        verify_update(wire.receive_update(sign_update(_update(), key)), None)
    assert e.value.code == RejectReason.UNKNOWN_DEVICE
    with pytest.raises(Rejected) as e:
        verify_update(wire.receive_update(sign_update(_update(), other)), key.public_hex)
    assert e.value.code == RejectReason.BAD_SIGNATURE


def test_key_file_and_registry(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "device.key"
    k1 = load_or_create_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_key(path).public_hex == k1.public_hex
    reg = Registry(tmp_path / "devices.json")
    assert reg.public_key("dev-1") is None
    reg.enroll("dev-1", k1.public_hex)
    assert Registry(tmp_path / "devices.json").public_key("dev-1") == k1.public_hex
    with pytest.raises(SecurityError):
        reg.enroll("dev-2", "abcd")
    assert reg.revoke("dev-1") and reg.public_key("dev-1") is None
