"""ConnectionWatch's rules, driven through the callbacks it installs on a real (unconnected)
paho client, with a fake clock: what is logged, how often, and when it gives up."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.errors import ConfigError
from fedmq.net.mqtt import ConnectError, ConnectionWatch, MqttSettings, make_client

SETTINGS = MqttSettings(host="broker.example", port=8883)
REFUSED = "cannot connect to broker.example:8883: connection refused (is the broker running " \
    "and listening on this port?); retrying"


@dataclass
class Rig:
    watch: ConnectionWatch
    client: Any
    now: list[float]
    calls: list[str] = field(default_factory=list)

    def fail(self, exc: OSError, at: float) -> None:
        self.now[0] = at
        self.client.last_error = exc
        self.client.on_connect_fail(self.client, None)

    def connack(self, code: int, at: float) -> None:
        self.now[0] = at
        self.client.on_connect(self.client, None, {}, ReasonCode(PacketTypes.CONNACK,
                                                                  identifier=code), None)

    def disconnect(self, at: float) -> None:
        self.now[0] = at
        self.client.on_disconnect(self.client, None, {}, ReasonCode(PacketTypes.DISCONNECT,
                                                                     identifier=0), None)


def rig(settings: MqttSettings = SETTINGS) -> Rig:
    client = make_client(settings)
    now = [0.0]
    r = Rig(None, client, now)  # type: ignore[arg-type]
    client.on_connect = lambda *_a: r.calls.append("shell connect")
    client.on_disconnect = lambda *_a: r.calls.append("shell disconnect")
    r.watch = ConnectionWatch(
        client, settings, on_fatal=lambda: r.calls.append("fatal"),
        on_publish_failure=lambda topic, reason: r.calls.append(f"{topic} {reason}"),
        repeat_every=60.0, clock=lambda: now[0],
    )
    return r


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "fedmq.net.mqtt" and r.levelno >= level]


def test_unreachable_is_reported_once_per_minute_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        for t in range(0, 60):
            r.fail(ConnectionRefusedError(111, "refused"), float(t))
        assert messages(caplog) == [REFUSED]
        r.fail(ConnectionRefusedError(111, "refused"), 60.0)
        assert messages(caplog)[-1] == REFUSED.replace(
            "retrying", "retrying (59 more failed attempt(s) since the last report)")
        r.fail(TimeoutError("timed out"), 61.0)  # another cause: reported at once
        assert messages(caplog)[-1] == "cannot connect to broker.example:8883: timed out; retrying"
    assert len(messages(caplog)) == 3 and r.watch.failure is None and "fatal" not in r.calls


def test_after_a_disconnect_failures_are_quiet_for_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        r.connack(0, 0.0)
        r.disconnect(100.0)
        for t in range(101, 160):
            r.fail(ConnectionRefusedError(111, "refused"), float(t))
        assert messages(caplog) == []  # the shell's disconnect WARNING said it
        r.fail(ConnectionRefusedError(111, "refused"), 160.0)
        assert messages(caplog) == [REFUSED.replace(
            "retrying", "retrying (59 more failed attempt(s) since the last report)")]
        r.connack(0, 161.0)
    assert r.calls == ["shell connect", "shell disconnect", "shell connect"]


def test_tls_certificate_error_at_start_up_is_fatal_once() -> None:
    r = rig()
    err = ssl.SSLCertVerificationError(1, "certificate verify failed")
    err.verify_message = "Hostname mismatch, certificate is not valid for 'broker.example'."
    r.fail(err, 0.0)
    r.fail(err, 1.0)
    assert r.calls == ["fatal"]
    expected = ("cannot use the broker at broker.example:8883: TLS certificate not accepted: "
                "Hostname mismatch, certificate is not valid for 'broker.example'. (check "
                "mqtt.host and mqtt.tls_ca)")
    assert r.watch.failure == expected
    with pytest.raises(ConnectError) as exc:
        r.watch.raise_if_failed()
    assert str(exc.value) == expected


def test_bad_credentials_fatal_at_start_up_but_retried_after_a_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = rig()
    first.connack(0x86, 0.0)
    first.disconnect(0.1)  # the broker closes the socket: not a second report
    assert first.calls == ["fatal"]
    assert first.watch.failure == (
        "cannot use the broker at broker.example:8883: the broker refused the connection: "
        "Bad user name or password (check mqtt.username, mqtt.password and the broker's ACL)")

    later = rig()
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        later.connack(0, 0.0)
        later.disconnect(1.0)
        later.connack(0x87, 100.0)  # password rotated while we ran: keep trying, say so
    assert later.watch.failure is None and "fatal" not in later.calls
    assert messages(caplog, logging.ERROR) == [
        "cannot connect to broker.example:8883: the broker refused the connection: Not "
        "authorized (check mqtt.username, mqtt.password and the broker's ACL); retrying"]


def test_retry_forever_keeps_trying(caplog: pytest.LogCaptureFixture) -> None:
    r = rig(MqttSettings(host="broker.example", port=8883, retry_forever=True))
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        for t in range(5):
            r.connack(0x87, float(t))
    assert r.watch.failure is None and r.calls == []
    assert len(messages(caplog, logging.ERROR)) == 1


def test_puback_failures_logged_once_per_topic_and_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = rig()
    denied = ReasonCode(PacketTypes.PUBACK, identifier=0x87)
    ok = ReasonCode(PacketTypes.PUBACK, identifier=0)
    r.client.topic_of_mid.update({1: "fl/f/status/d", 2: "fl/f/status/d", 3: "fl/f/update/d",
                                  4: "fl/f/update/d"})
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        for mid, reason in ((1, denied), (2, denied), (3, denied), (4, ok)):
            r.client.on_publish(r.client, None, mid, reason, None)
    assert messages(caplog) == [
        "the broker did not accept a message on fl/f/status/d: Not authorized (0x87)",
        "the broker did not accept a message on fl/f/update/d: Not authorized (0x87)",
    ]
    assert r.calls == ["fl/f/status/d not_authorized", "fl/f/status/d not_authorized",
                       "fl/f/update/d not_authorized"]
    assert r.client.topic_of_mid == {}


def test_topics_of_message_ids_are_kept_only_for_a_watch_that_forgets_them() -> None:
    """Without a ConnectionWatch nothing pops the map on PUBACK: it must not grow (a site
    gateway or a shard worker publishes an ack per update for days)."""
    bare = make_client(SETTINGS)
    for _ in range(3):  # not connected: paho queues them, each with a message id
        bare.publish("fl/f/ack/d", b"x", qos=1)
    assert bare.topic_of_mid == {}  # type: ignore[attr-defined]
    r = rig()
    info = r.client.publish("fl/f/status/d", b"x", qos=1)
    assert r.client.topic_of_mid == {info.mid: "fl/f/status/d"}


def test_paho_noise_goes_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(SETTINGS)
    with caplog.at_level(logging.DEBUG, "fedmq.net.mqtt"):
        client.on_log(client, None, 8, "Client is not connected. Socket: None).")
        client.on_log(client, None, 8, "Caught exception in on_connect: boom")
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [(logging.DEBUG, "paho: Client is not connected. Socket: None)."),
                      (logging.ERROR, "paho: Caught exception in on_connect: boom")]


# ------------------------------------------------------------------------ TLS files
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA and two device certificates written by ``fedmq broker`` (real PEM files)."""
    from fedmq_ops.broker import BrokerLayout, BrokerSettings, add_device, init_broker

    root = tmp_path_factory.mktemp("pki")
    init_broker(root, BrokerSettings(fleets=("f",)))
    for dev in ("dev-a", "dev-b"):
        add_device(root, dev, client_cert=True)
    return BrokerLayout(root)


def test_tls_files_are_checked_with_one_line_each(pki: Any, tmp_path: Path) -> None:
    ca, crt, key = str(pki.ca_crt), str(pki.client_crt("dev-a")), str(pki.client_key("dev-a"))
    MqttSettings(tls_ca=ca, tls_cert=crt, tls_key=key).check_files()  # a good set passes
    not_pem = tmp_path / "not.pem"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    fake_pem = tmp_path / "fake.pem"
    fake_pem.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    cases = [
        (dict(tls_ca=str(tmp_path / "none.crt")), f"mqtt.tls_ca {tmp_path / 'none.crt'}: no "
         "such file"),
        (dict(tls_ca=str(tmp_path)), f"mqtt.tls_ca {tmp_path}: not a file"),
        (dict(tls_ca=str(not_pem)), f"mqtt.tls_ca {not_pem}: not a PEM file"),
        (dict(tls_ca=str(fake_pem)), f"mqtt.tls_ca {fake_pem}: not a PEM CA certificate"),
        (dict(tls_ca=ca, tls_cert=str(tmp_path / "c.crt"), tls_key=key),
         f"mqtt.tls_cert {tmp_path / 'c.crt'}: no such file"),
        (dict(tls_ca=ca, tls_cert=crt, tls_key=str(tmp_path)), f"mqtt.tls_key {tmp_path}: "
         "not a file"),
        (dict(tls_ca=ca, tls_cert=crt, tls_key=str(pki.client_key("dev-b"))),
         f"mqtt.tls_cert {crt} / mqtt.tls_key {pki.client_key('dev-b')}: not a PEM "
         "certificate and its unencrypted private key"),
    ]
    for kwargs, message in cases:
        settings = MqttSettings(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as err:
            settings.check_files()
        assert str(err.value).startswith(message), (kwargs, str(err.value))
        with pytest.raises(ConfigError):
            make_client(settings)  # the factory checks too: never a traceback from paho


def test_password_is_not_in_repr_or_redacted() -> None:
    s = MqttSettings(username="u", password="hunter2")
    assert "hunter2" not in repr(s) and s.redacted()["password"] == "***"
