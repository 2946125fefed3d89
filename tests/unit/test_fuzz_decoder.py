"""Fuzzing the update decoder and the aggregator's pure checks with hypothesis.

Thousands of malformed or adversarial payloads (tests/fuzz_payloads.py: mutations of valid
updates; arbitrary bytes; arbitrary msgpack structures). Properties: decoding raises nothing
but :class:`WireError` (and never hangs: pytest-timeout); what decodes is finite and
consistent; what the round and the model accept folds into a finite running sum. The other
decoders (model, round, ack, status) get the same bytes. Prints payloads fuzzed and outcomes.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.partial_receiver import read_partial
from aggregator.round_state import RoundPlan, RoundState
from edge_agent.downlink import DownlinkReceiver
from fedmq.chunks import Reassembler, ReassemblyLimits, transfer_id
from fedmq.downlink import apply_delta, delta_topic
from fedmq.errors import Rejected, WireError
from fedmq.secagg import messages as secagg_messages
from fedmq.topics import Topics
from fedmq.update.accumulate import CheckedUpdate, WeightedSum
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import (
    Limits,
    ModelIndex,
    TrainingConfig,
    decode_ack,
    decode_chunk,
    decode_manifest,
    decode_model,
    decode_model_delta,
    decode_model_index,
    decode_round,
    decode_site_partial,
    decode_status,
    decode_update,
    encode,
    message_type,
    receive_site_partial,
)
from tests.fuzz_payloads import (
    CHUNK_DAMAGE,
    DOWNLINK_DAMAGE,
    KINDS,
    LOW_BIT_CODECS,
    SECAGG_DAMAGE,
    SITE_PARTIAL_DAMAGE,
    SPARSE_DAMAGE,
    fuzz_chunks,
    fuzz_downlink,
    fuzz_payload,
    fuzz_secagg,
    fuzz_site_partial,
    sparse_damage,
    valid_delta_map,
    valid_index_map,
    valid_site_partial_map,
    valid_update_map,
)

FLEET = "f1"
DEVICE = "dev-1"
TEMPLATE = {"w": (4, 3), "b": (3,)}
LIMITS = Limits(max_bytes=256 * 1024)
MAX_CLAIMED_EXAMPLES = 10_000_000
PLAN = RoundPlan(
    round_id=3, base_version=2, selected=(), target=10, min_updates=1, opened_at=0.0,
    deadline=100.0, abandon_at=200.0, config=TrainingConfig(),
)
_SETTINGS = {
    "deadline": None,
    "suppress_health_check": list(HealthCheck),  # a loaded CI machine is not a failure
}
_OTHER_DECODERS: tuple[Callable[[bytes], object], ...] = (
    decode_model, decode_round, decode_ack, decode_status, message_type, decode_chunk,
    decode_manifest, secagg_messages.decode, secagg_messages.decode_signed,
    decode_model_delta, decode_model_index, decode_site_partial,
)


class _Tally:
    def __init__(self) -> None:
        self.n = 0
        self.outcomes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.slowest = 0.0

    def report(self, what: str) -> None:
        print(
            f"\nfuzz {what}: {self.n} payloads; outcomes {dict(self.outcomes.most_common())}; "
            f"kinds {dict(self.kinds)}; slowest payload {self.slowest * 1000:.1f} ms"
        )


def _outcome(payload: bytes, plan: RoundPlan = PLAN) -> str:
    """Decode + the aggregator's pure checks + fold; the reject code or 'accepted'."""
    for decode in _OTHER_DECODERS:
        with contextlib.suppress(WireError):
            decode(payload)
    try:
        msg = decode_update(payload, LIMITS)
    except Rejected as exc:
        assert exc.code and exc.reason
        return exc.code
    assert len(payload) <= LIMITS.max_bytes
    for t in msg.tensors:
        values = t.values()
        assert values.size == t.count and len(t.data) == t.count * values.itemsize
        if t.dtype in ("float32", "float16"):
            assert np.isfinite(values).all()
    state = RoundState(FLEET, plan, MAX_CLAIMED_EXAMPLES)
    fold = WeightedSum(TEMPLATE)
    weight = float(msg.num_examples)
    checked: list[CheckedUpdate] = []
    try:
        state.check(msg, DEVICE, lambda m: checked.append(fold.check(m.tensors, m.codec, weight)))
    except Rejected as exc:
        return exc.code
    # Accepted: adding must work and keep the running sum (and so the model) finite, also
    # when the same update arrives again from another device (or is refused before adding).
    fold.add(checked[0])
    try:
        again = fold.check(msg.tensors, msg.codec, weight)
    except Rejected:
        pass
    else:
        fold.add(again)
    for name, mean in fold.mean().items():
        assert np.isfinite(mean).all(), f"{name}: the running sum overflowed"
    return "accepted"


def _run(tally: _Tally, kind: str, payload: bytes) -> None:
    started = time.perf_counter()
    outcome = _outcome(payload)
    tally.slowest = max(tally.slowest, time.perf_counter() - started)
    tally.n += 1
    tally.kinds[kind] += 1
    tally.outcomes[outcome] += 1


@pytest.mark.timeout(300)
def test_mutated_updates_raise_only_wire_errors() -> None:
    tally = _Tally()

    @settings(max_examples=6000, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(KINDS))
    def check(rng: random.Random, kind: str) -> None:
        device = DEVICE if rng.random() < 0.9 else "dev-2"
        base = valid_update_map(rng, TEMPLATE, fleet=FLEET, round_id=PLAN.round_id,
                                base_version=PLAN.base_version, device=device)
        kind, payload = fuzz_payload(rng, base, kind)
        _run(tally, kind, payload)

    check()
    tally.report("mutated updates")
    assert tally.n >= 6000
    assert sum(n for k, n in tally.outcomes.items() if k != "accepted") > tally.n * 0.8


@pytest.mark.timeout(120)
def test_arbitrary_bytes_raise_only_wire_errors() -> None:
    tally = _Tally()

    @settings(max_examples=1500, **_SETTINGS)  # type: ignore[arg-type]
    @given(payload=st.binary(max_size=4096))
    def check(payload: bytes) -> None:
        _run(tally, "binary", payload)

    check()
    tally.report("arbitrary bytes")
    assert tally.n >= 1500 and tally.outcomes["accepted"] == 0


_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=80) | st.binary(max_size=80)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
)
_keys = st.sampled_from(
    ["v", "type", "fleet", "round", "base_version", "device", "update_id", "num_examples",
     "codec", "tensors", "name", "dtype", "shape", "params", "data", "scale", "x"]
) | st.text(max_size=8)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_keys, inner, max_size=8),
    max_leaves=20,
)
_update_like = st.fixed_dictionaries(
    {"v": st.just(2) | st.just(1) | _scalars,
     "type": st.just("update") | st.just("signed") | _scalars},
    optional={k: _values for k in ("fleet", "round", "base_version", "device", "update_id",
                                   "num_examples", "codec", "tensors", "metrics", "body",
                                   "sig")},
)


@pytest.mark.timeout(120)
def test_arbitrary_msgpack_structures_raise_only_wire_errors() -> None:
    tally = _Tally()

    @settings(max_examples=1000, **_SETTINGS)  # type: ignore[arg-type]
    @given(obj=_update_like | _values)
    def check(obj: object) -> None:
        payload = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(payload, bytes)
        _run(tally, "structure", payload)

    check()
    tally.report("msgpack structures")
    assert tally.n >= 1000


def test_every_mutation_kind_is_exercised_by_a_seeded_run() -> None:
    """A fixed-seed sweep (the generator the broker-path fuzz test uses) over each kind."""
    tally = _Tally()
    rng = random.Random(1234)
    for kind in KINDS:
        for _ in range(100):
            base = valid_update_map(rng, TEMPLATE, fleet=FLEET, round_id=PLAN.round_id,
                                    base_version=PLAN.base_version, device=DEVICE)
            _run(tally, *fuzz_payload(rng, base, kind))
    tally.report("seeded sweep")
    assert set(tally.kinds) == set(KINDS)
    assert len(tally.outcomes) >= 8  # many distinct reject reasons, not one catch-all


def _plan(codec: str) -> RoundPlan:
    return RoundPlan(
        round_id=3, base_version=2, selected=(), target=10, min_updates=1, opened_at=0.0,
        deadline=100.0, abandon_at=200.0, config=TrainingConfig(codec=codec),
    )


@pytest.mark.parametrize("codec", LOW_BIT_CODECS)
def test_damaged_sparse_and_int4_tensors_are_refused_with_a_reason(codec: str) -> None:
    """Each damage of a sparse or 4-bit tensor, in a round that asked for that codec (so the
    codec's own check is what refuses it), ends as bad_codec or shape_mismatch; the same
    update undamaged is accepted; other mutations of these payloads raise only WireError."""
    plan = _plan(codec)
    rng = random.Random(99)
    tally = _Tally()
    for op in SPARSE_DAMAGE:
        for _ in range(10):
            base = valid_update_map(rng, TEMPLATE, fleet=FLEET, round_id=3, base_version=2,
                                    device=DEVICE, codec=codec)
            assert _outcome(msgpack.packb(base, use_bin_type=True), plan) == "accepted"
            sparse_damage(rng, base, op)
            _run_plan(tally, op, msgpack.packb(base, use_bin_type=True), plan)
    tally.report(f"damaged {codec}")
    assert set(tally.outcomes) <= {"bad_codec", "shape_mismatch"}, tally.outcomes
    assert tally.outcomes["bad_codec"] and tally.outcomes["shape_mismatch"]
    other = _Tally()
    for _ in range(300):
        base = valid_update_map(rng, TEMPLATE, fleet=FLEET, round_id=3, base_version=2,
                                device=DEVICE, codec=codec)
        _run_plan(other, *fuzz_payload(rng, base), plan)
    other.report(f"mutated {codec}")


def _run_plan(tally: _Tally, kind: str, payload: bytes, plan: RoundPlan) -> None:
    tally.n += 1
    tally.kinds[kind] += 1
    tally.outcomes[_outcome(payload, plan)] += 1


@pytest.mark.timeout(120)
def test_damaged_chunk_streams_are_rejected_with_a_reason() -> None:
    """A chunk stream with one damaged chunk: only WireErrors (with a code and a reason), and
    whatever comes out of the reassembler is exactly the payload that went in; an undamaged
    stream with QoS 1 duplicates gives the payload once per complete pass."""
    outcomes: Counter[str] = Counter()
    ops: Counter[str] = Counter()

    @settings(max_examples=1500, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), op=st.sampled_from(CHUNK_DAMAGE))
    def check(rng: random.Random, op: str) -> None:
        base = valid_update_map(rng, TEMPLATE, fleet=FLEET, round_id=PLAN.round_id,
                                base_version=PLAN.base_version, device=DEVICE)
        payload = msgpack.packb(base, use_bin_type=True) + bytes(rng.randint(0, 3000))
        op, stream = fuzz_chunks(rng, payload, 1024, op)
        ops[op] += 1
        asm = Reassembler(ReassemblyLimits(max_transfer_bytes=LIMITS.max_bytes, timeout=10.0))
        got: list[bytes] = []
        errors = 0
        for k, chunk in enumerate(stream):
            if op == "expired" and k == len(stream) // 2:
                asm.expire(1000.0)
            try:
                whole = asm.feed(DEVICE, chunk, 1000.0 if k >= len(stream) // 2 else 0.0)
            except WireError as exc:
                assert exc.code and exc.reason
                outcomes[exc.code] += 1
                errors += 1
                continue
            if whole is not None:
                got.append(whole)
                asm.finish(DEVICE, transfer_id(whole))
        assert all(g == payload for g in got)
        if op == "duplicate":  # a stream sent again after completing completes again: the
            # journal answers it "duplicate"; chunks redelivered within it change nothing
            assert len(got) == 1 + (len(stream) == 2 * len(set(stream))) and errors == 0
        elif op in ("hash", "oversize", "index", "count", "data_length", "transfer", "delete"):
            assert errors >= 1 and not got
        elif op == "header_change":  # the stream stays incomplete (and expires)
            assert not got and (errors >= 1 or len(stream) == 1)
        outcomes["completed"] += len(got)

    check()
    print(f"\nfuzz chunk streams: ops {dict(ops)}; outcomes {dict(outcomes)}")
    assert set(ops) == set(CHUNK_DAMAGE)


# ------------------------------------------------------------------- secure aggregation


def _secagg_snapshots() -> tuple[dict[str, object], dict[str, bytes], Callable[[bytes], bytes]]:
    """A 4-device secure round stopped in each device phase: the server as it is then and
    device d0's valid message of that phase."""
    import copy as _copy

    from fedmq.secagg.client import SecAggClient
    from fedmq.secagg.server import SecAggServer
    from fedmq.signing import DeviceKey

    devices = ["d0", "d1", "d2", "d3"]
    keys = {d: DeviceKey.generate() for d in devices}
    public = {d: keys[d].public_hex for d in devices}
    server = SecAggServer(FLEET, "e", 3, clip=1.0, length=12, public_key=public.get,
                          min_survivors=2, selected=devices)
    clients = {d: SecAggClient(FLEET, "e", 3, d, keys[d], public) for d in devices}
    snaps: dict[str, object] = {}
    valid: dict[str, bytes] = {}

    def phase(name: str, make: Callable[[str], bytes]) -> list[tuple[str, bytes]]:
        msgs = {d: make(d) for d in devices}
        for d in devices[1:]:
            server.receive(msgs[d], d)
        snaps[name], valid[name] = _copy.deepcopy(server), msgs["d0"]
        server.receive(msgs["d0"], "d0")
        return server.close_phase()

    ((_, roster),) = phase("keys", lambda d: clients[d].advertise())
    relays = dict(phase("shares", lambda d: clients[d].on_roster(roster)))
    q = np.arange(12, dtype=np.int8)
    ((_, survivors),) = phase("masked", lambda d: clients[d].on_relay(relays[d], q))
    phase("unmask", lambda d: clients[d].on_survivors(survivors))
    return snaps, valid, keys["d0"].sign


@pytest.mark.timeout(300)
def test_secagg_messages_raise_only_rejections_and_keep_the_round_intact() -> None:
    import copy as _copy

    from fedmq.errors import RejectReason
    from fedmq.secagg.server import SecAggServer

    snaps, valid, sign = _secagg_snapshots()
    tally = _Tally()

    @settings(max_examples=1500, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), phase=st.sampled_from(sorted(valid)))
    def check(rng: random.Random, phase: str) -> None:
        others = tuple(v for k, v in valid.items() if k != phase)
        kind, payload = fuzz_secagg(rng, valid[phase], sign, others)
        server = _copy.deepcopy(snaps[phase])
        assert isinstance(server, SecAggServer)
        started = time.perf_counter()
        try:
            server.receive(payload, "d0")
            outcome = "accepted"
        except Rejected as exc:
            assert exc.code in RejectReason.ALL and exc.reason
            outcome = exc.code
        tally.slowest = max(tally.slowest, time.perf_counter() - started)
        tally.n += 1
        tally.kinds[kind] += 1
        tally.outcomes[outcome] += 1
        assert sum(server.rejected.values()) == (outcome != "accepted")
        # The device's real message is still taken once (or is a duplicate of an accepted
        # damaged one that decoded to the same content): nothing lost, nothing twice.
        try:
            server.receive(valid[phase], "d0")
        except Rejected as exc:
            assert outcome == "accepted" and exc.code == RejectReason.DUPLICATE
        server.close_phase()

    check()
    tally.report("secure-aggregation messages")
    assert set(tally.kinds) == set(SECAGG_DAMAGE)
    assert tally.outcomes["bad_signature"] and tally.outcomes["wrong_round"]
    assert tally.outcomes["wrong_phase"] and tally.outcomes["unknown_device"]


@pytest.mark.timeout(300)
def test_secagg_server_messages_never_crash_a_device() -> None:
    """What a device decodes from the aggregator (roster, relay, survivors), damaged or
    replayed into the wrong phase: a Rejected/WireError (the device leaves or ignores),
    never another exception."""
    import copy as _copy

    from fedmq.secagg.client import SecAggClient
    from fedmq.secagg.server import SecAggServer
    from fedmq.signing import DeviceKey

    devices = ["d0", "d1", "d2"]
    keys = {d: DeviceKey.generate() for d in devices}
    public = {d: keys[d].public_hex for d in devices}
    server = SecAggServer(FLEET, "e", 3, clip=1.0, length=8, public_key=public.get,
                          min_survivors=2, selected=devices)
    clients = {d: SecAggClient(FLEET, "e", 3, d, keys[d], public) for d in devices}
    for d in devices:
        server.receive(clients[d].advertise(), d)
    ((_, roster),) = server.close_phase()
    snapshot = {"keys": _copy.deepcopy(clients["d0"])}
    for d in devices:
        server.receive(clients[d].on_roster(roster), d)
    relays = dict(server.close_phase())
    snapshot["shares"] = _copy.deepcopy(clients["d0"])
    q = np.zeros(8, np.int8)
    for d in devices:
        server.receive(clients[d].on_relay(relays[d], q), d)
    ((_, survivors),) = server.close_phase()
    snapshot["masked"] = _copy.deepcopy(clients["d0"])
    valid = {"keys": roster, "shares": relays["d0"], "masked": survivors}
    outcomes: Counter[str] = Counter()

    @settings(max_examples=600, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), phase=st.sampled_from(sorted(valid)))
    def check(rng: random.Random, phase: str) -> None:
        base = valid[phase] if rng.random() < 0.8 else rng.choice(list(valid.values()))
        obj = msgpack.unpackb(base, raw=False)
        op = rng.randrange(4)
        if op == 0:
            payload = bytes(_mutate_bytes(rng, base))
        else:
            key = rng.choice(sorted(obj))
            if op == 1:
                obj[key] = rng.choice([None, 0, -1, 2**40, "x", b"\\x00" * 33, [], [[1, 2]], {},
                                       float("nan")])
            elif op == 2 and isinstance(obj[key], list) and obj[key]:
                item = obj[key][0]
                obj[key][0] = (bytes(rng.getrandbits(8) for _ in range(len(item)))
                               if isinstance(item, bytes) else [rng.choice([b"", "zz", 5])]
                               * rng.randint(1, 4))
            else:
                obj.pop(key)
            payload = msgpack.packb(obj, use_bin_type=True)
        client = _copy.deepcopy(snapshot[phase])
        try:
            if phase == "keys":
                client.on_roster(payload)
            elif phase == "shares":
                client.on_relay(payload, q)
            else:
                client.on_survivors(payload)
            outcomes["accepted"] += 1
        except Rejected as exc:
            outcomes[exc.code] += 1

    check()
    print(f"\nfuzz device side of secure aggregation: {dict(outcomes)}")
    assert sum(outcomes.values()) >= 300 and outcomes["accepted"] < sum(outcomes.values())


def _mutate_bytes(rng: random.Random, data: bytes) -> bytearray:
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    if rng.random() < 0.3:
        del out[rng.randrange(len(out)):]
    return out
@pytest.mark.timeout(120)
def test_damaged_model_deltas_and_indexes_are_refused_or_rebuild_a_finite_model() -> None:
    """Compressed downlink: every damaged delta or index either fails with a WireError, or
    decodes to one whose deltas a device applies to a finite model or refuses (WireError);
    the device's receiver never raises anything else."""
    tally = _Tally()
    topics = Topics(FLEET)
    base = {n: np.zeros(s, np.float32) for n, s in TEMPLATE.items()}

    @settings(max_examples=1500, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(DOWNLINK_DAMAGE),
           delta=st.booleans())
    def check(rng: random.Random, kind: str, delta: bool) -> None:
        valid = (valid_delta_map(rng, TEMPLATE, FLEET, 3) if delta
                 else valid_index_map(rng, FLEET, rng.randint(0, 40)))
        kind, payload = fuzz_downlink(rng, valid, kind)
        tally.n += 1
        tally.kinds[kind] += 1
        try:
            if delta:
                msg = decode_model_delta(payload)
                out = apply_delta(base, msg.tensors, msg.codec, TEMPLATE)
                assert all(np.isfinite(v).all() for v in out.values())
            else:
                decode_model_index(payload)
        except WireError as exc:
            assert exc.reason
            tally.outcomes[exc.code] += 1
        else:
            tally.outcomes["accepted"] += 1
        # the receiver: as an index on the model topic, or as delta 3 it waits for
        rx = DownlinkReceiver(topics, FLEET, TEMPLATE)
        rx.version, rx.weights, rx.epoch = 2, dict(base), "e" * 16
        with contextlib.suppress(WireError):
            rx.on_index(encode(ModelIndex(FLEET, 3, 3, "m", "int8", 0, 10**6,
                                          ((1, 9), (2, 9), (3, 9)), epoch="e" * 16)))
            rx.on_payload(delta_topic(topics, 3), payload)
        with contextlib.suppress(WireError):
            rx.on_index(payload)

    check()
    tally.report("downlink deltas and indexes")
    assert tally.n >= 1500
    assert sum(n for k, n in tally.outcomes.items() if k != "accepted") > tally.n * 0.6


@pytest.mark.timeout(180)
def test_damaged_site_partials_are_refused_or_merge_into_a_finite_sum() -> None:
    """Site gateways: every damaged partial (bare or in a signed envelope) is refused with a
    reason when decoded or when the receiver reads its sum against the model
    (``read_partial``); what passes both holds one update per device and merges into a
    finite mean."""
    tally = _Tally()

    @settings(max_examples=800, **_SETTINGS)  # type: ignore[arg-type]
    @given(rng=st.randoms(use_true_random=False), kind=st.sampled_from(SITE_PARTIAL_DAMAGE))
    def check(rng: random.Random, kind: str) -> None:
        valid = valid_site_partial_map(rng, TEMPLATE, FLEET, rng.randint(1, 4))
        kind, payload = fuzz_site_partial(rng, valid, kind)
        tally.n += 1
        tally.kinds[kind] += 1
        try:
            msg = receive_site_partial(payload, LIMITS).message
            acc = read_partial(msg, TEMPLATE, LIMITS.max_bytes)  # the receiver's model check
        except Rejected as exc:  # WireError included
            assert exc.reason and exc.code
            tally.outcomes[exc.code] += 1
            return
        assert list(msg.devices) == sorted(set(msg.devices)) and msg.epoch
        assert acc.count == len(msg.devices) >= 1
        total = FixedPointSum(TEMPLATE)
        total.merge(acc)
        assert all(np.isfinite(v).all() for v in total.result().mean.values())
        tally.outcomes["accepted"] += 1

    check()
    tally.report("site partials")
    assert tally.n >= 800
    assert sum(n for k, n in tally.outcomes.items() if k != "accepted") > tally.n * 0.5
