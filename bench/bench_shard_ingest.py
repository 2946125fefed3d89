"""Sharded ingest throughput: one round of ``--updates`` real encoded updates through 1, 2
and 4 worker processes (docs/scaling.md).

Real processes: a Mosquitto and a Redis of their own (free loopback ports), N
``aggregator.shard_worker`` processes on the shared subscription, one
``aggregator.shard_coordinator`` (target = ``--updates``). The bench process publishes the
pre-encoded updates (digits-mlp or fmnist-cnn deltas, codec ``--codec``) as fast as the
broker takes them from ``--publishers`` MQTT connections. Measured per run: accepted
updates/s (first publish to the model in the store), the time from the last publish to the
model, CPU seconds per update of the workers, Redis and Mosquitto (from /proc), and the peak
RSS of each worker. The round's model is checked against the one-process FixedPointSum
result (``exact``).

Prints a table and writes bench/results/shard_ingest.json.

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_shard_ingest.py \
        [--updates 2000] [--workers 1,2,4] [--model digits-mlp] [--fsync always]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.bundles import resolve_bundle  # noqa: E402
from aggregator.shard_store import ShardStore  # noqa: E402
from fedmq.net.localbroker import BrokerOptions, LocalBroker  # noqa: E402
from fedmq.net.localredis import LocalRedis, RedisOptions  # noqa: E402
from fedmq.net.procs import stop_processes  # noqa: E402
from fedmq.topics import Topics  # noqa: E402
from fedmq.update.codecs import get_codec  # noqa: E402
from fedmq.update.fixedpoint import FixedPointSum  # noqa: E402
from fedmq.update.strategies import FedAvg  # noqa: E402
from fedmq.wire import UpdateMessage, decode_update, encode  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env=env)


def wait(cond: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.01)
    raise SystemExit(f"timed out waiting for {what}")


def run(workers: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    bundle = resolve_bundle(args.model)
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    fleet = f"bench{uuid.uuid4().hex[:6]}"
    broker = LocalBroker(BrokerOptions(), workdir=workdir / f"mq{workers}", kind="mosquitto")
    redis_server = LocalRedis(RedisOptions(appendfsync=args.fsync),
                              workdir=workdir / f"redis{workers}")
    broker.start()
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        common = ["--fleet", fleet, "--redis", redis_server.url, "--port", str(broker.port),
                  "--model", args.model]
        for i in range(workers):
            ready = workdir / f"w{i}.ready"
            procs.append(spawn(["-m", "aggregator.shard_worker", *common, "--worker", f"w{i}",
                                "--ready-file", str(ready), "--ack-mode", args.ack_mode],
                               workdir / f"w{i}.log"))
            wait(ready.exists, 60, f"worker w{i}")
        coord = spawn(["-m", "aggregator.shard_coordinator", *common, "--target",
                       str(args.updates), "--rounds", "1", "--round-timeout", "600",
                       "--poll", "0.02", "--codec", args.codec], workdir / "coordinator.log")
        procs.append(coord)
        store = ShardStore(redis_server.url, fleet)
        wait(lambda: store.open_round() is not None, 60, "the round")
        rnd = store.open_round()
        assert rnd is not None
        rng = np.random.default_rng(0)
        codec = get_codec(args.codec)
        payloads = []
        for i in range(args.updates):
            delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32)
                     for n, s in template.items()}
            payloads.append((f"d{i:05d}", encode(UpdateMessage(
                fleet, rnd.round_id, rnd.base_version, f"d{i:05d}", f"u{i}",
                int(rng.integers(1, 300)), args.codec, tuple(codec.encode(delta, rng).tensors),
                epoch=rnd.epoch))))
        topics = Topics(fleet)
        pids = {f"w{i}": p.pid for i, p in enumerate(procs[:workers])}
        assert broker._proc is not None and redis_server._proc is not None
        others = {"mosquitto": broker._proc.pid, "redis": redis_server._proc.pid,
                  "coordinator": coord.pid}
        cpu0 = {k: cpu_seconds(p) for k, p in {**pids, **others}.items()}
        self_cpu0 = time.process_time()
        t0 = time.perf_counter()

        done: list[float] = []

        def publish(part: list[tuple[str, bytes]], k: int) -> None:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub{k}-{fleet}",
                            protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(100)
            c.max_queued_messages_set(0)
            c.connect(broker.host, broker.port)
            c.loop_start()
            infos = [c.publish(topics.update(d), p, qos=1) for d, p in part]
            for info in infos:
                info.wait_for_publish(300)
            done.append(time.perf_counter())
            c.disconnect()  # before loop_stop: paho's thread would sit out its 1 s select
            c.loop_stop()

        threads = [threading.Thread(target=publish, args=(payloads[k::args.publishers], k))
                   for k in range(args.publishers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        publisher_cpu = time.process_time() - self_cpu0
        t_last = max(done)
        while (store.model_version() or 0) < 1:
            if time.perf_counter() - t_last > 600:
                raise SystemExit("timed out waiting for the model")
            time.sleep(0.002)
        t_model = time.perf_counter()
        cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in {**pids, **others}.items()}
        rss = {k: round(peak_rss_mb(p), 1) for k, p in pids.items()}
        model = store.model()
        assert model is not None
        ref = FixedPointSum(template)
        for _, p in payloads:
            m = decode_update(p)
            ref.fold(m.tensors, m.codec, float(m.num_examples))
        want = FedAvg(1.0).aggregate(bundle.initial_trainable(), ref.result())
        exact = all(want[n].tobytes() == model["weights"][n].tobytes() for n in want)
        store.close_connection()
        n = args.updates
        worker_cpu = sum(cpu[k] for k in pids)
        return {
            "workers": workers, "updates": n, "model": args.model, "codec": args.codec,
            "update_bytes": len(payloads[0][1]), "fsync": args.fsync,
            "ack_mode": args.ack_mode,
            "contributors": model["contributors"], "exact": exact,
            "updates_per_s": round(n / (t_model - t0), 1),
            "publish_s": round(t_last - t0, 3),
            "last_update_to_model_s": round(t_model - t_last, 3),
            "worker_cpu_ms_per_update": round(1000 * worker_cpu / n, 3),
            "redis_cpu_ms_per_update": round(1000 * cpu["redis"] / n, 3),
            "mosquitto_cpu_ms_per_update": round(1000 * cpu["mosquitto"] / n, 3),
            "coordinator_cpu_s": round(cpu["coordinator"], 3),
            "publisher_cpu_s": round(publisher_cpu, 3),
            "worker_peak_rss_mb": rss,
        }
    finally:
        stop_processes(procs, 10, kill_timeout=5)
        redis_server.cleanup()
        broker.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--updates", type=int, default=2000)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--model", default="digits-mlp")
    p.add_argument("--codec", default="float32")
    p.add_argument("--publishers", type=int, default=2)
    p.add_argument("--ack-mode", default="manual", choices=("manual", "callback"))
    p.add_argument("--fsync", default="always", choices=("always", "everysec", "no"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shard_ingest.json")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmq-shard-bench-") as tmp:
        for w in (int(x) for x in args.workers.split(",")):
            results.append(run(w, args, Path(tmp) / f"run{w}"))
            r = results[-1]
            print(f"workers {w}: {r['updates_per_s']:8.1f} updates/s, last update -> model "
                  f"{r['last_update_to_model_s']:.2f}s, worker CPU "
                  f"{r['worker_cpu_ms_per_update']:.2f} ms/update, redis "
                  f"{r['redis_cpu_ms_per_update']:.2f}, mosquitto "
                  f"{r['mosquitto_cpu_ms_per_update']:.2f}, exact {r['exact']}", flush=True)
    print()
    print("| workers | updates | updates/s | last update -> model (s) | worker CPU ms/update "
          "| Redis CPU ms/update | Mosquitto CPU ms/update | worker peak RSS MB | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['updates']} | {r['updates_per_s']} | "
              f"{r['last_update_to_model_s']} | {r['worker_cpu_ms_per_update']} | "
              f"{r['redis_cpu_ms_per_update']} | {r['mosquitto_cpu_ms_per_update']} | "
              f"{max(r['worker_peak_rss_mb'].values())} | {r['exact']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "bench": "shard_ingest", "machine": machine_info(("numpy", "paho-mqtt", "redis")),
        "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
