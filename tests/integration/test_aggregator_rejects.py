"""Bad updates sent with ``mosquitto_pub`` are acked with the right code and do not poison
the round: afterwards good updates still close it (real Mosquitto, real aggregator process)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedmq.errors import RejectReason
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq.wire import Tensor
from tests.fakes import (
    AckCollector,
    AggregatorProcess,
    Watcher,
    exact_delta,
    make_update,
    model_weights,
    raw_update,
)

pytestmark = pytest.mark.integration

MAX_BYTES = 64 * 1024


def _mosquitto_pub(b: LocalBroker, topic: str, payload: bytes, path: Path) -> None:
    exe = shutil.which("mosquitto_pub")
    assert exe, "mosquitto_pub is not installed (apt-get install mosquitto-clients)"
    path.write_bytes(payload)
    subprocess.run(
        [exe, "-h", b.host, "-p", str(b.port), "-q", "1", "-t", topic, "-f", str(path)],
        check=True, timeout=20, capture_output=True,
    )


def test_rejects_then_round_completes(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "state",
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "2", "--min-updates", "2", "--rounds", "1",
        "--max-update-bytes", str(MAX_BYTES),
    ).start()
    try:
        ann = watcher.round(1)
        v0 = watcher.model(0)
        w0 = model_weights(v0)
        shapes = {t.name: t.shape for t in v0.tensors}
        good = exact_delta(shapes, 1)
        nan = {k: v.copy() for k, v in good.items()}
        nan["dense1_bias"][3] = np.nan
        rid, base = ann.round_id, ann.base_version

        def upd(device: str, delta: dict[str, np.ndarray], **kw: int) -> bytes:
            return make_update(
                "f1", kw.get("round_id", rid), base, device, delta, kw.get("n", 1),
                update_id=f"{device}-u",
            )

        bad = [
            ("garbage", b"\xc1\x00 not msgpack \xff" * 3, RejectReason.MALFORMED),
            ("shapes", raw_update("f1", rid, base, "shapes", [
                Tensor.from_array(n, np.zeros((3, 3), np.float32)) for n in shapes
            ]), RejectReason.SHAPE),
            ("nan", raw_update("f1", rid, base, "nan", [
                Tensor.from_array(k, v) for k, v in nan.items()
            ]), RejectReason.NON_FINITE),
            ("huge", b"\x00" * (MAX_BYTES + 1), RejectReason.TOO_LARGE),
            ("stale", upd("stale", good, round_id=rid + 4), RejectReason.WRONG_ROUND),
        ]
        for device, payload, code in bad:
            _mosquitto_pub(broker, topics.update(device), payload, tmp_path / f"{device}.bin")
            ack = acks.wait(device)
            assert (ack.accepted, ack.code) == (False, code), ack.reason
            assert ack.reason

        first = upd("good1", good, n=1)
        _mosquitto_pub(broker, topics.update("good1"), first, tmp_path / "good1.bin")
        ack = acks.wait("good1")
        assert ack.accepted and ack.code == "ok" and ack.update_id == "good1-u"
        _mosquitto_pub(broker, topics.update("good1"), first, tmp_path / "good1.bin")
        ack = acks.wait("good1")  # the same update again: already folded, not folded twice
        assert (ack.accepted, ack.code) == (True, RejectReason.DUPLICATE)

        second_delta = exact_delta(shapes, 2)
        second = upd("good2", second_delta, n=3)
        _mosquitto_pub(broker, topics.update("good2"), second, tmp_path / "good2.bin")
        assert acks.wait("good2").accepted

        v1 = watcher.model(1)
        assert v1.metrics["participants"] == 2
        got = model_weights(v1)
        for name in shapes:
            mean = (good[name] + 3 * second_delta[name]) / np.float32(4)
            np.testing.assert_array_equal(got[name], w0[name] + mean)
        assert agg.wait(60) == 0  # --rounds 1: exits once the round is published
        log = agg.log()
        assert "round 1 closed: 2 participants" in log
        assert log.count("rejected update") == 5
        assert log.count("update good1-u from good1 was already folded in round 1") == 1
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        acks.close()
        watcher.close()
