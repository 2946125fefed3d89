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
"""

from __future__ import annotations

import argparse
import json
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
        codec: str, seed: int) -> list[float]:
    """Accuracy after each round."""
    bad, corrupt = ATTACKS[attack]
    weights = {k: v.copy() for k, v in initial.items()}
    shapes = {k: v.shape for k, v in weights.items()}
    curve = []
    for r in range(1, rounds + 1):
        acc = strategy.new_accumulator(shapes)
        for i, data in enumerate(devices):
            x, y = data.round_batch(r)
            trainer.set_weights(weights)
            rng = np.random.default_rng([seed, i, r])
            trainer.fit(x, y, epochs=epochs, lr=lr, rng=rng)
            local = trainer.get_weights()
            delta = {k: (local[k] - weights[k]).astype(np.float32) for k in weights}
            if i < bad:
                delta = {k: corrupt(v).astype(np.float32) for k, v in delta.items()}
            acc.fold(codecs.encode_delta(delta, codec, rng), codec, float(len(y)))
        weights = strategy.aggregate(weights, acc.result())
        curve.append(evaluate(weights)["accuracy"])
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--seeds", type=int, default=3, help="partition and training seeds 0..N-1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "robust.json")
    args = ap.parse_args()

    bundle = resolve_bundle("digits-mlp")
    train, test = load_dataset("digits")
    fleets = [
        [
            LocalData.from_config(
                LocalDataConfig("digits", partition="dirichlet:0.5", num_clients=DEVICES,
                                client_index=i, seed=seed),
                train,
            )
            for i in range(DEVICES)
        ]
        for seed in range(args.seeds)
    ]
    trainer = LiteRTTrainer(bundle, num_threads=1)
    evaluate = TFLiteEvaluator(bundle, np.asarray(test.x, np.float32),
                               np.asarray(test.y, np.int32))
    initial = bundle.initial_trainable()

    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for label, (name, options) in STRATEGIES.items():
        for attack in ATTACKS:
            curves = [
                run(make_strategy(name, options=options), attack, devices, trainer, evaluate,
                    initial, args.rounds, args.epochs, args.lr, args.codec, seed)
                for seed, devices in enumerate(fleets)
            ]
            finals = [c[-1] for c in curves]
            results.append({"strategy": label, "attack": attack, "finals": finals,
                            "accuracy": float(np.mean(finals)), "curves": curves})
            print(f"  {label:24s} {attack:16s} {np.mean(finals):.3f} "
                  f"[{min(finals):.3f}, {max(finals):.3f}]", flush=True)
    seconds = time.perf_counter() - t0

    header = "| strategy | " + " | ".join(ATTACKS) + " |"
    lines = [header, "|" + "---|" * (len(ATTACKS) + 1)]
    for label in STRATEGIES:
        row = [f"{r['accuracy']:.3f} [{min(r['finals']):.2f}-{max(r['finals']):.2f}]"
               for r in results if r["strategy"] == label]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    print("\n".join(lines))
    print(f"(mean [min-max] final accuracy over {args.seeds} seeds; {seconds:.0f} s; digits "
          f"test split, {len(test)} examples)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": {"model": "digits-mlp", "dataset": "digits", "devices": DEVICES,
                 "partition": "dirichlet:0.5", "rounds": args.rounds, "epochs": args.epochs,
                 "lr": args.lr, "codec": args.codec, "seeds": args.seeds,
                 "eval_examples": len(test)},
        "results": results, "seconds": seconds, "machine": _machine_info(),
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
