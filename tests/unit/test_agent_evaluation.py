"""The device's federated evaluation in EdgeCore: the real LiteRT trainer on digits-mlp,
real held-out split; the update carries the step count and the exact figures the trainer
measures on the held-out examples (global model before training, trained model after); an
eval_only device sends a report without tensors and never trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edge_agent.core import CoreSettings, EdgeCore, Publish, carry_out
from edge_agent.evaluation import device_evaluation
from edge_agent.outbox import Outbox
from edge_agent.state import StateStore
from edge_agent.trainer import LiteRTTrainer
from fedmq.data.local import LocalData
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.topics import Topics
from fedmq.wire import (
    ModelMessage,
    RoundAnnouncement,
    Tensor,
    TrainingConfig,
    UpdateMessage,
    decode_status,
    decode_update,
    encode,
)

FLEET, DEVICE = "lab", "pi-0"
TOPICS = Topics(FLEET)
BUNDLE = prebuilt_bundle_path("digits-mlp")


def _run(tmp_path: Path, params: dict[str, object] | None = None,
         selected: tuple[str, ...] = (), **eval_settings: object,
         ) -> tuple[EdgeCore, list[UpdateMessage], list[Publish], LocalData]:
    cfg = AgentConfig(device_id=DEVICE, fleet=FLEET, source="digits", partition="iid",
                      num_clients=4, client_index=1, state_dir=tmp_path, **eval_settings)
    data, evaluation = device_evaluation(cfg, LocalData.from_config(cfg.data_config()))
    core = EdgeCore(CoreSettings(FLEET, DEVICE, TOPICS), StateStore(tmp_path, DEVICE),
                    Outbox(tmp_path / "outbox"), LiteRTTrainer(BUNDLE), data, None, evaluation)
    weights = load_bundle(BUNDLE).initial_trainable()
    published: list[Publish] = []
    carry_out(core, core.on_connected(1000.0), published.append, lambda: 1000.0)
    tensors = tuple(Tensor.from_array(n, w) for n, w in weights.items())
    for topic, payload in (
        (TOPICS.model, encode(ModelMessage(FLEET, 0, 0, "digits-mlp", tensors))),
        (TOPICS.round, encode(RoundAnnouncement(
            FLEET, 1, 0, 1e6, TrainingConfig(epochs=2, lr=0.1, codec="float32",
                                             params=params or {}), selected=selected))),
    ):
        carry_out(core, core.on_message(topic, payload, 1000.0), published.append,
                  lambda: 1000.0)
    updates = [decode_update(p.payload) for p in published if p.topic == TOPICS.update(DEVICE)]
    return core, updates, published, data


def test_update_carries_steps_and_the_exact_heldout_figures(tmp_path: Path) -> None:
    core, [update], published, train = _run(tmp_path, eval_fraction=0.2)
    ev = core.evaluation
    assert ev is not None and update.evaluation is not None
    # 2 epochs over the round's examples in batches of the model's batch size
    batch = core.trainer.spec.train_batch
    assert update.steps == 2 * -(-update.num_examples // batch)
    assert update.num_examples == len(train)  # only the training part is trained on
    weights = load_bundle(BUNDLE).initial_trainable()
    probe = LiteRTTrainer(BUNDLE)
    probe.set_weights(weights)
    before = probe.evaluate(ev.heldout.x, ev.heldout.y)
    delta = {t.name: t.array() for t in update.tensors}
    probe.set_weights({n: weights[n] + delta[n] for n in weights})
    after = probe.evaluate(ev.heldout.x, ev.heldout.y)
    report = update.evaluation
    assert report.count == len(ev.heldout) == before.examples
    assert (report.loss, report.accuracy) == pytest.approx((before.loss, before.accuracy))
    assert report.personal_loss == pytest.approx(after.loss, rel=1e-5)
    assert report.personal_accuracy == pytest.approx(after.accuracy)
    assert report.personal_accuracy > report.accuracy  # two epochs of training helped
    status = decode_status(published[-1].payload)
    assert status.metrics["eval_accuracy"] == pytest.approx(report.accuracy)
    assert "eval_only" not in status.capabilities  # a training device: selectable


def test_eval_only_device_reports_without_training(tmp_path: Path) -> None:
    # the round selects another device: the selection names trainers, it still reports
    core, [update], published, data = _run(tmp_path, selected=("other",), eval_only=True)
    assert update.tensors == () and update.steps == 0
    # its retained status says so: the aggregator never selects it to train
    statuses = [decode_status(p.payload) for p in published if p.topic == TOPICS.status(DEVICE)]
    assert statuses and all(s.capabilities["eval_only"] is True for s in statuses)
    assert update.evaluation is not None and update.evaluation.personal_loss is None
    assert update.evaluation.count == update.num_examples == len(data)
    probe = LiteRTTrainer(BUNDLE)
    probe.set_weights(load_bundle(BUNDLE).initial_trainable())
    want = probe.evaluate(data.dataset.x, data.dataset.y)
    assert update.evaluation.accuracy == pytest.approx(want.accuracy)
    initial = load_bundle(BUNDLE).initial_trainable()
    for name, w in core.trainer.get_weights().items():  # never trained: the global weights
        if name in initial:
            np.testing.assert_array_equal(w, initial[name])


def test_eval_only_device_sits_out_dp_rounds(tmp_path: Path) -> None:
    """No evaluation leaves a device in a DP round, and an eval_only device never trains:
    it sends nothing at all (before, it trained when selected)."""
    core, updates, _, _ = _run(tmp_path, params={"dp_clip": 1.0}, eval_only=True)
    assert updates == [] and core.store.snapshot().submitted == {}
