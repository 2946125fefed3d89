"""The agent's round hook for FedProx (params ``mu``) and FedSGD (``mode = "gradient"``):
what it sends is exactly the trainer's prox delta / mean gradient, and a bundle exported
before those signatures existed refuses such a round with one log line."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edge_agent.core import CoreSettings, EdgeCore
from edge_agent.outbox import Outbox
from edge_agent.state import StateStore
from edge_agent.trainer import LiteRTTrainer
from fedmq.data.local import LocalData
from fedmq.models.spec import ModelBundle
from fedmq.update.codecs import decode_tensor
from fedmq.wire import RoundAnnouncement, TrainingConfig, encode
from tests.unit.test_agent_core import (
    BUNDLE,
    DEVICE,
    EPOCH,
    FLEET,
    TOPICS,
    Device,
    model_msg,
    updates,
)
from tests.unit.test_agent_core import data as data
from tests.unit.test_agent_core import weights as weights


def round_with(round_id: int, params: dict[str, float | str | int]) -> bytes:
    cfg = TrainingConfig(epochs=2, lr=0.05, codec="float32", params=params)
    return encode(RoundAnnouncement(FLEET, round_id, 0, 1e6, cfg, epoch=EPOCH))


@dataclass
class BundleDevice(Device):
    bundle: ModelBundle | Path = BUNDLE

    def restart(self) -> EdgeCore:
        self.core = EdgeCore(
            CoreSettings(FLEET, DEVICE, TOPICS, ack_timeout=self.ack_timeout,
                         max_resends=self.max_resends),
            StateStore(self.state_dir, DEVICE), Outbox(self.state_dir / "outbox"),
            LiteRTTrainer(self.bundle), self.data, self.key,
        )
        return self.core


def sent_tensors(dev: Device, payload: bytes) -> dict[str, np.ndarray]:
    [update] = updates(dev.round(payload))
    return {t.name: decode_tensor(t, update.codec) for t in update.tensors}


def round_rng(r: int) -> np.random.Generator:
    return np.random.default_rng([0, zlib.crc32(DEVICE.encode()), r])


def test_a_fedprox_round_sends_the_prox_delta(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray]
) -> None:
    dev = BundleDevice(tmp_path / "a", data)
    dev.connect()
    dev.model(model_msg(weights, 0))
    sent = sent_tensors(dev, round_with(1, {"mu": 0.5}))
    x, y = data.round_batch(1)
    ref = LiteRTTrainer(BUNDLE)
    ref.set_weights(weights)
    ref.fit_prox(x, y, epochs=2, lr=0.05, rng=round_rng(1), mu=0.5)
    expect = {n: v - weights[n] for n, v in ref.get_weights().items()}
    plain = LiteRTTrainer(BUNDLE)
    plain.set_weights(weights)
    plain.fit(x, y, epochs=2, lr=0.05, rng=round_rng(1))
    for n, d in expect.items():
        np.testing.assert_array_equal(sent[n], d, err_msg=n)
        # the proximal pull is really there: not the plain SGD delta
        assert not np.array_equal(sent[n], plain.get_weights()[n] - weights[n]), n


def test_a_gradient_round_sends_the_mean_gradient(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray]
) -> None:
    dev = BundleDevice(tmp_path / "a", data)
    dev.connect()
    dev.model(model_msg(weights, 0))
    [update] = updates(dev.round(round_with(1, {"mode": "gradient", "grad_examples": 40})))
    sent = {t.name: decode_tensor(t, update.codec) for t in update.tensors}
    assert update.metrics["examples"] == 40.0 and update.metrics["steps"] == 3.0  # 16+16+8
    x, y = data.round_batch(1)
    ref = LiteRTTrainer(BUNDLE)
    ref.set_weights(weights)
    grads, _ = ref.gradient(x, y, max_examples=40, rng=round_rng(1))
    for n, g in grads.items():
        assert np.linalg.norm(g) > 0
        np.testing.assert_array_equal(sent[n], g, err_msg=n)


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits-mlp exported the way bundles were before set_global/train_prox/gradient."""
    pytest.importorskip("tensorflow")
    from fedmq.models import variants
    from fedmq.models.export import export_model

    out = tmp_path_factory.mktemp("old") / "digits-mlp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(variants, "add_variant_signatures", lambda *a, **k: None)
        export_model("digits-mlp", out)
    return out


@pytest.mark.parametrize(
    ("params", "needs"),
    [({"mu": 0.5}, "train_prox"), ({"mode": "gradient", "grad_examples": 8}, "gradient")],
)
def test_an_old_bundle_refuses_the_round_with_one_line(
    tmp_path: Path,
    data: LocalData,
    weights: dict[str, np.ndarray],
    old_bundle: Path,
    params: dict[str, float | str | int],
    needs: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dev = BundleDevice(tmp_path / "a", data, bundle=old_bundle)
    assert LiteRTTrainer(old_bundle).variants == frozenset()
    dev.connect()
    dev.model(model_msg(weights, 0))
    with caplog.at_level(logging.ERROR):
        assert updates(dev.round(round_with(1, params))) == []
    [line] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"has no {needs} signature" in line.getMessage()
    assert "round skipped" in line.getMessage() and line.exc_info is None
    assert dev.counter("train_failures") == 1
    # plain rounds still train on the old bundle (mu = 0 is plain SGD)
    assert len(updates(dev.round(round_with(2, {"mu": 0.0})))) == 1
