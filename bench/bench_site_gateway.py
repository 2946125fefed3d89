"""Site aggregator cost (docs/scaling.md, "Site gateways"): ``--updates`` signed, encoded
updates of a real model folded by :class:`aggregator.site_gateway.SiteGateway` on its SQLite
site store (WAL, ``synchronous=FULL``: one fsync'd transaction per update that rewrites the
partial), in process, no MQTT; then the seal. Measured: updates/s and CPU ms per update of
the fold path (decode, signature, checks, commit), the seal's time, the signed partial's size
against the bytes of the updates it replaces upstream. The partial is checked against the
one-process FixedPointSum (``exact``).

Writes bench/results/site_gateway.json.

    nice -n 5 flock /tmp/fedmq-heavy.lock .venv/bin/python bench/bench_site_gateway.py \
        [--updates 500] [--models digits-mlp,fmnist-cnn] [--codec int8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregator.bundles import resolve_bundle  # noqa: E402
from aggregator.site_gateway import SiteGateway  # noqa: E402
from aggregator.site_store import SiteStore  # noqa: E402
from fedmq.signing import DeviceKey, Registry, sign_update  # noqa: E402
from fedmq.update.codecs import get_codec  # noqa: E402
from fedmq.update.fixedpoint import FixedPointSum  # noqa: E402
from fedmq.wire import (  # noqa: E402
    RoundAnnouncement,
    TrainingConfig,
    UpdateMessage,
    decode_update,
    encode,
    receive_site_partial,
)


def run(model: str, n: int, codec: str, workdir: Path) -> dict[str, Any]:
    bundle = resolve_bundle(model)
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    rng = np.random.default_rng(1)
    registry = Registry(workdir / f"{model}-devices.json")
    keys = {f"d{i:05d}": DeviceKey.generate() for i in range(n)}
    for d, k in keys.items():
        registry.enroll(d, k.public_hex)
    payloads = {}
    for d, k in keys.items():
        delta = {name: (rng.standard_normal(s) * 0.01).astype(np.float32)
                 for name, s in template.items()}
        msg = UpdateMessage("bench", 1, 0, d, uuid.uuid4().hex[:16], int(rng.integers(1, 300)),
                            codec, tuple(get_codec(codec).encode(delta, rng).tensors),
                            epoch="e1")
        payloads[d] = sign_update(msg, k)
    store = SiteStore(workdir / f"{model}.db", "bench")
    gw = SiteGateway(store, template, "gw-1", DeviceKey.generate(), registry=registry,
                     expect=n)
    gw.on_round(encode(RoundAnnouncement("bench", 1, 0, time.time() + 3600,
                                         TrainingConfig(codec=codec), epoch="e1")), time.time())
    wall, cpu = time.perf_counter(), time.process_time()
    for d, p in payloads.items():
        assert gw.on_update(d, p, 0.0).code == "ok"
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    seal = time.perf_counter()
    out = gw.tick(time.time())
    seal = time.perf_counter() - seal
    assert out is not None
    got = FixedPointSum.from_bytes(receive_site_partial(out.payload).message.partial, template)
    want = FixedPointSum(template)
    for p in payloads.values():
        m = decode_update(p)
        want.fold(m.tensors, m.codec, float(m.num_examples))
    exact = all(np.array_equal(got.digest_sums()[k], v) for k, v in want.digest_sums().items())
    store.close_connection()
    row = {
        "model": model, "codec": codec, "updates": n,
        "updates_per_s": round(n / wall, 1),
        "wall_ms_per_update": round(1000 * wall / n, 3),
        "cpu_ms_per_update": round(1000 * cpu / n, 3),
        "seal_ms": round(1000 * seal, 1),
        "partial_bytes": len(out.payload),
        "update_bytes_total": sum(map(len, payloads.values())),
        "exact": exact,
    }
    print(row, flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--models", default="digits-mlp,fmnist-cnn")
    p.add_argument("--codec", default="int8")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-site-") as tmp:
        rows = [run(m, args.updates, args.codec, Path(tmp)) for m in args.models.split(",")]
    out = ROOT / "bench" / "results" / "site_gateway.json"
    out.write_text(json.dumps({"machine": machine_info(("numpy", "cryptography")),
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
