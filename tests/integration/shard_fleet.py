"""Harness of the sharded-ingest tests: real worker and coordinator processes on a real
Mosquitto and a real Redis, a paho client standing in for many devices (real encoded updates
of the digits-mlp model), and the one-process reference (the same updates folded into one
FixedPointSum, the same strategy)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.bundles import resolve_bundle
from aggregator.shard_store import ShardStore
from fedmq.net.localbroker import LocalBroker
from fedmq.net.localredis import LocalRedis, RedisOptions, redis_server_path
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.net.procs import stop_processes
from fedmq.topics import Topics
from fedmq.update.codecs import get_codec
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.update.strategies import FedAvg
from fedmq.wire import UpdateMessage, decode_ack, decode_model, decode_update, encode

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = resolve_bundle("digits-mlp")
TEMPLATE = {t.name: t.shape for t in BUNDLE.spec.trainable_specs}
CODEC = "int8"  # the rounds' codec (an update in another codec is refused bad_codec)


def durable_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    """The body of a ``redis_server`` fixture: a Redis that fsyncs every write, in ``tmp_path``."""
    if redis_server_path() is None:
        pytest.fail("redis-server is not installed: `make test` installs it (apt-get install "
                    "redis-server)")
    server = LocalRedis(RedisOptions(appendfsync="always"), workdir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class ShardFleet:
    broker: LocalBroker
    redis: LocalRedis
    prefix: str
    workdir: Path
    fleet: str = field(default_factory=lambda: f"shard{uuid.uuid4().hex[:8]}")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # A broker with logins (`fedmq broker init`): the harness's own client's (it reads the
    # models; anonymous when None) and each process's extra environment (its login).
    login: MqttSettings | None = None
    env: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topics = Topics(self.fleet, self.prefix)
        self.store = ShardStore(self.redis.url, self.fleet)
        self.acks: dict[str, list[tuple[str, str, bool]]] = {}  # device -> (update, code, ok)
        self.models: list[bytes] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"devices-{self.fleet}", protocol=mqtt.MQTTv5)
        if self.login is not None:
            self.client = make_client(self.login)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self.record
        if self.login is None:
            self.client.connect(self.broker.host, self.broker.port)
        else:
            connect(self.client, self.login, asynchronous=False)
        self.client.loop_start()
        self.client.subscribe(f"{self.topics.base}/ack/+", qos=1)
        self.client.subscribe(self.topics.model, qos=1)
        self.rng = np.random.default_rng(7)
        self.sent: dict[tuple[int, str], bytes] = {}  # (round, device) -> payload

    def record(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        """``on_message`` of a client that receives models or acks (a device's, too)."""
        with self._lock:
            if msg.topic == self.topics.model:
                self.models.append(bytes(msg.payload))
                return
            ack = decode_ack(bytes(msg.payload))
            self.acks.setdefault(ack.device, []).append((ack.update_id, ack.code, ack.accepted))

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), **self.env.get(name, {}))
        logf = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child's
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        self.procs[name] = proc
        return proc

    def common(self) -> list[str]:
        return ["--fleet", self.fleet, "--redis", self.redis.url, "--host", self.broker.host,
                "--port", str(self.broker.port), "--prefix", self.prefix]

    def start_worker(self, name: str, ack_mode: str = "manual",
                     extra: Sequence[str] = ()) -> None:
        ready = self.workdir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        self._spawn(name, ["-m", "aggregator.shard_worker", *self.common(), "--worker", name,
                           "--ready-file", str(ready), "--ack-mode", ack_mode, *extra])
        wait_for(ready.exists, 30, f"worker {name} to subscribe")

    def start_coordinator(self, target: int, rounds: int, timeout: float = 60.0,
                          extra: Sequence[str] = ()) -> None:
        self._spawn("coordinator", [
            "-m", "aggregator.shard_coordinator", *self.common(), "--target", str(target),
            "--rounds", str(rounds), "--round-timeout", str(timeout), "--poll", "0.02",
            "--codec", CODEC,
            # the reference below folds every update whole: no norm bound, no weight cap
            # (tests/integration/test_shard_bounds.py checks the bounds)
            "--norm-bound", "off", "--weight-cap-multiplier", "0", *extra,
        ])
        wait_for(lambda: self.store.open_round() is not None, 30, "the coordinator's round")

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait(10)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        stop_processes(list(self.procs.values()), 5, kill_timeout=5)
        self.client.disconnect()  # wakes the network thread: loop_stop returns at once
        self.client.loop_stop()
        self.store.close_connection()

    # -- devices ---------------------------------------------------------------------------------
    def update(self, round_id: int, device: str, *, codec: str | None = None,
               claims_round: int | None = None) -> bytes:
        """A real encoded update of the model for the open round (made once per device): in
        the round's codec unless ``codec``, for ``round_id`` unless ``claims_round``."""
        key = (round_id, device)
        if key not in self.sent:
            rnd = self.store.open_round()
            assert rnd is not None and rnd.round_id == round_id
            delta = {n: (self.rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in TEMPLATE.items()}
            codec = codec or rnd.rules.config.codec
            tensors = tuple(get_codec(codec).encode(delta, self.rng).tensors)
            self.sent[key] = encode(UpdateMessage(
                self.fleet, claims_round or round_id, rnd.base_version, device,
                uuid.uuid4().hex[:16], int(self.rng.integers(1, 300)), codec, tensors,
                epoch=rnd.epoch,
            ))
        return self.sent[key]

    def publish(self, round_id: int, device: str, payload: bytes | None = None,
                client: mqtt.Client | None = None) -> None:
        """Send ``device``'s update of ``round_id`` (or ``payload``) as the device (on
        ``client``, the device's own connection, else the harness's)."""
        body = self.update(round_id, device) if payload is None else payload
        info = (client or self.client).publish(self.topics.update(device), body, qos=1)
        info.wait_for_publish(10)

    def ok_devices(self, round_id: int) -> set[str]:
        """Devices whose update of ``round_id`` was answered accepted (ok or duplicate)."""
        with self._lock:
            out = set()
            for (r, device), payload in self.sent.items():
                uid = _update_id(payload)
                if r == round_id and any(u == uid and ok for u, _, ok in self.acks.get(device, [])):
                    out.add(device)
            return out

    def ok_codes(self, device: str) -> list[str]:
        with self._lock:
            return [code for _, code, ok in self.acks.get(device, []) if ok]

    # -- the reference -------------------------------------------------------------------------
    def reference(self, rounds: list[set[str]]) -> dict[str, np.ndarray]:
        """The one-process model: each round's updates of these devices folded into one
        FixedPointSum (in sorted order), FedAvg."""
        weights = BUNDLE.initial_trainable()
        for r, devices in enumerate(rounds, start=1):
            acc = FixedPointSum(TEMPLATE)
            for device in sorted(devices):
                msg = decode_update(self.sent[(r, device)])
                acc.fold(msg.tensors, msg.codec, float(msg.num_examples))
            weights = FedAvg(1.0).aggregate(weights, acc.result())
        return weights

    def published(self, version: int) -> dict[str, np.ndarray]:
        """The model of ``version`` as published (retained) on the broker."""
        wait_for(lambda: any(decode_model(p).version == version for p in list(self.models)),
                 30, f"model version {version} on the broker")
        msg = next(m for m in map(decode_model, list(self.models)) if m.version == version)
        return {t.name: t.array() for t in msg.tensors}

    def wait_version(self, version: int, timeout: float) -> None:
        wait_for(lambda: (self.store.model_version() or 0) >= version, timeout,
                 f"model version {version}")


def _update_id(payload: bytes) -> str:
    return decode_update(payload).update_id


def assert_exact(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for n in want:
        assert got[n].dtype == want[n].dtype == np.float32
        assert got[n].tobytes() == want[n].tobytes(), f"tensor {n} differs"
