"""One enrolled device must not steer or stall the fleet (issue 8, findings 1 and 2), through a
real Mosquitto and a real aggregator process with its default bounds and ``norm_action =
"reject"``: an update scaled 1000x is rejected ``norm_bound``, a float32 update on an int8
round is ``bad_codec``, and a device claiming 10,000,000 examples is folded with a capped
weight, so the global model moves by no more than an honest device's share (the default
``"clip"`` case: tests/unit/test_norm_clip.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.errors import RejectReason
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from tests.fakes import (
    AckCollector,
    AggregatorProcess,
    FakeDevice,
    Watcher,
    exact_delta,
    make_update,
    model_weights,
)

pytestmark = pytest.mark.integration

HONEST = {"h0": 100, "h1": 120, "h2": 80, "h3": 150, "h4": 110}  # claimed num_examples


def _flat(w: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(w[n], np.float64).ravel() for n in sorted(w)])


def test_scaled_update_rejected_and_ten_million_examples_capped(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_NORM_ACTION", "reject")  # clip: test_norm_clip.py
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "state",
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "5", "--min-updates", "5", "--rounds", "2",
        "--round-timeout", "600",
    ).start()
    devices = {d: FakeDevice(broker, topics, d) for d in [*HONEST, "evil"]}

    def send(device: str, payload: bytes, uid: str) -> tuple[bool, str, str]:
        devices[device].publish(payload)
        ack = acks.wait(device, update_id=uid)
        return ack.accepted, ack.code, ack.reason

    try:
        assert watcher.round(1).base_version == 0
        w0 = model_weights(watcher.model(0))
        shapes = {k: v.shape for k, v in w0.items()}
        # Round 1: the honest fleet only.
        for i, (dev, n) in enumerate(HONEST.items()):
            uid = f"{dev}-1"
            assert send(dev, make_update("f1", 1, 0, dev, exact_delta(shapes, i), n,
                                         update_id=uid), uid)[:2] == (True, "ok")
        w1 = model_weights(watcher.model(1))
        assert watcher.round(2).base_version == 1
        # Round 2: the attacker, first an update scaled 1000x, then the codec the round
        # did not ask for, then a claim of 10,000,000 examples with an honest-sized delta.
        honest = {dev: exact_delta(shapes, 10 + i) for i, dev in enumerate(HONEST) if dev != "h4"}
        big = {n: v * np.float32(1000) for n, v in honest["h0"].items()}
        ok, code, reason = send("evil", make_update("f1", 2, 1, "evil", big, 100,
                                                    update_id="big"), "big")
        assert (ok, code) == (False, RejectReason.NORM_BOUND) and "exceeds the bound" in reason
        ok, code, reason = send("evil", make_update("f1", 2, 1, "evil", honest["h0"], 100,
                                                    codec="int8", update_id="i8"), "i8")
        assert (ok, code) == (False, RejectReason.BAD_CODEC) and "int8" in reason
        target_delta = exact_delta(shapes, 99)
        target = {n: w1[n] + target_delta[n] for n in shapes}
        assert send("evil", make_update("f1", 2, 1, "evil", target_delta, 10_000_000,
                                        update_id="evil-u"), "evil-u")[:2] == (True, "ok")
        for dev, delta in honest.items():
            uid = f"{dev}-2"
            assert send(dev, make_update("f1", 2, 1, dev, delta, HONEST[dev], update_id=uid),
                        uid)[0]
        w2 = model_weights(watcher.model(2))
        assert agg.wait(60) == 0

        cap = 2.0 * 110  # weight_cap_multiplier x the median claim of round 1
        claims = {d: HONEST[d] for d in honest}
        total = cap + sum(claims.values())
        honest_mean = {
            n: w1[n] + sum(k * honest[d][n] for d, k in claims.items()) / sum(claims.values())
            for n in shapes
        }
        for name in shapes:
            want = w1[name] + (sum(k * honest[d][name] for d, k in claims.items())
                               + cap * target_delta[name]) / total
            np.testing.assert_allclose(w2[name], want, rtol=1e-6, atol=1e-6)
        moved = np.linalg.norm(_flat(w2) - _flat(honest_mean))
        span = np.linalg.norm(_flat(target) - _flat(honest_mean))
        assert moved / span == pytest.approx(cap / total, rel=1e-4)  # 220 of 670: 33 %
        assert np.linalg.norm(_flat(w2) - _flat(target)) > 2 * moved
        log = agg.log()
        assert "rejected update big from evil" in log and "norm_bound: update L2 norm" in log
        assert "update evil-u from evil claims 10000000 examples: folded with weight 220" in log
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        acks.close()
        watcher.close()
        for d in devices.values():
            d.close()
