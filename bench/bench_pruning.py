"""Pruning (docs/pruning.md): accuracy and update bytes at 50/80/90 % sparsity vs dense, the
LiteRT train-step time of the masked step vs the plain one, and the size of the compact
inference model (``fedmq model export --pruned``).

Every federation is real (`fedmq_ops.localfleet.run_federation`: Mosquitto, the aggregator
and agent processes); runs differ only in ``prune`` (the aggregator's ``prune_target``; the
schedule ramps to it over ``--schedule`` aggregations, mask re-chosen every ``--every``).
Codec int8: pruned rounds send masked-int8 (kept values only).

- ``--task digits``: digits-mlp, 8 agents, dirichlet:0.5, 2 local epochs, lr 0.2, 20 rounds,
  ``--seeds`` seeds (~5-10 s per run);
- ``--task fmnist``: the issue's FMNIST task (fmnist-cnn, 10 agents, dirichlet:0.5, 1 epoch,
  batch 32, lr 0.2, 20 rounds, int8; the ``fedmq experiment fmnist-cnn`` preset), ~4 min a run.

Accuracy: the aggregator's held-out test accuracy after the last round and the mean of the
last 5 rounds; bytes: update payload bytes per device in the last round (all at the target
sparsity). Train step: ``TFLiteModel.train_step`` with ``train`` vs ``train_masked`` (mask
at 80 %), one thread, best of 5 runs of ``--steps`` steps.

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_pruning.py --task digits
    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_pruning.py --task fmnist

Prints tables and writes bench/results/pruning_<task>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

from fedmq.models.litert import TFLiteModel
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.prune.mask import magnitude_mask
from fedmq.prune.strategy import prunable_tensors
from fedmq_ops.experiment import PRESETS
from fedmq_ops.localfleet import FederationSpec, run_federation

LAST_K = 5


def task_spec(task: str, rounds: int) -> FederationSpec:
    if task == "digits":
        return FederationSpec(rounds=rounds, broker="mosquitto", timeout=900)
    return dataclasses.replace(PRESETS["fmnist-cnn"], rounds=rounds, broker="mosquitto",
                               timeout=3600)


def run_one(base: FederationSpec, prune: float, seed: int, schedule: int, every: int,
            workdir: Path, export: bool) -> dict[str, Any]:
    spec = dataclasses.replace(
        base, prune=prune, seed=seed, fleet=f"prune{int(prune * 100)}s{seed}",
        workdir=workdir, extra_aggregator={"prune_schedule_rounds": schedule,
                                           "prune_every": every} if prune else {},
    )
    t0 = time.perf_counter()
    result = run_federation(spec)
    rows = result.rows
    last = rows[-1]
    out: dict[str, Any] = {
        "prune": prune, "seed": seed, "final_accuracy": last.accuracy,
        "last5_accuracy": statistics.fmean(r.accuracy for r in rows[-LAST_K:]),
        "accuracy_per_round": [r.accuracy for r in rows],
        "update_bytes_last": last.bytes_in / max(last.participants, 1),
        "update_bytes_first": rows[0].bytes_in / max(rows[0].participants, 1),
        "wall_seconds": time.perf_counter() - t0,
    }
    model = workdir / "aggregator" / "models" / f"v{last.version}.npz"
    with np.load(model) as npz:
        weights = {k: npz[k] for k in npz.files}
    total = sum(v.size for v in weights.values())
    out["model_sparsity"] = sum(int(np.count_nonzero(v == 0)) for v in weights.values()) / total
    if export:
        from fedmq_ops.pruned_export import export_pruned

        bundle = load_bundle(prebuilt_bundle_path(base.model))
        res = export_pruned(bundle, weights, workdir / "pruned.tflite")
        out["inference_tflite_bytes"] = res.tflite_bytes
        out["inference_agreement"] = res.agreement
    return out


def step_times(model_name: str, steps: int) -> dict[str, float]:
    bundle = load_bundle(prebuilt_bundle_path(model_name))
    spec = bundle.spec
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (spec.train_batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, spec.train_batch).astype(np.int32)
    w = np.ones(spec.train_batch, np.float32)
    shapes = {t.name: t.shape for t in spec.weights if t.name in spec.trainable}
    mask = magnitude_mask(bundle.initial_weights, 0.8, prunable_tensors(shapes))
    out = {}
    for label, masks in (("train", None), ("train_masked", mask.float_masks())):
        m = TFLiteModel(bundle, num_threads=1)
        m.set_mask(masks)
        for _ in range(20):
            m.train_step(x, y, w, 0.01)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(steps):
                m.train_step(x, y, w, 0.01)
            best = min(best, (time.perf_counter() - t0) / steps)
        out[label] = best * 1000.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=("digits", "fmnist"), default="digits")
    ap.add_argument("--sparsities", default="0,0.5,0.8,0.9")
    ap.add_argument("--seeds", type=int, default=None, help="default: 3 digits, 1 fmnist")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--schedule", type=int, default=10, help="prune_schedule_rounds")
    ap.add_argument("--every", type=int, default=2, help="prune_every")
    ap.add_argument("--steps", type=int, default=None, help="train steps timed per run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seeds = args.seeds or (3 if args.task == "digits" else 1)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    base = task_spec(args.task, args.rounds)
    out_path = args.out or Path(__file__).parent / "results" / f"pruning_{args.task}.json"
    report: dict[str, Any] = {
        "task": args.task, "spec": {k: str(v) for k, v in dataclasses.asdict(base).items()},
        "schedule_rounds": args.schedule, "every": args.every, "machine": machine_info(
            ("numpy", "ai-edge-litert", "tensorflow")), "runs": [], "step_ms": {},
    }
    steps = args.steps or (200 if args.task == "digits" else 30)
    report["step_ms"] = step_times(base.model, steps)
    print(f"LiteRT train step ({base.model}, batch {load_bundle(prebuilt_bundle_path(base.model)).spec.train_batch}, 1 thread, best of 5 x {steps}): "  # noqa: E501
          f"train {report['step_ms']['train']:.3f} ms, train_masked "
          f"{report['step_ms']['train_masked']:.3f} ms", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        for seed in range(seeds):  # interleaved: load drift hits every sparsity alike
            for prune in sparsities:
                run = run_one(base, prune, seed, args.schedule, args.every,
                              Path(tmp) / f"p{prune}s{seed}", export=prune > 0 and seed == 0)
                report["runs"].append(run)
                print(f"prune {prune:.2f} seed {seed}: final {run['final_accuracy']:.4f}, "
                      f"last-5 {run['last5_accuracy']:.4f}, update {run['update_bytes_last']:.0f}"
                      f" B, {run['wall_seconds']:.0f} s", flush=True)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(report, indent=2))
    dense = [r for r in report["runs"] if r["prune"] == 0]
    print("\n| sparsity | final acc | last-5 acc | vs dense (last-5, points) | update B/device "
          "| vs dense | inference .tflite B |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for prune in sparsities:
        runs = [r for r in report["runs"] if r["prune"] == prune]
        final = statistics.fmean(r["final_accuracy"] for r in runs)
        last5 = statistics.fmean(r["last5_accuracy"] for r in runs)
        nbytes = statistics.fmean(r["update_bytes_last"] for r in runs)
        d5 = statistics.fmean(r["last5_accuracy"] for r in dense) if dense else float("nan")
        db = statistics.fmean(r["update_bytes_last"] for r in dense) if dense else float("nan")
        inf_b = next((r.get("inference_tflite_bytes") for r in runs if "inference_tflite_bytes"
                      in r), None)
        rows.append({"prune": prune, "final": final, "last5": last5, "bytes": nbytes,
                     "delta_points": 100 * (last5 - d5), "bytes_ratio": db / nbytes,
                     "inference_tflite_bytes": inf_b, "seeds": len(runs)})
        print(f"| {100 * prune:.0f} % | {100 * final:.2f} % | {100 * last5:.2f} % | "
              f"{100 * (last5 - d5):+.2f} | {nbytes:,.0f} | {db / nbytes:.2f}x | "
              f"{inf_b if inf_b is not None else '-'} |")
    report["summary"] = rows
    out_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
