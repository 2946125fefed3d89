"""Harness of the NATS cluster tests: the sharded-ingest harness (tests/integration/
shard_fleet.py: real encoded digits-mlp updates, the one-process reference, worker and
coordinator processes) with its devices on MQTT 3.1.1 to the nodes of a real NATS cluster,
workers pulling from JetStream (aggregator.nats_worker) and the coordinator publishing over
MQTT 3.1.1 to node 0."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import nats
import numpy as np
import paho.mqtt.client as mqtt

from aggregator.shard_store import Claim, ShardStore
from fedmq.net.localnats import LocalNatsCluster
from fedmq.net.localredis import LocalRedis
from fedmq.net.procs import stop_processes
from fedmq.topics import Topics
from tests.integration.shard_fleet import CODEC, ShardFleet, wait_for


@dataclass(frozen=True)
class _Endpoint:
    """What ShardFleet reads of its broker: the coordinator's MQTT host and port."""

    host: str
    port: int


def mqtt311_client(client_id: str, host: str, port: int) -> mqtt.Client:
    """A connected, looping paho client on MQTT 3.1.1 (what NATS' gateway speaks)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv311, clean_session=True)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    return c


def stream_leader(cluster: LocalNatsCluster, stream: str) -> int:
    """The index of the node that leads ``stream`` now."""

    async def ask() -> str:
        servers = [u for i, u in enumerate(cluster.servers) if cluster.running(i)]
        nc = await nats.connect(servers=servers)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        assert info.cluster is not None and info.cluster.leader
        return info.cluster.leader

    name = asyncio.run(ask())
    return next(i for i, n in enumerate(cluster.nodes) if n.name == name)


def mqtt_client_node(cluster: LocalNatsCluster, client_id: str) -> int | None:
    """The running node that holds the MQTT client ``client_id`` now (its /connz)."""
    for i, node in enumerate(cluster.nodes):
        if not cluster.running(i):
            continue
        url = f"http://{cluster.host}:{node.http_port}/connz?mqtt_client={client_id}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            if json.load(resp).get("num_connections"):
                return i
    return None


class NatsFleet(ShardFleet):
    """One device connection per node; the listener (on node ``listen_node``) takes the
    acks and the models; the coordinator publishes through node ``coordinator_node``.
    Devices of a node that died publish through another one."""

    def __init__(self, cluster: LocalNatsCluster, redis: LocalRedis, prefix: str,
                 workdir: Path, *, ack_wait: float = 2.0) -> None:
        # ShardFleet's state, without its MQTT v5 client (NATS speaks 3.1.1 only)
        self.cluster = cluster
        self.coordinate_through(0)
        self.redis = redis
        self.prefix = prefix
        self.workdir = workdir
        self.fleet = f"nats{uuid.uuid4().hex[:8]}"
        self.procs = {}
        self.env = {}  # anonymous brokers: no per-process logins
        self.topics = Topics(self.fleet, self.prefix)
        self.store = ShardStore(self.redis.url, self.fleet)
        self.acks = {}
        self.models = []
        self._lock = threading.Lock()
        self.rng = np.random.default_rng(7)
        self.sent = {}
        self.ack_wait = ack_wait
        self.devices: dict[int, mqtt.Client] = {}
        for i in range(len(cluster.nodes)):
            self.connect_devices(i)

    def listen(self, node: int) -> None:
        """The acks and models, received through ``node``."""
        n = self.cluster.nodes[node]
        self.client = mqtt311_client(f"listener-{self.fleet}", self.cluster.host, n.mqtt_port)
        self.client.on_message = self.record
        wait_for(self.client.is_connected, 10, "the listener's connection")
        self.client.subscribe(f"{self.topics.base}/ack/+", qos=1)
        self.client.subscribe(self.topics.model, qos=1)

    def coordinate_through(self, node: int) -> None:
        self.broker = _Endpoint(self.cluster.host, self.cluster.nodes[node].mqtt_port)  # type: ignore[assignment]

    def connect_devices(self, node: int) -> None:
        n = self.cluster.nodes[node]
        self.devices[node] = mqtt311_client(f"devices-{self.fleet}-{n.name}-{uuid.uuid4().hex[:4]}",
                                            self.cluster.host, n.mqtt_port)
        wait_for(self.devices[node].is_connected, 10, f"the devices' connection to {n.name}")

    def drop_devices(self, node: int) -> None:
        """The devices' connection to a dead node: stop retrying it."""
        c = self.devices.pop(node)
        c.disconnect()
        c.loop_stop()

    # -- processes -----------------------------------------------------------------------------
    def start_workers(self, names: dict[str, int], capture: str = "gateway") -> None:
        """Workers (name -> preferred node), started together; each lists its node first."""
        ready = {}
        for name, node in names.items():
            ready[name] = self.workdir / f"{name}.ready"
            ready[name].unlink(missing_ok=True)
            servers = [self.cluster.servers[node]] + [
                s for i, s in enumerate(self.cluster.servers) if i != node
            ]
            self._spawn(name, [
                "-m", "aggregator.nats_worker", "--fleet", self.fleet, "--redis", self.redis.url,
                "--servers", ",".join(servers), "--prefix", self.prefix, "--worker", name,
                "--ack-wait", str(self.ack_wait), "--ready-file", str(ready[name]),
                "--replicas", str(min(3, len(self.cluster.nodes))), "--capture", capture,
                # a long pull: a worker stopped while idle still holds an open request
                "--fetch-timeout", "5",
            ])
        for name, path in ready.items():
            wait_for(path.exists, 30, f"worker {name} to pull from JetStream")

    def start_coordinator(self, target: int, rounds: int, timeout: float = 60.0,
                          fallbacks: tuple[int, ...] = ()) -> None:
        """The coordinator on the node of :meth:`coordinate_through`; ``fallbacks``: nodes
        it reconnects to, in turn, when that one is gone (``mqtt.fallback_brokers``)."""
        extra = ["--fallback-brokers", ",".join(
            f"{self.cluster.host}:{self.cluster.nodes[i].mqtt_port}" for i in fallbacks
        ), "-vv"] if fallbacks else []  # -vv: paho's CONNACKs in its log
        self._spawn("coordinator", [
            "-m", "aggregator.shard_coordinator", *self.common(), *extra, "--protocol", "3.1.1",
            "--target", str(target), "--rounds", str(rounds), "--round-timeout", str(timeout),
            "--poll", "0.02", "--codec", CODEC,
            # the reference folds every update whole: no norm bound, no weight cap
            "--norm-bound", "off", "--weight-cap-multiplier", "0",
        ])
        wait_for(lambda: self.store.open_round() is not None, 30, "the coordinator's round")

    def stop(self) -> None:
        for node in list(self.devices):
            self.drop_devices(node)
        stop_processes(list(self.procs.values()), 5, kill_timeout=5)
        if getattr(self, "client", None) is not None:
            self.client.disconnect()
            self.client.loop_stop()
        self.store.close_connection()

    def coordinator_reconnected(self) -> bool:
        """The coordinator's client got an accepted CONNACK after it last moved to a
        fallback broker (its log: our move line, then paho's DEBUG lines)."""
        text = self.log("coordinator")
        moved = text.rfind("(mqtt.fallback_brokers)")
        return moved >= 0 and re.search(r"Received CONNACK \(\d, 0\)", text[moved:]) is not None

    def claims(self, round_id: int) -> dict[str, Claim]:
        """The open round's claims (device -> how it was folded); empty once it closed."""
        rnd = self.store.open_round()
        if rnd is None or rnd.round_id != round_id:
            return {}
        return self.store.claims(rnd.epoch, round_id)

    # -- devices ---------------------------------------------------------------------------------
    def send(self, round_id: int, device: str, node: int) -> mqtt.MQTTMessageInfo:
        """Publish (QoS 1) through ``node`` without waiting for its PUBACK."""
        return self.devices[node].publish(self.topics.update(device),
                                          self.update(round_id, device), qos=1)

    def send_all(self, round_id: int, devices: dict[str, int], timeout: float = 15.0) -> None:
        infos = [self.send(round_id, d, node) for d, node in devices.items()]
        for info in infos:
            info.wait_for_publish(timeout)
            assert info.is_published(), "a device's update was not acknowledged by NATS"
