"""Compressed downlink on the FMNIST task: final accuracy and downlink bytes per device per
round, ``downlink = full`` against delta codecs, same seed and everything else equal.

Each mode is one whole federation (``fedmq experiment fmnist-cnn``'s preset: 10 agents,
Dirichlet 0.5, 1 local epoch, 20 rounds, int8 uplink, real Mosquitto, real LiteRT agents).
"down/dev/round" is what one device downloads per round: the model message (``full``) or
the model index and the round's delta, plus the round announcement (the fleet runner's
``bytes_delivered`` / agents / rounds). Prints a table and writes
bench/results/downlink_fmnist.json.

    .venv/bin/python bench/bench_downlink.py [--modes full int8 int4 topk-int8] [--seeds 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import machine_info  # noqa: E402

from fedmq_ops.experiment import PRESETS  # noqa: E402
from fedmq_ops.localfleet import run_federation  # noqa: E402


def run(mode: str, seed: int, rounds: int) -> dict[str, Any]:
    spec = dataclasses.replace(PRESETS["fmnist-cnn"], downlink=mode, seed=seed, rounds=rounds)
    started = time.monotonic()
    result = run_federation(spec)
    out = result.to_json()
    return {
        "mode": mode,
        "seed": seed,
        "rounds": len(result.rows),
        "final_accuracy": result.final_accuracy,
        "downlink_bytes_per_device_per_round": result.downlink_per_device(),
        "uplink_bytes_per_device_per_round": out["bytes_in"] / max(1, len(result.rows))
        / spec.agents,
        "wall_seconds": time.monotonic() - started,
        "accuracy_per_round": [r.accuracy for r in result.rows],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=["full", "int8", "int4", "topk-int8"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/downlink_fmnist.json")
    args = p.parse_args()
    rows = [run(m, s, args.rounds) for s in args.seeds for m in args.modes]
    full = {r["seed"]: r for r in rows if r["mode"] == "full"}
    print(f"{'downlink':<10} {'seed':>4} {'accuracy':>9} {'vs full':>8} {'down/dev/round':>15} "
          f"{'x smaller':>9}")
    for r in rows:
        ref = full.get(r["seed"])
        gap = (r["final_accuracy"] - ref["final_accuracy"]) * 100 if ref else float("nan")
        ratio = (ref["downlink_bytes_per_device_per_round"]
                 / r["downlink_bytes_per_device_per_round"]) if ref else float("nan")
        print(f"{r['mode']:<10} {r['seed']:>4} {r['final_accuracy'] * 100:>8.2f}% "
              f"{gap:>+7.2f}p {r['downlink_bytes_per_device_per_round'] / 1000:>12.1f} KB "
              f"{ratio:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), "runs": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
