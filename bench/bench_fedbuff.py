"""Wall time to a target accuracy, synchronous rounds vs FedBuff, with heterogeneous devices.

Real processes: a Mosquitto of its own, the aggregator and ``--agents`` edge agents
(prebuilt digits-mlp, LiteRT, iid digits slices). ``--slow`` of them sleep ``--slow-delay``
seconds before each training (agent key ``train_delay``), the others ``--fast-delay``: a
fleet where some devices are several times slower. ``sync`` waits for every device each
round (``clients_per_round = min_updates = agents``); ``fedbuff`` applies every
``--buffer-size`` updates with staleness weight ``(1 + s) ** -0.5``. Time runs from
spawning the processes to the first model whose accuracy (on ``--eval-examples`` digits
test examples, evaluated by the aggregator) reaches ``--target``.

``--task fmnist-cnn``: the FMNIST task instead (fmnist-cnn, ``--agents 10`` on a Dirichlet 0.5
split of Fashion-MNIST, lr 0.2, 1 local epoch of batch 32, int8; target 0.85 on
``--eval-examples`` 2,000 test images; 3 slow agents, delays 2 s and 20 s, FedBuff buffer
5 with server lr 0.5, half the fleet and the half step that worked on digits, see
docs/rounds.md; the aggregator's ingest norm bound off) unless flags say otherwise. Its
defaults write bench/results/fedbuff_fmnist.json.

Prints a table and writes bench/results/fedbuff.json.

    .venv/bin/python bench/bench_fedbuff.py [--agents 6] [--slow 2] [--target 0.9]
    .venv/bin/python bench/bench_fedbuff.py --policies fedbuff --buffer-size 4 \
        --fedbuff-server-lr 0.5 --out bench/results/fedbuff_k4_lr05.json
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

import paho.mqtt.client as mqtt
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmq.net.localbroker import BrokerOptions, LocalBroker  # noqa: E402
from fedmq.net.procs import stop_processes  # noqa: E402
from fedmq.topics import Topics  # noqa: E402
from fedmq.wire import decode_model  # noqa: E402


class ModelLog:
    """(seconds since t0, version, accuracy) of every model published."""

    def __init__(self, broker: LocalBroker, topics: Topics, t0: float) -> None:
        self.t0 = t0
        self.rows: list[tuple[float, int, float]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topics.model, qos=1)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        m = decode_model(bytes(msg.payload))
        with self.cond:
            if all(v != m.version for _, v, _ in self.rows):
                acc = float(m.metrics.get("accuracy", 0.0))
                self.rows.append((time.monotonic() - self.t0, m.version, acc))
            self.cond.notify_all()

    def wait_for(self, target: float, timeout: float) -> tuple[float, int, float] | None:
        with self.cond:
            self.cond.wait_for(
                lambda: any(a >= target for _, _, a in self.rows), timeout
            )
            return next(((t, v, a) for t, v, a in self.rows if a >= target), None)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run(policy: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    broker = LocalBroker(BrokerOptions(), workdir=workdir / f"broker-{policy}", kind="mosquitto")
    broker.start()
    fleet = f"bench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    common = ["--host", broker.host, "--port", str(broker.port), "--fleet", fleet]
    task = TASKS[args.task]
    if "norm_bound" in task:
        env["FEDMQ_AGGREGATOR_NORM_BOUND"] = task["norm_bound"]
    agg = [
        sys.executable, "-m", "aggregator", *common, "--state-dir", str(workdir / policy),
        "--model", args.task, "--eval-dataset", task["dataset"],
        "--eval-examples", str(args.eval_examples),
        "--epochs", "1", "--lr", str(args.lr), "--codec", "int8", "--seed", str(args.seed),
        "--round-policy", policy,
    ]
    if policy == "fedbuff":
        agg += ["--buffer-size", str(args.buffer_size), "--max-staleness",
                str(args.max_staleness)]
        if args.fedbuff_server_lr is not None:
            agg += ["--server-lr", str(args.fedbuff_server_lr)]
    else:
        n = str(args.agents)
        agg += ["--clients-per-round", n, "--min-updates", n, "--min-devices", n,
                "--round-timeout", "600"]
    t0 = time.monotonic()
    models = ModelLog(broker, Topics(fleet), t0)
    procs: list[subprocess.Popen[bytes]] = []
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    try:
        with open(logs / f"{policy}-aggregator.log", "ab") as f:
            procs.append(subprocess.Popen(agg, stdout=f, stderr=subprocess.STDOUT, env=env))
        for i in range(args.agents):
            delay = args.slow_delay if i < args.slow else args.fast_delay
            cmd = [
                sys.executable, "-m", "edge_agent", *common, "--device-id", f"agent-{i}",
                "--state-dir", str(workdir / f"{policy}-agent-{i}"), "--model", args.task,
                "--source", task["dataset"], "--partition", args.partition,
                "--num-clients", str(args.agents), "--client-index", str(i),
                "--seed", str(args.seed), "--train-delay", str(delay),
            ]
            with open(logs / f"{policy}-agent-{i}.log", "ab") as f:
                procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
        hit = models.wait_for(args.target, args.timeout)
        with models.cond:
            rows = list(models.rows)
    finally:
        stop_processes(procs)
        models.close()
        broker.stop()
    return {
        "policy": policy,
        "seconds_to_target": None if hit is None else round(hit[0], 2),
        "version_at_target": None if hit is None else hit[1],
        "accuracy_at_target": None if hit is None else hit[2],
        "models": [{"t": round(t, 2), "version": v, "accuracy": a} for t, v, a in rows],
    }


# task -> its dataset and the defaults of the flags left unset (None)
TASKS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"dataset": "digits", "agents": 6, "slow": 2, "fast_delay": 0.5,
                   "slow_delay": 2.0, "target": 0.9, "eval_examples": 500, "partition": "iid",
                   "timeout": 300.0, "buffer_size": 3, "out": "fedbuff.json"},
    "fmnist-cnn": {"dataset": "fashion-mnist", "agents": 10, "slow": 3, "fast_delay": 2.0,
                   "slow_delay": 20.0, "target": 0.85, "eval_examples": 2000,
                   "partition": "dirichlet:0.5", "timeout": 1200.0, "buffer_size": 5,
                   "fedbuff_server_lr": 0.5,
                   # ingest bound off: under sync (quorum = every device) one rejected update
                   # holds the round for its deadline (seen on this task with FedAvgM)
                   "norm_bound": "off",
                   "out": "fedbuff_fmnist.json"},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="digits-mlp")
    p.add_argument("--agents", type=int, default=None)
    p.add_argument("--slow", type=int, default=None, help="how many agents are slow")
    p.add_argument("--fast-delay", type=float, default=None)
    p.add_argument("--slow-delay", type=float, default=None)
    p.add_argument("--partition", default=None, help="agents' split (digits: iid)")
    p.add_argument("--buffer-size", type=int, default=None, help="digits 3, fmnist 5")
    p.add_argument("--max-staleness", type=int, default=20)
    p.add_argument("--fedbuff-server-lr", type=float, default=None,
                   help="server learning rate of fedavg under fedbuff (default 1.0)")
    p.add_argument("--policies", default="sync,fedbuff", help="comma-separated, run in order")
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--eval-examples", type=int, default=None)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    for key, value in TASKS[args.task].items():
        if key == "out":
            args.out = args.out or ROOT / "bench" / "results" / value
        elif key not in ("dataset", "norm_bound") and getattr(args, key) is None:
            setattr(args, key, value)
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-fedbuff-") as tmp:
        results = [run(policy, args, Path(tmp)) for policy in args.policies.split(",")]
    print(f"{args.agents} agents ({args.slow} with train_delay {args.slow_delay}s, others "
          f"{args.fast_delay}s), target accuracy {args.target}")
    print(f"{'policy':8} {'s to target':>12} {'version':>8} {'accuracy':>9} {'models':>7}")
    for r in results:
        secs = "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        ver = "-" if r["version_at_target"] is None else str(r["version_at_target"])
        acc = "-" if r["accuracy_at_target"] is None else f"{r['accuracy_at_target']:.3f}"
        print(f"{r['policy']:8} {secs:>12} {ver:>8} {acc:>9} {len(r['models']):>7}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(("numpy", "ai-edge-litert")),
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
