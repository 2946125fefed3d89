"""The round engine without MQTT: fold math, reject codes, restart, abandon, selection."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Outgoing, resolve_bundle
from aggregator.store import Store
from fedmq.errors import RejectReason, StateError
from fedmq.models.spec import ModelBundle
from fedmq.wire import (
    StatusMessage,
    Tensor,
    decode_ack,
    decode_model,
    decode_round,
    decode_update,
    encode,
)
from tests.fakes import exact_delta, make_update, model_weights, raw_update

T0 = 1_000.0


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none", "codec": "float32",
        "selection": "any", "clients_per_round": 3, "min_updates": 3, "round_timeout": 60.0,
        "abandon_after": 30.0, "max_update_bytes": 64 * 1024,
    }
    base.update(kw)
    return AggregatorConfig(**base)


class Harness:
    def __init__(self, cfg: AggregatorConfig, bundle: ModelBundle, evaluator: Any = None) -> None:
        self.engine = Engine(cfg, Store(cfg.state_dir), bundle, evaluator)
        self.out = self.engine.start(T0)
        self.shapes = dict(self.engine.template)

    def send(self, device: str, payload: bytes, now: float = T0 + 1) -> Any:
        return self.engine.handle_update(device, payload, now)

    def update(self, device: str, delta: Mapping[str, np.ndarray], n: int, *, round_id: int = 1,
               base: int = 0, uid: str | None = None) -> Any:
        payload = make_update("f", round_id, base, device, delta, n, "float32", uid or device)
        return self.send(device, payload)

    def close(self) -> None:
        self.engine.store.close()


def _models(out: list[Outgoing]) -> list[Any]:
    return [decode_model(o.payload) for o in out if o.topic.endswith("/model")]


def _rounds(out: list[Outgoing]) -> list[Any]:
    return [decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload]


def test_start_publishes_v0_and_opens_round(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path), bundle)
    models, rounds = _models(h.out), _rounds(h.out)
    assert [m.version for m in models] == [0] and [r.round_id for r in rounds] == [1]
    assert all(o.retain and o.qos == 1 for o in h.out)
    w0 = model_weights(models[0])
    for name, value in bundle.initial_trainable().items():
        np.testing.assert_array_equal(w0[name], value)
    assert rounds[0].base_version == 0 and rounds[0].selected == () and rounds[0].min_updates == 3
    h.close()


def test_fold_gives_exact_weighted_mean(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path), bundle)
    w0 = model_weights(_models(h.out)[0])
    deltas = [exact_delta(h.shapes, s) for s in range(3)]
    counts = [1, 3, 4]
    for i, (d, n) in enumerate(zip(deltas, counts, strict=True)):
        ack = h.send(f"d{i}", make_update("f", 1, 0, f"d{i}", d, n))
        assert ack.accepted and ack.code == "ok"
        out = h.engine.tick(T0 + 2)
        assert (out == []) == (i < 2)
    model = _models(out)[0]
    assert model.version == 1 and model.round_id == 1
    assert model.metrics["participants"] == 3 and model.metrics["num_examples"] == 8
    got = model_weights(model)
    for name in h.shapes:
        mean = sum(n * d[name] for d, n in zip(deltas, counts, strict=True)) / np.float32(8)
        np.testing.assert_array_equal(got[name], w0[name] + mean.astype(np.float32))
    assert [r.round_id for r in _rounds(out)] == [2] and _rounds(out)[0].base_version == 1
    [res] = h.engine.pop_results()
    assert res.status == "closed" and res.participants == 3 and res.bytes_in > 3 * 19_000
    assert h.engine.metrics.value("fedmq_updates_accepted_total") == 3
    assert h.engine.metrics.value("fedmq_rounds_completed_total") == 1
    h.close()


def test_rejects_carry_the_right_codes(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path, max_claimed_examples=100), bundle)
    good = exact_delta(h.shapes, 0)
    assert h.update("a", good, 5, uid="ua").accepted
    nan = {k: v.copy() for k, v in good.items()}
    nan["out_bias"][0] = np.nan
    wrong_shape = [Tensor.from_array(n, np.zeros((2, 2), np.float32)) for n in h.shapes]
    f16 = [Tensor.from_array(n, np.zeros(s, np.float16)) for n, s in h.shapes.items()]
    cases = {
        RejectReason.MALFORMED: [b"\x00garbage\xff", make_update("f", 1, 0, "m", good, 101)],
        RejectReason.TOO_LARGE: [b"\x00" * (64 * 1024 + 1)],
        RejectReason.NON_FINITE: [
            raw_update("f", 1, 0, "m", [Tensor.from_array(k, v) for k, v in nan.items()])
        ],
        RejectReason.SHAPE: [raw_update("f", 1, 0, "m", wrong_shape)],
        RejectReason.WRONG_FLEET: [make_update("g", 1, 0, "m", good, 1)],
        RejectReason.WRONG_ROUND: [make_update("f", 7, 0, "m", good, 1)],
        RejectReason.WRONG_BASE: [make_update("f", 1, 3, "m", good, 1)],
        RejectReason.DEVICE_MISMATCH: [make_update("f", 1, 0, "other", good, 1)],
        RejectReason.BAD_CODEC: [raw_update("f", 1, 0, "m", f16)],
    }
    for code, payloads in cases.items():
        for payload in payloads:
            ack = h.send("m", payload)
            assert (ack.accepted, ack.code) == (False, code), (code, ack.reason)
            assert ack.reason and ack.device == "m"
    dup = h.update("a", good, 5, uid="ua")  # a redelivery: it is folded, and not again
    assert (dup.accepted, dup.code, dup.update_id) == (True, RejectReason.DUPLICATE, "ua")
    same_device = h.update("a", good, 5, uid="ua2")
    assert (same_device.accepted, same_device.code) == (False, RejectReason.DUPLICATE)
    ack = h.engine.handle_update("bad device", b"x", T0)
    assert ack.code == RejectReason.MALFORMED and h.engine.ack_outgoing(ack) is None
    garbage_ack = h.engine.ack_outgoing(h.send("m", b"\x01\x02"))
    assert garbage_ack is not None and not garbage_ack.retain
    assert decode_ack(garbage_ack.payload).code == RejectReason.MALFORMED
    assert h.engine.metrics.value(
        "fedmq_updates_rejected_total", {"reason": RejectReason.DUPLICATE}
    ) == 1
    assert h.engine.metrics.value("fedmq_updates_duplicate_total") == 1
    counts = h.engine.store.reject_counts(1)
    assert counts[RejectReason.MALFORMED] == 4 and counts[RejectReason.DUPLICATE] == 1
    assert h.engine.round is not None and h.engine.round.count == 1  # nothing poisoned
    h.close()


def test_stale_round_after_close(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path, min_updates=1, clients_per_round=1), bundle)
    d = exact_delta(h.shapes, 1)
    assert h.update("a", d, 1).accepted
    h.engine.tick(T0 + 2)
    ack = h.update("b", d, 1)  # still aimed at round 1, now round 2 is open
    assert ack.code == RejectReason.WRONG_ROUND and ack.round_id == 1
    assert h.update("b", d, 1, round_id=2, base=0).code == RejectReason.WRONG_BASE
    assert h.update("b", d, 1, round_id=2, base=1).accepted
    h.close()


def test_redelivered_folded_update_is_duplicate_with_its_round(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    """Folded in round 1, redelivered while round 2 is open (also after a restart): accepted
    duplicate naming round 1, never wrong_round, never folded again."""
    cfg = _config(tmp_path, min_updates=1, clients_per_round=1)
    h = Harness(cfg, bundle)
    d = exact_delta(h.shapes, 1)
    payload = make_update("f", 1, 0, "a", d, 2, "float32", "ua")
    assert h.send("a", payload).code == "ok"
    assert [r.round_id for r in _rounds(h.engine.tick(T0 + 2))] == [2]
    ack = h.send("a", payload)
    assert (ack.accepted, ack.code, ack.round_id) == (True, RejectReason.DUPLICATE, 1)
    assert ack.reason == "update ua was already folded in round 1"
    assert h.engine.round is not None and h.engine.round.count == 0
    assert h.engine.store.reject_counts() == {}
    other = h.send("b", make_update("f", 1, 0, "b", d, 2, "float32", "ua"))  # not its update
    assert (other.accepted, other.code) == (False, RejectReason.WRONG_ROUND)
    h.close()
    h2 = Harness(cfg, bundle)
    ack = h2.send("a", payload)
    assert (ack.accepted, ack.code, ack.round_id) == (True, RejectReason.DUPLICATE, 1)
    assert h2.engine.round is not None and h2.engine.round.count == 0
    h2.close()


def test_retained_update_is_rejected_not_folded(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path), bundle)
    payload = make_update("f", 1, 0, "a", exact_delta(h.shapes, 1), 2, "float32", "ua")
    ack = h.engine.handle_update("a", payload, T0 + 1, retained=True)
    assert (ack.accepted, ack.code, ack.update_id) == (False, RejectReason.RETAINED, "ua")
    assert "must not be retained" in ack.reason
    assert h.engine.round is not None and h.engine.round.count == 0
    assert h.engine.store.reject_counts(1) == {RejectReason.RETAINED: 1}
    assert h.engine.metrics.value(
        "fedmq_updates_rejected_total", {"reason": RejectReason.RETAINED}
    ) == 1
    assert h.send("a", payload).code == "ok"  # the same update, published normally
    h.close()


def test_restart_refolds_the_journal_exactly_once(tmp_path: Path, bundle: ModelBundle) -> None:
    cfg = _config(tmp_path)
    h = Harness(cfg, bundle)
    w0 = model_weights(_models(h.out)[0])
    deltas = [exact_delta(h.shapes, 10 + i) for i in range(3)]
    assert h.update("a", deltas[0], 2).accepted
    assert h.update("b", deltas[1], 2).accepted
    h.close()  # the process dies: the round is open with two journaled updates
    h2 = Harness(cfg, bundle)
    assert [r.round_id for r in _rounds(h2.out)] == [1]  # the same round is re-announced
    assert h2.engine.round is not None and h2.engine.round.count == 2
    assert h2.update("b", deltas[1], 2).code == RejectReason.DUPLICATE  # redelivery
    assert h2.update("c", deltas[2], 4).accepted
    model = _models(h2.engine.tick(T0 + 3))[0]
    got = model_weights(model)
    for name in h.shapes:
        mean = (2 * deltas[0][name] + 2 * deltas[1][name] + 4 * deltas[2][name]) / np.float32(8)
        np.testing.assert_array_equal(got[name], w0[name] + mean)
    h2.close()
    h3 = Harness(cfg, bundle)  # and after the close, the new version is the current one
    assert [m.version for m in _models(h3.out)] == [1]
    assert [r.round_id for r in _rounds(h3.out)] == [2]
    h3.close()


def test_abandon_reopens_on_same_base(tmp_path: Path, bundle: ModelBundle) -> None:
    h = Harness(_config(tmp_path, min_updates=2), bundle)
    assert h.update("a", exact_delta(h.shapes, 0), 1).accepted
    assert h.engine.tick(T0 + 60) == []  # deadline passed, no quorum, within the grace time
    out = h.engine.tick(T0 + 90)
    assert [(r.round_id, r.base_version) for r in _rounds(out)] == [(2, 0)]
    [res] = h.engine.pop_results()
    assert res.status == "abandoned" and res.participants == 1
    assert h.engine.store.round(1).status == "abandoned"
    assert h.update("a", exact_delta(h.shapes, 0), 1).code == RejectReason.WRONG_ROUND
    h.close()


def test_sampling_waits_for_devices_and_rejects_unselected(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    cfg = _config(tmp_path, selection="sample", clients_per_round=2, min_updates=2,
                  min_devices=3)
    h = Harness(cfg, bundle)
    assert _rounds(h.out) == []  # nobody online yet
    for dev in ("a", "b", "c"):
        status = StatusMessage(fleet="f", device=dev, state="online")
        h.engine.on_status(dev, encode(status), T0)
    h.engine.on_status("c", encode(StatusMessage(fleet="f", device="c", state="offline")), T0)
    assert h.engine.tick(T0) == []  # two online, three required
    h.engine.on_status("c", encode(StatusMessage(fleet="f", device="c", state="online")), T0)
    h.engine.on_status("x", b"\x00bad", T0)
    [ann] = _rounds(h.engine.tick(T0))
    assert len(ann.selected) == 2 and set(ann.selected) <= {"a", "b", "c"}
    outsider = ({"a", "b", "c"} - set(ann.selected)).pop()
    ack = h.update(outsider, exact_delta(h.shapes, 0), 1)
    assert ack.code == RejectReason.NOT_SELECTED
    for dev in ann.selected:
        assert h.update(dev, exact_delta(h.shapes, 0), 1).accepted
    assert [m.version for m in _models(h.engine.tick(T0 + 1))] == [1]  # all selected in
    h.close()


def test_rounds_limit_evaluator_and_fedavgm_state(tmp_path: Path, bundle: ModelBundle) -> None:
    calls: list[int] = []

    def evaluator(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        calls.append(len(weights))
        return {"accuracy": 0.5 + 0.1 * len(calls), "loss": 1.0}

    cfg = _config(tmp_path, min_updates=1, clients_per_round=1, rounds=2, strategy="fedavgm")
    h = Harness(cfg, bundle, evaluator)
    assert decode_model(h.out[0].payload).metrics["accuracy"] == pytest.approx(0.6)
    assert h.update("a", exact_delta(h.shapes, 0), 1).accepted
    out = h.engine.tick(T0 + 1)
    assert _models(out)[0].metrics["accuracy"] == pytest.approx(0.7)
    assert h.engine.metrics.value("fedmq_global_accuracy") == pytest.approx(0.7)
    assert h.update("a", exact_delta(h.shapes, 1), 1, round_id=2, base=1, uid="a2").accepted
    out = h.engine.tick(T0 + 2)
    assert h.engine.done and [m.version for m in _models(out)] == [2]
    assert [o.payload for o in out if o.topic.endswith("/round")] == [b""]  # cleared
    velocity = dict(h.engine.strategy.state())
    h.close()
    h2 = Harness(cfg, bundle, evaluator)
    assert h2.engine.done and _rounds(h2.out) == []
    for key, value in h2.engine.strategy.state().items():
        np.testing.assert_array_equal(value, velocity[key])
    h2.close()


def test_state_of_another_model_is_refused(tmp_path: Path, bundle: ModelBundle) -> None:
    cfg = _config(tmp_path)
    Harness(cfg, bundle).close()
    other = dataclasses.replace(bundle, tflite_path=bundle.path / "initial.npz")
    with pytest.raises(StateError, match="belongs to model"):
        Harness(cfg, other)


def test_config_precedence_and_validation(tmp_path: Path) -> None:
    from aggregator.config import load_aggregator_config
    from fedmq.errors import ConfigError

    toml = tmp_path / "agg.toml"
    toml.write_text('[aggregator]\nfleet = "lab"\nrounds = 5\nmin_updates = 2\ncodec = "float16"\n')
    env = {"FEDMQ_AGGREGATOR_ROUNDS": "7", "FEDMQ_AGGREGATOR_SERVER_LR": "0.5"}
    cfg = load_aggregator_config(toml, overrides={"codec": "int8", "mqtt.port": None},
                                 environ=env)
    assert (cfg.fleet, cfg.rounds, cfg.min_updates, cfg.codec, cfg.server_lr) == (
        "lab", 7, 2, "int8", 0.5
    )
    assert cfg.effective_client_id == "fedmq-aggregator-lab" and cfg.mqtt.port == 1883
    assert cfg.mqtt_settings().client_id == "fedmq-aggregator-lab"
    assert cfg.topics.update("d") == "fl/lab/update/d"
    for bad in ({"min_updates": 5, "clients_per_round": 2}, {"codec": "zip"},
                {"strategy": "krum"}, {"fleet": "a/b"}, {"round_timeout": 0},
                {"mqtt.password": "x"}, {"mqtt.tls_cert": "c"}, {"port": 1}):
        with pytest.raises(ConfigError):
            load_aggregator_config(overrides=bad, environ={})


def test_epoch_is_made_once_and_carried_by_models_rounds_and_checked_on_updates(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    cfg = _config(tmp_path)
    h = Harness(cfg, bundle)
    epoch = h.engine.epoch
    assert len(epoch) == 16 and int(epoch, 16) >= 0
    assert [m.epoch for m in _models(h.out)] == [epoch]
    assert [r.epoch for r in _rounds(h.out)] == [epoch]
    d = exact_delta(h.shapes, 1)

    def upd(device: str, ep: str) -> bytes:
        msg = decode_update(make_update("f", 1, 0, device, d, 1, "float32", f"u-{device}"))
        return encode(dataclasses.replace(msg, epoch=ep))

    other = h.send("a", upd("a", "0000000000000000"))
    assert (other.accepted, other.code) == (False, RejectReason.WRONG_ROUND)
    assert other.reason == (
        "update is for epoch '0000000000000000' (round 1), the aggregator is in epoch "
        f"'{epoch}' (round 1 is open)"
    )
    assert h.send("a", upd("a", epoch)).code == "ok"
    assert h.send("b", upd("b", "")).code == "ok"  # a device from before epochs
    h.close()
    h2 = Harness(cfg, bundle)  # the epoch is kept in the state
    assert h2.engine.epoch == epoch and [r.epoch for r in _rounds(h2.out)] == [epoch]
    h2.close()


def test_state_behind_its_own_epoch_rotates_to_a_new_one(
    tmp_path: Path, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    """A retained model or a device status of this epoch beyond the state (a restored older
    copy): new persisted epoch, one WARNING line, model and open round republished with it."""
    cfg = _config(tmp_path)
    h = Harness(cfg, bundle)
    epoch = h.engine.epoch
    [v0] = _models(h.out)
    # our own model, another epoch's newer model, a status not ahead: nothing happens
    assert h.engine.on_model(encode(v0), T0) == []
    newer_elsewhere = dataclasses.replace(v0, version=9, epoch="ffffffffffffffff")
    assert h.engine.on_model(encode(newer_elsewhere), T0) == []
    level = StatusMessage("f", "a", "idle", round_id=1, epoch=epoch, model_version=0)
    assert h.engine.on_status("a", encode(level), T0) == []
    assert h.engine.epoch == epoch
    caplog.set_level("WARNING", logger="aggregator.coordinator")
    ahead = StatusMessage("f", "a", "idle", round_id=5, epoch=epoch, model_version=4)
    out = h.engine.on_status("a", encode(ahead), T0)
    new = h.engine.epoch
    assert new != epoch and len(new) == 16
    assert [(m.version, m.epoch) for m in _models(out)] == [(0, new)]
    assert [(r.round_id, r.epoch) for r in _rounds(out)] == [(1, new)]
    [line] = [
        r.getMessage() for r in caplog.records
        if r.levelname == "WARNING" and r.name == "aggregator.coordinator"
    ]
    assert line.startswith(
        f"the status of a shows model version 4, round 5 of epoch {epoch}, but the state in "
    ) and f"holds version 0, round 1: it was restored from an older copy; new epoch {new}" in line
    old = decode_update(make_update("f", 1, 0, "a", exact_delta(h.shapes, 1), 1, "float32", "u"))
    ack = h.send("a", encode(dataclasses.replace(old, epoch=epoch)))
    assert (ack.accepted, ack.code) == (False, RejectReason.WRONG_ROUND)
    assert h.send("a", encode(dataclasses.replace(old, epoch=new, update_id="u2"))).accepted
    h.close()
    h2 = Harness(cfg, bundle)
    assert h2.engine.epoch == new and [r.epoch for r in _rounds(h2.out)] == [new]
    h2.close()
