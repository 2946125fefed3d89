"""Two tiers end to end (docs/scaling.md, "Site gateways"): a cloud Mosquitto, real Redis, the
cloud's ingest worker, partial receiver and coordinator; a site Mosquitto run from the config
`fedmq broker gateway-conf` renders, bridged to the cloud; the site aggregator; devices sending
real encoded, signed updates of digits-mlp at the site and directly to the cloud. The cloud
broker is down for a whole round (the site keeps acking its devices, its partial waits in the
bridge queue, the site aggregator is SIGKILLed and re-sends it from its journal) and comes
back: the published model is exactly the one-process model of every device, each once."""

from __future__ import annotations

import getpass
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.partial_receiver import PartialReceiver
from aggregator.shard_coordinator import ShardCoordinator
from aggregator.shard_store import (
    Fold,
    GatewayClaim,
    RoundRules,
    ShardStore,
    gateway_partial_key,
)
from aggregator.shard_worker import ShardWorker
from aggregator.site_store import SiteStore
from fedmq.errors import RejectReason
from fedmq.net.localbroker import BrokerOptions, LocalBroker, free_port
from fedmq.net.localredis import LocalRedis, RedisOptions, redis_server_path
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.net.procs import stop_processes
from fedmq.signing import DeviceKey, Registry, create_key, sign_site_partial, sign_update
from fedmq.topics import Topics
from fedmq.update.codecs import get_codec
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import (
    RoundAnnouncement,
    SitePartial,
    TrainingConfig,
    UpdateMessage,
    decode_ack,
    decode_model,
    decode_round,
    decode_update,
    encode,
)
from fedmq_ops.broker import BrokerLayout, BrokerSettings, add_gateway, init_broker
from fedmq_ops.broker.gateway import GatewayBrokerSettings, render_gateway_conf
from fedmq_ops.cli import main as fedmq_main
from tests.integration.shard_fleet import (
    BUNDLE,
    CODEC,
    ROOT,
    TEMPLATE,
    ShardFleet,
    assert_exact,
    wait_for,
)
from tests.integration.test_broker_security import SecuredBroker

pytestmark = pytest.mark.timeout(180)

SITE_DEVICES = [f"s-{i:02d}" for i in range(12)]
CLOUD_DEVICES = [f"c-{i:02d}" for i in range(4)]
GATEWAY = "gw-1"


class GatewayBroker(LocalBroker):
    """The site Mosquitto, run from a rendered gateway config (``conf``) listening on ``port``."""

    def __init__(self, conf: str, port: int, workdir: Path) -> None:
        super().__init__(BrokerOptions(port=port), workdir, kind="mosquitto")
        self.conf = conf

    @classmethod
    def of(cls, settings: GatewayBrokerSettings, workdir: Path) -> GatewayBroker:
        return cls(render_gateway_conf(settings), settings.listen_port, workdir)

    def mosquitto_config(self) -> str:
        return self.conf


class Client:
    """A paho client that records what it receives; it subscribes again on every (re)connect:
    its first connect sets clean start, and Mosquitto 2.0.11 did not restore such a session's
    subscriptions after a restart (the services connect with clean start off: theirs are)."""

    def __init__(self, port: int, name: str, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name,
                             protocol=mqtt.MQTTv5)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(0.2, 1)
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, rc, p=None: [c.subscribe(t, qos=1) for t in topics]
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.connect("127.0.0.1", port, clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        self.c.loop_start()
        wait_for(self.c.is_connected, 10, f"{name} to connect")

    def _on_message(self, client: mqtt.Client, userdata: object, m: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append((m.topic, bytes(m.payload)))

    def received(self, suffix: str) -> list[bytes]:
        with self.lock:
            return [p for t, p in self.got if t.endswith(suffix)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(10)

    def stop(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    if redis_server_path() is None:
        pytest.fail("redis-server is not installed: `make test` installs it")
    server = LocalRedis(RedisOptions(appendfsync="always"), workdir=tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def _retained_model(port: int, topic: str, version: int) -> dict[str, np.ndarray]:
    c = Client(port, f"reader-{uuid.uuid4().hex[:8]}", [topic])
    try:
        wait_for(lambda: any(decode_model(p).version == version for p in c.received("model")),
                 30, f"model version {version} retained on port {port}")
        msg = next(m for m in map(decode_model, c.received("model")) if m.version == version)
        return {t.name: t.array() for t in msg.tensors}
    finally:
        c.stop()


def test_two_tiers_cloud_down_for_a_round_loses_and_doubles_nothing(
    fresh_broker: LocalBroker, redis_server: LocalRedis, topic_prefix: str, tmp_path: Path,
) -> None:
    started = time.monotonic()
    cloud = fresh_broker  # persistence on: sessions and queues survive its restart
    fleet = ShardFleet(cloud, redis_server, topic_prefix, tmp_path)
    topics = fleet.topics
    keys = {d: DeviceKey.generate() for d in SITE_DEVICES + CLOUD_DEVICES}
    site_registry, cloud_registry = Registry(tmp_path / "site.json"), Registry(
        tmp_path / "cloud.json")
    for d in SITE_DEVICES:
        site_registry.enroll(d, keys[d].public_hex)
    for d in CLOUD_DEVICES:
        cloud_registry.enroll(d, keys[d].public_hex)
    gw_key = create_key(tmp_path / "gw.key")
    Registry(tmp_path / "gateways.json").enroll(GATEWAY, gw_key.public_hex)

    settings = GatewayBrokerSettings(
        fleet.fleet, GATEWAY, cloud.host, cloud.port, topic_prefix=topic_prefix,
        listen_port=free_port(), listen_address="127.0.0.1",
        data_dir=f"{tmp_path / 'site-broker'}/", site_devices=len(SITE_DEVICES),
        run_as="root" if os.geteuid() == 0 else getpass.getuser(),
        restart_base=1, restart_cap=2, autosave_interval=1,
    )
    site = GatewayBroker.of(settings, tmp_path / "site-broker").start()
    spy = devices = None
    try:
        # everything the cloud broker ever carries for this fleet
        spy = Client(cloud.port, f"spy-{fleet.fleet}", [f"{topics.base}/#"])
        devices = Client(site.port, f"site-devices-{fleet.fleet}",
                         [topics.round, f"{topics.base}/ack/+"])

        def start(name: str, module: str, *args: str) -> None:
            ready = tmp_path / f"{name}.ready"
            ready.unlink(missing_ok=True)
            fleet._spawn(name, ["-m", module, *args, "--ready-file", str(ready)])
            wait_for(ready.exists, 30, f"{name} to subscribe")

        start("w1", "aggregator.shard_worker", *fleet.common(), "--worker", "w1",
              "--registry", str(tmp_path / "cloud.json"))
        start("receiver", "aggregator.partial_receiver", *fleet.common(),
              "--gateways", str(tmp_path / "gateways.json"))
        fleet.start_coordinator(target=len(SITE_DEVICES) + len(CLOUD_DEVICES), rounds=3)
        gateway_args = [
            "--fleet", fleet.fleet, "--gateway", GATEWAY, "--key", str(tmp_path / "gw.key"),
            "--state", str(tmp_path / "site.db"), "--registry", str(tmp_path / "site.json"),
            "--host", "127.0.0.1", "--port", str(site.port), "--prefix", topic_prefix,
            "--expect", str(len(SITE_DEVICES)), "--lead", "1",
        ]
        start("gateway", "aggregator.site_gateway", *gateway_args)
        rng = np.random.default_rng(11)

        def site_round(r: int) -> RoundAnnouncement:
            """The round as the SITE sees it: the cloud's announcement, down the bridge."""
            wait_for(lambda: any(decode_round(p).round_id == r
                                 for p in devices.received("/round")), 30,
                     f"round {r} announced at the site")
            return next(a for a in map(decode_round, devices.received("/round"))
                        if a.round_id == r)

        def update(r: int, ann: RoundAnnouncement, device: str) -> bytes:
            codec = ann.config.codec  # the round's codec (another one is refused bad_codec)
            delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in TEMPLATE.items()}
            msg = UpdateMessage(fleet.fleet, r, ann.base_version, device, uuid.uuid4().hex[:16],
                                int(rng.integers(1, 300)), codec,
                                tuple(get_codec(codec).encode(delta, rng).tensors),
                                epoch=ann.epoch)
            fleet.sent[(r, device)] = sign_update(msg, keys[device])
            return fleet.sent[(r, device)]

        def site_acked(r: int) -> set[str]:
            """Site devices whose round-``r`` update the site answered accepted."""
            with devices.lock:
                acks = [decode_ack(p) for t, p in devices.got if "/ack/" in t]
            return {a.device for a in acks if a.accepted and (r, a.device) in fleet.sent
                    and decode_update(fleet.sent[(r, a.device)]).update_id == a.update_id}

        def send_site(r: int, ann: RoundAnnouncement) -> None:
            for d in SITE_DEVICES:
                devices.publish(topics.update(d), update(r, ann, d))

        def send_cloud(r: int, ann: RoundAnnouncement) -> None:
            for d in CLOUD_DEVICES:
                update(r, ann, d)
                fleet.publish(r, d)

        # -- round 1: both tiers up ------------------------------------------------------------
        ann = site_round(1)
        send_cloud(1, ann)
        send_site(1, ann)
        fleet.wait_version(1, 30)
        assert site_acked(1) == set(SITE_DEVICES)

        # -- round 2: the cloud broker is down for the whole site round --------------------------
        ann = site_round(2)
        send_cloud(2, ann)  # the direct devices of round 2 are in before the outage
        wait_for(lambda: fleet.store.claim_count(ann.epoch, 2) == len(CLOUD_DEVICES), 30,
                 "the direct devices' commits")
        outage = time.monotonic()
        cloud.stop()
        send_site(2, ann)
        wait_for(lambda: site_acked(2) == set(SITE_DEVICES), 30,
                 "the site to ack its devices with the cloud down")
        wait_for(lambda: "round 2 sealed: partial" in fleet.log("gateway"), 30, "the seal")
        journal = SiteStore(tmp_path / "site.db", fleet.fleet)
        pending = journal.pending()
        assert [(o.round_id, o.devices) for o in pending] == [(2, len(SITE_DEVICES))]
        fleet.kill("gateway")  # killed with its partial unanswered: it re-sends from its journal
        start("gateway", "aggregator.site_gateway", *gateway_args)
        wait_for(lambda: "sending partial" in fleet.log("gateway").split("round 2 sealed")[-1],
                 30, "the restarted gateway's re-send")
        time.sleep(1.0)
        assert fleet.store.claim_count(ann.epoch, 2) == len(CLOUD_DEVICES)  # nothing reached it
        assert fleet.store.model_version() == 1
        cloud.start()
        fleet.wait_version(2, 60)
        recovered = time.monotonic() - outage
        wait_for(lambda: journal.pending() == [], 30, "the cloud's answer at the gateway")
        wait_for(lambda: "was already committed" in fleet.log("receiver"), 30,
                 "the re-sent copy answered duplicate")

        # -- round 3: both tiers up again ------------------------------------------------------
        ann = site_round(3)
        send_cloud(3, ann)
        send_site(3, ann)
        fleet.wait_version(3, 30)

        rounds = [set(SITE_DEVICES) | set(CLOUD_DEVICES) for _ in range(3)]
        want = fleet.reference(rounds)
        assert_exact(_retained_model(cloud.port, topics.model, 3), want)
        assert_exact(_retained_model(site.port, topics.model, 3), want)  # down the bridge
        model = fleet.store.model()
        assert model is not None and model["contributors"] == 16
        coordinator = fleet.log("coordinator")
        for r in (1, 2, 3):
            assert f"round {r} closed: 16 update(s) from 2 worker(s)" in coordinator
        # devices' updates never left the site: the cloud saw only the direct devices'
        # updates and the gateway's partials
        seen = {t for t, _ in spy.got}
        assert not [t for t in seen if "/update/s-" in t or "/ack/s-" in t]
        assert topics.gateway_partial(GATEWAY) in seen
        receiver = fleet.log("receiver")
        assert receiver.count("committed partial") == 3
        assert "rejected partial" not in receiver  # late copies are duplicates, not refusals
        up = [p for t, p in spy.got if t == topics.gateway_partial(GATEWAY)]
        site_bytes = sum(len(fleet.sent[(r, d)]) for r in (1, 2, 3) for d in SITE_DEVICES)
        journal.close_connection()
        print(f"\ntwo tiers, 3 rounds of {len(SITE_DEVICES)} site + {len(CLOUD_DEVICES)} "
              f"direct devices: {time.monotonic() - started:.1f}s; cloud down -> round 2 "
              f"published {recovered:.1f}s after the outage began; upstream: "
              f"{len(up)} partial(s) of {max(map(len, up))} bytes at most for "
              f"{site_bytes // 3} bytes of site updates per round")
    finally:
        for c in (spy, devices):
            if c is not None:
                c.stop()
        fleet.stop()
        site.stop()


def test_partial_receiver_commits_once_and_refuses_whole(redis_server: LocalRedis,
                                                         tmp_path: Path) -> None:
    """The cloud end on real Redis (no broker): a partial is committed with its devices'
    claims in one step, a resend is a duplicate, anything else is refused whole. Gateway
    claims and a worker's Fold claims share the round's claims; the coordinator's finish
    feeds only the worker's fold into the fleet's norm and claim pools."""
    fleet = f"rx{uuid.uuid4().hex[:8]}"
    store = ShardStore(redis_server.url, fleet)
    rules = RoundRules(TrainingConfig(codec="float32"))
    assert store.init("ep", BUNDLE.initial_trainable(), 1, time.time() + 60, 100, rules)
    gateways = Registry(tmp_path / "gateways.json")
    keys = {g: DeviceKey.generate() for g in ("gw-1", "gw-2", "gw-3")}
    for g, k in keys.items():
        gateways.enroll(g, k.public_hex)
    rx = PartialReceiver(store, TEMPLATE, gateways)
    rng = np.random.default_rng(5)

    def partial(gateway: str, devices: tuple[str, ...], pid: str, base: int = 0,
                key: DeviceKey | None = None, weight: float = 10.0) -> bytes:
        acc = FixedPointSum(TEMPLATE)
        for _ in devices:
            delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in TEMPLATE.items()}
            acc.fold(get_codec("float32").encode(delta, rng).tensors, "float32", weight)
        msg = SitePartial(fleet, "ep", 1, base, gateway, pid, devices, acc.to_bytes())
        return sign_site_partial(msg, key or keys[gateway])

    good = partial("gw-1", ("a", "b"), "p1")
    assert rx.handle("gw-1", good, 0.0).code == "ok"
    again = rx.handle("gw-1", good, 0.0)
    assert (again.accepted, again.code) == (True, RejectReason.DUPLICATE)
    refused = {
        "second partial of gw-1": (rx.handle("gw-1", partial("gw-1", ("c",), "p2"), 0.0),
                                   RejectReason.DUPLICATE),
        "device claimed by gw-1": (rx.handle("gw-2", partial("gw-2", ("b", "d"), "q1"), 0.0),
                                   RejectReason.DUPLICATE),
        "on gw-3's topic": (rx.handle("gw-3", partial("gw-2", ("e",), "q2"), 0.0),
                            RejectReason.DEVICE_MISMATCH),
        "signed by gw-3": (rx.handle("gw-2", partial("gw-2", ("e",), "q3", key=keys["gw-3"]),
                                     0.0), RejectReason.BAD_SIGNATURE),
        "unknown gateway": (rx.handle("gw-9", partial("gw-9", ("e",), "q4",
                                                      key=keys["gw-1"]), 0.0),
                            RejectReason.UNKNOWN_DEVICE),
        "wrong base": (rx.handle("gw-3", partial("gw-3", ("e",), "q5", base=4), 0.0),
                       RejectReason.WRONG_BASE),
        "garbage": (rx.handle("gw-3", b"\x93\x01", 0.0), RejectReason.MALFORMED),
    }
    for what, (ack, code) in refused.items():
        assert (ack.accepted, ack.code) == (False, code), what
    # only gw-1's two devices are claimed, and its partial is the only one
    assert store.claims("ep", 1) == {"a": GatewayClaim("gw-1", "p1"),
                                     "b": GatewayClaim("gw-1", "p1")}
    # a cloud worker next to the gateway: its update is a Fold claim; a device the gateway's
    # partial holds is refused (not a duplicate of the worker's update)
    worker = ShardWorker(store, TEMPLATE, "w1")

    def update(device: str) -> bytes:
        delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                 for n, s in TEMPLATE.items()}
        return encode(UpdateMessage(fleet, 1, 0, device, uuid.uuid4().hex[:12], 7, "float32",
                                    tuple(get_codec("float32").encode(delta, rng).tensors),
                                    epoch="ep"))

    assert worker.handle("w-dev", update("w-dev"), 0.0).code == "ok"
    taken = worker.handle("a", update("a"), 0.0)
    assert (taken.accepted, taken.code) == (False, RejectReason.DUPLICATE)
    assert "gateway gw-1's partial p1" in taken.reason
    claims = store.claims("ep", 1)
    assert set(claims) == {"a", "b", "w-dev"} and isinstance(claims["w-dev"], Fold)
    assert sorted(store.close("ep", 1) or {}) == ["gateway:gw-1", "w1"]
    late = rx.handle("gw-3", partial("gw-3", ("e",), "q6"), 0.0)
    assert (late.accepted, late.code) == (False, RejectReason.ROUND_CLOSED)
    # a late copy of the committed partial is still a duplicate, also once the round is
    # finished and its claims are gone (a bridge or journal copy racing the close)
    coord = ShardCoordinator(store, BUNDLE, Topics(fleet), lambda t, p: None, target=100,
                             training=rules.config)
    assert coord.tick(time.time())  # the closed round: merged (3 updates) and finished
    model = store.model()
    assert model is not None and (model["version"], model["contributors"]) == (1, 3)
    pool = json.loads(store.fleet_bounds() or "{}")
    assert set(pool["norms"]) == {"w-dev"} and pool["claims"] == {"w-dev": 7.0}
    for _ in range(2):
        copy = rx.handle("gw-1", good, 0.0)
        assert (copy.accepted, copy.code) == (True, RejectReason.DUPLICATE)
    store.close_connection()


def test_site_broker_killed_with_the_partial_queued_the_journal_resends_it(
    fresh_broker: LocalBroker, redis_server: LocalRedis, topic_prefix: str, tmp_path: Path,
) -> None:
    """The cloud is down and the site broker is SIGKILLed with the sealed partial in its
    bridge queue (not yet autosaved): the restarted site broker has lost it, the site
    aggregator re-sends it from its journal on reconnect, and the model is exact."""
    cloud = fresh_broker
    fleet = ShardFleet(cloud, redis_server, topic_prefix, tmp_path)
    topics = fleet.topics
    devices_ids = SITE_DEVICES[:6]
    keys = {d: DeviceKey.generate() for d in devices_ids}
    site_registry = Registry(tmp_path / "site.json")
    for d in devices_ids:
        site_registry.enroll(d, keys[d].public_hex)
    gw_key = create_key(tmp_path / "gw.key")
    Registry(tmp_path / "gateways.json").enroll(GATEWAY, gw_key.public_hex)
    settings = GatewayBrokerSettings(
        fleet.fleet, GATEWAY, cloud.host, cloud.port, topic_prefix=topic_prefix,
        listen_port=free_port(), listen_address="127.0.0.1",
        data_dir=f"{tmp_path / 'site-broker'}/", site_devices=len(devices_ids),
        run_as="root" if os.geteuid() == 0 else getpass.getuser(),
        restart_base=1, restart_cap=2, autosave_interval=3600,  # nothing saved before the kill
    )
    site = GatewayBroker.of(settings, tmp_path / "site-broker").start()
    devices = None
    try:
        devices = Client(site.port, f"site-devices-{fleet.fleet}",
                         [topics.round, f"{topics.base}/ack/+"])
        for name, module, args in (
            ("receiver", "aggregator.partial_receiver",
             [*fleet.common(), "--gateways", str(tmp_path / "gateways.json")]),
            ("gateway", "aggregator.site_gateway",
             ["--fleet", fleet.fleet, "--gateway", GATEWAY, "--key", str(tmp_path / "gw.key"),
              "--state", str(tmp_path / "site.db"), "--registry", str(tmp_path / "site.json"),
              "--host", "127.0.0.1", "--port", str(site.port), "--prefix", topic_prefix,
              "--expect", str(len(devices_ids)), "--lead", "1"]),
        ):
            ready = tmp_path / f"{name}.ready"
            fleet._spawn(name, ["-m", module, *args, "--ready-file", str(ready)])
            wait_for(ready.exists, 30, f"{name} to subscribe")
        fleet.start_coordinator(target=len(devices_ids), rounds=1)
        wait_for(lambda: bool(devices.received("/round")), 30, "round 1 at the site")
        ann = decode_round(devices.received("/round")[-1])
        cloud.stop()
        rng = np.random.default_rng(5)
        for d in devices_ids:
            delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in TEMPLATE.items()}
            msg = UpdateMessage(fleet.fleet, 1, ann.base_version, d, uuid.uuid4().hex[:16],
                                int(rng.integers(1, 300)), "int8",
                                tuple(get_codec("int8").encode(delta, rng).tensors),
                                epoch=ann.epoch)
            fleet.sent[(1, d)] = sign_update(msg, keys[d])
            devices.publish(topics.update(d), fleet.sent[(1, d)])
        wait_for(lambda: "round 1 sealed: partial" in fleet.log("gateway"), 30, "the seal")
        time.sleep(0.3)  # the partial is in the site broker's bridge queue
        site.kill()
        site.start()
        wait_for(lambda: "sending partial" in fleet.log("gateway"), 30,
                 "the site aggregator's re-send to the restarted site broker")
        cloud.start()
        fleet.wait_version(1, 60)
        assert_exact(_retained_model(cloud.port, topics.model, 1),
                     fleet.reference([set(devices_ids)]))
        assert "round 1 closed: 6 update(s) from 1 worker(s)" in fleet.log("coordinator")
        receiver = fleet.log("receiver")
        assert receiver.count("committed partial") == 1
        assert "rejected partial" not in receiver
    finally:
        if devices is not None:
            devices.stop()
        fleet.stop()
        site.stop()


def _service(tmp_path: Path, name: str, args: list[str],
             env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``fedmq ARGS`` as a real process of this checkout, its output in ``<name>.log``."""
    with open(tmp_path / f"{name}.log", "ab") as logf:
        return subprocess.Popen([sys.executable, "-m", "fedmq_ops", *args], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)


def test_bridge_over_tls_with_a_password_delivers_the_partial_exactly(
    redis_server: LocalRedis, tmp_path: Path,
) -> None:
    """The production path of a site: a cloud broker from `fedmq broker init` (TLS listener
    only, passwords, ACL) with the gateway's bridge login from `fedmq broker add-gateway`; the
    site broker from `fedmq broker gateway-conf --cafile --remote-username
    --remote-password-file`; the site aggregator and the partial receiver run as services
    from their TOML configs (`fedmq aggregator site-gateway|partial-receiver --config`, the
    receiver's password in the environment). Three signed updates at the site: the cloud
    store holds exactly their one-process sum under the gateway's claims, and the receiver's
    answer (ok) came back down the bridge to the gateway's journal."""
    started = time.monotonic()
    fleet = f"tls{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    root = tmp_path / "cloud-broker"
    cloud_settings = BrokerSettings(
        fleets=(fleet,), hostnames=("localhost",), tls_port=free_port(), health_port=None,
        config_root=str(root), data_dir=f"{root}/data/",
        run_as="root" if os.geteuid() == 0 else "mosquitto",
    )
    init = init_broker(root, cloud_settings)
    (root / "data").mkdir(exist_ok=True)
    layout = BrokerLayout(root)
    assert add_gateway(root, GATEWAY) is not None
    cloud = SecuredBroker(layout, cloud_settings).start()
    store = ShardStore(redis_server.url, fleet)
    procs: list[subprocess.Popen[bytes]] = []
    site = devices = None
    try:
        # the cloud's round 1, announced (retained) by the aggregator login over TLS
        rules = RoundRules(TrainingConfig(codec=CODEC))
        deadline = time.time() + 120
        assert store.init("ep", BUNDLE.initial_trainable(), 1, deadline, 100, rules)
        agg = MqttSettings(host="127.0.0.1", port=cloud_settings.tls_port, username="aggregator",
                           password=init.passwords["aggregator"], tls_ca=str(layout.ca_crt),
                           clean_start=True, session_expiry=0)
        announcer = make_client(agg)
        connect(announcer, agg, asynchronous=False)
        announcer.loop_start()
        info = announcer.publish(topics.round, encode(RoundAnnouncement(
            fleet, 1, 0, deadline, rules.config, epoch="ep")), qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
        announcer.disconnect()  # the login is bound to one connection: the receiver's next
        announcer.loop_stop()

        gw_key = create_key(tmp_path / "gw.key")
        Registry(tmp_path / "gateways.json").enroll(GATEWAY, gw_key.public_hex)
        keys = {d: DeviceKey.generate() for d in ("s-a", "s-b", "s-c")}
        site_registry = Registry(tmp_path / "site.json")
        for d, k in keys.items():
            site_registry.enroll(d, k.public_hex)
        (tmp_path / "cloud.toml").write_text(
            f'[receiver]\nfleet = "{fleet}"\nredis = "{redis_server.url}"\n'
            f'gateways = "{tmp_path / "gateways.json"}"\n'
            f'ready_file = "{tmp_path / "receiver.ready"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {cloud_settings.tls_port}\n'
            f'tls_ca = "{layout.ca_crt}"\nusername = "aggregator"\n')
        procs.append(_service(tmp_path, "receiver", [
            "aggregator", "partial-receiver", "--config", str(tmp_path / "cloud.toml")],
            {"FEDMQ_RECEIVER_MQTT_PASSWORD": init.passwords["aggregator"]}))
        site_port = free_port()
        conf = tmp_path / "site-mosquitto.conf"
        assert fedmq_main([
            "broker", "gateway-conf", "--out", str(conf), "--fleet", fleet,
            "--gateway", GATEWAY, "--cloud-host", "127.0.0.1",
            "--cloud-port", str(cloud_settings.tls_port), "--listen-port", str(site_port),
            "--listen-address", "127.0.0.1", "--data-dir", f"{tmp_path / 'site-broker'}/",
            "--run-as", "root" if os.geteuid() == 0 else getpass.getuser(),
            "--site-devices", "3", "--cafile", str(layout.ca_crt),
            "--remote-username", GATEWAY,
            "--remote-password-file", str(layout.gateway_password(GATEWAY)),
            "--restart-timeout", "1", "2",
        ]) == 0
        assert conf.stat().st_mode & 0o777 == 0o600  # it holds the bridge's password
        site = GatewayBroker(conf.read_text(), site_port, tmp_path / "site-broker").start()
        (tmp_path / "site.toml").write_text(
            f'[gateway]\nfleet = "{fleet}"\nname = "{GATEWAY}"\nkey = "{tmp_path / "gw.key"}"\n'
            f'state = "{tmp_path / "site.db"}"\nregistry = "{tmp_path / "site.json"}"\n'
            f'expect = 3\nlead = 1.0\nready_file = "{tmp_path / "gateway.ready"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {site_port}\n')
        procs.append(_service(tmp_path, "gateway", [
            "aggregator", "site-gateway", "--config", str(tmp_path / "site.toml")], {}))
        for name in ("receiver", "gateway"):
            wait_for((tmp_path / f"{name}.ready").exists, 30, f"the {name} to subscribe")
        devices = Client(site.port, f"devices-{fleet}", [topics.round, f"{topics.base}/ack/+"])
        wait_for(lambda: bool(devices.received("/round")), 30, "round 1 down the TLS bridge")
        ann = decode_round(devices.received("/round")[-1])
        assert (ann.round_id, ann.epoch, ann.config.codec) == (1, "ep", CODEC)
        rng = np.random.default_rng(3)
        sent = []
        for d, k in keys.items():
            delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in TEMPLATE.items()}
            sent.append(sign_update(UpdateMessage(
                fleet, 1, 0, d, uuid.uuid4().hex[:16], int(rng.integers(1, 300)), CODEC,
                tuple(get_codec(CODEC).encode(delta, rng).tensors), epoch="ep"), k))
            devices.publish(topics.update(d), sent[-1])
        journal = SiteStore(tmp_path / "site.db", fleet)
        wait_for(lambda: store.claim_count("ep", 1) == 3, 30, "the partial in the cloud store")
        wait_for(lambda: "the cloud committed partial" in (tmp_path / "gateway.log").read_text(),
                 30, "the receiver's answer down the bridge")
        assert journal.pending() == []
        journal.close_connection()
        acks = [decode_ack(p) for p in devices.received("/ack/s-a") + devices.received(
            "/ack/s-b") + devices.received("/ack/s-c")]
        assert sorted((a.device, a.code) for a in acks) == [
            ("s-a", "ok"), ("s-b", "ok"), ("s-c", "ok")]
        claims = store.claims("ep", 1)
        assert set(claims) == set(keys)
        partial_ids = {c.partial_id for c in claims.values() if isinstance(c, GatewayClaim)}
        assert len(partial_ids) == 1 and all(
            c == GatewayClaim(GATEWAY, *partial_ids) for c in claims.values())
        want = FixedPointSum(TEMPLATE)
        for p in sent:
            m = decode_update(p)
            want.fold(m.tensors, m.codec, float(m.num_examples))
        assert store.partial("ep", 1, gateway_partial_key(GATEWAY)) == want.to_bytes()
        receiver = (tmp_path / "receiver.log").read_text()
        assert receiver.count("committed partial") == 1 and "rejected" not in receiver
        assert "(round 1, ok)" in (tmp_path / "gateway.log").read_text()
        # the bridge logged in as the gateway's own login, on the only (TLS) listener
        assert re.search(rf"New bridge connected from \S+ as {GATEWAY} \(p\d+, c0, k\d+, "
                         rf"u'{GATEWAY}'\)", cloud.read_log()), cloud.read_log()
        print(f"\nTLS bridge, 3 site devices: partial committed and answered, "
              f"{time.monotonic() - started:.1f}s")
    finally:
        if devices is not None:
            devices.stop()
        stop_processes(procs, 5, kill_timeout=5)
        if site is not None:
            site.stop()
        cloud.stop()
        store.close_connection()
