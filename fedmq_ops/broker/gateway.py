"""A site gateway's ``mosquitto.conf``: the site broker and its bridge to the cloud broker.

Rendered by ``fedmq broker gateway-conf`` (docs/scaling.md, "Site gateways"). What the bridge
carries, and nothing else:

- ``out``, QoS 1: ``fl/<fleet>/gateway/<gw>/partial``, the site aggregator's one signed
  partial per round. Device updates and acks stay on the site broker.
- ``in``, QoS 1: ``fl/<fleet>/gateway/<gw>/ack``, the cloud's answer to the partial,
  ``fl/<fleet>/round`` and the model's topics a device reads (``model``, its chunks, the
  compressed downlink's snapshot and deltas and their chunks: retained, so devices joining
  at the site get them).

:func:`bridge_topics` is the one list: the cloud broker's ACL for the gateway's bridge login
(``fedmq broker add-gateway``, :mod:`fedmq_ops.broker.acl`) grants exactly these topics.

So a cloud outage loses nothing: the bridge session is persistent on both ends (``cleansession
false``, ``local_cleansession false``, fixed client ids), the site broker queues the partials
for the bridge (one per round of outage, plus one re-send per bridge reconnection) and the
queue limit is far above that: ``max_queued_messages`` must be at least twice the larger of
the site's devices (the site aggregator's own session queues at most one update per device
per round while it is down) and the rounds an outage may last; ``max_queued_bytes 0`` (a byte
cap would drop a partial silently; the queue's memory is the partials', listed in
docs/scaling.md). Persistence keeps the queues across a site broker restart; a crash loses
at most ``autosave_interval`` seconds of them, which the site aggregator's journal and the
devices' outboxes re-send.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.chunks import chunk_wildcard
from fedmq.downlink import downlink_topics
from fedmq.errors import ConfigError
from fedmq.topics import Topics, validate_name
from fedmq_ops.broker.conf import LOG_LINES
from fedmq_ops.broker.settings import PACKET_OVERHEAD

__all__ = ["BridgeTopics", "GatewayBrokerSettings", "bridge_topics", "render_gateway_conf"]


@dataclass(frozen=True)
class BridgeTopics:
    """What a gateway's bridge carries: ``out`` to the cloud, ``in`` from it (QoS 1)."""

    out: tuple[str, ...]
    into: tuple[str, ...]


def bridge_topics(topics: Topics, gateway: str) -> BridgeTopics:
    """The topics of gateway ``gateway``'s bridge: its partial up; its answer, the round and
    the model (with its chunks, snapshot and deltas) down. Device updates never leave."""
    return BridgeTopics(
        out=(topics.gateway_partial(gateway),),
        into=(topics.gateway_ack(gateway), topics.round, topics.model,
              chunk_wildcard(topics.model), *downlink_topics(topics)),
    )


def _no_space(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\t #"):
        raise ConfigError(f"{what} {value!r} must not hold whitespace or '#'")
    return value


@dataclass(frozen=True)
class GatewayBrokerSettings:
    """What a site broker's config depends on."""

    fleet: str
    gateway: str
    cloud_host: str
    cloud_port: int = 8883
    topic_prefix: str = ""
    # The site listener (devices and the site aggregator).
    listen_port: int = 1883
    listen_address: str = ""
    # Site users: a Mosquitto password file (and ACL); empty = anonymous (a closed site LAN).
    password_file: str = ""
    acl_file: str = ""
    data_dir: str = "/var/lib/mosquitto/"
    run_as: str = "mosquitto"
    # The queue budget: devices at the site, rounds a cloud outage may last.
    site_devices: int = 1000
    outage_rounds: int = 1000
    max_queued_messages: int = 100_000
    max_message_bytes: int = 16 * 1024 * 1024
    autosave_interval: int = 60
    # The bridge: TLS and the gateway's login at the cloud broker.
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    remote_username: str = ""
    remote_password: str = ""
    restart_base: int = 5
    restart_cap: int = 30
    keepalive: int = 60

    def __post_init__(self) -> None:
        Topics(self.fleet, self.topic_prefix)
        validate_name(self.gateway, "gateway")
        validate_name(self.run_as, "run_as user")
        _no_space(self.cloud_host, "cloud host")
        if not self.cloud_host:
            raise ConfigError("the cloud broker's host is needed")
        for port in (self.cloud_port, self.listen_port):
            if not 0 < port < 65536:
                raise ConfigError(f"port {port} is out of range")
        for what in ("listen_address", "password_file", "acl_file", "cafile", "certfile",
                     "keyfile", "remote_username", "remote_password"):
            _no_space(getattr(self, what), what)
        for what in ("data_dir", "password_file", "acl_file", "cafile", "certfile", "keyfile"):
            value = getattr(self, what)
            if value and not value.startswith("/"):
                raise ConfigError(f"{what} {value!r} must be an absolute path")
        if bool(self.certfile) != bool(self.keyfile) or (self.certfile and not self.cafile):
            raise ConfigError("certfile and keyfile go together, and need cafile")
        if self.remote_password and not self.remote_username:
            raise ConfigError("remote_password needs remote_username")
        if self.site_devices < 1 or self.outage_rounds < 1:
            raise ConfigError("site_devices and outage_rounds must be >= 1")
        need = max(1000, 2 * max(self.site_devices, self.outage_rounds))
        if self.max_queued_messages < need:
            raise ConfigError(
                f"max_queued_messages {self.max_queued_messages} is below {need} (twice the "
                f"larger of {self.site_devices} site devices and {self.outage_rounds} outage "
                "rounds): a long cloud outage or a down site aggregator would drop QoS 1 "
                "messages silently"
            )
        if self.autosave_interval < 1 or self.keepalive < 5:
            raise ConfigError("autosave_interval must be >= 1 and keepalive >= 5")
        if not 1 <= self.restart_base <= self.restart_cap:
            raise ConfigError("restart_base must be in [1, restart_cap]")
        if self.max_message_bytes < 1024:
            raise ConfigError("max_message_bytes must be at least 1024")

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet, self.topic_prefix)

    @property
    def notification_topic(self) -> str:
        """Where the site broker says whether the bridge is up ("1") or down ("0")."""
        return self.topics.gateway_bridge(self.gateway)


def render_gateway_conf(s: GatewayBrokerSettings) -> str:
    """The site broker's ``mosquitto.conf`` (Mosquitto 2.0) with its bridge to the cloud."""
    bridged = bridge_topics(s.topics, s.gateway)
    data = s.data_dir if s.data_dir.endswith("/") else s.data_dir + "/"
    listen = f"listener {s.listen_port}" + (f" {s.listen_address}" if s.listen_address else "")
    lines = [
        "# fedmq site gateway broker (Mosquitto 2.0), bridged to the cloud broker.",
        "# Rendered by `fedmq broker gateway-conf`; re-run it instead of editing.",
        "# Why each setting is what it is: docs/scaling.md, \"Site gateways\".",
        "",
        f"user {s.run_as}",
        "per_listener_settings false",
    ]
    if s.password_file:
        lines += ["allow_anonymous false", f"password_file {s.password_file}"]
        if s.acl_file:
            lines.append(f"acl_file {s.acl_file}")
    else:
        lines.append("allow_anonymous true")
    lines += [
        "",
        "# Devices and the site aggregator connect here.",
        listen,
        "protocol mqtt",
        "",
        "# Sessions and queued QoS 1 messages (the bridge's partials included) survive a",
        "# restart; a crash loses at most autosave_interval seconds, which the site",
        "# aggregator's journal and the devices' outboxes re-send.",
        "persistence true",
        f"persistence_location {data}",
        f"autosave_interval {s.autosave_interval}",
        "",
        f"# At least 2 x max({s.site_devices} site devices, {s.outage_rounds} outage rounds):",
        "# the default 1000 silently dropped acked messages behind a bridge in an outage.",
        f"max_queued_messages {s.max_queued_messages}",
        "max_queued_bytes 0",
        "max_inflight_messages 100",
        f"max_packet_size {s.max_message_bytes + PACKET_OVERHEAD}",
        "",
        "# The bridge: one persistent session at each end, QoS 1 both ways.",
        f"connection fedmq-{s.fleet}-{s.gateway}",
        f"address {s.cloud_host}:{s.cloud_port}",
        "bridge_protocol_version mqttv311",
        f"remote_clientid fedmq-bridge-{s.fleet}-{s.gateway}",
        f"local_clientid fedmq-bridge-local-{s.fleet}-{s.gateway}",
        "cleansession false",
        "local_cleansession false",
        "try_private true",
        "start_type automatic",
        f"restart_timeout {s.restart_base} {s.restart_cap}",
        f"keepalive_interval {s.keepalive}",
        "notifications true",
        "notifications_local_only true",
        f"notification_topic {s.notification_topic}",
    ]
    if s.remote_username:
        lines.append(f"remote_username {s.remote_username}")
        if s.remote_password:
            lines.append(f"remote_password {s.remote_password}")
    if s.cafile:
        lines += [f"bridge_cafile {s.cafile}", "bridge_insecure false",
                  "bridge_tls_version tlsv1.2"]
        if s.certfile:
            lines += [f"bridge_certfile {s.certfile}", f"bridge_keyfile {s.keyfile}"]
    lines += [
        "# Up: the site's one partial per round. Device updates never leave the site.",
        *(f"topic {topic} out 1" for topic in bridged.out),
        "# Down: the cloud's answer to it, the round and the model (retained).",
        *(f"topic {topic} in 1" for topic in bridged.into),
        "",
        *LOG_LINES,
    ]
    return "\n".join(lines) + "\n"
