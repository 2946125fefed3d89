"""``fedmq broker``: the files a production Mosquitto needs (TLS, passwords, ACL, config).

    fedmq broker init --dir DIR [--fleet F ...] [--hostname H ...] [--days N] [--monitor]
    fedmq broker add-device NAME --dir DIR [--fleet F] [--password P | --rotate] [--cert]
    fedmq broker remove-device NAME --dir DIR
    fedmq broker list --dir DIR

Layout of ``DIR`` (see docs/broker.md)::

    mosquitto.conf                 rendered config; paths point under --config-root
    passwd                         Mosquitto password file ($7$ PBKDF2-SHA512)      0600
    acl                            per-user ACL (one block per identity)            0644
    certs/ca.crt                   the fleet CA certificate (give it to every client)
    certs/server.crt, server.key   the broker's certificate and key                 key 0600
    private/ca.key                 CA signing key: NOT for the broker, keep offline 0600
    credentials/NAME.env           FEDMQ_AGENT_MQTT_* / FEDMQ_AGGREGATOR_MQTT_* login 0600
    clients/NAME.crt, NAME.key     optional client certificates (--cert)            key 0600
    broker.json                    settings and the device -> fleet map (no secrets)

Every identity gets an explicit ACL block naming its own topics: Mosquitto's ``pattern``
lines (``%u``) would apply to *every* user, so the read-only ``monitor`` identity could
publish ``fl/<fleet>/update/monitor``. Everything is idempotent: existing keys, the CA and
passwords are kept unless a rotation is asked for; the ACL and the config are re-rendered.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmq.errors import ConfigError
from fedmq.topics import Topics, validate_name

__all__ = [
    "AGGREGATOR_USER",
    "MONITOR_USER",
    "PBKDF2_ITERATIONS",
    "RESERVED_USERS",
    "BrokerLayout",
    "BrokerSettings",
    "InitResult",
    "add_device",
    "add_parser",
    "format_passwd",
    "hash_password",
    "init_broker",
    "issue_client_cert",
    "issue_server_cert",
    "list_devices",
    "load_settings",
    "make_ca",
    "parse_passwd",
    "remove_device",
    "render_acl",
    "render_mosquitto_conf",
    "verify_password",
]

log = logging.getLogger(__name__)

AGGREGATOR_USER = "aggregator"
MONITOR_USER = "monitor"
RESERVED_USERS = frozenset({AGGREGATOR_USER, MONITOR_USER})

# Mosquitto's "$7$" format: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte digest, standard base64.
PBKDF2_ITERATIONS = 20_000
_SALT_BYTES = 12
_STATE_VERSION = 1
_RENEW_BEFORE = dt.timedelta(days=30)
_PRIVATE_DIRS = ("private", "credentials", "clients")


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class BrokerSettings:
    """What the rendered config and ACL depend on (stored in ``DIR/broker.json``)."""

    fleets: tuple[str, ...] = ("default",)
    topic_prefix: str = ""
    hostnames: tuple[str, ...] = ("localhost",)
    tls_port: int = 8883
    # Plaintext listener bound to 127.0.0.1 for health checks (None = no such listener).
    # Same users and ACL as the TLS listener (per_listener_settings false).
    health_port: int | None = 1883
    # Where the broker sees DIR (compose mounts the files under /mosquitto/config).
    config_root: str = "/mosquitto/config"
    data_dir: str = "/mosquitto/data/"
    # Mosquitto started as root drops to this user before it reads the password file.
    run_as: str = "mosquitto"
    monitor: bool = False
    # Client id := username, so no client can take over (kick off) another's session.
    bind_clientid: bool = True
    require_client_cert: bool = False
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 1024 * 1024 * 1024
    max_inflight_messages: int = 100
    max_packet_size: int = 64 * 1024 * 1024
    persistent_client_expiration: str = "14d"
    autosave_interval: int = 60
    days: int = 825
    ca_days: int = 3650

    def __post_init__(self) -> None:
        if not self.fleets:
            raise ConfigError("at least one fleet is needed")
        for f in self.fleets:
            Topics(f, self.topic_prefix)  # validates fleet and prefix
        if len(set(self.fleets)) != len(self.fleets):
            raise ConfigError(f"fleets repeat: {self.fleets}")
        if not self.hostnames:
            raise ConfigError("at least one hostname is needed for the server certificate")
        for h in self.hostnames:
            _san(h)  # validates
        ports = [self.tls_port] + ([self.health_port] if self.health_port is not None else [])
        for p in ports:
            if not 0 < p < 65536:
                raise ConfigError(f"port {p} is out of range")
        if self.health_port == self.tls_port:
            raise ConfigError("the health port must differ from the TLS port")
        for path in (self.config_root, self.data_dir):
            if not path.startswith("/") or any(c in path for c in "\n\r\t "):
                raise ConfigError(f"{path!r} must be an absolute path without whitespace")
        if self.max_queued_messages < 1000:
            raise ConfigError("max_queued_messages below 1000 drops QoS 1 updates (DESIGN.md)")
        if self.max_queued_bytes < 0 or self.max_inflight_messages < 1:
            raise ConfigError("max_queued_bytes must be >= 0 and max_inflight_messages >= 1")
        if not 1024 <= self.max_packet_size <= 268_435_455:
            raise ConfigError("max_packet_size must be in [1024, 268435455] (MQTT's limit)")
        if not self.persistent_client_expiration[:-1].isdigit() or \
                self.persistent_client_expiration[-1] not in "hdwmy":
            raise ConfigError("persistent_client_expiration must look like 14d (h/d/w/m/y)")
        validate_name(self.run_as, "run_as user")
        if self.autosave_interval < 1:
            raise ConfigError("autosave_interval must be at least 1 second")
        if not 1 <= self.days <= self.ca_days:
            raise ConfigError("certificate days must be in [1, ca_days]")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fleets"] = list(self.fleets)
        out["hostnames"] = list(self.hostnames)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerSettings:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in data.items() if k in known}
        for key in ("fleets", "hostnames"):
            if key in kw:
                kw[key] = tuple(kw[key])
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"bad broker settings: {exc}") from exc


@dataclass(frozen=True)
class BrokerLayout:
    """The paths of one broker directory (host side)."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "mosquitto.conf"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def acl(self) -> Path:
        return self.root / "acl"

    @property
    def state(self) -> Path:
        return self.root / "broker.json"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def ca_crt(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def server_crt(self) -> Path:
        return self.certs / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.certs / "server.key"

    @property
    def ca_key(self) -> Path:
        return self.root / "private" / "ca.key"

    def credentials(self, name: str) -> Path:
        return self.root / "credentials" / f"{name}.env"

    def client_crt(self, name: str) -> Path:
        return self.root / "clients" / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.root / "clients" / f"{name}.key"


@dataclass
class _State:
    settings: BrokerSettings
    devices: dict[str, str] = field(default_factory=dict)  # device -> fleet


# ---------------------------------------------------------------------------- rendering


def render_mosquitto_conf(s: BrokerSettings) -> str:
    """The production ``mosquitto.conf`` (Mosquitto 2.0) for settings ``s``."""
    root = s.config_root.rstrip("/") or ""
    data = s.data_dir if s.data_dir.endswith("/") else s.data_dir + "/"
    lines = [
        "# fedmq production broker (Mosquitto 2.0). Rendered by `fedmq broker init`;",
        "# re-run it instead of editing. Why each limit is what it is: docs/broker.md.",
        "",
        "# One set of users and ACLs for every listener; nobody gets in without a password.",
        "per_listener_settings false",
        "allow_anonymous false",
        "# Started as root, the broker switches to this user before reading the files below.",
        f"user {s.run_as}",
        f"password_file {root}/passwd",
        f"acl_file {root}/acl",
    ]
    # use_username_as_clientid is a listener option in 2.0 (even with per_listener_settings
    # false): given before the first listener it silently opens a default listener on 1883.
    bind = ["use_username_as_clientid true"] if s.bind_clientid else []
    bind_doc = [
        "# Client id := username: nobody can take over (and disconnect) another's",
        "# session by reusing its client id.",
    ]
    lines += [
        "# Retained messages are re-checked against the publisher's current ACL on delivery,",
        "# so a removed device's retained status is no longer served.",
        "check_retain_source true",
        "",
        "# MQTT over TLS (1.2 or newer) for devices, the aggregator and operators.",
        f"listener {s.tls_port}",
        "protocol mqtt",
        f"cafile {root}/certs/ca.crt",
        f"certfile {root}/certs/server.crt",
        f"keyfile {root}/certs/server.key",
        "tls_version tlsv1.2",
        f"require_certificate {'true' if s.require_client_cert else 'false'}",
        "use_identity_as_username false",
        *([*bind_doc, *bind] if bind else []),
    ]
    if s.health_port is not None:
        lines += [
            "",
            "# Plaintext on the loopback interface only, for local health checks.",
            f"listener {s.health_port} 127.0.0.1",
            "protocol mqtt",
            *bind,
        ]
    lines += [
        "",
        "# Persistent sessions and queued QoS 1 messages survive a broker restart.",
        "persistence true",
        f"persistence_location {data}",
        f"autosave_interval {s.autosave_interval}",
        "# Sessions of clients that never come back (v3.1.1, or v5 without an expiry).",
        f"persistent_client_expiration {s.persistent_client_expiration}",
        "",
        "# The default of 1000 queued messages silently drops QoS 1 updates for a slow or",
        "# offline aggregator; the byte cap keeps a backlog from exhausting memory.",
        f"max_queued_messages {s.max_queued_messages}",
        f"max_queued_bytes {s.max_queued_bytes}",
        f"max_inflight_messages {s.max_inflight_messages}",
        "max_inflight_bytes 0",
        "# Largest MQTT packet accepted; bigger models are sent as chunks.",
        f"max_packet_size {s.max_packet_size}",
        "",
        "# stderr, not stdout: stdout is block-buffered when it is not a terminal, so",
        "# lines would reach `docker logs` / journald late or be lost on a crash.",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    return "\n".join(lines) + "\n"


def render_acl(s: BrokerSettings, devices: Mapping[str, str]) -> str:
    """One ``user`` block per identity; nothing for anonymous clients; no patterns."""
    lines = [
        "# fedmq broker ACL. Rendered by `fedmq broker`; re-run it instead of editing.",
        "# Mosquitto denies everything not granted here. No `topic` lines come before the",
        "# first `user` (those would apply to anonymous clients) and there are no `pattern`",
        "# lines (those would apply to every user, the monitor and the aggregator included).",
        "",
        f"user {AGGREGATOR_USER}",
    ]
    for fleet in s.fleets:
        t = Topics(fleet, s.topic_prefix)
        lines += [
            f"topic read {t.update_wildcard}",
            f"topic read {t.status_wildcard}",
            f"topic readwrite {t.model}",
            f"topic readwrite {t.round}",
            f"topic write {t.base}/ack/+",
        ]
    if s.monitor:
        lines += ["", f"user {MONITOR_USER}"]
        for fleet in s.fleets:
            t = Topics(fleet, s.topic_prefix)
            lines += [
                f"topic read {t.status_wildcard}",
                f"topic read {t.model}",
                f"topic read {t.round}",
            ]
        lines.append("topic read $SYS/#")
    for name in sorted(devices):
        fleet = devices[name]
        if fleet not in s.fleets:
            raise ConfigError(f"device {name} belongs to fleet {fleet!r}, not in {s.fleets}")
        t = Topics(fleet, s.topic_prefix)
        lines += [
            "",
            f"user {name}",
            f"topic write {t.update(name)}",
            f"topic write {t.status(name)}",
            f"topic read {t.model}",
            f"topic read {t.round}",
            f"topic read {t.ack(name)}",
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- passwords


def hash_password(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2.0's ``$7$`` hash (what ``mosquitto_passwd`` writes by default).

    Done in Python rather than with ``mosquitto_passwd -b``, which would put the password on
    a command line where every local user can read it (``/proc/PID/cmdline``).
    """
    if not password:
        raise ConfigError("empty password")
    if "\n" in password or "\r" in password:
        raise ConfigError("a password cannot contain a line break")
    if iterations < 1:
        raise ConfigError("iterations must be positive")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(encoded: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` (or ``$6$``) hash of a password file."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except ValueError:
        return False
    return False


def parse_passwd(text: str) -> dict[str, str]:
    """``username -> hash`` of a Mosquitto password file (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ConfigError(f"password file line {n} is not `user:hash`")
        out[user] = hashed
    return out


def format_passwd(entries: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


def _new_password() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------------- certificates


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.split(".")
    if not name or len(name) > 253 or not all(
        label and len(label) <= 63 and label.replace("-", "").replace("*", "").isalnum()
        for label in labels
    ):
        raise ConfigError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    # ECDSA P-256: accepted by every OpenSSL that Mosquitto and paho link against.
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(
    common_name: str = "fedmq fleet CA", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def _server_names(hostnames: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys([*hostnames, "localhost", "127.0.0.1", "::1"]))
    return names


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    days: int = 825,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The broker's certificate: SANs = ``hostnames`` + localhost, 127.0.0.1 and ::1."""
    names = _server_names(hostnames)
    return _leaf(ca_key, ca_cert, names[0], days, ExtendedKeyUsageOID.SERVER_AUTH,
                 [_san(n) for n in names])


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, name: str, days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A client certificate with CN = the MQTT username."""
    return _leaf(ca_key, ca_cert, name, days, ExtendedKeyUsageOID.CLIENT_AUTH)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an EC private key")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate: {exc}") from exc


def _server_cert_ok(cert: x509.Certificate, ca_cert: x509.Certificate,
                    hostnames: Sequence[str]) -> bool:
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == {_san(n) for n in _server_names(hostnames)}


# ---------------------------------------------------------------------------- files


def _write(path: Path, data: bytes | str, mode: int, owner: tuple[int, int] | None = None,
           keep_group_read: bool = False) -> None:
    """Write in place (same inode, so single-file bind mounts see it) with ``mode``.

    The file is created with ``mode`` already set, so a secret is never readable by others,
    not even for a moment; an existing file gets ``mode`` before its new content.
    ``keep_group_read`` keeps a group-read bit already there (never world access).
    """
    raw = data.encode() if isinstance(data, str) else data
    if keep_group_read and path.exists():
        # an operator's `chgrp 1883 && chmod 0640` (broker's group) survives rewrites
        mode |= stat.S_IMODE(path.stat().st_mode) & stat.S_IRGRP
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
        if path.parent.name in _PRIVATE_DIRS:
            os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.ftruncate(fd, 0)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_if_changed(path: Path, data: str, mode: int,
                      owner: tuple[int, int] | None = None) -> bool:
    if path.exists() and path.read_text() == data:
        os.chmod(path, mode)
        return False
    _write(path, data, mode, owner)
    return True


@contextlib.contextmanager
def _locked(root: Path, create: bool = False) -> Iterator[None]:
    """One ``fedmq broker`` command at a time per directory."""
    if create:
        root.mkdir(parents=True, exist_ok=True)
    elif not (root / "broker.json").exists():
        raise ConfigError(f"{root} is not a broker directory: run `fedmq broker init` "
                          "(no broker.json)")
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_state(layout: BrokerLayout) -> _State:
    if not layout.state.exists():
        raise ConfigError(f"{layout.root} is not a broker directory: run `fedmq broker init` "
                          f"(no {layout.state.name})")
    try:
        data = json.loads(layout.state.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {layout.state}: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise ConfigError(f"{layout.state} has an unknown format")
    settings = BrokerSettings.from_json(data.get("settings", {}))
    devices = {str(k): str(v) for k, v in dict(data.get("devices", {})).items()}
    return _State(settings, devices)


def load_settings(root: Path) -> BrokerSettings:
    return _load_state(BrokerLayout(Path(root))).settings


def _save_state(layout: BrokerLayout, state: _State) -> None:
    doc = {"version": _STATE_VERSION, "settings": state.settings.to_json(),
           "devices": dict(sorted(state.devices.items()))}
    _write_if_changed(layout.state, json.dumps(doc, indent=2) + "\n", 0o644)


def _read_passwd(layout: BrokerLayout) -> dict[str, str]:
    return parse_passwd(layout.passwd.read_text()) if layout.passwd.exists() else {}


def _credentials_text(state: _State, name: str, password: str) -> str:
    """Only the identity: host, port and fleet stay in the TOML config, which the
    environment would override (a compose aggregator dials ``mosquitto``, not the DNS name)."""
    s = state.settings
    extra: list[str] = []
    if name == AGGREGATOR_USER:
        prefix, fleets = "FEDMQ_AGGREGATOR_MQTT_", ", ".join(s.fleets)
    elif name == MONITOR_USER:
        prefix, fleets = "FEDMQ_MONITOR_", ", ".join(s.fleets)
    else:
        prefix, fleets = "FEDMQ_AGENT_MQTT_", state.devices[name]
        extra.append(f"FEDMQ_AGENT_DEVICE_ID={name}")
    lines = [
        f"# MQTT login of {name!r} (fleet {fleets}) for the fedmq broker:",
        f"# TLS port {s.tls_port}, server names {', '.join(s.hostnames)}, CA certs/ca.crt.",
        "# Secret: deliver it, then delete this file. Works as a compose env_file or a",
        "# systemd EnvironmentFile.",
        *extra,
        f"{prefix}USERNAME={name}",
        f"{prefix}PASSWORD={password}",
    ]
    return "\n".join(lines) + "\n"


def _render_all(layout: BrokerLayout, state: _State, passwd: dict[str, str],
                owner: tuple[int, int] | None) -> None:
    _write(layout.passwd, format_passwd(passwd), 0o600, owner, keep_group_read=True)
    _write_if_changed(layout.acl, render_acl(state.settings, state.devices), 0o644)
    _write_if_changed(layout.conf, render_mosquitto_conf(state.settings), 0o644)
    _save_state(layout, state)


def _set_password(layout: BrokerLayout, state: _State, passwd: dict[str, str], name: str,
                  password: str | None, save: bool) -> str:
    password = password if password is not None else _new_password()
    passwd[name] = hash_password(password)
    cred = layout.credentials(name)
    if save:
        _write(cred, _credentials_text(state, name, password), 0o600)
    elif cred.exists():
        cred.unlink()  # it would hold the old password
    return password


# ---------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class InitResult:
    written: tuple[str, ...]  # files created or rewritten
    passwords: Mapping[str, str]  # identities given a new password by this run


def init_broker(
    root: Path,
    settings: BrokerSettings,
    renew_server_cert: bool = False,
    owner: tuple[int, int] | None = None,
) -> InitResult:
    """Create what is missing in ``root``; keep the CA, keys and passwords already there.

    ``owner`` (uid, gid) is given to the files the broker process reads that are secret
    (server.key, passwd): 1883:1883 for the eclipse-mosquitto image.
    """
    layout = BrokerLayout(Path(root))
    created: list[str] = []
    passwords: dict[str, str] = {}
    with _locked(layout.root, create=True):
        devices: dict[str, str] = {}
        if layout.state.exists():
            devices = _load_state(layout).devices
            orphans = {d: f for d, f in devices.items() if f not in settings.fleets}
            if orphans:
                raise ConfigError(
                    f"devices {sorted(orphans)} belong to fleets not in {settings.fleets}; "
                    "remove them first or keep their fleets"
                )
        state = _State(settings, devices)

        if layout.ca_key.exists() != layout.ca_crt.exists():
            raise ConfigError(
                f"only one of {layout.ca_key} and {layout.ca_crt} exists; restore the other "
                "or delete both to make a new CA (every client then needs the new ca.crt)"
            )
        if layout.ca_key.exists():
            ca_key, ca_cert = _load_key(layout.ca_key), _load_cert(layout.ca_crt)
        else:
            ca_key, ca_cert = make_ca(days=settings.ca_days)
            _write(layout.ca_key, _key_pem(ca_key), 0o600)
            _write(layout.ca_crt, _cert_pem(ca_cert), 0o644)
            created += [str(layout.ca_key), str(layout.ca_crt)]

        keep = (
            not renew_server_cert
            and layout.server_crt.exists()
            and layout.server_key.exists()
            and _server_cert_ok(_load_cert(layout.server_crt), ca_cert, settings.hostnames)
        )
        if not keep:
            key, cert = issue_server_cert(ca_key, ca_cert, settings.hostnames, settings.days)
            _write(layout.server_key, _key_pem(key), 0o600, owner, keep_group_read=True)
            _write(layout.server_crt, _cert_pem(cert), 0o644)
            created += [str(layout.server_crt), str(layout.server_key)]
        elif owner is not None:
            os.chown(layout.server_key, *owner)

        passwd = _read_passwd(layout)
        wanted = {AGGREGATOR_USER} | ({MONITOR_USER} if settings.monitor else set())
        for ident in sorted(wanted):
            if ident not in passwd:
                passwords[ident] = _set_password(layout, state, passwd, ident, None, True)
                created.append(str(layout.credentials(ident)))
        if not settings.monitor and MONITOR_USER in passwd:
            del passwd[MONITOR_USER]
            layout.credentials(MONITOR_USER).unlink(missing_ok=True)
        stale = set(passwd) - wanted - set(devices)
        if stale:
            log.warning("password file users without an ACL block (they can connect but "
                        "do nothing): %s", ", ".join(sorted(stale)))
        _render_all(layout, state, passwd, owner)
        created += [str(p) for p in (layout.passwd, layout.acl, layout.conf)]
    log.info("broker files in %s", layout.root)
    return InitResult(tuple(dict.fromkeys(created)), passwords)


def add_device(
    root: Path,
    name: str,
    fleet: str | None = None,
    password: str | None = None,
    rotate: bool = False,
    client_cert: bool = False,
    save_credentials: bool = True,
    owner: tuple[int, int] | None = None,
) -> str | None:
    """Add (or update) device ``name``; returns its new password, or None if unchanged.

    Re-adding an existing device changes nothing unless ``password`` or ``rotate`` is given;
    ``client_cert`` issues a client certificate when the device has none.
    """
    validate_name(name, "device")
    if name in RESERVED_USERS:
        raise ConfigError(f"{name!r} is reserved for the {name} identity")
    if password is not None and rotate:
        raise ConfigError("give either a password or rotate, not both")
    layout = BrokerLayout(Path(root))
    with _locked(layout.root):
        state = _load_state(layout)
        fleet = fleet or state.devices.get(name) or state.settings.fleets[0]
        if fleet not in state.settings.fleets:
            raise ConfigError(f"fleet {fleet!r} is not served by this broker "
                              f"({', '.join(state.settings.fleets)}); see `init --fleet`")
        known = state.devices.get(name)
        if known is not None and known != fleet:
            raise ConfigError(f"device {name} already belongs to fleet {known!r}; "
                              "remove it first to move it")
        passwd = _read_passwd(layout)
        state.devices[name] = fleet
        new: str | None = None
        if name not in passwd or password is not None or rotate:
            new = _set_password(layout, state, passwd, name, password, save_credentials)
            log.info("%s device %s (fleet %s)",
                     "added" if known is None else "new password for", name, fleet)
        else:
            log.info("device %s exists (fleet %s); password unchanged (use --rotate)",
                     name, fleet)
        if client_cert and not layout.client_crt(name).exists():
            ca_key, ca_cert = _load_key(layout.ca_key), _load_cert(layout.ca_crt)
            key, cert = issue_client_cert(ca_key, ca_cert, name, state.settings.days)
            _write(layout.client_key(name), _key_pem(key), 0o600)
            _write(layout.client_crt(name), _cert_pem(cert), 0o644)
            log.info("client certificate %s", layout.client_crt(name))
        _render_all(layout, state, passwd, owner)
    return new


def remove_device(root: Path, name: str, owner: tuple[int, int] | None = None) -> bool:
    """Remove ``name``'s password, ACL block, credentials and client certificate.

    Returns False when there was nothing to remove. The broker applies it on SIGHUP.
    """
    validate_name(name, "device")
    if name in RESERVED_USERS:
        raise ConfigError(f"{name!r} is not a device")
    layout = BrokerLayout(Path(root))
    with _locked(layout.root):
        state = _load_state(layout)
        passwd = _read_passwd(layout)
        found = state.devices.pop(name, None) is not None
        found = passwd.pop(name, None) is not None or found
        for p in (layout.credentials(name), layout.client_crt(name), layout.client_key(name)):
            if p.exists():
                p.unlink()
                found = True
        _render_all(layout, state, passwd, owner)
    return found


def list_devices(root: Path) -> dict[str, str]:
    return dict(sorted(_load_state(BrokerLayout(Path(root))).devices.items()))


# ---------------------------------------------------------------------------- CLI


_RELOAD_HINT = ("reload the broker to apply: `kill -HUP $(pidof mosquitto)` or "
                "`docker compose kill -s HUP mosquitto`")


def _owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    uid, _, gid = value.partition(":")
    try:
        return int(uid), int(gid or uid)
    except ValueError as exc:
        raise ConfigError(f"--owner must be UID[:GID] in numbers, got {value!r}") from exc


def _cmd_init(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    base = BrokerSettings()
    if (root / "broker.json").exists():
        base = load_settings(root)  # keep earlier choices unless flags override them
    changes: dict[str, Any] = {}
    for key in ("fleet", "hostname"):
        value = getattr(args, key)
        if value:
            changes[f"{key}s"] = tuple(dict.fromkeys(value))
    for key in ("topic_prefix", "tls_port", "config_root", "data_dir", "days", "bind_clientid",
                "max_queued_messages", "max_queued_bytes", "max_packet_size", "monitor",
                "require_client_cert"):
        value = getattr(args, key)
        if value is not None:
            changes[key] = value
    if args.health_port is not None:
        changes["health_port"] = args.health_port or None
    if args.local:
        if args.config_root or args.data_dir:
            raise ConfigError("--local sets the paths itself: drop --config-root/--data-dir")
        changes["config_root"] = str(root.resolve())
        changes["data_dir"] = str((root / "data").resolve()) + "/"
        (root / "data").mkdir(parents=True, exist_ok=True)
    settings = replace(base, **changes)
    result = init_broker(root, settings, renew_server_cert=args.renew_server_cert,
                         owner=_owner(args.owner))
    layout = BrokerLayout(root)
    print(f"broker directory {root}: config {layout.conf}, CA {layout.ca_crt}")
    for ident in result.passwords:
        print(f"new password for {ident!r} saved in {layout.credentials(ident)} (mode 0600)")
    if not result.passwords:
        print("existing CA, keys and passwords kept; ACL and config re-rendered")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    password = args.password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    new = add_device(Path(args.dir), args.name, fleet=args.fleet, password=password,
                     rotate=args.rotate, client_cert=args.cert,
                     save_credentials=not args.no_save, owner=_owner(args.owner))
    layout = BrokerLayout(Path(args.dir))
    if new is None:
        print(f"{args.name} exists; password unchanged (use --rotate for a new one)")
    elif args.password is None and not args.password_stdin:
        print(f"{args.name} password (shown once): {new}")
    else:
        print(f"{args.name} password set")
    if new is not None and not args.no_save:
        print(f"credentials: {layout.credentials(args.name)} (mode 0600)")
    if layout.client_crt(args.name).exists():
        print(f"client certificate: {layout.client_crt(args.name)}, "
              f"key {layout.client_key(args.name)}")
    print(_RELOAD_HINT)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    if remove_device(Path(args.dir), args.name, owner=_owner(args.owner)):
        print(f"removed {args.name}; {_RELOAD_HINT}")
    else:
        print(f"{args.name} was not a device of {args.dir}; nothing to do")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    for name, fleet in list_devices(Path(args.dir)).items():
        print(f"{name}\t{fleet}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``fedmq broker {init,add-device,remove-device,list}``."""
    p = subparsers.add_parser(
        "broker", help="create and manage the production Mosquitto files (TLS, ACL, users)",
        description="Create a CA, the broker's TLS certificate, a password file, a per-user "
        "ACL and mosquitto.conf in one directory, and add or remove devices. "
        "See docs/broker.md.",
    )
    sub = p.add_subparsers(dest="broker_command", metavar="ACTION", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--dir", required=True, type=Path, help="the broker directory")
        sp.add_argument("--owner", metavar="UID[:GID]",
                        help="owner of server.key and passwd (1883:1883 for the "
                        "eclipse-mosquitto image; needs root)")

    i = sub.add_parser("init", help="create the CA, certificates, users, ACL and config",
                       description="Idempotent: keeps the CA, keys and passwords that exist, "
                       "re-renders the ACL and mosquitto.conf.")
    common(i)
    i.add_argument("--fleet", action="append", help="fleet served (repeatable; default "
                   "'default')")
    i.add_argument("--hostname", action="append", help="DNS name or IP of the broker for the "
                   "certificate (repeatable; localhost and 127.0.0.1 are always included)")
    i.add_argument("--days", type=int, help="validity of server and client certificates "
                   "(default 825)")
    i.add_argument("--tls-port", type=int, help="TLS listener port (default 8883)")
    i.add_argument("--health-port", type=int, help="plaintext 127.0.0.1 listener port "
                   "(default 1883; 0 = none)")
    i.add_argument("--topic-prefix", help="topic prefix before fl/ (default none)")
    i.add_argument("--config-root", help="where the broker sees DIR (default "
                   "/mosquitto/config, the compose mount)")
    i.add_argument("--data-dir", help="persistence directory (default /mosquitto/data/)")
    i.add_argument("--local", action="store_true", help="render paths for running mosquitto "
                   "on this host from DIR (config root = DIR, data = DIR/data)")
    i.add_argument("--monitor", action=argparse.BooleanOptionalAction, default=None,
                   help="a read-only 'monitor' user (status, model, round, $SYS)")
    i.add_argument("--require-client-cert", action=argparse.BooleanOptionalAction,
                   default=None, help="require a CA-signed client certificate in addition "
                   "to the password")
    i.add_argument("--bind-clientid", action=argparse.BooleanOptionalAction, default=None,
                   help="client id := username (default on): one connection per identity, "
                   "no session takeover by another user")
    i.add_argument("--max-queued-messages", type=int, help="per-client queue (default 100000)")
    i.add_argument("--max-queued-bytes", type=int, help="per-client queue bytes (default 1 GiB; "
                   "0 = unlimited)")
    i.add_argument("--max-packet-size", type=int, help="largest packet (default 64 MiB)")
    i.add_argument("--renew-server-cert", action="store_true",
                   help="issue a new server certificate even if the current one is fine")
    i.set_defaults(func=_cmd_init)

    a = sub.add_parser("add-device", help="add a device (prints its password once)",
                       description="Add a device user with its ACL block. Idempotent: an "
                       "existing device keeps its password unless --password or --rotate.")
    a.add_argument("name", help="device id = MQTT username")
    common(a)
    a.add_argument("--fleet", help="its fleet (default: the first fleet of the broker)")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--password", help="use this password (visible in the process list; "
                   "prefer --password-stdin)")
    g.add_argument("--password-stdin", action="store_true", help="read the password from "
                   "the first line of stdin")
    g.add_argument("--rotate", action="store_true", help="give an existing device a new "
                   "random password")
    a.add_argument("--cert", action="store_true", help="also issue a client certificate")
    a.add_argument("--no-save", action="store_true", help="do not write "
                   "credentials/NAME.env (print the password only)")
    a.set_defaults(func=_cmd_add)

    r = sub.add_parser("remove-device", help="remove a device (password, ACL, certificate)")
    r.add_argument("name", help="device id")
    common(r)
    r.set_defaults(func=_cmd_remove)

    ls = sub.add_parser("list", help="list the devices and their fleets")
    ls.add_argument("--dir", required=True, type=Path, help="the broker directory")
    ls.set_defaults(func=_cmd_list)
