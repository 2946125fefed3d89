"""Secure aggregation end to end through Mosquitto: the real aggregator service
(``round_policy = "secagg"``) and real edge agents training digits-mlp with LiteRT, every
phase message signed with the enrolled device keys. The aggregator's unmasked sum equals
the plain sum of the devices' int8 updates exactly; a device SIGKILLed right after it sent
its shares is dropped and the round still closes with the survivors."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.store import Store
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq.net.localbroker import LocalBroker
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.net.procs import stop_process
from fedmq.secagg.messages import SharesMsg, decode_signed
from fedmq.signing import Registry, create_key
from fedmq.topics import Topics

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
FLEET = "sa"
TIMEOUT = 90.0


def _mqtt(broker: LocalBroker) -> MqttSettings:
    return MqttSettings(host=broker.host, port=broker.port, reconnect_min=1, reconnect_max=1)


class Fleet:
    def __init__(self, broker: LocalBroker, prefix: str, tmp: Path, devices: list[str]) -> None:
        self.broker, self.prefix, self.tmp = broker, prefix, tmp
        self.registry = tmp / "registry.json"
        self.keys = {d: tmp / "keys" / f"{d}.key" for d in devices}
        for d in devices:
            Registry(self.registry).enroll(d, create_key(self.keys[d]).public_hex)
        self.devices = devices
        self.stops: list[tuple[threading.Event, threading.Thread]] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def aggregator(self, **overrides: object) -> AggregatorService:
        cfg = AggregatorConfig(
            fleet=FLEET, mqtt=_mqtt(self.broker), topic_prefix=self.prefix,
            state_dir=self.tmp / "agg", model="digits-mlp", eval_dataset="digits",
            eval_examples=300, rounds=1, clients_per_round=len(self.devices), min_updates=3,
            min_devices=len(self.devices), selection="sample", round_policy="secagg",
            round_timeout=20.0, abandon_after=30.0, registry=str(self.registry),
            secagg_phase_timeout=10.0, secagg_min_survivors=3, secagg_clip=0.05,
            train_max_examples=200, tick_interval=0.1, **overrides,  # type: ignore[arg-type]
        )
        service = AggregatorService(cfg)
        self._run(service.run)
        self.service_thread = self.stops[-1][1]
        return service

    def agent(self, i: int, train_delay: float = 0.0, verify: bool = False) -> EdgeAgent:
        d = self.devices[i]
        agent = EdgeAgent(AgentConfig(
            device_id=d, fleet=FLEET, topic_prefix=self.prefix, state_dir=self.tmp / d,
            model="digits-mlp", source="digits", partition="iid",
            num_clients=len(self.devices), client_index=i, seed=i, signing_key=self.keys[d],
            mqtt=_mqtt(self.broker), train_delay=train_delay,
            peer_registry=self.registry if verify else None,
        ))
        self._run(agent.run)
        return agent

    def agent_process(self, i: int) -> subprocess.Popen[bytes]:
        d = self.devices[i]
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        with open(self.tmp / f"{d}.log", "ab") as logf:
            proc = subprocess.Popen([
                sys.executable, "-m", "edge_agent", "--host", self.broker.host,
                "--port", str(self.broker.port), "--fleet", FLEET,
                "--topic-prefix", self.prefix, "--device-id", d,
                "--state-dir", str(self.tmp / d), "--model", "digits-mlp", "--source",
                "digits", "--partition", "iid", "--num-clients", str(len(self.devices)),
                "--client-index", str(i), "--signing-key", str(self.keys[d]),
            ], stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=_ROOT)
        self.procs.append(proc)
        return proc

    def _run(self, target: object) -> None:
        stop = threading.Event()
        thread = threading.Thread(target=target, args=(stop,), daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.stops.append((stop, thread))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop_process(proc, 10)
        for stop, _ in self.stops:
            stop.set()
        for _, thread in self.stops:
            thread.join(30)


@pytest.fixture
def fleet_factory(broker: LocalBroker, topic_prefix: str,
                  tmp_path: Path) -> Iterator[type[Fleet]]:
    made: list[Fleet] = []

    class Made(Fleet):
        def __init__(self, devices: list[str]) -> None:  # type: ignore[override]
            super().__init__(broker, topic_prefix, tmp_path, devices)
            made.append(self)

    yield Made  # type: ignore[misc]
    for f in made:
        f.close()


def _wait(cond: object, what: str, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_secure_round_sum_equals_the_plain_integer_sum(fleet_factory: type[Fleet]) -> None:
    fleet = fleet_factory(["dev-0", "dev-1", "dev-2", "dev-3"])
    service = fleet.aggregator()
    agents = [fleet.agent(i, verify=True) for i in range(4)]  # roster checked on devices
    assert service.secagg is not None
    _wait(lambda: service.secagg.results and service.engine.version == 1, "the secure round")
    result = service.secagg.results[0]
    qs = [a.core.secure.last_q for a in agents]  # type: ignore[union-attr]
    assert all(q is not None and q.dtype == np.int8 for q in qs)
    plain = np.sum([q.astype(np.int64) for q in qs], axis=0)  # type: ignore[union-attr]
    assert np.array_equal(result.sum, plain)
    assert np.abs(plain).max() > 0  # the devices really trained
    assert result.survivors == ("dev-0", "dev-1", "dev-2", "dev-3") and result.dropped == ()
    assert all(a.core.secure.rejected == 0 for a in agents)  # type: ignore[union-attr]
    fleet.service_thread.join(30)  # rounds = 1: the service stops, releasing its state
    store = Store(fleet.tmp / "agg")
    assert store.model(1).metrics["participants"] == 4.0
    # The published model moved by exactly the unmasked mean (FedAvg, server lr 1).
    before, after = store.load_weights(0), store.load_weights(1)
    store.close()
    flat = np.concatenate([(after[n] - before[n]).reshape(-1) for n in sorted(after)])
    np.testing.assert_allclose(flat, plain * (0.05 / 127) / 4, rtol=1e-5, atol=1e-6)


def test_a_device_killed_after_sharing_is_dropped_and_the_round_closes(
    fleet_factory: type[Fleet],
) -> None:
    fleet = fleet_factory(["dev-0", "dev-1", "dev-2", "victim"])
    topics = Topics(FLEET, fleet.prefix)
    seen: queue.Queue[bytes] = queue.Queue()
    settings = MqttSettings(host=fleet.broker.host, port=fleet.broker.port,
                            client_id=f"watch-{fleet.prefix}")
    watcher = make_client(settings)
    watcher.on_message = lambda _c, _u, msg: seen.put(bytes(msg.payload))
    watcher.on_connect = lambda c, *_: c.subscribe(topics.secagg_in("victim"), 1)
    connect(watcher, settings)
    watcher.loop_start()
    try:
        victim = fleet.agent_process(3)
        service = fleet.aggregator()
        # dev-2 shares (trains, then answers the roster) 4 s late: the shares phase, and so
        # the relay the victim needs for its masked input, waits for it; the victim is
        # killed within milliseconds of its shares, long before.
        agents = [fleet.agent(i, train_delay=4.0 if i == 2 else 0.0) for i in range(3)]
        end = time.monotonic() + TIMEOUT
        while True:  # SIGKILL the victim as soon as its shares are on the broker
            payload = seen.get(timeout=max(0.1, end - time.monotonic()))
            if isinstance(decode_signed(payload)[1], SharesMsg):
                victim.send_signal(signal.SIGKILL)
                break
        victim.wait(10)
        assert service.secagg is not None
        _wait(lambda: service.secagg.results and service.engine.version == 1,
              "the round to close without the victim")
    finally:
        watcher.loop_stop()
        watcher.disconnect()
    result = service.secagg.results[0]
    assert result.dropped == ("victim",)
    assert result.survivors == ("dev-0", "dev-1", "dev-2")
    qs = [a.core.secure.last_q for a in agents]  # type: ignore[union-attr]
    plain = np.sum([q.astype(np.int64) for q in qs], axis=0)  # type: ignore[union-attr]
    assert np.array_equal(result.sum, plain)
    fleet.service_thread.join(30)
    store = Store(fleet.tmp / "agg")
    assert store.model(1).metrics["participants"] == 3.0
    store.close()
