"""Local training throughput and memory: LiteRT backend vs Keras backend on fmnist-cnn.

Every configuration runs in its OWN subprocess, so each one's peak RSS (``ru_maxrss`` of the
child, from ``os.wait4``) is its own; all run side by side in one invocation and the ratio
LiteRT / Keras is computed from the same run. Configurations:

- ``litert`` with 1 and 2 interpreter threads, ``keras`` (TensorFlow, all cores): the
  prebuilt ``fmnist-cnn`` bundle (same initial weights), batch 32, a real Fashion-MNIST
  subset (the first ``--examples`` training images), ``--warmup`` epoch(s) then
  ``--epochs`` measured epochs.
- ``agent``: what an edge agent holds: its local data (``fashion-mnist``, Dirichlet(0.5)
  slice 3 of 10, loaded as the agent does) + the LiteRT trainer, one epoch; and
  ``agent-eager``, the same with the pre-fix data path (whole split as float32, then slice).

``--rounds R`` repeats the set R times interleaved and keeps each configuration's best
throughput (robust to other load on a shared machine).

    .venv/bin/python bench/bench_training.py [--examples 6000] [--epochs 2] [--rounds 1]

Prints a table and writes bench/results/training.json. Target (docs/facts.md): LiteRT >= Keras
examples/s with the agent at <= 150 MB RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import machine_info as _machine_info

from fedmq.memory import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fmnist-cnn"
LR = 0.05
RSS_TARGET_MB = 150.0


# -- child side ---------------------------------------------------------------------------------
def _fmnist_subset(n: int) -> tuple[Any, Any]:
    import numpy as np

    from fedmq.data.datasets import FASHION_MNIST_ROOT, read_idx, read_idx_rows

    root = Path(FASHION_MNIST_ROOT)
    idx = np.arange(n)
    images = read_idx_rows(root / "train-images-idx3-ubyte.gz", idx)
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")[:n].astype(np.int32)
    x = images.astype(np.float32)
    x /= np.float32(255.0)
    return x.reshape(n, 28, 28, 1), labels


def child(kind: str, threads: int, examples: int, warmup: int, epochs: int) -> dict[str, Any]:
    import numpy as np

    from fedmq.models import load_bundle, prebuilt_bundle_path

    t_start = time.perf_counter()
    bundle = load_bundle(prebuilt_bundle_path(MODEL))
    trainer: Any
    if kind in ("agent", "agent-eager"):
        from edge_agent.trainer import LiteRTTrainer
        from fedmq.data.datasets import load_fashion_mnist
        from fedmq.data.local import LocalData, LocalDataConfig

        cfg = LocalDataConfig(
            "fashion-mnist", partition="dirichlet:0.5", num_clients=10, client_index=3, seed=0
        )
        dataset = load_fashion_mnist()[0] if kind == "agent-eager" else None
        data = LocalData.from_config(cfg, dataset)
        del dataset
        x, y = data.round_batch(0)
        trainer = LiteRTTrainer(bundle, num_threads=threads)
        warmup, epochs = 0, 1
    else:
        x, y = _fmnist_subset(examples)
        if kind == "keras":
            from edge_agent.keras_trainer import KerasTrainer

            trainer = KerasTrainer(bundle, num_threads=threads)
        else:
            from edge_agent.trainer import LiteRTTrainer

            trainer = LiteRTTrainer(bundle, num_threads=threads)
    setup_s = time.perf_counter() - t_start
    rng = np.random.default_rng(0)
    for _ in range(warmup):
        trainer.fit(x, y, epochs=1, lr=LR, rng=rng)
    epoch_s, losses = [], []
    for _ in range(epochs):
        m = trainer.fit(x, y, epochs=1, lr=LR, rng=rng)
        epoch_s.append(m.seconds)
        losses.append(m.loss)
    rss_mb = peak_rss_mb()  # VmHWM: ru_maxrss would carry the parent's peak across exec
    return {
        "kind": kind,
        "threads": threads,
        "runtime": trainer.runtime_name,
        "examples": len(y),
        "warmup_epochs": warmup,
        "epochs": epochs,
        "epoch_seconds": epoch_s,
        "examples_per_s": len(y) * epochs / sum(epoch_s),
        "losses": losses,
        "setup_seconds": setup_s,
        "self_maxrss_mb": rss_mb,
    }


# -- parent side --------------------------------------------------------------------------------
def run_child(kind: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", kind, "--threads", str(threads),
        "--examples", str(args.examples), "--warmup", str(args.warmup),
        "--epochs", str(args.epochs),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"child {kind} failed:\n{err.read().decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    result["child_maxrss_mb"] = usage.ru_maxrss / 1024
    return result


def machine_info() -> dict[str, Any]:
    return _machine_info(("numpy", "ai-edge-litert", "tensorflow", "tensorflow-cpu", "keras"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-agent", action="store_true", help="skip the agent memory rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "training.json"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.examples, args.warmup,
                               args.epochs)))
        return

    configs = [("litert", 1), ("litert", 2), ("keras", 2)]
    if not args.no_agent:
        configs += [("agent", 2), ("agent-eager", 2)]
    load_before = os.getloadavg()
    best: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for kind, threads in configs:
            r = run_child(kind, threads, args)
            runs.append(r)
            key = f"{kind}/{threads}"
            print(f"  {key:16s} {r['examples_per_s']:8.0f} examples/s  "
                  f"{r['child_maxrss_mb']:6.1f} MB", file=sys.stderr)
            if key not in best or r["examples_per_s"] > best[key]["examples_per_s"]:
                best[key] = {**r, "rss_mb_all_rounds": []}
    for r in runs:
        best[f"{r['kind']}/{r['threads']}"]["rss_mb_all_rounds"].append(r["child_maxrss_mb"])
    load_after = os.getloadavg()

    keras = best["keras/2"]["examples_per_s"]
    print(f"\nfmnist-cnn local training, batch 32, {args.examples} Fashion-MNIST examples, "
          f"{args.warmup} warm-up + {args.epochs} measured epochs, best of {args.rounds}")
    print(f"{'backend':12s} {'threads':>7s} {'examples/s':>11s} {'vs keras':>9s} "
          f"{'peak RSS MB':>12s} {'<=150MB':>8s}")
    for r in best.values():
        rss = max(r["rss_mb_all_rounds"])
        print(f"{r['kind']:12s} {r['threads']:7d} {r['examples_per_s']:11.0f} "
              f"{r['examples_per_s'] / keras:8.2f}x {rss:12.1f} "
              f"{'yes' if rss <= RSS_TARGET_MB else 'NO':>8s}")
    ratio = {f"litert_{t}t_over_keras": best[f"litert/{t}"]["examples_per_s"] / keras
             for t in (1, 2)}
    ratio["litert_2t_over_1t"] = (
        best["litert/2"]["examples_per_s"] / best["litert/1"]["examples_per_s"]
    )
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({machine_info()['cpus']} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "training",
                "model": MODEL,
                "lr": LR,
                "batch": 32,
                "examples": args.examples,
                "warmup_epochs": args.warmup,
                "measured_epochs": args.epochs,
                "rounds": args.rounds,
                "rss_target_mb": RSS_TARGET_MB,
                "results": best,
                "ratios": ratio,
                "machine": {
                    **machine_info(),
                    "loadavg_before": load_before,
                    "loadavg_after": load_after,
                },
                "unix_time": time.time(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
