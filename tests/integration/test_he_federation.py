"""Encrypted rounds end to end: real agents encrypt, the aggregator sums ciphertexts, the
decryptor (`fedmq he decrypt`, its own process with the only secret key) answers, and the new
global models equal plain FedAvg of the same updates (docs/privacy.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedmq.net.localbroker import LocalBroker
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.privacy.he import HEContext, HEParams, decrypt_flat, read_ciphertext
from fedmq.privacy.he import available as he_available
from fedmq.topics import Topics
from fedmq.update.codecs import unregister
from fedmq.update.codecs.ckks import register_ckks
from fedmq.wire import decode_ack, decode_model, decode_update
from fedmq_ops.he_cli import write_keys
from fedmq_ops.localfleet import FederationSpec, run_federation

if not he_available():
    pytest.skip("TenSEAL (the he extra) is not installed", allow_module_level=True)

pytestmark = pytest.mark.integration

AGENTS, ROUNDS = 3, 2


class _Capture:
    """Every update, ack and model the broker carries for the fleet."""

    def __init__(self, broker: LocalBroker, topics: Topics) -> None:
        self.lock = threading.Lock()
        self.updates: dict[str, bytes] = {}
        self.accepted: dict[int, set[str]] = {}
        self.models: dict[int, dict[str, np.ndarray]] = {}
        settings = MqttSettings(host=broker.host, port=broker.port, clean_start=True,
                                client_id=f"capture-{uuid.uuid4().hex[:8]}")
        self.client = make_client(settings)
        self.client.on_connect = lambda c, *_a: c.subscribe(
            [(topics.update_wildcard, 1), (f"{topics.base}/ack/+", 1), (topics.model, 1)]
        )
        self.client.on_message = lambda _c, _u, m: self._on(m.topic, bytes(m.payload))
        self.topics = topics
        connect(self.client, settings, asynchronous=False)
        self.client.loop_start()

    def _on(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        with self.lock:
            if topic == self.topics.model:
                msg = decode_model(payload)
                self.models[msg.version] = {t.name: np.array(t.array()) for t in msg.tensors}
            elif "/update/" in topic:
                self.updates[decode_update(payload).update_id] = payload
            elif "/ack/" in topic:
                ack = decode_ack(payload)
                if ack.accepted and ack.code == "ok":
                    self.accepted.setdefault(ack.round_id, set()).add(ack.update_id)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_encrypted_rounds_equal_plain_fedavg(broker: LocalBroker, tmp_path: Path) -> None:
    public_path, secret_path = write_keys(tmp_path / "keys", HEParams())
    public = HEContext.load(public_path.read_bytes(), secret=False)
    assert not public.has_secret_key  # what the aggregator and the agents get
    register_ckks(public)  # so this process can decode the captured updates
    try:
        _federate(broker, tmp_path, public_path, secret_path)
    finally:
        unregister("ckks")


def _federate(broker: LocalBroker, tmp_path: Path, public_path: Path, secret_path: Path) -> None:
    fleet = f"he-{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    capture = _Capture(broker, topics)
    decryptor_log = tmp_path / "decryptor.log"
    with decryptor_log.open("wb") as out:
        decryptor = subprocess.Popen(
            [sys.executable, "-m", "fedmq_ops", "he", "decrypt", "--secret", str(secret_path),
             "--fleet", fleet, "--host", broker.host, "--port", str(broker.port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        spec = FederationSpec(
            agents=AGENTS, rounds=ROUNDS, dataset="digits", model="digits-mlp",
            partition="iid", epochs=2, lr=0.2, seed=3,
            broker=f"{broker.host}:{broker.port}", fleet=fleet, workdir=tmp_path / "fed",
            timeout=240,
            extra_agent={"he_context": str(public_path)},
            extra_aggregator={"he_context": str(public_path), "norm_bound": "off"},
        )
        result = run_federation(spec)
    finally:
        decryptor.terminate()
        decryptor.wait(10)
        time.sleep(0.5)
        capture.close()
    agg_log = (tmp_path / "fed" / "logs" / "aggregator.log").read_text()
    assert "homomorphic encryption on" in agg_log
    assert "decrypted the sum of round 2" in decryptor_log.read_text()
    rows = result.rows
    assert [r.version for r in rows] == [1, 2] and all(r.participants == AGENTS for r in rows)
    # The aggregator never decrypted anything: check each round against plain FedAvg of the
    # same updates, decrypted here one by one with the operator's secret key.
    secret = HEContext.load(secret_path.read_bytes(), secret=True)
    values = sum(a.size for a in capture.models[0].values())
    sizes = secret.batch_sizes(values)
    for version in (1, 2):
        ids = capture.accepted[version]
        assert len(ids) == AGENTS
        weighted, total = np.zeros(values), 0.0
        for uid in ids:
            msg = decode_update(capture.updates[uid])
            assert msg.codec == "ckks"
            assert [t.name for t in msg.tensors] == [f"ckks.{i}" for i in range(len(sizes))]
            vecs = [read_ciphertext(secret, t.data, n)
                    for t, n in zip(msg.tensors, sizes, strict=True)]
            weighted += decrypt_flat(secret, vecs)  # weight * delta (pre-scaled)
            assert msg.tensors[0].params["weight"] == msg.num_examples
            total += msg.num_examples
        plain_mean = weighted / total
        before, after = capture.models[version - 1], capture.models[version]
        got = np.concatenate([(after[n] - before[n]).reshape(-1) for n in before])
        assert np.abs(plain_mean).max() > 1e-3  # the round did move the model
        # float32 model weights: the difference of two float32 arrays is exact to ~1e-7
        # relative; CKKS adds ~1e-6 absolute per update before the division.
        np.testing.assert_allclose(got, plain_mean, atol=2e-5, rtol=0)
    assert rows[-1].accuracy > 0.5, [r.accuracy for r in rows]
