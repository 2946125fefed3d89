"""One aggregator and one Mosquitto under a simulated fleet of 100 / 1,000 / 10,000 devices.

Real processes: a Mosquitto of its own (open-file limit raised to the hard limit), the
aggregator (``python -m aggregator``, ``--selection any``, ``clients_per_round =
min_updates = devices``, evaluation off so the figures are ingest and publication only) and
the simulated fleet (``fedmq_ops.simfleet``: one MQTT connection per device, ``--processes``
processes of one thread each, int8 synthetic deltas of the model's shapes, all devices
sending at once when a round opens). For each (model, devices) it records:

- accepted updates/s per round (accepted / time from the first update sent to the last
  accept ack), and end-to-end wall time;
- CPU seconds per accepted update of the aggregator and of the broker (``/proc/PID/stat``,
  from just before the fleet connects to just after it leaves: it includes the connection
  storm and sending the model to every device);
- peak RSS (VmHWM) of the broker, the aggregator and every fleet process;
- seconds from the last accept ack to the new model reaching the first device;
- lost / double-counted updates, from the aggregator's store (contributions by update id
  against the plan's ids).

Prints a table, writes bench/results/fleet_load.json and bench/results/fleet_load.png.
One aggregator process throughout; the same fleet through sharded workers is
``bench_shard_fleet.py``.

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_fleet_load.py
    .venv/bin/python bench/bench_fleet_load.py --devices 100,1000 --models digits-mlp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.store import Store  # noqa: E402
from fedmq.net.localbroker import BrokerOptions, LocalBroker  # noqa: E402
from fedmq.net.procs import stop_process  # noqa: E402
from fedmq_ops.simfleet import (  # noqa: E402
    Arrival,
    FleetPlan,
    FleetSpec,
    ShardSettings,
    run_fleet,
)
from fedmq_ops.simfleet.limits import raise_nofile  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


class RssTimeline(threading.Thread):
    """The aggregator's resident set every 0.5 s (where it grows, and when)."""

    def __init__(self, pid: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0 = pid, t0
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append((round(time.time() - self.t0, 2), rss_mb(self.pid)))
            except OSError:
                return


def run_one(model: str, devices: int, processes: int, rounds: int, timeout: float,
            workdir: Path, arrival: str = "at-once") -> dict[str, Any]:
    fleet = "load"
    prefix = f"b{uuid.uuid4().hex[:8]}"
    broker = LocalBroker(BrokerOptions(), workdir=workdir / "mosquitto", kind="mosquitto")
    broker.start()
    state = workdir / "state"
    log_path = workdir / "aggregator.log"
    cmd = [
        sys.executable, "-m", "aggregator", "--host", broker.host, "--port", str(broker.port),
        "--topic-prefix", prefix, "--fleet", fleet, "--client-id", f"agg-{prefix}",
        "--state-dir", str(state), "--model", model, "--eval-dataset", "none",
        "--codec", "int8", "--selection", "any", "--clients-per-round", str(devices),
        "--min-updates", str(devices), "--rounds", "0", "--round-timeout", str(timeout),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as logf:
        agg = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    assert broker._proc is not None
    broker_pid = broker._proc.pid
    try:
        time.sleep(3.0)  # the aggregator loads its model and opens round 1
        agg_cpu0, broker_cpu0 = cpu_seconds(agg.pid), cpu_seconds(broker_pid)
        plan = FleetPlan(devices, seed=1, name="dev", arrival=Arrival.parse(arrival))
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=fleet,
                                 topic_prefix=prefix, rounds=rounds, timeout=timeout,
                                 ack_timeout=max(60.0, timeout / 4))
        t0 = time.time()
        timeline = RssTimeline(agg.pid, t0)
        timeline.start()
        report = run_fleet(FleetSpec(plan, settings, processes))
        wall = time.time() - t0
        timeline.stop.set()
        agg_cpu = cpu_seconds(agg.pid) - agg_cpu0
        broker_cpu = cpu_seconds(broker_pid) - broker_cpu0
        agg_rss, broker_rss = peak_rss_mb(agg.pid), peak_rss_mb(broker_pid)
    finally:
        stop_process(agg, 30)
        broker.stop()
    # Exactly-once check against the aggregator's store.
    lost = duplicated = 0
    per_round: list[dict[str, Any]] = []
    merged = report.rounds()
    with Store(state) as store:
        history = {r.round_id: r for r in store.history()}
        epoch = store.get_meta("epoch") or ""
        for rid in range(1, rounds + 1):
            contributions = store.contributions(rid) if rid in history else []
            ids = Counter(uid for _, uid, _, _ in contributions)
            duplicated += sum(k - 1 for k in ids.values())
            expected = {plan.update_id(d, epoch, rid) for d in plan.device_ids()}
            lost += len(expected - set(ids))
            t = merged.get(rid)
            span = (t.last_ack - max(t.opened_at, t.first_send)) if t and t.last_ack else 0.0
            per_round.append({
                "round": rid,
                "status": history[rid].status if rid in history else "missing",
                "participants": history[rid].participants if rid in history else 0,
                "accepted_acks": t.accepted if t else 0,
                "ingest_seconds": span,
                "updates_per_second": (t.accepted / span) if t and span > 0 else 0.0,
                "model_after_last_ack_seconds":
                    (t.model_seen - t.last_ack) if t and t.model_seen and t.last_ack else None,
            })
    accepted = report.total("accepted")
    return {
        "model": model,
        "devices": devices,
        "processes": processes,
        "rounds": rounds,
        "arrival": arrival,
        "completed": report.completed,
        "accepted": accepted,
        "lost": lost,
        "duplicated": duplicated,
        "rejected": report.rejected,
        "resent": report.total("resent"),
        "wall_seconds": wall,
        "per_round": per_round,
        "aggregator_cpu_seconds": agg_cpu,
        "broker_cpu_seconds": broker_cpu,
        "aggregator_cpu_ms_per_update": 1000 * agg_cpu / max(accepted, 1),
        "broker_cpu_ms_per_update": 1000 * broker_cpu / max(accepted, 1),
        "fleet_cpu_ms_per_update":
            1000 * sum(s.cpu_seconds for s in report.shards) / max(accepted, 1),
        "peak_rss_mb": {
            "aggregator": agg_rss,
            "broker": broker_rss,
            "fleet_processes": [s.peak_rss_mb for s in report.shards],
        },
        "connect_seconds": max(s.connect_seconds for s in report.shards),
        "nofile": [report.shards[0].nofile_soft, report.shards[0].nofile_hard],
        "fleet_rounds": {str(k): v.to_dict() for k, v in merged.items()},
        "aggregator_rss_timeline": timeline.samples,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in sorted({r["model"] for r in results}):
        rows = sorted((r for r in results if r["model"] == model), key=lambda r: r["devices"])
        xs = [r["devices"] for r in rows]
        rate = [r["per_round"][-1]["updates_per_second"] for r in rows]
        ax1.plot(xs, rate, marker="o", label=model)
        ax2.plot(xs, [r["peak_rss_mb"]["aggregator"] for r in rows], marker="o",
                 label=f"{model}: aggregator")
        ax2.plot(xs, [r["peak_rss_mb"]["broker"] for r in rows], marker="s", linestyle="--",
                 label=f"{model}: mosquitto")
        ax2.plot(xs, [max(r["peak_rss_mb"]["fleet_processes"]) for r in rows], marker="^",
                 linestyle=":", label=f"{model}: a fleet process")
    ax1.set(xscale="log", xlabel="simulated devices", ylabel="accepted updates/s (last round)",
            title="one aggregator, one Mosquitto")
    ax2.set(xscale="log", yscale="log", xlabel="simulated devices", ylabel="peak RSS (MiB)",
            title="peak RSS per process")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="100,1000,10000")
    p.add_argument("--models", default="digits-mlp,fmnist-cnn")
    p.add_argument("--processes", type=int, default=2, help="fleet processes (default 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arrival", default="at-once",
                   help="at-once (default) or spread:SECONDS after each round opens")
    p.add_argument("--timeout", type=float, default=1200.0, help="per configuration")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/fleet_load.json")
    p.add_argument("--png", type=Path, default=ROOT / "bench/results/fleet_load.png")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    soft, hard = raise_nofile()
    print(f"open-file limit: {soft} (hard {hard}); Mosquitto and the fleet inherit it")
    results: list[dict[str, Any]] = []
    header = (f"{'model':11s} {'devices':>7s} {'ok':>3s} {'accepted':>8s} {'lost':>4s} "
              f"{'dup':>3s} {'upd/s r1':>8s} {'upd/s rN':>8s} {'agg ms/u':>8s} "
              f"{'mq ms/u':>7s} {'agg MiB':>7s} {'mq MiB':>7s} {'fleet MiB':>9s} "
              f"{'close s':>7s} {'wall s':>7s}")
    print(header, flush=True)
    for model in args.models.split(","):
        for n in (int(x) for x in args.devices.split(",")):
            with tempfile.TemporaryDirectory(prefix="fedmq-fleet-load-") as tmp:
                r = run_one(model, n, min(args.processes, n), args.rounds, args.timeout,
                            Path(tmp), args.arrival)
            results.append(r)
            pr = r["per_round"]
            close = pr[-1]["model_after_last_ack_seconds"]
            print(f"{model:11s} {n:7d} {'yes' if r['completed'] else 'NO':>3s} "
                  f"{r['accepted']:8d} {r['lost']:4d} {r['duplicated']:3d} "
                  f"{pr[0]['updates_per_second']:8.0f} {pr[-1]['updates_per_second']:8.0f} "
                  f"{r['aggregator_cpu_ms_per_update']:8.2f} {r['broker_cpu_ms_per_update']:7.2f} "
                  f"{r['peak_rss_mb']['aggregator']:7.0f} {r['peak_rss_mb']['broker']:7.0f} "
                  f"{max(r['peak_rss_mb']['fleet_processes']):9.0f} "
                  f"{close if close is not None else float('nan'):7.2f} "
                  f"{r['wall_seconds']:7.1f}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "machine": machine_info(("numpy", "paho-mqtt")),
                "nofile": [soft, hard],
                "results": results,
            }, indent=2))
    plot(results, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
