"""The one place that builds paho-mqtt clients for the aggregator and the agent.

Both shells need the same things: MQTT v5 (or 3.1.1 for brokers that lack v5, such as the
embedded amqtt of the demo), a persistent session so QoS 1 messages wait in the broker while a
process is down, credentials, TLS, a last will, reconnect backoff, and the other brokers of a
cluster to move to when one is unreachable (``fallback_brokers``). Their settings are one
:class:`MqttSettings`, the ``[mqtt]`` table of both config files.

:class:`ConnectionWatch` turns what paho reports (``on_connect_fail`` with the socket or TLS
error behind it, CONNACK and PUBACK reason codes) into one clear log line per cause, at a
bounded rate, and tells the shell when retrying cannot help (bad credentials, a TLS
certificate the client does not accept) so that it exits non-zero. paho's own log lines
(``Client is not connected`` on every reconnect attempt) go to DEBUG.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedmq.errors import ConfigError, FedmqError
from fedmq.topics import validate_name

__all__ = [
    "PROTOCOLS",
    "REPEAT_LOG_SECONDS",
    "ConnectError",
    "ConnectionWatch",
    "MqttSettings",
    "connect",
    "describe_connect_error",
    "make_client",
    "parse_endpoint",
]

log = logging.getLogger(__name__)

PROTOCOLS = ("5", "3.1.1")
#: A cause that repeats (broker still unreachable) is logged again at most this often.
REPEAT_LOG_SECONDS = 60.0
# CONNACK reason codes no retry can fix: credentials, authorisation, a banned or invalid id.
_REFUSED_FOR_GOOD = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}


class ConnectError(FedmqError):
    """The broker cannot be used with these settings (credentials, TLS): retrying won't help."""


def parse_endpoint(text: str, name: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for an IPv6 address) -> (host, port); a one-line
    :class:`ConfigError` naming the setting ``name`` otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: {text!r} is not host:port (port 1..65535)")
    return host, int(port)


@dataclass(frozen=True)
class MqttSettings:
    """The ``[mqtt]`` table of the aggregator's and the agent's config (one shape for both).

    ``client_id`` empty = the service's own default (the aggregator's
    ``fedmq-aggregator-<fleet>``; an agent's client id is always its device id).
    ``retry_forever`` keeps retrying also when the broker refuses the credentials or TLS
    fails at start-up (the default is to exit non-zero with one line).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    protocol: str = "5"
    keepalive: int = 30
    # A persistent session (clean_start false) kept this long by the broker after a disconnect.
    session_expiry: int = 7 * 24 * 3600
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Skip the check that the broker's certificate names ``host`` (tests only).
    tls_insecure: bool = False
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    retry_forever: bool = False
    # Other brokers of the same cluster ("host:port" each): after a failed connection
    # attempt, the next attempt goes to the next broker of host:port + these, in turn.
    fallback_brokers: tuple[str, ...] = ()
    # Not a setting: the services always keep their session; tools (fleet status) don't.
    clean_start: bool = field(default=False, metadata={"setting": False})

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("mqtt.host must not be empty")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"mqtt.protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ConfigError(f"mqtt.port must be 1..65535, got {self.port}")
        if self.client_id:
            validate_name(self.client_id, "mqtt.client_id")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"mqtt.keepalive must be 5..65535 seconds, got {self.keepalive}")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ConfigError(
                f"mqtt.session_expiry must be 0..4294967295, got {self.session_expiry}"
            )
        if self.password is not None and self.username is None:
            raise ConfigError("mqtt.password given without mqtt.username")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not str(value).strip():
                raise ConfigError(f"mqtt.{name} must be a file path (or unset)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("mqtt.tls_cert and mqtt.tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("a client certificate (mqtt.tls_cert) needs mqtt.tls_ca")
        ends = self.endpoints  # checks fallback_brokers
        if len(set(ends)) != len(ends):
            raise ConfigError("mqtt.fallback_brokers must not repeat a broker (nor host:port)")
        lo, hi = self.reconnect_min, self.reconnect_max
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ConfigError(
                f"mqtt reconnect delays must satisfy 0 < reconnect_min <= reconnect_max, "
                f"got {lo} and {hi}"
            )

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None

    @property
    def endpoint(self) -> str:
        """``host:port`` as log lines name the broker."""
        return f"{self.host}:{self.port}"

    @property
    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """(host, port) of every broker to try: ``host``/``port``, then the fallbacks."""
        return ((self.host, self.port), *(
            parse_endpoint(b, "mqtt.fallback_brokers") for b in self.fallback_brokers
        ))

    def redacted(self) -> dict[str, Any]:
        """The settings for printing, without the password."""
        out = {k: v for k, v in vars(self).items() if k != "clean_start"}
        if out["password"] is not None:
            out["password"] = "***"
        return out

    def check_files(self) -> None:
        """Raise a one-line :class:`ConfigError` unless the TLS files are readable PEM.

        Called before connecting (services at start-up, :func:`make_client`), so a missing,
        directory or non-PEM ``tls_ca``/``tls_cert``/``tls_key`` never becomes a traceback.
        """
        for name in ("tls_ca", "tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is None:
                continue
            path = Path(value).expanduser()
            if not path.exists():
                raise ConfigError(f"mqtt.{name} {path}: no such file")
            if not path.is_file():
                raise ConfigError(f"mqtt.{name} {path}: not a file")
            try:
                head = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"mqtt.{name} {path}: cannot read: {exc.strerror}") from exc
            if b"-----BEGIN " not in head:
                raise ConfigError(f"mqtt.{name} {path}: not a PEM file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.tls_ca is not None:
            try:
                ctx.load_verify_locations(cafile=str(Path(self.tls_ca).expanduser()))
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"mqtt.tls_ca {self.tls_ca}: not a PEM CA certificate ({_ssl_reason(exc)})"
                ) from exc
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                ctx.load_cert_chain(
                    str(Path(self.tls_cert).expanduser()),
                    str(Path(self.tls_key).expanduser()),
                    password=lambda: b"",  # an encrypted key fails here instead of prompting
                )
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"mqtt.tls_cert {self.tls_cert} / mqtt.tls_key {self.tls_key}: not a PEM "
                    f"certificate and its unencrypted private key ({_ssl_reason(exc)})"
                ) from exc


def _ssl_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else str(exc)


class _Client(mqtt.Client):
    """A paho client that remembers why the last connection attempt failed (paho's
    ``on_connect_fail`` says only that it did) and which topic each message id went to.

    With several ``endpoints`` (``mqtt.fallback_brokers``), the attempt after a failed one
    goes to the next endpoint, round the list; paho's reconnect back-off is unchanged.
    """

    last_error: OSError | None = None
    endpoints: tuple[tuple[str, int], ...] = ()
    _move_on = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topic_of_mid: dict[int, str] = {}
        # Set by the ConnectionWatch that forgets each entry on its PUBACK: without one
        # nothing would, and the map would grow by one entry per QoS 1 message.
        self.remember_topics = False

    def connect_async(self, host: str, port: int = 1883, *args: Any, **kwargs: Any) -> None:
        self._move_on = False  # a fresh start at the given broker
        super().connect_async(host, port, *args, **kwargs)

    def reconnect(self) -> mqtt.MQTTErrorCode:
        if self._move_on:
            self._move_on = False
            self._next_endpoint()
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_error = exc
            self._move_on = len(self.endpoints) > 1
            raise
        self.last_error = None
        return rc

    def _next_endpoint(self) -> None:
        here = (self._host, self._port)
        i = self.endpoints.index(here) + 1 if here in self.endpoints else 0
        host, port = self.endpoints[i % len(self.endpoints)]
        log.info("cannot reach the broker at %s:%d: trying %s:%d next (mqtt.fallback_brokers)",
                 *here, host, port)
        self._host, self._port = host, port

    def publish(
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> mqtt.MQTTMessageInfo:
        info = super().publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos > 0 and self.remember_topics:
            self.topic_of_mid[info.mid] = topic
        return info


def _paho_log(client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
    # paho logs "Client is not connected" at ERROR on every reconnect attempt; our
    # ConnectionWatch reports connection trouble. An exception in one of our callbacks is a
    # bug and stays an error.
    if buf.startswith("Caught exception"):
        log.error("paho: %s", buf)
    else:
        log.debug("paho: %s", buf)


def make_client(
    settings: MqttSettings,
    will: tuple[str, bytes, int, bool] | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """A configured (not yet connected) paho client; TLS files are checked first."""
    settings.check_files()
    v5 = settings.protocol == "5"
    kwargs: dict[str, object] = {}
    if not v5:
        kwargs["clean_session"] = settings.clean_start
    client = _Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=settings.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        manual_ack=manual_ack,
        **kwargs,
    )
    client.on_log = _paho_log
    client.endpoints = settings.endpoints
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca is not None:
        try:
            client.tls_set(
                ca_certs=settings.tls_ca,
                certfile=settings.tls_cert,
                keyfile=settings.tls_key,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"mqtt TLS settings: {_ssl_reason(exc)}") from exc
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
    """Connect with the session semantics of ``settings``.

    Asynchronous: paho's network thread makes the attempts (through every broker of
    ``settings.endpoints`` in turn). Synchronous: each broker is tried once, in order; the
    last one's OSError is raised when none is reachable.
    """
    kwargs: dict[str, Any] = {}
    if settings.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry
        kwargs = {"clean_start": settings.clean_start, "properties": props}
    if asynchronous:
        client.connect_async(settings.host, settings.port, settings.keepalive, **kwargs)
        return
    try:
        client.connect(settings.host, settings.port, settings.keepalive, **kwargs)
    except OSError:
        for left in reversed(range(len(settings.fallback_brokers))):
            try:
                client.reconnect()  # the next broker (_Client moves on after a failure)
                return
            except OSError:
                if not left:
                    raise
        raise


@dataclass
class _Repeat:
    """Rate limit of one kind of log line: the same text at most every ``every`` seconds."""

    every: float
    text: str = ""
    last: float = -math.inf
    suppressed: int = 0

    def due(self, text: str, now: float) -> tuple[bool, int]:
        """Whether to log ``text`` now, and how many identical ones were held back."""
        if text != self.text or now - self.last >= self.every:
            held, self.text, self.last, self.suppressed = self.suppressed, text, now, 0
            return True, held
        self.suppressed += 1
        return False, 0


def describe_connect_error(exc: BaseException | None, settings: MqttSettings) -> tuple[str, bool]:
    """(cause, fatal): what one failed connection attempt means for an operator.

    ``fatal`` = retrying with the same settings cannot help (a TLS problem).
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or _ssl_reason(exc)
        return f"TLS certificate not accepted: {detail} (check mqtt.host and mqtt.tls_ca)", True
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS handshake failed: {_ssl_reason(exc)} (is this port a TLS listener?)",
            True,
        )
    if settings.tls and isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return (
            "TLS handshake failed: the broker closed the connection (is this port a TLS "
            "listener?)",
            True,
        )
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the broker running and listening on this port?)", False
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host name {settings.host!r}: {exc.strerror}", False
    if isinstance(exc, TimeoutError):
        return "timed out", False
    if exc is None:
        return "connection failed", False
    return str(exc) or type(exc).__name__, False


class ConnectionWatch:
    """Clear, rate-limited log lines for a paho client's connection, and the start-up rule.

    Create it after the shell set its ``on_connect``/``on_disconnect``/``on_publish``
    callbacks; it wraps them:

    - a failed attempt (``on_connect_fail``) or a CONNACK refusal: one WARNING/ERROR naming
      ``host:port`` and the cause; the same cause again at most every ``repeat_every``
      seconds. While the connection was up until recently (a broker restart), failures are
      quiet (DEBUG) for ``repeat_every`` seconds: the shell's disconnect WARNING said it.
    - before the first successful connection, bad credentials or a TLS failure stop the
      client and call ``on_fatal`` (unless ``settings.retry_forever``); the shell then calls
      :meth:`raise_if_failed` to exit with :class:`ConnectError`.
    - the shell's ``on_connect`` runs only for accepted connections, its ``on_disconnect``
      only when an accepted connection ends.
    - a PUBACK with a failure reason (e.g. 0x87 not authorized by the broker's ACL): one
      WARNING per topic and reason (rate-limited) and ``on_publish_failure(topic, reason)``.
    """

    def __init__(
        self,
        client: mqtt.Client,
        settings: MqttSettings,
        *,
        on_fatal: Callable[[], None] | None = None,
        on_publish_failure: Callable[[str, str], object] | None = None,
        repeat_every: float = REPEAT_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.settings = settings
        self.on_fatal = on_fatal
        self.on_publish_failure = on_publish_failure
        self.repeat_every = repeat_every
        self._clock = clock
        self._lock = threading.Lock()
        self._failure: str | None = None
        self._ever_connected = False
        self._up = False
        self._refused = False
        self._lost_at: float | None = None
        self._attempts = 0
        self._connect_log = _Repeat(repeat_every)
        self._publish_logs: dict[tuple[str, str], _Repeat] = {}
        # paho types these as a union of its callback API versions; ours are VERSION2.
        self._shell_connect: Any = client.on_connect
        self._shell_disconnect: Any = client.on_disconnect
        self._shell_publish: Any = client.on_publish
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        if isinstance(client, _Client):
            client.remember_topics = True  # _on_publish forgets each one

    # -- state for the shell -------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        """Why the client gave up (None while it is fine or retrying)."""
        return self._failure

    def raise_if_failed(self) -> None:
        """Raise :class:`ConnectError` (one line, exit 1 under ``run_logged``) if it gave up."""
        if self._failure is not None:
            raise ConnectError(self._failure)

    # -- paho callbacks (network thread): never raise --------------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        if getattr(reason, "is_failure", False):
            code = int(getattr(reason, "value", 0))
            why = _REFUSED_FOR_GOOD.get(code)
            cause = f"the broker refused the connection: {reason}"
            if why is not None:
                cause += " (check mqtt.username, mqtt.password and the broker's ACL)"
            with self._lock:
                self._refused = True  # paho reports the closed socket next: said already
            self._failed(cause, fatal=why is not None)
            return
        with self._lock:
            self._ever_connected = True
            self._up = True
            self._lost_at = None
            if self._attempts:
                log.debug("connected to %s after %d failed attempt(s)",
                          self.settings.endpoint, self._attempts)
            self._attempts = 0
            self._connect_log = _Repeat(self.repeat_every)
        if self._shell_connect is not None:
            self._shell_connect(client, userdata, flags, reason, props)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any = None
    ) -> None:
        with self._lock:
            was_up, self._up = self._up, False
            refused, self._refused = self._refused, False
            if was_up:
                self._lost_at = self._clock()
        if was_up:
            if self._shell_disconnect is not None:
                self._shell_disconnect(client, userdata, flags, reason, props)
        elif not refused:
            # The socket opened but closed before any CONNACK: e.g. plain MQTT sent to a TLS
            # listener, which drops it without a word.
            hint = "" if self.settings.tls else " (is this a TLS listener? then set mqtt.tls_ca)"
            self._failed(f"the connection closed before the broker answered{hint}",
                         fatal=False)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        exc = getattr(client, "last_error", None)
        cause, fatal = describe_connect_error(exc, self.settings)
        self._failed(cause, fatal=fatal)

    def _failed(self, cause: str, fatal: bool) -> None:
        host = getattr(self.client, "host", "")  # the broker just tried (fallback_brokers)
        ep = f"{host}:{self.client.port}" if host else self.settings.endpoint
        with self._lock:
            self._attempts += 1
            now = self._clock()
            if fatal and not self._ever_connected and not self.settings.retry_forever:
                if self._failure is not None:
                    return
                self._failure = f"cannot use the broker at {ep}: {cause}"
                stop = True
            else:
                stop = False
                quiet = self._lost_at is not None and now - self._lost_at < self.repeat_every
                if quiet:
                    self._connect_log.suppressed += 1  # counted in the first report
                    due, held = False, 0
                else:
                    due, held = self._connect_log.due(cause, now)
        if stop:
            try:
                self.client.disconnect()  # no more attempts; the shell stops and says why
            finally:
                if self.on_fatal is not None:
                    self.on_fatal()
            return
        if quiet or not due:
            log.debug("cannot connect to %s: %s; retrying", ep, cause)
            return
        more = f" ({held} more failed attempt(s) since the last report)" if held else ""
        level = logging.ERROR if fatal else logging.WARNING
        log.log(level, "cannot connect to %s: %s; retrying%s", ep, cause, more)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any = None
    ) -> None:
        topics: dict[int, str] = getattr(client, "topic_of_mid", {})
        topic = topics.pop(mid, f"(message id {mid})")
        if getattr(reason, "is_failure", False):
            text = str(reason)
            with self._lock:
                repeat = self._publish_logs.setdefault((topic, text), _Repeat(self.repeat_every))
                due, held = repeat.due(text, self._clock())
            if due:
                more = f" ({held} more since the last report)" if held else ""
                log.warning(
                    "the broker did not accept a message on %s: %s (0x%02x)%s", topic, text,
                    int(getattr(reason, "value", 0)), more,
                )
            if self.on_publish_failure is not None:
                self.on_publish_failure(topic, text.lower().replace(" ", "_"))
        if self._shell_publish is not None:
            self._shell_publish(client, userdata, mid, reason, props)
