"""Error feedback and residual policies for the sparse codecs, and int4 per-tensor vs
per-block scales, measured with the real LiteRT trainer in one process (no broker).

Federation: digits-mlp (prebuilt bundle), the digits data split Dirichlet(0.5) over
``--devices`` devices, ``--rounds`` rounds of FedAvg (each selected device trains
``--epochs`` local epochs at ``--lr``; its delta is encoded on the "device" with the real
codec and residual policy (:func:`fedmq.update.codecs.residual.encode_round`), decoded and
averaged by examples on the "server"). Each configuration runs the same seeds; the table
gives final and last-5-round test accuracy (mean over seeds) and tensor bytes per update.

Experiments:

- ``ef``: top-k (f16 values) at 1/5/10 % and stc at 5 %, error feedback on (residual kept)
  vs off, everyone selected every round; float32 and int8 as references.
- ``skip``: ``--participation`` of the devices selected per round (0.25: a device skips
  three rounds in four on average): residual policy keep vs decay(0.5) vs reset vs off,
  top-k f16 at 1 % and 5 %.
- ``int4``: real deltas (one round of local training from the initial model on each device,
  digits-mlp and, when its data is present, fmnist-cnn); relative L2 error and bytes of int4
  with one scale per tensor vs blocks of 32..1024 (mean over 10 rounding draws).

    PYTHONPATH=. .venv/bin/python bench/bench_error_feedback.py [--seeds 10] [--rounds 30]

Prints tables and writes bench/results/error_feedback.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

from edge_agent.trainer import LiteRTTrainer
from fedmq.data.datasets import FASHION_MNIST_ROOT, load_digits, read_idx, read_idx_rows
from fedmq.data.partition import dirichlet
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.update import codecs
from fedmq.update.codecs.base import CodecState
from fedmq.update.codecs.int4 import Int4
from fedmq.update.codecs.residual import encode_round

LAST_K = 5


def federate(
    codec: str, params: Mapping[str, object], *, seed: int, devices: int, rounds: int,
    epochs: int, lr: float, participation: float,
) -> dict[str, Any]:
    train, test = load_digits(seed=0)
    parts = dirichlet(train.y, devices, 0.5, seed)
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    trainer = LiteRTTrainer(bundle, num_threads=1)
    names = bundle.spec.trainable
    weights = {n: np.array(v, np.float32) for n, v in bundle.initial_weights.items()}
    states: dict[int, CodecState | None] = {d: None for d in range(devices)}
    select_rng = np.random.default_rng([seed, 1])
    curve: list[float] = []
    nbytes = updates = 0
    for r in range(1, rounds + 1):
        chosen = sorted(select_rng.choice(devices, max(1, round(participation * devices)),
                                          replace=False).tolist())
        total = {n: np.zeros_like(weights[n]) for n in names}
        examples = 0
        for d in chosen:
            rng = np.random.default_rng([seed, d, r])
            idx = parts[d]
            trainer.set_weights(weights)
            trainer.fit(train.x[idx], train.y[idx], epochs=epochs, lr=lr, rng=rng)
            local = trainer.get_weights()
            delta = {n: local[n] - weights[n] for n in names}
            enc = encode_round(codec, delta, rng, states[d], params, r)
            states[d] = enc.state
            nbytes += codecs.encoded_nbytes(enc.tensors)
            updates += 1
            for t in enc.tensors:
                total[t.name] += np.float32(len(idx)) * codecs.decode_tensor(t, codec)
            examples += len(idx)
        for n in names:
            weights[n] = weights[n] + total[n] / np.float32(examples)
        trainer.set_weights(weights)
        curve.append(trainer.evaluate(test.x, test.y).accuracy)
    return {"final": curve[-1], "last5": statistics.fmean(curve[-LAST_K:]),
            "bytes_per_update": nbytes / updates, "curve": curve}


def _row(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "config": label,
        "final_mean": statistics.fmean(x["final"] for x in runs),
        "final_stdev": statistics.stdev([x["final"] for x in runs]) if len(runs) > 1 else 0.0,
        "last5_mean": statistics.fmean(x["last5"] for x in runs),
        "bytes_per_update": statistics.fmean(x["bytes_per_update"] for x in runs),
        "runs": runs,
    }


def run_grid(
    grid: list[tuple[str, str, dict[str, object]]], args: argparse.Namespace,
    participation: float,
) -> list[dict[str, Any]]:
    rows = []
    for label, codec, params in grid:
        runs = [federate(codec, params, seed=s, devices=args.devices, rounds=args.rounds,
                         epochs=args.epochs, lr=args.lr, participation=participation)
                for s in range(args.seeds)]
        rows.append(_row(label, runs))
        r = rows[-1]
        print(f"{label:28} final {100 * r['final_mean']:6.2f} % (sd {100 * r['final_stdev']:4.2f})"
              f"  last-5 {100 * r['last5_mean']:6.2f} %  {r['bytes_per_update']:>9,.0f} B/update",
              flush=True)
    return rows


def ef_grid() -> list[tuple[str, str, dict[str, object]]]:
    grid: list[tuple[str, str, dict[str, object]]] = [
        ("float32", "float32", {}), ("int8", "int8", {}), ("int4", "int4", {}),
    ]
    for frac in (0.01, 0.05, 0.1):
        for policy in ("keep", "off"):
            label = f"topk-f16 {frac:.0%} EF {'on' if policy == 'keep' else 'off'}"
            grid.append((label, "topk-f16", {"topk_fraction": frac, "residual_policy": policy}))
    for codec in ("topk-int4", "stc"):
        for policy in ("keep", "off"):
            label = f"{codec} 5% EF {'on' if policy == 'keep' else 'off'}"
            grid.append((label, codec, {"topk_fraction": 0.05, "residual_policy": policy}))
    return grid


def skip_grid() -> list[tuple[str, str, dict[str, object]]]:
    grid: list[tuple[str, str, dict[str, object]]] = [("float32", "float32", {})]
    for frac in (0.01, 0.05):
        grid += [(f"topk-f16 {frac:.0%} {p}", "topk-f16",
                  {"topk_fraction": frac, "residual_policy": p, "residual_decay": 0.5})
                 for p in ("keep", "decay", "reset", "off")]
    return grid


def _deltas(model: str, x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> list[
        dict[str, np.ndarray]]:
    bundle = load_bundle(prebuilt_bundle_path(model))
    trainer = LiteRTTrainer(bundle, num_threads=1)
    out = []
    for d, idx in enumerate(parts):
        trainer.set_weights(bundle.initial_weights)
        trainer.fit(x[idx], y[idx], epochs=1, lr=0.1, rng=np.random.default_rng(d))
        local = trainer.get_weights()
        out.append({n: local[n] - bundle.initial_weights[n] for n in bundle.spec.trainable})
    return out


def int4_blocks(devices: int) -> dict[str, Any]:
    train, _ = load_digits(seed=0)
    sets = {"digits-mlp": _deltas("digits-mlp", train.x, train.y,
                                  dirichlet(train.y, devices, 0.5, 0))}
    root = Path(FASHION_MNIST_ROOT)
    if (root / "train-images-idx3-ubyte.gz").is_file():
        n = 2000
        images = read_idx_rows(root / "train-images-idx3-ubyte.gz", np.arange(n))
        x = (images.astype(np.float32) / np.float32(255.0)).reshape(n, 28, 28, 1)
        y = read_idx(root / "train-labels-idx1-ubyte.gz")[:n].astype(np.int32)
        sets["fmnist-cnn"] = _deltas("fmnist-cnn", x, y, dirichlet(y, 4, 0.5, 0))
    out: dict[str, Any] = {}
    print(f"{'model':11} {'int4 scale':>12} {'rel. L2 error':>14} {'bytes':>9} {'vs f32':>7}")
    for model, deltas in sets.items():
        raw = codecs.raw_nbytes(deltas[0])
        out[model] = {}
        for block in (None, 32, 64, 128, 256, 1024):
            impl = Int4(block)
            errs, size = [], 0
            for delta in deltas:
                for s in range(10):
                    rng = np.random.default_rng(s)
                    num = den = 0.0
                    size = 0
                    for name, v in delta.items():
                        t = impl.encode_tensor(name, v, rng)
                        size += len(t.data) + len(t.extra["scales"])
                        diff = impl.decode(t).astype(np.float64) - v
                        num += float(np.dot(diff.ravel(), diff.ravel()))
                        den += float(np.dot(v.ravel().astype(np.float64), v.ravel()))
                    errs.append((num / den) ** 0.5)
            label = "per tensor" if block is None else f"block {block}"
            out[model][label] = {"rel_l2_error": statistics.fmean(errs), "bytes": size,
                                 "ratio_vs_float32": raw / size}
            print(f"{model:11} {label:>12} {statistics.fmean(errs):>14.4f} {size:>9,} "
                  f"{raw / size:>6.2f}x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.2)
    ap.add_argument("--participation", type=float, default=0.25, help="skip experiment")
    ap.add_argument("--only", choices=("ef", "skip", "int4"), action="append")
    ap.add_argument("--out", type=Path,
                    default=Path(__file__).parent / "results" / "error_feedback.json")
    args = ap.parse_args()
    only = set(args.only or ("ef", "skip", "int4"))
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "error_feedback", "model": "digits-mlp", "devices": args.devices,
        "rounds": args.rounds, "epochs": args.epochs, "lr": args.lr, "seeds": args.seeds,
        "machine": machine_info(("numpy", "ai-edge-litert")),
    }
    if "int4" in only:
        print("int4: per-tensor vs per-block scales on real deltas")
        report["int4_blocks"] = int4_blocks(args.devices)
    if "ef" in only:
        print(f"error feedback on vs off ({args.devices} devices, all selected)")
        report["ef"] = run_grid(ef_grid(), args, 1.0)
    if "skip" in only:
        print(f"residual policy ({args.devices} devices, {args.participation:.0%} selected "
              "per round)")
        report["participation"] = args.participation
        report["skip"] = run_grid(skip_grid(), args, args.participation)
    report["wall_seconds"] = time.perf_counter() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
