"""A secured fleet end to end: TLS Mosquitto from `fedmq broker` files, enrolled keys,
the real aggregator and edge agents as processes, signed updates folded, and what an
attacker holding one device's broker credentials can and cannot do.

Everything runs from generated files: the broker config, the per-identity credentials
(``credentials/NAME.env`` passed as the processes' environment), the CA, the registry
written by ``fedmq enroll`` and the device keys written by ``fedmq keygen``.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.engine import resolve_bundle
from aggregator.store import Store
from fedmq.errors import RejectReason
from fedmq.net.localbroker import BrokerOptions, LocalBroker, free_port, mosquitto_path
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.net.procs import stop_process
from fedmq.signing import DeviceKey, Registry, load_or_create_key
from fedmq.topics import Topics
from fedmq.wire import AckMessage, decode_ack, decode_model
from fedmq_ops.broker import BrokerLayout, BrokerSettings, add_device, init_broker
from tests.conftest import _track
from tests.fakes import exact_delta, make_update

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
FLEET = "secure"
T = Topics(FLEET)
AGENTS = ("dev-a", "dev-b")
NOT_AUTHORIZED = 0x87
WAIT = 10.0


class SecuredBroker(LocalBroker):
    """LocalBroker's process handling around exactly the generated mosquitto.conf."""

    def __init__(self, layout: BrokerLayout, port: int) -> None:
        super().__init__(BrokerOptions(port=port), workdir=layout.root, kind="mosquitto")
        self.layout = layout

    def mosquitto_config(self) -> str:
        return self.layout.conf.read_text()


def _env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _cli(*args: str) -> str:
    """``python -m fedmq ARGS``; its stdout."""
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run([sys.executable, "-m", "fedmq_ops", "-q", *args], capture_output=True,
                          text=True, env=env, cwd=_ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@dataclass
class Proc:
    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=_ROOT)
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Peer:
    """A paho client (MQTT v5) recording messages and PUBACK reason codes."""

    def __init__(self, settings: MqttSettings) -> None:
        self.client = make_client(settings)
        self.settings = settings
        self.connack: queue.Queue[Any] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subacks: queue.Queue[Any] = queue.Queue()
        self.pubacks: dict[int, Any] = {}
        self.cond = threading.Condition()
        c = self.client
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.put(rc)
        c.on_message = lambda _c, _u, msg: self.messages.put(msg)
        c.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subacks.put(list(rcs))
        c.on_publish = self._on_publish

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.cond:
            self.pubacks[mid] = rc
            self.cond.notify_all()

    def start(self, *subscriptions: str) -> Peer:
        self.client.reconnect_delay_set(60, 120)
        connect(self.client, self.settings, asynchronous=False)
        self.client.loop_start()
        rc = self.connack.get(timeout=WAIT)
        assert not rc.is_failure, f"{self.settings.username} refused: {rc}"
        if subscriptions:
            self.client.subscribe([(t, 1) for t in subscriptions])
            rcs = self.subacks.get(timeout=WAIT)
            assert all(not r.is_failure for r in rcs), rcs
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Any:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.cond:
            assert self.cond.wait_for(lambda: info.mid in self.pubacks, WAIT), "no PUBACK"
            return self.pubacks.pop(info.mid)

    def next_ack(self, timeout: float = WAIT) -> AckMessage:
        msg = self.messages.get(timeout=timeout)
        return decode_ack(bytes(msg.payload))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    root: Path
    layout: BrokerLayout
    settings: BrokerSettings
    broker: SecuredBroker
    registry: Path
    keys: dict[str, Path] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)

    def credentials(self, name: str) -> dict[str, str]:
        return _env_file(self.layout.credentials(name))

    def mqtt(self, name: str) -> MqttSettings:
        cred = self.credentials(name)
        prefix = {"aggregator": "FEDMQ_AGGREGATOR_MQTT_", "monitor": "FEDMQ_MONITOR_"}.get(
            name, "FEDMQ_AGENT_MQTT_")
        return MqttSettings(
            host="127.0.0.1", port=self.settings.tls_port, client_id=name, protocol="5",
            clean_start=True, session_expiry=0, username=cred[f"{prefix}USERNAME"],
            password=cred[f"{prefix}PASSWORD"], tls_ca=str(self.layout.ca_crt),
        )

    def peer(self, name: str, *subscriptions: str) -> Peer:
        p = Peer(self.mqtt(name))
        self.peers.append(p)
        return p.start(*subscriptions)

    def process(self, name: str, cmd: list[str], env: dict[str, str]) -> Proc:
        full_env = {**os.environ, "PYTHONPATH": str(_ROOT), **env}
        p = Proc(name, cmd, full_env, self.root / f"{name}.log")
        self.procs.append(p)
        return p.start()


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    root = tmp_path / "broker"
    settings = BrokerSettings(
        fleets=(FLEET,), hostnames=("localhost",), tls_port=free_port(),
        health_port=free_port(), config_root=str(root), data_dir=f"{root}/data/",
        run_as="root" if os.geteuid() == 0 else "mosquitto", monitor=True,
    )
    init_broker(root, settings)
    # dev-m: a valid broker identity used to send bad updates; dev-x: not enrolled at all
    for device in (*AGENTS, "dev-m", "dev-x"):
        assert add_device(root, device) is not None
    layout = BrokerLayout(root)
    broker = SecuredBroker(layout, settings.tls_port)
    _track(request, broker)
    f = Fleet(root, layout, settings, broker, tmp_path / "registry" / "devices.json")
    broker.start()
    try:
        yield f
    finally:
        for p in f.peers:
            p.stop()
        for proc in f.procs:
            proc.stop()
        broker.stop()


def _enroll(f: Fleet, tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    # dev-a through the real CLI: keygen on the device, enroll on the aggregator side
    f.keys["dev-a"] = keydir / "dev-a.key"
    public = _cli("keygen", "--key", str(f.keys["dev-a"])).strip()
    assert len(public) == 64
    out = _cli("enroll", "dev-a", public, "--registry", str(f.registry))
    assert "enrolled dev-a" in out
    reg = Registry(f.registry)
    for device in ("dev-b", "dev-m"):
        f.keys[device] = keydir / f"{device}.key"
        reg.enroll(device, load_or_create_key(f.keys[device]).public_hex)
    assert set(reg.devices()) == {"dev-a", "dev-b", "dev-m"}


def _wait_model(monitor: Peer, version: int, timeout: float, procs: list[Proc]) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            msg = monitor.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        if msg.topic == T.model and msg.payload:
            model = decode_model(bytes(msg.payload))
            if model.version >= version:
                return model
    logs = "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)
    raise AssertionError(f"model v{version} not published within {timeout}s\n{logs}")


def _update(device: str, key: DeviceKey | None, uid: str) -> bytes:
    shapes = {t.name: t.shape for t in resolve_bundle("digits-mlp").spec.trainable_specs}
    return make_update(FLEET, 2, 1, device, exact_delta(shapes, 0), 10, "float32", uid, key=key)


def test_signed_round_over_tls_and_what_a_device_identity_cannot_do(
    fleet: Fleet, tmp_path: Path
) -> None:
    f = fleet
    _enroll(f, tmp_path)
    state_dir = tmp_path / "aggregator-state"
    agg_env = f.credentials("aggregator")
    assert set(agg_env) == {"FEDMQ_AGGREGATOR_MQTT_USERNAME", "FEDMQ_AGGREGATOR_MQTT_PASSWORD"}
    f.process("aggregator", [
        sys.executable, "-m", "aggregator", "-v", "--host", "127.0.0.1",
        "--port", str(f.settings.tls_port), "--tls-ca", str(f.layout.ca_crt),
        "--client-id", "aggregator", "--fleet", FLEET, "--state-dir", str(state_dir),
        "--registry", str(f.registry), "--model", "digits-mlp", "--eval-dataset", "digits",
        "--eval-examples", "300", "--selection", "any", "--clients-per-round", "2",
        "--min-updates", "2", "--round-timeout", "60", "--train-max-examples", "300",
        "--codec", "int8",
    ], agg_env)
    monitor = f.peer("monitor", T.model)
    for i, device in enumerate(AGENTS):
        env = f.credentials(device)
        assert env["FEDMQ_AGENT_DEVICE_ID"] == device
        f.process(device, [
            sys.executable, "-m", "edge_agent", "--host", "127.0.0.1",
            "--port", str(f.settings.tls_port), "--tls-ca", str(f.layout.ca_crt),
            "--fleet", FLEET, "--state-dir", str(tmp_path / f"{device}-state"),
            "--model", "digits-mlp", "--source", "digits", "--partition", "iid",
            "--num-clients", "2", "--client-index", str(i), "--signing-key", str(f.keys[device]),
        ], env)

    model = _wait_model(monitor, 1, 45.0, f.procs)
    assert model.round_id == 1 and model.metrics["participants"] == 2
    assert 0.0 < model.metrics["accuracy"] <= 1.0
    for device in AGENTS:  # free their identities (client id = username) for what follows
        assert f.procs[[p.name for p in f.procs].index(device)].stop() == 0

    # -- device A's credentials: not B's update topic, not the model topic
    dev_b = f.peer("dev-b", T.ack("dev-b"))
    dev_a = f.peer("dev-a", T.ack("dev-a"))
    a_key = load_or_create_key(f.keys["dev-a"])
    as_b = _update("dev-b", a_key, "a-as-b")
    assert dev_a.publish(T.update("dev-b"), as_b).value == NOT_AUTHORIZED
    assert dev_a.publish(T.model, b"evil-model", retain=True).value == NOT_AUTHORIZED

    # -- a valid broker identity with bad updates: rejected with their codes on its ack topic
    dev_m = f.peer("dev-m", T.ack("dev-m"))
    assert not dev_m.publish(T.update("dev-m"), _update("dev-m", None, "m-unsigned")).is_failure
    ack = dev_m.next_ack()
    assert (ack.update_id, ack.accepted, ack.code) == ("m-unsigned", False, RejectReason.UNSIGNED)
    forged = _update("dev-m", DeviceKey.generate(), "m-forged")
    assert not dev_m.publish(T.update("dev-m"), forged).is_failure
    ack = dev_m.next_ack()
    assert (ack.update_id, ack.code) == ("m-forged", RejectReason.BAD_SIGNATURE)
    dev_x = f.peer("dev-x", T.ack("dev-x"))
    signed_x = _update("dev-x", DeviceKey.generate(), "x-1")
    assert not dev_x.publish(T.update("dev-x"), signed_x).is_failure
    ack = dev_x.next_ack()
    assert (ack.update_id, ack.code) == ("x-1", RejectReason.UNKNOWN_DEVICE)

    # nothing of A's forgeries reached anyone: no ack for B, the retained model is the real one
    # (B's agent may have had a round-2 update in flight when it stopped: ignore its ack)
    end = time.monotonic() + 1.0
    while (left := end - time.monotonic()) > 0:
        try:
            leaked = decode_ack(bytes(dev_b.messages.get(timeout=left).payload))
        except queue.Empty:
            break
        assert leaked.update_id != "a-as-b", leaked
    seen: list[bytes] = []
    while not monitor.messages.empty():
        seen.append(bytes(monitor.messages.get_nowait().payload))
    assert b"evil-model" not in seen
    check = f.peer("monitor", T.model)  # replaces the first monitor session (same identity)
    retained = check.messages.get(timeout=WAIT)
    assert decode_model(bytes(retained.payload)).version >= 1

    agg = f.procs[0]
    assert agg.stop() == 0, agg.log()[-4000:]
    with Store(state_dir) as store:
        first = store.history()[0]
        assert (first.round_id, first.status, first.participants) == (1, "closed", 2)
        assert store.current_model() is not None
        assert {c[0] for c in store.contributions(1)} == set(AGENTS)
        rejects = store.reject_counts()
    assert rejects.get(RejectReason.UNSIGNED) == 1
    assert rejects.get(RejectReason.BAD_SIGNATURE) == 1  # A's update as B never arrived
    assert rejects.get(RejectReason.UNKNOWN_DEVICE) == 1
    assert RejectReason.DEVICE_MISMATCH not in rejects
    assert "a-as-b" not in agg.log()
