"""The edge agent's configuration: one frozen, validated object per process.

Sources, lowest to highest precedence: defaults < TOML file (``[agent]`` table, the broker
connection in ``[mqtt]``) < environment (``FEDMQ_AGENT_<FIELD>``, e.g.
``FEDMQ_AGENT_DEVICE_ID``; ``FEDMQ_AGENT_MQTT_<KEY>`` for ``[mqtt]``) < command-line flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edge_agent.textfile import check_textfile_path
from fedmq.chunks import MIN_MESSAGE_BYTES
from fedmq.config import load_config
from fedmq.data.local import LocalDataConfig
from fedmq.errors import ConfigError, FedmqError
from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics, validate_name

__all__ = [
    "BACKENDS", "ENV_PREFIX", "MOVED", "TOML_SECTION", "AgentConfig", "load_agent_config",
]

ENV_PREFIX = "FEDMQ_AGENT_"
TOML_SECTION = "agent"
#: Training backends: LiteRT (no TensorFlow on the device) or Keras (full TensorFlow).
BACKENDS = ("litert", "keras")
#: Flat keys of older configs and where they live now (refused with this hint).
MOVED = {
    name: f"mqtt.{name}"
    for name in ("host", "port", "protocol", "keepalive", "session_expiry", "username",
                 "password", "tls_ca", "tls_cert", "tls_key", "reconnect_min", "reconnect_max")
} | {"backoff_min": "mqtt.reconnect_min", "backoff_max": "mqtt.reconnect_max",
     "mqtt.backoff_min": "mqtt.reconnect_min", "mqtt.backoff_max": "mqtt.reconnect_max"}


@dataclass(frozen=True)
class AgentConfig:
    """Everything one device agent needs. ``device_id`` empty = the id kept in ``state_dir``
    (a new one, ``<hostname>-<random>``, is made and stored on first start)."""

    device_id: str = ""
    fleet: str = "default"
    # The broker connection ([mqtt]); the MQTT client id is always the device id.
    mqtt: MqttSettings = field(default_factory=MqttSettings)
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
    ack_timeout: float = 60.0
    max_resends: int = 5
    # Chunked transfer (docs/protocol.md): updates above this many bytes go in chunks;
    # 0 = never. chunk_timeout: a model transfer without a new chunk this long expires.
    max_message_bytes: int = 0
    chunk_timeout: float = 300.0
    signing_key: Path | None = None
    # The fleet's registry of enrolled public keys (a copy of the aggregator's): secure
    # rounds then check every device's signed keys in the roster (docs/privacy.md).
    peer_registry: Path | None = None
    # Homomorphic encryption (docs/privacy.md): the public context of `fedmq he keygen`.
    he_context: Path | None = None
    # Prometheus textfile for node_exporter's textfile collector (NAME.prom), rewritten
    # after every round (docs/monitoring.md); None = none.
    metrics_textfile: Path | None = None
    # Federated evaluation (docs/strategies.md): hold out this fraction of the local
    # examples (never trained on, never sent) and report the global model's loss and
    # accuracy on them with each update; 0 = off. eval_personal: also the locally trained
    # model's. eval_only: never train, only evaluate each round's model on all examples.
    eval_fraction: float = 0.0
    eval_personal: bool = True
    eval_only: bool = False

    def __post_init__(self) -> None:
        if self.device_id:
            validate_name(self.device_id, "device_id")
        validate_name(self.fleet, "fleet")
        Topics(self.fleet, self.topic_prefix)  # validates the prefix
        if not isinstance(self.mqtt, MqttSettings):
            raise ConfigError("mqtt must be an MqttSettings")
        if self.mqtt.client_id:
            raise ConfigError(
                "mqtt.client_id is not an agent setting: the agent's client id is its device_id"
            )
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
        _positive("ack_timeout", self.ack_timeout)
        if self.max_resends < 0:
            raise ConfigError(f"max_resends must be >= 0, got {self.max_resends}")
        if self.max_message_bytes != 0 and self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(
                f"max_message_bytes must be 0 (no chunking) or >= {MIN_MESSAGE_BYTES}, "
                f"got {self.max_message_bytes}"
            )
        _positive("chunk_timeout", self.chunk_timeout)
        if self.metrics_textfile is not None:
            check_textfile_path(self.metrics_textfile)
        if not (math.isfinite(self.eval_fraction) and 0 <= self.eval_fraction <= 0.5):
            raise ConfigError(f"eval_fraction must be in [0, 0.5], got {self.eval_fraction}")
        if self.eval_only and self.eval_fraction:
            raise ConfigError(
                "eval_only evaluates on all the device's examples: leave eval_fraction at 0"
            )

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet, self.topic_prefix)

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
        """``[mqtt]`` with client id = the device id and a persistent session."""
        return replace(self.mqtt, client_id=device_id, clean_start=False)

    def redacted(self) -> dict[str, Any]:
        """All settings for printing, without the password."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mqtt"] = self.mqtt.redacted()
        return out


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number of seconds, got {value}")


def load_agent_config(
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Defaults < ``[agent]``/``[mqtt]`` of ``toml_path`` < ``FEDMQ_AGENT_*`` < ``overrides``
    (field names, ``mqtt.<key>`` for the connection)."""
    return load_config(
        AgentConfig,
        toml_path,
        section=TOML_SECTION,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        environ=environ,
        moved=MOVED,
    )
