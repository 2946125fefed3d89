"""EdgeCore without a broker: real encoded wire messages in, a fake clock, the real LiteRT
trainer on the prebuilt digits-mlp bundle, real state and outbox files."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.config import AgentConfig
from edge_agent.core import CoreSettings, EdgeCore, Publish, TrainJob, carry_out
from edge_agent.outbox import Outbox
from edge_agent.state import StateStore
from edge_agent.trainer import LiteRTTrainer
from fedmq.data.local import LocalData
from fedmq.errors import RejectReason
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.signing import DeviceKey, verify_update
from fedmq.topics import Topics
from fedmq.wire import (
    AckMessage,
    ModelMessage,
    RoundAnnouncement,
    Tensor,
    TrainingConfig,
    UpdateMessage,
    decode_status,
    decode_update,
    encode,
    receive_update,
)

FLEET = "lab"
DEVICE = "pi-0"
EPOCH = "a1b2c3d4e5f60718"
TOPICS = Topics(FLEET)
BUNDLE = prebuilt_bundle_path("digits-mlp")


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return load_bundle(BUNDLE).initial_trainable()


@pytest.fixture(scope="module")
def data() -> LocalData:
    cfg = AgentConfig(device_id=DEVICE, fleet=FLEET, source="digits", partition="iid",
                      num_clients=4, client_index=0)
    return LocalData.from_config(cfg.data_config())


def model_msg(weights: dict[str, np.ndarray], version: int, epoch: str = EPOCH) -> bytes:
    tensors = tuple(Tensor.from_array(n, w) for n, w in weights.items())
    return encode(ModelMessage(FLEET, version, version, "digits-mlp", tensors, epoch=epoch))


def round_msg(round_id: int, base: int, epoch: str = EPOCH, deadline: float = 1e6) -> bytes:
    return encode(RoundAnnouncement(
        FLEET, round_id, base, deadline, TrainingConfig(epochs=1, lr=0.05, codec="int8"),
        epoch=epoch,
    ))


def ack_msg(update: UpdateMessage, accepted: bool = True, code: str = "ok",
            round_id: int | None = None) -> bytes:
    r = update.round_id if round_id is None else round_id
    return encode(AckMessage(FLEET, r, DEVICE, update.update_id, accepted, code))


@dataclass
class Device:
    """A core over a state directory, and what it published."""

    state_dir: Path
    data: LocalData
    ack_timeout: float = 10.0
    max_resends: int = 2
    key: DeviceKey | None = None
    metrics_textfile: Path | None = None
    published: list[Publish] = field(default_factory=list)
    now: float = 1000.0

    def __post_init__(self) -> None:
        self.core = self.restart()

    def restart(self) -> EdgeCore:
        self.core = EdgeCore(
            CoreSettings(FLEET, DEVICE, TOPICS, ack_timeout=self.ack_timeout,
                         max_resends=self.max_resends, metrics_textfile=self.metrics_textfile),
            StateStore(self.state_dir, DEVICE), Outbox(self.state_dir / "outbox"),
            LiteRTTrainer(BUNDLE), self.data, self.key,
        )
        return self.core

    def run(self, actions: list[Publish | TrainJob]) -> list[Publish]:
        before = len(self.published)
        carry_out(self.core, actions, self.published.append, lambda: self.now)
        return self.published[before:]

    def connect(self) -> list[Publish]:
        return self.run(self.core.on_connected(self.now))

    def model(self, payload: bytes) -> list[Publish]:
        return self.run(self.core.on_message(TOPICS.model, payload, self.now))

    def round(self, payload: bytes) -> list[Publish]:
        return self.run(self.core.on_message(TOPICS.round, payload, self.now))

    def ack(self, payload: bytes) -> list[Publish]:
        return self.run(self.core.on_message(TOPICS.ack(DEVICE), payload, self.now))

    def tick(self, at: float) -> list[Publish]:
        self.now = at
        return self.run(self.core.tick(at))

    def counter(self, name: str) -> int:
        return self.core.store.counter(name)


def updates(published: list[Publish]) -> list[UpdateMessage]:
    return [decode_update(p.payload) for p in published if p.topic == TOPICS.update(DEVICE)]


@pytest.fixture
def device(tmp_path: Path, data: LocalData) -> Device:
    d = Device(tmp_path / "agent", data)
    d.connect()
    return d


def test_a_round_trains_stores_then_publishes_and_one_ack_clears_it(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    assert device.model(model_msg(weights, 0)) == []
    actions = device.core.on_message(TOPICS.round, round_msg(1, 0), device.now)
    assert [type(a) for a in actions] == [Publish, TrainJob]
    assert decode_status(actions[0].payload).state == "training"  # type: ignore[union-attr]
    out = device.run(actions)
    [update] = updates(out)
    assert (update.round_id, update.base_version, update.epoch, update.codec) == (
        1, 0, EPOCH, "int8")
    [entry] = device.core.outbox.pending()
    assert entry.payload == out[1].payload and entry.epoch == EPOCH and entry.codec_state == b""
    assert device.core.store.submitted_update(1) == update.update_id
    assert decode_status(out[-1].payload).state == "idle"

    device.ack(ack_msg(update))
    device.ack(ack_msg(update))  # a repeated ack (QoS 1 redelivery) counts nothing twice
    assert len(device.core.outbox) == 0
    assert device.counter("updates_accepted") == 1 and device.counter("updates_rejected") == 0
    # The same round again (retained redelivery) does not train twice.
    assert updates(device.round(round_msg(1, 0))) == []


def test_every_round_rewrites_the_metrics_textfile(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray]
) -> None:
    prom = tmp_path / "textfile" / "fedmq_agent.prom"
    prom.parent.mkdir()
    d = Device(tmp_path / "agent", data, metrics_textfile=prom)
    d.connect()
    d.model(model_msg(weights, 0))
    [update] = updates(d.round(round_msg(1, 0)))
    [payload] = [p.payload for p in d.published if p.topic == TOPICS.update(DEVICE)]
    d.ack(ack_msg(update))

    def samples() -> dict[str, float]:
        families = text_string_to_metric_families(prom.read_text())
        out = {}
        for family in families:
            for sample in family.samples:
                assert sample.labels == {"device": DEVICE, "fleet": FLEET}
                out[sample.name] = sample.value
        return out

    first = samples()
    assert first["fedmq_agent_last_round"] == 1
    assert first["fedmq_agent_update_bytes"] == len(payload)
    assert first["fedmq_agent_train_examples"] == len(data)
    assert first["fedmq_agent_outbox_pending"] == 1  # written before the ack arrived
    d.model(model_msg(weights, 1))
    updates(d.round(round_msg(2, 1)))
    second = samples()
    assert second["fedmq_agent_last_round"] == 2
    assert second["fedmq_agent_updates_accepted_total"] == 1  # round 1's ack


def test_updates_are_signed_over_what_is_stored_and_sent(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray]
) -> None:
    key = DeviceKey.generate()
    d = Device(tmp_path / "agent", data, key=key)
    d.connect()
    d.model(model_msg(weights, 0))
    published = d.round(round_msg(1, 0))
    [payload] = [p.payload for p in published if p.topic == TOPICS.update(DEVICE)]
    received = receive_update(payload)
    assert received.signature is not None
    verify_update(received, key.public_hex)  # raises when the signature does not verify
    [entry] = d.core.outbox.pending()
    assert entry.payload == payload  # what is stored is what is sent


def test_resends_back_off_then_expire_and_a_late_answer_moves_the_count(
    device: Device, weights: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))  # sent at t=1000
    sends = {}
    for t in range(1001, 1100):
        if updates(device.tick(float(t))):
            sends[t] = device.counter("updates_resent")
    # ack_timeout 10, doubling: resends at +10 and +30; max_resends 2, so after +70 it expires.
    assert sends == {1010: 1, 1030: 2}
    assert device.counter("updates_expired") == 1 and len(device.core.outbox) == 0
    assert any(f"update {update.update_id} of round 1 expired" in r.getMessage()
               for r in caplog.records)
    # The aggregator had folded it after all (its ack was lost): the count moves, once.
    device.ack(ack_msg(update, True, "duplicate"))
    device.ack(ack_msg(update, True, "duplicate"))
    assert (device.counter("updates_expired"), device.counter("updates_accepted")) == (0, 1)


@dataclass
class ScriptedAggregator:
    """The aggregator's answers as the protocol defines them: an update id it folded is
    answered accepted/duplicate (with the round it was folded in) whatever round is open;
    otherwise the open round decides. ``journal`` is what it folded, ``rejects`` by code."""

    open_round: int = 1
    journal: dict[str, int] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)

    def answer(self, update: UpdateMessage) -> bytes:
        if update.update_id in self.journal:
            return ack_msg(update, True, RejectReason.DUPLICATE, self.journal[update.update_id])
        if update.round_id != self.open_round:
            code = (RejectReason.ROUND_CLOSED if update.round_id < self.open_round
                    else RejectReason.WRONG_ROUND)
            self.rejects[code] = self.rejects.get(code, 0) + 1
            return ack_msg(update, False, code)
        self.journal[update.update_id] = update.round_id
        return ack_msg(update)


def test_counters_match_the_aggregators_journal_under_lost_acks_and_redelivery(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    agg = ScriptedAggregator()
    device.model(model_msg(weights, 0))
    [u1] = updates(device.round(round_msg(1, 0)))
    agg.answer(u1)  # folded in round 1, but the ack is lost

    # Round 2 opens before any resend: the unanswered round-1 update is not dropped but sent
    # again at once, and the aggregator says it already folded it.
    agg.open_round = 2
    device.now += 1
    device.model(model_msg(weights, 1))
    out = device.round(round_msg(2, 1))
    resent, u2 = updates(out)
    assert resent.update_id == u1.update_id and u2.round_id == 2
    device.ack(agg.answer(resent))
    # Round 2's update reaches the aggregator only after round 3 opened: never folded.
    agg.open_round = 3
    device.ack(agg.answer(u2))
    device.ack(agg.answer(u2))  # a redelivered reject is not counted twice either

    assert agg.journal == {u1.update_id: 1}
    assert agg.rejects == {RejectReason.ROUND_CLOSED: 2}
    counters = device.core.counters()
    assert counters["updates_accepted"] == len(agg.journal) == 1
    assert counters["updates_rejected"] == counters["updates_rejected_round_closed"] == 1
    assert len(device.core.outbox) == 0
    # And the status the device publishes says the same.
    status = decode_status(device.core.status_payload("idle", device.now))
    assert status.metrics["updates_accepted"] == 1.0
    assert status.metrics["updates_rejected_round_closed"] == 1.0
    assert (status.epoch, status.model_version) == (EPOCH, 1)


def test_a_new_epoch_starts_the_round_bookkeeping_over_and_drops_old_updates(
    device: Device, weights: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    device.model(model_msg(weights, 3))
    [old] = updates(device.round(round_msg(4, 3)))  # unanswered when the aggregator resets

    # A restored aggregator: new epoch, lower model version, round ids from 1 again.
    new = "ffff000011112222"
    assert device.model(model_msg(weights, 0, epoch=new)) == []
    assert device.core.epoch == new and device.core.model_version == 0
    assert len(device.core.outbox) == 0 and device.counter("updates_dropped") == 1
    drops = [r for r in caplog.records if "dropping" in r.getMessage()]
    assert len(drops) == 1 and old.update_id in drops[0].getMessage()
    [fresh] = updates(device.round(round_msg(1, 0, epoch=new)))
    assert (fresh.round_id, fresh.epoch) == (1, new)

    # A stale retained message of the epoch it left is ignored with one line.
    caplog.clear()
    assert device.round(round_msg(5, 3)) == [] and device.core.epoch == new
    assert any(f"of epoch '{EPOCH}'" in r.getMessage() for r in caplog.records)
    # Within the new epoch nothing changed: never an older round.
    assert updates(device.round(round_msg(1, 0, epoch=new))) == []
    restarted = device.restart()
    assert restarted.epoch == new and restarted.store.submitted_update(1) == fresh.update_id


def test_an_older_retained_model_of_the_same_epoch_is_ignored_and_not_persisted(
    device: Device, weights: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="edge_agent")
    device.model(model_msg(weights, 25))
    device.model(model_msg(weights, 24))
    assert device.core.model_version == 25 and device.core.store.model_version == 25
    lines = [r for r in caplog.records if "ignoring model version 24" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    # After a restart (no model in memory) the same: it waits for 25 or newer.
    device.restart()
    device.connect()
    device.model(model_msg(weights, 24))
    assert device.core.model_version is None and device.core.store.model_version == 25
    device.model(model_msg(weights, 25))
    assert device.core.model_version == 25


def test_bad_payloads_are_one_warning_and_counted(
    device: Device, caplog: pytest.LogCaptureFixture
) -> None:
    assert device.round(b"\x93garbage") == []
    assert device.counter("bad_messages") == 1
    assert [r.levelno for r in caplog.records if "ignoring bad message" in r.getMessage()] == [
        logging.WARNING]


def test_offline_updates_wait_and_go_on_connect(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray]
) -> None:
    d = Device(tmp_path / "agent", data)  # never connected
    d.model(model_msg(weights, 0))
    assert d.round(round_msg(1, 0)) == []
    assert len(d.core.outbox) == 1
    [update] = updates(d.connect())
    assert update.update_id == d.core.outbox.pending()[0].update_id


class Crash(Exception):
    """Stands for the process dying at this point."""


def test_crash_in_training_leaves_nothing_and_the_round_is_trained_after_restart(
    device: Device, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.model(model_msg(weights, 0))

    def dies(*args: object, **kwargs: object) -> None:
        raise Crash

    monkeypatch.setattr(device.core.trainer, "fit", dies)
    with pytest.raises(Crash):
        device.round(round_msg(1, 0))
    assert len(device.core.outbox) == 0 and device.core.store.submitted_update(1) is None
    device.restart()
    device.connect()
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))
    assert update.round_id == 1 and device.core.outbox.codec_state.update_id == update.update_id


def test_crash_after_storing_before_recording_never_trains_the_round_twice(
    device: Device, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.model(model_msg(weights, 0))

    def dies(round_id: int, update_id: str) -> None:
        raise Crash

    monkeypatch.setattr(device.core.store, "record_submission", dies)
    with pytest.raises(Crash):
        device.round(round_msg(1, 0))
    [stored] = device.core.outbox.pending()
    assert device.published[-1].topic != TOPICS.update(DEVICE)  # it never left the device

    device.restart()  # the outbox entry is adopted as round 1's submission
    assert device.core.store.submitted_update(1) == stored.update_id
    [sent] = updates(device.connect())
    device.model(model_msg(weights, 0))
    assert updates(device.round(round_msg(1, 0))) == []
    assert sent.update_id == stored.update_id
    assert device.core.outbox.codec_state.update_id == stored.update_id


def test_crash_after_counting_an_ack_before_clearing_counts_nothing_twice(
    device: Device, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))

    def dies(update_id: str) -> bool:
        raise Crash

    monkeypatch.setattr(device.core.outbox, "remove", dies)
    with pytest.raises(Crash):
        device.ack(ack_msg(update))
    device.restart()
    assert len(device.core.outbox) == 0  # settled before the crash: cleared at start-up
    device.connect()
    device.ack(ack_msg(update))  # the broker redelivers the ack
    assert device.counter("updates_accepted") == 1


def test_a_duplicate_answer_counts_as_folded_whatever_its_accepted_flag(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))
    device.ack(ack_msg(update, False, RejectReason.DUPLICATE))  # an older aggregator's form
    assert (device.counter("updates_accepted"), device.counter("updates_rejected")) == (1, 0)


def test_an_update_older_than_the_resend_schedule_gets_one_send_after_a_restart(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))  # t=1000; schedule 10+20+40 = 70s
    device.now = 5000.0  # the device was down for an hour
    device.restart()
    [again] = updates(device.connect())
    assert again.update_id == update.update_id
    assert updates(device.tick(5009.0)) == [] and len(device.core.outbox) == 1
    assert updates(device.tick(5010.0)) == []  # no fresh budget of resends: expired
    assert device.counter("updates_expired") == 1 and len(device.core.outbox) == 0


def test_crash_between_adopting_an_epoch_and_dropping_its_old_updates(
    device: Device, weights: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    device.model(model_msg(weights, 0))
    [old] = updates(device.round(round_msg(1, 0)))

    def dies(epoch: str) -> int:
        raise Crash

    monkeypatch.setattr(device.core, "_drop_other_epochs", dies)
    with pytest.raises(Crash):
        device.model(model_msg(weights, 0, epoch="new-lineage"))
    assert [e.update_id for e in device.core.outbox.pending()] == [old.update_id]
    restarted = device.restart()
    assert restarted.epoch == "new-lineage" and len(restarted.outbox) == 0
    assert device.counter("updates_dropped") == 1


def test_fedbuff_a_slow_device_sends_its_update_on_the_old_base_then_trains_on_the_new(
    tmp_path: Path, data: LocalData, weights: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the agent does under the fedbuff policy (docs/rounds.md): the announcement of
    round 2 (model version 1) waits in the agent's queue while it trains round 1; its update
    names round 1 and base 0 (the aggregator folds it with staleness 1); then it trains on
    version 1. ``train_delay`` sleeps before each training."""
    slept: list[float] = []
    monkeypatch.setattr("edge_agent.core.time.sleep", slept.append)
    d = Device(tmp_path / "agent", data)
    d.core.settings = CoreSettings(FLEET, DEVICE, TOPICS, train_delay=2.5)
    d.connect()
    d.model(model_msg(weights, 0))
    [first] = updates(d.round(round_msg(1, 0)))
    assert (first.round_id, first.base_version) == (1, 0)
    assert updates(d.model(model_msg(weights, 1))) == []  # round 1 is now stale: no retrain
    # Its round-1 update is still unanswered when round 2 is read: re-sent at once for a
    # definitive answer (the aggregator answers it duplicate), then round 2 is trained.
    resent, second = updates(d.round(round_msg(2, 1)))
    assert resent.update_id == first.update_id
    assert (second.round_id, second.base_version) == (2, 1)
    assert slept == [2.5, 2.5]
    with pytest.raises(ValueError, match="train_delay"):
        CoreSettings(FLEET, DEVICE, TOPICS, train_delay=-1.0)


def test_an_unanswered_update_is_resent_once_when_rounds_move_on_not_once_per_round(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    """Rounds may move on every second (the fedbuff policy, docs/rounds.md) while an ack is
    on its way: one early resend asks for the definitive answer; more rounds moving on do
    not resend it again (that grew into a resend storm: every round re-sent every
    unanswered update, slowing the acks further). The backoff schedule still applies."""
    device.model(model_msg(weights, 0))
    [first] = updates(device.round(round_msg(1, 0)))
    device.model(model_msg(weights, 1))
    resent_first, second = updates(device.round(round_msg(2, 1)))
    assert (resent_first.update_id, second.round_id) == (first.update_id, 2)
    device.model(model_msg(weights, 2))
    third = updates(device.round(round_msg(3, 2)))
    # round 2's update is re-sent (its round's first move), round 1's is not again
    assert [u.update_id for u in third][:1] == [second.update_id]
    assert [u.round_id for u in third] == [2, 3]
    # The backoff schedule still resends it when its interval passed.
    resent = updates(device.tick(device.now + 2 * device.ack_timeout))
    assert first.update_id in [u.update_id for u in resent]


def test_a_refused_chunk_is_logged_and_counted_and_leaves_the_update_waiting(
    device: Device, weights: dict[str, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    device.model(model_msg(weights, 0))
    [update] = updates(device.round(round_msg(1, 0)))
    refusal = AckMessage(FLEET, 0, DEVICE, "", False, "bad_chunk", "chunk 3 of transfer "
                         "ab12, which expired")
    with caplog.at_level(logging.WARNING, logger="edge_agent.core"):
        device.ack(encode(refusal))
    assert caplog.messages == [
        "the aggregator rejected a chunk: bad_chunk: chunk 3 of transfer ab12, which expired"
    ]
    assert device.counter("chunks_rejected") == 1
    assert device.counter("updates_rejected") == 0
    assert [e.update_id for e in device.core.outbox.pending()] == [update.update_id]


def test_a_dp_round_clips_the_delta_before_encoding(
    device: Device, weights: dict[str, np.ndarray]
) -> None:
    """docs/privacy.md: the device clips to the round's dp_clip, then int8 encodes; the
    decoded update's norm is within C plus the quantisation slack, and the clip bit is sent."""
    from fedmq.privacy.clip import l2_norm, quantization_slack
    from fedmq.update.codecs import get_codec

    clip = 0.05
    device.model(model_msg(weights, 0))
    ann = RoundAnnouncement(
        FLEET, 1, 0, 1e6, TrainingConfig(epochs=1, lr=0.05, codec="int8",
                                         params={"dp_clip": clip}), epoch=EPOCH,
    )
    [update] = updates(device.round(encode(ann)))
    codec = get_codec("int8")
    decoded = {t.name: codec.decode(t) for t in update.tensors}
    # int8: one step per tensor is max|x| / 127 (the tensor's scale)
    steps = {t.name: (int(np.prod(t.shape)), float(np.abs(decoded[t.name]).max()) / 127)
             for t in update.tensors}
    norm = l2_norm(decoded)
    assert norm <= clip + quantization_slack(steps)
    assert norm <= clip * 1.1  # within the aggregator's default re-clip tolerance
    assert norm > clip * 0.9  # a 1-epoch delta of this model is far above 0.05: clipped
    assert update.metrics["dp_unclipped"] == 0.0
