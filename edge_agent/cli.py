"""Command line of the edge agent: ``fedmq agent ...`` and ``python -m edge_agent ...``.

Every setting of :class:`~edge_agent.config.AgentConfig` is a flag (those of its ``[mqtt]``
table without a prefix: ``--host``, ``--tls-ca``); flags override the environment
(``FEDMQ_AGENT_*``), which overrides the ``[agent]`` and ``[mqtt]`` tables of ``--config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence
from typing import Any

from edge_agent.config import ENV_PREFIX, AgentConfig, load_agent_config
from fedmq.net.mqtt import MqttSettings

__all__ = ["add_parser", "build_parser", "main", "run_command"]

_HELP: dict[str, str] = {
    "device_id": "device id, also the MQTT client id (default: the id kept in --state-dir, "
    "made on first start)",
    "fleet": "fleet (federation) name",
    "host": "broker host",
    "port": "broker port",
    "topic_prefix": "topic prefix before fl/<fleet>/ (default: none)",
    "state_dir": "directory for the device state and the outbox",
    "model": "model bundle directory, or the name of a prebuilt bundle (e.g. digits-mlp)",
    "source": "local data source: a dataset name (digits, fashion-mnist, ...) or "
    "npz:/csv:/idx:PATH?options",
    "partition": "partition spec (iid, dirichlet:0.5, classes:2, ...) to take one slice of a "
    "shared dataset (experiments)",
    "num_clients": "number of partition slices",
    "client_index": "this device's slice, 0..num_clients-1",
    "seed": "seed of the partition and of per-round sampling",
    "sample_fraction": "fraction of the local examples used per round",
    "max_examples": "cap on the examples used per round",
    "class_balanced": "sample each round's examples class-balanced",
    "augment": "augmentation spec (e.g. shift=2,noise=0.05)",
    "num_threads": "LiteRT interpreter threads (TensorFlow intra-op threads for keras)",
    "train_delay": "seconds to sleep before each training (simulates a slower device)",
    "backend": "training backend: litert (no TensorFlow needed) or keras (needs TensorFlow)",
    "ack_timeout": "seconds to wait for an ack before re-sending an update",
    "max_resends": "re-sends of one update before waiting for the round to close",
    "signing_key": "Ed25519 device key file for signing updates (created if missing; "
    "see `fedmq keygen`)",
    "peer_registry": "the fleet's registry JSON: secure rounds verify every device's keys "
    "in the roster against it (docs/privacy.md)",
    "eval_fraction": "federated evaluation: fraction of the local examples held out (never "
    "trained on, never sent) to evaluate each round's model on; 0 = off",
    "eval_personal": "also evaluate the locally trained model (personalized accuracy)",
    "eval_only": "never train: only evaluate each round's model on all local examples",
    "he_context": "public CKKS context of `fedmq he keygen`: take part in encrypted rounds",
}
# [mqtt] settings; the agent's client id is its device id, so no --client-id.
_MQTT_HELP: dict[str, str] = {
    "host": "broker host",
    "port": "broker port",
    "protocol": "MQTT protocol: 5, or 3.1.1 for brokers without v5",
    "keepalive": "MQTT keepalive in seconds",
    "session_expiry": "seconds the broker keeps this device's session (and its acks) offline",
    "username": "MQTT user name",
    "password": "MQTT password (prefer the FEDMQ_AGENT_MQTT_PASSWORD environment variable)",
    "tls_ca": "CA certificate file: enables TLS",
    "tls_cert": "client certificate file (mutual TLS)",
    "tls_key": "client private key file (mutual TLS)",
    "tls_insecure": "do not check that the broker's certificate names the host (tests only)",
    "reconnect_min": "first reconnect delay in seconds (doubles up to --reconnect-max)",
    "reconnect_max": "longest reconnect delay in seconds",
    "retry_forever": "keep retrying when the broker refuses the credentials or TLS fails at "
    "start-up (default: exit with code 1)",
}


def _metavar(tp: Any) -> str:
    for arg in typing.get_args(tp) or (tp,):
        if arg is type(None):
            continue
        return {int: "N", float: "X", str: "TEXT"}.get(arg, "PATH")
    return "VALUE"


def _settings() -> list[tuple[str, str, Any, Any, str]]:
    """(flag, dest, type, default, help) of every setting: AgentConfig's fields, and for
    ``mqtt`` the keys of :class:`MqttSettings` (dest ``mqtt.<key>``)."""
    out: list[tuple[str, str, Any, Any, str]] = []
    hints = typing.get_type_hints(AgentConfig)
    mqtt_hints = typing.get_type_hints(MqttSettings)
    for field in dataclasses.fields(AgentConfig):
        if field.name == "mqtt":
            for sub in dataclasses.fields(MqttSettings):
                if sub.name in _MQTT_HELP:
                    out.append((sub.name, f"mqtt.{sub.name}", mqtt_hints[sub.name],
                                sub.default, _MQTT_HELP[sub.name]))
            continue
        out.append((field.name, field.name, hints[field.name], field.default,
                    _HELP.get(field.name, field.name)))
    return out


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file; settings from its [agent] and [mqtt] tables"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved settings and exit"
    )
    group = parser.add_argument_group(
        f"settings (also TOML [agent] keys and {ENV_PREFIX}<NAME> variables; the broker "
        f"settings are [mqtt] keys and {ENV_PREFIX}MQTT_<NAME> variables)"
    )
    for name, dest, tp, default, help_text in _settings():
        flag = "--" + name.replace("_", "-")
        if default is not dataclasses.MISSING and default not in (None, "", False):
            help_text += f" (default: {default})"
        if tp is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, default=None, metavar=_metavar(tp),
                               help=help_text)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``agent`` subcommand on a ``fedmq`` subparsers object."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run the edge agent on a device",
        description="Run the edge agent: follow the global model and the rounds of a fleet, "
        "train on local data with LiteRT and publish quantized updates. Stops cleanly on "
        "SIGTERM/SIGINT.",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_command)
    return parser


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    overrides = {
        dest: getattr(args, dest)
        for _, dest, _, _, _ in _settings()
        if getattr(args, dest, None) is not None
    }
    return load_agent_config(args.config, overrides)


def run_command(args: argparse.Namespace) -> int:
    """Run the agent until stopped (the ``func`` of the subcommand)."""
    config = config_from_args(args)
    if args.print_config:
        print(json.dumps(config.redacted(), indent=2, default=str))
        return 0
    config.mqtt.check_files()  # a bad TLS file: one line before anything starts
    from edge_agent.agent import EdgeAgent  # LiteRT and paho load only when running

    EdgeAgent(config).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent",
        description="Run the fedmq edge agent (same as `fedmq agent`).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    _add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedmq.logs import run_logged

    return run_logged(run_command, args, "edge_agent")
