"""Update size per codec and the aggregator's decode+fold throughput, 1M-parameter model.

Prints a table and writes bench/results/codecs_fold.json. The fold figure is what the
aggregator does per update on one core: strict decode of the msgpack payload (size check,
structure, finite floats) plus the accumulator's one check against the model and the add
into the running weighted sum. All codecs are measured side by side in one run; the memory
figure shows that folding N updates keeps memory flat (O(model)). Sparse codecs are named
``codec@fraction`` (the round's ``topk_fraction``); their MB/s is of their (few) wire bytes,
so compare them by updates/s.

``--against DIR`` compares with another checkout (e.g. ``git worktree add /tmp/old 0026a15``):
worker processes run the same measurement with ``PYTHONPATH`` set to either tree,
alternating old and new (and their order) so both see the same machine conditions; the
table gives the best run of each and the ratio new/old.

    .venv/bin/python bench/bench_codecs_fold.py [--updates 200] [--repeats 3]
    .venv/bin/python bench/bench_codecs_fold.py --against /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

SHAPES = {"dense1/w": (784, 1152), "dense1/b": (1152,), "dense2/w": (1152, 84), "dense2/b": (84,)}
BUILTIN = ("float32", "float16", "int8")
# Codecs of the sparse/low-bit work (not in older trees: not compared with --against).
LOW_BIT = (
    "int4", "topk-f16@0.01", "topk-int8@0.01", "topk-int4@0.01", "stc@0.01", "topk-int8@0.1",
)
SIGNED = "signed-int8"  # a worker name: int8 updates in the signed path
ROOT = Path(__file__).resolve().parents[1]


def make_delta(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}


def bench_codec(codec: str, n_updates: int, repeats: int) -> dict[str, float]:
    """One codec on the fedmq found on sys.path (only API shared by old and new trees)."""
    from fedmq import wire
    from fedmq.update import codecs
    from fedmq.update.accumulate import WeightedSum

    rng = np.random.default_rng(0)
    payloads = []
    codec, _, fraction = codec.partition("@")
    t0 = time.perf_counter()
    for i in range(8):
        d = make_delta(rng)
        if fraction:  # a sparse codec (this tree has configure)
            impl = codecs.get_codec(codec).configure({"topk_fraction": float(fraction)})
            tensors = impl.encode(d, rng).tensors
        else:
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


def bench_signed(codec: str, n_updates: int, repeats: int) -> dict[str, float]:
    """Signed updates: decode, verify the Ed25519 signature, fold (old or new signing API)."""
    from fedmq import signing, wire
    from fedmq.update import codecs
    from fedmq.update.accumulate import WeightedSum

    rng = np.random.default_rng(0)
    key = signing.DeviceKey.generate()
    tensors = codecs.encode_delta(make_delta(rng), codec, rng)
    msg = wire.UpdateMessage("bench", 1, 0, "dev0", "u0", 100, codec, tensors)
    receive = getattr(wire, "receive_update", None)
    if receive is not None:  # the signed envelope over the exact bytes
        payload = signing.sign_update(msg, key)
    else:  # before: the signature inside the update, verified over a re-encoding
        payload = wire.encode(signing.sign_update(msg, key))  # type: ignore[arg-type]
    best = float("inf")
    for _ in range(repeats):
        acc = WeightedSum(SHAPES)
        t0 = time.perf_counter()
        for _ in range(n_updates):
            got = receive(payload) if receive is not None else wire.decode_update(payload)
            signing.verify_update(got, key.public_hex)
            upd = got.message if receive is not None else got
            acc.fold(upd.tensors, upd.codec, float(upd.num_examples))
        best = min(best, time.perf_counter() - t0)
    return {
        "encoded_bytes": len(payload),
        "fold_updates_per_s": n_updates / best,
        "fold_mb_per_s": n_updates * len(payload) / best / 1e6,
    }


def _worker(tree: Path, codec: str, updates: int, repeats: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", codec,
           "--updates", str(updates), "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tree)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def compare(old: Path, rounds: int, updates: int, repeats: int) -> dict[str, Any]:
    """Alternate old and new worker runs per codec; the best and median of each, and ratios."""
    trees = {"old": old.resolve(), "new": ROOT}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {
        t: {c: [] for c in (*BUILTIN, SIGNED)} for t in trees
    }
    for r in range(rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for codec in (*BUILTIN, SIGNED):
            for tree in order:
                runs[tree][codec].append(_worker(trees[tree], codec, updates, repeats))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    table: dict[str, Any] = {}
    for codec in (*BUILTIN, SIGNED):
        row: dict[str, float] = {}
        for tree in trees:
            mbs = [x["fold_mb_per_s"] for x in runs[tree][codec]]
            ups = [x["fold_updates_per_s"] for x in runs[tree][codec]]
            row[f"{tree}_best_mb_per_s"] = max(mbs)
            row[f"{tree}_median_mb_per_s"] = statistics.median(mbs)
            row[f"{tree}_best_updates_per_s"] = max(ups)
            row[f"{tree}_bytes"] = runs[tree][codec][0]["encoded_bytes"]
        row["ratio_best"] = row["new_best_mb_per_s"] / row["old_best_mb_per_s"]
        row["ratio_median"] = row["new_median_mb_per_s"] / row["old_median_mb_per_s"]
        table[codec] = row
    print(f"decode+fold, best of {rounds} alternated runs per tree ({repeats} repeats of "
          f"{updates} updates each)")
    print(f"{'codec':11} {'bytes old/new':>19} {'old MB/s':>9} {'new MB/s':>9} {'new/old':>8} "
          f"{'median new/old':>15} {'old upd/s':>10} {'new upd/s':>10}")
    for codec, row in table.items():
        print(f"{codec:11} {row['old_bytes']:>9,}/{row['new_bytes']:<9,} "
              f"{row['old_best_mb_per_s']:>9.0f} {row['new_best_mb_per_s']:>9.0f} "
              f"{row['ratio_best']:>8.3f} {row['ratio_median']:>15.3f} "
              f"{row['old_best_updates_per_s']:>10.0f} {row['new_best_updates_per_s']:>10.0f}")
    return {"rounds": rounds, "old_tree": str(old), "table": table, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--updates", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--against", type=Path, help="another checkout to compare with")
    ap.add_argument("--rounds", type=int, default=5, help="alternations with --against")
    ap.add_argument("--worker", metavar="CODEC", help=argparse.SUPPRESS)
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "codecs_fold.json"
    )
    args = ap.parse_args()
    if args.worker == SIGNED:
        print(json.dumps(bench_signed("int8", args.updates, args.repeats)))
        return
    if args.worker:
        print(json.dumps(bench_codec(args.worker, args.updates, args.repeats)))
        return
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"model: {params:,} parameters, float32 weights {params * 4 / 1e6:.2f} MB")
    if args.against:
        report = compare(args.against, args.rounds, args.updates, args.repeats)
        out = args.out.with_name("codecs_fold_compare.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(
            {"benchmark": "codecs_fold_compare", "parameters": params, "updates": args.updates,
             "machine": machine_info(("numpy", "msgpack")), **report}, indent=2))
        print(f"wrote {out}")
        return
    results = {c: bench_codec(c, args.updates, args.repeats) for c in (*BUILTIN, *LOW_BIT)}
    f32 = results["float32"]["encoded_bytes"]
    print(
        f"{'codec':14} {'bytes/update':>13} {'vs f32':>7} {'encode ms':>10} "
        f"{'fold MB/s':>10} {'updates/s':>10} {'peak MB (N/4, N)':>17}"
    )
    for c, r in results.items():
        print(
            f"{c:14} {r['encoded_bytes']:>13,} {f32 / r['encoded_bytes']:>6.2f}x "
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
