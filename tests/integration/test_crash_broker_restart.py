"""The broker goes away in the middle of a round; everything recovers by itself.

A real aggregator process and three real edge agents (``python -m edge_agent``, prebuilt
digits-mlp, IID digits partition) on a Mosquitto with persistence (autosave every second):

- round 1: the broker is stopped (SIGTERM, it saves its state) and started on the same port
  as soon as the round is announced, while the agents train; the updates finish offline and
  wait in the agents' outboxes;
- round 2: the broker is SIGKILLed right after the first update of the round was accepted
  (whatever it had not autosaved is lost: the agents' resends must make up for it).

Both rounds must close with all three devices, each update folded exactly once (aggregator
journal/contributions); redeliveries acked ``duplicate`` are fine. Prints the figures.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.store import Store
from edge_agent.state import StateStore
from fedmq.errors import RejectReason
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq.wire import AckMessage, decode_ack, decode_update
from tests.fakes import AgentProcess, AggregatorProcess, Watcher

pytestmark = pytest.mark.integration

FLEET = "f1"
DEVICES = ("pi-a", "pi-b", "pi-c")
EPOCHS = 150  # a few seconds of LiteRT training per agent (3 agents on 2 cores)


class _Spy:
    """A persistent-session subscriber of the update and ack topics (survives the restarts)."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self.updates: Counter[str] = Counter()  # update_id -> deliveries seen on the broker
        self.acks: list[AckMessage] = []
        self.connects = 0
        self._topics = topics
        self._cond = threading.Condition()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"spy-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect(b.host, b.port, properties=props)  # clean start the first time only
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, *_a: object) -> None:
        client.subscribe([(self._topics.update_wildcard, 1), (f"{self._topics.base}/ack/+", 1)])
        with self._cond:
            self.connects += 1

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            if "/update/" in msg.topic:
                self.updates[decode_update(bytes(msg.payload)).update_id] += 1
            else:
                self.acks.append(decode_ack(bytes(msg.payload)))
            self._cond.notify_all()

    def wait_accepted(self, round_id: int, timeout: float) -> AckMessage:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: any(a.accepted and a.round_id == round_id for a in self.acks), timeout
            )
            assert ok, f"no update of round {round_id} accepted within {timeout}s"
            return next(a for a in self.acks if a.accepted and a.round_id == round_id)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _wait(pred: Callable[[], bool], what: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_broker_restart_and_kill_mid_round(
    fresh_broker: LocalBroker, topic_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_MQTT_RECONNECT_MAX", "1")  # reconnect every second
    topics = Topics(FLEET, topic_prefix)
    state = tmp_path / "state"
    spy = _Spy(fresh_broker, topics)
    watcher = Watcher(fresh_broker, topics)
    # its session ends with the broker: subscribe again on every reconnect
    watcher.client.on_connect = lambda c, *_a: c.subscribe([(topics.model, 1), (topics.round, 1)])
    agg = AggregatorProcess(
        fresh_broker, topic_prefix, state,
        "--eval-dataset", "digits", "--codec", "int8", "--selection", "sample",
        "--clients-per-round", "3", "--min-updates", "3", "--min-devices", "3",
        "--rounds", "2", "--epochs", str(EPOCHS), "--round-timeout", "120",
    ).start()
    agents = [
        AgentProcess(fresh_broker, topic_prefix, d, i, tmp_path, FLEET, len(DEVICES))
        for i, d in enumerate(DEVICES)
    ]
    t0 = time.monotonic()
    try:
        # Round 1: restart (graceful) the moment the round is announced: agents are training.
        ann1 = watcher.round(1, timeout=60)
        assert sorted(ann1.selected) == sorted(DEVICES)
        fresh_broker.stop()
        down1 = time.monotonic()
        # The agents finish training with the broker away: their updates wait in the outbox.
        _wait(lambda: all(a.submitted(1) for a in agents), "every agent to finish round 1", 60)
        waiting = sum(a.outbox_size() for a in agents)
        fresh_broker.start()
        print(f"\nround 1: broker stopped {down1 - t0:.2f}s after start, down "
              f"{time.monotonic() - down1:.2f}s until all 3 had trained ({waiting} updates "
              "waiting in outboxes)")
        v1 = watcher.model(1, timeout=60)
        assert v1.metrics["participants"] == 3

        # Round 2: SIGKILL the broker right after the first accepted update of the round.
        first = spy.wait_accepted(2, timeout=60)
        fresh_broker.kill()
        acked_before_kill = sum(1 for a in spy.acks if a.accepted and a.round_id == 2)
        down2 = time.monotonic()
        time.sleep(1.5)
        fresh_broker.start()
        print(f"round 2: broker killed after {first.device}'s update was accepted "
              f"({acked_before_kill} of 3 acked by then), down {time.monotonic() - down2:.2f}s")
        v2 = watcher.model(2, timeout=60)
        assert v2.metrics["participants"] == 3
        assert agg.wait(60) == 0, "the aggregator did not finish its 2 rounds cleanly"
        elapsed = time.monotonic() - t0
        # Let late acks (duplicates of resends) reach the agents before stopping them.
        _wait(lambda: all(a.outbox_size() == 0 for a in agents),
              "every agent's outbox to empty", 30)
        codes = [a.stop() for a in agents]
        assert codes == [0, 0, 0]

        with Store(state) as store:
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
            contributions = {r: store.contributions(r) for r in (1, 2)}
            rejects = store.reject_counts()
        submitted = {a.device: {r: a.submitted(r) for r in (1, 2)} for a in agents}
        counters = {
            a.device: {k: StateStore(a.state_dir).counter(k)
                       for k in ("updates_accepted", "updates_resent", "updates_dropped")}
            for a in agents
        }
        ack_codes = Counter(a.code for a in spy.acks)
        folded = sum(len(c) for c in contributions.values())
        deliveries = sum(spy.updates.values())
        print(
            f"crash: {len(DEVICES)} agents x 2 rounds = 6 updates; folded {folded}, lost "
            f"{6 - folded}; deliveries seen on "
            f"the broker {deliveries} (resends {deliveries - len(spy.updates)}); acks "
            f"{dict(ack_codes)}; aggregator rejects {rejects}; agent counters {counters}; "
            f"spy connects {spy.connects}; {elapsed:.1f}s"
        )

        assert history == [(1, "closed", 3), (2, "closed", 3)]
        for r in (1, 2):
            got = {(dev, uid) for dev, uid, _, _ in contributions[r]}
            assert got == {(d, submitted[d][r]) for d in DEVICES}, f"round {r}: {got}"
        # Every update exactly once in the model; anything seen again was refused as duplicate.
        assert set(ack_codes) <= {"ok", RejectReason.DUPLICATE}, ack_codes
        assert set(rejects) <= {RejectReason.DUPLICATE}, rejects
        accepted_ids = [a.update_id for a in spy.acks if a.accepted and a.code == "ok"]
        assert len(accepted_ids) == len(set(accepted_ids))
        # A broker restored from an older autosave may replay a stale retained round: no agent
        # may drop its current update because of it.
        stale = sum(a.log().count("ignoring announcement of round") for a in agents)
        print(f"stale retained announcements ignored by the agents: {stale}")
        assert all(c["updates_dropped"] == 0 for c in counters.values()), counters
        # All of them reconnected by themselves (2 broker outages).
        assert agg.log().count("connected to") >= 3, "aggregator did not reconnect twice"
        for a in agents:
            assert a.log().count("connected to") >= 3, f"{a.device} did not reconnect twice"
    except BaseException:
        print(agg.log()[-8000:])
        for a in agents:
            print(f"--- {a.device}\n{a.log()[-3000:]}")
        raise
    finally:
        for a in agents:
            a.stop()
        agg.stop()
        spy.close()
        watcher.close()
