"""End to end: the operator's topk_fraction reaches real agents through the round announcement."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.net.localbroker import LocalBroker
from fedmq.update.codecs import encoded_nbytes, get_codec
from fedmq.update.codecs.topk import topk_count
from fedmq_ops.localfleet import FederationSpec, run_federation

pytestmark = pytest.mark.integration


def test_agents_send_the_announced_topk_fraction(broker: LocalBroker, tmp_path: Path) -> None:
    spec = FederationSpec(
        agents=3, rounds=2, codec="topk-int8", topk_fraction=0.25, epochs=1, seed=2,
        broker=f"{broker.host}:{broker.port}", fleet=f"topk-{uuid.uuid4().hex[:8]}",
        workdir=tmp_path / "fed", timeout=300,
    )  # fmt: skip
    rows = run_federation(spec).rows
    assert [r.participants for r in rows] == [3, 3]
    # At 25 % every tensor of digits-mlp sends k = ceil(n / 4) int8 values and a bitmap
    # (ceil(n / 8) bytes, smaller than >= 1 byte of gaps per position): tensor bytes are
    # fixed by k alone. The default fraction (1 %) would send ~1/10 of that.
    bundle = load_bundle(prebuilt_bundle_path("digits-mlp"))
    sizes = {n: int(bundle.initial_weights[n].size) for n in bundle.spec.trainable}
    expected = sum(topk_count(n, 0.25) + -(-n // 8) for n in sizes.values())
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(size=bundle.initial_weights[n].shape).astype(np.float32)
             for n in sizes}
    codec = get_codec("topk-int8").configure({"topk_fraction": 0.25})
    assert encoded_nbytes(codec.encode(delta, rng).tensors) == expected
    for r in rows:
        per_update = r.bytes_in / r.participants
        framing = per_update - expected
        assert 0 < framing < 1500, (per_update, expected)
        print(f"round {r.round_id}: {per_update:.0f} B per update, {expected} B of tensors")
