"""The generated production broker files, run by a real Mosquitto: TLS, passwords, ACL.

One broker for the module (config from ``fedmq broker init`` on free ports); each test uses
its own identities or topics. Identities connect one at a time: the config binds the client
id to the username, so a second connection of the same user replaces the first.
"""

from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import signal
import ssl
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fedmq.net.localbroker import (
    BrokerOptions,
    LocalBroker,
    free_port,
    mosquitto_path,
    wait_for_port,
)
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.privacy.he_decrypt import he_topics
from fedmq.topics import Topics
from fedmq_ops.broker import (
    PACKET_OVERHEAD,
    BrokerLayout,
    BrokerSettings,
    add_device,
    add_gateway,
    init_broker,
    load_settings,
    make_ca,
    remove_device,
)
from tests.conftest import _track
from tests.fakes import fedmq_cli

pytestmark = pytest.mark.integration

FLEET = "f1"
T = Topics(FLEET)
GATEWAY = "gw-1"
NOT_AUTHORIZED = 0x87
WAIT = 5.0
QUIET = 0.6  # how long "nothing arrives" is watched after a sentinel has arrived
MAX_MESSAGE = 256 * 1024  # the module broker's --max-message-bytes


class SecuredBroker(LocalBroker):
    """LocalBroker's process handling, running the config ``fedmq broker init`` wrote."""

    def __init__(self, layout: BrokerLayout, settings: BrokerSettings) -> None:
        super().__init__(BrokerOptions(port=settings.tls_port), workdir=layout.root,
                         kind="mosquitto")
        self.layout = layout
        self.settings = settings

    def mosquitto_config(self) -> str:
        return self.layout.conf.read_text()  # exactly the generated file

    def start(self, timeout: float = 15.0) -> SecuredBroker:
        """Started once every listener accepts connections (the TLS one opens first)."""
        super().start(timeout)
        health = self.settings.health_port
        if health and not wait_for_port("127.0.0.1", health, timeout):
            raise RuntimeError(f"the health listener on port {health} did not open")
        return self

    def reload(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)


@dataclass
class Secure:
    broker: SecuredBroker
    layout: BrokerLayout
    passwords: dict[str, str] = field(default_factory=dict)

    def settings(self, user: str | None, password: str | None = None, protocol: str = "5",
                 ca: Path | None = None, client_id: str = "") -> MqttSettings:
        if user is not None and password is None:
            password = self.passwords[user]
        return MqttSettings(
            host="127.0.0.1", port=self.broker.settings.tls_port, client_id=client_id,
            protocol=protocol, clean_start=True, session_expiry=0, username=user,
            password=password, tls_ca=str(ca or self.layout.ca_crt),
        )


def secured_settings(root: Path, fleet: str, **changes: Any) -> BrokerSettings:
    """A broker of ``fleet`` on free ports whose files live in ``root``, with a monitor."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    settings = BrokerSettings(
        fleets=(fleet,), hostnames=("localhost",), tls_port=free_port(),
        health_port=free_port(), config_root=str(root), data_dir=f"{root}/data/",
        # As root, Mosquitto would switch to 'mosquitto', who cannot read pytest's tmp dirs.
        run_as="root" if os.geteuid() == 0 else "mosquitto", monitor=True,
    )
    return replace(settings, **changes)


@pytest.fixture(scope="module")
def _secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure-broker")
    settings = secured_settings(root, FLEET, decryptor=True, max_message_bytes=MAX_MESSAGE)
    result = init_broker(root, settings)
    secure = Secure(SecuredBroker(BrokerLayout(root), settings), BrokerLayout(root))
    secure.passwords.update(result.passwords)
    for dev in ("dev-a", "dev-b"):
        pw = add_device(root, dev)
        assert pw is not None
        secure.passwords[dev] = pw
    gw_pw = add_gateway(root, GATEWAY)  # a site gateway's bridge login
    assert gw_pw is not None
    secure.passwords[GATEWAY] = gw_pw
    secure.broker.start()
    yield secure
    secure.broker.stop()


@pytest.fixture
def secure(request: pytest.FixtureRequest, _secure: Secure) -> Secure:
    _track(request, _secure.broker)  # its log is printed when the test fails
    assert _secure.broker.running, _secure.broker.read_log()
    return _secure


class Peer:
    """A paho client that records CONNACKs, messages and PUBACK reason codes."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.client = make_client(settings)
        self.connack: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.pubacks: dict[int, Any] = {}
        self.acked = threading.Condition()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.disconnected = threading.Event()
        c = self.client
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: self.subacks.put(list(rcs))
        c.on_disconnect = lambda *_a: self.disconnected.set()
        c.on_publish = self._on_publish

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.acked:
            self.pubacks[mid] = rc
            self.acked.notify_all()

    def start(self) -> Any:
        """Connect; returns the CONNACK reason code."""
        self.client.reconnect_delay_set(60, 120)  # a refused client must not retry here
        connect(self.client, self.settings, asynchronous=False)
        self.client.loop_start()
        return self.connack.get(timeout=WAIT)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *topics: str) -> list[Any]:
        self.client.subscribe([(t, 1) for t in topics])
        return self.subacks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        """QoS 1 publish; returns the PUBACK reason code (MQTT v5) once it arrives."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.pubacks, WAIT), "no PUBACK"
            return self.pubacks.pop(info.mid)

    def drain(self, until_topic: str, until_payload: bytes,
              retained: bool = True) -> list[tuple[str, bytes]]:
        """Messages up to the sentinel (inclusive), then whatever arrives for QUIET s.

        ``retained=False`` leaves out retained messages (left by earlier tests).
        """
        got: list[tuple[str, bytes]] = []

        def take(msg: mqtt.MQTTMessage) -> None:
            if retained or not msg.retain:
                got.append((msg.topic, bytes(msg.payload)))

        deadline = time.monotonic() + WAIT
        while (until_topic, until_payload) not in got:
            left = deadline - time.monotonic()
            assert left > 0, f"sentinel {until_topic} never arrived; got {got}"
            take(self.messages.get(timeout=left))
        end = time.monotonic() + QUIET
        while (left := end - time.monotonic()) > 0:
            try:
                take(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return got


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for p in made:
        p.stop()


def _online(peers: list[Peer], settings: MqttSettings) -> Peer:
    p = Peer(settings)
    peers.append(p)
    rc = p.start()
    assert not rc.is_failure, f"{settings.username} refused: {rc}"
    return p


def _refused(settings: MqttSettings) -> Any:
    p = Peer(settings)
    try:
        return p.start()
    finally:
        p.stop()


# ------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_anonymous_is_refused(secure: Secure, protocol: str) -> None:
    rc = _refused(secure.settings(None, protocol=protocol))
    assert rc.is_failure
    if protocol == "5":
        assert rc.value in (0x86, NOT_AUTHORIZED)


def test_wrong_password_and_unknown_user_are_refused(secure: Secure) -> None:
    assert _refused(secure.settings("dev-a", "not-the-password")).is_failure
    assert _refused(secure.settings("nobody", "x")).is_failure
    # a device's password is not the aggregator's
    assert _refused(secure.settings("aggregator", secure.passwords["dev-a"])).is_failure


def test_tls_verifies_the_broker_against_the_ca(secure: Secure, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.crt"
    from cryptography.hazmat.primitives.serialization import Encoding

    other.write_bytes(make_ca("someone else")[1].public_bytes(Encoding.PEM))
    client = make_client(secure.settings("dev-a", ca=other))
    with pytest.raises(ssl.SSLCertVerificationError):
        connect(client, secure.settings("dev-a", ca=other), asynchronous=False)


def test_only_the_configured_listeners_are_open(secure: Secure) -> None:
    ports = {int(p) for p in re.findall(r"listen socket on port (\d+)", secure.broker.read_log())}
    assert ports == {secure.broker.settings.tls_port, secure.broker.settings.health_port}


def test_health_listener_is_loopback_only_and_needs_a_password(
    secure: Secure, peers: list[Peer]
) -> None:
    port = secure.broker.settings.health_port
    assert port is not None
    assert f"listener {port} 127.0.0.1" in secure.layout.conf.read_text()
    plain = MqttSettings(host="127.0.0.1", port=port, clean_start=True, session_expiry=0)
    assert _refused(plain).is_failure
    _online(peers, replace(plain, username="monitor", password=secure.passwords["monitor"]))


# ------------------------------------------------------------------------- authorisation


def test_device_update_reaches_the_aggregator(secure: Secure, peers: list[Peer]) -> None:
    agg = _online(peers, secure.settings("aggregator"))
    # the shared subscription several aggregator workers would use passes the ACL too
    assert all(not rc.is_failure
               for rc in agg.subscribe(T.shared_updates("workers"), T.status_wildcard))
    dev = _online(peers, secure.settings("dev-a"))
    assert not dev.publish(T.update("dev-a"), b"update-1").is_failure
    assert not dev.publish(T.status("dev-a"), b"online", retain=True).is_failure
    got = agg.drain(T.status("dev-a"), b"online")
    assert (T.update("dev-a"), b"update-1") in got


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_device_cannot_publish_as_another_device_or_the_aggregator(
    secure: Secure, peers: list[Peer], protocol: str
) -> None:
    agg = _online(peers, secure.settings("aggregator"))
    agg.subscribe(T.update_wildcard, T.status_wildcard, T.model, T.round, f"{T.base}/ack/+")
    dev = _online(peers, secure.settings("dev-a", protocol=protocol))
    forbidden = [T.update("dev-b"), T.status("dev-b"), T.model, T.round, T.ack("dev-a"),
                 Topics("other-fleet").update("dev-a")]
    for topic in forbidden:
        rc = dev.publish(topic, b"forged-" + protocol.encode())
        if protocol == "5":
            assert rc.value == NOT_AUTHORIZED, (topic, rc)
        # MQTT 3.1.1 has no way to say no: the broker acks and drops the message.
    sentinel = (T.update("dev-a"), b"sentinel-" + protocol.encode())
    assert not dev.publish(*sentinel).is_failure
    got = agg.drain(*sentinel, retained=False)
    assert got == [sentinel], f"forged messages were delivered: {got}"


def test_device_cannot_read_other_devices_traffic(secure: Secure, peers: list[Peer]) -> None:
    dev_a = _online(peers, secure.settings("dev-a"))
    # Mosquitto grants the SUBSCRIBE and filters each message by the read ACL on delivery.
    dev_a.subscribe("#", T.ack("dev-b"), T.update_wildcard, T.status_wildcard, "$SYS/#")
    agg = _online(peers, secure.settings("aggregator"))
    assert not agg.publish(T.ack("dev-b"), b"ack-for-b").is_failure
    dev_b = _online(peers, secure.settings("dev-b"))
    assert not dev_b.publish(T.update("dev-b"), b"update-of-b").is_failure
    assert not dev_b.publish(T.status("dev-b"), b"status-of-b").is_failure
    assert not agg.publish(T.ack("dev-a"), b"ack-for-a").is_failure
    got = dev_a.drain(T.ack("dev-a"), b"ack-for-a")
    # its own ack, and the retained model/round if an earlier test left them
    assert {t for t, _ in got} <= {T.ack("dev-a"), T.model, T.round}, f"dev-a saw: {got}"


def test_device_reads_the_retained_model_and_round(secure: Secure, peers: list[Peer]) -> None:
    agg = _online(peers, secure.settings("aggregator"))
    assert not agg.publish(T.model, b"model-v1", retain=True).is_failure
    assert not agg.publish(T.round, b"round-1", retain=True).is_failure
    dev = _online(peers, secure.settings("dev-a"))
    dev.subscribe(T.model, T.round)
    got = dev.drain(T.round, b"round-1")
    assert (T.model, b"model-v1") in got


def test_device_reads_the_downlink_snapshot_and_deltas(
    secure: Secure, peers: list[Peer]
) -> None:
    """Compressed downlink: the snapshot, delta and chunk topics are readable by devices
    and writable only by the aggregator."""
    snap, delta = f"{T.model}/snapshot", f"{T.model}/delta/7"
    topics = (snap, f"{snap}/chunk/0", delta, f"{delta}/chunk/1")
    agg = _online(peers, secure.settings("aggregator"))
    for t in topics:
        assert not agg.publish(t, b"x-" + t.encode(), retain=True).is_failure
    dev = _online(peers, secure.settings("dev-a"))
    for t in topics:
        assert dev.publish(t, b"forged", retain=True).value == NOT_AUTHORIZED
    dev.subscribe(snap, f"{snap}/chunk/+", f"{T.model}/delta/+", f"{T.model}/delta/+/chunk/+")
    got = dev.drain(topics[-1], b"x-" + topics[-1].encode())
    assert {t for t, _ in got} == set(topics), got
    for t in topics:  # leave nothing retained for the tests that subscribe to "#"
        assert not agg.publish(t, b"", retain=True).is_failure


def test_monitor_reads_but_cannot_publish(secure: Secure, peers: list[Peer]) -> None:
    agg = _online(peers, secure.settings("aggregator"))
    agg.subscribe(T.update_wildcard, T.status_wildcard)
    mon = _online(peers, secure.settings("monitor"))
    mon.subscribe(T.status_wildcard)
    assert mon.publish(T.update("monitor"), b"x").value == NOT_AUTHORIZED
    assert mon.publish(T.status("monitor"), b"x").value == NOT_AUTHORIZED
    dev = _online(peers, secure.settings("dev-b"))
    assert not dev.publish(T.status("dev-b"), b"idle").is_failure
    assert (T.status("dev-b"), b"idle") in mon.drain(T.status("dev-b"), b"idle")
    assert agg.drain(T.status("dev-b"), b"idle", retained=False) == [(T.status("dev-b"), b"idle")]


def test_only_the_decryptor_writes_the_he_mean(secure: Secure, peers: list[Peer]) -> None:
    """Homomorphic aggregation: the aggregator posts the encrypted sum, the decryptor reads it
    and is the only identity that may post the mean the aggregator reads back."""
    he_sum, he_mean = he_topics(T.base)
    agg = _online(peers, secure.settings("aggregator"))
    agg.subscribe(he_mean)
    dec = _online(peers, secure.settings("decryptor"))
    dec.subscribe(he_sum, f"{he_sum}/chunk/+")
    assert not agg.publish(f"{he_sum}/chunk/0", b"chunk-0", retain=True).is_failure
    assert not agg.publish(he_sum, b"sum-1", retain=True).is_failure
    assert dec.drain(he_sum, b"sum-1") == [(f"{he_sum}/chunk/0", b"chunk-0"), (he_sum, b"sum-1")]
    dev = _online(peers, secure.settings("dev-a"))
    mon = _online(peers, secure.settings("monitor"))
    for peer in (dev, mon, agg):
        assert peer.publish(he_mean, b"forged-mean").value == NOT_AUTHORIZED
    for peer in (dev, mon, dec):
        for topic in (he_sum, f"{he_sum}/chunk/0"):
            assert peer.publish(topic, b"forged-sum").value == NOT_AUTHORIZED
    assert not dec.publish(he_mean, b"mean-1", retain=True).is_failure
    assert agg.drain(he_mean, b"mean-1") == [(he_mean, b"mean-1")]
    for peer, topic in ((agg, f"{he_sum}/chunk/0"), (agg, he_sum), (dec, he_mean)):
        # leave nothing retained for the tests that subscribe to "#"
        assert not peer.publish(topic, b"", retain=True).is_failure


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])  # a Mosquitto bridge speaks 3.1.1
def test_a_gateway_bridge_login_publishes_only_its_partial(
    secure: Secure, peers: list[Peer], protocol: str
) -> None:
    """`fedmq broker add-gateway`: the bridge login may post its own partial, nothing else;
    the aggregator login (the partial receiver) reads it."""
    agg = _online(peers, secure.settings("aggregator"))
    agg.subscribe(T.gateway_partial_wildcard, T.update_wildcard, T.status_wildcard, T.round,
                  T.model)
    gw = _online(peers, secure.settings(GATEWAY, protocol=protocol))
    gw.subscribe(T.gateway_ack(GATEWAY))  # it reads its answer: a forged one would show
    forbidden = [T.gateway_partial("gw-2"), T.gateway_ack(GATEWAY), T.gateway_bridge(GATEWAY),
                 T.update(GATEWAY), T.update("dev-a"), T.status(GATEWAY), T.round, T.model,
                 Topics("other-fleet").gateway_partial(GATEWAY)]
    for topic in forbidden:
        rc = gw.publish(topic, b"forged-" + protocol.encode())
        if protocol == "5":
            assert rc.value == NOT_AUTHORIZED, (topic, rc)
    sentinel = (T.gateway_partial(GATEWAY), b"partial-" + protocol.encode())
    assert not gw.publish(*sentinel).is_failure
    got = agg.drain(*sentinel, retained=False)
    assert got == [sentinel], f"forged messages were delivered: {got}"
    assert gw.messages.empty(), "its forged answer was delivered"


def test_a_gateway_bridge_login_reads_only_its_answer_the_round_and_the_model(
    secure: Secure, peers: list[Peer]
) -> None:
    gw = _online(peers, secure.settings(GATEWAY))
    gw.subscribe("#", T.gateway_ack("gw-2"), T.update_wildcard, T.ack("dev-a"), "$SYS/#")
    agg = _online(peers, secure.settings("aggregator"))
    dev = _online(peers, secure.settings("dev-a"))
    assert not dev.publish(T.update("dev-a"), b"update-of-a").is_failure
    assert not dev.publish(T.status("dev-a"), b"status-of-a").is_failure
    for topic in (T.gateway_ack("gw-2"), T.ack("dev-a")):
        assert not agg.publish(topic, b"not-for-gw-1").is_failure
    for topic in (T.round, f"{T.model}/chunk/0", T.model):
        assert not agg.publish(topic, b"down-" + topic.encode()).is_failure
    assert not agg.publish(T.gateway_ack(GATEWAY), b"answer").is_failure
    got = gw.drain(T.gateway_ack(GATEWAY), b"answer", retained=False)
    assert got == [(T.round, f"down-{T.round}".encode()),
                   (f"{T.model}/chunk/0", f"down-{T.model}/chunk/0".encode()),
                   (T.model, f"down-{T.model}".encode()),
                   (T.gateway_ack(GATEWAY), b"answer")], got


def test_a_device_cannot_take_over_the_aggregator_session(
    secure: Secure, peers: list[Peer]
) -> None:
    agg = _online(peers, secure.settings("aggregator", client_id="aggregator"))
    _online(peers, secure.settings("dev-a", client_id="aggregator"))
    assert not agg.disconnected.wait(QUIET), "the device's connection kicked the aggregator"


def test_added_and_removed_devices_apply_on_sighup(secure: Secure, peers: list[Peer]) -> None:
    root = secure.layout.root
    password = add_device(root, "dev-c")
    assert password is not None
    secure.broker.reload()
    _wait_until(lambda: not _refused(secure.settings("dev-c", password)).is_failure,
                "dev-c accepted after reload")
    online = _online(peers, secure.settings("dev-c", password))
    assert remove_device(root, "dev-c")
    secure.broker.reload()
    # Mosquitto re-checks connected clients on reload: revocation is immediate.
    assert online.disconnected.wait(WAIT), "the removed device stayed connected"
    _wait_until(lambda: _refused(secure.settings("dev-c", password)).is_failure,
                "dev-c refused after removal and reload")


def _wait_until(check: Any, what: str) -> None:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_oversized_retained_publish_is_refused(
    secure: Secure, peers: list[Peer], protocol: str
) -> None:
    """max_packet_size from --max-message-bytes: a message of that size is taken, a larger
    one gets its sender disconnected and is neither delivered nor retained."""
    dev = _online(peers, secure.settings("dev-a", protocol=protocol))
    fits = bytes([1]) * MAX_MESSAGE
    assert not dev.publish(T.status("dev-a"), fits, retain=True).is_failure
    too_big = bytes([2]) * (MAX_MESSAGE + PACKET_OVERHEAD + 1)
    dev.client.publish(T.status("dev-a"), too_big, qos=1, retain=True)
    assert dev.disconnected.wait(WAIT), "the broker kept a client that sent too much"
    mon = _online(peers, secure.settings("monitor"))
    mon.subscribe(T.status("dev-a"))
    msg = mon.messages.get(timeout=WAIT)
    assert (msg.topic, msg.retain, bytes(msg.payload)) == (T.status("dev-a"), True, fits)
    assert "Client dev-a disconnected due to oversize packet." in secure.broker.read_log()
    # clear the retained status for the other tests
    dev2 = _online(peers, secure.settings("dev-a", protocol=protocol))
    assert not dev2.publish(T.status("dev-a"), b"", retain=True).is_failure


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory outside pytest's 0700 tmp tree, so a broker that dropped root reaches it."""
    base = Path(tempfile.mkdtemp(prefix="fedmq-owned-broker-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_local_broker_run_as_its_owner_keeps_queued_messages_over_a_restart(
    request: pytest.FixtureRequest, world_readable_dir: Path, peers: list[Peer]
) -> None:
    """`fedmq broker init --local --owner` as docs/broker.md says: Mosquitto, started as root,
    drops to `mosquitto`, saves mosquitto.db into data/ on SIGTERM and restores the
    offline aggregator's queued QoS 1 update after the restart."""
    if os.geteuid() != 0:
        pytest.skip("needs root: --owner and Mosquitto dropping to its user")
    try:
        pw = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no `mosquitto` system user (apt-get install mosquitto creates it)")
    owner = (pw.pw_uid, pw.pw_gid)
    root = world_readable_dir / "broker"
    tls, health = free_port(), free_port()
    done = fedmq_cli("-q", "broker", "init", "--dir", str(root), "--local", "--fleet", FLEET,
                     "--owner", f"{owner[0]}:{owner[1]}", "--tls-port", str(tls),
                     "--health-port", str(health))
    assert done.returncode == 0, done.stderr
    layout = BrokerLayout(root)
    data = root / "data"
    assert (data.stat().st_uid, data.stat().st_gid) == owner
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    settings = load_settings(root)
    assert settings.run_as == "mosquitto"
    device_pw = add_device(root, "dev-a", owner=owner)
    assert device_pw is not None
    agg_pw = _env_file(layout.credentials("aggregator"))["FEDMQ_AGGREGATOR_MQTT_PASSWORD"]
    broker = SecuredBroker(layout, settings)
    _track(request, broker)
    broker.start()
    try:
        plain = MqttSettings(host="127.0.0.1", port=health, client_id="aggregator",
                             protocol="5", clean_start=False, session_expiry=3600,
                             username="aggregator", password=agg_pw)
        agg = _online(peers, plain)
        agg.subscribe(T.update_wildcard)
        agg.stop()  # offline, its persistent session keeps the subscription
        dev = _online(peers, replace(plain, client_id="dev-a", clean_start=True,
                                     session_expiry=0, username="dev-a", password=device_pw))
        assert not dev.publish(T.update("dev-a"), b"queued-update").is_failure
        dev.stop()
        broker.stop()  # SIGTERM: Mosquitto saves its database
        saved = data / "mosquitto.db"
        assert saved.is_file(), broker.read_log()
        assert saved.stat().st_uid == owner[0]
        broker.start()
        back = _online(peers, plain)  # same session, no new SUBSCRIBE
        msg = back.messages.get(timeout=WAIT)
        assert (msg.topic, bytes(msg.payload)) == (T.update("dev-a"), b"queued-update")
    finally:
        broker.stop()


def _env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out
