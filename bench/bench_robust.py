"""Accuracy of robust strategies under Byzantine devices: a quick in-process simulation.

digits-mlp trained with the real LiteRT trainer on the digits dataset, 10 devices
(Dirichlet 0.5 partition, seed 0), 10 synchronous rounds, every device in every round. Each
update goes through the real codec (``--codec``, int8 by default), the strategy's own
accumulator (a ``WeightedSum`` or a bounded ``BufferedUpdates``) and the strategy; the global
model is evaluated on the digits test split after the last round. No broker, no aggregator
process: this measures the aggregation rules, not the transport.

Byzantine devices (the first 1 or 3 of 10) train like the others, then send either
``-delta`` (sign flip) or ``100 x delta`` (scaled), with their true example count.

    .venv/bin/python bench/bench_robust.py [--rounds 10] [--epochs 1] [--lr 0.05] [--seeds 3]

Prints a table (final accuracy per strategy x attack, mean and range over ``--seeds``
partition/training seeds) and writes bench/results/robust.json.

``--task fmnist-cnn``: the FMNIST task instead (fmnist-cnn on Debian's Fashion-MNIST, 60,000
training and 10,000 test images, 10 devices, Dirichlet 0.5, 1 local epoch of batch 32 at lr
0.2, int8: the ``fedmq experiment fmnist-cnn`` preset run in one process), the five
strategies fedavg, norm bounding, median, trimmed mean and Krum, 1 seed. A round trains on
all 60,000 images, so the grid is slow; ``--strategies``/``--attacks`` pick a slice and the
results are merged into ``--out`` (bench/results/robust_fmnist.json by default, keyed by
strategy and attack; a re-run replaces its cell):

    .venv/bin/python bench/bench_robust.py --task fmnist-cnn --rounds 10 \
        --strategies fedavg,median --attacks none,"30% sign-flip"
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info as _machine_info

from aggregator.bundles import resolve_bundle
from aggregator.evaluate import TFLiteEvaluator
from edge_agent.trainer import LiteRTTrainer
from fedmq.data.datasets import load_dataset
from fedmq.data.local import LocalData, LocalDataConfig
from fedmq.errors import ModelError
from fedmq.update import codecs
from fedmq.update.strategies import Strategy, StrategyOptions, make_strategy

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 10

# name -> (registered strategy, options); trim 0.3 and krum_f 3 assume up to 30 % attackers.
STRATEGIES: dict[str, tuple[str, StrategyOptions]] = {
    "fedavg": ("fedavg", StrategyOptions()),
    "median": ("median", StrategyOptions()),
    "trimmed_mean(0.3)": ("trimmed_mean", StrategyOptions(trim=0.3)),
    "krum(f=3,m=7)": ("krum", StrategyOptions(krum_f=3)),
    "fedavg+clip(1x median)": ("fedavg", StrategyOptions(clip_updates="adaptive")),
    "fedavg+zero(k=3)": ("fedavg", StrategyOptions(zero_outliers_k=3.0)),
}
ATTACKS: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "none": (0, lambda d: d),
    "10% sign-flip": (1, lambda d: -d),
    "30% sign-flip": (3, lambda d: -d),
    "10% scaled 100x": (1, lambda d: d * np.float32(100)),
    "30% scaled 100x": (3, lambda d: d * np.float32(100)),
}


def run(strategy: Strategy, attack: str, devices: list[LocalData], trainer: LiteRTTrainer,
        evaluate: Callable[[Mapping[str, np.ndarray]], dict[str, float]],
        initial: Mapping[str, np.ndarray], rounds: int, epochs: int, lr: float,
        codec: str, seed: int) -> tuple[list[float], int]:
    """Accuracy after each round, and how many device trainings failed.

    A device whose training diverges (``ModelError``: a non-finite loss, e.g. on a global model
    an attack has blown up) skips the round and sends nothing, as the edge agent does; a round
    without any update leaves the model as it was. The aggregator's publication guard (which
    refuses a model with ``|w| > max_model_weight``) is not modelled."""
    bad, corrupt = ATTACKS[attack]
    weights = {k: v.copy() for k, v in initial.items()}
    shapes = {k: v.shape for k, v in weights.items()}
    curve = []
    failures = 0
    for r in range(1, rounds + 1):
        acc = strategy.new_accumulator(shapes)
        folded = 0
        for i, data in enumerate(devices):
            x, y = data.round_batch(r)
            trainer.set_weights(weights)
            rng = np.random.default_rng([seed, i, r])
            try:
                trainer.fit(x, y, epochs=epochs, lr=lr, rng=rng)
            except ModelError:
                failures += 1
                continue
            local = trainer.get_weights()
            delta = {k: (local[k] - weights[k]).astype(np.float32) for k in weights}
            if i < bad:
                delta = {k: corrupt(v).astype(np.float32) for k, v in delta.items()}
            acc.fold(codecs.encode_delta(delta, codec, rng), codec, float(len(y)))
            folded += 1
        if folded:
            weights = strategy.aggregate(weights, acc.result())
        curve.append(float(evaluate(weights)["accuracy"]))
    return curve, failures


# task -> (model, dataset, defaults for --rounds, --lr, --seeds, strategies, --out)
TASKS: dict[str, dict[str, Any]] = {
    "digits-mlp": {"dataset": "digits", "rounds": 10, "lr": 0.05, "seeds": 3,
                   "strategies": list(STRATEGIES), "out": "robust.json"},
    "fmnist-cnn": {"dataset": "fashion-mnist", "rounds": 20, "lr": 0.2, "seeds": 1,
                   "strategies": ["fedavg", "fedavg+clip(1x median)", "median",
                                  "trimmed_mean(0.3)", "krum(f=3,m=7)"],
                   "out": "robust_fmnist.json"},
}


def _names(text: str | None, known: list[str], what: str) -> list[str]:
    """Comma-separated names from ``known``; a label also answers to its part before "("
    (``krum`` for ``krum(f=3,m=7)``, ``fedavg+clip``)."""
    if text is None:
        return known
    alias = {k.split("(")[0]: k for k in known} | {k: k for k in known}
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in alias]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(alias)}")
    return [alias[n] for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="digits-mlp")
    ap.add_argument("--rounds", type=int, default=None, help="default: 10 digits, 20 fmnist")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=None, help="default: 0.05 digits, 0.2 fmnist")
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--seeds", type=int, default=None,
                    help="partition and training seeds 0..N-1 (default: 3 digits, 1 fmnist)")
    ap.add_argument("--strategies", default=None, help="comma-separated labels (default: all "
                    "of the task)")
    ap.add_argument("--attacks", default=None, help="comma-separated (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="LiteRT threads of the trainer")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: bench/results/robust.json (digits), robust_fmnist.json")
    args = ap.parse_args()
    task = TASKS[args.task]
    args.rounds = args.rounds or task["rounds"]
    args.lr = args.lr or task["lr"]
    args.seeds = args.seeds or task["seeds"]
    args.out = args.out or ROOT / "bench" / "results" / task["out"]
    labels = _names(args.strategies, task["strategies"], "strategies")
    attacks = _names(args.attacks, list(ATTACKS), "attacks")

    bundle = resolve_bundle(args.task)
    train, test = load_dataset(task["dataset"])
    fleets = [
        [
            LocalData.from_config(
                LocalDataConfig(task["dataset"], partition="dirichlet:0.5",
                                num_clients=DEVICES, client_index=i, seed=seed),
                train,
            )
            for i in range(DEVICES)
        ]
        for seed in range(args.seeds)
    ]
    trainer = LiteRTTrainer(bundle, num_threads=args.threads)
    evaluate = TFLiteEvaluator(bundle, np.asarray(test.x, np.float32),
                               np.asarray(test.y, np.int32))
    initial = bundle.initial_trainable()

    # Merge with what --out holds for the same task settings (a slice replaces its cells).
    task_json = {"model": args.task, "dataset": task["dataset"], "devices": DEVICES,
                 "partition": "dirichlet:0.5", "rounds": args.rounds, "epochs": args.epochs,
                 "lr": args.lr, "codec": args.codec, "seeds": args.seeds,
                 "eval_examples": len(test)}
    old: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    results: list[dict[str, Any]] = (
        [r for r in old.get("results", []) if (r["strategy"], r["attack"]) not in
         {(label, attack) for label in labels for attack in attacks}]
        if old.get("task") == task_json else []
    )
    t0 = time.perf_counter()
    for label in labels:
        name, options = STRATEGIES[label]
        for attack in attacks:
            t_cell = time.perf_counter()
            runs = [
                run(make_strategy(name, options=options), attack, devices, trainer, evaluate,
                    initial, args.rounds, args.epochs, args.lr, args.codec, seed)
                for seed, devices in enumerate(fleets)
            ]
            curves = [c for c, _ in runs]
            finals = [c[-1] for c in curves]
            results.append({"strategy": label, "attack": attack, "finals": finals,
                            "accuracy": float(np.mean(finals)), "curves": curves,
                            "failed_trainings": [f for _, f in runs],
                            "seconds": round(time.perf_counter() - t_cell, 1),
                            # 1/5/15-min load of the shared machine when the cell ended
                            "load_average": [round(x, 2) for x in os.getloadavg()],
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            _write(args.out, task_json, results, old.get("seconds", 0.0) + time.perf_counter()
                   - t0)
            print(f"  {label:24s} {attack:16s} {np.mean(finals):.3f} "
                  f"[{min(finals):.3f}, {max(finals):.3f}]", flush=True)
    seconds = time.perf_counter() - t0

    shown = [a for a in ATTACKS if any(r["attack"] == a for r in results)]
    header = "| strategy | " + " | ".join(shown) + " |"
    lines = [header, "|" + "---|" * (len(shown) + 1)]
    for label in STRATEGIES:
        cells = {r["attack"]: r for r in results if r["strategy"] == label}
        if not cells:
            continue
        row = [
            "-" if a not in cells else
            f"{cells[a]['accuracy']:.3f}" if args.seeds == 1 else
            f"{cells[a]['accuracy']:.3f} [{min(cells[a]['finals']):.2f}-"
            f"{max(cells[a]['finals']):.2f}]"
            for a in shown
        ]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    print("\n".join(lines))
    print(f"(mean [min-max] final accuracy over {args.seeds} seeds; {seconds:.0f} s; "
          f"{task['dataset']} test split, {len(test)} examples)")
    print(f"wrote {args.out}")


def _write(path: Path, task: dict[str, Any], results: list[dict[str, Any]],
           seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "task": task, "results": results, "seconds": seconds, "machine": _machine_info(),
    }, indent=1))


if __name__ == "__main__":
    main()
