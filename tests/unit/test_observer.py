"""FleetObserver's view of the retained topics (messages applied directly, no broker)."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq import wire
from fedmq.errors import FedmqError
from fedmq.net.mqtt import MqttSettings
from fedmq.topics import Topics
from fedmq_ops.observer import FleetObserver

T = Topics("f1")


def _model(version: int) -> bytes:
    t = wire.Tensor.from_array("w", np.zeros(3, np.float32))
    return wire.encode(wire.ModelMessage("f1", version, version, "m@1", (t,), {"accuracy": 0.5}))


def _observer() -> tuple[FleetObserver, list[tuple[int, int]], list[str]]:
    models: list[tuple[int, int]] = []
    statuses: list[str] = []
    obs = FleetObserver(
        MqttSettings(host="127.0.0.1", port=1, client_id="t"), T,
        on_model=lambda m, n: models.append((m.version, n)),
        on_status=lambda s: statuses.append(s.device),
    )
    return obs, models, statuses


def test_only_newer_model_versions_count() -> None:
    obs, models, _ = _observer()
    for v in (0, 2, 1, 2, 3):
        obs.apply(T.model, _model(v))
    assert [v for v, _ in models] == [0, 2, 3]
    assert models[0][1] == len(_model(0))
    assert obs.view.version == 3 and obs.view.model is not None


def test_round_status_and_bad_messages(caplog: pytest.LogCaptureFixture) -> None:
    obs, _, statuses = _observer()
    rnd = wire.encode(wire.RoundAnnouncement("f1", 4, 3, 100.0, wire.TrainingConfig()))
    obs.apply(T.round, rnd)
    obs.apply(T.status("pi-1"), wire.encode(wire.StatusMessage("f1", "pi-1", "idle")))
    obs.apply(T.status("pi-2"), b"")  # a cleared retained status
    obs.apply(T.status("junk"), b"\xc1garbage")
    view = obs.view
    assert view.round is not None and view.round.round_id == 4
    assert view.round_bytes == len(rnd)
    assert list(view.devices) == statuses == ["pi-1"]
    assert view.bad_messages == 1
    with pytest.raises(FedmqError) as why:
        wire.decode_status(b"\xc1garbage")
    assert [r.getMessage() for r in caplog.records if "undecodable" in r.getMessage()] == [
        f"ignoring an undecodable message on {T.status('junk')}: {why.value}"
    ]
    obs.apply(T.round, b"")  # the aggregator cleared the retained round: no round, no warning
    assert view.round is None and view.bad_messages == 1
    assert len([r for r in caplog.records if "undecodable" in r.getMessage()]) == 1


def test_wait_for_version_returns_or_names_what_is_missing() -> None:
    obs, _, _ = _observer()
    obs.apply(T.model, _model(2))
    obs.wait_for_version(2, timeout=0)
    with pytest.raises(FedmqError, match=r"waiting for model version 3 \(have 2\)"):
        obs.wait_for_version(3, timeout=0)
