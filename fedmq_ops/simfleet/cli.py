"""``fedmq fleet simulate``: thousands of simulated devices against a real aggregator.

fedmq fleet simulate --devices 1000 --processes 2 --fleet demo --port 1883 --rounds 2
fedmq fleet simulate --devices 200 --arrival spread:30 --dropout 0.1 --registry devices.json
fedmq fleet simulate --devices 100 --train digits --split dirichlet:0.5 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq_ops.simfleet.plan import Arrival, FleetPlan
from fedmq_ops.simfleet.runner import FleetSpec, run_fleet
from fedmq_ops.simfleet.shard import ShardSettings

__all__ = ["add_parser"]

log = logging.getLogger(__name__)


def _passwords(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"password file {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(f"password file {path} must be a JSON object DEVICE -> PASSWORD")
    return {str(k): v for k, v in data.items()}


def _examples(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or LO-HI") from exc


def _simulate(args: argparse.Namespace) -> int:
    plan = FleetPlan(
        devices=args.devices, seed=args.seed, name=args.name, dropout=args.dropout,
        arrival=Arrival.parse(args.arrival), examples=args.examples,
        delta_scale=args.delta_scale,
    )
    settings = ShardSettings(
        host=args.host, port=args.port, fleet=args.fleet, topic_prefix=args.topic_prefix,
        protocol=args.protocol, keepalive=args.keepalive, password=args.password,
        passwords=_passwords(args.password_file), sign=args.registry is not None or args.sign,
        rounds=args.rounds, ack_timeout=args.ack_timeout, max_resends=args.max_resends,
        connect_batch=args.connect_batch, timeout=args.timeout,
        train_dataset=args.train or "", train_model=args.model, train_partition=args.split,
    )
    report = run_fleet(FleetSpec(plan, settings, args.processes), registry=args.registry)
    for line in report.lines():
        print(line, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.completed else 1


def add_parser(subparsers: Any) -> None:
    fleet = subparsers.add_parser("fleet", help="simulated fleets (load and scale tests)")
    sub = fleet.add_subparsers(dest="fleet_command", metavar="{simulate}", required=True)
    p = sub.add_parser(
        "simulate",
        help="run thousands of simulated devices against a real broker and aggregator",
        description="Run many device identities in a few processes, each its own MQTT "
        "connection (client id = device id), speaking the real protocol to a running "
        "aggregator: retained status, model and round topics, real encoded (and, with keys, "
        "signed) updates of synthetic deltas of the model's shapes, acks and resends. "
        "Exits 0 when ROUNDS new models were published and every update was answered. "
        "See docs/scaling.md.",
    )
    p.add_argument("--devices", type=int, default=100, help="number of devices (default 100)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes to spread the devices over (default 1; each is one thread)")
    p.add_argument("--rounds", type=int, default=1,
                   help="take part until this many new models are published (default 1)")
    p.add_argument("--fleet", default="demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"))
    p.add_argument("--keepalive", type=int, default=60)
    p.add_argument("--name", default="sim", help="device ids are NAME-00000, NAME-00001, ...")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the deltas, example counts, arrivals, dropouts and keys")
    p.add_argument("--arrival", default="at-once",
                   help="'at-once' (send when the round opens) or 'spread:SECONDS'")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="fraction of the devices that do not send in each round (default 0)")
    p.add_argument("--examples", type=_examples, default=(16, 48), metavar="LO-HI",
                   help="range of the example counts the updates claim (default 16-48)")
    p.add_argument("--delta-scale", type=float, default=0.01,
                   help="standard deviation of the synthetic deltas (default 0.01)")
    p.add_argument("--train", metavar="DATASET",
                   help="train for real (LiteRT) on each device's own shard of DATASET "
                   "(digits, fashion-mnist) instead of sending synthetic deltas")
    p.add_argument("--model", default="digits-mlp",
                   help="with --train: the model bundle or prebuilt name (the aggregator's)")
    p.add_argument("--split", default="iid",
                   help="with --train: how the dataset is split over the devices "
                   "(iid, dirichlet:0.5, ...; default iid)")
    p.add_argument("--ack-timeout", type=float, default=60.0,
                   help="seconds before an unanswered update is resent (default 60)")
    p.add_argument("--max-resends", type=int, default=5)
    p.add_argument("--connect-batch", type=int, default=64,
                   help="connections opened at once per process (default 64)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="give up after this many seconds (exit 1)")
    p.add_argument("--registry", type=Path,
                   help="enrol the devices' keys (derived from --seed) in this registry JSON "
                   "and sign every update")
    p.add_argument("--sign", action="store_true",
                   help="sign updates (keys already enrolled, e.g. by an earlier --registry)")
    p.add_argument("--password", help="MQTT password of every device (username = device id)")
    p.add_argument("--password-file", type=Path,
                   help="JSON object DEVICE -> PASSWORD (username = device id)")
    p.add_argument("--json", type=Path, help="write the full report (per process, per round)")
    p.set_defaults(func=_simulate)
