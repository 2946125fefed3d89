"""Secure aggregation's pure core (fedmq/secagg): Shamir sharing, the mask PRG, the
neighbour graph, ring packing, and whole rounds through the client and server state
machines with real keys and signed, encoded messages."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.secagg import graph, ring, shamir
from fedmq.secagg.client import SecAggClient
from fedmq.secagg.common import sign
from fedmq.secagg.messages import KeysMsg, UnmaskMsg, decode, decode_signed, encode
from fedmq.secagg.prg import mask
from fedmq.secagg.server import SecAggServer
from fedmq.secagg.simulate import simulate_round
from fedmq.signing import DeviceKey


def _updates(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"d{i:03d}": rng.integers(-127, 128, length).astype(np.int8) for i in range(n)}


def _plain_sum(updates: dict[str, np.ndarray], devices: list[str] | tuple[str, ...]) -> np.ndarray:
    return np.sum([updates[d].astype(np.int64) for d in devices], axis=0)


# ---------------------------------------------------------------------------- Shamir


def test_shamir_any_threshold_subset_reconstructs() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 3, [1, 2, 5, 9, 11])
    for subset in ([1, 2, 5], [9, 11, 2], [11, 5, 1, 2]):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 32) == secret


def test_shamir_fewer_than_threshold_give_another_secret() -> None:
    secret = b"\x07" * 32
    shares = shamir.split(secret, 4, range(1, 8))
    with pytest.raises(Rejected):  # 3 points: some other field element, almost surely > 2^256
        shamir.reconstruct({x: shares[x] for x in (1, 2, 3)}, 32)


def test_shamir_share_bytes_round_trip_and_bounds() -> None:
    y = shamir.PRIME - 1
    assert shamir.share_from_bytes(shamir.share_to_bytes(y)) == y
    with pytest.raises(Rejected):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)  # >= PRIME
    with pytest.raises(Rejected):
        shamir.share_from_bytes(b"\x00" * 10)


# ---------------------------------------------------------------------------- PRG, graph, ring


def test_mask_is_deterministic_uniform_and_context_bound() -> None:
    seed = b"k" * 32
    a = mask(seed, 100_000, 12, b"ctx")
    assert np.array_equal(a, mask(seed, 100_000, 12, b"ctx"))
    assert a.max() < 4096 and abs(a.mean() - 2047.5) < 20
    assert not np.array_equal(a, mask(seed, 100_000, 12, b"ctx2"))


@pytest.mark.parametrize("n", [2, 5, 14, 50, 100, 1000])
def test_graph_is_symmetric_regular_and_logarithmic(n: int) -> None:
    devices = [f"d{i}" for i in range(n)]
    k = graph.default_degree(n)
    g = graph.neighbours(devices, k, b"round-7")
    assert all(len(g[d]) == k and d not in g[d] for d in devices)
    assert all(d in g[v] for d in devices for v in g[d])
    assert k <= 3 * math.ceil(math.log2(n)) + 1
    assert graph.neighbours(reversed(devices), k, b"round-7") == g
    t = graph.threshold(k)
    assert 2 * t > k and k - t >= k // 3
    if k == n - 1 and n >= 4:
        assert k - t == n // 3  # complete graph: a third of the round may drop


@pytest.mark.parametrize("bits", [8, 12, 15, 17, 32])
def test_pack_unpack_exact_and_tight(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 1 << bits, 70_001, dtype=np.uint64).astype(np.uint32)
    data = ring.pack(values, bits)
    assert len(data) == math.ceil(70_001 * bits / 8)
    assert np.array_equal(ring.unpack(data, bits, 70_001), values)
    with pytest.raises(Rejected):
        ring.unpack(data[:-1], bits, 70_001)


def test_unpack_refuses_nonzero_padding() -> None:
    data = bytearray(ring.pack(np.array([1, 2, 3], np.uint32), 12))  # 36 bits, 4 pad bits
    data[-1] |= 0x80
    with pytest.raises(Rejected):
        ring.unpack(bytes(data), 12, 3)


def test_ring_bits_hold_the_extreme_sum() -> None:
    for n in (1, 2, 3, 10, 100, 1000):
        b = ring.ring_bits(n)
        assert 2 ** (b - 1) >= 128 * n  # -127n .. 127n as signed b-bit values
        lo = np.full(1, (-127 * n) % (1 << b), np.uint32)
        assert ring.to_signed(lo, b)[0] == -127 * n


def test_quantize_fixed_scale_is_unbiased_within_clip() -> None:
    x = np.full(200_000, 0.3, np.float32)
    q = ring.quantize(x, 1.0, np.random.default_rng(0))
    assert q.dtype == np.int8 and abs(q.mean() / 127 - 0.3) < 1e-3
    assert ring.quantize(np.array([5.0, -5.0]), 1.0, np.random.default_rng(0)).tolist() == [
        127, -127]


# ---------------------------------------------------------------------------- whole rounds


@pytest.mark.parametrize("n", [3, 10, 40])
def test_unmasked_sum_equals_plain_integer_sum(n: int) -> None:
    updates = _updates(n, 1000, seed=n)
    sim = simulate_round(updates)
    assert sim.result is not None
    assert np.array_equal(sim.result.sum, _plain_sum(updates, sorted(updates)))
    assert sim.result.survivors == tuple(sorted(updates)) and sim.result.dropped == ()


def test_extreme_values_do_not_wrap() -> None:
    updates = {f"d{i}": np.full(64, -127 if i % 2 else 127, np.int8) for i in range(9)}
    updates.update({f"e{i}": np.full(64, -127, np.int8) for i in range(7)})
    sim = simulate_round(updates)
    assert sim.result is not None
    assert np.array_equal(sim.result.sum, _plain_sum(updates, sorted(updates)))


@pytest.mark.parametrize("n", [9, 40])
def test_dropout_after_sharing_up_to_a_third_is_recovered(n: int) -> None:
    updates = _updates(n, 500, seed=1)
    devices = sorted(updates)
    k = graph.default_degree(n)
    # Drop one third of the round, spread so no device loses more than k // 3 neighbours.
    g = graph.neighbours(devices, k, b"sim|e0|1")
    dropped: list[str] = []
    for d in devices:
        if len(dropped) >= n // 3:
            break
        if all(len(g[v] & set([*dropped, d])) <= k // 3 for v in devices):
            dropped.append(d)
    assert len(dropped) >= min(n // 3, k // 3)
    sim = simulate_round(updates, drop_after_shares=dropped)
    assert sim.result is not None
    survivors = [d for d in devices if d not in dropped]
    assert sim.result.survivors == tuple(survivors)
    assert sim.result.dropped == tuple(sorted(dropped))
    assert np.array_equal(sim.result.sum, _plain_sum(updates, survivors))


def test_complete_graph_tolerates_a_third_dropping_in_any_phase() -> None:
    updates = _updates(9, 300, seed=2)  # n = 9: complete graph, k = 8, t = 5
    sim = simulate_round(updates, drop_before_shares=["d000"], drop_after_shares=["d001"],
                         drop_before_unmask=["d002"])
    assert sim.result is not None
    survivors = [d for d in sorted(updates) if d not in ("d000", "d001")]
    assert np.array_equal(sim.result.sum, _plain_sum(updates, survivors))


def test_too_many_dropouts_abandon_with_a_reason() -> None:
    updates = _updates(9, 100, seed=3)
    sim = simulate_round(updates, drop_after_shares=["d000", "d001"],
                         drop_before_unmask=["d002", "d003"])  # 4 of 8 neighbours gone
    assert sim.result is None and sim.server.phase == "abandoned"
    assert "not enough shares to unmask" in sim.server.reason
    sim = simulate_round(updates, min_survivors=8, drop_after_shares=["d000", "d001"])
    assert sim.server.phase == "abandoned" and "7 masked inputs" in sim.server.reason


def test_a_masked_update_does_not_correlate_with_the_update() -> None:
    updates = _updates(10, 20_000, seed=4)
    captured: dict[str, bytes] = {}

    def keep(device: str, phase: str, payload: bytes) -> bytes:
        if phase == "masked":
            captured[device] = payload
        return payload

    sim = simulate_round(updates, tamper=keep)
    assert sim.result is not None
    bits = sim.server.bits
    for d in ("d000", "d005"):
        _, msg = decode_signed(captured[d])
        masked = ring.to_signed(ring.unpack(msg.data, bits, 20_000), bits)  # type: ignore[union-attr]
        r = np.corrcoef(masked.astype(np.float64), updates[d].astype(np.float64))[0, 1]
        assert abs(r) < 0.03  # 4.2 standard errors at n = 20,000
        assert np.ptp(masked) > 0.9 * 2**bits  # spread over the whole ring


def _retamper_unmask(liar: str, key: DeviceKey):  # type: ignore[no-untyped-def]
    def tamper(device: str, phase: str, payload: bytes) -> bytes:
        if device != liar or phase != "unmask":
            return payload
        _, msg = decode_signed(payload)
        assert isinstance(msg, UnmaskMsg)
        r0 = msg.reveals[0]
        bad = bytes([r0.share[0] ^ 1]) + r0.share[1:]
        lied = UnmaskMsg(msg.fleet, msg.epoch, msg.round_id, msg.device,
                         (type(r0)(r0.of, r0.kind, bad, r0.nonce), *msg.reveals[1:]))
        return sign(lied, key)
    return tamper


def test_a_lying_share_is_detected_and_named_and_the_sum_is_still_exact() -> None:
    updates = _updates(9, 200, seed=5)
    keys = {d: DeviceKey.generate() for d in updates}
    with pytest.raises(Rejected) as err:
        simulate_round(updates, keys=keys, tamper=_retamper_unmask("d004", keys["d004"]))
    assert err.value.code == RejectReason.BAD_SHARE and "d004" in str(err.value)


def test_a_liar_among_unmaskers_cannot_change_the_sum() -> None:
    updates = _updates(9, 200, seed=6)
    keys = {d: DeviceKey.generate() for d in updates}
    sim = simulate_round(updates, keys=keys, tamper=_retamper_unmask("d004", keys["d004"]),
                         strict=False)  # the lying message is rejected, the round goes on
    assert sim.result is not None and sim.server.liars == {"d004"}
    assert sim.server.rejected[RejectReason.BAD_SHARE] == 1
    assert np.array_equal(sim.result.sum, _plain_sum(updates, sorted(updates)))


def test_a_dealer_with_inconsistent_shares_is_named() -> None:
    updates = _updates(9, 100, seed=7)
    keys = {d: DeviceKey.generate() for d in updates}
    liar = "d003"
    original = shamir.split

    def bad_split(secret: bytes, threshold: int, xs):  # type: ignore[no-untyped-def]
        shares = original(secret, threshold, xs)
        if bad_split.active:  # type: ignore[attr-defined]
            first = next(iter(shares))
            shares[first] = (shares[first] + 1) % shamir.PRIME
        return shares

    bad_split.active = False  # type: ignore[attr-defined]
    orig_roster = SecAggClient.on_roster

    def on_roster(self: SecAggClient, payload: bytes) -> bytes:
        bad_split.active = self.device == liar  # type: ignore[attr-defined]
        try:
            return orig_roster(self, payload)
        finally:
            bad_split.active = False  # type: ignore[attr-defined]

    shamir.split = bad_split  # type: ignore[assignment]
    SecAggClient.on_roster = on_roster  # type: ignore[method-assign]
    try:
        with pytest.raises(Rejected) as err:
            simulate_round(updates, keys=keys)
    finally:
        shamir.split = original
        SecAggClient.on_roster = orig_roster  # type: ignore[method-assign]
    assert err.value.code == RejectReason.BAD_SHARE and liar in str(err.value)


# ---------------------------------------------------------------------------- server rejects


def _server(devices: list[str], keys: dict[str, DeviceKey]) -> SecAggServer:
    public = {d: keys[d].public_hex for d in devices}
    return SecAggServer("f", "e", 4, clip=1.0, length=10, public_key=public.get,
                        min_survivors=2, selected=devices)


def test_server_rejects_wrong_round_phase_signature_and_unknown_devices() -> None:
    devices = ["a", "b", "c"]
    keys = {d: DeviceKey.generate() for d in devices}
    server = _server(devices, keys)
    clients = {d: SecAggClient("f", "e", 4, d, keys[d]) for d in devices}

    def code(payload: bytes, device: str) -> str:
        with pytest.raises(Rejected) as err:
            server.receive(payload, device)
        return err.value.code

    other_round = SecAggClient("f", "e", 5, "a", keys["a"]).advertise()
    assert code(other_round, "a") == RejectReason.WRONG_ROUND
    assert code(SecAggClient("g", "e", 4, "a", keys["a"]).advertise(), "a") == \
        RejectReason.WRONG_FLEET
    stranger = DeviceKey.generate()
    assert code(SecAggClient("f", "e", 4, "a", stranger).advertise(), "a") == \
        RejectReason.BAD_SIGNATURE
    assert code(SecAggClient("f", "e", 4, "z", stranger).advertise(), "z") == \
        RejectReason.UNKNOWN_DEVICE
    assert code(clients["a"].advertise(), "b") == RejectReason.DEVICE_MISMATCH
    unsigned = encode(KeysMsg("f", "e", 4, "a", b"1" * 32, b"2" * 32))
    assert code(unsigned, "a") == RejectReason.UNSIGNED
    for d in devices:
        server.receive(clients[d].advertise(), d)
    assert code(clients["a"].advertise(), "a") == RejectReason.DUPLICATE
    ((_, roster),) = server.close_phase()
    assert code(SecAggClient("f", "e", 4, "a", keys["a"]).advertise(), "a") == \
        RejectReason.WRONG_PHASE
    shares = clients["a"].on_roster(roster)
    _, msg = decode_signed(shares)
    forged = type(msg)(msg.fleet, msg.epoch, msg.round_id, msg.device, msg.b_commit,  # type: ignore[call-arg, union-attr]
                       (*msg.shares, type(msg.shares[0])("x", b"1", b"2" * 32, b"3" * 32)))  # type: ignore[union-attr]
    assert code(sign(forged, keys["a"]), "a") == RejectReason.UNKNOWN_DEVICE
    server.receive(shares, "a")
    assert code(shares, "a") == RejectReason.DUPLICATE
    assert server.rejected[RejectReason.UNKNOWN_DEVICE] == 2
    assert sum(server.rejected.values()) == 10


def test_decoder_is_strict() -> None:
    good = encode(KeysMsg("f", "e", 4, "a", b"1" * 32, b"2" * 32))
    assert decode(good) == KeysMsg("f", "e", 4, "a", b"1" * 32, b"2" * 32)
    obj = msgpack.unpackb(good)
    for key, value in (("c_pk", b"1" * 31), ("round", 0), ("device", "a/b"), ("v", 1),
                       ("type", "sa_nope"), ("fleet", 3), ("round", True)):
        bad = dict(obj, **{key: value})
        with pytest.raises(WireError):
            decode(msgpack.packb(bad))
    with pytest.raises(WireError):
        decode(b"\xc1")


def test_a_device_with_the_fleet_keys_refuses_a_substituted_advertisement() -> None:
    devices = ["a", "b", "c"]
    keys = {d: DeviceKey.generate() for d in devices}
    public = {d: keys[d].public_hex for d in devices}
    server = SecAggServer("f", "e", 4, clip=1.0, length=10, public_key=public.get,
                          min_survivors=2, selected=devices)
    checking = SecAggClient("f", "e", 4, "a", keys["a"], peer_keys=public)
    trusting = SecAggClient("f", "e", 4, "c", keys["c"])  # no fleet keys: trusts the relay
    for d, client in (("a", checking), ("b", SecAggClient("f", "e", 4, "b", keys["b"])),
                      ("c", trusting)):
        server.receive(client.advertise(), d)
    # A dishonest aggregator swaps b's keys for its own (signed by a key it holds).
    server._adverts["b"] = SecAggClient("f", "e", 4, "b", DeviceKey.generate()).advertise()
    ((_, roster),) = server.close_phase()
    with pytest.raises(Rejected) as err:
        checking.on_roster(roster)
    assert err.value.code == RejectReason.BAD_SIGNATURE and "'b'" in err.value.reason
    trusting.on_roster(roster)  # the documented limit without peer keys
