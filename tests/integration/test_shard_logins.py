"""The sharded ingest on the project's own secured broker: a real Mosquitto 2.0.11 running
the files of ``fedmq broker init`` (TLS, passwords, ACL, client id bound to the login), a
real Redis, real worker and coordinator processes each logged in with its own
``fedmq broker add-service`` login (a worker's ack connection with its ``NAME-acks`` login),
and enrolled devices, each on its own connection, publishing real updates."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedmq.net.localredis import LocalRedis
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.topics import Topics
from fedmq_ops.broker import (
    BrokerLayout,
    ack_login,
    add_device,
    add_service,
    init_broker,
    service_config,
)
from tests.conftest import _track
from tests.integration.shard_fleet import ShardFleet, assert_exact, durable_redis, wait_for
from tests.integration.test_broker_security import (
    NOT_AUTHORIZED,
    Peer,
    Secure,
    SecuredBroker,
    secured_settings,
)

pytestmark = pytest.mark.integration

FLEET = "shardsec"
T = Topics(FLEET)
WORKERS = ("w1", "w2")
COORDINATOR = "coord"
RECEIVER = "rx"  # a partial receiver's login (only its ACL is checked here)
DEVICES = tuple(f"dev-{i}" for i in range(8))


@pytest.fixture
def secure(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secure]:
    """A broker from `fedmq broker init` with the services' and the devices' logins."""
    root = tmp_path / "broker"
    settings = secured_settings(root, FLEET, health_port=None)
    result = init_broker(root, settings)
    secure = Secure(SecuredBroker(BrokerLayout(root), settings), BrokerLayout(root),
                    dict(result.passwords))
    roles = {**dict.fromkeys(WORKERS, "shard-worker"), COORDINATOR: "shard-coordinator",
             RECEIVER: "partial-receiver"}
    for name, role in roles.items():
        pw = add_service(root, name, role)
        assert pw is not None and secure.layout.gateway_password(name).read_text() == pw + "\n"
        secure.passwords[name] = pw
        # the service's config: its own table, then what `add-service` printed
        (root / f"{name}.toml").write_text(f'[aggregator]\nfleet = "{FLEET}"\n\n'
                                           + service_config(name, role))
    for dev in DEVICES:
        pw = add_device(root, dev)
        assert pw is not None
        secure.passwords[dev] = pw
    secure.broker.start()
    _track(request, secure.broker)  # its log is printed when the test fails
    yield secure
    secure.broker.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[LocalRedis]:
    yield from durable_redis(tmp_path)


@pytest.fixture
def fleet(secure: Secure, redis_server: LocalRedis, tmp_path: Path) -> Iterator[ShardFleet]:
    """The harness reads the models as `monitor`; each process logs in as its service, its
    password and the broker's CA from the environment, the rest from the printed config."""
    env = {name: {"FEDMQ_AGGREGATOR_MQTT_PASSWORD": secure.passwords[name],
                  "FEDMQ_AGGREGATOR_MQTT_TLS_CA": str(secure.layout.ca_crt)}
           for name in (*WORKERS, COORDINATOR)}
    env["coordinator"] = env.pop(COORDINATOR)  # ShardFleet's name of the process
    f = ShardFleet(secure.broker, redis_server, "", tmp_path, fleet=FLEET,
                   login=secure.settings("monitor"), env=env)
    yield f
    f.stop()


class Devices:
    """One connection per enrolled device (its own login), each subscribed to every
    device's ack (``ack/+``): the ACL must deliver it its own only."""

    def __init__(self, secure: Secure, fleet: ShardFleet) -> None:
        self.received: dict[str, set[str]] = defaultdict(set)
        self.clients: dict[str, mqtt.Client] = {}
        for dev in DEVICES:
            settings = secure.settings(dev)
            client = make_client(settings)
            client.on_message = self._recorder(dev, fleet)
            connect(client, settings, asynchronous=False)
            client.loop_start()
            client.subscribe(f"{T.base}/ack/+", qos=1)
            self.clients[dev] = client

    def _recorder(self, dev: str, fleet: ShardFleet) -> mqtt.CallbackOnMessage:
        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            self.received[dev].add(msg.topic)
            fleet.record(client, userdata, msg)
        return on_message

    def stop(self) -> None:
        for client in self.clients.values():
            client.disconnect()
            client.loop_stop()


def _settings(secure: Secure, user: str) -> MqttSettings:
    """``user``'s login; a worker's ack login has the worker's password."""
    worker = user.removesuffix("-acks")
    return secure.settings(user, secure.passwords[worker if worker in WORKERS else user])


def _round_open(fleet: ShardFleet, round_id: int) -> bool:
    rnd = fleet.store.open_round()
    return rnd is not None and rnd.round_id == round_id


def _all_acked(fleet: ShardFleet, round_id: int) -> bool:
    return fleet.ok_devices(round_id) == set(DEVICES)


def test_workers_and_coordinator_with_their_own_logins_ack_every_device_exactly(
    secure: Secure, fleet: ShardFleet
) -> None:
    for w in WORKERS:
        fleet.start_worker(w, extra=["--config", str(secure.layout.root / f"{w}.toml")])
    fleet.start_coordinator(target=len(DEVICES), rounds=2, extra=[
        "--config", str(secure.layout.root / f"{COORDINATOR}.toml")])
    devices = Devices(secure, fleet)
    try:
        for r in (1, 2):
            wait_for(functools.partial(_round_open, fleet, r), 30, f"round {r}")
            for dev in DEVICES:
                fleet.publish(r, dev, client=devices.clients[dev])
            fleet.wait_version(r, 30)
            wait_for(functools.partial(_all_acked, fleet, r), 15, f"round {r}'s acks")
        assert_exact(fleet.published(2), fleet.reference([set(DEVICES)] * 2))
        log = fleet.log("coordinator")
        for r in (1, 2):  # both workers' logins ingested at once, neither knocked off
            assert f"round {r} closed: {len(DEVICES)} update(s) from 2 worker(s)" in log, log
        assert all(fleet.procs[w].poll() is None for w in WORKERS)
        # every device heard its own acks and no other device's
        assert dict(devices.received) == {d: {T.ack(d)} for d in DEVICES}
    finally:
        devices.stop()
    for name in (*WORKERS, "coordinator"):
        fleet.kill(name)  # their logins are free for the checks below
    _check_least_privilege(secure)


def _check_least_privilege(secure: Secure) -> None:
    """Each service login may publish only its role's topics (0x87 for the rest)."""
    allowed = {
        "w1": (),
        ack_login("w1"): (T.ack("dev-0"),),
        COORDINATOR: (T.model, T.round),
        RECEIVER: (T.gateway_ack("gw-1"),),
    }
    forbidden = (T.model, T.round, T.ack("dev-0"), T.update("dev-0"),
                 T.gateway_ack("gw-1"), Topics("other").ack("dev-0"))
    for user, topics in allowed.items():
        peer = Peer(_settings(secure, user))
        try:
            assert not peer.start().is_failure, f"{user} refused"
            for topic in forbidden:
                rc = peer.publish(topic, b"forged")
                if topic in topics:
                    assert not rc.is_failure, f"{user} may publish on {topic}"
                else:
                    assert rc.value == NOT_AUTHORIZED, f"{user} published on {topic}: {rc}"
        finally:
            peer.stop()
