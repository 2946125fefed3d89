"""Wall time to a target accuracy, synchronous rounds vs FedBuff, with heterogeneous devices.

Real processes: a Mosquitto of its own, the aggregator and ``--agents`` edge agents
(prebuilt digits-mlp, LiteRT, iid digits slices). ``--slow`` of them sleep ``--slow-delay``
seconds before each training (agent key ``train_delay``), the others ``--fast-delay``: a
fleet where some devices are several times slower. The next ``--offline`` agents are
offline half the time: the bench freezes each of them (SIGSTOP: no training, no network
traffic, the broker drops the connection after 1.5 x its 30 s keepalive and publishes its
``offline`` will) for the second half of every ``--offline-period`` seconds and resumes it
(SIGCONT: it reconnects with its session) for the first half, their phases staggered.
``sync`` waits for every device each round (``clients_per_round = min_updates = agents``);
``fedbuff`` applies every ``--buffer-size`` updates with staleness weight
``(1 + s) ** -0.5``. Time runs from spawning the processes to the first model whose
accuracy (on ``--eval-examples`` digits test examples, evaluated by the aggregator)
reaches ``--target``.

``--task fmnist-cnn``: the FMNIST task instead (fmnist-cnn, ``--agents 10`` on a Dirichlet 0.5
split of Fashion-MNIST, lr 0.2, 1 local epoch of batch 32, int8; target 0.85 on
``--eval-examples`` 2,000 test images; 3 slow agents, delays 2 s and 20 s, 2 more agents
offline 60 s of every 120 s; FedBuff buffer 5 with server lr 0.5, half the fleet and the
half step that worked on digits, see docs/rounds.md; the aggregator's ingest norm bound
off) unless flags say otherwise. Its defaults write bench/results/fedbuff_fmnist.json.

Prints a table (including each policy's best accuracy by the time the first policy reached
the target, or by the end of the shorter run: accuracy at equal wall time) and writes
bench/results/fedbuff.json.

    .venv/bin/python bench/bench_fedbuff.py [--agents 6] [--slow 2] [--target 0.9]
    .venv/bin/python bench/bench_fedbuff.py --policies fedbuff --buffer-size 4 \
        --fedbuff-server-lr 0.5 --out bench/results/fedbuff_k4_lr05.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


class Intermittent:
    """Freezes ``procs`` (SIGSTOP) for the second half of every ``period`` seconds and resumes
    them (SIGCONT) for the first half; process ``k`` is shifted by ``k * period / len``.
    Records every transition as (seconds since t0, index, "offline"/"online")."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], period: float, t0: float) -> None:
        self.procs, self.period, self.t0 = procs, period, t0
        self.events: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.procs:
            self._thread.start()

    def _offline(self, k: int, now: float) -> bool:
        phase = (now + k * self.period / len(self.procs)) % self.period
        return phase >= self.period / 2

    def _loop(self) -> None:
        state = [False] * len(self.procs)
        while not self._stop.wait(0.5):
            now = time.monotonic() - self.t0
            for k, p in enumerate(self.procs):
                want = self._offline(k, now)
                if want != state[k] and p.poll() is None:
                    p.send_signal(signal.SIGSTOP if want else signal.SIGCONT)
                    state[k] = want
                    self.events.append((round(now, 1), k, "offline" if want else "online"))

    def stop(self) -> None:
        """Stop toggling and resume every process (a frozen one cannot handle SIGTERM)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)


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
    intermittent: list[subprocess.Popen[bytes]] = []
    flapper: Intermittent | None = None
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
            if args.slow <= i < args.slow + args.offline:
                intermittent.append(procs[-1])
        flapper = Intermittent(intermittent, args.offline_period, t0)
        flapper.start()
        hit = models.wait_for(args.target, args.timeout)
        wall = time.monotonic() - t0
        with models.cond:
            rows = list(models.rows)
    finally:
        if flapper is not None:
            flapper.stop()
        stop_processes(procs)
        models.close()
        broker.stop()
    return {
        "policy": policy,
        "seconds_to_target": None if hit is None else round(hit[0], 2),
        "version_at_target": None if hit is None else hit[1],
        "accuracy_at_target": None if hit is None else hit[2],
        "wall_seconds": round(wall, 1),
        "offline_events": [] if flapper is None else flapper.events,
        "models": [{"t": round(t, 2), "version": v, "accuracy": a} for t, v, a in rows],
    }


def best_by(result: dict[str, Any], t: float) -> float | None:
    """The best accuracy among the models a run published by ``t`` seconds."""
    accs = [m["accuracy"] for m in result["models"] if m["t"] <= t]
    return max(accs) if accs else None


# task -> its dataset and the defaults of the flags left unset (None)
TASKS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"dataset": "digits", "agents": 6, "slow": 2, "fast_delay": 0.5,
                   "slow_delay": 2.0, "offline": 0, "offline_period": 60.0, "target": 0.9,
                   "eval_examples": 500, "partition": "iid",
                   "timeout": 300.0, "buffer_size": 3, "out": "fedbuff.json"},
    "fmnist-cnn": {"dataset": "fashion-mnist", "agents": 10, "slow": 3, "fast_delay": 2.0,
                   "slow_delay": 20.0, "offline": 2, "offline_period": 120.0, "target": 0.85,
                   "eval_examples": 2000,
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
    p.add_argument("--offline", type=int, default=None,
                   help="how many agents (after the slow ones) are offline half the time")
    p.add_argument("--offline-period", type=float, default=None,
                   help="seconds of one online + offline cycle of those agents")
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
    # equal wall time: when the first policy hit the target, else the end of the shorter run
    hits = [r["seconds_to_target"] for r in results if r["seconds_to_target"] is not None]
    equal_t = min(hits) if hits else min(r["wall_seconds"] for r in results)
    for r in results:
        r["best_accuracy_at_equal_time"] = best_by(r, equal_t)
    print(f"{args.agents} agents ({args.slow} with train_delay {args.slow_delay}s, "
          f"{args.offline} offline {args.offline_period / 2:g} s of every "
          f"{args.offline_period:g} s, others {args.fast_delay}s), target accuracy {args.target}")
    print(f"{'policy':8} {'s to target':>12} {'version':>8} {'accuracy':>9} {'models':>7} "
          f"{'best at ' + format(equal_t, '.0f') + ' s':>14} {'best':>6} {'wall s':>7}")
    for r in results:
        secs = "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"
        ver = "-" if r["version_at_target"] is None else str(r["version_at_target"])
        acc = "-" if r["accuracy_at_target"] is None else f"{r['accuracy_at_target']:.3f}"
        eq = r["best_accuracy_at_equal_time"]
        best = max((m["accuracy"] for m in r["models"]), default=None)
        print(f"{r['policy']:8} {secs:>12} {ver:>8} {acc:>9} {len(r['models']):>7} "
              f"{'-' if eq is None else format(eq, '.3f'):>14} "
              f"{'-' if best is None else format(best, '.3f'):>6} {r['wall_seconds']:>7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(("numpy", "ai-edge-litert")),
        "equal_time_seconds": equal_t,
        "results": results,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
