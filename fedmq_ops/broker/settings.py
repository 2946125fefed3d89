"""What a broker directory is configured with (``broker.json``) and where its files are."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq.topics import Topics, validate_name
from fedmq_ops.broker.certs import subject_alt_name

__all__ = [
    "AGGREGATOR_USER",
    "DECRYPTOR_USER",
    "MONITOR_USER",
    "PACKET_OVERHEAD",
    "RESERVED_USERS",
    "SERVICE_ROLES",
    "SHARD_WORKER",
    "BrokerLayout",
    "BrokerSettings",
    "BrokerState",
    "ack_login",
]

AGGREGATOR_USER = "aggregator"
MONITOR_USER = "monitor"
# Homomorphic aggregation's key holder (`fedmq he decrypt`): reads the encrypted sum,
# the only identity that may write the decrypted mean.
DECRYPTOR_USER = "decryptor"
RESERVED_USERS = frozenset({AGGREGATOR_USER, MONITOR_USER, DECRYPTOR_USER})
# The sharded ingest's processes (docs/scaling.md, "Sharded ingest"), one login each
# (`fedmq broker add-service NAME --role ROLE`): with the client id bound to the login, the
# processes cannot share the `aggregator` one.
SHARD_WORKER = "shard-worker"
SERVICE_ROLES = (SHARD_WORKER, "shard-coordinator", "partial-receiver")


def ack_login(worker: str) -> str:
    """The companion login of shard worker ``worker``'s ack connection (``[shard]
    ack_username``): same password, created and removed with it."""
    return f"{worker}-acks"
# Room for the fixed header, the topic and the MQTT v5 properties around a payload.
PACKET_OVERHEAD = 4096
_MQTT_MAX_PACKET = 268_435_455

log = logging.getLogger(__name__)


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
    decryptor: bool = False
    # Client id := username, so no client can take over (kick off) another's session.
    bind_clientid: bool = True
    require_client_cert: bool = False
    max_queued_messages: int = 100_000
    max_queued_bytes: int = 1024 * 1024 * 1024
    max_inflight_messages: int = 100
    # Largest payload any client may publish: the float32 model (or update) plus a margin.
    # It also bounds what one device can park as retained messages on its own topics.
    max_message_bytes: int = 16 * 1024 * 1024
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
            subject_alt_name(h)  # validates
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
            raise ConfigError("max_queued_messages below 1000 drops QoS 1 updates (docs/facts.md)")
        if self.max_queued_bytes < 0 or self.max_inflight_messages < 1:
            raise ConfigError("max_queued_bytes must be >= 0 and max_inflight_messages >= 1")
        if not 1024 <= self.max_message_bytes <= _MQTT_MAX_PACKET - PACKET_OVERHEAD:
            raise ConfigError(f"max_message_bytes must be in [1024, "
                              f"{_MQTT_MAX_PACKET - PACKET_OVERHEAD}] (MQTT's limit)")
        if not self.persistent_client_expiration[:-1].isdigit() or \
                self.persistent_client_expiration[-1] not in "hdwmy":
            raise ConfigError("persistent_client_expiration must look like 14d (h/d/w/m/y)")
        validate_name(self.run_as, "run_as user")
        if self.autosave_interval < 1:
            raise ConfigError("autosave_interval must be at least 1 second")
        if not 1 <= self.days <= self.ca_days:
            raise ConfigError("certificate days must be in [1, ca_days]")

    @property
    def max_packet_size(self) -> int:
        """Mosquitto's ``max_packet_size``: the largest message plus its MQTT framing."""
        return self.max_message_bytes + PACKET_OVERHEAD

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fleets"] = list(self.fleets)
        out["hostnames"] = list(self.hostnames)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BrokerSettings:
        known = {f for f in cls.__dataclass_fields__}
        kw = dict(data)
        if "max_packet_size" in kw:
            # Before max_message_bytes; the new default (16 MiB) is far below the old 64 MiB.
            old = kw.pop("max_packet_size")
            log.warning("broker.json: max_packet_size %s is replaced by max_message_bytes "
                        "(now %s); set it with --max-message-bytes", old,
                        kw.get("max_message_bytes", cls.max_message_bytes))
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(f"bad broker settings: unknown key(s) {', '.join(unknown)}")
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
    def data(self) -> Path:
        """The persistence directory of a ``--local`` broker (unused for containers)."""
        return self.root / "data"

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

    def gateway_password(self, name: str) -> Path:
        """The password alone of a gateway bridge (``gateway-conf --remote-password-file``)
        or of a service login (``add-service``)."""
        return self.root / "credentials" / f"{name}.pass"

    def client_crt(self, name: str) -> Path:
        return self.root / "clients" / f"{name}.crt"

    def client_key(self, name: str) -> Path:
        return self.root / "clients" / f"{name}.key"


@dataclass
class BrokerState:
    """The contents of ``broker.json``: settings, the device -> fleet, site gateway -> fleet
    and service role -> (service -> fleet) maps (one namespace of MQTT users: a name is a
    device, a gateway or a service, and a shard worker's :func:`ack_login` is taken too)."""

    settings: BrokerSettings
    devices: dict[str, str] = field(default_factory=dict)  # device -> fleet
    gateways: dict[str, str] = field(default_factory=dict)  # gateway (bridge login) -> fleet
    services: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> name -> fleet

    def ack_logins(self) -> dict[str, str]:
        """The shard workers' companion ack logins -> their worker."""
        return {ack_login(w): w for w in self.services.get(SHARD_WORKER, {})}

    def logins(self) -> dict[str, str]:
        """Every enrolled login (its ACL block's) -> its fleet."""
        out = {**self.devices, **self.gateways}
        for users in self.services.values():
            out.update(users)
        workers = self.services.get(SHARD_WORKER, {})
        out.update({ack: workers[w] for ack, w in self.ack_logins().items()})
        return out
