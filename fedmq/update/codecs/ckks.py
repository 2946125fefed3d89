"""The ``ckks`` codec: an update encrypted with CKKS (docs/privacy.md, "Homomorphic
encryption").

Not a built-in: a device with a public context (``he_context``) and an aggregator in HE mode
register it (:func:`register_ckks`). The delta is pre-scaled by the device's weight (its
example count), flattened over the model's tensors in model order and encrypted in batches of
the context's slot count; wire tensor ``ckks.<i>`` holds ciphertext ``i`` (dtype ``uint8``,
shape ``[bytes]``, param ``weight``, no extra fields). A ciphertext has no plaintext without
the secret key: ``decode``/``add_into`` refuse; :class:`fedmq.privacy.he_sum.CkksSum` reads
and adds the ciphertexts, and its ``squared_norm`` is NaN (unknown: the aggregator needs
``norm_bound = "off"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedmq.errors import RejectReason, WireError
from fedmq.privacy.he import HEContext, encrypt_flat, flatten
from fedmq.tensor import Tensor
from fedmq.update.codecs.base import Codec, CodecState, Encoded
from fedmq.update.codecs.registry import register

__all__ = ["CKKS", "Ckks", "register_ckks", "tensor_name"]

CKKS = "ckks"


def tensor_name(i: int) -> str:
    return f"ckks.{i}"


class Ckks(Codec):
    name = CKKS

    def __init__(self, he: HEContext) -> None:
        self.he = he

    def encode(
        self, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
        state: CodecState | None = None,
    ) -> Encoded:
        raise ValueError("the ckks codec encodes weighted deltas: use encode_weighted()")

    def encode_weighted(self, delta: Mapping[str, np.ndarray], weight: float) -> Encoded:
        """``weight * delta`` (tensors in ``delta``'s order, the model's) as ciphertexts."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        flat = flatten(delta, delta) * float(weight)
        blobs = encrypt_flat(self.he, flat)
        return Encoded(tuple(
            Tensor(tensor_name(i), "uint8", (len(b),), b, {"weight": float(weight)})
            for i, b in enumerate(blobs)
        ))

    def validate(self, tensor: Tensor, shape: tuple[int, ...]) -> None:
        """Structure only (the ciphertext itself is read by the accumulator)."""
        if tensor.dtype != "uint8" or tensor.shape != (len(tensor.data),) or tensor.extra:
            raise WireError(
                f"tensor {tensor.name!r} is not a ckks ciphertext (uint8 bytes, no extra)",
                RejectReason.BAD_CODEC,
            )
        if set(tensor.params) != {"weight"}:
            raise WireError(
                f"tensor {tensor.name!r}: codec ckks takes the param 'weight' only, got "
                f"{sorted(tensor.params)}",
                RejectReason.BAD_CODEC,
            )

    def decode(self, tensor: Tensor) -> np.ndarray:
        raise WireError(
            f"tensor {tensor.name!r} is encrypted: no plaintext without the secret key",
            RejectReason.BAD_CODEC,
        )

    def bound(self, tensor: Tensor) -> float:
        return math.inf

    def squared_norm(self, tensor: Tensor) -> float:
        return math.nan  # unknowable without the secret key

    def add_into(
        self, acc: np.ndarray, tensor: Tensor, coef: float, scratch: np.ndarray | None = None
    ) -> None:
        self.decode(tensor)  # raises


def register_ckks(he: HEContext) -> Ckks:
    """Register the ``ckks`` codec with this process's public context."""
    codec = Ckks(he)
    register(codec, replace=True)
    return codec
