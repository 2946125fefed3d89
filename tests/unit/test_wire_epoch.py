"""The aggregator epoch on model, round, update and status messages, and the status's model
version: optional on the wire (absent = "" / None, old bytes unchanged), strictly checked."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from fedmq import wire
from fedmq.errors import WireError
from fedmq.wire import (
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    Tensor,
    TrainingConfig,
    UpdateMessage,
)

EPOCH = "0123456789abcdef"
_T = (Tensor.from_array("w", np.zeros((2,), np.float32)),)


def _model(epoch: str = "") -> ModelMessage:
    return ModelMessage("lab", 3, 3, "m", _T, epoch=epoch)


def _round(epoch: str = "") -> RoundAnnouncement:
    return RoundAnnouncement("lab", 4, 3, 100.0, TrainingConfig(), epoch=epoch)


def _update(epoch: str = "") -> UpdateMessage:
    return UpdateMessage("lab", 4, 3, "pi-0", "u1", 5, "float32", _T, epoch=epoch)


def _status(epoch: str = "", version: int | None = None) -> StatusMessage:
    return StatusMessage("lab", "pi-0", "online", epoch=epoch, model_version=version)


def test_epoch_and_model_version_round_trip() -> None:
    assert wire.decode_model(wire.encode(_model(EPOCH))).epoch == EPOCH
    assert wire.decode_round(wire.encode(_round(EPOCH))).epoch == EPOCH
    assert wire.decode_update(wire.encode(_update(EPOCH))).epoch == EPOCH
    status = wire.decode_status(wire.encode(_status(EPOCH, 7)))
    assert (status.epoch, status.model_version) == (EPOCH, 7)
    # The signed body is the encoded update: a relabelled epoch changes what is signed.
    assert wire.encode(_update(EPOCH)) != wire.encode(_update("other"))


def test_absent_epoch_decodes_as_empty_and_keeps_the_old_bytes() -> None:
    raw = msgpack.unpackb(wire.encode(_update()), raw=False)
    assert "epoch" not in raw
    assert wire.decode_update(wire.encode(_update())).epoch == ""
    status = wire.decode_status(wire.encode(_status()))
    assert (status.epoch, status.model_version) == ("", None)
    assert "model_version" not in msgpack.unpackb(wire.encode(_status()), raw=False)


@pytest.mark.parametrize("bad", ["x" * 65, "bad\nepoch", "", 7])
def test_bad_epochs_are_refused(bad: object) -> None:
    obj = msgpack.unpackb(wire.encode(_round(EPOCH)), raw=False)
    obj["epoch"] = bad
    with pytest.raises(WireError, match="epoch"):
        wire.decode_round(msgpack.packb(obj, use_bin_type=True))
