"""Chunked transfer through a real Mosquitto: a federation through a broker whose packet limit
is below the model size equals the unchunked run bit for bit; a SIGKILL of the aggregator in
the middle of a chunked update loses nothing; a bad chunk gets an ack with its reason."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from aggregator.store import Store
from fedmq.chunks import split
from fedmq.errors import RejectReason
from fedmq.net.localbroker import BrokerOptions, LocalBroker
from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics
from fedmq.wire import encode
from fedmq_ops.localfleet import FederationSpec, run_federation
from fedmq_ops.observer import FleetObserver
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

LIMIT = 8 * 1024  # the broker's max_packet_size; digits-mlp's model is ~17 KB


def _held_chunks(state: Path, device: str) -> int:
    root = state / "chunks" / device
    return sum(1 for d in root.iterdir() for _ in d.iterdir()) if root.is_dir() else 0


def test_sigkill_mid_transfer_loses_nothing_and_bad_chunks_get_a_reason(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics("f1", topic_prefix)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    state = tmp_path / "state"
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "1", "--min-updates", "1", "--rounds", "1",
        "--round-timeout", "600",
    ).start()
    device = FakeDevice(broker, topics, "dev0")
    try:
        assert watcher.round(1).base_version == 0
        w0 = model_weights(watcher.model(0))
        delta = exact_delta({k: v.shape for k, v in w0.items()}, 5)
        payload = make_update("f1", 1, 0, "dev0", delta, 3, update_id="u1")
        chunks = [encode(c) for c in split(payload, 4096)]
        assert len(chunks) == 6

        # A chunk whose data does not fit its header: refused, with the reason on the ack.
        bad_chunk = {"v": 2, "type": "chunk", "transfer": "a" * 64, "index": 0, "count": 2,
                     "total_bytes": 10, "data": b"abc"}
        device.publish(msgpack.packb(bad_chunk, use_bin_type=True))
        bad = acks.wait("dev0")
        assert (bad.accepted, bad.code, bad.update_id) == (False, RejectReason.BAD_CHUNK, "")
        assert bad.reason == "chunk 0 of 2 of a 10-byte transfer must hold 5 bytes, got 3"

        for chunk in chunks[:3]:
            device.publish(chunk)
        deadline = time.monotonic() + 60
        while _held_chunks(state, "dev0") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _held_chunks(state, "dev0") == 3  # on disk before their PUBACK
        agg.kill()
        # While it is down the broker keeps the rest for its persistent session; chunk 2
        # is published again too (a QoS 1 redelivery, harmless).
        for chunk in chunks[2:]:
            device.publish(chunk)
        agg.start()

        ack = acks.wait("dev0", update_id="u1", timeout=60)
        assert ack.accepted and ack.code == "ok"
        w1 = model_weights(watcher.model(1))
        for name in w0:
            np.testing.assert_array_equal(w1[name], w0[name] + delta[name])
        assert agg.wait(60) == 0
        assert _held_chunks(state, "dev0") == 0
        with Store(state) as store:
            assert [c[1] for c in store.contributions(1)] == ["u1"]
        assert "chunk store: resuming 1 transfer(s) in progress" in agg.log()
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        device.close()
        acks.close()
        watcher.close()


def _federate(broker: LocalBroker, workdir: Path, max_message_bytes: int) -> list[Any]:
    """Three agents, three rounds; the coordinate-wise median folds the same updates to the
    same bits whatever order they arrive in (a weighted sum in float would not)."""
    extra = {"max_message_bytes": max_message_bytes} if max_message_bytes else {}
    spec = FederationSpec(
        agents=3, rounds=3, dataset="digits", model="digits-mlp", partition="iid",
        codec="float32", epochs=1, lr=0.1, seed=3, strategy="median",
        broker=f"{broker.host}:{broker.port}",
        fleet=f"chunks-{uuid.uuid4().hex[:8]}", workdir=workdir, timeout=300,
        extra_agent=extra, extra_aggregator=extra,
    )
    result = run_federation(spec)
    with Store(workdir / "aggregator") as store:
        weights = store.load_weights(3)
    rows = [(r.round_id, r.version, r.participants, r.accuracy, r.loss) for r in result.rows]
    return [rows, {k: v.tobytes() for k, v in weights.items()}, spec.fleet]


def test_federation_through_a_small_broker_limit_equals_the_unchunked_run(
    broker: LocalBroker, tmp_path: Path
) -> None:
    small = LocalBroker(
        BrokerOptions(max_packet_size=LIMIT), workdir=tmp_path / "small", kind="mosquitto"
    )
    small.start()
    try:
        rows, weights, fleet = _federate(small, tmp_path / "chunked", LIMIT)
        # A device joining now assembles the final model from the retained chunks alone.
        settings = MqttSettings(host=small.host, port=small.port, clean_start=True,
                                client_id=f"late-{os.getpid()}")
        with FleetObserver(settings, Topics(fleet)) as late:
            late.wait_for_version(3, 60)
            with late.view.lock:
                assert late.view.model is not None
                late_weights = {t.name: t.array().tobytes() for t in late.view.model.tensors}
            assert late.view.bad_messages == 0
        log = (tmp_path / "chunked" / "logs" / "aggregator.log").read_text()
        assert "rejected a chunk" not in log
    finally:
        small.stop()
    plain_rows, plain_weights, _ = _federate(broker, tmp_path / "plain", 0)
    assert [r[:3] for r in rows] == [(1, 1, 3), (2, 2, 3), (3, 3, 3)]
    assert rows == plain_rows  # accuracy and loss of every round, exactly
    assert weights == plain_weights  # the final model, bit for bit
    assert late_weights == weights
    assert len(b"".join(weights.values())) > LIMIT  # so the model could only travel in chunks
