"""Device encode time and aggregator decode+fold throughput per codec on real fmnist-cnn deltas.

The deltas are real local updates: ``devices`` of the FMNIST task's devices (Fashion-MNIST
train split, Dirichlet(alpha) over ``num_clients`` devices, the bench's seed) each train one
local epoch (LiteRT, one thread) at ``lr`` from a global model of a real federation (a
mid-run version kept by bench_compression.py; the initial weights when none is given) and
send local minus global.

- Device encode ms: what the agent does between training and its outbox write, timed in one
  process on this machine: ``edge_agent.core.encode_with_state`` (unpack the stored
  residual, the codec's encode with the round's params, pack the new residual) plus
  ``wire.encode`` of the UpdateMessage. Stateful codecs are timed from a residual left by a
  previous encode of the same device (the steady state: the residual add and top-k
  selection over delta + residual). Median over ``repeats`` x devices.
- Aggregator decode+fold: ``wire.decode_update`` (strict msgpack decode) then
  ``WeightedSum.fold`` (the accumulator's check against the model and the add into the
  running sum), ``updates`` updates cycling over the devices' payloads, best of
  ``repeats``; MB/s counts the payload bytes (so sparse codecs are best compared by
  updates/s), as bench_codecs_fold.py does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.core import encode_with_state
from edge_agent.trainer import LiteRTTrainer
from fedmq import wire
from fedmq.data.datasets import load_fashion_mnist
from fedmq.data.partition import dirichlet
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.update.accumulate import WeightedSum

__all__ = ["real_deltas", "time_codec"]

Delta = dict[str, np.ndarray]


def real_deltas(
    model: str, start: Path | None, *, devices: int, num_clients: int, alpha: float,
    seed: int, lr: float, epochs: int = 1,
) -> tuple[list[Delta], dict[str, Any]]:
    """``devices`` real local updates of ``model`` from the weights in ``start`` (an .npz of
    the federation's global model; None = the bundle's initial weights) and how they were made."""
    bundle = load_bundle(prebuilt_bundle_path(model))
    names = bundle.spec.trainable
    weights = dict(bundle.initial_weights)
    if start is not None:
        with np.load(start) as z:
            weights.update({n: z[n] for n in names})
    train, _ = load_fashion_mnist()
    parts = dirichlet(train.y, num_clients, alpha, seed)
    trainer = LiteRTTrainer(bundle, num_threads=1)
    deltas, seconds = [], []
    for d in range(devices):
        idx = parts[d]
        trainer.set_weights(weights)
        t0 = time.perf_counter()
        trainer.fit(train.x[idx], train.y[idx], epochs=epochs, lr=lr,
                    rng=np.random.default_rng([seed, d]))
        seconds.append(time.perf_counter() - t0)
        local = trainer.get_weights()
        deltas.append({n: (local[n] - weights[n]).astype(np.float32) for n in names})
    info = {
        "model": model,
        "start": str(start) if start is not None else "initial weights",
        "devices": devices,
        "examples": [len(parts[d]) for d in range(devices)],
        "epochs": epochs,
        "lr": lr,
        "train_seconds": seconds,
        "parameters": sum(int(v.size) for v in deltas[0].values()),
    }
    return deltas, info


def time_codec(
    deltas: list[Delta], codec: str, params: Mapping[str, object], *, updates: int = 200,
    repeats: int = 3,
) -> dict[str, float]:
    """Encode ms per update on the device side and decode+fold throughput (see module doc)."""
    shapes = {n: v.shape for n, v in deltas[0].items()}
    payloads: list[bytes] = []
    encode_ms: list[float] = []
    for d, delta in enumerate(deltas):
        rng = np.random.default_rng(d)
        # Round 1 leaves a residual (stateful codecs); rounds 2.. are timed from it.
        _, state = encode_with_state(delta, codec, rng, b"", params, 1)
        for r in range(repeats):
            t0 = time.perf_counter()
            tensors, _ = encode_with_state(delta, codec, rng, state, params, 2)
            msg = wire.UpdateMessage("bench", 2, 1, f"agent-{d:03d}", f"u{d}-{r}", 6000,
                                     codec, tensors)
            payload = wire.encode(msg)
            encode_ms.append((time.perf_counter() - t0) * 1e3)
        payloads.append(payload)
    best = float("inf")
    for _ in range(repeats):
        acc = WeightedSum(shapes)
        t0 = time.perf_counter()
        for i in range(updates):
            upd = wire.decode_update(payloads[i % len(payloads)])
            acc.fold(upd.tensors, upd.codec, float(upd.num_examples))
        best = min(best, time.perf_counter() - t0)
        assert acc.count == updates
    mean_bytes = statistics.fmean(len(p) for p in payloads)
    total = sum(len(payloads[i % len(payloads)]) for i in range(updates))
    return {
        "encode_ms": statistics.median(encode_ms),
        "encode_ms_max": max(encode_ms),
        "payload_bytes": mean_bytes,
        "fold_updates_per_s": updates / best,
        "fold_mb_per_s": total / best / 1e6,
        "fold_ms_per_update": best / updates * 1e3,
    }
