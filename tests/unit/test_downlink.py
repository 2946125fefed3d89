"""Compressed downlink, pure logic: the aggregator's Downlink (stage/publish, files on disk)
and the device's DownlinkReceiver, joined by a dict standing in for the broker's retained
store (empty payload = cleared). Real codecs, real wire payloads."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest

from aggregator.downlink import Downlink, Staged
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import Outgoing, RoundTraffic
from edge_agent.downlink import DownlinkReceiver, DownlinkStep, is_index
from fedmq.downlink import (
    DownlinkSettings,
    apply_delta,
    check_downlink_settings,
    delta_topic,
    encode_step,
    plan_fetch,
    snapshot_topic,
)
from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.topics import Topics
from fedmq.wire import ModelDelta, ModelIndex, ModelMessage, decode_model, encode

SHAPES = {"dense/w": (128, 64), "dense/b": (64,), "out/w": (64, 10), "out/b": (10,)}
TOPICS = Topics("fl1")
EPOCH = "e" * 16


def _model_payload(version: int, weights: dict[str, np.ndarray], now: float) -> bytes:
    return encode(ModelMessage(
        fleet="fl1", version=version, round_id=version, model_id="m",
        tensors=tuple(Tensor.from_array(n, weights[n]) for n in SHAPES),
        metrics={"accuracy": 0.5}, created_at=now, epoch=EPOCH,
    ))


class Broker:
    """Retained messages and live delivery to subscribed receivers."""

    def __init__(self) -> None:
        self.retained: dict[str, bytes] = {}
        self.online: dict[str, DownlinkReceiver] = {}
        self.got: dict[str, bytes | None] = {}  # the last rebuilt model per device
        self.received: dict[str, int] = {}

    def publish(self, outs: list[Outgoing]) -> None:
        for o in outs:
            if o.retain:
                if o.payload:
                    self.retained[o.topic] = o.payload
                else:
                    self.retained.pop(o.topic, None)
            for name, rx in list(self.online.items()):
                if o.topic == TOPICS.model or o.topic in rx.subscribed:
                    self._deliver(name, rx, o.topic, o.payload)

    def connect(self, name: str, rx: DownlinkReceiver) -> None:
        self.online[name] = rx
        self._follow(name, rx, rx.on_connected())
        if TOPICS.model in self.retained:
            self._deliver(name, rx, TOPICS.model, self.retained[TOPICS.model])

    def _deliver(self, name: str, rx: DownlinkReceiver, topic: str, payload: bytes) -> None:
        self.received[name] = self.received.get(name, 0) + len(payload)
        if topic == TOPICS.model:
            assert is_index(payload)
            step = rx.on_index(payload)
        else:
            step = rx.on_payload(topic, payload)
        self._follow(name, rx, step)

    def _follow(self, name: str, rx: DownlinkReceiver, step: DownlinkStep) -> None:
        if step.model is not None:
            self.got[name] = step.model
        for topic in step.subscribe:
            if topic in self.retained and topic in rx.subscribed:
                self._deliver(name, rx, topic, self.retained[topic])


def _server(tmp_path: Path, codec: str, snapshot_every: int = 5, window: int = 6) -> Downlink:
    settings = DownlinkSettings(codec, snapshot_every, window, 0.1, 0, 7)
    return Downlink(settings, tmp_path, TOPICS, SHAPES, "fl1", "m",
                    RoundTraffic(AggregatorMetrics()))


@pytest.mark.parametrize("codec", ["int8", "int4", "topk-int8", "stc"])
def test_devices_hold_the_servers_model_bit_for_bit_after_50_versions(
    tmp_path: Path, codec: str
) -> None:
    rng = np.random.default_rng(0)
    server = _server(tmp_path, codec)
    weights = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    broker = Broker()
    broker.publish(server.current(0, _model_payload(0, weights, 0.0), EPOCH, 0.0))
    always = DownlinkReceiver(TOPICS, "fl1", SHAPES)
    away = DownlinkReceiver(TOPICS, "fl1", SHAPES)
    broker.connect("always", always)
    broker.connect("away", away)
    late = DownlinkReceiver(TOPICS, "fl1", SHAPES)
    per_version: list[int] = []
    for version in range(1, 51):
        if version == 12:
            del broker.online["away"]  # offline for versions 12..14: comes back by chain
        if version == 15:
            broker.connect("away", away)
        if version == 20:
            del broker.online["away"]  # offline for 20..39: beyond the window, snapshot
        if version == 40:
            broker.connect("away", away)
        if version == 33:
            broker.connect("late", late)
        # a strategy step: drift plus noise
        target = {n: w + rng.normal(0, 0.02, w.shape).astype(np.float32)
                  for n, w in weights.items()}
        staged = server.stage(version, version, weights, target, EPOCH, float(version))
        payload = _model_payload(version, staged.weights, float(version))
        expect = server.bytes_per_device(staged, payload, EPOCH, float(version))
        before = broker.received.get("always", 0)
        broker.publish(server.publish(staged, payload, EPOCH, float(version)))
        per_version.append(broker.received["always"] - before)
        assert per_version[-1] == expect
        weights = staged.weights
        for name in ("always", "away", "late"):
            if name in broker.online:
                got = decode_model(broker.got[name])  # type: ignore[arg-type]
                assert got.version == version, (name, version)
                for t in got.tensors:
                    assert t.data == weights[t.name].tobytes(), (name, version, t.name)
    # the server's stored state is this: what was published, bit for bit
    assert always.weights is not None
    for n in SHAPES:
        assert always.weights[n].tobytes() == weights[n].tobytes()
    # old deltas are cleared: only the window is retained
    deltas = sorted(int(t.rsplit("/", 1)[1]) for t in broker.retained if "/delta/" in t)
    assert deltas == list(range(45, 51))
    full = len(_model_payload(50, weights, 50.0))
    assert max(per_version) < full / 3


def test_error_feedback_keeps_the_rebuilt_model_close_to_the_target(tmp_path: Path) -> None:
    """topk drops 90 % of each delta; the residual sends it later, so the rebuilt model
    tracks the strategy's weights instead of drifting away from them."""
    rng = np.random.default_rng(1)
    base = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    residual = None
    truth = {n: v.copy() for n, v in base.items()}
    for _ in range(30):
        step_v = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in SHAPES.items()}
        truth = {n: truth[n] + step_v[n] for n in SHAPES}
        target = {n: base[n] + step_v[n] for n in SHAPES}
        step = encode_step("topk-int8", base, target, residual, rng, SHAPES, 0.1)
        base, residual = step.weights, step.residual
        for n in SHAPES:  # exactly: rebuilt + residual = everything asked for so far
            assert np.allclose(base[n] + residual[n], truth[n], atol=1e-5)
    err = sum(float(np.linalg.norm(base[n] - truth[n])) for n in SHAPES)
    total = sum(float(np.linalg.norm(truth[n])) for n in SHAPES)
    assert err < 0.6 * total


def test_plan_takes_the_smaller_of_chain_and_snapshot() -> None:
    idx = ModelIndex("fl1", 10, 10, "m", "int8", 8, 1000, ((5, 100), (6, 100), (7, 100),
                                                         (8, 100), (9, 100), (10, 100)))
    assert plan_fetch(idx, 10) is None
    chain = plan_fetch(idx, 7)
    assert chain is not None and not chain.snapshot and chain.deltas == (8, 9, 10)
    assert chain.bytes == 300
    # from 4: delta 5 is there but the chain (600) is smaller than snapshot + 2 (1200)
    p4 = plan_fetch(idx, 4)
    assert p4 is not None and not p4.snapshot and p4.deltas == (5, 6, 7, 8, 9, 10)
    p3 = plan_fetch(idx, 3)  # delta 4 is gone: snapshot 8, then 9 and 10
    assert p3 is not None and p3.snapshot and p3.deltas == (9, 10) and p3.bytes == 1200
    big = ModelIndex("fl1", 10, 10, "m", "int8", 8, 150, idx.deltas)
    p5 = plan_fetch(big, 5)  # snapshot (150) + 2 deltas beats 5 deltas
    assert p5 is not None and p5.snapshot and p5.bytes == 350


def test_an_index_must_list_every_delta_after_its_snapshot() -> None:
    with pytest.raises(WireError, match="misses the deltas"):
        ModelIndex("fl1", 10, 10, "m", "int8", 7, 1000, ((8, 10), (10, 10)))
    with pytest.raises(WireError, match="out of order"):
        ModelIndex("fl1", 10, 10, "m", "int8", 10, 1000, ((9, 10), (8, 10)))


def _delta(version: int, tensors: tuple[Tensor, ...], codec: str = "int8",
           base: int | None = None, fleet: str = "fl1", epoch: str = EPOCH) -> bytes:
    return encode(ModelDelta(fleet, version, version - 1 if base is None else base, version,
                             "m", codec, tensors, 0.0, epoch))


def _good_tensors(rng: np.random.Generator) -> tuple[Tensor, ...]:
    return encode_step("int8", {n: np.zeros(s, np.float32) for n, s in SHAPES.items()},
                       {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()},
                       None, rng, SHAPES).tensors


def _bad(kind: str, rng: np.random.Generator) -> bytes:
    good = _good_tensors(rng)
    if kind == "wrong_shape":
        t = good[0]
        return _delta(3, (Tensor(t.name, t.dtype, (64, 128), t.data, t.params), *good[1:]))
    if kind == "missing_tensor":
        return _delta(3, good[1:])
    if kind == "nan_scale":
        raw = bytearray(_delta(3, good))
        scale = good[0].params["scale"]
        at = bytes(raw).index(b"\xcb" + struct.pack(">d", scale))
        raw[at + 1:at + 9] = struct.pack(">d", float("nan"))
        return bytes(raw)
    if kind == "absurd_scale":
        huge = tuple(Tensor(t.name, t.dtype, t.shape, t.data, {"scale": 1e31}) for t in good)
        return _delta(3, huge)
    if kind == "unknown_codec":
        return _delta(3, good).replace(b"\xa4int8", b"\xa4int9")
    if kind == "wrong_base":  # a delta whose base is not the version before it
        return _delta(3, good, base=1)
    if kind == "wrong_codec":
        return _delta(3, good, codec="float16")
    if kind == "other_fleet":
        return _delta(3, good, fleet="fl2")
    if kind == "other_epoch":
        return _delta(3, good, epoch="another-epoch")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["wrong_shape", "missing_tensor", "nan_scale", "absurd_scale",
                                  "unknown_codec", "wrong_codec", "wrong_base", "other_fleet",
                                  "other_epoch"])
def test_a_bad_delta_is_refused_with_one_line_and_the_snapshot_is_fetched(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(2)
    w2 = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    rx = DownlinkReceiver(TOPICS, "fl1", SHAPES)
    # the device holds version 2 (from a snapshot)
    idx2 = encode(ModelIndex("fl1", 2, 2, "m", "int8", 2, 5000, (), {}, 0.0, EPOCH))
    assert rx.on_index(idx2).subscribe == [snapshot_topic(TOPICS)]
    step = rx.on_payload(snapshot_topic(TOPICS), _model_payload(2, w2, 0.0))
    assert step.model is not None and step.unsubscribe == [snapshot_topic(TOPICS)]
    # version 3 arrives as a delta; the snapshot stays at 2 (bigger than the delta)
    idx3 = encode(ModelIndex("fl1", 3, 3, "m", "int8", 2, 5000, ((3, 100),), {}, 0.0, EPOCH))
    assert rx.on_index(idx3).subscribe == [delta_topic(TOPICS, 3)]
    bad = _bad(kind, rng)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_agent.downlink"):
        step = rx.on_payload(delta_topic(TOPICS, 3), bad)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("refusing model delta 3: "), lines
    assert "fetching the snapshot" in lines[0]
    # a delta of another fleet or epoch is well-formed: refused as such, not as malformed
    code = {"other_fleet": "wrong_fleet", "other_epoch": "wrong_round"}.get(kind)
    if code is not None:
        assert lines[0].endswith(f"({code}); fetching the snapshot (version 2) instead"), lines
    assert step.rejected == 1 and step.model is None
    assert step.subscribe == [snapshot_topic(TOPICS)]
    # the snapshot path needs delta 3 too: it is still subscribed; a good one completes it
    assert delta_topic(TOPICS, 3) in rx.subscribed
    good = _good_tensors(rng)
    rx.on_payload(snapshot_topic(TOPICS), _model_payload(2, w2, 0.0))
    done = rx.on_payload(delta_topic(TOPICS, 3), _delta(3, good))
    assert done.model is not None
    want = apply_delta(w2, good, "int8", SHAPES)
    got = {t.name: t.data for t in decode_model(done.model).tensors}
    assert got == {n: v.tobytes() for n, v in want.items()}


def test_apply_delta_refuses_a_wrong_base_tensor_and_extra_tensors() -> None:
    rng = np.random.default_rng(3)
    good = _good_tensors(rng)
    base = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    extra = Tensor("extra", "int8", (1,), b"\x01", {"scale": 1.0})
    with pytest.raises(WireError) as exc:
        apply_delta(base, (*good, extra), "int8", SHAPES)
    assert exc.value.code == RejectReason.SHAPE
    with pytest.raises(WireError) as exc:
        apply_delta({**base, "out/b": np.zeros(10, np.float64)}, good, "int8", SHAPES)
    assert exc.value.code == RejectReason.SHAPE


def test_staging_changes_nothing_until_published(tmp_path: Path) -> None:
    """A candidate the guard refuses is staged but never published: the downlink state
    (residual, deltas, index) stays as it was."""
    server = _server(tmp_path, "topk-int8")
    w0 = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    server.current(0, _model_payload(0, w0, 0.0), EPOCH, 0.0)
    files = sorted(p.name for p in (tmp_path / "downlink").iterdir())
    target = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    staged = server.stage(1, 1, w0, target, EPOCH, 1.0)
    assert isinstance(staged, Staged) and staged.delta is not None
    assert sorted(p.name for p in (tmp_path / "downlink").iterdir()) == files


def test_restart_republishes_the_same_bytes_and_a_new_epoch_starts_from_a_snapshot(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(4)
    server = _server(tmp_path, "int8")
    w = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
    server.current(0, _model_payload(0, w, 0.0), EPOCH, 0.0)
    sent: dict[str, bytes] = {}
    for v in range(1, 4):
        target = {n: x + 0.01 for n, x in w.items()}
        staged = server.stage(v, v, w, target, EPOCH, float(v))
        w = staged.weights
        for o in server.publish(staged, _model_payload(v, w, float(v)), EPOCH, float(v)):
            sent[o.topic] = o.payload
    again = {o.topic: o.payload for o in _server(tmp_path, "int8").current(
        3, _model_payload(3, w, 3.0), EPOCH, 3.0)}
    for v in range(1, 4):
        assert again[delta_topic(TOPICS, v)] == sent[delta_topic(TOPICS, v)]
    assert again[TOPICS.model] == sent[TOPICS.model]
    other = _server(tmp_path, "int8").current(3, _model_payload(3, w, 3.0), "f" * 16, 3.0)
    cleared = {o.topic for o in other if o.payload == b""}
    assert cleared == {delta_topic(TOPICS, v) for v in range(1, 4)}


def test_settings_are_validated() -> None:
    check_downlink_settings("int8", 10, 10, 0.1)
    for args, key in (
        (("int9", 10, 10, 0.1), "downlink must be"),
        (("int8", 0, 10, 0.1), "snapshot_every"),
        (("int8", 10, 5, 0.1), "downlink_window"),
        (("int8", 10, 10, 0.0), "downlink_fraction"),
        (("int8", True, 10, 0.1), "snapshot_every"),
    ):
        with pytest.raises(ConfigError, match=key):
            check_downlink_settings(*args)  # type: ignore[arg-type]


def test_aggregator_keys_are_strict_and_validated() -> None:
    from aggregator.config import load_aggregator_config

    cfg = load_aggregator_config(overrides={"downlink": "topk-int8", "snapshot_every": 5,
                                            "downlink_window": 8, "downlink_fraction": 0.2},
                                 environ={})
    s = cfg.downlink_settings()
    assert (s.mode, s.snapshot_every, s.window, s.fraction) == ("topk-int8", 5, 8, 0.2)
    assert load_aggregator_config(environ={}).downlink == "full"
    with pytest.raises(ConfigError, match="downlink must be"):
        load_aggregator_config(overrides={"downlink": "int9"}, environ={})
    with pytest.raises(ConfigError, match="downlink_window"):
        load_aggregator_config(overrides={"downlink": "int8", "snapshot_every": 20},
                               environ={})
    with pytest.raises(ConfigError, match="snapshot_evry"):
        load_aggregator_config(overrides={"snapshot_evry": 3}, environ={})


def test_a_candidate_that_cannot_be_encoded_goes_out_as_a_snapshot(tmp_path: Path) -> None:
    server = _server(tmp_path, "int8")
    w0 = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    server.current(0, _model_payload(0, w0, 0.0), EPOCH, 0.0)
    target = {**w0, "out/b": np.full(10, np.nan, np.float32)}
    staged = server.stage(1, 1, w0, target, EPOCH, 1.0)
    assert staged.delta is None and staged.weights is target
    w1 = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}  # what the store kept
    outs = server.publish(staged, _model_payload(1, w1, 1.0), EPOCH, 1.0)
    assert [o.topic for o in outs] == [snapshot_topic(TOPICS), TOPICS.model]
    rx = DownlinkReceiver(TOPICS, "fl1", SHAPES)
    rx.on_index(outs[1].payload)
    done = rx.on_payload(snapshot_topic(TOPICS), outs[0].payload)
    assert done.model is not None and decode_model(done.model).version == 1
