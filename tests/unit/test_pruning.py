"""Pruning's pure pieces (docs/pruning.md): the mask bitmap and its strict decoding (fuzzed),
the schedule, magnitude selection, the masked codecs, the server's strategy wrapper and
masked fold (pruned weights stay exactly zero after aggregation, also under server
momentum), the settings checks, the round announcement's mask field, and the device side's
refusals."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.pruning import encode_masked, prepare_round, supported_codecs
from fedmq.errors import ConfigError, ModelError, Rejected, WireError
from fedmq.models.spec import ModelSpec
from fedmq.prune.mask import PruneMask, decode_mask, magnitude_mask
from fedmq.prune.strategy import (
    MaskedFold,
    PruneSchedule,
    PruneStrategy,
    check_prune_settings,
    prunable_tensors,
)
from fedmq.update import codecs
from fedmq.update.codecs.masked import MaskedCodec, masked_codec_for
from fedmq.update.strategies import make_strategy
from fedmq.wire import RoundAnnouncement, TrainingConfig, decode_round, encode
from tests.fuzz_payloads import MASK_DAMAGE, fuzz_mask

SHAPES: dict[str, tuple[int, ...]] = {"k1": (6, 5), "b1": (5,), "k2": (5, 3), "b2": (3,)}


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 1, s).astype(np.float32) for n, s in SHAPES.items()}


def _mask(sparsity: float = 0.6, seed: int = 0) -> PruneMask:
    return magnitude_mask(_weights(seed), sparsity, prunable_tensors(SHAPES))


# -- the mask ----------------------------------------------------------------------------------
def test_mask_bitmap_round_trip_is_compact_and_identified() -> None:
    mask = _mask(0.6)
    assert set(mask.kept) == {"k1", "k2"}  # kernels only; biases stay whole
    assert mask.count("k1", 30) == 12 and mask.count("k2", 15) == 6
    assert mask.count("b1", 5) == 5 and mask.positions("b1") is None
    data = mask.encode()
    back = decode_mask(data, SHAPES)
    for n in mask.kept:
        np.testing.assert_array_equal(back.kept[n], mask.kept[n])
    assert back.mask_id == mask.mask_id == _mask(0.6).mask_id  # deterministic
    assert mask.mask_id != _mask(0.4).mask_id != PruneMask().mask_id
    # one bit per weight of the pruned tensors plus a small header
    assert len(data) <= (30 + 7) // 8 + (15 + 7) // 8 + 80
    assert mask.sparsity(SHAPES) == pytest.approx((18 + 9) / 53)


def test_magnitude_mask_keeps_the_largest_and_pruned_weights_stay_pruned() -> None:
    w = {"k": np.array([[0.125, -3.0, 0.25], [2.0, -0.0625, 0.0]], np.float32)}
    m = magnitude_mask(w, 0.5, ("k",))
    assert m.kept["k"].tolist() == [[False, True, True], [True, False, False]]
    pruned = m.apply(w)
    assert pruned["k"].tolist() == [[0.0, -3.0, 0.25], [2.0, 0.0, 0.0]]
    # a later, sparser mask chosen on the pruned weights never revives a pruned one
    m2 = magnitude_mask(pruned, 0.7, ("k",))
    assert not (m2.kept["k"] & ~m.kept["k"]).any()
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, 1.0, ("k",))


def _entry_damage(op: str) -> tuple[bytes, str]:
    obj = msgpack.unpackb(_mask(0.6).encode(), raw=False)
    e = obj["tensors"][0]
    reason = {
        "unknown": "not a trainable tensor", "dup": "appears twice", "size": "size",
        "short": "bitmap of", "padding": "padding bits", "kept": "bitmap keeps",
        "all": "every weight pruned", "extra": "exactly the keys", "version": "version-1",
        "bias_type": "bitmap of",
    }[op]
    if op == "unknown":
        e["name"] = "nope"
    elif op == "dup":
        obj["tensors"].append(dict(e))
    elif op == "size":
        e["size"] = 31
    elif op == "short":
        e["bits"] = e["bits"][:-1]
    elif op == "padding":  # k1 has 30 weights: 2 padding bits in the last byte
        e["bits"] = e["bits"][:-1] + bytes([e["bits"][-1] | 0x80])
    elif op == "kept":
        e["kept"] += 1
    elif op == "all":
        e["bits"], e["kept"] = bytes(len(e["bits"])), 0
    elif op == "extra":
        e["positions"] = b""
    elif op == "version":
        obj["mask"] = 2
    elif op == "bias_type":
        e["bits"] = "not bytes"
    return msgpack.packb(obj, use_bin_type=True), reason


@pytest.mark.parametrize(
    "op", ["unknown", "dup", "size", "short", "padding", "kept", "all", "extra", "version",
           "bias_type"],
)
def test_decode_mask_refuses_bad_masks_with_a_reason(op: str) -> None:
    data, reason = _entry_damage(op)
    with pytest.raises(WireError, match=reason) as info:
        decode_mask(data, SHAPES)
    assert info.value.code == "malformed"
    assert str(info.value).startswith("bad pruning mask: ")


def test_decode_mask_bounds_and_garbage() -> None:
    with pytest.raises(WireError, match="exceed the limit"):
        decode_mask(b"\x00" * 101, SHAPES, max_bytes=100)
    with pytest.raises(WireError, match="not msgpack"):
        decode_mask(b"\xc1garbage", SHAPES)
    with pytest.raises(WireError, match="version-1"):
        decode_mask(msgpack.packb([1, 2]), SHAPES)
    assert decode_mask(PruneMask().encode(), SHAPES).kept == {}  # nothing pruned yet


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(rng=st.randoms(use_true_random=False), op=st.sampled_from(MASK_DAMAGE))
def test_fuzzed_masks_raise_only_wire_errors(rng: random.Random, op: str) -> None:
    _, data = fuzz_mask(rng, _mask(rng.choice([0.3, 0.6, 0.9])).encode(), op)
    try:
        mask = decode_mask(data, SHAPES)
    except WireError as exc:
        assert exc.code == "malformed" and str(exc).startswith("bad pruning mask: ")
        return
    assert op == "bytes"  # only blind byte damage may leave a well-formed mask
    for n, m in mask.kept.items():
        assert m.shape == SHAPES[n] and m.any()


def test_every_mask_damage_is_refused() -> None:
    rng = random.Random(7)
    for op in MASK_DAMAGE:
        if op == "bytes":
            continue
        for _ in range(30):
            with pytest.raises(WireError):
                decode_mask(fuzz_mask(rng, _mask(0.6).encode(), op)[1], SHAPES)


# -- schedule ----------------------------------------------------------------------------------
def test_schedule_is_a_cubic_ramp_rechosen_every_n() -> None:
    s = PruneSchedule(target=0.8, schedule_rounds=10, every=3)
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(10) == s.sparsity_at(50) == 0.8
    assert s.sparsity_at(5) == pytest.approx(0.8 * (1 - 0.5**3))
    assert [t for t in range(1, 15) if s.due(t)] == [3, 6, 9, 10]
    assert not PruneSchedule().enabled
    for bad in ({"target": 1.0}, {"target": -0.1}, {"schedule_rounds": 0}, {"every": 0},
                {"every": True}):
        with pytest.raises(ConfigError):
            PruneSchedule(**bad)  # type: ignore[arg-type]


# -- the masked codecs -------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["masked-int8", "masked-f16"])
def test_masked_codec_sends_only_kept_values_and_no_positions(codec: str) -> None:
    mask = _mask(0.8)
    delta = mask.apply(_weights(3))
    impl = codecs.get_codec(codec)
    assert isinstance(impl, MaskedCodec)
    tensors = impl.with_mask(mask).encode(delta, np.random.default_rng(0)).tensors
    per_value = 1 if codec == "masked-int8" else 2
    for t in tensors:
        assert not t.extra and t.count == mask.count(t.name, t.size)
        assert len(t.data) == t.count * per_value
    dense = codecs.get_codec(masked_codec_for("int8" if per_value == 1 else "float16"))
    assert dense.name == codec
    bound = impl.with_mask(mask)
    for t in tensors:
        bound.validate(t, SHAPES[t.name])
        got = bound.decode(t)
        assert not got[~mask.kept[t.name]].any() if t.name in mask.kept else True
        tol = np.abs(delta[t.name]).max() / 100 if per_value == 1 else 1e-2
        np.testing.assert_allclose(got, delta[t.name], atol=tol)
        assert bound.squared_norm(t) == pytest.approx(float(np.sum(got.astype(np.float64)**2)),
                                                      rel=1e-5)
    # under another mask: refused with a reason (wrong id; wrong count)
    other = impl.with_mask(_mask(0.5))
    with pytest.raises(WireError, match="encoded under mask"):
        other.validate(tensors[0], SHAPES[tensors[0].name])
    short = dataclasses.replace(tensors[0], data=tensors[0].data[:-per_value])
    with pytest.raises(WireError, match="the round's mask keeps"):
        bound.validate(short, SHAPES[short.name])
    with pytest.raises(ValueError, match="not codec 'topk-f16'"):
        masked_codec_for("topk-f16")


# -- the server: strategy wrapper, masked fold -------------------------------------------------
def _round(strategy: PruneStrategy, weights: Mapping[str, np.ndarray], seed: int,
           devices: int = 3) -> dict[str, np.ndarray]:
    acc = strategy.new_accumulator(SHAPES)
    cfg = strategy.configure(1, TrainingConfig(codec="int8"))
    assert cfg.codec == "masked-int8"
    mask = strategy.mask
    rng = np.random.default_rng(seed)
    for _ in range(devices):
        local = mask.apply({n: w + rng.normal(0, 0.1, w.shape).astype(np.float32)
                            for n, w in weights.items()})
        delta = {n: local[n] - weights[n] for n in SHAPES}
        acc.fold(codecs.get_codec(cfg.codec).with_mask(mask)  # type: ignore[attr-defined]
                 .encode(delta, rng).tensors, cfg.codec, 10.0)
    return strategy.aggregate(weights, acc.result())


def test_pruned_weights_stay_exactly_zero_after_aggregation_with_momentum() -> None:
    """FedAvgM's velocity is non-zero where weights were pruned later: the wrapper zeroes
    them anyway, and the mask tightens along the schedule, never reviving a weight."""
    schedule = PruneSchedule(target=0.8, schedule_rounds=4, every=2)
    strategy = PruneStrategy(make_strategy("fedavgm", momentum=0.9), schedule, SHAPES)
    weights = _weights(1)
    sparsities = []
    previous = strategy.mask
    for r in range(8):
        weights = _round(strategy, weights, seed=r)
        for n, m in strategy.mask.kept.items():
            assert not weights[n][~m].any(), (r, n)
            if n in previous.kept:
                assert not (m & ~previous.kept[n]).any()
        previous = strategy.mask
        sparsities.append(round(strategy.sparsity, 3))
    kernels = {n: SHAPES[n] for n in ("k1", "k2")}
    assert strategy.mask.sparsity(kernels) == pytest.approx(0.8, abs=0.02)
    assert sparsities[0] == 0.0 and sparsities[1] > 0 and sparsities[3:] == [sparsities[3]] * 5
    assert np.abs(weights["b1"]).min() > 0  # biases are not pruned
    # the state carries mask and step: a restarted server announces the same mask
    fresh = PruneStrategy(make_strategy("fedavgm", momentum=0.9), schedule, SHAPES)
    fresh.load_state(strategy.state())
    assert fresh.mask_bytes == strategy.mask_bytes and fresh.step == 8
    assert set(fresh.state()) == set(strategy.state())


def test_masked_fold_is_the_exact_mean_and_refuses_other_masks_and_codecs() -> None:
    mask = _mask(0.7)
    strategy = PruneStrategy(make_strategy("fedavg"), PruneSchedule(0.7), SHAPES)
    strategy.load_state({"prune/step": np.array([3]),
                         "prune/mask": np.frombuffer(mask.encode(), np.uint8)})
    acc = strategy.new_accumulator(SHAPES)
    assert isinstance(acc, MaskedFold)
    rng = np.random.default_rng(5)
    deltas = [mask.apply(_weights(s)) for s in (10, 11)]
    codec = codecs.get_codec("masked-f16").with_mask(mask)  # type: ignore[attr-defined]
    for d, w in zip(deltas, (1.0, 3.0), strict=True):
        acc.fold(codec.encode(d, rng).tensors, "masked-f16", w)
    mean = acc.result().mean
    for n in SHAPES:
        want = (deltas[0][n].astype(np.float16).astype(np.float32)
                + 3 * deltas[1][n].astype(np.float16).astype(np.float32)) / 4
        np.testing.assert_allclose(mean[n], want, rtol=1e-6, atol=1e-7)
    dense = codecs.encode_delta(deltas[0], "int8", rng)
    with pytest.raises(Rejected, match="this round is pruned"):
        acc.check(dense, "int8", 1.0)
    stale = codecs.get_codec("masked-f16").with_mask(_mask(0.5))  # type: ignore[attr-defined]
    with pytest.raises(Rejected, match="encoded under mask"):
        acc.check(stale.encode(deltas[0], rng).tensors, "masked-f16", 1.0)
    assert acc.count == 2


def test_prune_settings_are_checked() -> None:
    on = PruneSchedule(0.8)
    check_prune_settings(on, "int8", "fedavg", dp=False)
    check_prune_settings(PruneSchedule(), "int8", "fedavg", dp=False)
    for args, why in (
        ((on, "topk-f16", "fedavg", False), "int8 or float16"),
        ((on, "int8", "fedavg", True), "dp"),
        ((on, "int8", "fedprox", False), "fedprox"),
        ((PruneSchedule(), "masked-int8", "fedavg", False), "set prune_target"),
    ):
        with pytest.raises(ConfigError, match=why):
            check_prune_settings(*args)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no kernel"):
        PruneStrategy(make_strategy("fedavg"), on, {"b": (4,)})


def test_aggregator_config_keys() -> None:
    from aggregator.config import AggregatorConfig

    cfg = AggregatorConfig(prune_target=0.9, prune_schedule_rounds=5, prune_every=1)
    assert cfg.prune_schedule() == PruneSchedule(0.9, 5, 1)
    for bad in ({"prune_target": 1.5}, {"prune_every": 0}, {"prune_target": 0.5, "dp": True,
                                                             "dp_population": 100}):
        with pytest.raises(ConfigError):
            AggregatorConfig(**bad)  # type: ignore[arg-type]


# -- the wire ----------------------------------------------------------------------------------
def test_round_announcement_carries_the_mask_only_when_pruned() -> None:
    ann = RoundAnnouncement("f", 3, 2, 10.0, TrainingConfig(codec="masked-int8"))
    plain = encode(ann)
    assert b"prune_mask" not in plain and decode_round(plain).prune_mask == b""
    data = _mask(0.6).encode()
    back = decode_round(encode(dataclasses.replace(ann, prune_mask=data)))
    assert back.prune_mask == data
    obj = msgpack.unpackb(plain, raw=False)
    obj["prune_mask"] = "not bytes"
    with pytest.raises(WireError, match="prune_mask"):
        decode_round(msgpack.packb(obj, use_bin_type=True))


# -- the device --------------------------------------------------------------------------------
class _Trainer:
    """The trainer surface prepare_round uses (pure logic: a stand-in is enough)."""

    def __init__(self, variants: frozenset[str]) -> None:
        self.variants = variants
        self.runtime_name = "test-runtime"
        self.spec = ModelSpec.from_json({
            "format": 1, "name": "t", "kind": "mlp", "input_shape": [6], "num_classes": 3,
            "train_batch": 2, "infer_batch": 2,
            "weights": [{"name": n, "shape": list(s), "dtype": "float32"}
                        for n, s in SHAPES.items()],
            "trainable": list(SHAPES),
        })
        self.masks: object = "unset"

    def set_mask(self, masks: object) -> None:
        self.masks = masks

    def fit_prox(self) -> None: ...

    def gradient(self) -> None: ...


def test_device_loads_the_mask_or_refuses_the_round_with_a_reason() -> None:
    mask = _mask(0.6)
    ann = RoundAnnouncement("f", 4, 3, 10.0, TrainingConfig(codec="masked-int8"),
                            prune_mask=mask.encode())
    t = _Trainer(frozenset({"prox", "gradient", "mask"}))
    assert "masked-int8" in supported_codecs(t)  # type: ignore[arg-type]
    got = prepare_round(t, ann)  # type: ignore[arg-type]
    assert got is not None and got.mask_id == mask.mask_id
    assert isinstance(t.masks, dict) and set(t.masks) == set(mask.kept)
    tensors = encode_masked(mask.apply(_weights(2)), "masked-int8", got, np.random.default_rng(0))
    assert sum(x.count for x in tensors) == 12 + 5 + 6 + 3
    plain = dataclasses.replace(ann, config=TrainingConfig(codec="int8"), prune_mask=b"")
    assert prepare_round(t, plain) is None and t.masks is None  # type: ignore[arg-type]
    for bad, why in (
        (dataclasses.replace(ann, prune_mask=b""), "carries no pruning mask"),
        (dataclasses.replace(ann, config=TrainingConfig(codec="int8")), "not a masked codec"),
        (dataclasses.replace(ann, prune_mask=_entry_damage("padding")[0]), "padding bits"),
    ):
        with pytest.raises(ModelError, match=why):
            prepare_round(t, bad)  # type: ignore[arg-type]
    old = _Trainer(frozenset({"prox", "gradient"}))  # a bundle exported before set_mask
    assert not any(c.startswith("masked") for c in supported_codecs(old))  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="cannot train under a mask"):
        prepare_round(old, ann)  # type: ignore[arg-type]
