"""Update size per codec and the aggregator's decode+fold throughput, 1M-parameter model.

Prints a table and writes bench/results/codecs_fold.json. The fold figure is what the
aggregator does per update on one core: strict decode of the msgpack payload (size check,
dtype/shape/finite validation) plus folding into the running weighted sum. All codecs are
measured side by side in one run; the memory figure shows that folding N updates keeps
memory flat (O(model)).

    .venv/bin/python bench/bench_codecs_fold.py [--updates 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np
from machine import machine_info

from fedmq import wire
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum

SHAPES = {"dense1/w": (784, 1152), "dense1/b": (1152,), "dense2/w": (1152, 84), "dense2/b": (84,)}


def make_delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}


def bench_codec(codec: str, n_updates: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    payloads = []
    t0 = time.perf_counter()
    for i in range(8):
        d = make_delta(rng)
        tensors = codecs.encode_delta(d, codec, rng)
        msg = wire.UpdateMessage("bench", 1, 0, f"dev{i}", f"u{i}", 100, codec, tensors)
        payloads.append(wire.encode(msg))
    encode_s = (time.perf_counter() - t0) / 8
    size = len(payloads[0])
    best = float("inf")
    for _ in range(repeats):
        acc = WeightedSum(SHAPES)
        t0 = time.perf_counter()
        for i in range(n_updates):
            upd = wire.decode_update(payloads[i % len(payloads)])
            acc.fold(upd.tensors, upd.codec, float(upd.num_examples))
        best = min(best, time.perf_counter() - t0)
        assert acc.count == n_updates
    # Memory: folding 4x more updates must not need more memory.
    tracemalloc.start()
    acc = WeightedSum(SHAPES)
    peaks = []
    for n in (n_updates // 4, n_updates):
        tracemalloc.reset_peak()
        for i in range(n):
            upd = wire.decode_update(payloads[i % len(payloads)])
            acc.fold(upd.tensors, upd.codec, 1.0)
        peaks.append(tracemalloc.get_traced_memory()[1] / 1e6)
    tracemalloc.stop()
    return {
        "encoded_bytes": size,
        "encode_ms": encode_s * 1e3,
        "fold_updates_per_s": n_updates / best,
        "fold_mb_per_s": n_updates * size / best / 1e6,
        "fold_ms_per_update": best / n_updates * 1e3,
        "peak_mb_folding_quarter": peaks[0],
        "peak_mb_folding_all": peaks[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "codecs_fold.json"
    )
    args = ap.parse_args()
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"model: {params:,} parameters, float32 weights {params * 4 / 1e6:.2f} MB")
    results = {c: bench_codec(c, args.updates, args.repeats) for c in codecs.codec_names()}
    f32 = results["float32"]["encoded_bytes"]
    print(
        f"{'codec':8} {'bytes/update':>13} {'vs f32':>7} {'encode ms':>10} "
        f"{'fold MB/s':>10} {'updates/s':>10} {'peak MB (N/4, N)':>17}"
    )
    for c, r in results.items():
        print(
            f"{c:8} {r['encoded_bytes']:>13,} {f32 / r['encoded_bytes']:>6.2f}x "
            f"{r['encode_ms']:>10.1f} {r['fold_mb_per_s']:>10.0f} {r['fold_updates_per_s']:>10.0f} "
            f"{r['peak_mb_folding_quarter']:>8.1f} {r['peak_mb_folding_all']:>8.1f}"
        )
    target = 400.0
    got = results["int8"]["fold_mb_per_s"]
    print(
        f"int8 fold throughput {got:.0f} MB/s per core; target >= {target:.0f} MB/s: "
        f"{'met' if got >= target else 'NOT met'}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "codecs_fold",
                "parameters": params,
                "updates": args.updates,
                "machine": machine_info(("numpy", "msgpack")),
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "results": results,
                "int8_target_mb_per_s": target,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
