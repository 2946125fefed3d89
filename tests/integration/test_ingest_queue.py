"""A flood of updates must stay in the broker, not in the aggregator (issue 12: aggregator RSS
O(model), not O(devices)).

400 simulated fmnist-cnn devices send float32 updates (~430 KB each, ~170 MB together) at
once through a real Mosquitto to a real aggregator process with ``ingest_queue_bytes`` =
2 MiB (and no weight cap, so the mean is exact). The aggregator's peak RSS (VmHWM) while
ingesting may grow by at most 32 MiB over its level with the round open (the unbounded
queue this replaced grew by 57 MiB with 300 devices, 67 with 400; the bounded one by 7-8), and
every update is still folded exactly once (by update id in its store) into the exact mean.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq_ops.simfleet import FleetPlan, FleetSpec, ShardSettings, run_fleet
from tests.fakes import AggregatorProcess, Watcher, model_weights

pytestmark = pytest.mark.integration

FLEET = "f1"
GROWTH_LIMIT_MIB = 32.0


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for {pid}")


def test_flood_stays_in_the_broker_and_is_folded_once(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    n = 400
    plan = FleetPlan(n, seed=3, name="fld")
    state = tmp_path / "state"
    config = tmp_path / "agg.toml"
    config.write_text(
        "[aggregator]\ningest_queue_bytes = 2097152\nweight_cap_multiplier = 0.0\n")
    watcher = Watcher(broker, Topics(FLEET, topic_prefix))
    agg = AggregatorProcess(
        broker, topic_prefix, state, "--config", str(config), "--model", "fmnist-cnn",
        "--eval-dataset", "none", "--codec", "float32", "--selection", "any",
        "--clients-per-round", str(n), "--min-updates", str(n), "--rounds", "1",
        "--round-timeout", "300",
    ).start()
    try:
        watcher.round(1, timeout=60)
        assert agg.proc is not None
        pid = agg.proc.pid
        time.sleep(1.0)
        base = _status_mib(pid, "VmHWM")
        peak = [base]
        sampling = threading.Event()

        def sample() -> None:  # VmHWM is gone once the process exits: keep the last one
            while not sampling.wait(0.05):
                try:
                    peak[0] = _status_mib(pid, "VmHWM")
                except (OSError, AssertionError):
                    return

        sampler = threading.Thread(target=sample, name="vmhwm")
        sampler.start()
        try:
            settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                     topic_prefix=topic_prefix, rounds=1, timeout=180)
            report = run_fleet(FleetSpec(plan, settings, processes=1))
        finally:
            sampling.set()
            sampler.join()
        print("\n".join(report.lines()))
        print(f"aggregator VmHWM: {base:.0f} MiB with the round open, {peak[0]:.0f} MiB after "
              f"{n} float32 fmnist-cnn updates")
        assert report.completed
        assert report.total("sent") == n and report.total("accepted") == n
        assert report.rejected == {} and report.total("acks_unknown") == 0
        assert agg.wait(60) == 0
        assert peak[0] - base < GROWTH_LIMIT_MIB, (base, peak[0])

        v0, v1 = watcher.model(0, timeout=10), watcher.model(1, timeout=10)
        with Store(state) as store:
            contributions = store.contributions(1)
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
        assert history == [(1, "closed", n)]
        ids = Counter(uid for _, uid, _, _ in contributions)
        assert max(ids.values()) == 1  # none folded twice
        assert set(ids) == {plan.update_id(d, v0.epoch, 1) for d in plan.device_ids()}
        shapes = {t.name: tuple(t.shape) for t in v0.tensors}
        mean = plan.expected_mean(plan.device_ids(), 1, shapes, "float32")
        w0, w1 = model_weights(v0), model_weights(v1)
        for name, base_w in w0.items():
            np.testing.assert_allclose(w1[name], base_w.astype(np.float64) + mean[name],
                                       rtol=0, atol=1e-6, err_msg=name)
    except BaseException:
        print(agg.log()[-8000:])
        raise
    finally:
        agg.stop()
        watcher.close()
