"""Cost of the ingest norm bound: ``aggregator.bounds.update_norm`` beside decode + fold.

One 1M-parameter update per codec (the shapes of bench_codecs_fold.py); for each, the best of
``--repeats`` runs of ``--updates`` updates: strict decode + fold (what the aggregator did per
update before the bound), the norm alone, and the whole ``Ingest.handle_update`` (decode,
checks, norm and bound, durable SQLite journal, fold; a fresh state directory in a temporary
folder: the journal's fsync depends on its disk). No assertion.

    .venv/bin/python bench/bench_update_norm.py [--updates 50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from aggregator.bounds import update_norm
from aggregator.config import AggregatorConfig
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq import wire
from fedmq.update import codecs
from fedmq.update.accumulate import WeightedSum

SHAPES = {"dense1/w": (784, 1152), "dense1/b": (1152,), "dense2/w": (1152, 84), "dense2/b": (84,)}


def _best(fn: object, n: int, repeats: int) -> float:
    assert callable(fn)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _ingest_s(codec: str, n: int, tensors: tuple[wire.Tensor, ...]) -> float:
    """Seconds per ``handle_update`` of ``n`` updates from distinct devices into one round."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AggregatorConfig(fleet="b", state_dir=Path(tmp), eval_dataset="none", codec=codec,
                               max_update_bytes=8 * 1024 * 1024)
        store = Store(cfg.state_dir)
        metrics = AggregatorMetrics()
        ingest = Ingest(cfg, store, SHAPES, RoundTraffic(metrics), metrics)
        plan = RoundPlan(1, 0, (), n, 1, 0.0, 60.0, 90.0, cfg.training_config())
        store.create_round(1, 0, plan.to_json(), 0.0)
        ingest.begin(RoundState("b", plan, None))
        payloads = [
            wire.encode(wire.UpdateMessage("b", 1, 0, f"d{i}", f"u{i}", 100, codec, tensors))
            for i in range(n)
        ]
        t0 = time.perf_counter()
        for i, p in enumerate(payloads):
            assert ingest.handle_update(f"d{i}", p, 1.0).accepted
        seconds = (time.perf_counter() - t0) / n
        store.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--updates", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"{params:,} parameters; seconds per update (best of {args.repeats})")
    print(f"{'codec':8} {'decode+fold ms':>15} {'norm ms':>8} {'norm/fold':>9} "
          f"{'ingest ms':>10} {'norm/ingest':>11}")
    for codec in codecs.codec_names():
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
        tensors = codecs.encode_delta(delta, codec, rng)
        payload = wire.encode(wire.UpdateMessage("b", 1, 0, "d", "u", 100, codec, tensors))
        acc = WeightedSum(SHAPES)

        def fold(p: bytes = payload, a: WeightedSum = acc) -> None:
            msg = wire.decode_update(p)
            a.fold(msg.tensors, msg.codec, float(msg.num_examples))

        msg = wire.decode_update(payload)
        fold_s = _best(fold, args.updates, args.repeats)
        norm_s = _best(lambda m=msg: update_norm(m.tensors, m.codec), args.updates, args.repeats)
        ingest_s = min(_ingest_s(codec, 20, tensors) for _ in range(args.repeats))
        print(f"{codec:8} {fold_s * 1e3:15.3f} {norm_s * 1e3:8.3f} {norm_s / fold_s:9.1%} "
              f"{ingest_s * 1e3:10.3f} {norm_s / ingest_s:11.1%}")


if __name__ == "__main__":
    main()
