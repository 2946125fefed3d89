"""Federated evaluation end to end: real aggregator and agent processes through Mosquitto,
digits-mlp, FedNova, no server test set (eval_dataset = "none"), three training agents that
hold out 20 % of their examples and one eval-only agent. The round records carry the
devices' federated accuracy; it rises, and it equals what the devices' held-out examples
give for the round's base model, recomputed here with the real trainer."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from aggregator.store import Store
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.evaluation import device_evaluation
from edge_agent.trainer import LiteRTTrainer
from fedmq.data.local import LocalData
from fedmq.evaluation import EvalReport, combine
from fedmq.models.spec import prebuilt_bundle_path
from fedmq.net.localbroker import LocalBroker
from fedmq_ops.localfleet import FederationSpec, run_federation

pytestmark = pytest.mark.integration

AGENTS, ROUNDS = 4, 5


def _expected(agent: AgentConfig, trainer: LiteRTTrainer,
              weights: dict[str, object]) -> EvalReport:
    """What this agent reports on ``weights``: its own held-out split, the real trainer."""
    _, ev = device_evaluation(agent, LocalData.from_config(agent.data_config()))
    assert ev is not None
    trainer.set_weights(weights)  # type: ignore[arg-type]
    got = trainer.evaluate(ev.heldout.x, ev.heldout.y)
    return EvalReport(got.loss, got.accuracy, got.examples)


def test_round_records_carry_the_devices_federated_accuracy(
    broker: LocalBroker, tmp_path: Path
) -> None:
    workdir = tmp_path / "fed"
    spec = FederationSpec(
        agents=AGENTS, rounds=ROUNDS, dataset="digits", model="digits-mlp", partition="iid",
        codec="float32", epochs=1, lr=0.1, seed=3, strategy="fednova", eval_dataset="none",
        eval_fraction=0.2, eval_only_agents=1, broker=f"{broker.host}:{broker.port}",
        fleet=f"feval-{uuid.uuid4().hex[:8]}", workdir=workdir, timeout=300,
    )
    result = run_federation(spec)
    assert [r.version for r in result.rows] == list(range(1, ROUNDS + 1))
    assert all(r.participants == AGENTS - 1 for r in result.rows)  # eval-only never folds
    agents = [load_agent_config(p, environ={}) for p in sorted(workdir.glob("agent-*.toml"))]
    assert [a.eval_only for a in agents] == [False] * (AGENTS - 1) + [True]
    trainer = LiteRTTrainer(prebuilt_bundle_path("digits-mlp"))
    with Store(workdir / "aggregator", read_only=True) as store:
        closed = [r for r in store.history() if r.status == "closed"]
        assert len(closed) == ROUNDS
        curve = []
        for record in closed:
            m = record.metrics
            assert "accuracy" not in m  # no server test set: only the devices' figures
            assert m["fed_eval_version"] == record.base_version
            devices = int(m["fed_eval_devices"])
            # every training update carries its report; the eval-only agent's counts when
            # it arrived before the round closed
            assert devices in (AGENTS - 1, AGENTS)
            weights = store.load_weights(record.base_version)
            want = combine(_expected(a, trainer, weights) for a in agents[:devices])
            assert m["fed_accuracy"] == pytest.approx(want["fed_accuracy"], abs=1e-6)
            assert m["fed_loss"] == pytest.approx(want["fed_loss"], rel=1e-4)
            assert m["fed_eval_examples"] == want["fed_eval_examples"]
            assert m["fed_accuracy_min"] <= m["fed_accuracy"] <= m["fed_accuracy_max"]
            assert 0 < m["fed_personal_accuracy"] <= 1  # the trainers' fine-tuned models
            curve.append(m["fed_accuracy"])
    print("federated accuracy by round:", [round(a, 4) for a in curve])
    assert curve[-1] > curve[0] + 0.2, curve  # a learning curve with no server test set
    assert [round(r.fed_accuracy, 6) for r in result.rows] == [round(a, 6) for a in curve]


def test_eval_only_agent_under_sampled_selection(broker: LocalBroker, tmp_path: Path) -> None:
    """selection = "sample" with 4 training agents and 1 eval-only agent, 2 per round: the
    eval-only agent's status says so, it is never selected, every round closes with its 2
    selected trainers long before the deadline, and its report is recorded unselected."""
    workdir = tmp_path / "sampled"
    timeout = 120.0
    spec = FederationSpec(
        agents=5, rounds=4, dataset="digits", model="digits-mlp", partition="iid",
        codec="float32", epochs=1, lr=0.1, seed=3, eval_dataset="none", eval_fraction=0.2,
        eval_only_agents=1, clients_per_round=2, round_timeout=timeout,
        extra_aggregator={"selection": "sample"}, broker=f"{broker.host}:{broker.port}",
        fleet=f"fsample-{uuid.uuid4().hex[:8]}", workdir=workdir, timeout=300,
    )
    result = run_federation(spec)
    assert [r.version for r in result.rows] == [1, 2, 3, 4]
    agents = [load_agent_config(p, environ={}) for p in sorted(workdir.glob("agent-*.toml"))]
    [watcher] = [a.device_id for a in agents if a.eval_only]
    with Store(workdir / "aggregator", read_only=True) as store:
        history = store.history()
    assert [r.status for r in history] == ["closed"] * 4  # none waited out and abandoned
    devices = []
    for record in history:
        selected = record.plan["selected"]
        assert len(selected) == 2 and watcher not in selected
        assert record.participants == 2
        assert record.metrics["round_seconds"] < timeout / 2  # closed on its 2 updates
        devices.append(int(record.metrics["fed_eval_devices"]))
    print("federated evaluation devices by round:", devices)
    assert set(devices) <= {2, 3} and 3 in devices  # the unselected watcher was recorded
