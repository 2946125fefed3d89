"""Uplink bytes and final accuracy per update codec: float32 vs float16 vs int8, side by side.

Target (docs/facts.md): "Uplink bytes per update: int8 = 1/4 of float32 at <= 0.5 point accuracy
loss". Every run is a real local federation (`fedmq_ops.localfleet.run_federation`: broker,
aggregator and agent processes); runs differ only in the codec. One run's final accuracy is
noisy, so the digits comparison (digits-mlp, 8 agents, dirichlet:0.5, 2 local epochs, lr 0.2,
20 rounds, ~5-10 s per run) is repeated over ``--seeds`` seeds (seed = partition + initial
sampling; the agents' shuffling is not seeded, so even two runs of one seed differ a little)
and the codecs are interleaved per seed so machine-load drift hits them alike. ``--fmnist``
adds one Fashion-MNIST run per codec (fmnist-cnn, 10 agents, 20 rounds, lr 0.2, ~4 min each).

Bytes per update = update payload bytes received by the aggregator (whole msgpack message:
header, tensor metadata and data) / accepted updates. Prints a table and writes
bench/results/compression.json.

    .venv/bin/python bench/bench_compression.py [--seeds 3] [--rounds 20] [--fmnist]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info as _machine_info

from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.update.codecs import codec_names, encode_delta, encoded_nbytes
from fedmq_ops.experiment import PRESETS
from fedmq_ops.localfleet import FederationResult, FederationSpec, run_federation

__all__ = ["main", "run_one", "summarize"]

TARGET_RATIO = 4.0
TARGET_LOSS_POINTS = 0.5
LAST_K = 5  # rounds averaged for the (less noisy) "last-5" accuracy


def machine_info() -> dict[str, Any]:
    return _machine_info(("numpy", "ai-edge-litert", "tflite-runtime", "paho-mqtt", "msgpack"))


def tensor_data_bytes(model: str, codec: str) -> int:
    """Bytes of tensor data alone in one update of ``model`` (payload minus message framing)."""
    bundle = load_bundle(prebuilt_bundle_path(model))
    delta = {n: np.zeros_like(bundle.initial_weights[n]) for n in bundle.spec.trainable}
    return encoded_nbytes(encode_delta(delta, codec, np.random.default_rng(0)))


def run_one(spec: FederationSpec) -> dict[str, Any]:
    """One federation; the figures this benchmark compares."""
    result: FederationResult = run_federation(spec)
    rows = result.rows
    updates = sum(r.participants for r in rows)
    bytes_in = sum(r.bytes_in for r in rows)
    tail = [r.accuracy for r in rows[-LAST_K:]]
    return {
        "seed": spec.seed,
        "codec": spec.codec,
        "final_accuracy": result.final_accuracy,
        "last5_accuracy": statistics.fmean(tail) if tail else float("nan"),
        "rounds": len(rows),
        "updates": updates,
        "bytes_in": bytes_in,
        "bytes_per_update": bytes_in / updates if updates else float("nan"),
        "tensor_data_bytes": tensor_data_bytes(spec.model, spec.codec),
        "wall_seconds": result.wall_seconds,
        "max_agent_peak_rss_mb": result.max_agent_rss_mb,
        "curve": [r.accuracy for r in rows],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per codec: mean/stdev accuracy, points vs float32 (paired by seed), bytes and ratio."""
    by_codec: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_codec.setdefault(r["codec"], []).append(r)
    base = {r["seed"]: r for r in by_codec.get("float32", [])}
    base_bytes = (
        statistics.fmean(r["bytes_per_update"] for r in base.values()) if base else float("nan")
    )
    base_data = next(iter(base.values()))["tensor_data_bytes"] if base else float("nan")
    out: dict[str, dict[str, Any]] = {}
    for codec, rs in by_codec.items():
        acc = [r["final_accuracy"] for r in rs]
        last = [r["last5_accuracy"] for r in rs]
        diffs = [
            100 * (r["final_accuracy"] - base[r["seed"]]["final_accuracy"])
            for r in rs
            if r["seed"] in base
        ]
        last_diffs = [
            100 * (r["last5_accuracy"] - base[r["seed"]]["last5_accuracy"])
            for r in rs
            if r["seed"] in base
        ]
        bpu = statistics.fmean(r["bytes_per_update"] for r in rs)
        data = rs[0]["tensor_data_bytes"]
        out[codec] = {
            "runs": len(rs),
            "mean_final_accuracy": statistics.fmean(acc),
            "stdev_final_accuracy": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "mean_last5_accuracy": statistics.fmean(last),
            "points_vs_float32": statistics.fmean(diffs) if diffs else float("nan"),
            "sem_points_vs_float32": (
                statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            ),
            "points_vs_float32_per_seed": diffs,
            "last5_points_vs_float32": statistics.fmean(last_diffs) if last_diffs else float("nan"),
            "bytes_per_update": bpu,
            "ratio_vs_float32": base_bytes / bpu,
            "tensor_data_bytes": data,
            "framing_bytes": bpu - data,
            "tensor_data_ratio_vs_float32": base_data / data,
            "mean_wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs),
        }
    return out


def print_table(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(
        f"{'codec':8} {'runs':>4} {'final acc %':>14} {'pts vs f32':>10} {'last-5 %':>9} "
        f"{'pts vs f32':>10} {'bytes/update':>13} {'f32/x':>6} {'data B':>8} {'f32/x':>6} "
        f"{'s/run':>6}"
    )
    for codec, s in summary.items():
        acc = f"{100 * s['mean_final_accuracy']:.2f}+-{100 * s['stdev_final_accuracy']:.2f}"
        print(
            f"{codec:8} {s['runs']:>4} {acc:>14} {s['points_vs_float32']:>+10.2f} "
            f"{100 * s['mean_last5_accuracy']:>9.2f} {s['last5_points_vs_float32']:>+10.2f} "
            f"{s['bytes_per_update']:>13,.0f} {s['ratio_vs_float32']:>5.2f}x "
            f"{s['tensor_data_bytes']:>8,} {s['tensor_data_ratio_vs_float32']:>5.2f}x "
            f"{s['mean_wall_seconds']:>6.1f}"
        )
    if "int8" in summary:
        s = summary["int8"]
        ok_data = s["tensor_data_ratio_vs_float32"] >= TARGET_RATIO * 0.99
        ok_payload = s["ratio_vs_float32"] >= TARGET_RATIO * 0.99
        ok_acc = s["points_vs_float32"] >= -TARGET_LOSS_POINTS
        print(
            f"int8 vs float32: tensor data {s['tensor_data_ratio_vs_float32']:.2f}x smaller, "
            f"whole payload {s['ratio_vs_float32']:.2f}x (framing {s['framing_bytes']:,.0f} "
            f"B/update); target {TARGET_RATIO:.0f}x: {'met' if ok_data else 'NOT met'} on "
            f"tensor data, {'met' if ok_payload else 'NOT met'} on the payload"
        )
        print(
            f"int8 accuracy {s['points_vs_float32']:+.2f} +- {s['sem_points_vs_float32']:.2f} "
            f"points vs float32 (mean +- s.e. over paired seeds); target >= "
            f"-{TARGET_LOSS_POINTS}: {'met' if ok_acc else 'NOT met'}"
        )


def compare(
    base: FederationSpec, seeds: list[int], codecs: list[str], label: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    runs = []
    for seed in seeds:
        for codec in codecs:  # interleaved: load drift affects every codec alike
            spec = dataclasses.replace(base, seed=seed, codec=codec)
            r = run_one(spec)
            print(
                f"  {label} seed {seed} {codec:8} final {100 * r['final_accuracy']:6.2f} %  "
                f"last-5 {100 * r['last5_accuracy']:6.2f} %  "
                f"{r['bytes_per_update']:>9,.0f} B/update  {r['wall_seconds']:5.1f} s",
                flush=True,
            )
            runs.append(r)
    summary = summarize(runs)
    print_table(
        f"{label}: {base.model}, {base.agents} agents, {base.partition}, "
        f"{base.epochs} epoch(s), lr {base.lr}, {base.rounds} rounds, "
        f"seeds {seeds}",
        summary,
    )
    return runs, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="digits runs per codec (seeds 0..N-1)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--codecs", default=",".join(codec_names()), help="comma-separated codecs")
    ap.add_argument("--fmnist", action="store_true", help="also fmnist-cnn, one seed (~12 min)")
    ap.add_argument("--broker", default="auto", help="auto | mosquitto | amqtt | HOST:PORT")
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "compression.json"
    )
    args = ap.parse_args()
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    if "float32" not in codecs:
        codecs.insert(0, "float32")
    unknown = [c for c in codecs if c not in codec_names()]
    if unknown:
        ap.error(f"unknown codecs {unknown}; choose from {codec_names()}")
    t0 = time.monotonic()
    digits = FederationSpec(
        agents=8, rounds=args.rounds, dataset="digits", model="digits-mlp",
        partition="dirichlet:0.5", epochs=2, lr=0.2, broker=args.broker,
    )  # fmt: skip
    report: dict[str, Any] = {
        "benchmark": "compression",
        "machine": machine_info(),
        "targets": {"int8_ratio_vs_float32": TARGET_RATIO, "max_points_lost": TARGET_LOSS_POINTS},
    }
    runs, summary = compare(digits, list(range(args.seeds)), codecs, "digits")
    report["digits"] = {"spec": _spec_json(digits), "summary": summary, "runs": runs}
    if args.fmnist:
        # The `fedmq experiment fmnist-cnn` preset (10 agents, dirichlet:0.5, 1 epoch, lr 0.2).
        fmnist = dataclasses.replace(PRESETS["fmnist-cnn"], rounds=args.rounds, broker=args.broker)
        runs, summary = compare(fmnist, [0], codecs, "fmnist")
        report["fmnist"] = {"spec": _spec_json(fmnist), "summary": summary, "runs": runs}
    report["total_seconds"] = time.monotonic() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['total_seconds']:.0f} s)")


def _spec_json(spec: FederationSpec) -> dict[str, Any]:
    skip = ("workdir", "seed", "codec")
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in skip}


if __name__ == "__main__":
    main()
