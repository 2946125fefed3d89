"""The sharded ingest's configuration: the aggregator's, plus a ``[shard]`` table.

The workers and the coordinator (docs/scaling.md, "Sharded ingest") read the same strict
TOML file as the single-process aggregator: ``[aggregator]`` (fleet, model, codec, strategy,
the round's size and timeout, the ingest bounds, the registry), ``[mqtt]`` (the broker) and
``[shard]`` (the Redis store, the worker's name, the shared-subscription group). Unknown
keys and tables are errors naming the closest valid one (:func:`fedmq.config.load_config`);
the environment is ``FEDMQ_AGGREGATOR_*`` as for the aggregator (``..._SHARD_REDIS``).

Settings the sharded path cannot honour are refused, never ignored: other round policies,
DP, secure aggregation, encrypted updates, pruning, server-side clipping, the compressed
downlink and chunked updates (:data:`UNSUPPORTED`). The MQTT client ids are derived
(``fedmq-ingest-<fleet>-<worker>``, ``fedmq-coordinator-<fleet>``), so ``mqtt.client_id``
is refused too. ``clients_per_round`` is the round's target (updates that close it) and
devices are not selected (``selection = "any"``, the default here).

Prometheus: the coordinator serves on the aggregator's ``metrics_port`` (``metrics_host``),
a worker on ``shard.worker_metrics_port``; 0 (the default) is off. ``eval_dataset`` and
``eval_examples`` are the aggregator's: the coordinator evaluates each new model on that
held-out set (``"none"``, the default here, skips it).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.config import ENV_PREFIX, MOVED, TOML_SECTION, AggregatorConfig
from aggregator.service_flags import Flag, add_config_flags, flag_overrides
from fedmq.config import load_config
from fedmq.errors import ConfigError
from fedmq.topics import validate_name
from fedmq.update.strategies import MeanDeltaStrategy, make_strategy

__all__ = [
    "ACK_MODES",
    "COORDINATOR_FLAGS",
    "UNSUPPORTED",
    "WORKER_FLAGS",
    "ShardConfig",
    "ShardSettings",
    "add_flags",
    "check_redis_url",
    "config_from_args",
    "load_shard_config",
]

ACK_MODES = ("manual", "callback")
#: Aggregator settings the sharded ingest does not implement: each must keep this value.
UNSUPPORTED: dict[str, Any] = {
    "round_policy": "sync",
    "dp": False,
    "he_context": "",
    "prune_target": 0.0,
    "clip_updates": "off",
    "zero_outliers_k": 0.0,
    "downlink": "full",
    "max_message_bytes": 0,
    "min_devices": 0,
}


def check_redis_url(url: str, setting: str) -> None:
    """Refuse an empty or non-Redis store URL, naming ``setting``."""
    if not url:
        raise ConfigError(f"{setting} must name the store (redis://host:port/db)")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{setting} must be a redis:// URL, got {url!r}")


@dataclass(frozen=True)
class ShardSettings:
    """``[shard]``: what only the sharded services have."""

    # The shared store (redis://host:port/db): the open round, claims, partials, the model.
    redis: str = ""
    # This worker's FIXED name (its MQTT client id, session and partial derive from it);
    # needed by `shard-worker` only. Set it per process (--worker or the environment).
    worker: str = ""
    group: str = "fedmq-ingest"  # the shared subscription's group ($share/<group>/...)
    # When the MQTT PUBACK goes out, always after the commit: "manual" (client.ack) or
    # "callback" (when on_message returns).
    ack_mode: str = "manual"
    poll: float = 0.05  # seconds between the coordinator's store polls
    ready_file: str = ""  # a worker writes it once subscribed (tests, readiness probes)
    # A worker's Prometheus exporter on metrics_host (0 = off); the coordinator's is the
    # aggregator's metrics_port. Workers sharing a host each need their own (--metrics-port).
    worker_metrics_port: int = 0
    # The login of a worker's second connection, which sends the devices' acks ("" = the
    # worker's [mqtt] username; same password). A broker that binds client ids to logins
    # needs its own: `fedmq broker add-service` makes <worker login>-acks.
    ack_username: str = ""

    def __post_init__(self) -> None:
        if self.worker:
            validate_name(self.worker, "shard.worker")
        if self.ack_username:
            validate_name(self.ack_username, "shard.ack_username")
        validate_name(self.group, "shard.group")
        if self.ack_mode not in ACK_MODES:
            raise ConfigError(f"shard.ack_mode must be one of {ACK_MODES}, got {self.ack_mode!r}")
        if not (math.isfinite(self.poll) and 0 < self.poll <= 10):
            raise ConfigError(f"shard.poll must be in (0, 10] seconds, got {self.poll}")
        port = self.worker_metrics_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"shard.worker_metrics_port must be a port in [0, 65535] (0 = "
                              f"off), got {port!r}")


@dataclass(frozen=True)
class ShardConfig(AggregatorConfig):
    """:class:`AggregatorConfig` with ``[shard]``; see the module docstring."""

    selection: str = "any"
    eval_dataset: str = "none"
    shard: ShardSettings = field(default_factory=ShardSettings)

    def __post_init__(self) -> None:
        # What the sharded path cannot do first: its reason beats a follow-up complaint of
        # the single-process checks (e.g. dp's dp_population).
        if not isinstance(self.shard, ShardSettings):
            raise ConfigError("shard must be a ShardSettings")
        check_redis_url(self.shard.redis, "shard.redis")
        for name, allowed in UNSUPPORTED.items():
            if getattr(self, name) != allowed:
                raise ConfigError(
                    f"{name} = {getattr(self, name)!r} is not supported by the sharded ingest "
                    f"(it needs {name} = {allowed!r}; docs/scaling.md)"
                )
        if self.selection != "any":
            raise ConfigError(
                'the sharded ingest does not select devices: it needs selection = "any" '
                "(clients_per_round is the round's target)"
            )
        if self.mqtt.client_id:
            raise ConfigError(
                "mqtt.client_id is derived by the sharded services (fedmq-ingest-<fleet>-"
                "<worker>, fedmq-coordinator-<fleet>): remove it"
            )
        strategy = make_strategy(self.strategy, options=self.strategy_options())
        if not isinstance(strategy, MeanDeltaStrategy):
            raise ConfigError(
                f"strategy {self.strategy!r} needs every update; the sharded ingest merges "
                "sums (use fedavg, fedavgm, fedadam, fedyogi or fedadagrad)"
            )
        super().__post_init__()

    def for_worker(self) -> ShardConfig:
        """Refuse a worker without a name (every worker needs its own fixed one)."""
        if not self.shard.worker:
            raise ConfigError(
                "a shard worker needs a fixed name: shard.worker (or --worker, or "
                f"{ENV_PREFIX}SHARD_WORKER)"
            )
        return self


def load_shard_config(
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ShardConfig:
    """Defaults < TOML ``[aggregator]``/``[mqtt]``/``[shard]`` < ``FEDMQ_AGGREGATOR_*`` <
    ``overrides`` (field names, ``mqtt.<key>``, ``shard.<key>``)."""
    return load_config(
        ShardConfig,
        toml_path,
        section=TOML_SECTION,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        environ=environ,
        moved=MOVED,
    )


_COMMON: tuple[Flag, ...] = (
    ("--fleet", "fleet", str, "fleet name"),
    ("--redis", "shard.redis", str, "the store: redis://host:port/db"),
    ("--host", "mqtt.host", str, "MQTT broker host"),
    ("--port", "mqtt.port", int, "MQTT broker port"),
    ("--protocol", "mqtt.protocol", str, "MQTT version: 5 or 3.1.1 (NATS' MQTT gateway)"),
    ("--prefix", "topic_prefix", str, "topic prefix (tests)"),
    ("--model", "model", str, "zoo model or bundle directory"),
    ("--metrics-host", "metrics_host", str, "address the Prometheus exporter binds"),
)
#: Flags of ``fedmq aggregator shard-worker`` (and ``python -m aggregator.shard_worker``).
WORKER_FLAGS: tuple[Flag, ...] = (
    *_COMMON,
    ("--worker", "shard.worker", str, "this worker's fixed name: client id and partial key"),
    ("--group", "shard.group", str, "shared subscription group"),
    ("--registry", "registry", str, "device registry: signatures required"),
    ("--ack-mode", "shard.ack_mode", str,
     "manual (client.ack after the commit) or callback (when on_message returns)"),
    ("--session-expiry", "mqtt.session_expiry", int, "seconds the broker keeps the session"),
    ("--ready-file", "shard.ready_file", str, "written once subscribed (tests)"),
    ("--max-update-bytes", "max_update_bytes", int, "largest update payload accepted"),
    ("--metrics-port", "shard.worker_metrics_port", int, "Prometheus exporter port (0 = off)"),
    ("--ack-username", "shard.ack_username", str,
     "login of the connection that sends the devices' acks (default: the worker's)"),
    ("--ingest-queue-bytes", "ingest_queue_bytes", int,
     "bound of the queue between the network thread and the commits"),
)
#: Flags of ``fedmq aggregator shard-coordinator`` (and ``python -m
#: aggregator.shard_coordinator``).
COORDINATOR_FLAGS: tuple[Flag, ...] = (
    *_COMMON,
    ("--fallback-brokers", "mqtt.fallback_brokers", str,
     "host:port,... of other nodes of a broker cluster, tried in turn after a failed attempt"),
    ("--codec", "codec", str, "the update codec devices must use"),
    ("--strategy", "strategy", str, "a mean-delta strategy (fedavg, fedavgm, fedadam, ...)"),
    ("--server-lr", "server_lr", float, "server learning rate"),
    ("--target", "clients_per_round", int, "updates that close a round"),
    ("--min-updates", "min_updates", int, "fewest updates a round closes with at the deadline"),
    ("--round-timeout", "round_timeout", float, "seconds from opening to the deadline"),
    ("--rounds", "rounds", int, "stop after this model version (0: never)"),
    ("--poll", "shard.poll", float, "seconds between store polls"),
    ("--norm-bound", "norm_bound", str, "adaptive, fixed or off (docs/protocol.md)"),
    ("--norm-action", "norm_action", str, "clip or reject an update over the bound"),
    ("--max-update-norm", "max_update_norm", float, "fixed L2 ceiling (0 = none)"),
    ("--weight-cap-multiplier", "weight_cap_multiplier", float,
     "fold weight <= this x the median recent claim (0 = off)"),
    ("--max-claimed-examples", "max_claimed_examples", int, "largest num_examples claimed"),
    ("--metrics-port", "metrics_port", int, "Prometheus exporter port (0 = off)"),
    ("--eval-dataset", "eval_dataset", str,
     "held-out set each new model is evaluated on: digits, fashion-mnist, ... or an .npz "
     "(default: none)"),
    ("--eval-examples", "eval_examples", int, "held-out examples evaluated (0 = all)"),
)


def add_flags(
    parser: argparse.ArgumentParser, flags: tuple[Flag, ...], *, subcommand: bool = False
) -> None:
    """``--config FILE`` and ``flags`` (each overrides its setting). ``subcommand``: the
    parser is a role of ``fedmq aggregator``, whose own options must not be reset by it."""
    add_config_flags(parser, flags, tables="[aggregator], [mqtt] and [shard]",
                     subcommand=subcommand)


def config_from_args(args: argparse.Namespace, flags: tuple[Flag, ...]) -> ShardConfig:
    """The configuration: ``args.config`` < environment < the flags given."""
    return load_shard_config(
        getattr(args, "config", None),
        overrides=flag_overrides(args, flags),
    )
