"""``fedmq broker``: generated config, ACL, password file and certificates (no broker run)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.errors import ConfigError
from fedmq_ops.broker import (
    PACKET_OVERHEAD,
    BrokerLayout,
    BrokerSettings,
    add_device,
    add_gateway,
    add_parser,
    add_service,
    format_passwd,
    hash_password,
    init_broker,
    list_devices,
    list_gateways,
    list_services,
    load_settings,
    parse_passwd,
    remove_device,
    remove_gateway,
    remove_service,
    render_acl,
    render_mosquitto_conf,
    service_config,
    verify_password,
)
from fedmq_ops.broker.acl import SERVICE_GRANTS
from fedmq_ops.broker.gateway import GatewayBrokerSettings, render_gateway_conf
from fedmq_ops.broker.settings import SERVICE_ROLES
from tests.fakes import fedmq_cli

REPO = Path(__file__).resolve().parents[2]
PASSWD_LINE = re.compile(
    r"^([A-Za-z0-9_.-]+):\$7\$(\d+)\$([A-Za-z0-9+/]{16})\$([A-Za-z0-9+/]{86}==)$"
)


@pytest.fixture
def broker_dir(tmp_path: Path) -> Path:
    root = tmp_path / "b"
    init_broker(root, BrokerSettings(fleets=("f1", "f2"), hostnames=("mqtt.example.com",
                                                                       "10.0.0.5")))
    return root


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


# ------------------------------------------------------------------------------ config


def test_repository_config_is_the_rendered_default() -> None:
    assert (REPO / "broker" / "mosquitto.conf").read_text() == render_mosquitto_conf(
        BrokerSettings()
    )


def test_repository_acl_example_is_rendered() -> None:
    s = BrokerSettings(monitor=True, decryptor=True)
    assert (REPO / "broker" / "acl.example").read_text() == render_acl(
        s, {"device-001": "default", "device-002": "default"}
    )


def _directives(conf: str) -> list[tuple[str, str]]:
    out = []
    for line in conf.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value))
    return out


def test_config_is_locked_down() -> None:
    conf = render_mosquitto_conf(BrokerSettings())
    d = dict(_directives(conf))
    assert d["allow_anonymous"] == "false"
    assert d["per_listener_settings"] == "false"
    assert d["password_file"] == "/mosquitto/config/passwd"
    assert d["acl_file"] == "/mosquitto/config/acl"
    assert d["cafile"] == "/mosquitto/config/certs/ca.crt"
    assert d["certfile"] == "/mosquitto/config/certs/server.crt"
    assert d["keyfile"] == "/mosquitto/config/certs/server.key"
    assert d["tls_version"] == "tlsv1.2"
    assert d["persistence"] == "true"
    assert d["persistence_location"] == "/mosquitto/data/"
    assert int(d["max_queued_messages"]) >= 100_000
    assert int(d["max_packet_size"]) == 16 * 1024 * 1024 + 4096
    assert d["persistent_client_expiration"] == "14d"
    assert "message_size_limit" not in d  # deprecated
    listeners = [v for k, v in _directives(conf) if k == "listener"]
    assert listeners == ["8883", "1883 127.0.0.1"]


def test_listener_options_never_precede_the_first_listener() -> None:
    # Mosquitto 2.0 opens a default listener on 0.0.0.0:1883 (plaintext) when a listener
    # option such as use_username_as_clientid appears before any `listener`.
    listener_only = {"use_username_as_clientid", "protocol", "cafile", "certfile", "keyfile",
                     "tls_version", "require_certificate", "use_identity_as_username",
                     "bind_address", "port", "max_connections", "mount_point"}
    for s in (BrokerSettings(), BrokerSettings(health_port=None, bind_clientid=False)):
        keys = [k for k, _ in _directives(render_mosquitto_conf(s))]
        first = keys.index("listener")
        assert not listener_only & set(keys[:first])


def test_config_options() -> None:
    s = BrokerSettings(health_port=None, config_root="/etc/mosquitto/fedmq/",
                       data_dir="/var/lib/mosquitto", require_client_cert=True,
                       bind_clientid=False, tls_port=9883)
    conf = render_mosquitto_conf(s)
    d = dict(_directives(conf))
    assert [v for k, v in _directives(conf) if k == "listener"] == ["9883"]
    assert d["password_file"] == "/etc/mosquitto/fedmq/passwd"
    assert d["persistence_location"] == "/var/lib/mosquitto/"
    assert d["require_certificate"] == "true"
    assert "use_username_as_clientid" not in d


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fleets": ()},
        {"fleets": ("a/b",)},
        {"fleets": ("f", "f")},
        {"hostnames": ("bad host",)},
        {"tls_port": 0},
        {"health_port": 8883},
        {"config_root": "relative"},
        {"max_queued_messages": 1000 - 1},
        {"max_message_bytes": 300 * 1024 * 1024},
        {"max_message_bytes": 1000},
        {"persistent_client_expiration": "soon"},
        {"topic_prefix": "t/"},
        {"run_as": "ro ot"},
    ],
)
def test_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        BrokerSettings(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ ACL


def _blocks(acl: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in acl.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        assert not line.startswith("pattern"), "patterns apply to every user"
        if line.startswith("user "):
            current = blocks.setdefault(line.split()[1], [])
        else:
            assert current is not None, f"{line!r} would apply to anonymous clients"
            current.append(line)
    return blocks


def test_acl_confines_each_identity() -> None:
    s = BrokerSettings(fleets=("f1",), monitor=True, decryptor=True)
    blocks = _blocks(render_acl(s, {"dev-a": "f1", "dev-b": "f1"}))
    assert blocks["dev-a"] == [
        "topic write fl/f1/update/dev-a",
        "topic write fl/f1/status/dev-a",
        "topic read fl/f1/model",
        "topic read fl/f1/model/chunk/+",
        "topic read fl/f1/model/snapshot",
        "topic read fl/f1/model/snapshot/chunk/+",
        "topic read fl/f1/model/delta/+",
        "topic read fl/f1/model/delta/+/chunk/+",
        "topic read fl/f1/round",
        "topic read fl/f1/ack/dev-a",
        "topic write fl/f1/secagg/in/dev-a",
        "topic read fl/f1/secagg/out",
        "topic read fl/f1/secagg/out/dev-a",
    ]
    assert blocks["aggregator"] == [
        "topic read fl/f1/update/+",
        "topic read fl/f1/status/+",
        "topic readwrite fl/f1/model",
        "topic readwrite fl/f1/model/chunk/+",
        "topic readwrite fl/f1/model/snapshot",
        "topic readwrite fl/f1/model/snapshot/chunk/+",
        "topic readwrite fl/f1/model/delta/+",
        "topic readwrite fl/f1/model/delta/+/chunk/+",
        "topic readwrite fl/f1/round",
        "topic write fl/f1/ack/+",
        "topic read fl/f1/gateway/+/partial",
        "topic write fl/f1/gateway/+/ack",
        "topic read fl/f1/secagg/in/+",
        "topic write fl/f1/secagg/out",
        "topic write fl/f1/secagg/out/+",
        "topic write fl/f1/he/sum",
        "topic write fl/f1/he/sum/chunk/+",
        "topic read fl/f1/he/mean",
    ]
    # Homomorphic aggregation: the key holder reads the sum and alone writes the mean.
    assert blocks["decryptor"] == [
        "topic read fl/f1/he/sum", "topic read fl/f1/he/sum/chunk/+", "topic write fl/f1/he/mean",
    ]
    he_writers = {u for u, lines in blocks.items() for x in lines
                  if x.startswith(("topic write", "topic readwrite")) and "/he/mean" in x}
    assert he_writers == {"decryptor"}
    assert not any("/he/" in x for x in blocks["dev-a"] + blocks["monitor"])
    assert all(line.startswith("topic read ") for line in blocks["monitor"])
    for user, lines in blocks.items():
        if user != "monitor":
            assert not any("#" in line for line in lines), user
    # Chunked updates travel on the device's own update topic: no new write grant for devices
    # (secure aggregation's phase messages have their own, also the device's only).
    assert [x for x in blocks["dev-b"] if x.startswith("topic write")] == [
        "topic write fl/f1/update/dev-b", "topic write fl/f1/status/dev-b",
        "topic write fl/f1/secagg/in/dev-b",
    ]


def test_acl_with_prefix_and_fleets() -> None:
    s = BrokerSettings(fleets=("f1", "f2"), topic_prefix="site1")
    blocks = _blocks(render_acl(s, {"d2": "f2"}))
    assert "monitor" not in blocks
    assert "decryptor" not in blocks
    assert "topic write site1/fl/f2/update/d2" in blocks["d2"]
    assert "topic read site1/fl/f1/update/+" in blocks["aggregator"]
    assert "topic read site1/fl/f2/update/+" in blocks["aggregator"]
    with pytest.raises(ConfigError):
        render_acl(s, {"d3": "f3"})


# ------------------------------------------------------------------------------ passwords


def test_hash_format_and_verify() -> None:
    h = hash_password("s3cret", salt=b"\x00" * 12, iterations=101)
    assert PASSWD_LINE.match(f"u:{h}")
    assert verify_password(h, "s3cret")
    assert not verify_password(h, "s3cret ")
    assert hash_password("s3cret") != hash_password("s3cret")  # salted
    with pytest.raises(ConfigError):
        hash_password("a\nb")


def test_verifies_a_mosquitto_passwd_hash() -> None:
    # written by Mosquitto 2.0.11's mosquitto_passwd for alice/secret
    line = ("alice:$7$101$am6pklD4DW0o8WU4$KdbddMITsF7rPjm5AiUy88v9sCP+t1gjoRKdsSxSKXRdbD"
            "niPO0O4AfU12WavX7BkPPkXdjJX/8zLcqn+3+fqg==")
    assert verify_password(parse_passwd(line)["alice"], "secret")


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="no mosquitto_passwd")
def test_agrees_with_mosquitto_passwd(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text(format_passwd({"bob": hash_password("hunter2")}))
    # mosquitto_passwd keeps our line and adds its own for carol
    subprocess.run(["mosquitto_passwd", "-b", str(f), "carol", "hunter3"], check=True)
    entries = parse_passwd(f.read_text())
    assert verify_password(entries["bob"], "hunter2")
    assert verify_password(entries["carol"], "hunter3")


def test_parse_passwd_rejects_garbage() -> None:
    assert parse_passwd("# c\n\nu:$7$x\n") == {"u": "$7$x"}
    with pytest.raises(ConfigError):
        parse_passwd("no-colon\n")


# ------------------------------------------------------------------------------ init


def test_init_layout_and_modes(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    for p in (lay.conf, lay.passwd, lay.acl, lay.state, lay.ca_crt, lay.server_crt,
              lay.server_key, lay.ca_key, lay.credentials("aggregator")):
        assert p.is_file(), p
    for p in (lay.passwd, lay.server_key, lay.ca_key, lay.credentials("aggregator")):
        assert _mode(p) == 0o600, p
    for p in (lay.ca_key.parent, lay.credentials("x").parent):
        assert _mode(p) == 0o700, p
    assert _mode(lay.ca_crt) == 0o644
    entries = parse_passwd(lay.passwd.read_text())
    assert set(entries) == {"aggregator"}
    for line in lay.passwd.read_text().splitlines():
        assert PASSWD_LINE.match(line), line
    creds = dict(
        line.split("=", 1) for line in lay.credentials("aggregator").read_text().splitlines()
        if not line.startswith("#")
    )
    # identity only: host/port/fleet in the env would override the TOML config
    assert set(creds) == {"FEDMQ_AGGREGATOR_MQTT_USERNAME", "FEDMQ_AGGREGATOR_MQTT_PASSWORD"}
    assert creds["FEDMQ_AGGREGATOR_MQTT_USERNAME"] == "aggregator"
    assert verify_password(entries["aggregator"], creds["FEDMQ_AGGREGATOR_MQTT_PASSWORD"])
    assert lay.conf.read_text() == render_mosquitto_conf(
        BrokerSettings(fleets=("f1", "f2"), hostnames=("mqtt.example.com", "10.0.0.5"))
    )


def test_certificate_chain(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    ca, server = _cert(lay.ca_crt), _cert(lay.server_crt)
    server.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"mqtt.example.com", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    key = load_pem_private_key(lay.server_key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == server.public_key()
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert days <= 826


def test_init_is_idempotent(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    before = {p: p.read_bytes() for p in (lay.ca_crt, lay.ca_key, lay.server_crt,
                                          lay.server_key, lay.passwd, lay.acl, lay.conf)}
    inode = lay.passwd.stat().st_ino
    s = BrokerSettings(fleets=("f1", "f2"), hostnames=("mqtt.example.com", "10.0.0.5"))
    result = init_broker(broker_dir, s)
    assert result.passwords == {}
    assert {p: p.read_bytes() for p in before} == before
    assert lay.passwd.stat().st_ino == inode  # rewritten in place: bind mounts see changes


def test_rewrites_keep_an_operators_group_read_but_never_world(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    lay.passwd.chmod(0o644)
    add_device(broker_dir, "dev-a")
    assert _mode(lay.passwd) == 0o640  # group read kept (chgrp 1883 && chmod 0640), not world
    lay.passwd.chmod(0o600)
    add_device(broker_dir, "dev-b")
    assert _mode(lay.passwd) == 0o600


def test_new_hostname_reissues_the_server_cert_only(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    ca, old = lay.ca_crt.read_bytes(), lay.server_crt.read_bytes()
    init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), hostnames=("broker",)))
    assert lay.ca_crt.read_bytes() == ca
    new = _cert(lay.server_crt)
    assert lay.server_crt.read_bytes() != old
    new.verify_directly_issued_by(_cert(lay.ca_crt))
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "broker" in san.get_values_for_type(x509.DNSName)
    init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), hostnames=("broker",)),
                renew_server_cert=True)
    assert lay.server_crt.read_bytes() != new.public_bytes(Encoding.PEM)


def test_init_refuses_half_a_ca(broker_dir: Path) -> None:
    BrokerLayout(broker_dir).ca_key.unlink()
    with pytest.raises(ConfigError, match="only one of"):
        init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2")))


def test_monitor_identity_on_and_off(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    r = init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), monitor=True))
    assert set(r.passwords) == {"monitor"}
    assert "monitor" in parse_passwd(lay.passwd.read_text())
    assert "user monitor" in lay.acl.read_text()
    init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), monitor=False))
    assert "monitor" not in parse_passwd(lay.passwd.read_text())
    assert not lay.credentials("monitor").exists()


def test_decryptor_identity_on_and_off(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    r = init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), decryptor=True))
    assert set(r.passwords) == {"decryptor"}
    assert verify_password(parse_passwd(lay.passwd.read_text())["decryptor"],
                           r.passwords["decryptor"])
    # the variable `fedmq he decrypt` reads its password from
    env = lay.credentials("decryptor").read_text()
    assert f"FEDMQ_DECRYPTOR_MQTT_PASSWORD={r.passwords['decryptor']}\n" in env
    assert lay.credentials("decryptor").stat().st_mode & 0o777 == 0o600
    assert "user decryptor\n" + "".join(
        f"topic read fl/{f}/he/sum\ntopic read fl/{f}/he/sum/chunk/+\ntopic write fl/{f}/he/mean\n"
        for f in ("f1", "f2")) in lay.acl.read_text()
    init_broker(broker_dir, BrokerSettings(fleets=("f1", "f2"), decryptor=False))
    assert "decryptor" not in parse_passwd(lay.passwd.read_text())
    assert not lay.credentials("decryptor").exists()
    assert "user decryptor" not in lay.acl.read_text()


# ------------------------------------------------------------------------------ devices


def test_add_device(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    pw = add_device(broker_dir, "dev-a", fleet="f2")
    assert pw is not None and len(pw) >= 24
    entries = parse_passwd(lay.passwd.read_text())
    assert verify_password(entries["dev-a"], pw)
    assert "user dev-a\ntopic write fl/f2/update/dev-a\n" in lay.acl.read_text()
    assert list_devices(broker_dir) == {"dev-a": "f2"}
    cred = lay.credentials("dev-a")
    assert _mode(cred) == 0o600
    text = cred.read_text()
    assert f"FEDMQ_AGENT_MQTT_PASSWORD={pw}\n" in text
    assert "FEDMQ_AGENT_DEVICE_ID=dev-a\n" in text
    assert "FEDMQ_AGENT_MQTT_USERNAME=dev-a\n" in text
    assert "(fleet f2)" in text


def test_add_device_is_idempotent_and_rotates(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    pw = add_device(broker_dir, "dev-a")
    assert pw is not None
    before = lay.passwd.read_text()
    assert add_device(broker_dir, "dev-a") is None
    assert lay.passwd.read_text() == before
    assert list_devices(broker_dir) == {"dev-a": "f1"}  # the first fleet by default
    new = add_device(broker_dir, "dev-a", rotate=True)
    assert new is not None and new != pw
    h = parse_passwd(lay.passwd.read_text())["dev-a"]
    assert verify_password(h, new) and not verify_password(h, pw)
    assert add_device(broker_dir, "dev-a", password="chosen") == "chosen"
    assert verify_password(parse_passwd(lay.passwd.read_text())["dev-a"], "chosen")


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("aggregator", {}, "reserved"),
        ("monitor", {}, "reserved"),
        ("decryptor", {}, "reserved"),
        ("bad/name", {}, "device"),
        ("+", {}, "device"),
        ("dev-a", {"fleet": "nope"}, "not served"),
        ("dev-a", {"password": "x", "rotate": True}, "either"),
    ],
)
def test_add_device_errors(broker_dir: Path, name: str, kwargs: dict[str, object],
                           match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        add_device(broker_dir, name, **kwargs)  # type: ignore[arg-type]


def test_add_device_moving_fleets_is_refused(broker_dir: Path) -> None:
    add_device(broker_dir, "dev-a", fleet="f1")
    with pytest.raises(ConfigError, match="already belongs"):
        add_device(broker_dir, "dev-a", fleet="f2")


def test_add_device_needs_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedmq broker init"):
        add_device(tmp_path, "dev-a")


def test_client_certificate(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    add_device(broker_dir, "dev-a", client_cert=True)
    cert = _cert(lay.client_crt("dev-a"))
    cert.verify_directly_issued_by(_cert(lay.ca_crt))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _mode(lay.client_key("dev-a")) == 0o600
    # idempotent: the certificate is kept
    first = lay.client_crt("dev-a").read_bytes()
    add_device(broker_dir, "dev-a", client_cert=True)
    assert lay.client_crt("dev-a").read_bytes() == first


def test_remove_device(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    add_device(broker_dir, "dev-a", client_cert=True)
    add_device(broker_dir, "dev-b")
    assert remove_device(broker_dir, "dev-a")
    assert set(parse_passwd(lay.passwd.read_text())) == {"aggregator", "dev-b"}
    assert "dev-a" not in lay.acl.read_text()
    for p in (lay.credentials("dev-a"), lay.client_crt("dev-a"), lay.client_key("dev-a")):
        assert not p.exists()
    assert list_devices(broker_dir) == {"dev-b": "f1"}
    assert not remove_device(broker_dir, "dev-a")  # nothing left: no error
    with pytest.raises(ConfigError):
        remove_device(broker_dir, "aggregator")


def test_init_refuses_to_drop_a_fleet_with_devices(broker_dir: Path) -> None:
    add_device(broker_dir, "dev-a", fleet="f2")
    with pytest.raises(ConfigError, match="dev-a"):
        init_broker(broker_dir, BrokerSettings(fleets=("f1",)))


# ------------------------------------------------------------------------------ gateways


def test_a_gateway_may_use_exactly_what_its_bridge_carries(broker_dir: Path) -> None:
    """`add-gateway`: the bridge login's ACL block is the generated bridge's topic lines,
    out -> write, in -> read, and nothing else; the receiver (the aggregator login) reads
    every gateway's partial and writes their answers."""
    lay = BrokerLayout(broker_dir)
    pw = add_gateway(broker_dir, "gw-1", fleet="f2")
    assert pw is not None
    blocks = _blocks(lay.acl.read_text())
    assert blocks["gw-1"] == [
        "topic write fl/f2/gateway/gw-1/partial",
        "topic read fl/f2/gateway/gw-1/ack",
        "topic read fl/f2/round",
        "topic read fl/f2/model",
        "topic read fl/f2/model/chunk/+",
        "topic read fl/f2/model/snapshot",
        "topic read fl/f2/model/snapshot/chunk/+",
        "topic read fl/f2/model/delta/+",
        "topic read fl/f2/model/delta/+/chunk/+",
    ]
    bridge = [line.split() for line in render_gateway_conf(GatewayBrokerSettings(
        "f2", "gw-1", "cloud.example")).splitlines() if line.startswith("topic ")]
    grants = {"out": "write", "in": "read"}
    assert [f"topic {grants[way]} {topic}" for _, topic, way, _ in bridge] == blocks["gw-1"]
    for fleet in ("f1", "f2"):
        assert {f"topic read fl/{fleet}/gateway/+/partial",
                f"topic write fl/{fleet}/gateway/+/ack"} <= set(blocks["aggregator"])
    assert verify_password(parse_passwd(lay.passwd.read_text())["gw-1"], pw)
    saved = lay.gateway_password("gw-1")
    assert saved.read_text() == pw + "\n" and _mode(saved) == 0o600  # --remote-password-file
    assert not lay.credentials("gw-1").exists()
    assert (list_gateways(broker_dir), list_devices(broker_dir)) == ({"gw-1": "f2"}, {})
    assert add_gateway(broker_dir, "gw-1") is None  # idempotent, keeps its fleet
    # a re-init keeps the gateway, like the devices
    init_broker(broker_dir, load_settings(broker_dir))
    assert _blocks(lay.acl.read_text())["gw-1"] == blocks["gw-1"]
    with pytest.raises(ConfigError, match="gw-1"):
        init_broker(broker_dir, BrokerSettings(fleets=("f1",)))


def test_gateways_and_devices_do_not_share_a_login(broker_dir: Path) -> None:
    lay = BrokerLayout(broker_dir)
    add_gateway(broker_dir, "gw-1")
    add_device(broker_dir, "dev-a")
    with pytest.raises(ConfigError, match="gw-1 is a gateway of this broker"):
        add_device(broker_dir, "gw-1")
    with pytest.raises(ConfigError, match="dev-a is a device of this broker"):
        add_gateway(broker_dir, "dev-a")
    with pytest.raises(ConfigError, match="gw-1 is a gateway, not a device"):
        remove_device(broker_dir, "gw-1")
    with pytest.raises(ConfigError, match="reserved"):
        add_gateway(broker_dir, "aggregator")
    assert remove_gateway(broker_dir, "gw-1")
    assert "gw-1" not in lay.acl.read_text()
    assert set(parse_passwd(lay.passwd.read_text())) == {"aggregator", "dev-a"}
    assert not lay.gateway_password("gw-1").exists()
    assert not remove_gateway(broker_dir, "gw-1")
    assert "gateways" not in json.loads(lay.state.read_text())  # as before any gateway


# ------------------------------------------------------------------------------ services


def test_each_service_login_may_do_only_its_role(broker_dir: Path) -> None:
    """`add-service`: a shard worker reads the updates (its shared subscription), its ack
    login only writes the acks; the coordinator only writes the model and the round; the
    partial receiver has the aggregator's receiver lines. Passwords alone in NAME.pass."""
    lay = BrokerLayout(broker_dir)
    pw = add_service(broker_dir, "w1", "shard-worker", fleet="f2")
    assert pw is not None
    add_service(broker_dir, "coord", "shard-coordinator", fleet="f2")
    add_service(broker_dir, "rx", "partial-receiver")
    blocks = _blocks(lay.acl.read_text())
    assert blocks["w1"] == ["topic read fl/f2/update/+"]
    assert blocks["w1-acks"] == ["topic write fl/f2/ack/+"]
    assert blocks["coord"] == ["topic write fl/f2/model", "topic write fl/f2/round"]
    assert blocks["rx"] == ["topic read fl/f1/gateway/+/partial",
                            "topic write fl/f1/gateway/+/ack"]
    assert set(blocks["rx"]) <= set(blocks["aggregator"])
    assert tuple(SERVICE_GRANTS) == SERVICE_ROLES
    hashes = parse_passwd(lay.passwd.read_text())
    assert verify_password(hashes["w1"], pw) and hashes["w1-acks"] == hashes["w1"]
    saved = lay.gateway_password("w1")
    assert saved.read_text() == pw + "\n" and _mode(saved) == 0o600
    assert not lay.credentials("w1").exists() and not lay.gateway_password("w1-acks").exists()
    assert list_services(broker_dir) == {"coord": ("shard-coordinator", "f2"),
                                         "rx": ("partial-receiver", "f1"),
                                         "w1": ("shard-worker", "f2")}
    assert add_service(broker_dir, "w1", "shard-worker") is None  # idempotent, keeps its fleet
    new = add_service(broker_dir, "w1", "shard-worker", rotate=True)
    assert new is not None and new != pw
    hashes = parse_passwd(lay.passwd.read_text())
    assert verify_password(hashes["w1-acks"], new)  # the ack login follows the rotation
    init_broker(broker_dir, load_settings(broker_dir))  # a re-init keeps them
    assert _blocks(lay.acl.read_text()) == blocks
    with pytest.raises(ConfigError, match="coord"):
        init_broker(broker_dir, BrokerSettings(fleets=("f1",)))
    assert remove_service(broker_dir, "w1")
    assert not {"w1", "w1-acks"} & set(parse_passwd(lay.passwd.read_text()))
    assert not {"w1", "w1-acks"} & set(_blocks(lay.acl.read_text()))
    assert not saved.exists() and not remove_service(broker_dir, "w1")
    assert service_config("w1", "shard-worker") == (
        "# MQTT login of the shard-worker w1; its password is in credentials/w1.pass\n"
        '[mqtt]\nusername = "w1"\n\n[shard]\nack_username = "w1-acks"\n')
    assert "[shard]" not in service_config("coord", "shard-coordinator")


def test_a_login_has_one_role_and_the_ack_logins_are_taken(broker_dir: Path) -> None:
    add_service(broker_dir, "w1", "shard-worker")
    add_device(broker_dir, "dev-a")
    add_device(broker_dir, "x-acks")
    with pytest.raises(ConfigError, match="w1-acks is the ack login of shard worker w1"):
        add_device(broker_dir, "w1-acks")
    with pytest.raises(ConfigError, match="w1-acks is the ack login of shard worker w1"):
        remove_device(broker_dir, "w1-acks")
    with pytest.raises(ConfigError, match="ack login x-acks is taken"):
        add_service(broker_dir, "x", "shard-worker")
    with pytest.raises(ConfigError, match="w1 is a shard-worker of this broker"):
        add_service(broker_dir, "w1", "shard-coordinator")
    with pytest.raises(ConfigError, match="w1 is a shard-worker of this broker"):
        add_gateway(broker_dir, "w1")
    with pytest.raises(ConfigError, match="dev-a is a device of this broker"):
        add_service(broker_dir, "dev-a", "partial-receiver")
    with pytest.raises(ConfigError, match="dev-a is a device, not a shard-worker"):
        remove_service(broker_dir, "dev-a")
    with pytest.raises(ConfigError, match="unknown role"):
        add_service(broker_dir, "s", "shard-boss")
    # removing a service that is not one leaves a device named like its ack login alone
    assert not remove_service(broker_dir, "x")
    assert "x-acks" in parse_passwd(BrokerLayout(broker_dir).passwd.read_text())


# ------------------------------------------------------------------------------ CLI


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedmq")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "gen"
    assert _cli(["broker", "init", "--dir", str(d), "--fleet", "f1", "--hostname", "broker",
                 "--local", "--tls-port", "18883", "--health-port", "0"]) == 0
    conf = (d / "mosquitto.conf").read_text()
    assert f"password_file {d.resolve()}/passwd" in conf
    assert "listener 18883\n" in conf and "127.0.0.1" not in conf
    assert _cli(["broker", "add-device", "dev-a", "--dir", str(d), "--no-save"]) == 0
    out = capsys.readouterr().out
    pw = re.search(r"dev-a password \(shown once\): (\S+)", out)
    assert pw is not None
    assert verify_password(parse_passwd((d / "passwd").read_text())["dev-a"], pw.group(1))
    assert not (d / "credentials" / "dev-a.env").exists()
    # a second init without flags keeps the earlier choices
    assert _cli(["broker", "init", "--dir", str(d)]) == 0
    assert (d / "mosquitto.conf").read_text() == conf
    assert _cli(["broker", "list", "--dir", str(d)]) == 0
    assert "dev-a\tf1" in capsys.readouterr().out
    assert _cli(["broker", "remove-device", "dev-a", "--dir", str(d)]) == 0
    assert _cli(["broker", "remove-device", "dev-a", "--dir", str(d)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _cli(["broker", "add-gateway", "gw-1", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    pw = re.search(r"gw-1 password \(shown once\): (\S+)", out)
    assert pw is not None and f"credentials: {d / 'credentials' / 'gw-1.pass'}" in out
    assert (d / "credentials" / "gw-1.pass").read_text() == pw.group(1) + "\n"
    assert _cli(["broker", "list", "--dir", str(d)]) == 0
    assert capsys.readouterr().out == "gw-1\tf1\tgateway\n"
    assert _cli(["broker", "remove-gateway", "gw-1", "--dir", str(d)]) == 0
    assert "removed gw-1" in capsys.readouterr().out
    assert _cli(["broker", "add-service", "w1", "--role", "shard-worker", "--dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert f"credentials: {d / 'credentials' / 'w1.pass'}" in out
    assert service_config("w1", "shard-worker") in out
    assert _cli(["broker", "list", "--dir", str(d)]) == 0
    assert capsys.readouterr().out == "w1\tf1\tshard-worker\nw1-acks\tf1\tshard-worker w1's acks\n"
    assert _cli(["broker", "remove-service", "w1", "--dir", str(d)]) == 0
    assert "removed w1" in capsys.readouterr().out


def _tree_modes(root: Path) -> dict[str, int]:
    out = {".": _mode(root)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = _mode(p)
    return out


def test_init_under_umask_000_leaves_safe_modes(tmp_path: Path) -> None:
    """Modes are set explicitly, never left to the umask (the real command, umask 000)."""
    d = tmp_path / "b"
    old = os.umask(0)
    try:
        done = fedmq_cli("-q", "broker", "init", "--dir", str(d), "--local", "--monitor")
        added = fedmq_cli("-q", "broker", "add-device", "dev-a", "--dir", str(d), "--cert")
    finally:
        os.umask(old)
    assert done.returncode == 0 and added.returncode == 0, done.stderr + added.stderr
    modes = _tree_modes(d)
    assert {k: modes[k] for k in (".", "certs", "data", "private", "credentials", "clients")} \
        == {".": 0o750, "certs": 0o750, "data": 0o700, "private": 0o700,
            "credentials": 0o700, "clients": 0o700}
    for secret in ("passwd", "certs/server.key", "private/ca.key", ".lock",
                   "credentials/aggregator.env", "credentials/monitor.env",
                   "credentials/dev-a.env", "clients/dev-a.key"):
        assert modes[secret] == 0o600, secret
    assert not [k for k, m in modes.items() if m & 0o002], "world-writable"
    assert not [k for k, m in modes.items() if m & 0o004 and k.endswith((".key", ".env"))]


def test_init_gives_the_owner_dir_certs_and_local_data(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("--owner needs root")
    d = tmp_path / "b"
    (d / "data").mkdir(parents=True)
    (d / "data" / "mosquitto.db").write_bytes(b"saved by a broker that ran as root")
    assert fedmq_cli("-q", "broker", "init", "--dir", str(d), "--local",
                     "--owner", "65534:65533").returncode == 0
    for p, want in ((d, (0, 65533)), (d / "certs", (0, 65533)),
                    (d / "data", (65534, 65533)), (d / "data" / "mosquitto.db", (65534, 65533)),
                    (d / "passwd", (65534, 65533)), (d / "certs" / "server.key", (65534, 65533)),
                    (d / "private" / "ca.key", (0, 0))):
        assert (p.stat().st_uid, p.stat().st_gid) == want, p


def test_owner_without_root_is_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may give files away")
    done = fedmq_cli("-q", "broker", "init", "--dir", str(tmp_path / "b"), "--owner", "0:0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "--owner needs root" in done.stderr


def test_max_message_bytes_sets_the_packet_limit(tmp_path: Path) -> None:
    d = tmp_path / "b"
    assert _cli(["broker", "init", "--dir", str(d), "--max-message-bytes", "1048576"]) == 0
    d_conf = dict(_directives((d / "mosquitto.conf").read_text()))
    assert int(d_conf["max_packet_size"]) == 1048576 + PACKET_OVERHEAD
    assert "message_size_limit" not in d_conf
    assert _cli(["broker", "init", "--dir", str(d)]) == 0  # kept on a re-run
    assert json.loads((d / "broker.json").read_text())["settings"]["max_message_bytes"] \
        == 1048576


def test_broker_json_keys_are_checked(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "b"
    init_broker(d, BrokerSettings())
    doc = json.loads((d / "broker.json").read_text())
    del doc["settings"]["max_message_bytes"]
    doc["settings"]["max_packet_size"] = 64 * 1024 * 1024  # written by an older version
    (d / "broker.json").write_text(json.dumps(doc))
    assert load_settings(d).max_message_bytes == 16 * 1024 * 1024
    assert "max_packet_size 67108864 is replaced by max_message_bytes" in caplog.text
    doc["settings"]["max_mesage_bytes"] = 5
    (d / "broker.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) max_mesage_bytes")):
        load_settings(d)
