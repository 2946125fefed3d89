"""End to end: real aggregator and agent processes federate on digits through Mosquitto."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fedmq.net.localbroker import LocalBroker
from fedmq_ops.localfleet import FederationSpec, run_federation

pytestmark = pytest.mark.integration


def test_five_agents_learn_digits(broker: LocalBroker, tmp_path: Path) -> None:
    spec = FederationSpec(
        agents=5,
        rounds=10,
        dataset="digits",
        model="digits-mlp",
        partition="dirichlet:0.5",
        codec="int8",
        epochs=2,
        lr=0.2,
        seed=1,
        broker=f"{broker.host}:{broker.port}",
        fleet=f"digits-{uuid.uuid4().hex[:8]}",
        workdir=tmp_path / "fed",
        timeout=300,
    )
    result = run_federation(spec)
    rows = result.rows
    for r in rows:
        print(
            f"round {r.round_id}: {r.participants} devices, accuracy {r.accuracy:.4f}, "
            f"up {r.bytes_in} B"
        )
    assert len(rows) == 10
    assert [r.version for r in rows] == list(range(1, 11))
    # Every round folded an int8 update from each of the 5 agents.
    assert all(r.participants == 5 for r in rows)
    assert all(r.bytes_in > 0 for r in rows)
    # The global model learns: well above chance after round 1 and above 85 % at the end.
    assert rows[-1].accuracy > rows[0].accuracy
    assert rows[-1].accuracy > 0.85, [round(r.accuracy, 3) for r in rows]
    # int8 updates: about a quarter of the float32 model size per device and round.
    model_params = 64 * 64 + 64 + 64 * 10 + 10
    per_update = rows[-1].bytes_in / 5
    assert model_params <= per_update < model_params * 1.2


def test_demo_runs_on_the_embedded_amqtt_broker(tmp_path: Path) -> None:
    """Without Mosquitto the demo falls back to amqtt (MQTT 3.1.1): pip alone is enough."""
    pytest.importorskip("amqtt")
    spec = FederationSpec(agents=3, rounds=3, broker="amqtt", workdir=tmp_path / "fed", timeout=180)
    result = run_federation(spec)
    assert result.broker == "amqtt"
    assert [r.version for r in result.rows] == [1, 2, 3]
    assert all(r.participants == 3 for r in result.rows)
    assert result.rows[-1].accuracy > 0.5
