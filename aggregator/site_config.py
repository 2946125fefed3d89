"""The site gateway services' strict TOML configs (docs/scaling.md, "Site gateways").

- The site aggregator (``fedmq aggregator site-gateway``, ``python -m
  aggregator.site_gateway``): a ``[gateway]`` table (fleet, this gateway's name, its key,
  the site store, the site's device registry, the model, when to seal, the site's fixed
  bounds) and ``[mqtt]`` (the SITE broker). Environment: ``FEDMQ_GATEWAY_*``
  (``FEDMQ_GATEWAY_MQTT_PASSWORD``).
- The partial receiver (``fedmq aggregator partial-receiver``, ``python -m
  aggregator.partial_receiver``): a ``[receiver]`` table (fleet, the Redis store, the
  gateway registry, the model) and ``[mqtt]`` (the CLOUD broker). Environment:
  ``FEDMQ_RECEIVER_*``.

Defaults < file < environment < flags; unknown tables, keys and variables are errors naming
the closest valid one (:func:`fedmq.config.load_config`, as for the sharded ingest). The MQTT
client ids are derived (``fedmq-gateway-<fleet>-<name>``, ``fedmq-partials-<fleet>``): a
service's persistent session must keep its id, so ``mqtt.client_id`` is refused.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aggregator.bounds import NORM_ACTIONS
from aggregator.config import MOVED
from aggregator.service_flags import Flag, add_config_flags, flag_overrides
from aggregator.shard_config import check_redis_url
from fedmq.config import load_config
from fedmq.errors import ConfigError
from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics, validate_name

__all__ = [
    "GATEWAY_FLAGS",
    "RECEIVER_FLAGS",
    "GatewayConfig",
    "ReceiverConfig",
    "add_gateway_flags",
    "add_receiver_flags",
    "gateway_config_from_args",
    "load_gateway_config",
    "load_receiver_config",
    "receiver_config_from_args",
]

#: Flat keys of the [mqtt] table, refused in the service table with where they belong.
_MOVED = {old: new for old, new in MOVED.items() if new.startswith("mqtt.")}


def _common_checks(section: str, fleet: str, prefix: str, mqtt: MqttSettings) -> None:
    Topics(fleet, prefix)  # the fleet's name and the prefix
    if not isinstance(mqtt, MqttSettings):
        raise ConfigError("mqtt must be an MqttSettings")
    if mqtt.client_id:
        raise ConfigError(f"mqtt.client_id is derived by the {section} service (a fixed id "
                          "keeps its persistent session): remove it")


def _required(value: str, setting: str, flag: str) -> None:
    if not value:
        raise ConfigError(f"{setting} is needed (or {flag})")


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]`` + ``[mqtt]`` of a site aggregator; see the module docstring."""

    fleet: str = "default"
    # This gateway's FIXED name: its enrolment in the cloud's gateway registry, its topics
    # (fl/<fleet>/gateway/<name>/...) and its client id derive from it.
    name: str = ""
    key: str = ""  # the gateway's Ed25519 private key (`fedmq keygen`)
    state: str = ""  # the site store (SQLite file)
    registry: str = ""  # the site's device registry: signatures required when set
    # The SITE broker ([mqtt]); client_id is derived.
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    topic_prefix: str = ""
    model: str = "digits-mlp"
    expect: int = 0  # seal once this many devices are in (0: at the deadline minus lead)
    lead: float = 5.0  # seal this many seconds before the cloud's deadline
    resend_after: float = 0.0  # also re-send unanswered partials this often (0: events only)
    # The site's fixed ceilings (the cloud's adaptive bounds are not known at the site).
    max_update_norm: float = 0.0
    norm_action: str = "clip"
    max_claimed_examples: int = 10_000_000
    poll: float = 0.05
    ready_file: str = ""  # written once subscribed (tests, readiness probes)

    def __post_init__(self) -> None:
        _common_checks("site gateway", self.fleet, self.topic_prefix, self.mqtt)
        _required(self.name, "gateway.name", "--gateway")
        validate_name(self.name, "gateway.name")
        _required(self.key, "gateway.key", "--key")
        _required(self.state, "gateway.state", "--state")
        if self.expect < 0:
            raise ConfigError(f"gateway.expect must be >= 0, got {self.expect}")
        for name in ("lead", "resend_after", "max_update_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"gateway.{name} must be >= 0, got {value}")
        if self.norm_action not in NORM_ACTIONS:
            raise ConfigError(f"gateway.norm_action must be one of {NORM_ACTIONS}, got "
                              f"{self.norm_action!r}")
        if self.max_claimed_examples < 1:
            raise ConfigError("gateway.max_claimed_examples must be >= 1")
        if not (math.isfinite(self.poll) and 0 < self.poll <= 10):
            raise ConfigError(f"gateway.poll must be in (0, 10] seconds, got {self.poll}")


@dataclass(frozen=True)
class ReceiverConfig:
    """``[receiver]`` + ``[mqtt]`` of the cloud's partial receiver."""

    fleet: str = "default"
    redis: str = ""  # the sharded ingest's store: redis://host:port/db
    gateways: str = ""  # the GATEWAY registry (`fedmq enroll` format): signatures required
    # The CLOUD broker ([mqtt]); client_id is derived.
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    topic_prefix: str = ""
    model: str = "digits-mlp"
    max_partial_bytes: int = 256 * 1024 * 1024
    ready_file: str = ""

    def __post_init__(self) -> None:
        _common_checks("partial receiver", self.fleet, self.topic_prefix, self.mqtt)
        check_redis_url(self.redis, "receiver.redis")
        _required(self.gateways, "receiver.gateways", "--gateways")
        if self.max_partial_bytes < 1024:
            raise ConfigError("receiver.max_partial_bytes must be >= 1024")


C = TypeVar("C", GatewayConfig, ReceiverConfig)


def _load(cls: type[C], section: str, env_prefix: str, toml_path: str | Path | None,
          overrides: Mapping[str, Any] | None, environ: Mapping[str, str] | None) -> C:
    return load_config(cls, toml_path, section=section, env_prefix=env_prefix,
                       overrides=overrides, environ=environ, moved=_MOVED)


def load_gateway_config(toml_path: str | Path | None = None,
                        overrides: Mapping[str, Any] | None = None,
                        environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Defaults < TOML ``[gateway]``/``[mqtt]`` < ``FEDMQ_GATEWAY_*`` < ``overrides``."""
    return _load(GatewayConfig, "gateway", "FEDMQ_GATEWAY_", toml_path, overrides, environ)


def load_receiver_config(toml_path: str | Path | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         environ: Mapping[str, str] | None = None) -> ReceiverConfig:
    """Defaults < TOML ``[receiver]``/``[mqtt]`` < ``FEDMQ_RECEIVER_*`` < ``overrides``."""
    return _load(ReceiverConfig, "receiver", "FEDMQ_RECEIVER_", toml_path, overrides, environ)


_BROKER: tuple[Flag, ...] = (
    ("--host", "mqtt.host", str, "MQTT broker host"),
    ("--port", "mqtt.port", int, "MQTT broker port"),
    ("--session-expiry", "mqtt.session_expiry", int, "seconds the broker keeps the session"),
    ("--prefix", "topic_prefix", str, "topic prefix (tests)"),
    ("--model", "model", str, "zoo model or bundle directory"),
    ("--ready-file", "ready_file", str, "written once subscribed (tests)"),
)
#: Flags of ``fedmq aggregator site-gateway`` (and ``python -m aggregator.site_gateway``).
GATEWAY_FLAGS: tuple[Flag, ...] = (
    ("--fleet", "fleet", str, "fleet name"),
    ("--gateway", "name", str, "this gateway's fixed name (its enrolment in the cloud's "
                               "gateway registry)"),
    ("--key", "key", str, "the gateway's private key (`fedmq keygen`)"),
    ("--state", "state", str, "the site store (SQLite file)"),
    ("--registry", "registry", str, "the site's device registry: signatures required"),
    *_BROKER,
    ("--expect", "expect", int,
     "seal the round once this many devices are in (0: at the deadline)"),
    ("--lead", "lead", float, "seal this many seconds before the cloud's deadline"),
    ("--resend-after", "resend_after", float,
     "also re-send unanswered partials every this many seconds (0: only at start, on "
     "reconnect and when the bridge comes up)"),
    ("--max-update-norm", "max_update_norm", float,
     "the site's fixed L2 ceiling on an update (0: none)"),
    ("--norm-action", "norm_action", str, "clip or reject an update over --max-update-norm"),
    ("--max-claimed-examples", "max_claimed_examples", int,
     "largest num_examples an update may claim"),
    ("--poll", "poll", float, "seconds between seal checks"),
)
#: Flags of ``fedmq aggregator partial-receiver`` (and ``python -m
#: aggregator.partial_receiver``).
RECEIVER_FLAGS: tuple[Flag, ...] = (
    ("--fleet", "fleet", str, "fleet name"),
    ("--redis", "redis", str, "the store: redis://host:port/db"),
    ("--gateways", "gateways", str,
     "gateway registry (JSON, `fedmq enroll` format): signatures required"),
    *_BROKER,
)


def add_gateway_flags(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    add_config_flags(parser, GATEWAY_FLAGS, tables="[gateway] and [mqtt]",
                     subcommand=subcommand)


def add_receiver_flags(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    add_config_flags(parser, RECEIVER_FLAGS, tables="[receiver] and [mqtt]",
                     subcommand=subcommand)


def gateway_config_from_args(args: argparse.Namespace) -> GatewayConfig:
    """``args.config`` < environment < the flags given."""
    return load_gateway_config(getattr(args, "config", None),
                               overrides=flag_overrides(args, GATEWAY_FLAGS))


def receiver_config_from_args(args: argparse.Namespace) -> ReceiverConfig:
    """``args.config`` < environment < the flags given."""
    return load_receiver_config(getattr(args, "config", None),
                                overrides=flag_overrides(args, RECEIVER_FLAGS))
