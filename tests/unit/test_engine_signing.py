"""The engine with a device registry: signed updates in, forgeries and replays out."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, load_aggregator_config
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq.errors import ConfigError, RejectReason
from fedmq.models.spec import ModelBundle
from fedmq.signing import DeviceKey, Registry
from fedmq.wire import AckMessage, SignedUpdate, Tensor, encode, receive_update
from tests.fakes import exact_delta, make_update, raw_update

T0 = 1_000.0
FLEET = "f"


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


@pytest.fixture
def keys() -> dict[str, DeviceKey]:
    return {d: DeviceKey.generate() for d in ("a", "b", "c")}


@pytest.fixture
def registry(tmp_path: Path, keys: Mapping[str, DeviceKey]) -> Registry:
    reg = Registry(tmp_path / "devices.json")
    for device, key in keys.items():
        reg.enroll(device, key.public_hex)
    return reg


def _config(tmp_path: Path, registry: Registry | None, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": FLEET, "state_dir": tmp_path / "state", "eval_dataset": "none",
        "codec": "float32", "selection": "any", "clients_per_round": 2, "min_updates": 2,
        "round_timeout": 60.0, "abandon_after": 30.0, "max_update_bytes": 64 * 1024,
        "registry": None if registry is None else str(registry.path),
    }
    base.update(kw)
    return AggregatorConfig(**base)


class Harness:
    def __init__(self, cfg: AggregatorConfig, bundle: ModelBundle) -> None:
        self.engine = Engine(cfg, Store(cfg.state_dir), bundle)
        self.engine.start(T0)
        self.shapes = dict(self.engine.template)

    def payload(self, device: str, key: DeviceKey | None, *, round_id: int = 1, base: int = 0,
                uid: str | None = None, seed: int = 0, payload_device: str | None = None) -> bytes:
        return make_update(FLEET, round_id, base, payload_device or device,
                           exact_delta(self.shapes, seed), 4, "float32", uid or f"u-{device}",
                           key=key)

    def send(self, device: str, payload: bytes, now: float = T0 + 1) -> AckMessage:
        return self.engine.handle_update(device, payload, now)

    def rejected(self, code: str) -> float:
        return self.engine.metrics.value("fedmq_updates_rejected_total", {"reason": code})

    def close(self) -> None:
        self.engine.store.close()


@pytest.fixture
def harness(tmp_path: Path, registry: Registry, bundle: ModelBundle) -> Iterator[Harness]:
    h = Harness(_config(tmp_path, registry), bundle)
    yield h
    h.close()


def test_signatures_are_required_by_default_once_a_registry_is_set(
    tmp_path: Path, registry: Registry
) -> None:
    assert _config(tmp_path, registry).signatures_required
    assert not _config(tmp_path, None).signatures_required
    assert not _config(tmp_path, registry, require_signatures=False).signatures_required
    with pytest.raises(ConfigError, match="registry"):
        _config(tmp_path, None, require_signatures=True)
    env = {"FEDMQ_AGGREGATOR_REGISTRY": str(registry.path),
           "FEDMQ_AGGREGATOR_REQUIRE_SIGNATURES": "false"}
    cfg = load_aggregator_config(environ=env)
    assert cfg.registry == str(registry.path) and cfg.require_signatures is False


def test_signed_updates_of_enrolled_devices_are_folded(
    harness: Harness, keys: Mapping[str, DeviceKey]
) -> None:
    for i, d in enumerate(("a", "b")):
        ack = harness.send(d, harness.payload(d, keys[d], seed=i))
        assert ack.accepted and ack.code == "ok", ack
    out = harness.engine.tick(T0 + 2)
    assert any(o.topic.endswith("/model") for o in out)
    assert harness.engine.version == 1
    assert harness.engine.store.history()[0].participants == 2


@pytest.mark.parametrize("case", ["unknown", "unsigned", "forged", "tampered", "other_key"])
def test_unauthenticated_updates_are_rejected_with_their_code(
    harness: Harness, keys: Mapping[str, DeviceKey], case: str
) -> None:
    stranger = DeviceKey.generate()
    if case == "unknown":  # not enrolled (its own valid signature does not help)
        device, payload, code = "z", harness.payload("z", stranger), RejectReason.UNKNOWN_DEVICE
    elif case == "unsigned":
        device, payload, code = "a", harness.payload("a", None), RejectReason.UNSIGNED
    elif case == "forged":  # signed by a key that is not enrolled
        device, payload, code = "a", harness.payload("a", stranger), RejectReason.BAD_SIGNATURE
    elif case == "other_key":  # signed by another enrolled device's key
        device, payload, code = "a", harness.payload("a", keys["b"]), RejectReason.BAD_SIGNATURE
    else:  # a valid signature, then one weight changed
        received = receive_update(harness.payload("a", keys["a"]))
        signed = received.message
        t0 = signed.tensors[0]
        data = bytearray(t0.data)
        data[0] ^= 0x01
        forged_t = dataclasses.replace(t0, data=bytes(data))
        msg = dataclasses.replace(signed, tensors=(forged_t, *signed.tensors[1:]))
        assert received.signature is not None
        payload = encode(SignedUpdate(encode(msg), received.signature))
        device, code = "a", RejectReason.BAD_SIGNATURE
    ack = harness.send(device, payload)
    assert not ack.accepted and ack.code == code, ack
    assert ack.device == device and ack.round_id == 1
    assert harness.rejected(code) == 1
    assert harness.engine.store.reject_counts(1) == {code: 1}
    assert harness.engine.round is not None and harness.engine.round.count == 0
    # the genuine update of that device is still accepted afterwards
    if device in keys:
        assert harness.send(device, harness.payload(device, keys[device], uid="fresh")).accepted


def test_authentication_runs_before_the_round_checks(
    harness: Harness, keys: Mapping[str, DeviceKey]
) -> None:
    # An unsigned update for a future round reveals nothing about the open round: the ack
    # says "unsigned", not "wrong_round".
    ack = harness.send("a", harness.payload("a", None, round_id=7, base=3))
    assert ack.code == RejectReason.UNSIGNED and ack.round_id == 7
    # the topic identity is checked first: b cannot submit a's (validly signed) update
    ack = harness.send("b", harness.payload("b", keys["a"], payload_device="a"))
    assert ack.code == RejectReason.DEVICE_MISMATCH
    # a signed update of a stale round is authenticated, then refused by the round check
    ack = harness.send("a", harness.payload("a", keys["a"], round_id=7, base=3))
    assert ack.code == RejectReason.WRONG_ROUND


def test_replays_are_duplicates_of_their_round_and_never_folded_again(
    harness: Harness, keys: Mapping[str, DeviceKey]
) -> None:
    signed_a = harness.payload("a", keys["a"], uid="ua")
    assert harness.send("a", signed_a).accepted
    again = harness.send("a", signed_a)
    assert (again.accepted, again.code, again.round_id) == (True, RejectReason.DUPLICATE, 1)
    assert harness.send("b", harness.payload("b", keys["b"], uid="ub", seed=1)).accepted
    harness.engine.tick(T0 + 2)
    assert harness.engine.round is not None and harness.engine.round.round_id == 2
    # a replay (or a redelivery) into a later round is the same folded update: duplicate,
    # naming the round it was folded in, and not folded into round 2
    replay = harness.send("a", signed_a, now=T0 + 3)
    assert (replay.accepted, replay.code, replay.round_id) == (True, RejectReason.DUPLICATE, 1)
    assert harness.engine.round.count == 0
    # re-labelling the old update for round 2 breaks the signature (it covers the round)
    received = receive_update(signed_a)
    assert received.signature is not None
    moved_msg = dataclasses.replace(received.message, round_id=2, base_version=1, update_id="ua2")
    moved = encode(SignedUpdate(encode(moved_msg), received.signature))
    ack = harness.send("a", moved, now=T0 + 3)
    assert ack.code == RejectReason.BAD_SIGNATURE
    assert harness.rejected(RejectReason.DUPLICATE) == 0
    assert harness.rejected(RejectReason.WRONG_ROUND) == 0


def test_enrolment_and_revocation_apply_without_a_restart(
    harness: Harness, registry: Registry, keys: Mapping[str, DeviceKey]
) -> None:
    late = DeviceKey.generate()
    assert harness.send("late", harness.payload("late", late)).code == RejectReason.UNKNOWN_DEVICE
    registry.enroll("late", late.public_hex)
    assert harness.send("late", harness.payload("late", late, uid="u2")).accepted
    registry.revoke("a")
    ack = harness.send("a", harness.payload("a", keys["a"]))
    assert ack.code == RejectReason.UNKNOWN_DEVICE


def test_a_broken_registry_edit_keeps_the_last_good_one(
    harness: Harness, registry: Registry, keys: Mapping[str, DeviceKey]
) -> None:
    assert harness.send("a", harness.payload("a", keys["a"])).accepted
    registry.path.write_text("{not json")
    assert harness.send("b", harness.payload("b", keys["b"], seed=1)).accepted


def test_an_unreadable_registry_stops_the_start(tmp_path: Path, bundle: ModelBundle) -> None:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": []}))
    cfg = _config(tmp_path, Registry(path))
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    try:
        with pytest.raises(ConfigError, match="malformed"):
            engine.start(T0)
    finally:
        engine.store.close()


def test_optional_mode_verifies_only_signed_updates_of_enrolled_devices(
    tmp_path: Path, registry: Registry, bundle: ModelBundle, keys: Mapping[str, DeviceKey]
) -> None:
    h = Harness(_config(tmp_path, registry, require_signatures=False, clients_per_round=4,
                        min_updates=4), bundle)
    try:
        assert h.send("a", h.payload("a", None)).accepted  # unsigned: allowed
        assert h.send("z", h.payload("z", DeviceKey.generate())).accepted  # not enrolled
        assert h.send("b", h.payload("b", keys["b"])).accepted
        ack = h.send("c", h.payload("c", DeviceKey.generate()))
        assert ack.code == RejectReason.BAD_SIGNATURE
    finally:
        h.close()


def test_without_a_registry_signatures_are_ignored(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    h = Harness(_config(tmp_path, None), bundle)
    try:
        assert h.send("a", h.payload("a", DeviceKey.generate())).accepted
        assert h.send("b", h.payload("b", None)).accepted
    finally:
        h.close()


def test_journaled_signed_updates_refold_after_a_restart(
    tmp_path: Path, registry: Registry, bundle: ModelBundle, keys: Mapping[str, DeviceKey]
) -> None:
    cfg = _config(tmp_path, registry)
    h = Harness(cfg, bundle)
    assert h.send("a", h.payload("a", keys["a"])).accepted
    h.close()
    h2 = Harness(cfg, bundle)
    try:
        assert h2.engine.round is not None and h2.engine.round.count == 1
        dup = h2.send("a", h.payload("a", keys["a"]))
        assert dup.code == RejectReason.DUPLICATE
        assert h2.send("b", h2.payload("b", keys["b"], seed=1)).accepted
        h2.engine.tick(T0 + 2)
        assert h2.engine.version == 1
        np.testing.assert_equal(h2.engine.store.history()[0].participants, 2)
    finally:
        h2.close()


def test_a_signed_update_refused_by_the_decoder_is_acked_with_its_own_ids(
    harness: Harness, keys: Mapping[str, DeviceKey]
) -> None:
    # The ids of a rejected signed update are inside the envelope's body: the ack names
    # them, so the device can match it to its outbox entry.
    nan = [Tensor.from_array(n, np.full(s, np.nan, np.float32))
           for n, s in harness.shapes.items()]
    body = raw_update(FLEET, 7, 0, "a", nan, update_id="u-nan")
    payload = encode(SignedUpdate(body, keys["a"].sign(body)))
    ack = harness.send("a", payload)
    assert (ack.accepted, ack.code) == (False, RejectReason.NON_FINITE)
    assert (ack.update_id, ack.round_id) == ("u-nan", 7)
