"""FedProx and FedNova against FedAvg with heterogeneous local work: a quick in-process run.

digits-mlp trained with the real LiteRT trainer (``train`` / ``train_prox`` signatures of the
prebuilt bundle) on the digits dataset, 8 devices, Dirichlet 0.1 and 0.5 partitions, every
device in every round; device ``i`` trains ``1 + i % 4`` local epochs (1-4), so the devices'
step counts differ by their epochs and their data sizes. Each delta goes through the real
codec (int8); FedAvg and FedProx fold into the strategy's ``WeightedSum``, FedNova takes the
decoded deltas with each device's step count (``fednova_delta``). The global model is
evaluated on the digits test split after every round. No broker, no aggregator process.

    PYTHONPATH=. .venv/bin/python bench/bench_local_variants.py [--rounds 20] [--seeds 3]

Prints a table (final accuracy, mean [min-max] over seeds; rounds to 80 % accuracy) and
writes bench/results/local_variants.json.
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
from fedmq.update.strategies import FedNova, StepsDelta, StrategyOptions, make_strategy

ROOT = Path(__file__).resolve().parent.parent
DEVICES = 8
ALPHAS = (0.1, 0.5)
TARGET = 0.80
# label -> (strategy, FedProx mu)
VARIANTS: dict[str, tuple[str, float]] = {
    "fedavg": ("fedavg", 0.0),
    "fedprox(mu=0.01)": ("fedprox", 0.01),
    "fedprox(mu=0.1)": ("fedprox", 0.1),
    "fednova": ("fednova", 0.0),
}


def epochs_of(device: int) -> int:
    return 1 + device % 4


def run(variant: str, devices: list[LocalData], trainer: LiteRTTrainer,
        evaluate: Callable[[Mapping[str, np.ndarray]], dict[str, float]],
        initial: Mapping[str, np.ndarray], rounds: int, lr: float, codec: str,
        seed: int) -> tuple[list[float], int]:
    """Accuracy after each round, and the update bytes sent in all."""
    name, mu = VARIANTS[variant]
    weights = {k: v.copy() for k, v in initial.items()}
    shapes = {k: v.shape for k, v in weights.items()}
    curve: list[float] = []
    sent = 0
    strategy = None if name == "fednova" else make_strategy(
        name, options=StrategyOptions(prox_mu=mu))
    nova = FedNova()
    for r in range(1, rounds + 1):
        acc = strategy.new_accumulator(shapes) if strategy is not None else None
        nova_updates: list[StepsDelta] = []
        for i, data in enumerate(devices):
            x, y = data.round_batch(r)
            trainer.set_weights(weights)
            rng = np.random.default_rng([seed, i, r])
            if mu > 0:
                m = trainer.fit_prox(x, y, epochs=epochs_of(i), lr=lr, rng=rng, mu=mu)
            else:
                m = trainer.fit(x, y, epochs=epochs_of(i), lr=lr, rng=rng)
            local = trainer.get_weights()
            delta = {k: (local[k] - weights[k]).astype(np.float32) for k in weights}
            tensors = codecs.encode_delta(delta, codec, rng)
            sent += sum(len(t.data) for t in tensors)
            if acc is not None:
                acc.fold(tensors, codec, float(len(y)))
            else:
                decoded = {t.name: codecs.decode_tensor(t, codec) for t in tensors}
                nova_updates.append(StepsDelta(decoded, float(len(y)), m.steps))
        if strategy is not None and acc is not None:
            weights = strategy.aggregate(weights, acc.result())
        else:
            weights = nova.aggregate_steps(weights, nova_updates)
        curve.append(evaluate(weights)["accuracy"])
    return curve, sent


def rounds_to(curve: list[float], target: float) -> int | None:
    return next((r for r, a in enumerate(curve, start=1) if a >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--seeds", type=int, default=3, help="partition and training seeds 0..N-1")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "local_variants.json")
    args = ap.parse_args()

    bundle = resolve_bundle("digits-mlp")
    train, test = load_dataset("digits")
    trainer = LiteRTTrainer(bundle, num_threads=1)
    if "prox" not in trainer.variants:
        raise SystemExit("the digits-mlp bundle has no train_prox signature: re-export it")
    evaluate = TFLiteEvaluator(bundle, np.asarray(test.x, np.float32),
                               np.asarray(test.y, np.int32))
    initial = bundle.initial_trainable()

    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for alpha in ALPHAS:
        fleets = [
            [
                LocalData.from_config(
                    LocalDataConfig("digits", partition=f"dirichlet:{alpha}",
                                    num_clients=DEVICES, client_index=i, seed=seed),
                    train,
                )
                for i in range(DEVICES)
            ]
            for seed in range(args.seeds)
        ]
        for variant in VARIANTS:
            runs = [run(variant, devices, trainer, evaluate, initial, args.rounds, args.lr,
                        args.codec, seed) for seed, devices in enumerate(fleets)]
            curves = [c for c, _ in runs]
            finals = [c[-1] for c in curves]
            reach = [rounds_to(c, TARGET) for c in curves]
            results.append({"alpha": alpha, "strategy": variant, "finals": finals,
                            "accuracy": float(np.mean(finals)), "rounds_to_target": reach,
                            "update_bytes": [b for _, b in runs], "curves": curves})
            print(f"  dirichlet {alpha}: {variant:18s} {np.mean(finals):.3f} "
                  f"[{min(finals):.3f}, {max(finals):.3f}] to {TARGET:.0%}: {reach}", flush=True)
    seconds = time.perf_counter() - t0

    lines = [
        "| strategy | " + " | ".join(
            f"Dir {a}: final acc | Dir {a}: rounds to {TARGET:.0%}" for a in ALPHAS) + " |",
        "|" + "---|" * (2 * len(ALPHAS) + 1),
    ]
    for variant in VARIANTS:
        cells = []
        for alpha in ALPHAS:
            [res] = [r for r in results if r["strategy"] == variant and r["alpha"] == alpha]
            cells.append(f"{res['accuracy']:.3f} [{min(res['finals']):.2f}-"
                         f"{max(res['finals']):.2f}]")
            cells.append(", ".join("-" if x is None else str(x)
                                   for x in res["rounds_to_target"]))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"(final accuracy after {args.rounds} rounds, mean [min-max] over {args.seeds} seeds; "
          f"rounds to {TARGET:.0%} per seed, - = not reached; {seconds:.0f} s; digits test "
          f"split, {len(test)} examples)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "task": {"model": "digits-mlp", "dataset": "digits", "devices": DEVICES,
                 "alphas": list(ALPHAS), "epochs": [epochs_of(i) for i in range(DEVICES)],
                 "rounds": args.rounds, "lr": args.lr, "codec": args.codec,
                 "seeds": args.seeds, "eval_examples": len(test)},
        "results": results, "seconds": seconds, "machine": _machine_info(),
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
