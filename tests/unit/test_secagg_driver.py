"""The aggregator's secure-round driver (aggregator/secagg.py) over a real engine and state
directory, without a broker: real clients' signed messages in, what it publishes out; the
round closes on the unmasked sum (plain FedAvg and DP with central noise after unmasking),
a device missing a phase is dropped, too few survivors abandon the round with a reason,
bad messages are answered on the ack topic and counted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.outgoing import Outgoing
from aggregator.secagg import SecAggDriver, flat_order
from aggregator.service import build_engine
from fedmq.errors import ConfigError, RejectReason
from fedmq.secagg.client import SecAggClient
from fedmq.signing import DeviceKey, Registry
from fedmq.wire import StatusMessage, decode_ack, encode

FLEET = "sa"
DEVICES = ("d0", "d1", "d2", "d3")


def _setup(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    keys = {d: DeviceKey.generate() for d in DEVICES}
    registry = tmp_path / "registry.json"
    for d in DEVICES:
        Registry(registry).enroll(d, keys[d].public_hex)
    values: dict[str, object] = dict(
        fleet=FLEET, state_dir=tmp_path / "state", model="digits-mlp", eval_dataset="none",
        rounds=1, clients_per_round=4, min_updates=3, min_devices=4, round_policy="secagg",
        registry=str(registry), secagg_min_survivors=3, secagg_clip=0.05, round_timeout=100,
        secagg_phase_timeout=30,
    )
    values.update(overrides)
    config = AggregatorConfig(**values)  # type: ignore[arg-type]
    engine = build_engine(config)
    now = 1000.0
    engine.start(now, tick=False)
    for d in DEVICES:
        engine.on_status(d, encode(StatusMessage(FLEET, d, "online")), now)
    driver = SecAggDriver(config, engine, started_at=now - 1)
    assert engine.tick(now) and engine.round is not None
    assert driver.tick(now) == []
    clients = {d: SecAggClient(FLEET, engine.epoch, 1, d, keys[d]) for d in DEVICES}
    return config, engine, driver, clients, keys, now


def _one(out: list[Outgoing], topic_end: str) -> bytes:
    (item,) = [o for o in out if o.topic.endswith(topic_end)]
    assert item.retain and item.qos == 1
    return item.payload


def _run(engine, driver, clients, now, length, drop_after_shares=(),  # type: ignore[no-untyped-def]
         drop_before_shares=(), drop_before_unmask=()):
    """Drive one secure round; devices in ``drop_*`` stop answering at that point (each
    phase then ends at its deadline). Returns the devices' int8 inputs and who sent one."""
    rng = np.random.default_rng(0)
    qs = {d: rng.integers(-30, 31, length).astype(np.int8) for d in DEVICES}
    out: list[Outgoing] = []
    for d in DEVICES:
        out += driver.on_message(d, clients[d].advertise(), now)
    roster = _one(out, "/secagg/out")  # every selected device is in: closed at once
    sharers = [d for d in DEVICES if d not in drop_before_shares]
    out = []
    for d in sharers:
        out += driver.on_message(d, clients[d].on_roster(roster), now + 1)
    if drop_before_shares:
        assert not out
        out = driver.tick(now + 32)  # the shares phase's deadline
    relays = {d: _one(out, f"/secagg/out/{d}") for d in sharers}
    alive = [d for d in sharers if d not in drop_after_shares]
    out = []
    for d in alive:
        out += driver.on_message(d, clients[d].on_relay(relays[d], qs[d], 10), now + 2)
    if drop_after_shares:
        assert not out  # waits for the missing device until the round's deadline
        out = driver.tick(now + 101)
    survivors = _one(out, "/secagg/out")
    for d in alive:
        if d not in drop_before_unmask:
            driver.on_message(d, clients[d].on_survivors(survivors), now + 102)
    driver.tick(now + 140)
    return qs, alive


def test_secure_round_closes_on_the_exact_unmasked_sum(tmp_path: Path) -> None:
    _, engine, driver, clients, _, now = _setup(tmp_path)
    before = {k: v.copy() for k, v in engine.weights.items()}
    qs, alive = _run(engine, driver, clients, now, driver.length)
    result = driver.results[0]
    plain = np.sum([qs[d].astype(np.int64) for d in alive], axis=0)
    assert np.array_equal(result.sum, plain)
    engine.tick(now + 104)
    assert engine.version == 1 and engine.round is None  # rounds = 1: none opens
    flat = np.concatenate([(engine.weights[n] - before[n]).reshape(-1)
                           for n, _ in flat_order(dict(engine.template))])
    np.testing.assert_allclose(flat, plain * (0.05 / 127) / 4, rtol=1e-5, atol=1e-6)
    # A message of the finished round arriving after the close (unmasking ends as soon as
    # enough shares are in) is not needed: ignored, not answered as an error.
    assert driver.tick(now + 105) == []
    late = clients["d0"].advertise()  # any well-formed message of that round
    assert driver.on_message("d0", late, now + 106) == []
    assert sum(driver.session.server.rejected.values()) == 0


@pytest.mark.parametrize("phase", ["drop_before_shares", "drop_after_shares",
                                   "drop_before_unmask"])
def test_a_device_missing_a_phase_is_dropped(tmp_path: Path, phase: str) -> None:
    _, engine, driver, clients, _, now = _setup(tmp_path)
    qs, alive = _run(engine, driver, clients, now, driver.length, **{phase: ("d2",)})
    result = driver.results[0]
    dropped = ("d2",) if phase == "drop_after_shares" else ()
    assert result.dropped == dropped
    assert result.survivors == (("d0", "d1", "d3") if phase != "drop_before_unmask"
                                else DEVICES)
    assert np.array_equal(result.sum, np.sum([qs[d].astype(np.int64) for d in alive], axis=0))
    engine.tick(now + 141)
    assert engine.version == 1
    assert engine.store.model(1).metrics["participants"] == len(result.survivors)


def test_too_few_survivors_abandon_the_round_with_a_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, engine, driver, clients, _, now = _setup(tmp_path)
    for d in DEVICES[:2]:  # two of four advertise; the keys phase ends at its deadline
        driver.on_message(d, clients[d].advertise(), now)
    assert driver.tick(now + 31) == []
    assert "2 devices sent keys, below the minimum 3" in caplog.text
    engine.tick(now + 32)
    assert engine.round is None or engine.round.round_id == 2  # abandoned, next one opened
    assert engine.version == 0


def test_bad_messages_are_answered_and_counted(tmp_path: Path) -> None:
    _, engine, driver, clients, keys, now = _setup(tmp_path)
    stranger = SecAggClient(FLEET, engine.epoch, 1, "d0", DeviceKey.generate())
    wrong_round = SecAggClient(FLEET, engine.epoch, 7, "d1", keys["d1"])
    cases = [
        ("d0", stranger.advertise(), RejectReason.BAD_SIGNATURE),
        ("d1", wrong_round.advertise(), RejectReason.WRONG_ROUND),
        ("d2", clients["d3"].advertise(), RejectReason.DEVICE_MISMATCH),
        ("d2", b"\x93garbage", RejectReason.MALFORMED),
    ]
    for device, payload, code in cases:
        (ack_out,) = driver.on_message(device, payload, now)
        ack = decode_ack(ack_out.payload)
        assert ack_out.topic.endswith(f"/ack/{device}") and not ack.accepted
        assert ack.code == code and ack.update_id == "secagg:1" and ack.reason
    counted = engine.metrics.updates_rejected
    assert counted.labels(reason=RejectReason.BAD_SIGNATURE)._value.get() == 1
    (refused,) = driver.refuse_update("d0")  # a plain update in a secure federation
    assert decode_ack(refused.payload).code == RejectReason.WRONG_PHASE


def test_dp_adds_central_noise_after_unmasking(tmp_path: Path) -> None:
    _, engine, driver, clients, _, now = _setup(
        tmp_path, dp=True, dp_population=4, dp_noise_multiplier=1.0, dp_clip=0.5,
        dp_seed=3, selection="sample")
    assert engine.round is not None and engine.round.plan.config.params["secagg_clip"] == 0.05
    before = {k: v.copy() for k, v in engine.weights.items()}
    qs, alive = _run(engine, driver, clients, now, driver.length)
    engine.tick(now + 104)
    assert engine.version == 1
    metrics = engine.store.model(1).metrics
    assert metrics["dp_epsilon"] > 0
    flat = np.concatenate([(engine.weights[n] - before[n]).reshape(-1)
                           for n, _ in flat_order(dict(engine.template))])
    plain = np.sum([qs[d].astype(np.int64) for d in alive], axis=0) * (0.05 / 127) / 4
    noise = (flat - plain) * 4  # sd z * C on the sum
    assert abs(noise.std() / (1.0 * 0.5) - 1) < 0.05


def test_config_checks() -> None:
    with pytest.raises(ConfigError, match="registry"):
        AggregatorConfig(round_policy="secagg")
    with pytest.raises(ConfigError, match="fixed"):
        AggregatorConfig(round_policy="secagg", registry="r.json", dp=True, dp_population=10,
                         dp_clip_mode="adaptive")
    with pytest.raises(ConfigError, match="secagg_min_survivors"):
        AggregatorConfig(round_policy="secagg", registry="r.json", secagg_min_survivors=1)
