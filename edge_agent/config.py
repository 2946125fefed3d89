"""The edge agent's configuration: one frozen, validated object per process.

Sources, lowest to highest precedence: defaults < TOML file (``[agent]`` table) <
environment (``FEDMQ_AGENT_<FIELD>``, e.g. ``FEDMQ_AGENT_DEVICE_ID``) < command-line flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedmq.config import load_config
from fedmq.data.local import LocalDataConfig
from fedmq.errors import ConfigError, FedmqError
from fedmq.net.mqtt import PROTOCOLS, MqttSettings
from fedmq.topics import Topics, validate_name

__all__ = ["BACKENDS", "ENV_PREFIX", "TOML_SECTION", "AgentConfig", "load_agent_config"]

ENV_PREFIX = "FEDMQ_AGENT_"
TOML_SECTION = "agent"
#: Training backends: LiteRT (no TensorFlow on the device) or Keras (full TensorFlow).
BACKENDS = ("litert", "keras")



@dataclass(frozen=True)
class AgentConfig:
    """Everything one device agent needs. ``device_id`` empty = the id kept in ``state_dir``
    (a new one, ``<hostname>-<random>``, is made and stored on first start)."""

    device_id: str = ""
    fleet: str = "default"
    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = ""
    state_dir: Path = Path("fedmq-agent-state")
    # model: a bundle directory, or the name of a bundle shipped with fedmq ("digits-mlp")
    model: str = "digits-mlp"
    # local data (mirrors fedmq.data.local.LocalDataConfig; "" = not set)
    source: str = "digits"
    partition: str = ""
    num_clients: int = 1
    client_index: int = 0
    seed: int = 0
    sample_fraction: float | None = None
    max_examples: int | None = None
    class_balanced: bool = False
    augment: str = ""
    # runtime
    num_threads: int = 1
    # seconds to wait before each training (simulates a slower device in tests/experiments)
    train_delay: float = 0.0
    backend: str = "litert"
    # MQTT session ("5", or "3.1.1" for brokers without MQTT v5)
    protocol: str = "5"
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    ack_timeout: float = 60.0
    max_resends: int = 5
    username: str | None = None
    password: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    signing_key: Path | None = None

    def __post_init__(self) -> None:
        if self.device_id:
            validate_name(self.device_id, "device_id")
        validate_name(self.fleet, "fleet")
        Topics(self.fleet, self.topic_prefix)  # validates the prefix
        if not self.host:
            raise ConfigError("host must not be empty")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"port must be 1..65535, got {self.port}")
        if not self.model:
            raise ConfigError("model must name a bundle directory or a prebuilt model")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients must be >= 1, got {self.num_clients}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.client_index < self.num_clients:
            raise ConfigError(
                f"client_index must be in [0, {self.num_clients}), got {self.client_index}"
            )
        self.data_config()  # validates the data settings
        if not 1 <= self.num_threads <= 64:
            raise ConfigError(f"num_threads must be 1..64, got {self.num_threads}")
        if not (math.isfinite(self.train_delay) and self.train_delay >= 0):
            raise ConfigError(f"train_delay must be a finite number >= 0, got {self.train_delay}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 5 <= self.keepalive <= 65535:
            raise ConfigError(f"keepalive must be 5..65535 seconds, got {self.keepalive}")
        if not 0 <= self.session_expiry <= 0xFFFFFFFF:
            raise ConfigError(f"session_expiry must be 0..4294967295, got {self.session_expiry}")
        _positive("backoff_min", self.backoff_min)
        _positive("backoff_max", self.backoff_max)
        if self.backoff_max < self.backoff_min:
            raise ConfigError("backoff_max must be >= backoff_min")
        _positive("ack_timeout", self.ack_timeout)
        if self.max_resends < 0:
            raise ConfigError(f"max_resends must be >= 0, got {self.max_resends}")
        if self.password is not None and self.username is None:
            raise ConfigError("password given without username")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key go together")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ConfigError("a client certificate (tls_cert) needs tls_ca")

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet, self.topic_prefix)

    @property
    def use_tls(self) -> bool:
        return self.tls_ca is not None

    def data_config(self) -> LocalDataConfig:
        """The local-data settings as a :class:`LocalDataConfig` (validated)."""
        partitioned = bool(self.partition)
        try:
            return LocalDataConfig(
                source=self.source,
                partition=self.partition or None,
                num_clients=self.num_clients if partitioned else None,
                client_index=self.client_index if partitioned else None,
                seed=self.seed,
                sample_fraction=self.sample_fraction,
                max_examples=self.max_examples,
                class_balanced=self.class_balanced,
                augment=self.augment or None,
            )
        except FedmqError as exc:
            raise ConfigError(f"data settings: {exc}") from exc

    def mqtt_settings(self, device_id: str) -> MqttSettings:
        """Settings for :func:`fedmq.net.mqtt.make_client` (client id = the device id)."""
        return MqttSettings(
            host=self.host,
            port=self.port,
            client_id=device_id,
            protocol=self.protocol,
            keepalive=self.keepalive,
            session_expiry=self.session_expiry,
            clean_start=False,
            username=self.username,
            password=self.password,
            tls_ca=str(self.tls_ca) if self.tls_ca else None,
            tls_cert=str(self.tls_cert) if self.tls_cert else None,
            tls_key=str(self.tls_key) if self.tls_key else None,
            reconnect_min=self.backoff_min,
            reconnect_max=self.backoff_max,
        )

    def redacted(self) -> dict[str, Any]:
        """All settings for logging, without the password."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["password"] is not None:
            out["password"] = "***"
        return out


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


def load_agent_config(
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Defaults < ``[agent]`` of ``toml_path`` < ``FEDMQ_AGENT_*`` < ``overrides``."""
    return load_config(
        AgentConfig,
        toml_path,
        section=TOML_SECTION,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        environ=environ,
    )
