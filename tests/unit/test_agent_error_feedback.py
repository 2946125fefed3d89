"""Error feedback on a real device core (LiteRT digits-mlp, real outbox files): the residual
a sparse codec leaves is committed with its update, so a crash between training and
publishing neither loses nor double-counts what the device trained."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from edge_agent import core as core_module
from edge_agent.config import AgentConfig
from fedmq.data.local import LocalData
from fedmq.models.spec import load_bundle
from fedmq.update import codecs
from fedmq.update.codecs.base import CodecState, Encoded
from fedmq.update.codecs.residual import ROUND_KEY, skipped_rounds
from fedmq.wire import RoundAnnouncement, TrainingConfig, encode
from tests.unit.test_agent_core import (
    BUNDLE,
    DEVICE,
    EPOCH,
    FLEET,
    Crash,
    Device,
    model_msg,
    updates,
)

PARAMS = {"topk_fraction": 0.05, "residual_policy": "keep"}


def _round(round_id: int) -> bytes:
    cfg = TrainingConfig(epochs=1, lr=0.05, codec="topk-f16", params=PARAMS)
    return encode(RoundAnnouncement(FLEET, round_id, 0, 1e6, cfg, epoch=EPOCH))


def test_a_crash_before_publishing_neither_loses_nor_double_counts_the_residual(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = AgentConfig(device_id=DEVICE, fleet=FLEET, source="digits", partition="iid",
                      num_clients=4, client_index=0)
    device = Device(tmp_path / "agent", LocalData.from_config(cfg.data_config()))
    device.connect()
    weights = load_bundle(BUNDLE).initial_trainable()
    deltas: dict[int, dict[str, np.ndarray]] = {}
    real = core_module.encode_round

    def spy(codec: str, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
            state: CodecState | None, params: Mapping[str, object], round_id: int) -> Encoded:
        deltas[round_id] = {k: v.copy() for k, v in delta.items()}  # a retrain overwrites
        return real(codec, delta, rng, state, params, round_id)

    monkeypatch.setattr(core_module, "encode_round", spy)
    device.model(model_msg(weights, 0))
    device.round(_round(1))

    def dies(round_id: int, update_id: str) -> None:
        raise Crash

    with monkeypatch.context() as m:  # round 2: stored with its residual, never published
        m.setattr(device.core.store, "record_submission", dies)
        with pytest.raises(Crash):
            device.round(_round(2))
    device.restart()
    device.connect()  # the stored update of round 2 goes now
    device.model(model_msg(weights, 0))
    device.round(_round(2))  # not trained twice
    device.round(_round(3))
    published = updates(device.published)
    assert sorted({u.round_id for u in published}) == sorted(deltas) == [1, 2, 3]
    sent = {u.round_id: u for u in published}
    for u in published:  # resends are the same update, one per round
        assert u.update_id == sent[u.round_id].update_id

    state = codecs.unpack_state(device.core.outbox.codec_state.blob)
    assert skipped_rounds(state, 4) == 0 and ROUND_KEY in state
    for name, total in ((n, sum(d[n] for d in deltas.values())) for n in deltas[1]):
        got = sum(codecs.decode_tensor(t, "topk-f16") for u in sent.values()
                  for t in u.tensors if t.name == name) + state[name]
        np.testing.assert_allclose(got, total, rtol=0, atol=1e-6)
        assert np.abs(state[name]).max() > 0  # the residual is real, not empty
