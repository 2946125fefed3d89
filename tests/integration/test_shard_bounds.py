"""A hostile enrolled device cannot steer a sharded fleet more than a single-process one
(issue #8, finding 2): the shard workers apply the single-process ingest bounds.

The same config and the same real encoded updates go to (a) the single-process engine and
(b) a sharded fleet: the coordinator and two workers on a real Redis (their per-update path,
no MQTT). Round 1 is honest (it warms the adaptive bounds up); in round 2 a device sends its
delta scaled 1000x and claims 10,000,000 examples. Every decision (fold weight, clip factor)
is the same in both, and the sharded model equals the single-process one: bit for bit when
the single process folds into the same exact fixed-point sum, within float32 rounding with
its default float32 sum.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine
from aggregator.shard_config import load_shard_config
from aggregator.shard_coordinator import from_config
from aggregator.shard_store import Fold, ShardStore
from aggregator.shard_worker import ShardWorker
from aggregator.store import Store
from fedmq.errors import RejectReason
from fedmq.net.localredis import LocalRedis, RedisOptions, redis_server_path
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.update.strategies import FedAvg
from fedmq.wire import decode_model
from tests.fakes import exact_delta, make_update, model_weights
from tests.integration.shard_fleet import BUNDLE, TEMPLATE

HONEST = {"h0": 100, "h1": 120, "h2": 80, "h3": 150, "h4": 110}
ATTACKER = "x"
TIMEOUT = 600.0
DELTAS = {d: exact_delta(TEMPLATE, i) for i, d in enumerate(HONEST)}
HOSTILE = {n: (v * np.float32(1000)).astype(np.float32) for n, v in DELTAS["h0"].items()}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if redis_server_path() is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with LocalRedis(RedisOptions(appendonly=False), workdir=tmp_path / "redis") as server:
        yield server.url


def _settings(tmp_path: Path, bounds: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none", "codec": "int8",
        "selection": "any", "clients_per_round": 6, "min_updates": 5,
        "round_timeout": TIMEOUT, "max_update_bytes": 256 * 1024, **bounds,
    }


def _payloads(round_id: int, base: int, attack: bool) -> list[tuple[str, bytes]]:
    out = [(d, make_update("f", round_id, base, d, DELTAS[d], n, codec="int8",
                           update_id=f"{d}-r{round_id}"))
           for d, n in HONEST.items()]
    if attack:  # in the middle, so later honest devices see it in the single process's pool
        out.insert(2, (ATTACKER, make_update("f", round_id, base, ATTACKER, HOSTILE,
                                             10_000_000, codec="int8",
                                             update_id=f"x-r{round_id}")))
    return out


def _single_process(settings: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]],
                                                      dict[str, tuple[float, float]],
                                                      dict[str, str]]:
    """Models of versions 0..2, round 2's (weight, clip) per device and its ack codes."""
    cfg = AggregatorConfig(**settings)
    engine = Engine(cfg, Store(cfg.state_dir), BUNDLE)
    t = 1_000.0

    def model(out: list[Any]) -> dict[str, np.ndarray]:
        [payload] = [o.payload for o in out if o.topic.endswith("/model")]
        return model_weights(decode_model(payload))

    models = [model(engine.start(t))]
    codes: dict[str, str] = {}
    decisions: dict[str, tuple[float, float]] = {}
    for r in (1, 2):
        for device, payload in _payloads(r, r - 1, attack=r == 2):
            codes[device] = engine.handle_update(device, payload, t + 1).code
        decisions = {e.device: (float(e.weight or 0.0), e.scale) for e in engine.store.journal(r)}
        t += TIMEOUT + 2
        models.append(model(engine.tick(t)))
    engine.store.close()
    return models, decisions, codes


def _sharded(settings: dict[str, Any], redis_url: str) -> tuple[list[dict[str, np.ndarray]],
                                                                dict[str, Fold], dict[str, str]]:
    config = load_shard_config(overrides={**settings, "shard.redis": redis_url}, environ={})
    store = ShardStore(redis_url, config.fleet)
    coord = from_config(config, store, lambda topic, payload: None)
    now = time.time()
    coord.start(now)
    workers = [ShardWorker(store, TEMPLATE, "w1"), ShardWorker(store, TEMPLATE, "w2")]
    models = [store.model()["weights"]]  # type: ignore[index]
    codes: dict[str, str] = {}
    folds: dict[str, Fold] = {}
    for r in (1, 2):
        rnd = store.open_round()
        assert rnd is not None and rnd.round_id == r
        for i, (device, payload) in enumerate(_payloads(r, r - 1, attack=r == 2)):
            codes[device] = workers[i % 2].handle(device, payload, now).code
        folds = store.claims(rnd.epoch, r)
        now += TIMEOUT + 2
        assert coord.tick(now)
        models.append(store.model()["weights"])  # type: ignore[index]
    store.close_connection()
    return models, folds, codes


def _moved(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((a[n].astype(np.float64) - b[n]) ** 2) for n in a)))


BOUNDS = {
    "fixed-clip": {"norm_bound": "fixed", "max_update_norm": 200.0},
    "adaptive-clip": {},  # the defaults: 3 x median norm, clip, weight cap 2 x median claim
    "adaptive-reject": {"norm_action": "reject"},
}


@pytest.mark.parametrize("name", list(BOUNDS))
def test_a_1000x_update_claiming_1e7_examples_moves_the_sharded_model_no_more(
    name: str, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, BOUNDS[name])
    honest_norms = [np.sqrt(sum(np.sum(np.float64(v) ** 2) for v in d.values()))
                    for d in DELTAS.values()]
    assert max(honest_norms) < 200.0  # the fixed bound clips the attacker only

    sharded, folds, shard_codes = _sharded(settings, redis_url)
    single, decisions, codes = _single_process(settings)
    assert shard_codes == codes
    rejected = BOUNDS[name].get("norm_action") == "reject"
    assert codes[ATTACKER] == (RejectReason.NORM_BOUND if rejected else "ok")

    # the same decisions: fold weight and clip factor of every update of round 2
    assert {d: (f.weight, f.scale) for d, f in folds.items()} == decisions
    if not rejected:
        weight, clip = decisions[ATTACKER]
        assert weight == 2 * 110.0  # capped to 2 x the median claim
        # clipped to the bound: the fixed 200, or 3 x the median of round 1's norms (the
        # same updates as in round 2, the norms of their int8 encoding)
        median = float(np.median([folds[d].norm for d in HONEST]))
        bound = 200.0 if name == "fixed-clip" else 3 * median
        assert folds[ATTACKER].norm * clip <= bound < folds[ATTACKER].norm / 100

    # the model moves by as much in both (the sharded sum is exact, the single-process
    # one float32): nowhere near the unbounded attack
    moved_single = _moved(single[2], single[1])
    moved_sharded = _moved(sharded[2], sharded[1])
    assert moved_sharded <= moved_single * (1 + 1e-6)
    for n in TEMPLATE:
        np.testing.assert_allclose(sharded[2][n], single[2][n], rtol=0, atol=2e-6)
    assert moved_single < 200.0

    # bit for bit: the single process folding into the same exact fixed-point sum
    monkeypatch.setattr(FedAvg, "new_accumulator", lambda self, shapes: FixedPointSum(shapes))
    exact, _, _ = _single_process(_settings(tmp_path / "exact", BOUNDS[name]))
    for version in (1, 2):
        for n in TEMPLATE:
            assert exact[version][n].tobytes() == sharded[version][n].tobytes(), (version, n)
