"""Render the production ``mosquitto.conf`` from the broker settings."""

from __future__ import annotations

from fedmq.net.localbroker import LOG_LINES as LOCAL_LOG_LINES
from fedmq_ops.broker.settings import BrokerSettings

__all__ = ["LOG_LINES", "render_mosquitto_conf"]

#: Mosquitto's logging in the configs ``fedmq broker`` writes: the local broker's lines
#: (why: :data:`fedmq.net.localbroker.LOG_LINES`) with ISO timestamps.
LOG_LINES = (*LOCAL_LOG_LINES, "log_timestamp_format %Y-%m-%dT%H:%M:%S")


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
        "# Largest MQTT packet accepted (the largest model or update plus framing): a client",
        "# sending more is disconnected. It also caps what a device can leave retained on its",
        "# status and update topics. Updates must never be retained (docs/broker.md).",
        f"max_packet_size {s.max_packet_size}",
        "",
        "# stderr, not stdout: stdout is block-buffered when it is not a terminal, so",
        "# lines would reach `docker logs` / journald late or be lost on a crash.",
        *LOG_LINES,
    ]
    return "\n".join(lines) + "\n"
