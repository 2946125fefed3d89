"""``fedmq aggregator`` / ``python -m aggregator``: run the aggregator service."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from aggregator.config import (
    ENV_PREFIX,
    EVAL_DATASETS,
    SELECTIONS,
    load_aggregator_config,
)
from fedmq.errors import ConfigError
from fedmq.update.codecs import codec_names
from fedmq.update.strategies import strategy_names

__all__ = ["add_arguments", "add_parser", "command", "main"]

_DESCRIPTION = (
    "Run the federated-learning aggregator: collect device updates over MQTT, fold them into "
    "a running weighted mean, apply the server strategy, evaluate, persist and publish the "
    "next global model. Settings come from defaults < --config FILE ([aggregator] table, "
    f"broker in [mqtt]) < environment ({ENV_PREFIX}<SETTING>, e.g. {ENV_PREFIX}FLEET; "
    f"{ENV_PREFIX}MQTT_<KEY>, e.g. {ENV_PREFIX}MQTT_PASSWORD) < these flags."
)

# (flag, dest, type, help); every dest is a field of AggregatorConfig ("mqtt.<key>": [mqtt]).
_OPTIONS: tuple[tuple[str, str, Any, str], ...] = (
    ("--fleet", "fleet", str, "fleet (federation) name (default: default)"),
    ("--host", "mqtt.host", str, "MQTT broker host (default: 127.0.0.1)"),
    ("--port", "mqtt.port", int, "MQTT broker port (default: 1883)"),
    ("--topic-prefix", "topic_prefix", str, "prefix before fl/<fleet>/... (default: none)"),
    ("--client-id", "mqtt.client_id", str,
     "fixed MQTT client id (default: fedmq-aggregator-<fleet>)"),
    ("--state-dir", "state_dir", str, "state directory: SQLite + model files"),
    ("--model", "model", str, "model bundle directory or prebuilt name (default: digits-mlp)"),
    ("--eval-dataset", "eval_dataset", str,
     f"held-out set: {', '.join(EVAL_DATASETS)} or an .npz with x/y (default: digits)"),
    ("--eval-examples", "eval_examples", int, "cap on evaluation examples (0 = all)"),
    ("--rounds", "rounds", int, "stop after this many closed rounds (0 = run forever)"),
    ("--clients-per-round", "clients_per_round", int, "devices selected / updates targeted"),
    ("--min-updates", "min_updates", int, "quorum: updates needed to close a round"),
    ("--min-devices", "min_devices", int, "online devices needed before opening a round"),
    ("--selection", "selection", str,
     f"{' or '.join(SELECTIONS)}: name sampled devices, or let any device contribute"),
    ("--round-timeout", "round_timeout", float, "seconds from opening to the deadline"),
    ("--abandon-after", "abandon_after", float,
     "grace seconds after the deadline before a round without quorum is abandoned"),
    ("--round-policy", "round_policy", str,
     "sync (default), fedbuff (docs/rounds.md) or secagg (docs/privacy.md)"),
    ("--secagg-clip", "secagg_clip", float,
     "secagg: per-value clip of deltas; the round's int8 scale is clip/127"),
    ("--secagg-phase-timeout", "secagg_phase_timeout", float,
     "secagg: seconds per phase (keys, shares, unmasking)"),
    ("--secagg-min-survivors", "secagg_min_survivors", int,
     "secagg: fewer masked inputs than this abandon the round"),
    ("--buffer-size", "buffer_size", int, "fedbuff: a new model every this many updates"),
    ("--max-staleness", "max_staleness", int,
     "fedbuff: updates trained more versions behind than this are refused"),
    ("--staleness-exponent", "staleness_exponent", float,
     "fedbuff: fold weight x (1 + staleness) ** -exponent (default 0.5)"),
    ("--flush-after", "flush_after", float,
     "fedbuff: apply a partial buffer after this many seconds (0 = never)"),
    ("--epochs", "epochs", int, "local epochs per round"),
    ("--lr", "lr", float, "device learning rate"),
    ("--codec", "codec", str, f"update codec devices use: {', '.join(codec_names())}"),
    ("--train-max-examples", "train_max_examples", int, "cap on local examples per round"),
    ("--strategy", "strategy", str, f"server strategy: {', '.join(strategy_names())}"),
    ("--server-lr", "server_lr", float, "server learning rate (strategy default if unset)"),
    ("--server-momentum", "server_momentum", float, "FedAvgM momentum"),
    ("--seed", "seed", int, "seed for device sampling and evaluation subsets"),
    ("--max-update-bytes", "max_update_bytes", int, "largest update payload accepted"),
    ("--downlink", "downlink", str,
     "how models reach devices: full, or a codec for deltas (docs/protocol.md)"),
    ("--snapshot-every", "snapshot_every", int,
     "compressed downlink: a full snapshot every this many versions"),
    ("--downlink-window", "downlink_window", int,
     "compressed downlink: retained deltas (>= --snapshot-every)"),
    ("--max-claimed-examples", "max_claimed_examples", int,
     "largest num_examples (weight) one update may claim"),
    ("--protocol", "mqtt.protocol", str, "MQTT protocol: 5, or 3.1.1 for brokers without v5"),
    ("--keepalive", "mqtt.keepalive", int, "MQTT keepalive seconds"),
    ("--session-expiry", "mqtt.session_expiry", int, "seconds the broker keeps our session"),
    ("--reconnect-min", "mqtt.reconnect_min", float,
     "first reconnect delay in seconds (doubles up to --reconnect-max)"),
    ("--reconnect-max", "mqtt.reconnect_max", float, "longest reconnect delay in seconds"),
    ("--username", "mqtt.username", str, "MQTT username"),
    ("--password", "mqtt.password", str, f"MQTT password (prefer {ENV_PREFIX}MQTT_PASSWORD)"),
    ("--tls-ca", "mqtt.tls_ca", str, "CA file: enables TLS"),
    ("--tls-cert", "mqtt.tls_cert", str, "client certificate (with --tls-key)"),
    ("--tls-key", "mqtt.tls_key", str, "client key"),
    ("--registry", "registry", str,
     "JSON registry of enrolled device keys (`fedmq enroll`): updates must be signed"),
    ("--he-context", "he_context", str,
     "public CKKS context of `fedmq he keygen`: encrypted rounds (docs/privacy.md)"),
    ("--metrics-port", "metrics_port", int, "Prometheus exporter port (0 = off)"),
    ("--metrics-host", "metrics_host", str,
     "address the Prometheus exporter binds (default: 127.0.0.1; 0.0.0.0 = all)"),
    ("--log-every", "log_every", int, "log a progress line every N rounds"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with an [aggregator] and an [mqtt] table"
    )
    for flag, dest, kind, help_text in _OPTIONS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=help_text,
                            metavar=flag[2:].upper().replace("-", "_"))
    parser.add_argument(
        "--require-signatures", dest="require_signatures",
        action=argparse.BooleanOptionalAction, default=None,
        help="reject unsigned updates and unknown devices (default: on when --registry is "
        "set; --no-require-signatures only verifies signed updates of enrolled devices)",
    )
    parser.add_argument(
        "--retry-forever", dest="mqtt.retry_forever", action=argparse.BooleanOptionalAction,
        default=None, help="keep retrying when the broker refuses the credentials or TLS "
        "fails at start-up (default: exit with code 1)",
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``aggregator`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "aggregator",
        help="run the aggregator service",
        description=_DESCRIPTION,
    )
    add_arguments(parser)
    parser.set_defaults(func=command)
    _add_shard_roles(parser)
    return parser


def _add_shard_roles(parser: argparse.ArgumentParser) -> None:
    """``fedmq aggregator shard-worker`` / ``shard-coordinator`` (docs/scaling.md): the
    sharded ingest's processes, configured by the same TOML plus a ``[shard]`` table."""
    from aggregator.shard_config import COORDINATOR_FLAGS, WORKER_FLAGS, add_flags

    roles = parser.add_subparsers(dest="shard_role", metavar="[ROLE]")
    worker = roles.add_parser(
        "shard-worker", help="a sharded ingest worker (docs/scaling.md)",
        description="One sharded ingest worker: a member of the fleet's shared subscription; "
        "it checks, bounds and folds updates into its partial sum in Redis. Every worker "
        "needs its own fixed name (shard.worker or --worker).",
    )
    add_flags(worker, WORKER_FLAGS, subcommand=True)
    worker.set_defaults(func=_shard_worker)
    coordinator = roles.add_parser(
        "shard-coordinator", help="the sharded ingest's coordinator (docs/scaling.md)",
        description="The sharded ingest's coordinator: opens rounds (with their codec and "
        "ingest bounds), merges the workers' partials exactly and publishes the model.",
    )
    add_flags(coordinator, COORDINATOR_FLAGS, subcommand=True)
    coordinator.set_defaults(func=_shard_coordinator)
    _add_gateway_roles(roles)


def _add_gateway_roles(roles: Any) -> None:
    """``fedmq aggregator site-gateway`` / ``partial-receiver`` (docs/scaling.md, "Site
    gateways"), each configured by its own strict TOML (aggregator/site_config.py)."""
    from aggregator.site_config import add_gateway_flags, add_receiver_flags

    gateway = roles.add_parser(
        "site-gateway", help="a site gateway's aggregator (docs/scaling.md)",
        description="A site gateway's aggregator, on the site broker: checks and folds its "
        "devices' updates and sends one signed partial per round to the cloud over the "
        "bridge. Settings: a [gateway] and an [mqtt] table (the site broker), "
        "FEDMQ_GATEWAY_* environment, these flags.",
    )
    add_gateway_flags(gateway, subcommand=True)
    gateway.set_defaults(func=_site_gateway)
    receiver = roles.add_parser(
        "partial-receiver", help="the cloud end of the site gateways (docs/scaling.md)",
        description="Commits the site gateways' signed partials to the sharded ingest's "
        "store, where the coordinator merges them. Settings: a [receiver] and an [mqtt] "
        "table (the cloud broker), FEDMQ_RECEIVER_* environment, these flags.",
    )
    add_receiver_flags(receiver, subcommand=True)
    receiver.set_defaults(func=_partial_receiver)


def _only_role_options(args: argparse.Namespace, flags: tuple[tuple[str, str, Any, str], ...],
                       role: str) -> None:
    """Refuse a single-process option given before the role (it would be ignored)."""
    allowed = {dest for _, dest, _, _ in flags}
    given = [flag for flag, dest, _, _ in _OPTIONS
             if dest not in allowed and getattr(args, dest, None) is not None]
    given += [f"--{d.replace('_', '-')}" for d in ("require_signatures", "mqtt.retry_forever")
              if getattr(args, d, None) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: not an option of `fedmq aggregator {role}` (set it in the "
            "config file's [aggregator] table)"
        )


def _shard_worker(args: argparse.Namespace) -> int:
    from aggregator.shard_config import WORKER_FLAGS
    from aggregator.shard_worker import command as run_worker  # imports redis: only here

    _only_role_options(args, WORKER_FLAGS, "shard-worker")
    return run_worker(args)


def _shard_coordinator(args: argparse.Namespace) -> int:
    from aggregator.shard_config import COORDINATOR_FLAGS
    from aggregator.shard_coordinator import command as run_coordinator

    _only_role_options(args, COORDINATOR_FLAGS, "shard-coordinator")
    return run_coordinator(args)


def _site_gateway(args: argparse.Namespace) -> int:
    from aggregator.site_config import GATEWAY_FLAGS
    from aggregator.site_gateway import command as run_gateway

    _only_role_options(args, GATEWAY_FLAGS, "site-gateway")
    return run_gateway(args)


def _partial_receiver(args: argparse.Namespace) -> int:
    from aggregator.partial_receiver import command as run_receiver  # imports redis
    from aggregator.site_config import RECEIVER_FLAGS

    _only_role_options(args, RECEIVER_FLAGS, "partial-receiver")
    return run_receiver(args)


def command(args: argparse.Namespace) -> int:
    """Load the configuration from ``args`` and run the service."""
    from aggregator.service import run

    overrides = {dest: getattr(args, dest, None) for _, dest, _, _ in _OPTIONS}
    for dest in ("require_signatures", "mqtt.retry_forever"):
        overrides[dest] = getattr(args, dest, None)
    config = load_aggregator_config(args.config, overrides=overrides)
    config.mqtt.check_files()  # a bad TLS file: one line before anything starts
    return run(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aggregator", description=_DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-vv for debug")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    add_arguments(parser)
    args = parser.parse_args(argv)
    from fedmq.logs import run_logged

    return run_logged(command, args, "aggregator")
