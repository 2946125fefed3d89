"""Shared set-up for unit tests that drive the aggregator's network-free engine: a config
with test defaults, the published model's weights, a delta scaled by a factor."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.engine import Outgoing
from fedmq.wire import decode_model
from tests.fakes import model_weights


def engine_config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    """An aggregator config for a test fleet ``f`` with no evaluation set, float32 updates
    and state under ``tmp_path``; ``kw`` overrides or adds any key."""
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none",
        "codec": "float32", "max_update_bytes": 256 * 1024,
    }
    base.update(kw)
    return AggregatorConfig(**base)


def published_weights(out: list[Outgoing]) -> dict[str, np.ndarray]:
    """The weights of the one model among the engine's outgoing messages."""
    [payload] = [o.payload for o in out if o.topic.endswith("/model")]
    return model_weights(decode_model(payload))


def scaled_delta(d: Mapping[str, np.ndarray], k: float) -> dict[str, np.ndarray]:
    return {n: (v * np.float32(k)).astype(np.float32) for n, v in d.items()}
