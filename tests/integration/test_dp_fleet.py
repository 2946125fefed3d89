"""DP-FedAvg end to end: a simulated fleet against a real aggregator on a real Mosquitto.

120 simulated devices (``fedmq fleet simulate``'s shards, clipping their deltas to the
announced bound before encoding, as the edge agent does) take part in Poisson-sampled DP
rounds (q = 60/120). Ten of them misbehave and send their deltas unclipped. The test checks,
through the aggregator's own records:

- the epsilon of every closed round equals a direct ``dp_accounting`` RDP computation for
  the same (q, z, rounds, delta);
- the clip bound is enforced: every unclipped update a drawn misbehaving device sends is
  **rejected** (``norm_bound``, with the reason on its ack), none is folded; the honest
  devices' clipped int8 updates are all accepted;
- the budget stop: with ``dp_epsilon_budget`` between epsilon(2) and epsilon(3), rounds 1
  and 2 close and round 3 never opens (one ERROR line says so).

Already covered elsewhere (tests/unit/test_privacy.py, without a broker): the accountant vs
direct dp-accounting for PLD and fixed-size sampling, re-clipping within the tolerance, the
noise's sd, the budget's message and report/status output.
"""

from __future__ import annotations

import time
from pathlib import Path

import dp_accounting
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.topics import Topics
from fedmq_ops.simfleet import FleetPlan, FleetSpec, ShardSettings, run_fleet
from tests.fakes import AggregatorProcess, Watcher

pytestmark = pytest.mark.integration

FLEET = "f1"
N, PER_ROUND, Z, CLIP, DELTA = 120, 60, 1.0, 0.1, 1e-5


def _direct_epsilon(rounds: int) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(
        PER_ROUND / N, dp_accounting.GaussianDpEvent(Z)
    )
    acc.compose(event, rounds)
    return float(acc.get_epsilon(DELTA))


def test_dp_rounds_epsilon_clip_bound_and_budget_stop(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    plan = FleetPlan(N, seed=3, name="dp", delta_scale=0.01)  # raw norm ~0.5 >> C = 0.1
    unclipped = frozenset(plan.device_ids()[:10])
    budget = (_direct_epsilon(2) + _direct_epsilon(3)) / 2
    config = tmp_path / "agg.toml"
    config.write_text(
        "[aggregator]\n"
        'eval_dataset = "none"\ncodec = "int8"\nselection = "sample"\n'
        f"clients_per_round = {PER_ROUND}\nmin_updates = 1\nmin_devices = {N}\n"
        "round_timeout = 8.0\n"  # the round waits for the rejected ones until then
        'norm_bound = "off"\ndp = true\n'
        f"dp_population = {N}\ndp_noise_multiplier = {Z}\ndp_clip = {CLIP}\n"
        f"dp_delta = {DELTA}\ndp_epsilon_budget = {budget}\ndp_seed = 7\n"
    )
    state = tmp_path / "state"
    watcher = Watcher(broker, Topics(FLEET, topic_prefix))
    agg = AggregatorProcess(broker, topic_prefix, state, "--config", str(config)).start()
    try:
        settings = ShardSettings(host=broker.host, port=broker.port, fleet=FLEET,
                                 topic_prefix=topic_prefix, rounds=2, timeout=90,
                                 unclipped=unclipped)
        report = run_fleet(FleetSpec(plan, settings, processes=2))
        print("\n".join(report.lines()))
        assert report.completed
        anns = [watcher.round(r, timeout=10) for r in (1, 2)]
        for ann in anns:
            assert ann.config.params["dp_clip"] == CLIP
        drawn = [set(a.selected) for a in anns]
        bad = sum(len(s & unclipped) for s in drawn)
        good = sum(len(s - unclipped) for s in drawn)
        assert bad > 0 and good > 0
        # every misbehaving update rejected, every honest one accepted
        assert report.rejected == {"norm_bound": bad}
        assert report.total("accepted") == good and report.total("sent") == good + bad
        # the budget stop: no round 3 opens after round 2 closes
        deadline = time.time() + 20
        while "privacy budget reached" not in agg.log() and time.time() < deadline:
            time.sleep(0.2)
        lines = [ln for ln in agg.log().splitlines() if "privacy budget reached" in ln]
        assert len(lines) == 1 and "round 3" in lines[0], agg.log()[-3000:]
        time.sleep(1.5)  # a few more ticks: still no round 3
        assert agg.stop() == 0
        with Store(state) as store:
            history = store.history()
            assert [(r.round_id, r.status) for r in history] == [(1, "closed"), (2, "closed")]
            assert store.reject_counts() == {"norm_bound": bad}
            for r in history:
                assert r.participants == len(drawn[r.round_id - 1] - unclipped)
                assert r.metrics["dp_epsilon"] == pytest.approx(
                    _direct_epsilon(r.round_id), rel=1e-12)
                assert r.metrics["dp_clip"] == CLIP
                folded = {d for d, _, _, _ in store.contributions(r.round_id)}
                assert folded == drawn[r.round_id - 1] - unclipped
        assert _direct_epsilon(2) <= budget < _direct_epsilon(3)
    except BaseException:
        print(agg.log()[-8000:])
        raise
    finally:
        agg.stop()
        watcher.close()
