"""The codec seam: a codec written here (sparse top-k with an error-feedback residual kept
on the device) goes through the registry, the wire, the accumulator and the engine with no
change to any other module; the builtin codecs are validated once per accepted update."""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq import wire
from fedmq.errors import RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum
from fedmq.update.codecs import Codec, CodecState, Encoded, get_codec, register, unregister
from fedmq.update.codecs.base import finite_input
from fedmq.update.codecs.float32 import Float32
from fedmq_ops.demo import add_federation_arguments
from tests.fakes import exact_delta, make_update, model_weights


class TopK(Codec):
    """The ``k`` largest |values| of (delta + residual) per tensor: float32 values plus their
    flat positions (``extra["index"]``, uint32, increasing); the rest is the new residual."""

    name = "topk-test"
    stateful = True

    def __init__(self, k: int) -> None:
        self.k = k

    def encode(self, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
               state: CodecState | None = None) -> Encoded:
        state = state or {}
        tensors, residual = [], {}
        for name, x in delta.items():
            r = finite_input(name, x) + state.get(name, np.float32(0))
            flat = r.reshape(-1)
            k = min(self.k, flat.size)
            idx = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k]).astype("<u4")
            rest = flat.copy()
            rest[idx] = 0
            residual[name] = rest.reshape(r.shape)
            tensors.append(Tensor.from_array(name, flat[idx], extra={"index": idx.tobytes()},
                                             shape=r.shape))
        return Encoded(tuple(tensors), residual)

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        if tensor.shape != shape or tensor.dtype != "float32":
            raise WireError(f"{tensor.name}: not a float32 top-k of {shape}", RejectReason.SHAPE)
        if tensor.params or set(tensor.extra) != {"index"}:
            raise WireError(f"{tensor.name}: top-k takes an index only", RejectReason.BAD_CODEC)
        idx = np.frombuffer(tensor.extra["index"], "<u4").astype(np.int64)  # no wrap-around
        if len(tensor.extra["index"]) != 4 * tensor.count or tensor.count > tensor.size:
            raise WireError(f"{tensor.name}: index and values disagree", RejectReason.SHAPE)
        if idx.size and (int(idx[-1]) >= tensor.size or not bool((np.diff(idx) > 0).all())):
            raise WireError(f"{tensor.name}: bad positions", RejectReason.SHAPE)

    def decode(self, tensor: Tensor) -> np.ndarray:
        out = np.zeros(tensor.size, np.float32)
        out[np.frombuffer(tensor.extra["index"], "<u4")] = tensor.values()
        return out.reshape(tensor.shape)

    def bound(self, tensor: Tensor) -> float:
        v = tensor.values()
        return float(np.abs(v).max()) if v.size else 0.0

    def add_into(self, acc: np.ndarray, tensor: Tensor, coef: float,
                 scratch: np.ndarray | None = None) -> None:
        flat = acc.reshape(-1)  # a view: acc is contiguous
        flat[np.frombuffer(tensor.extra["index"], "<u4")] += np.float32(coef) * tensor.values()


@pytest.fixture
def topk() -> Iterator[TopK]:
    codec = TopK(k=3)
    register(codec)
    yield codec
    unregister(codec.name)
    assert codec.name not in codecs.codec_names()


SHAPES = {"w": (4, 5), "b": (5,)}


def test_everything_that_lists_codecs_reads_the_registry(topk: TopK) -> None:
    assert codecs.codec_names() == (
        "float32", "float16", "int8", "int4", "topk-f16", "topk-int8", "topk-int4", "stc",
        "masked-int8", "masked-f16", "topk-test",
    )
    assert get_codec("topk-test") is topk
    assert wire.TrainingConfig(codec="topk-test").codec == "topk-test"
    assert AggregatorConfig(codec="topk-test").training_config().codec == "topk-test"
    parser = argparse.ArgumentParser()
    add_federation_arguments(parser, None)
    assert parser.parse_args(["--codec", "topk-test"]).codec == "topk-test"
    with pytest.raises(ValueError, match="already registered"):
        register(TopK(1))
    with pytest.raises(ValueError, match="keeps device state"):
        codecs.encode_delta({"b": np.ones(5, np.float32)}, "topk-test", np.random.default_rng())


def test_sparse_update_through_wire_and_accumulator(topk: TopK) -> None:
    rng = np.random.default_rng(0)
    acc, exact_sum = WeightedSum(SHAPES), {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    for i in range(4):
        delta = exact_delta(SHAPES, i)
        enc = topk.encode(delta, rng)
        assert all(t.count == 3 and not t.dense for t in enc.tensors)
        msg = wire.UpdateMessage("f", 1, 0, f"d{i}", f"u{i}", 2, "topk-test", enc.tensors)
        back = wire.decode_update(wire.encode(msg))
        assert back == msg
        acc.fold(back.tensors, back.codec, 2.0)
        for t in enc.tensors:
            exact_sum[t.name] += 2 * topk.decode(t)
    for k in SHAPES:
        np.testing.assert_array_equal(acc.result().mean[k], exact_sum[k] / 8)
    bad = Tensor("b", "float32", (5,), np.ones(2, np.float32).tobytes(),
                 extra={"index": np.array([4, 1], "<u4").tobytes()})  # not increasing
    with pytest.raises(WireError) as e:
        acc.check([bad, *enc.tensors[:1]], "topk-test", 1.0)
    assert e.value.code == RejectReason.SHAPE


def test_error_feedback_state_carries_what_was_not_sent(topk: TopK) -> None:
    rng = np.random.default_rng(0)
    state: CodecState = {}
    sent = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    deltas = [exact_delta(SHAPES, i) for i in range(5)]
    for d in deltas:
        before = codecs.pack_state(state)
        enc = topk.encode(d, rng, state)
        assert codecs.pack_state(state) == before  # the input state is not mutated
        for t in enc.tensors:
            sent[t.name] += topk.decode(t)
        # what the device stores with the outbox entry, and reads back for the next round
        state = codecs.unpack_state(codecs.pack_state(enc.state))
    for k in SHAPES:  # sent + residual == everything trained (exact values: exact sums)
        np.testing.assert_array_equal(sent[k] + state[k], sum(d[k] for d in deltas))
    assert codecs.unpack_state(codecs.pack_state({})) == {}
    for damaged in (b"", b"\xc1", codecs.pack_state(state)[:-3]):
        with pytest.raises(WireError):
            codecs.unpack_state(damaged)


def _engine(tmp_path: Path, codec: str) -> tuple[Engine, dict[str, np.ndarray]]:
    cfg = AggregatorConfig(
        fleet="f", state_dir=tmp_path / "state", eval_dataset="none", codec=codec,
        selection="any", clients_per_round=2, min_updates=2,
    )
    engine = Engine(cfg, Store(cfg.state_dir), resolve_bundle("digits-mlp"))
    out = engine.start(1000.0)
    w0 = model_weights(wire.decode_model(next(o.payload for o in out
                                              if o.topic.endswith("model"))))
    return engine, w0


def test_the_engine_folds_the_new_codec_unchanged(tmp_path: Path, topk: TopK) -> None:
    engine, w0 = _engine(tmp_path, "topk-test")
    try:
        assert engine.round is not None and engine.round.plan.config.codec == "topk-test"
        shapes = {k: v.shape for k, v in w0.items()}
        decoded = []
        for i in range(2):
            enc = topk.encode(exact_delta(shapes, i), np.random.default_rng(i))
            decoded.append({t.name: topk.decode(t) for t in enc.tensors})
            msg = wire.UpdateMessage("f", 1, 0, f"d{i}", f"u{i}", 2, "topk-test", enc.tensors)
            ack = engine.handle_update(f"d{i}", wire.encode(msg), 1001.0)
            assert ack.accepted, ack
        out = engine.tick(1002.0)
        w1 = model_weights(wire.decode_model(next(o.payload for o in out
                                                  if o.topic.endswith("model"))))
        for name, base in w0.items():
            expected = base + (decoded[0][name] + decoded[1][name]) / 2
            np.testing.assert_array_equal(w1[name], expected)
    finally:
        engine.store.close()


class _Counting(Float32):
    def __init__(self) -> None:
        self.validated = 0
        self.added = 0

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        self.validated += 1
        super().validate(tensor, shape)

    def add_into(self, acc: np.ndarray, tensor: Tensor, coef: float,
                 scratch: np.ndarray | None = None) -> None:
        self.added += 1
        super().add_into(acc, tensor, coef, scratch)


def test_an_accepted_update_is_checked_against_the_model_once(tmp_path: Path) -> None:
    counting = _Counting()
    register(counting, replace=True)
    try:
        engine, w0 = _engine(tmp_path, "float32")
        shapes = {k: v.shape for k, v in w0.items()}
        payload = make_update("f", 1, 0, "d0", exact_delta(shapes, 0), 3)
        assert engine.handle_update("d0", payload, 1001.0).accepted
        assert (counting.validated, counting.added) == (len(shapes), len(shapes))
        engine.store.close()
    finally:
        register(Float32(), replace=True)
