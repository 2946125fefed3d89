"""Pruning through the real coordinator and ingest over a real state directory: the round
announcement carries the mask, masked updates fold, the published model has exact zeros where
the next round's mask prunes, an update under another mask is refused with a reason, and a
restart announces the same mask."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from aggregator.bundles import resolve_bundle
from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.store import Store
from fedmq.models.spec import ModelBundle
from fedmq.prune.mask import PruneMask, decode_mask
from fedmq.update.codecs import get_codec
from fedmq.update.codecs.masked import MaskedCodec
from fedmq.wire import RoundAnnouncement, UpdateMessage, decode_model, decode_round, encode
from tests.fakes import model_weights

T0 = 1_000.0


def _coordinator(cfg: AggregatorConfig, store: Store, bundle: ModelBundle) -> Coordinator:
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    metrics = AggregatorMetrics()
    return Coordinator(cfg, store, bundle, Ingest(cfg, store, template, RoundTraffic(metrics),
                                                  metrics))


def _update(ann: RoundAnnouncement, device: str, mask: PruneMask, delta: dict[str, np.ndarray],
            seed: int) -> bytes:
    codec = get_codec(ann.config.codec)
    assert isinstance(codec, MaskedCodec)
    tensors = codec.with_mask(mask).encode(delta, np.random.default_rng(seed)).tensors
    return encode(UpdateMessage(
        fleet="f", round_id=ann.round_id, base_version=ann.base_version, device=device,
        update_id=uuid.uuid4().hex, num_examples=10, codec=ann.config.codec, tensors=tensors,
        epoch=ann.epoch,
    ))


def test_pruned_rounds_through_the_coordinator_and_a_restart(tmp_path: Path) -> None:
    bundle = resolve_bundle("digits-mlp")
    shapes = {t.name: t.shape for t in bundle.spec.trainable_specs}
    cfg = AggregatorConfig(
        fleet="f", state_dir=tmp_path / "state", eval_dataset="none", codec="int8",
        selection="any", clients_per_round=2, min_updates=2, round_timeout=60.0,
        prune_target=0.8, prune_schedule_rounds=2, prune_every=1,
    )
    store = Store(cfg.state_dir)
    coord = _coordinator(cfg, store, bundle)
    out = coord.start(T0)
    [ann] = [decode_round(o.payload) for o in out if o.topic == "fl/f/round"]
    assert ann.config.codec == "masked-int8"
    mask = decode_mask(ann.prune_mask, shapes)
    assert mask.kept == {}  # version 0 is dense
    sparsity = []
    rng = np.random.default_rng(0)
    for r in (1, 2, 3):
        for i, dev in enumerate(("a", "b")):
            delta = mask.apply({n: rng.normal(0, 0.05, s).astype(np.float32)
                                for n, s in shapes.items()})
            ack = coord.ingest.handle_update(dev, _update(ann, dev, mask, delta, i), T0 + r)
            assert ack.accepted, ack.reason
        out = coord.tick(T0 + r + 0.5)
        [model] = [decode_model(o.payload) for o in out if o.topic == "fl/f/model"]
        [ann] = [decode_round(o.payload) for o in out if o.topic == "fl/f/round"]
        mask = decode_mask(ann.prune_mask, shapes)  # the next round's mask
        weights = model_weights(model)
        for n, kept in mask.kept.items():
            assert not weights[n][~kept].any(), (r, n)  # exactly zero where pruned
            assert weights[n][kept].all(), (r, n)
        sparsity.append(round(mask.sparsity({n: shapes[n] for n in mask.kept}), 3))
    # cubic ramp over 2 aggregations, re-chosen after each: 70 %, then 80 %, then kept
    assert sparsity == [0.7, 0.8, 0.8]
    # an update of round 4 encoded under the previous (empty) mask: refused with a reason
    stale = _update(ann, "a", PruneMask(), {n: np.zeros(s, np.float32)
                                            for n, s in shapes.items()}, 0)
    ack = coord.ingest.handle_update("a", stale, T0 + 10)
    assert not ack.accepted and ack.code == "bad_codec" and "encoded under mask" in ack.reason
    store.close()
    # Restart: the same mask is announced again for the open round.
    store = Store(cfg.state_dir)
    again = _coordinator(cfg, store, bundle)
    out = again.start(T0 + 100)
    [ann2] = [decode_round(o.payload) for o in out if o.topic == "fl/f/round"]
    assert (ann2.round_id, ann2.prune_mask) == (ann.round_id, ann.prune_mask)
    store.close()
