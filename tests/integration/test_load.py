"""1,000 updates arriving at once: 50 MQTT connections publish 20 int8 updates each (distinct
device ids, the real wire format and codec) to a real aggregator process on a real Mosquitto.
None may be lost or folded twice: the aggregator folds exactly 1,000, every device gets an
accept ack, and the new model is the weighted mean of the (dequantized) updates.

Prints sent / folded / lost / duplicated, the wall time and updates/s (never asserted)."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq.update import codecs
from fedmq.wire import UpdateMessage, encode
from tests.fakes import AckLog, AggregatorProcess, Watcher, connect, model_weights

pytestmark = pytest.mark.integration

FLEET = "f1"
CONNECTIONS = 50
PER_CONNECTION = 20
TOTAL = CONNECTIONS * PER_CONNECTION


def test_thousand_updates_at_once_none_lost(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The expected model is the plain example-weighted mean: no relative weight cap here.
    monkeypatch.setenv("FEDMQ_AGGREGATOR_WEIGHT_CAP_MULTIPLIER", "0")
    topics = Topics(FLEET, topic_prefix)
    state = tmp_path / "state"
    acks = AckLog(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "int8", "--selection", "any",
        "--clients-per-round", str(TOTAL), "--min-updates", str(TOTAL), "--rounds", "1",
        "--round-timeout", "600",
    ).start()
    clients: list[mqtt.Client] = []
    try:
        ann = watcher.round(1, timeout=60)
        w0 = model_weights(watcher.model(0))
        assert ann.config.codec == "int8" and ann.min_updates == TOTAL and not ann.selected

        # Build every update up front (real codec + wire format), remembering what it carries.
        rng = np.random.default_rng(7)
        devices = [f"load-c{c:02d}-d{j:02d}" for c in range(CONNECTIONS)
                   for j in range(PER_CONNECTION)]
        payloads: dict[str, bytes] = {}
        update_ids: dict[str, str] = {}
        dequantized_sum = {n: np.zeros(v.shape, np.float64) for n, v in w0.items()}
        raw_sum = {n: np.zeros(v.shape, np.float64) for n, v in w0.items()}
        max_scale = 0.0
        total_examples = 0
        for i, device in enumerate(devices):
            n = int(rng.integers(1, 9))
            delta = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in w0.items()}
            tensors = codecs.encode_delta(delta, "int8", np.random.default_rng(1000 + i))
            uid = uuid.uuid4().hex
            payloads[device] = encode(UpdateMessage(
                fleet=FLEET, round_id=ann.round_id, base_version=ann.base_version, device=device,
                update_id=uid, num_examples=n, codec="int8", tensors=tensors,
                created_at=time.time(),
            ))
            update_ids[device] = uid
            for tensor in tensors:
                name = tensor.name
                dequantized_sum[name] += n * codecs.decode_tensor(tensor, "int8").astype(np.float64)
                raw_sum[name] += n * delta[name].astype(np.float64)
                max_scale = max(max_scale, float(tensor.params["scale"]))
            total_examples += n

        for c in range(CONNECTIONS):
            clients.append(connect(broker, f"load-{topic_prefix}-{c:02d}"))
        start = threading.Barrier(CONNECTIONS + 1)
        errors: queue.Queue[BaseException] = queue.Queue()

        def publish_all(c: int) -> None:
            try:
                mine = devices[c * PER_CONNECTION:(c + 1) * PER_CONNECTION]
                start.wait(30)
                infos = [clients[c].publish(topics.update(d), payloads[d], qos=1) for d in mine]
                for info in infos:
                    info.wait_for_publish(60)
            except BaseException as exc:  # reported by the main thread
                errors.put(exc)

        threads = [threading.Thread(target=publish_all, args=(c,)) for c in range(CONNECTIONS)]
        for th in threads:
            th.start()
        start.wait(30)
        t0 = time.monotonic()
        for th in threads:
            th.join(90)
        published = time.monotonic() - t0
        assert errors.empty(), errors.get()
        sent = sum(len(payloads[d]) for d in devices)

        v1 = watcher.model(1, timeout=90)
        wall = time.monotonic() - t0
        acks.wait_count(TOTAL, timeout=30)
        assert agg.wait(60) == 0

        accepted = {d for d, lst in acks.by_device.items() if any(a.accepted for a in lst)}
        codes = Counter(a.code for lst in acks.by_device.values() for a in lst)
        with Store(state) as store:
            contributions = store.contributions(1)
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
            rejects = store.reject_counts()
        folded = len(contributions)
        folded_ids = Counter(uid for _, uid, _, _ in contributions)
        duplicated = sum(k - 1 for k in folded_ids.values() if k > 1)
        print(
            f"\nload: sent {TOTAL} updates ({sent / 1e6:.2f} MB) over {CONNECTIONS} connections; "
            f"folded {folded}, lost {TOTAL - folded}, duplicated {duplicated}; acks {dict(codes)}; "
            f"published in {published:.2f}s, model v1 after {wall:.2f}s "
            f"({TOTAL / wall:.0f} updates/s end to end)"
        )

        assert v1.metrics["participants"] == TOTAL
        assert v1.metrics["num_examples"] == total_examples
        assert history == [(1, "closed", TOTAL)]
        assert rejects == {}
        assert folded == TOTAL and duplicated == 0
        assert {(d, uid) for d, uid, _, _ in contributions} == set(update_ids.items())
        assert accepted == set(devices), f"{TOTAL - len(accepted)} device(s) without an accept"
        assert codes == Counter({"ok": TOTAL})

        w1 = model_weights(v1)
        for name, base in w0.items():
            expected = base.astype(np.float64) + dequantized_sum[name] / total_examples
            np.testing.assert_allclose(w1[name], expected, rtol=0, atol=1e-6, err_msg=name)
            unquantized = base.astype(np.float64) + raw_sum[name] / total_examples
            # stochastic rounding: each element is off by less than one step of its scale
            np.testing.assert_allclose(w1[name], unquantized, rtol=0, atol=max_scale)
    except BaseException:
        print(agg.log()[-10000:])
        raise
    finally:
        for client in clients:
            client.disconnect()
            client.loop_stop()
        agg.stop()
        acks.close()
        watcher.close()
