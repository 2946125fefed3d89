"""The sharded ingest under a simulated fleet: 1 / 2 / 4 workers x devices x models.

The same fleet as ``bench_fleet_load.py`` (``fedmq_ops.simfleet``: one MQTT connection per
device, int8 synthetic deltas of the model's shapes, every device sending when a round
opens), but the aggregation is the sharded one, started through the ``fedmq`` command with
one strict TOML config (docs/scaling.md): ``fedmq aggregator shard-worker`` x N (fixed
names, persistent sessions, ``$share`` subscription, manual PUBACK after the Redis commit)
and ``fedmq aggregator shard-coordinator``, on a Mosquitto and a Redis of their own
(``appendfsync always``: every committed partial is on disk before its PUBACK). The ingest
bounds are on (the defaults: adaptive norm bound with clip, weight cap). Per cell:

- accepted updates/s per round (accepted / time from the first update sent to the last
  accept ack);
- CPU seconds per accepted update: the workers + coordinator + Redis ("sharded
  aggregator"), and the broker (``/proc/PID/stat``, from before the fleet connects to after
  it leaves, so it includes the connection storm and the model sent to every device);
- peak RSS (VmHWM) of every process;
- seconds from the last accept ack to the new model reaching the first device;
- lost / double counted: a round's contributors (the coordinator's close line, which it
  writes only when the merged partials hold exactly as many updates as there are claims,
  one per device) against the devices that sent; accepted acks against the plan.

Run every cell under the shared lock, one at a time (``--cell`` runs one and appends it)::

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_shard_fleet.py \\
        --cell digits-mlp:1000:2
    .venv/bin/python bench/bench_shard_fleet.py --plot     # the table and the PNG
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_fleet_load import cpu_seconds, peak_rss_mb
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmq.net.localbroker import BrokerOptions, LocalBroker  # noqa: E402
from fedmq.net.localredis import LocalRedis, RedisOptions  # noqa: E402
from fedmq.net.procs import stop_process  # noqa: E402
from fedmq_ops.simfleet import Arrival, FleetPlan, FleetSpec, ShardSettings, run_fleet  # noqa: E402
from fedmq_ops.simfleet.limits import raise_nofile  # noqa: E402

OUT = ROOT / "bench/results/shard_fleet.json"
PNG = ROOT / "bench/results/shard_fleet.png"
_STOPPED = re.compile(r"largest group commit (\d+), queue peak (\d+) bytes")
_CLOSED = re.compile(r"round (\d+) closed: (\d+) update\(s\) from (\d+) worker")

CONFIG = """\
[aggregator]
fleet = "{fleet}"
topic_prefix = "{prefix}"
model = "{model}"
codec = "int8"
clients_per_round = {devices}
min_updates = {devices}
round_timeout = {timeout}
rounds = 0

[mqtt]
host = "{host}"
port = {port}
session_expiry = 3600

[shard]
redis = "{redis}"
"""


def _wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def run_cell(model: str, devices: int, workers: int, rounds: int, processes: int,
             timeout: float, workdir: Path) -> dict[str, Any]:
    fleet, prefix = "load", f"s{uuid.uuid4().hex[:8]}"
    broker = LocalBroker(BrokerOptions(), workdir=workdir / "mosquitto", kind="mosquitto")
    redis_server = LocalRedis(RedisOptions(appendfsync="always"), workdir=workdir / "redis")
    broker.start()
    redis_server.start()
    config = workdir / "fleet.toml"
    config.write_text(CONFIG.format(
        fleet=fleet, prefix=prefix, model=model, devices=devices, timeout=timeout,
        host=broker.host, port=broker.port, redis=redis_server.url))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("FEDMQ_AGGREGATOR_")}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, *args: str) -> None:
        with open(workdir / f"{name}.log", "wb") as logf:
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedmq_ops.cli", "aggregator", *args,
                 "--config", str(config)], stdout=logf, stderr=subprocess.STDOUT, env=env,
                cwd=ROOT)

    try:
        for i in range(workers):
            ready = workdir / f"w{i}.ready"
            spawn(f"w{i}", "shard-worker", "--worker", f"w{i}", "--ready-file", str(ready))
            _wait(ready.exists, 60, f"worker w{i}")
        spawn("coordinator", "shard-coordinator")
        time.sleep(2.0)  # the coordinator opens round 1 and publishes it (retained)
        assert broker._proc is not None and redis_server._proc is not None
        pids = {name: p.pid for name, p in procs.items()}
        pids["mosquitto"], pids["redis"] = broker._proc.pid, redis_server._proc.pid
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        plan = FleetPlan(devices, seed=1, name="dev", arrival=Arrival.parse("at-once"))
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=fleet,
                                 topic_prefix=prefix, rounds=rounds, timeout=timeout,
                                 ack_timeout=max(60.0, timeout / 4))
        t0 = time.time()
        report = run_fleet(FleetSpec(plan, settings, processes))
        wall = time.time() - t0
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
        rss = {k: peak_rss_mb(p) for k, p in pids.items()}
    finally:
        for p in procs.values():
            stop_process(p, 30)
        broker.stop()
        redis_server.stop()
    stops = {f"w{i}": _STOPPED.findall((workdir / f"w{i}.log").read_text(errors="replace"))
             for i in range(workers)}
    closed = {int(m[1]): (int(m[2]), int(m[3])) for m in
              _CLOSED.finditer((workdir / "coordinator.log").read_text(errors="replace"))}
    accepted = report.total("accepted")
    per_round = []
    lost = duplicated = 0
    merged = report.rounds()
    for rid in range(1, rounds + 1):
        senders = len(plan.senders(rid))
        contributors = closed.get(rid, (0, 0))[0]
        lost += max(0, senders - contributors)
        duplicated += max(0, contributors - senders)
        t = merged.get(rid)
        span = (t.last_ack - max(t.opened_at, t.first_send)) if t and t.last_ack else 0.0
        per_round.append({
            "round": rid, "contributors": contributors, "senders": senders,
            "accepted_acks": t.accepted if t else 0,
            "ingest_seconds": span,
            "updates_per_second": (t.accepted / span) if t and span > 0 else 0.0,
            # the devices' acks can arrive after the model (the worker's acks queue behind
            # its incoming updates): the rate to the model is the ingest's own
            "first_send_to_model_seconds":
                (t.model_seen - max(t.opened_at, t.first_send)) if t and t.model_seen else None,
            "model_after_last_ack_seconds":
                (t.model_seen - t.last_ack) if t and t.model_seen and t.last_ack else None,
        })
    side = [k for k in cpu if k != "mosquitto"]
    return {
        "model": model, "devices": devices, "workers": workers, "rounds": rounds,
        "processes": processes, "completed": report.completed, "accepted": accepted,
        "lost": lost, "duplicated": duplicated, "rejected": report.rejected,
        "resent": report.total("resent"), "wall_seconds": wall, "per_round": per_round,
        "cpu_seconds": cpu,
        # per worker: (largest group commit, peak bytes in its ingest queue) at its stop
        "worker_batches": {k: [int(x) for x in v[-1]] for k, v in stops.items() if v},
        "sharded_cpu_ms_per_update": 1000 * sum(cpu[k] for k in side) / max(accepted, 1),
        "worker_cpu_ms_per_update":
            1000 * sum(cpu[k] for k in side if k.startswith("w")) / max(accepted, 1),
        "redis_cpu_ms_per_update": 1000 * cpu["redis"] / max(accepted, 1),
        "broker_cpu_ms_per_update": 1000 * cpu["mosquitto"] / max(accepted, 1),
        "fleet_cpu_ms_per_update":
            1000 * sum(s.cpu_seconds for s in report.shards) / max(accepted, 1),
        "peak_rss_mb": {**rss, "fleet_processes": [s.peak_rss_mb for s in report.shards]},
        "connect_seconds": max(s.connect_seconds for s in report.shards),
    }


def _to_model(x: dict[str, Any]) -> float:
    """Updates/s from the first send to the model (a round's contributors / that span)."""
    span = x["ingest_seconds"] + (x["model_after_last_ack_seconds"] or 0.0)
    return x["contributors"] / span if span > 0 else 0.0


def _row(r: dict[str, Any]) -> str:
    pr = r["per_round"]
    rates = " / ".join(f"{_to_model(x):,.0f} ({x['updates_per_second']:,.0f})" for x in pr)
    close = pr[-1]["model_after_last_ack_seconds"]
    rss = r["peak_rss_mb"]
    workers = [v for k, v in rss.items() if re.fullmatch(r"w\d+", k)]
    return (f"| {r['model']} | {r['devices']:,} | {r['workers']} | {r['accepted']:,} | "
            f"{r['lost']} | {r['duplicated']} | "
            f"{rates} | "
            f"{r['sharded_cpu_ms_per_update']:.2f} | {r['broker_cpu_ms_per_update']:.2f} | "
            f"{max(workers):.0f} | {rss['coordinator']:.0f} | {rss['redis']:.0f} | "
            f"{rss['mosquitto']:.0f} | {max(rss['fleet_processes']):.0f} | "
            f"{close if close is not None else float('nan'):.2f} | {r['wall_seconds']:.1f} |")


HEADER = ("| model | devices | workers | accepted | lost | dup | "
          "upd/s per round to the model (to the last ack) | "
          "sharded ms/upd | broker ms/upd | worker MiB (max) | coord MiB | redis MiB | "
          "mosquitto MiB | fleet proc MiB | last ack -> model s | wall s |\n"
          "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {1: "-", 2: "--", 4: ":"}
    for model, marker in (("digits-mlp", "o"), ("fmnist-cnn", "s")):
        for w in (1, 2, 4):
            rows = sorted((r for r in results if r["model"] == model and r["workers"] == w),
                          key=lambda r: r["devices"])
            if not rows:
                continue
            xs = [r["devices"] for r in rows]
            label = f"{model}, {w} worker{'s' if w > 1 else ''}"
            ax1.plot(xs, [_to_model(r["per_round"][-1]) for r in rows],
                     marker=marker, linestyle=styles[w], label=label)
            ax2.plot(xs, [max(v for k, v in r["peak_rss_mb"].items() if re.fullmatch(r"w\d+", k))
                          for r in rows], marker=marker, linestyle=styles[w],
                     label=f"{label}: a worker")
            if w == 1:
                ax2.plot(xs, [r["peak_rss_mb"]["mosquitto"] for r in rows], marker=marker,
                         linestyle="-.", color="grey", label=f"{model}: mosquitto")
    ax1.set(xscale="log", xlabel="simulated devices",
            ylabel="updates/s, first send to model (last round)",
            title="sharded ingest: throughput")
    ax2.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="peak RSS (MiB)",
            title="peak RSS per process")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle("2-core shared VM, Debian 12, Python 3.11; one Mosquitto, one Redis "
                 "(appendfsync always), bench/bench_shard_fleet.py", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", action="append", default=[],
                   help="MODEL:DEVICES:WORKERS (repeatable); results are appended to --out")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", type=int, default=2, help="fleet processes (default 2)")
    p.add_argument("--timeout", type=float, default=1200.0, help="per round")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--png", type=Path, default=PNG)
    p.add_argument("--plot", action="store_true", help="print the table and draw the PNG")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    data: dict[str, Any] = (json.loads(args.out.read_text()) if args.out.exists()
                            else {"machine": machine_info(("numpy", "paho-mqtt", "redis")),
                                  "results": []})
    for cell in args.cell:
        model, devices, workers = cell.split(":")
        soft, hard = raise_nofile()
        with tempfile.TemporaryDirectory(prefix="fedmq-shard-fleet-") as tmp:
            r = run_cell(model, int(devices), int(workers), args.rounds,
                         min(args.processes, int(devices)), args.timeout, Path(tmp))
        r["nofile"] = [soft, hard]
        r["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data["results"] = [x for x in data["results"] if (x["model"], x["devices"], x["workers"])
                           != (r["model"], r["devices"], r["workers"])] + [r]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
        print(HEADER)
        print(_row(r), flush=True)
    if args.plot:
        rows = sorted(data["results"], key=lambda r: (r["model"], r["devices"], r["workers"]))
        print(HEADER)
        for r in rows:
            print(_row(r))
        plot(rows, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
