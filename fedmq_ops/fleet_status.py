"""``fedmq status``: the fleet and the current round, live from the retained MQTT topics.

Subscribes (read-only) to ``status/+``, ``round`` and ``model`` of a fleet; the retained
messages give the picture at once, later messages update it. ``--watch`` redraws it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics
from fedmq_ops.observer import FleetObserver, FleetView

__all__ = ["add_parser", "federated_summary", "render"]


def _age(ts: float, now: float) -> str:
    if ts <= 0:
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def federated_summary(metrics: Mapping[str, float]) -> str:
    """", federated accuracy ..." of a model's metrics (the devices' held-out evaluation of
    the version the round started from; docs/strategies.md), or "" without one."""
    acc = metrics.get("fed_accuracy")
    if acc is None:
        return ""
    devices = int(metrics.get("fed_eval_devices", 0))
    lo, hi = metrics.get("fed_accuracy_min", acc), metrics.get("fed_accuracy_max", acc)
    out = (f", federated accuracy {acc * 100:.2f}% ({devices} device(s), "
           f"{lo * 100:.1f}-{hi * 100:.1f}%")
    version = metrics.get("fed_eval_version")
    out += f", of version {int(version)})" if version is not None else ")"
    pers = metrics.get("fed_personal_accuracy")
    if pers is not None:
        out += f", personalized {pers * 100:.2f}%"
    return out


def render(view: FleetView, fleet: str, out: TextIO, now: float | None = None) -> None:
    now = time.time() if now is None else now
    with view.lock:
        devices = dict(view.devices)
        rnd, model = view.round, view.model
        model_bytes, bad = view.model_bytes, view.bad_messages
    print(f"fleet {fleet}", file=out)
    if model is not None:
        acc = model.metrics.get("accuracy")
        acc_s = f", accuracy {acc * 100:.2f}%" if acc is not None else ""
        acc_s += federated_summary(model.metrics)
        eps = model.metrics.get("dp_epsilon")
        if eps is not None:  # DP: the central epsilon spent so far (docs/privacy.md)
            acc_s += f", DP epsilon {eps:.3f}"
        print(
            f"  model   version {model.version} (round {model.round_id}){acc_s}, "
            f"{model_bytes / 1000:.1f} KB",
            file=out,
        )
    else:
        print("  model   (none published)", file=out)
    if rnd is not None:
        sel = f"{len(rnd.selected)} selected" if rnd.selected else "open to all"
        left = rnd.deadline - now
        print(
            f"  round   {rnd.round_id} on version {rnd.base_version}, {sel}, quorum "
            f"{rnd.min_updates}, deadline in {left:.0f}s, {rnd.config.epochs} epoch(s) "
            f"lr {rnd.config.lr} codec {rnd.config.codec}",
            file=out,
        )
    online = sum(1 for s in devices.values() if s.state != "offline")
    print(f"  devices {len(devices)} known, {online} online", file=out)
    if devices:
        print(
            f"  {'device':<20} {'state':<9} {'round':>5} {'loss':>7} {'examples':>8} "
            f"{'train s':>7} {'eval acc':>8} {'seen':>5}  runtime",
            file=out,
        )
    for name in sorted(devices):
        s = devices[name]
        m = s.metrics
        loss = f"{m['loss']:.3f}" if "loss" in m else "-"
        ex = f"{m['examples']:.0f}" if "examples" in m else "-"
        tr = f"{m['train_seconds']:.1f}" if "train_seconds" in m else "-"
        rid = "-" if s.round_id is None else str(s.round_id)
        ev = f"{m['eval_accuracy'] * 100:.1f}%" if "eval_accuracy" in m else "-"
        print(
            f"  {name:<20} {s.state:<9} {rid:>5} {loss:>7} {ex:>8} {tr:>7} {ev:>8} "
            f"{_age(s.created_at, now):>5}  {s.runtime}",
            file=out,
        )
    if bad:
        print(f"  ({bad} undecodable messages ignored)", file=out)


def _run(args: argparse.Namespace) -> int:
    topics = Topics(args.fleet, args.topic_prefix)
    settings = MqttSettings(
        host=args.host,
        port=args.port,
        client_id="",
        protocol=args.protocol,
        clean_start=True,
        session_expiry=0,
        username=args.username,
        password=args.password,
        tls_ca=args.tls_ca,
    )
    observer = FleetObserver(settings, topics).start()
    try:
        time.sleep(args.wait)
        if not args.watch:
            render(observer.view, args.fleet, sys.stdout)
            return 0
        while True:
            sys.stdout.write("\x1b[2J\x1b[H")
            render(observer.view, args.fleet, sys.stdout)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
    finally:
        observer.close()


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the fleet and the current round from the status topics",
        description="Read the retained status, round and model topics of a fleet and print "
        "devices (state, last round, loss, examples, runtime) and the open round.",
    )
    p.add_argument("--fleet", default="demo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--protocol", default="5", choices=("5", "3.1.1"))
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--tls-ca", help="CA certificate for a TLS listener")
    p.add_argument("--wait", type=float, default=1.5, help="seconds to collect before printing")
    p.add_argument("--watch", action="store_true", help="keep redrawing until Ctrl-C")
    p.add_argument("--interval", type=float, default=2.0, help="redraw interval with --watch")
    p.set_defaults(func=_run)
