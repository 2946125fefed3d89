"""Secure aggregation's cost against plain signed int8 updates, simulated in one process.

For each model (fmnist-cnn: its real tensor shapes, 105,866 parameters; a 1M-parameter
model) and each round size n, one whole SecAgg round runs in-process with real keys and
every message encoded, signed, decoded and verified (``fedmq.secagg.simulate``), once with
no dropout and once with 10% of the devices dropping after sharing their keys. Per device:
bytes sent and received for the secure round vs the plain signed int8 update's payload,
and CPU ms (quantise + all four phases vs int8 encode + sign). Aggregator: ms for all
phases of the round, of which unmasking (reconstruct the secrets, regenerate the masks), vs
decode + verify + fold of n plain int8 updates.

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_secagg.py \
        [--sizes 10,50,100] [--models fmnist-cnn,1M]

Prints a table and writes bench/results/secagg.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

from fedmq import wire
from fedmq.models.spec import prebuilt_bundle_path
from fedmq.secagg import graph, ring
from fedmq.secagg.simulate import simulate_round
from fedmq.signing import DeviceKey, sign_update, verify_update
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum

ROOT = Path(__file__).resolve().parents[1]
CLIP = 0.05


def model_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name == "1M":
        return {"dense1/w": (784, 1152), "dense1/b": (1152,), "dense2/w": (1152, 84),
                "dense2/b": (84,)}  # 1,001,244 parameters
    with np.load(prebuilt_bundle_path(name) / "initial.npz") as npz:
        return {k: tuple(npz[k].shape) for k in npz.files}


def plain_int8(shapes: dict[str, tuple[int, ...]], n: int) -> dict[str, float]:
    """A device's signed int8 update (bytes, encode+sign ms) and the aggregator's decode +
    verify + fold of n of them (ms)."""
    rng = np.random.default_rng(0)
    key = DeviceKey.generate()
    codec = codecs.get_codec("int8")
    enc_s: list[float] = []
    payloads = []
    for i in range(min(n, 10)):
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
        t0 = time.perf_counter()
        tensors = codec.encode(delta, rng).tensors
        msg = wire.UpdateMessage("bench", 1, 0, "dev", f"u{i}", 10, "int8", tensors)
        payloads.append(sign_update(msg, key))
        enc_s.append(time.perf_counter() - t0)
    fold = WeightedSum(shapes)
    t0 = time.perf_counter()
    for i in range(n):
        received = wire.receive_update(payloads[i % len(payloads)], wire.Limits(64 << 20))
        verify_update(received, key.public_hex)
        fold.fold(received.message.tensors, "int8", 10.0)
    return {"bytes": float(len(payloads[0])), "device_ms": 1000 * statistics.median(enc_s),
            "server_ms": 1000 * (time.perf_counter() - t0)}


def secure_round(shapes: dict[str, tuple[int, ...]], n: int, dropout: float) -> dict[str, Any]:
    length = sum(int(np.prod(s)) for s in shapes.values())
    rng = np.random.default_rng(n)
    updates: dict[str, np.ndarray] = {}
    quant_s: list[float] = []
    for i in range(n):
        delta = rng.normal(0, 0.01, length).astype(np.float32)
        t0 = time.perf_counter()
        updates[f"d{i:04d}"] = ring.quantize(delta, CLIP, rng)
        quant_s.append(time.perf_counter() - t0)
    dropped = sorted(updates)[: round(dropout * n)]
    t0 = time.perf_counter()
    sim = simulate_round(updates, clip=CLIP, drop_after_shares=dropped)
    wall = time.perf_counter() - t0
    assert sim.result is not None, sim.server.reason
    survivors = sim.result.survivors
    expected = np.sum([updates[d].astype(np.int64) for d in survivors], axis=0)
    assert np.array_equal(sim.result.sum, expected), "unmasked sum differs"
    full = list(survivors)
    server_ms = 1000 * sum(sim.server_seconds.values())
    unmask_ms = 1000 * (sim.server_seconds["unmask"] + sim.server_seconds["result"])
    k = graph.default_degree(n)
    return {
        "n": n, "length": length, "bits": ring.ring_bits(n), "degree": k,
        "threshold": graph.threshold(k), "dropped": len(dropped),
        "sent_bytes": statistics.median(sim.sent_bytes[d] for d in full),
        "received_bytes": statistics.median(sim.received_bytes[d] for d in full),
        "device_ms": 1000 * statistics.median(
            sim.client_seconds[d] + quant_s[i] for i, d in enumerate(sorted(updates))
            if d in full),
        "server_ms": server_ms, "unmask_ms": unmask_ms, "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,50,100")
    ap.add_argument("--models", default="fmnist-cnn,1M")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "secagg.json"))
    args = ap.parse_args()
    rows = []
    head = (f"{'model':>10} {'n':>4} {'b':>3} {'k':>3} {'drop':>4} {'int8 B':>9} {'sent B':>9} "
            f"{'extra':>7} {'recv B':>8} {'int8 ms':>7} {'dev ms':>7} {'agg int8 ms':>11} "
            f"{'agg ms':>8} {'unmask ms':>9}")
    print(head)
    for model in args.models.split(","):
        shapes = model_shapes(model)
        for n in (int(x) for x in args.sizes.split(",")):
            plain = plain_int8(shapes, n)
            for dropout in (0.0, 0.1):
                r = secure_round(shapes, n, dropout)
                r.update(model=model, dropout=dropout, plain_bytes=plain["bytes"],
                         plain_device_ms=plain["device_ms"], plain_server_ms=plain["server_ms"],
                         extra_bytes=r["sent_bytes"] - plain["bytes"])
                rows.append(r)
                print(f"{model:>10} {n:>4} {r['bits']:>3} {r['degree']:>3} {r['dropped']:>4} "
                      f"{plain['bytes']:>9.0f} {r['sent_bytes']:>9.0f} "
                      f"{r['extra_bytes'] / plain['bytes']:>+6.0%} {r['received_bytes']:>8.0f} "
                      f"{plain['device_ms']:>7.1f} {r['device_ms']:>7.1f} "
                      f"{plain['server_ms']:>11.1f} {r['server_ms']:>8.1f} "
                      f"{r['unmask_ms']:>9.1f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(("numpy", "cryptography")), "clip": CLIP,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
