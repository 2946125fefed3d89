"""The one place that builds paho-mqtt clients for the aggregator and the agent.

Both shells need the same things: MQTT v5 (or 3.1.1 for brokers that lack v5, such as the
embedded amqtt of the demo), a persistent session so QoS 1 messages wait in the broker while a
process is down, credentials, TLS, a last will, and reconnect backoff. This module only
configures a client; connecting and the network loop stay with the caller.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.errors import ConfigError

__all__ = ["PROTOCOLS", "MqttSettings", "connect", "make_client"]

PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    protocol: str = "5"
    keepalive: int = 30
    # A persistent session (clean_start false) kept this long by the broker after a disconnect.
    session_expiry: int = 7 * 24 * 3600
    clean_start: bool = False
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_insecure: bool = False
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.keepalive < 5:
            raise ConfigError("keepalive must be at least 5 seconds")
        if not 0 < self.reconnect_min <= self.reconnect_max:
            raise ConfigError("reconnect backoff must satisfy 0 < min <= max")

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None


def make_client(
    settings: MqttSettings,
    will: tuple[str, bytes, int, bool] | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A configured (not yet connected) paho client."""
    v5 = settings.protocol == "5"
    kwargs: dict[str, object] = {}
    if not v5:
        kwargs["clean_session"] = settings.clean_start
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=settings.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=manual_ack,
        **kwargs,  # type: ignore[arg-type]
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        client.tls_set(
            ca_certs=settings.tls_ca,
            certfile=settings.tls_cert,
            keyfile=settings.tls_key,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(settings.tls_insecure)
    if will is not None:
        topic, payload, qos, retain = will
        client.will_set(topic, payload, qos=qos, retain=retain)
    client.reconnect_delay_set(
        min_delay=max(1, int(settings.reconnect_min)), max_delay=int(settings.reconnect_max)
    )
    # Large models and backlogs: do not let paho's own queue silently cap QoS 1 messages.
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(20)
    return client


def connect(client: mqtt.Client, settings: MqttSettings, asynchronous: bool = True) -> None:
    """Connect with the session semantics of ``settings`` (raises OSError when unreachable)."""
    if settings.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry
        if asynchronous:
            client.connect_async(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=settings.clean_start,
                properties=props,
            )
        else:
            client.connect(
                settings.host,
                settings.port,
                settings.keepalive,
                clean_start=settings.clean_start,
                properties=props,
            )
    elif asynchronous:
        client.connect_async(settings.host, settings.port, settings.keepalive)
    else:
        client.connect(settings.host, settings.port, settings.keepalive)
