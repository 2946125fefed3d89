"""Restoring an older copy of the aggregator's state directory under running devices: the
aggregator notices (the retained model of its own epoch is newer than its state), moves to a
new epoch, and the very next round closes (no round abandoned) although its id was used
before. Real Mosquitto, real aggregator process. The first test scripts the devices to behave
as docs/protocol.md says a device does with epochs (a device adopts a new epoch and then
trains its rounds even at round ids it already used, and within one epoch never trains a
round id twice), so it can check every device's rounds exactly; the second runs the same
recovery with real edge agents (issue 8: "tested by restoring an older state dir with running
agents")."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq.wire import (
    ModelMessage,
    StatusMessage,
    decode_model,
    decode_round,
    decode_update,
    encode,
)
from tests.fakes import AgentProcess, AggregatorProcess, connect, exact_delta, make_update

pytestmark = pytest.mark.integration

ROUND_TIMEOUT = "60"


class ScriptedDevice:
    """Trains (sends an exact delta for) every round it may take part in, as the spec says."""

    def __init__(self, b: LocalBroker, topics: Topics, device: str, seed: int) -> None:
        self.topics, self.device, self.seed = topics, device, seed
        self.epoch = ""
        self.last_round = 0
        self.version = -1
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.trained: list[tuple[str, int]] = []  # (epoch, round)
        self.skipped: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.client = connect(b, f"scripted-{device}")
        self.client.on_message = self._on_message
        self.client.subscribe([(topics.model, 1), (topics.round, 1)])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self._lock:
            if msg.topic == self.topics.model:
                self._on_model(decode_model(bytes(msg.payload)))
            else:
                self._on_round(bytes(msg.payload))

    def _adopt(self, epoch: str) -> None:
        if epoch != self.epoch:
            self.epoch, self.last_round, self.version = epoch, 0, -1

    def _on_model(self, m: ModelMessage) -> None:
        self._adopt(m.epoch)
        if m.version > self.version:
            self.version = m.version
            self.shapes = {t.name: t.shape for t in m.tensors}
            self._status()

    def _on_round(self, payload: bytes) -> None:
        ann = decode_round(payload)
        self._adopt(ann.epoch)
        if ann.round_id <= self.last_round or ann.base_version != self.version:
            self.skipped.append((ann.epoch, ann.round_id))
            return
        self.last_round = ann.round_id
        delta = exact_delta(self.shapes, self.seed * 1000 + ann.round_id)
        msg = decode_update(make_update(
            ann.fleet, ann.round_id, ann.base_version, self.device, delta, 1,
            update_id=f"{self.device}-{ann.epoch}-{ann.round_id}",
        ))
        payload = encode(dataclasses.replace(msg, epoch=ann.epoch))
        self.client.publish(self.topics.update(self.device), payload, qos=1)
        self.trained.append((ann.epoch, ann.round_id))
        self._status()

    def _status(self) -> None:
        status = StatusMessage(
            self.topics.fleet, self.device, "idle", round_id=self.last_round or None,
            epoch=self.epoch, model_version=self.version,
        )
        self.client.publish(self.topics.status(self.device), encode(status), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _aggregator(b: LocalBroker, prefix: str, state: Path, rounds: int) -> AggregatorProcess:
    return AggregatorProcess(
        b, prefix, state,
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", "2", "--min-updates", "2", "--rounds", str(rounds),
        "--round-timeout", ROUND_TIMEOUT, "--abandon-after", "1",
    )


def test_restored_older_state_gets_a_new_epoch_and_the_next_round_closes(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics("f1", topic_prefix)
    state, backup = tmp_path / "state", tmp_path / "backup"
    devices = [ScriptedDevice(broker, topics, f"dev{i}", i) for i in range(2)]
    agg = _aggregator(broker, topic_prefix, state, 1)
    try:
        assert agg.start().wait(120) == 0  # round 1 -> v1
        shutil.copytree(state, backup)  # the backup: v1, last round 1
        agg = _aggregator(broker, topic_prefix, state, 3)
        assert agg.start().wait(120) == 0  # rounds 2, 3 -> v3
        with Store(state) as s:
            epoch = s.get_meta("epoch")
        assert epoch and all(d.trained == [(epoch, r) for r in (1, 2, 3)] for d in devices)

        # Recovery from the backup, the devices still running (they are at v3, round 3).
        shutil.rmtree(state)
        shutil.copytree(backup, state)
        agg = _aggregator(broker, topic_prefix, state, 2)
        assert agg.start().wait(120) == 0  # round 2 again -> v2 of the new epoch
        with Store(state) as s:
            new = s.get_meta("epoch")
            history = [(r.round_id, r.status, r.participants) for r in s.history()]
            assert s.current_model().version == 2  # type: ignore[union-attr]
        assert new and new != epoch
        # the first round after the restore closed: nothing was abandoned on the way
        assert history == [(1, "closed", 2), (2, "closed", 2)]
        assert all(d.trained[3:] == [(new, 2)] for d in devices), [d.trained for d in devices]
        warnings = [ln for ln in agg.log().splitlines() if "restored from an older copy" in ln]
        assert len(warnings) == 1 and "WARNING" in warnings[0]
        assert f"of epoch {epoch}" in warnings[0] and f"new epoch {new}" in warnings[0]
        assert "Traceback" not in agg.log()
    except BaseException:
        print(agg.log()[-20000:])
        raise
    finally:
        agg.stop()
        for d in devices:
            d.close()


def test_restored_older_state_under_real_agents_closes_the_next_round_in_time(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """The same recovery with two real edge agents (LiteRT training on digits) instead of
    scripted devices: they follow the new epoch by themselves, and the first round after the
    restore closes within one round timeout of the aggregator's start."""
    state, backup = tmp_path / "state", tmp_path / "backup"
    agents = [AgentProcess(broker, topic_prefix, f"pi-{i}", i, tmp_path, "f1", 2)
              for i in range(2)]
    agg = _aggregator(broker, topic_prefix, state, 1)
    try:
        assert agg.start().wait(180) == 0  # round 1 -> v1
        shutil.copytree(state, backup)
        agg = _aggregator(broker, topic_prefix, state, 3)
        assert agg.start().wait(180) == 0  # rounds 2, 3 -> v3
        with Store(state) as s:
            epoch = s.get_meta("epoch")
        shutil.rmtree(state)
        shutil.copytree(backup, state)
        started = time.monotonic()
        agg = _aggregator(broker, topic_prefix, state, 2)
        assert agg.start().wait(float(ROUND_TIMEOUT)) == 0  # round 2 again, new epoch
        elapsed = time.monotonic() - started
        with Store(state) as s:
            new = s.get_meta("epoch")
            history = [(r.round_id, r.status, r.participants) for r in s.history()]
        assert new and new != epoch
        assert history == [(1, "closed", 2), (2, "closed", 2)], history
        assert elapsed < float(ROUND_TIMEOUT)
        for a in agents:
            log = a.log()
            assert f"aggregator epoch changed from '{epoch}' to '{new}'" in log, log[-5000:]
            assert "Traceback" not in log, log[-5000:]
        assert "Traceback" not in agg.log()
    except BaseException:
        print(agg.log()[-20000:])
        for a in agents:
            print(a.log()[-5000:])
        raise
    finally:
        agg.stop()
        for a in agents:
            a.stop()
