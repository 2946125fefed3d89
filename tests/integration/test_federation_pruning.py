"""End to end with pruning on: real aggregator and agent processes through Mosquitto train
digits-mlp under the server's mask (docs/pruning.md)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq_ops.localfleet import FederationSpec, run_federation

pytestmark = pytest.mark.integration

KERNELS = {"dense1_kernel": (64, 64), "out_kernel": (64, 10)}
BIASES = {"dense1_bias": (64,), "out_bias": (10,)}


def test_pruned_federation_learns_with_a_third_of_the_update_bytes(
    broker: LocalBroker, tmp_path: Path
) -> None:
    spec = FederationSpec(
        agents=5, rounds=8, dataset="digits", model="digits-mlp", partition="dirichlet:0.5",
        codec="int8", epochs=2, lr=0.2, seed=1, broker=f"{broker.host}:{broker.port}",
        fleet=f"prune-{uuid.uuid4().hex[:8]}", workdir=tmp_path / "fed", timeout=300,
        prune=0.8, extra_aggregator={"prune_schedule_rounds": 4, "prune_every": 2},
    )
    rows = run_federation(spec).rows
    for r in rows:
        print(f"round {r.round_id}: accuracy {r.accuracy:.4f}, up {r.bytes_in} B")
    assert [r.version for r in rows] == list(range(1, 9))
    assert all(r.participants == 5 for r in rows)
    # Same run dense (prune 0, measured): 0.929 at round 8; the 80 %-pruned model learns too.
    assert rows[-1].accuracy > 0.85, [round(r.accuracy, 3) for r in rows]
    # Rounds 1-2 train the dense model (mask re-chosen after aggregations 2 and 4): every
    # int8 value travels. From round 5 on 80 % of the kernels are pruned: only the kept
    # values travel, one byte each, and no position bytes.
    kernel_params = sum(math.prod(s) for s in KERNELS.values())
    dense_values = kernel_params + sum(math.prod(s) for s in BIASES.values())
    kept_values = round(0.2 * 4096) + round(0.2 * 640) + 74
    first, last = rows[0].bytes_in / 5, rows[-1].bytes_in / 5
    overhead = first - dense_values  # the message's fields, names, scales, mask ids
    assert 0 < overhead < 800
    assert last == pytest.approx(kept_values + overhead, abs=16)
    assert last < 0.35 * first
    # The published model: pruned weights exactly zero, 80 % of each kernel, biases whole.
    store = Store(tmp_path / "fed" / "aggregator", read_only=True)
    current = store.current_model()
    assert current is not None and current.version == 8
    weights = store.load_weights(8)
    for name, shape in KERNELS.items():
        zeros = int(np.count_nonzero(weights[name] == 0.0))
        assert zeros == round(0.8 * math.prod(shape)), name
    for name in BIASES:
        assert np.count_nonzero(weights[name]) == weights[name].size
