"""The aggregator's state directory on a real, size-limited filesystem (a tmpfs mounted by
the test) that fills up mid-round: not journaled means not acknowledged, a close on the full
disk leaves the round open, and after space is freed every update is folded exactly once and
the rounds close (real Mosquitto, real aggregator process, no traceback in its log)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from tests.fakes import (
    AckLog,
    AggregatorProcess,
    FakeDevice,
    Watcher,
    exact_delta,
    make_update,
    model_weights,
)
from tests.smallfs import fill, small_tmpfs

pytestmark = pytest.mark.integration


def _wait_log(agg: AggregatorProcess, text: str, timeout: float = 60.0) -> str:
    """Wait until the aggregator logged ``text``; the matching line."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in agg.log().splitlines():
            if text in line:
                return line
        if agg.proc is not None and agg.proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"the aggregator did not log {text!r}:\n{agg.log()[-5000:]}")


def _mean(base: dict[str, np.ndarray], parts: list[tuple[int, dict[str, np.ndarray]]]
          ) -> dict[str, np.ndarray]:
    total = np.float32(sum(n for n, _ in parts))
    return {k: base[k] + sum(n * d[k] for n, d in parts) / total for k in base}


def test_full_disk_mid_round_loses_nothing(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exact weighted means of the claimed counts: no relative weight cap in this test.
    monkeypatch.setenv("FEDMQ_AGGREGATOR_WEIGHT_CAP_MULTIPLIER", "0")
    topics = Topics("f1", topic_prefix)
    with small_tmpfs(tmp_path / "state", "2m") as state:
        acks = AckLog(broker, topics)
        watcher = Watcher(broker, topics)
        agg = AggregatorProcess(
            broker, topic_prefix, state,
            "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
            "--clients-per-round", "3", "--min-updates", "2", "--rounds", "2",
            "--round-timeout", "10", "--abandon-after", "600",
        ).start()
        devices = [FakeDevice(broker, topics, f"dev{i}") for i in range(3)]

        def send(i: int, round_id: int, base: int, delta: dict[str, np.ndarray], n: int) -> None:
            devices[i].publish(make_update(
                "f1", round_id, base, f"dev{i}", delta, n, update_id=f"r{round_id}-dev{i}"
            ))

        def acks_of(update_id: str) -> list[tuple[bool, str]]:
            return [(a.accepted, a.code) for a in list(acks.acks) if a.update_id == update_id]

        try:
            assert watcher.round(1).base_version == 0
            w0 = model_weights(watcher.model(0))
            shapes = {k: v.shape for k, v in w0.items()}
            d = [exact_delta(shapes, 300 + i) for i in range(5)]

            # Round 1: quorum (2 of target 3) is in, the close waits for the deadline; the
            # disk fills up before it: the close fails, the round stays open.
            send(0, 1, 0, d[0], 1)
            send(1, 1, 0, d[1], 3)
            assert acks.wait_count(2, 30) == 2 and acks_of("r1-dev0") == [(True, "ok")]
            assert acks_of("r1-dev1") == [(True, "ok")]
            filler = fill(state)
            line = _wait_log(agg, "round 1 not closed")
            assert "ERROR" in line and f"state directory {state} is full" in line
            assert 1 not in watcher.models
            filler.unlink()
            w1 = model_weights(watcher.model(1))
            for k, v in _mean(w0, [(1, d[0]), (3, d[1])]).items():
                np.testing.assert_array_equal(w1[k], v)

            # Round 2: an update arrives on the full disk: not journaled, not acknowledged.
            assert watcher.round(2).base_version == 1
            filler = fill(state)
            send(2, 2, 1, d[2], 2)
            line = _wait_log(agg, "update r2-dev2 of dev2 not acknowledged, will be redelivered")
            assert "ERROR" in line and f"state directory {state} is full" in line
            assert acks_of("r2-dev2") == []
            filler.unlink()
            assert acks.wait_count(3, 30) == 3 and acks_of("r2-dev2") == [(True, "ok")]
            send(0, 2, 1, d[3], 6)
            w2 = model_weights(watcher.model(2))
            for k, v in _mean(w1, [(2, d[2]), (6, d[3])]).items():
                np.testing.assert_array_equal(w2[k], v)
            assert agg.wait(60) == 0
            log = agg.log()
            assert "Traceback" not in log and "acknowledged, dropped" not in log
            assert sorted((a.update_id, a.code) for a in acks.acks) == [
                ("r1-dev0", "ok"), ("r1-dev1", "ok"), ("r2-dev0", "ok"), ("r2-dev2", "ok")
            ]
            with Store(state) as store:
                assert [(r.round_id, r.status, r.participants) for r in store.history()] == [
                    (1, "closed", 2), (2, "closed", 2)
                ]
                assert [c[1] for c in store.contributions(2)] == ["r2-dev0", "r2-dev2"]
        except BaseException:
            print(agg.log()[-20000:])
            raise
        finally:
            agg.stop()
            for dev in devices:
                dev.close()
            acks.close()
            watcher.close()


def test_unjournaled_update_is_redelivered_by_the_broker_after_a_crash(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    """Killed while an update waits on the full disk: it was never PUBACKed, so the broker
    redelivers it to the restarted aggregator, which folds it exactly once."""
    topics = Topics("f1", topic_prefix)
    with small_tmpfs(tmp_path / "state", "2m") as state:
        acks = AckLog(broker, topics)
        watcher = Watcher(broker, topics)
        agg = AggregatorProcess(
            broker, topic_prefix, state,
            "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
            "--clients-per-round", "1", "--min-updates", "1", "--rounds", "1",
        ).start()
        dev = FakeDevice(broker, topics, "dev0")
        try:
            assert watcher.round(1).base_version == 0
            w0 = model_weights(watcher.model(0))
            delta = exact_delta({k: v.shape for k, v in w0.items()}, 7)
            filler = fill(state)
            dev.publish(make_update("f1", 1, 0, "dev0", delta, 2, update_id="u1"))
            _wait_log(agg, "update u1 of dev0 not acknowledged, will be redelivered")
            agg.kill()
            assert list(acks.acks) == []
            filler.unlink()
            agg.start()
            w1 = model_weights(watcher.model(1))
            for k, v in _mean(w0, [(2, delta)]).items():
                np.testing.assert_array_equal(w1[k], v)
            assert agg.wait(60) == 0
            assert [(a.update_id, a.code) for a in acks.acks] == [("u1", "ok")]
            with Store(state) as store:
                assert store.contributions(1) == [("dev0", "u1", 2, store.round(1).bytes_in)]
            assert "Traceback" not in agg.log()
        except BaseException:
            print(agg.log()[-20000:])
            raise
        finally:
            agg.stop()
            dev.close()
            acks.close()
            watcher.close()
