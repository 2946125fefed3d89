"""Pruned rounds on the device (docs/pruning.md).

A pruned round's announcement carries the server's mask (``RoundAnnouncement.prune_mask``)
and names a masked codec (``masked-int8``/``masked-f16``). The device decodes the mask
strictly against its model, loads it into the trainer (LiteRT: the model's ``set_mask`` and
``train_masked`` signatures; Keras: the same multiply after each step), trains, and sends
only the kept weights' values. A device whose model cannot train under a mask does not list
the masked codecs in its status (so the aggregator does not select it) and refuses such a
round with one line naming why.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge_agent.trainer import Trainer, VariantTrainer
from fedmq.errors import ModelError, WireError
from fedmq.prune.mask import PruneMask, decode_mask
from fedmq.tensor import Tensor
from fedmq.update.codecs import codec_names, get_codec
from fedmq.update.codecs.masked import MaskedCodec
from fedmq.wire import RoundAnnouncement

__all__ = ["can_prune", "encode_masked", "prepare_round", "supported_codecs"]


def can_prune(trainer: Trainer) -> bool:
    """Whether ``trainer`` trains under a mask (``"mask"`` in its variants)."""
    return isinstance(trainer, VariantTrainer) and "mask" in trainer.variants


def supported_codecs(trainer: Trainer) -> list[str]:
    """The codecs this device can encode (its status's ``capabilities.codecs``): every
    registered codec, the masked ones only when the trainer can train pruned rounds."""
    masks = can_prune(trainer)
    return [c for c in codec_names() if masks or not isinstance(get_codec(c), MaskedCodec)]


def prepare_round(trainer: Trainer, ann: RoundAnnouncement) -> PruneMask | None:
    """Set ``trainer`` up for ``ann``'s round: the mask decoded and loaded (a pruned round;
    returned) or cleared (None). Raises :class:`ModelError` with the reason the round is
    refused: a mask that does not fit the model, a masked codec without a mask or the other
    way round, a model that cannot train under a mask."""
    r, codec = ann.round_id, ann.config.codec
    masked = isinstance(get_codec(codec), MaskedCodec)
    if not ann.prune_mask:
        if masked:
            raise ModelError(
                f"round {r} uses codec {codec} but its announcement carries no pruning mask; "
                "round skipped"
            )
        if can_prune(trainer):
            trainer.set_mask(None)  # type: ignore[attr-defined]
        return None
    if not masked:
        raise ModelError(
            f"round {r} carries a pruning mask but codec {codec} is not a masked codec; "
            "round skipped"
        )
    if not can_prune(trainer):
        raise ModelError(
            f"round {r} is pruned but model {trainer.spec.name!r} on {trainer.runtime_name} "
            "cannot train under a mask (no set_mask/train_masked signatures: export the model "
            "again); round skipped"
        )
    shapes = {t.name: t.shape for t in trainer.spec.weights if t.name in trainer.spec.trainable}
    try:
        mask = decode_mask(ann.prune_mask, shapes)
    except WireError as exc:
        raise ModelError(f"{exc}; round skipped") from None
    trainer.set_mask(mask.float_masks())  # type: ignore[attr-defined]
    return mask


def encode_masked(
    delta: Mapping[str, np.ndarray], codec: str, mask: PruneMask, rng: np.random.Generator
) -> tuple[Tensor, ...]:
    """``delta``'s kept values in the round's masked ``codec`` (no position bytes)."""
    impl = get_codec(codec)
    if not isinstance(impl, MaskedCodec):
        raise ModelError(f"codec {codec} is not a masked codec")
    return impl.with_mask(mask).encode(delta, rng).tensors
