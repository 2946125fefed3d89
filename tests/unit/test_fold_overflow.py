"""Regression (found by the fuzz tests): finite updates whose weighted sum overflows float32.

A float32 update of values near 3e38 (or int8 with an absurd scale) and a large
``num_examples`` passed every check, was journaled and folded into ``inf``, and the round
published a model of inf/NaN that no device can load (their decoder refuses non-finite
tensors): one message poisoned the federation. It is now rejected (``non_finite``) before
it is journaled, and the round still closes with the exact mean of the good updates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq.errors import Rejected, RejectReason
from fedmq.update.accumulate import WeightedSum
from fedmq.wire import Tensor, decode_model
from tests.fakes import exact_delta, make_update, model_weights, raw_update


def test_weighted_sum_refuses_an_update_that_would_overflow() -> None:
    fold = WeightedSum({"a": (3,)})
    huge = [Tensor.from_array("a", np.full(3, 3e38, np.float32))]
    fold.check(huge, "float32", 1.0)  # shapes and codec are fine ...
    with pytest.raises(Rejected) as err:
        fold.check(huge, "float32", 2.0)  # ... but 2 x 3e38 is not a float32
    assert err.value.code == RejectReason.NON_FINITE
    with pytest.raises(Rejected):
        fold.fold(huge, "float32", 2.0)
    fold.fold(huge, "float32", 1.0)  # fits once ...
    with pytest.raises(Rejected):
        fold.fold(huge, "float32", 1.0)  # ... not twice: the running sum would overflow
    absurd = [Tensor.from_array("a", np.full(3, 127, np.int8), {"scale": 1e29})]
    with pytest.raises(Rejected):
        fold.check(absurd, "int8", 1e7)
    np.testing.assert_array_equal(fold.mean()["a"], np.full(3, 3e38, np.float32))


def test_engine_rejects_overflowing_update_and_round_stays_exact(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        fleet="f", state_dir=tmp_path / "state", eval_dataset="none", codec="float32",
        selection="any", clients_per_round=2, min_updates=2,
    )
    engine = Engine(cfg, Store(cfg.state_dir), resolve_bundle("digits-mlp"))
    try:
        out = engine.start(1000.0)
        w0 = model_weights(decode_model(next(o.payload for o in out if o.topic.endswith("model"))))
        shapes = {k: v.shape for k, v in w0.items()}
        bomb = raw_update("f", 1, 0, "bomb", [
            Tensor.from_array(n, np.full(s, 3e38, np.float32)) for n, s in shapes.items()
        ], num_examples=1000)
        ack = engine.handle_update("bomb", bomb, 1001.0)
        assert (ack.accepted, ack.code) == (False, RejectReason.NON_FINITE)
        deltas = [exact_delta(shapes, 1), exact_delta(shapes, 2)]
        for i, d in enumerate(deltas):
            payload = make_update("f", 1, 0, f"d{i}", d, 2)
            assert engine.handle_update(f"d{i}", payload, 1002.0).accepted
        out = engine.tick(1003.0)
        model = decode_model(next(o.payload for o in out if o.topic.endswith("model")))
        w1 = model_weights(model)
        for name, base in w0.items():
            np.testing.assert_array_equal(w1[name], base + (deltas[0][name] + deltas[1][name]) / 2)
        assert engine.store.reject_counts() == {RejectReason.NON_FINITE: 1}
    finally:
        engine.store.close()
