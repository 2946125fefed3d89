"""The agent shell's queue: of the retained model and round messages that waited while it
trained, only the newest of each is handed to the core, so a slow device trains next on the
newest model it has received (under the fedbuff policy a new model comes every second;
feeding every queued announcement made a slow device train on each old version in turn and
fall ever further behind: docs/rounds.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.core import carry_out
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.wire import ModelMessage, RoundAnnouncement, Tensor, TrainingConfig, encode

FLEET, DEVICE, EPOCH = "lab", "pi-0", "a1b2c3d4e5f60718"


def _msg(topic: str, payload: bytes) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(topic=topic.encode())
    m.payload = payload
    return m


def test_only_the_newest_queued_model_and_round_reach_the_core(tmp_path: Path) -> None:
    cfg = AgentConfig(device_id=DEVICE, fleet=FLEET, state_dir=tmp_path / "agent",
                      source="digits", partition="iid", num_clients=4, client_index=0)
    agent = EdgeAgent(cfg)
    weights = load_bundle(prebuilt_bundle_path("digits-mlp")).initial_trainable()
    tensors = tuple(Tensor.from_array(n, np.asarray(w)) for n, w in weights.items())
    topics = cfg.topics
    for version in (0, 1, 2):
        model = ModelMessage(FLEET, version, version, "", tensors, epoch=EPOCH)
        round_ = RoundAnnouncement(FLEET, version + 1, version, 1e12,
                                   TrainingConfig(epochs=1, lr=0.05, codec="int8"), epoch=EPOCH)
        agent._on_message(agent._client, None, _msg(topics.model, encode(model)))
        agent._on_message(agent._client, None, _msg(topics.round, encode(round_)))
    while not agent._events.empty():
        kind, value = agent._events.get()
        carry_out(agent.core, agent._feed(kind, value), lambda _p: None)
    assert agent.core.model_version == 2
    assert [e.round_id for e in agent.outbox.pending()] == [3]  # one training, the newest
