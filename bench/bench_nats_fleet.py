"""The sharded ingest on a 3-node NATS cluster under the simulated fleet: 1 / 2 workers x devices.

The fleet of ``bench_shard_fleet.py`` (``fedmq_ops.simfleet``: one MQTT connection per
device, int8 synthetic deltas of the model's shapes, every device sending when a round
opens), here on MQTT 3.1.1 (NATS' gateway has no MQTT 5) and spread over the three nodes by
device id (``ShardSettings.brokers``). The aggregation is docs/scaling.md "Clustered broker:
NATS": ``python -m aggregator.nats_worker`` x N pulling the gateway's ``$MQTT_msgs`` stream
(R3) through one durable consumer (default ``--batch``/``--ack-wait``), a Redis of its own
(``appendfsync always``) and ``fedmq aggregator shard-coordinator`` (the same strict TOML as
``bench_shard_fleet.py``, plus ``--protocol 3.1.1`` and the two other nodes as
``--fallback-brokers``). The ingest bounds are on (the defaults). Per cell, as in
``bench_shard_fleet.py``: accepted updates/s per round, CPU seconds per accepted update of
the workers, the coordinator, Redis and the NATS nodes (``/proc/PID/stat``, from before the
fleet connects to after it leaves), peak RSS of every process, seconds from the last accept
ack to the model, lost / double counted (the coordinator's close lines against the plan),
and the load average before and after the cell (the machine is shared).

Run every cell under the shared lock, one at a time (``--cell`` runs one and appends it)::

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_nats_fleet.py \\
        --cell digits-mlp:1000:2
    .venv/bin/python bench/bench_nats_fleet.py --table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench_fleet_load import cpu_seconds, peak_rss_mb
from bench_shard_fleet import _CLOSED, CONFIG, _to_model, _wait
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.shard_store import ShardStore  # noqa: E402
from fedmq.net.localnats import LocalNatsCluster  # noqa: E402
from fedmq.net.localredis import LocalRedis, RedisOptions  # noqa: E402
from fedmq.net.procs import stop_process  # noqa: E402
from fedmq_ops.simfleet import (  # noqa: E402
    Arrival,
    FleetPlan,
    FleetReport,
    FleetSpec,
    ShardSettings,
    run_fleet,
)
from fedmq_ops.simfleet.limits import raise_nofile  # noqa: E402

OUT = ROOT / "bench/results/nats_fleet.json"
NODES = 3
#: The JetStream consumer NATS' gateway makes per QoS 1 subscription of a device (model,
#: round, its ack topic: 3 per device): NATS' default (the stream's 3 replicas, on disk) or
#: one replica in memory (``mqtt.consumer_replicas``/``consumer_memory_storage``).
DEVICE_CONSUMERS = {"r3-file": (0, False), "r1-memory": (1, True)}


class Cell:
    """One run: the cluster, Redis, the coordinator and the workers, then the fleet."""

    def __init__(self, model: str, devices: int, workers: int, consumers: str,
                 workdir: Path) -> None:
        self.model, self.devices, self.workers, self.workdir = model, devices, workers, workdir
        self.consumers = consumers
        self.fleet, self.prefix = "load", f"n{uuid.uuid4().hex[:8]}"
        replicas, memory = DEVICE_CONSUMERS[consumers]
        self.cluster = LocalNatsCluster(NODES, workdir=workdir / "nats",
                                        consumer_replicas=replicas, consumer_memory=memory)
        self.redis = LocalRedis(RedisOptions(appendfsync="always"), workdir=workdir / "redis")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {k: v for k, v in {**os.environ, "PYTHONPATH": str(ROOT)}.items()
                    if not k.startswith("FEDMQ_AGGREGATOR_")}

    @property
    def mqtt(self) -> list[str]:
        return [f"{self.cluster.host}:{n.mqtt_port}" for n in self.cluster.nodes]

    def spawn(self, name: str, *args: str) -> None:
        with open(self.workdir / f"{name}.log", "wb") as logf:
            self.procs[name] = subprocess.Popen([sys.executable, *args], stdout=logf,
                                                stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    def start(self, timeout: float) -> None:
        self.cluster.start()
        self.redis.start()
        config = self.workdir / "fleet.toml"
        config.write_text(CONFIG.format(
            fleet=self.fleet, prefix=self.prefix, model=self.model, devices=self.devices,
            timeout=timeout, host=self.cluster.host, port=self.cluster.nodes[0].mqtt_port,
            redis=self.redis.url))
        # the coordinator's MQTT connection makes the gateway create $MQTT_msgs
        self.spawn("coordinator", "-m", "fedmq_ops.cli", "aggregator", "shard-coordinator",
                   "--config", str(config), "--protocol", "3.1.1",
                   "--fallback-brokers", ",".join(self.mqtt[1:]))
        store = ShardStore(self.redis.url, self.fleet)
        _wait(lambda: store.open_round() is not None, 60, "the coordinator's round 1")
        store.close_connection()
        servers = self.cluster.servers
        for i in range(self.workers):
            ready = self.workdir / f"w{i}.ready"
            mine = servers[i % NODES:] + servers[:i % NODES]  # each prefers another node
            self.spawn(f"w{i}", "-m", "aggregator.nats_worker", "--fleet", self.fleet,
                       "--worker", f"w{i}", "--redis", self.redis.url, "--servers",
                       ",".join(mine), "--prefix", self.prefix, "--model", self.model,
                       "--ready-file", str(ready))
            _wait(ready.exists, 60, f"worker w{i}")
        time.sleep(1.0)  # the retained round is on every node

    def pids(self) -> dict[str, int]:
        out = {name: p.pid for name, p in self.procs.items()}
        for i, node in enumerate(self.cluster.nodes):
            proc = self.cluster._procs[i]
            assert proc is not None
            out[f"nats-{node.name}"] = proc.pid
        assert self.redis._proc is not None
        out["redis"] = self.redis._proc.pid
        return out

    def stop(self) -> None:
        for p in self.procs.values():
            stop_process(p, 30)
        self.cluster.stop()
        self.redis.stop()


def _per_update(cpu: dict[str, float], accepted: int, prefix: str) -> float:
    return 1000 * sum(v for k, v in cpu.items() if k.startswith(prefix)) / max(accepted, 1)


def summarize(cell: Cell, plan: FleetPlan, report: FleetReport, rounds: int,
              cpu: dict[str, float]) -> dict[str, Any]:
    """The cell's figures (the keys of bench_shard_fleet.py where they mean the same)."""
    log = (cell.workdir / "coordinator.log").read_text(errors="replace")
    closed = {int(m[1]): int(m[2]) for m in _CLOSED.finditer(log)}
    accepted = report.total("accepted")
    per_round, lost, duplicated = [], 0, 0
    for rid, t in ((r, report.rounds().get(r)) for r in range(1, rounds + 1)):
        senders, contributors = len(plan.senders(rid)), closed.get(rid, 0)
        lost += max(0, senders - contributors)
        duplicated += max(0, contributors - senders)
        start = max(t.opened_at, t.first_send) if t else 0.0
        span = t.last_ack - start if t and t.last_ack else 0.0
        seen = t.model_seen if t else 0.0
        per_round.append({
            "round": rid, "contributors": contributors, "senders": senders,
            "accepted_acks": t.accepted if t else 0, "ingest_seconds": span,
            "updates_per_second": t.accepted / span if t and span > 0 else 0.0,
            "first_send_to_model_seconds": seen - start if seen else None,
            "model_after_last_ack_seconds": seen - t.last_ack if t and seen and t.last_ack
            else None,
        })
    return {
        "model": cell.model, "devices": cell.devices, "workers": cell.workers,
        "device_consumers": cell.consumers,
        "rounds": rounds, "processes": len(report.shards), "completed": report.completed,
        "accepted": accepted, "lost": lost, "duplicated": duplicated,
        "rejected": report.rejected, "resent": report.total("resent"),
        "disconnects": report.total("disconnects"), "per_round": per_round,
        "cpu_seconds": cpu,
        "worker_cpu_ms_per_update": _per_update(cpu, accepted, "w"),
        "coordinator_cpu_ms_per_update": _per_update(cpu, accepted, "coordinator"),
        "redis_cpu_ms_per_update": _per_update(cpu, accepted, "redis"),
        "nats_cpu_ms_per_update": _per_update(cpu, accepted, "nats-"),
        "fleet_cpu_ms_per_update":
            1000 * sum(s.cpu_seconds for s in report.shards) / max(accepted, 1),
        "connect_seconds": max(s.connect_seconds for s in report.shards),
    }


def measured(spec: FleetSpec, pids: dict[str, int]
             ) -> tuple[FleetReport, float, dict[str, float], dict[str, float]]:
    """Run the fleet: its report and wall seconds, and the CPU seconds (used meanwhile) and
    peak RSS (MiB) of the processes ``pids`` (name -> pid)."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.time()
    report = run_fleet(spec)
    wall = time.time() - t0
    return (report, wall, {k: cpu_seconds(p) - before[k] for k, p in pids.items()},
            {k: peak_rss_mb(p) for k, p in pids.items()})


def run_cell(model: str, devices: int, workers: int, consumers: str, rounds: int,
             processes: int, timeout: float, workdir: Path) -> dict[str, Any]:
    cell = Cell(model, devices, workers, consumers, workdir)
    load_before = os.getloadavg()
    try:
        cell.start(timeout)
        plan = FleetPlan(devices, seed=1, name="dev", arrival=Arrival.parse("at-once"))
        settings = ShardSettings(
            host=cell.cluster.host, port=cell.cluster.nodes[0].mqtt_port,
            brokers=tuple(cell.mqtt), protocol="3.1.1", fleet=cell.fleet,
            topic_prefix=cell.prefix, rounds=rounds, timeout=timeout,
            ack_timeout=max(60.0, timeout / 4))
        report, wall, cpu, rss = measured(FleetSpec(plan, settings, processes), cell.pids())
    finally:
        cell.stop()
    out = summarize(cell, plan, report, rounds, cpu)
    out.update(wall_seconds=wall, load_average_before=load_before,
               load_average_after=os.getloadavg(),
               peak_rss_mb={**rss, "fleet_processes": [s.peak_rss_mb for s in report.shards]})
    return out


HEADER = ("| devices | workers | device consumers | accepted | lost | dup | "
          "upd/s per round to the model "
          "(to the last ack) | worker ms/upd | coord ms/upd | redis ms/upd | NATS ms/upd "
          "(3 nodes) | worker MiB (max) | coord MiB | redis MiB | NATS MiB (max node) | "
          "last ack -> model s | wall s | load before -> after |\n"
          "|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def _row(r: dict[str, Any]) -> str:
    pr = r["per_round"]
    rates = " / ".join(f"{_to_model(x):,.0f} ({x['updates_per_second']:,.0f})" for x in pr)
    close = pr[-1]["model_after_last_ack_seconds"]
    rss = r["peak_rss_mb"]
    worker = max(v for k, v in rss.items() if k.startswith("w"))
    nats = max(v for k, v in rss.items() if k.startswith("nats-"))
    return (f"| {r['devices']:,} | {r['workers']} | {r['device_consumers']} | "
            f"{r['accepted']:,} | {r['lost']} | "
            f"{r['duplicated']} | {rates} | {r['worker_cpu_ms_per_update']:.2f} | "
            f"{r['coordinator_cpu_ms_per_update']:.2f} | {r['redis_cpu_ms_per_update']:.2f} | "
            f"{r['nats_cpu_ms_per_update']:.2f} | {worker:.0f} | {rss['coordinator']:.0f} | "
            f"{rss['redis']:.0f} | {nats:.0f} | "
            f"{close if close is not None else float('nan'):.2f} | {r['wall_seconds']:.1f} | "
            f"{r['load_average_before'][0]:.2f} -> {r['load_average_after'][0]:.2f} |")


def _key(r: dict[str, Any]) -> tuple[str, int, int, str]:
    return r["model"], r["devices"], r["workers"], r.get("device_consumers", "r3-file")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", action="append", default=[],
                   help="MODEL:DEVICES:WORKERS (repeatable); results are appended to --out")
    p.add_argument("--consumers", choices=sorted(DEVICE_CONSUMERS), default="r1-memory",
                   help="the gateway's JetStream consumers of device subscriptions")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", type=int, default=2, help="fleet processes (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, help="per round")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="print every result as a table")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    data: dict[str, Any] = (json.loads(args.out.read_text()) if args.out.exists()
                            else {"machine": machine_info(("numpy", "paho-mqtt", "redis",
                                                           "nats-py")), "results": []})
    for cell in args.cell:
        model, devices, workers = cell.split(":")
        soft, hard = raise_nofile()
        with tempfile.TemporaryDirectory(prefix="fedmq-nats-fleet-") as tmp:
            r = run_cell(model, int(devices), int(workers), args.consumers, args.rounds,
                         min(args.processes, int(devices)), args.timeout, Path(tmp))
        r["nofile"] = [soft, hard]
        r["run_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        data["results"] = [x for x in data["results"] if _key(x) != _key(r)] + [r]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2))
        print(HEADER)
        print(_row(r), flush=True)
    if args.table:
        print(HEADER)
        for r in sorted(data["results"], key=_key):
            print(_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
