"""Compressed downlink end to end: a real aggregator process publishing int8 deltas (and a
snapshot every 3 versions, all of it chunked under a 4 KB message limit) through Mosquitto
to real edge agents training digits with LiteRT. One agent stays; one loses its network for
some versions (a TCP proxy in front of the broker is cut) and catches up by a chain of
deltas; one is stopped for some versions and restarted (it holds no model: snapshot); one
joins late. At the end every agent holds the aggregator's stored model bit for bit, and
only the window's deltas are still retained."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from aggregator.store import Store
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.downlink import delta_version_of
from fedmq.net.localbroker import LocalBroker
from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics
from tests.fakes import AggregatorProcess
from tests.integration.test_agent import RunningAgent

pytestmark = pytest.mark.integration

FLEET = "f1"
ROUNDS = 9
WINDOW = 4
MAX_MESSAGE = 4096


class CuttableProxy:
    """A loopback TCP proxy in front of the broker whose connections can be cut (a device
    that loses its network; the broker sees the connection drop)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.upstream)
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.down.set()
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.server.close()


def _config(broker: LocalBroker, prefix: str, state: Path, index: int) -> AgentConfig:
    return AgentConfig(
        device_id=f"dev-{index}", fleet=FLEET, topic_prefix=prefix, state_dir=state,
        model="digits-mlp", source="digits", partition="iid", num_clients=4,
        client_index=index, seed=index, ack_timeout=30, train_delay=0.4,
        max_message_bytes=MAX_MESSAGE,
        mqtt=MqttSettings(host=broker.host, port=broker.port, reconnect_min=1,
                          reconnect_max=1),
    )


def _wait(cond: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _retained(broker: LocalBroker, topic_filter: str) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"r-{uuid.uuid4().hex[:8]}")

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and msg.payload:
            got[msg.topic] = bytes(msg.payload)

    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic_filter, qos=1)
    client.loop_start()
    time.sleep(1.5)
    client.loop_stop()
    client.disconnect()
    return got


@pytest.fixture
def running() -> Iterator[list[RunningAgent]]:
    started: list[RunningAgent] = []
    yield started
    for r in started:
        if r.thread.is_alive():
            r.close()


def test_agents_hold_the_aggregators_model_bit_for_bit(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, running: list[RunningAgent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_MAX_MESSAGE_BYTES", str(MAX_MESSAGE))
    state = tmp_path / "aggregator"
    agg = AggregatorProcess(
        broker, topic_prefix, state,
        "--eval-dataset", "none", "--codec", "int8", "--selection", "any",
        "--clients-per-round", "1", "--min-updates", "1", "--min-devices", "1",
        "--rounds", str(ROUNDS), "--round-timeout", "60",
        "--downlink", "int8", "--snapshot-every", "3", "--downlink-window", str(WINDOW),
    ).start()
    proxy = CuttableProxy(broker.host, broker.port)
    try:
        stays = RunningAgent(EdgeAgent(_config(broker, topic_prefix, tmp_path / "a0", 0)))
        running.append(stays)
        cfg = _config(broker, topic_prefix, tmp_path / "a3", 3)
        cfg = replace(cfg, mqtt=MqttSettings(host="127.0.0.1", port=proxy.port,
                                             reconnect_min=1, reconnect_max=1))
        drops = RunningAgent(EdgeAgent(cfg))
        running.append(drops)
        away_cfg = _config(broker, topic_prefix, tmp_path / "a1", 1)
        away = RunningAgent(EdgeAgent(away_cfg))
        running.append(away)
        _wait(lambda: (away.agent.model_version or 0) >= 1, "the second agent at version 1")
        _wait(lambda: (drops.agent.model_version or 0) >= 1, "the fourth agent at version 1")
        proxy.cut()  # the fourth agent's network goes ...
        left_at = away.agent.model_version or 0
        away.close()  # the second agent stops (its last status says so) ...
        cut_at = drops.agent.model_version or 0
        _wait(lambda: (stays.agent.model_version or 0) >= max(left_at, cut_at) + 2,
              "two more versions")
        assert drops.agent.model_version == cut_at  # it really was cut off
        proxy.restore()  # ... and comes back: a chain of deltas
        back = RunningAgent(EdgeAgent(away_cfg))  # ... and restarts: the snapshot
        running.append(back)
        late = RunningAgent(EdgeAgent(_config(broker, topic_prefix, tmp_path / "a2", 2)))
        running.append(late)
        assert agg.wait(180) == 0, agg.log()
        with Store(state, read_only=True) as store:
            final = store.current_model()
            assert final is not None and final.version == ROUNDS
            server = store.load_weights(final.version)
        for r in (stays, drops, back, late):
            _wait(lambda r=r: r.agent.model_version == ROUNDS,  # type: ignore[misc]
                  f"{r.agent.device_id} at the final version", 30)
            held = r.agent.core._global
            assert held is not None and set(held) == set(server)
            for name, values in server.items():
                assert held[name].tobytes() == values.tobytes(), (r.agent.device_id, name)
            counters = r.agent.store.counters()
            assert counters.get("downlink_rejected", 0) == 0
            assert counters.get("downlink_bytes", 0) > 0
        # The agent that stayed got one delta (and the index) per version, not the model.
        model_bytes = (state / "downlink" / "snapshot.bin").stat().st_size
        per_version = stays.agent.store.counters()["downlink_bytes"] / (ROUNDS + 1)
        assert per_version < model_bytes / 2, (per_version, model_bytes)
        # Only the window's deltas are retained (chunked: manifest and chunk topics).
        topics = Topics(FLEET, topic_prefix)
        retained = _retained(broker, f"{topics.model}/delta/#")
        versions = {delta_version_of(topics, t.split("/chunk/")[0]) for t in retained}
        assert versions == set(range(ROUNDS - WINDOW + 1, ROUNDS + 1))
        assert any("/chunk/" in t for t in retained)
        log = agg.log()
        assert "Traceback" not in log
        counters = {r.agent.device_id: r.agent.store.counters()
                    for r in (stays, drops, back, late)}
        # One snapshot each (at start), except the restarted agent: two. The agent that was
        # cut off caught up by deltas.
        assert counters["dev-0"]["downlink_snapshots"] == 1
        assert counters["dev-3"]["downlink_snapshots"] == 1, counters["dev-3"]
        assert counters["dev-1"]["downlink_snapshots"] == 2
        assert counters["dev-2"]["downlink_snapshots"] == 1
    finally:
        agg.stop()
        proxy.close()
