"""The device's side of homomorphic aggregation (docs/privacy.md, "Homomorphic encryption").

With ``he_context`` set (the **public** context of ``fedmq he keygen``; a context holding a
secret key is refused), the agent registers the ``ckks`` codec at start, so its status
advertises it and the aggregator selects it for encrypted rounds. In such a round the delta
is pre-scaled by the device's weight (its example count, the weight the aggregator folds it
with: a ciphertext cannot be re-weighted) and encrypted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedmq.errors import ConfigError
from fedmq.privacy.he import HEContext
from fedmq.tensor import Tensor
from fedmq.update.codecs import get_codec
from fedmq.update.codecs.ckks import CKKS, Ckks, register_ckks

__all__ = ["encode_he", "is_he", "load_he"]

log = logging.getLogger(__name__)


def load_he(path: Path | None) -> Ckks | None:
    """Register the ``ckks`` codec with the public context at ``path`` (None: HE off)."""
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"he_context {path}: {exc}") from exc
    he = HEContext.load(data, secret=False, what=f"he_context {path}")
    log.info("homomorphic encryption available: CKKS N=%d (%d slots per ciphertext)",
             he.params.poly_degree, he.params.slots)
    return register_ckks(he)


def is_he(codec: str) -> bool:
    return codec == CKKS


def encode_he(delta: Mapping[str, np.ndarray], weight: int) -> tuple[Tensor, ...]:
    """``weight * delta`` encrypted (``ValueError``/``WireError`` when the device has no
    context or the values are out of range: the round's training fails with one line)."""
    codec = get_codec(CKKS)
    if not isinstance(codec, Ckks):
        raise ConfigError("codec ckks is not the CKKS codec")
    return codec.encode_weighted(delta, float(weight)).tensors
