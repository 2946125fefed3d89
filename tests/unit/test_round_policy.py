"""Round policies: the synchronous rule, the registry, and a second policy plugged in.

The last test is the worked example of docs/architecture.md "Add a round policy": a toy
policy that closes a round every K accepted updates and never on time, registered by name
and driving the real coordinator and ingest over a real state directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.bundles import resolve_bundle
from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import RoundTraffic
from aggregator.policies import (
    RoundContext,
    SyncRounds,
    make_round_policy,
    register_round_policy,
    round_policy_names,
    unregister_round_policy,
)
from aggregator.round_state import RoundPlan, RoundState
from aggregator.store import Store
from fedmq.errors import ConfigError
from fedmq.models.spec import ModelBundle
from fedmq.wire import StatusMessage, TrainingConfig, decode_model, decode_round, encode
from tests.fakes import exact_delta, make_update, model_weights

T0 = 1_000.0


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none",
        "codec": "float32", "selection": "any", "clients_per_round": 3, "min_updates": 2,
        "round_timeout": 60.0, "abandon_after": 40.0, "max_update_bytes": 64 * 1024,
    }
    base.update(kw)
    return AggregatorConfig(**base)


def _ctx(online: tuple[str, ...] = (), round_id: int = 5) -> RoundContext:
    return RoundContext(round_id=round_id, base_version=4, online=frozenset(online), now=100.0,
                        training=TrainingConfig())


def _state(selected: tuple[str, ...] = (), target: int = 3, min_updates: int = 2) -> RoundState:
    plan = RoundPlan(
        round_id=5, base_version=4, selected=selected, target=target, min_updates=min_updates,
        opened_at=100.0, deadline=160.0, abandon_at=200.0, config=TrainingConfig(),
    )
    return RoundState("f", plan)


# -- the synchronous policy ------------------------------------------------------------------
def test_sync_readiness(tmp_path: Path) -> None:
    sync = SyncRounds(_config(tmp_path))
    s = _state(selected=("a", "b", "c"), target=3, min_updates=2)
    assert not sync.is_ready(s, 100) and not sync.is_ready(s, 1e9)  # no quorum, even late
    s.record("1", "a", 1)
    s.record("2", "b", 1)
    assert not sync.is_ready(s, 159.9)  # quorum, but c is still out before the deadline
    assert sync.is_ready(s, 160.0)
    assert not sync.is_abandoned(s, 1e9)
    s.record("3", "c", 1)
    assert sync.is_ready(s, 100)


def test_sync_target_and_abandon(tmp_path: Path) -> None:
    sync = SyncRounds(_config(tmp_path))
    s = _state(target=3, min_updates=2)
    s.record("1", "a", 1)
    assert not sync.is_abandoned(s, 199.9) and sync.is_abandoned(s, 200.0)
    s.record("2", "b", 1)
    assert not sync.is_ready(s, 150) and sync.is_ready(s, 160)
    s.record("3", "c", 1)
    assert sync.is_ready(s, 101)


def test_sync_plans(tmp_path: Path) -> None:
    anyone = SyncRounds(_config(tmp_path, min_devices=2))
    assert anyone.plan(_ctx(("a",))) is None  # waits for two devices online
    plan = anyone.plan(_ctx(("a", "b")))
    assert plan is not None
    assert (plan.round_id, plan.base_version, plan.selected, plan.target, plan.min_updates) == (
        5, 4, (), 3, 2
    )
    assert (plan.opened_at, plan.deadline, plan.abandon_at) == (100.0, 160.0, 200.0)
    sample = SyncRounds(_config(tmp_path, selection="sample", clients_per_round=2))
    planned = sample.plan(_ctx(("a", "b", "c", "d")))
    assert planned is not None and len(planned.selected) == 2 and planned.target == 2
    assert set(planned.selected) <= {"a", "b", "c", "d"}
    lonely = sample.plan(_ctx(("a",)))  # one online, quorum 2: any device may contribute
    assert lonely is not None and lonely.selected == () and lonely.target == 2


# -- the registry ----------------------------------------------------------------------------
def test_unknown_round_policy_is_a_config_error_naming_the_valid_ones(tmp_path: Path) -> None:
    assert {"sync", "fedbuff"} <= set(round_policy_names())
    assert isinstance(make_round_policy(_config(tmp_path)), SyncRounds)  # the default
    with pytest.raises(ConfigError, match=r"round_policy must be one of \(.*'sync'.*nonesuch"):
        _config(tmp_path, round_policy="nonesuch")
    with pytest.raises(ValueError, match="already registered"):
        register_round_policy("sync", SyncRounds)
    with pytest.raises(ValueError, match="must be a word"):
        register_round_policy("a b", SyncRounds)
    with pytest.raises(ValueError, match="cannot be removed"):
        unregister_round_policy("sync")


# -- worked example: a second policy, as written in docs/architecture.md ----------------------
DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def _doc_example() -> dict[str, Any]:
    """Run docs/architecture.md's "Add a round policy" block; its namespace."""
    text = DOC.read_text()
    start = text.index("### Add a round policy")
    [block] = re.findall(r"```python\n(.*?)```", text[start:text.find("\n## ", start)], re.S)
    namespace: dict[str, Any] = {"__name__": "architecture_round_policy_example"}
    exec(compile(block, f"{DOC}:Add a round policy", "exec"), namespace)
    return namespace


@pytest.fixture
def every_k() -> Iterator[type]:
    """The doc's EveryK, registered by the doc's own code as "every-k"."""
    example = _doc_example()
    yield example["EveryK"]
    unregister_round_policy("every-k")
    assert "every-k" not in round_policy_names()


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


def _services(cfg: AggregatorConfig, store: Store, bundle: ModelBundle) -> Coordinator:
    template = {t.name: t.shape for t in bundle.spec.trainable_specs}
    metrics = AggregatorMetrics()
    ingest = Ingest(cfg, store, template, RoundTraffic(metrics), metrics)
    return Coordinator(cfg, store, bundle, ingest)  # the policy comes from cfg.round_policy


def test_a_registered_policy_drives_coordinator_and_ingest(
    tmp_path: Path, bundle: ModelBundle, every_k: type
) -> None:
    cfg = _config(tmp_path, round_policy="every-k", clients_per_round=2, min_updates=1)
    store = Store(cfg.state_dir)
    coord = _services(cfg, store, bundle)
    assert isinstance(coord.policy, every_k)
    out = coord.start(T0)
    w0 = model_weights(decode_model(out[0].payload))
    [ann] = [decode_round(o.payload) for o in out if o.topic == "fl/f/round"]
    assert (ann.round_id, ann.min_updates) == (1, 2)
    shapes = {t.name: t.shape for t in bundle.spec.trainable_specs}
    deltas = [exact_delta(shapes, s) for s in range(2)]
    send = coord.ingest.handle_update
    assert send("a", make_update("f", 1, 0, "a", deltas[0], 1), T0 + 1).accepted
    # Past the deadline with one update: a sync round with quorum 1 would close here.
    assert coord.tick(T0 + 10_000) == []
    assert send("b", make_update("f", 1, 0, "b", deltas[1], 3), T0 + 10_001).accepted
    out = coord.tick(T0 + 10_002)
    [model] = [decode_model(o.payload) for o in out if o.topic == "fl/f/model"]
    assert (model.version, model.round_id, model.metrics["participants"]) == (1, 1, 2.0)
    for name in shapes:
        mean = (deltas[0][name] + 3 * deltas[1][name]) / np.float32(4)
        np.testing.assert_array_equal(model_weights(model)[name], w0[name] + mean)
    assert [decode_round(o.payload).round_id for o in out if o.topic == "fl/f/round"] == [2]
    assert coord.ingest.round is coord.round and coord.round is not None
    assert coord.round.round_id == 2
    store.close()
    # Restart over the same state directory: round 2 is restored under the same policy.
    store = Store(cfg.state_dir)
    again = _services(cfg, store, bundle)
    out = again.start(T0 + 20_000)
    assert again.version == 1 and again.round is not None and again.round.round_id == 2
    assert [h.participants for h in store.history() if h.status == "closed"] == [2]
    store.close()


def test_sync_selects_only_devices_supporting_the_rounds_codec(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    cfg = _config(tmp_path, codec="int4", selection="sample", clients_per_round=3, min_updates=1)
    store = Store(cfg.state_dir)
    try:
        coord = _services(cfg, store, bundle)
        coord.start(T0, tick=False)
        for device, caps in (("a", {"codecs": ["float32", "int4"]}), ("b", {}),
                             ("c", {"codecs": ["float32"]})):
            status = StatusMessage(fleet="f", device=device, state="online", capabilities=caps)
            coord.on_status(device, encode(status), T0)
        [ann] = [decode_round(o.payload) for o in coord.tick(T0 + 1)]
        assert (ann.round_id, ann.selected, ann.config.codec) == (1, ("a",), "int4")
    finally:
        store.close()
