"""The worker's per-update path and the coordinator's close/finish against a real Redis (no
MQTT): every refusal leaves the committed partial and the claims unchanged, resends are
duplicates, a second process of the same worker name fences the first, a round closed by a
coordinator that died is finished once by the next, a batch of updates is one commit."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.shard_coordinator import ShardCoordinator
from aggregator.shard_metrics import MeteredShardStore, ShardCoordinatorMetrics, ShardWorkerMetrics
from aggregator.shard_store import CommitResult, RoundRules, ShardStore
from aggregator.shard_worker import Fenced, ShardWorker
from fedmq.net.localredis import LocalRedis, RedisOptions, redis_server_path
from fedmq.topics import Topics
from fedmq.update.codecs import get_codec
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.update.strategies import FedAvg
from fedmq.wire import TrainingConfig, UpdateMessage, decode_model, decode_update, encode
from tests.integration.shard_fleet import BUNDLE, TEMPLATE

RULES = RoundRules(TrainingConfig(codec="int8"))  # no bounds: the checks of the round alone


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ShardStore]:
    if redis_server_path() is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with LocalRedis(RedisOptions(appendonly=False), workdir=tmp_path / "redis") as server:
        s = ShardStore(server.url, "lab")
        s.init("e1", BUNDLE.initial_trainable(), 1, time.time() + 60, 100, RULES)
        yield s
        s.close_connection()


def _update(device: str, *, round_id: int = 1, base: int = 0, fleet: str = "lab",
            seed: int = 0, codec: str = "int8") -> bytes:
    rng = np.random.default_rng(seed)
    delta = {n: (rng.standard_normal(s) * 0.01).astype(np.float32) for n, s in TEMPLATE.items()}
    tensors = tuple(get_codec(codec).encode(delta, rng).tensors)
    return encode(UpdateMessage(fleet, round_id, base, device, uuid.uuid4().hex[:12], 7, codec,
                                tensors, epoch="e1"))


def _partial(store: ShardStore, worker: str = "w1") -> bytes | None:
    return store.partial("e1", 1, worker)


def test_refusals_change_nothing_and_resends_are_duplicates(store: ShardStore) -> None:
    w = ShardWorker(store, TEMPLATE, "w1")
    first = _update("d1")
    ack = w.handle("d1", first, 0.0)
    assert (ack.accepted, ack.code) == (True, "ok")
    committed = _partial(store)
    assert committed is not None
    cases = {
        "malformed": ("d2", b"\x93garbage"),
        "wrong_fleet": ("d2", _update("d2", fleet="other")),
        "device_mismatch": ("d3", _update("d2")),
        "wrong_round": ("d2", _update("d2", round_id=2)),
        "wrong_base_version": ("d2", _update("d2", base=1)),
        "bad_codec": ("d2", _update("d2", codec="float16")),
    }
    for code, (device, payload) in cases.items():
        ack = w.handle(device, payload, 0.0)
        assert (ack.accepted, ack.code) == (False, code)
    ack = w.handle("d1", first, 0.0)  # the same update again (a lost ack): not counted twice
    assert (ack.accepted, ack.code) == (True, "duplicate")
    other = ShardWorker(store, TEMPLATE, "w2")
    ack = other.handle("d1", first, 0.0)  # ... also when the other worker gets it
    assert (ack.accepted, ack.code) == (True, "duplicate")
    ack = other.handle("d1", _update("d1", seed=1), 0.0)  # a second update of d1
    assert (ack.accepted, ack.code) == (False, "duplicate")
    assert _partial(store) == committed and _partial(store, "w2") is None
    assert {d: (f.worker, f.update_id, f.claimed, f.weight, f.scale)
            for d, f in store.claims("e1", 1).items()} == {
        "d1": ("w1", decode_update(first).update_id, 7, 7.0, 1.0)}
    # after the round closed: round_closed, the partial exactly as committed
    assert store.close("e1", 1) is not None
    ack = w.handle("d4", _update("d4"), 0.0)
    assert (ack.accepted, ack.code) == (False, "round_closed")
    assert _partial(store) == committed
    assert w.acc.to_bytes() == committed


def test_a_second_process_with_the_same_name_fences_the_first(store: ShardStore) -> None:
    old = ShardWorker(store, TEMPLATE, "w1")
    assert old.handle("d1", _update("d1"), 0.0).code == "ok"
    new = ShardWorker(store, TEMPLATE, "w1")  # a restart while the old one still runs
    with pytest.raises(Fenced):
        old.handle("d2", _update("d2"), 0.0)
    assert new.handle("d2", _update("d2"), 0.0).code == "ok"  # continues the partial
    blob = _partial(store)
    assert blob is not None
    assert FixedPointSum.from_bytes(blob, TEMPLATE).count == 2
    assert set(store.claims("e1", 1)) == {"d1", "d2"}


def test_a_coordinator_killed_between_close_and_finish_finishes_once(
    store: ShardStore,
) -> None:
    w1, w2 = ShardWorker(store, TEMPLATE, "w1"), ShardWorker(store, TEMPLATE, "w2")
    payloads = [_update(f"d{i}", seed=i) for i in range(6)]
    for i, p in enumerate(payloads):
        assert (w1 if i % 2 else w2).handle(f"d{i}", p, 0.0).code == "ok"
    assert store.close("e1", 1) is not None  # the first coordinator died right after this
    assert w1.handle("d9", _update("d9"), 0.0).code == "round_closed"
    published: list[tuple[str, bytes]] = []
    coord = ShardCoordinator(store, BUNDLE, Topics("lab"), lambda t, p: published.append((t, p)),
                             target=100, training=RULES.config)
    assert coord.tick(time.time())  # a closed round is merged and finished at once
    assert not coord.tick(time.time())  # round 2 is open and empty: nothing to do
    model = store.model()
    assert model is not None and model["version"] == 1 and model["contributors"] == 6
    ref = FixedPointSum(TEMPLATE)
    for p in payloads:
        m = decode_update(p)
        ref.fold(m.tensors, m.codec, float(m.num_examples))
    want = FedAvg(1.0).aggregate(BUNDLE.initial_trainable(), ref.result())
    assert all(model["weights"][n].tobytes() == want[n].tobytes() for n in want)
    # finishing round 1 again (a second coordinator) changes nothing
    assert not store.finish("e1", 1, 2, want, {}, 6, time.time() + 60, 100, RULES, "{}")
    assert store.model_version() == 1
    rnd = store.open_round()
    assert rnd is not None and (rnd.round_id, rnd.base_version, rnd.state) == (2, 1, "open")
    assert {t for t, _ in published} == {"fl/lab/model", "fl/lab/round"}
    # a late update of round 1 is stale now: wrong_round, as the single process answers
    ack = w1.handle("d8", _update("d8"), 0.0)
    assert (ack.accepted, ack.code) == (False, "wrong_round")


def test_a_batch_is_one_commit_and_each_update_gets_its_own_answer(
    store: ShardStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []
    commit = store.commit

    def counted(*args: Any) -> CommitResult:
        calls.append(tuple(args[3]))
        return commit(*args)

    other = ShardWorker(store, TEMPLATE, "w2")
    p0 = _update("d0", seed=100)
    assert other.handle("d0", p0, 0.0).code == "ok"
    monkeypatch.setattr(store, "commit", counted)
    w = ShardWorker(store, TEMPLATE, "w1")
    fresh = {f"f{i}": _update(f"f{i}", seed=i) for i in range(5)}
    acks = w.handle_batch(list(fresh.items()), 0.0)
    assert [a.code for a in acks] == ["ok"] * 5 and [a.device for a in acks] == list(fresh)
    assert calls == [tuple(fresh)]  # five updates, one commit
    calls.clear()
    p1, p2 = _update("d1", seed=1), _update("d2", seed=2)
    batch = [("d1", p1), ("d9", b"\x93garbage"), ("d0", p0), ("d2", p2),
             ("d0", _update("d0", seed=101)), ("d1", p1)]
    acks = w.handle_batch(batch, 0.0)
    assert [(a.device, a.accepted, a.code) for a in acks] == [
        ("d1", True, "ok"), ("d9", False, "malformed"),
        ("d0", True, "duplicate"),  # w2's update again: already folded
        ("d2", True, "ok"),
        ("d0", False, "duplicate"),  # another update of d0: refused
        ("d1", True, "duplicate"),  # the same update twice in one batch: folded once
    ]
    # d0 repeats: the first group is committed (d0 taken out, the rest again), then the rest
    assert calls == [("d1", "d0", "d2"), ("d1", "d2"), ("d0", "d1")]
    ref = FixedPointSum(TEMPLATE)
    for p in [*fresh.values(), p1, p2]:
        m = decode_update(p)
        ref.fold(m.tensors, m.codec, float(m.num_examples))
    blob = _partial(store)
    assert blob is not None
    stored = FixedPointSum.from_bytes(blob, TEMPLATE)  # exact: what was taken out left no trace
    for acc in (stored, w.acc):
        assert (acc.count, acc.total_weight) == (ref.count, ref.total_weight) == (7, 49.0)
        assert all(np.array_equal(acc.digest_sums()[n], ref.digest_sums()[n]) for n in TEMPLATE)
    assert {d: f.worker for d, f in store.claims("e1", 1).items()} == {
        "d0": "w2", "d1": "w1", "d2": "w1", **{d: "w1" for d in fresh}}


def test_the_worker_s_metrics_count_acks_by_answer_and_commits_by_batch(
    store: ShardStore,
) -> None:
    metrics = ShardWorkerMetrics()
    w = ShardWorker(MeteredShardStore(store.url, "lab", metrics), TEMPLATE, "w1")
    first = _update("d1")
    acks = w.handle_batch([("d1", first), ("d2", _update("d2", seed=1)),
                           ("d3", _update("d3", seed=2)), ("d4", b"junk")], 0.0)
    metrics.count_acks(acks)
    acks = w.handle_batch([("d1", first), ("d5", _update("d5", round_id=7))], 0.0)
    metrics.count_acks(acks)
    assert [a.code for a in acks] == ["duplicate", "wrong_round"]
    assert metrics.value("fedmq_updates_accepted_total") == 3
    assert metrics.value("fedmq_updates_duplicate_total") == 1
    assert metrics.value("fedmq_updates_rejected_total", {"reason": "malformed"}) == 1
    assert metrics.value("fedmq_updates_rejected_total", {"reason": "wrong_round"}) == 1
    # two commits: the three new updates together, then the resend (refused by its claim)
    assert metrics.value("fedmq_shard_commit_batch_size_count") == 2
    assert metrics.value("fedmq_shard_commit_batch_size_sum") == 4
    assert metrics.value("fedmq_shard_commit_seconds_count") == 2
    assert metrics.value("fedmq_update_norm_count") == 3  # the committed folds only


def test_the_coordinator_evaluates_each_model_once_and_counts_its_rounds(
    store: ShardStore,
) -> None:
    evaluated: list[float] = []

    def evaluator(weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        first = float(np.sum(weights[next(iter(TEMPLATE))]))
        evaluated.append(first)
        return {"accuracy": first, "loss": 2 * first}

    published: list[tuple[str, bytes]] = []
    metrics = ShardCoordinatorMetrics()
    coord = ShardCoordinator(store, BUNDLE, Topics("lab"), lambda t, p: published.append((t, p)),
                             target=3, training=RULES.config, evaluator=evaluator,
                             metrics=metrics)
    coord.start(time.time())
    w = ShardWorker(store, TEMPLATE, "w1")
    for i in range(3):
        assert w.handle(f"d{i}", _update(f"d{i}", seed=i), 0.0).accepted
    later = time.time() + 61  # the fixture's round waits for 100 devices: its deadline
    assert coord.tick(later)
    assert not coord.tick(later)
    coord.publish_current(later)  # a republish does not evaluate again
    model = store.model()
    assert model is not None and model["version"] == 1
    v1 = float(np.sum(model["weights"][next(iter(TEMPLATE))]))
    assert evaluated == [float(np.sum(BUNDLE.initial_trainable()[next(iter(TEMPLATE))])), v1]
    models = [decode_model(p) for t, p in published if t == Topics("lab").model]
    assert [m.version for m in models] == [0, 1, 1]
    assert models[-1].metrics == {"accuracy": v1, "loss": 2 * v1, "participants": 3.0}
    assert metrics.value("fedmq_global_accuracy") == v1
    assert metrics.value("fedmq_global_loss") == 2 * v1
    assert metrics.value("fedmq_rounds_completed_total") == 1
    assert metrics.value("fedmq_round_participants_count") == 1
    assert metrics.value("fedmq_round_participants_sum") == 3
    assert metrics.value("fedmq_round_seconds_count") == 1
    assert (metrics.value("fedmq_model_version"), metrics.value("fedmq_current_round")) == (1, 2)
    assert metrics.value("fedmq_shard_workers_seen", {"kind": "worker"}) == 1
    assert metrics.value("fedmq_shard_workers_seen", {"kind": "gateway"}) == 0
    # a restarted coordinator evaluates the store's model and republishes it with its figures
    again = ShardCoordinator(store, BUNDLE, Topics("lab"), lambda t, p: published.append((t, p)),
                             target=3, training=RULES.config, evaluator=evaluator)
    again.start(time.time())
    assert evaluated[-1] == v1 and decode_model(published[-2][1]).metrics["accuracy"] == v1
    assert again.metrics.value("fedmq_rounds_completed_total") == 0  # it closed none
