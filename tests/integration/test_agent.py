"""The edge agent against a real Mosquitto; the test plays the aggregator with fedmq.wire."""

from __future__ import annotations

import logging
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.trainer import EvalMetrics, LiteRTTrainer, TrainMetrics
from fedmq.data.local import LocalData
from fedmq.models.spec import ModelSpec, load_bundle, prebuilt_bundle_path
from fedmq.net.localbroker import LocalBroker
from fedmq.net.mqtt import MqttSettings
from fedmq.net.procs import stop_process
from fedmq.topics import Topics
from fedmq.update.codecs import decode_tensors
from fedmq.wire import (
    AckMessage,
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    Tensor,
    TrainingConfig,
    UpdateMessage,
    decode_status,
    decode_update,
    encode,
)

pytestmark = pytest.mark.integration

FLEET = "lab"
DEVICE = "pi-0"
TIMEOUT = 60.0


class FakeAggregator:
    """A persistent-session MQTT client that publishes model/round/acks and collects updates."""

    def __init__(self, broker: LocalBroker, topics: Topics) -> None:
        self.topics = topics
        self.updates: queue.Queue[UpdateMessage] = queue.Queue()
        self.statuses: list[StatusMessage] = []
        self.connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"agg-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self.connected.wait(10)

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(self.topics.update_wildcard, 1), (self.topics.status_wildcard, 1)])
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith(self.topics.base + "/update/"):
            self.updates.put(decode_update(bytes(msg.payload)))
        elif msg.payload:
            self.statuses.append(decode_status(bytes(msg.payload)))

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def publish_model(
        self, weights: Mapping[str, np.ndarray], version: int = 0, epoch: str = ""
    ) -> None:
        tensors = tuple(Tensor.from_array(n, w) for n, w in weights.items())
        msg = ModelMessage(FLEET, version, version, "digits-mlp", tensors, created_at=time.time(),
                           epoch=epoch)
        self.publish(self.topics.model, encode(msg), retain=True)

    def publish_round(
        self, round_id: int, base_version: int = 0, selected: tuple[str, ...] = (),
        epoch: str = "",
    ) -> RoundAnnouncement:
        ann = RoundAnnouncement(
            FLEET, round_id, base_version, time.time() + 600,
            TrainingConfig(epochs=10, lr=0.02, codec="int8"), selected, opened_at=time.time(),
            epoch=epoch,
        )
        self.publish(self.topics.round, encode(ann), retain=True)
        return ann

    def ack(self, update: UpdateMessage, accepted: bool = True, code: str = "ok") -> None:
        msg = AckMessage(FLEET, update.round_id, update.device, update.update_id, accepted, code)
        self.publish(self.topics.ack(update.device), encode(msg))

    def next_update(self, timeout: float = TIMEOUT) -> UpdateMessage:
        try:
            return self.updates.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no update within {timeout:.0f}s") from None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class GatedTrainer:
    """A real LiteRT trainer whose ``fit`` waits for the test to open a gate."""

    def __init__(self, inner: LiteRTTrainer) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.gate = threading.Event()

    @property
    def spec(self) -> ModelSpec:
        return self.inner.spec

    @property
    def runtime_name(self) -> str:
        return self.inner.runtime_name

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.inner.set_weights(weights)

    def get_weights(self) -> dict[str, np.ndarray]:
        return self.inner.get_weights()

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, rng: np.random.Generator
    ) -> TrainMetrics:
        self.entered.set()
        assert self.gate.wait(TIMEOUT), "test never opened the gate"
        return self.inner.fit(x, y, epochs=epochs, lr=lr, rng=rng)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> EvalMetrics:
        return self.inner.evaluate(x, y)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def agent_config(broker: LocalBroker, prefix: str, state_dir: Path) -> AgentConfig:
    return AgentConfig(
        device_id=DEVICE, fleet=FLEET, topic_prefix=prefix,
        state_dir=state_dir, model="digits-mlp", source="digits", partition="iid",
        num_clients=4, client_index=0, seed=0, ack_timeout=30,
        mqtt=MqttSettings(host=broker.host, port=broker.port, reconnect_min=1, reconnect_max=1),
    )


class RunningAgent:
    def __init__(self, agent: EdgeAgent) -> None:
        self.agent = agent
        self.stop = threading.Event()
        self.thread = threading.Thread(target=agent.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "agent did not stop"


@pytest.fixture
def initial_weights() -> dict[str, np.ndarray]:
    return load_bundle(prebuilt_bundle_path("digits-mlp")).initial_trainable()


@pytest.fixture
def agents() -> Iterator[Callable[[EdgeAgent], RunningAgent]]:
    started: list[RunningAgent] = []

    def start(agent: EdgeAgent) -> RunningAgent:
        started.append(RunningAgent(agent))
        return started[-1]

    yield start
    for r in started:
        r.stop.set()
    for r in started:
        r.thread.join(30)


def test_agent_trains_publishes_a_useful_update_and_clears_it_on_ack(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
) -> None:
    topics = Topics(FLEET, topic_prefix)
    agg = FakeAggregator(broker, topics)
    try:
        cfg = agent_config(broker, topic_prefix, tmp_path / "agent")
        agent = EdgeAgent(cfg)
        running = agents(agent)
        agg.publish_model(initial_weights, version=0)
        agg.publish_round(1, base_version=0)

        update = agg.next_update()
        assert (update.fleet, update.round_id, update.base_version, update.device) == (
            FLEET, 1, 0, DEVICE
        )
        assert update.codec == "int8" and all(t.dtype == "int8" for t in update.tensors)
        assert len(update.update_id) == 32
        assert update.num_examples == len(agent.data) and update.metrics["steps"] > 0
        assert agent.outbox.get(update.update_id) is not None  # written before publishing

        # The decoded delta applied to the global weights improves accuracy on local data.
        delta = decode_tensors(update.tensors, update.codec)
        assert set(delta) == set(initial_weights)
        local = LocalData.from_config(cfg.data_config()).dataset
        check = LiteRTTrainer(prebuilt_bundle_path("digits-mlp"))
        check.set_weights(initial_weights)
        before = check.evaluate(local.x, local.y).accuracy
        check.set_weights({n: initial_weights[n] + delta[n] for n in initial_weights})
        after = check.evaluate(local.x, local.y).accuracy
        assert after > before + 0.3, (before, after)

        agg.ack(update)
        agg.ack(update)  # a redelivered ack counts nothing twice
        agg.publish(agg.topics.ack(DEVICE), b"\xc1")  # a marker: handled after both acks
        wait_for(lambda: agent.store.counter("bad_messages") == 1, "the marker message")
        assert len(agent.outbox) == 0
        assert agent.store.counter("updates_accepted") == 1
        assert agent.store.submitted_update(1) == update.update_id
        wait_for(lambda: any(s.state == "idle" for s in agg.statuses), "an idle status")
        idle = [s for s in agg.statuses if s.state == "idle"][-1]
        assert idle.metrics["examples"] > 0 and idle.round_id == 1
        assert idle.capabilities["model"] == "digits-mlp"
        assert any(s.state == "online" for s in agg.statuses)

        # The same round announced again (retained re-delivery) does not train twice.
        agg.publish_round(1, base_version=0)
        with pytest.raises(AssertionError):
            agg.next_update(timeout=1.5)
        running.close()
        wait_for(lambda: agg.statuses[-1].state == "offline", "the offline status")
    finally:
        agg.close()


def test_update_finished_offline_is_delivered_after_the_broker_returns(
    fresh_broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
) -> None:
    topics = Topics(FLEET, topic_prefix)
    agg = FakeAggregator(fresh_broker, topics)
    try:
        # A short ack timeout: if the broker lost the aggregator's session in the restart and
        # the first send after reconnecting reached no subscriber, the resend delivers it.
        cfg = replace(agent_config(fresh_broker, topic_prefix, tmp_path / "agent"),
                      ack_timeout=3.0)
        trainer = GatedTrainer(LiteRTTrainer(prebuilt_bundle_path("digits-mlp")))
        agent = EdgeAgent(cfg, trainer=trainer)
        agents(agent)
        agg.publish_model(initial_weights)
        agg.publish_round(1)
        assert trainer.entered.wait(TIMEOUT), "the agent never started training"

        fresh_broker.stop()
        wait_for(lambda: not agent.connected.is_set(), "the agent to notice the broker is gone")
        trainer.gate.set()
        wait_for(lambda: len(agent.outbox) == 1, "the update in the outbox")
        stored = agent.outbox.pending()[0]
        assert stored.round_id == 1
        time.sleep(0.5)
        assert len(agent.outbox) == 1 and not agent.connected.is_set()

        fresh_broker.start()
        update = agg.next_update()
        assert update.update_id == stored.update_id and update.round_id == 1
        agg.ack(update)
        wait_for(lambda: len(agent.outbox) == 0, "the outbox to empty after the ack")
    finally:
        agg.close()


def test_update_of_a_round_that_moved_on_is_resent_for_a_definitive_answer(
    fresh_broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    topics = Topics(FLEET, topic_prefix)
    agg = FakeAggregator(fresh_broker, topics)
    try:
        cfg = agent_config(fresh_broker, topic_prefix, tmp_path / "agent")
        trainer = GatedTrainer(LiteRTTrainer(prebuilt_bundle_path("digits-mlp")))
        first = agents(EdgeAgent(cfg, trainer=trainer))
        agg.publish_model(initial_weights)
        agg.publish_round(1)
        assert trainer.entered.wait(TIMEOUT)
        fresh_broker.stop()
        wait_for(lambda: not first.agent.connected.is_set(), "the disconnect")
        trainer.gate.set()
        wait_for(lambda: len(first.agent.outbox) == 1, "the update in the outbox")
        stale_id = first.agent.outbox.pending()[0].update_id
        first.close()  # the device restarts while offline

        fresh_broker.start()
        assert agg.connected.wait(TIMEOUT)
        agg.publish_round(2, selected=("another-device",))  # the round moved on
        second = agents(EdgeAgent(cfg))  # same state directory: same identity and outbox
        assert second.agent.device_id == DEVICE
        # Not dropped: the device cannot know whether it was folded (a lost ack), so it
        # sends it again and the aggregator's answer decides how it is counted.
        late = agg.next_update()
        assert (late.update_id, late.round_id) == (stale_id, 1)
        agg.ack(late, accepted=False, code="round_closed")
        wait_for(lambda: len(second.agent.outbox) == 0, "the answered update to leave")
        assert second.agent.store.counter("updates_rejected_round_closed") == 1
        assert second.agent.store.counter("updates_dropped") == 0
        assert second.agent.store.counter("updates_accepted") == 0
    finally:
        agg.close()


def test_an_older_retained_model_is_ignored_and_not_persisted(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    agg = FakeAggregator(broker, Topics(FLEET, topic_prefix))
    try:
        agent = agents(EdgeAgent(agent_config(broker, topic_prefix, tmp_path / "agent"))).agent
        agg.publish_model(initial_weights, version=1)
        wait_for(lambda: agent.store.model_version == 1, "model version 1")
        # A broker restored from an older save hands out the older retained model; a bad
        # message after it shows when the agent has handled it (one session, in order). The
        # marker goes to the round topic: on the model topic it could supersede the older
        # model in the agent's queue (latest-state topics keep only their newest message).
        agg.publish_model(initial_weights, version=0)
        agg.publish(agg.topics.round, b"\xc1")
        wait_for(lambda: agent.store.counter("bad_messages") == 1, "the marker message")
        assert agent.store.model_version == 1 and agent.model_version == 1
        assert any("ignoring model version 0" in r.getMessage() for r in caplog.records)
    finally:
        agg.close()


def test_agent_follows_a_new_aggregator_epoch(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
) -> None:
    agg = FakeAggregator(broker, Topics(FLEET, topic_prefix))
    try:
        agent = agents(EdgeAgent(agent_config(broker, topic_prefix, tmp_path / "agent"))).agent
        agg.publish_model(initial_weights, version=2)
        agg.publish_round(3, base_version=2)
        first = agg.next_update()
        agg.ack(first)
        wait_for(lambda: agent.store.counter("updates_accepted") == 1, "the first accept")

        # The aggregator's state is restored from a backup (or started fresh): a new epoch,
        # round ids and versions from lower numbers again. The device takes part at once.
        agg.publish_model(initial_weights, version=0, epoch="lineage-b")
        agg.publish_round(1, base_version=0, epoch="lineage-b")
        again = agg.next_update()
        assert (again.round_id, again.base_version, again.epoch) == (1, 0, "lineage-b")
        agg.ack(again)
        wait_for(lambda: agent.store.counter("updates_accepted") == 2, "both accepted")
        assert agent.store.epoch == "lineage-b" and agent.store.model_version == 0
    finally:
        agg.close()


def test_unacked_update_is_resent_with_the_same_id_and_a_reject_is_logged(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    initial_weights: dict[str, np.ndarray], agents: Callable[[EdgeAgent], RunningAgent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    agg = FakeAggregator(broker, Topics(FLEET, topic_prefix))
    try:
        cfg = replace(agent_config(broker, topic_prefix, tmp_path / "agent"), ack_timeout=1.0)
        agent = agents(EdgeAgent(cfg)).agent
        agg.publish_model(initial_weights)
        agg.publish_round(1)
        first = agg.next_update()
        again = agg.next_update(timeout=10)  # no ack within ack_timeout: re-sent
        assert again.update_id == first.update_id and again.tensors == first.tensors
        agg.ack(again, accepted=False, code="wrong_base_version")
        wait_for(lambda: len(agent.outbox) == 0, "the rejected update to leave the outbox")
        rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
        assert rejected and rejected[0].levelno == logging.WARNING
        assert "wrong_base_version" in rejected[0].getMessage()
        assert agent.store.counter("updates_resent") >= 1
    finally:
        agg.close()


def test_cli_agent_waits_for_a_broker_that_is_down_and_stops_on_sigterm(
    fresh_broker: LocalBroker, topic_prefix: str, tmp_path: Path,
) -> None:
    fresh_broker.stop()
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'[agent]\ndevice_id = "{DEVICE}"\nfleet = "{FLEET}"\n'
        f'topic_prefix = "{topic_prefix}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[mqtt]\nport = {fresh_broker.port}\nreconnect_min = 1\nreconnect_max = 1\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "--config", str(toml)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(2.0)  # the agent starts and retries against a closed port
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        fresh_broker.start()
        agg = FakeAggregator(fresh_broker, Topics(FLEET, topic_prefix))
        try:
            wait_for(lambda: any(s.state == "online" for s in agg.statuses), "online status")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            wait_for(lambda: agg.statuses[-1].state == "offline", "offline status")
            assert agg.statuses[-1].device == DEVICE
        finally:
            agg.close()
    finally:
        stop_process(proc)
