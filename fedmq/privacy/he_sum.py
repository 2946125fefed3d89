"""The accumulator of an HE round: sums CKKS ciphertexts without the secret key.

:class:`CkksSum` takes ``ckks`` updates (:mod:`fedmq.update.codecs.ckks`): it reads every
ciphertext strictly (:func:`fedmq.privacy.he.read_ciphertext`), checks that the weight the
device encrypted with is the weight the aggregator folds with (a ciphertext cannot be
re-weighted: a capped claim or a staleness factor is a rejection, with the reason), and adds
ciphertexts. At the close the round is *sealed* (:meth:`CkksSum.seal`: no more updates; the
sum's ciphertexts and digest go to the decryptor), and :meth:`CkksSum.result` gives the mean
only once the decryptor's answer for that digest is in (:meth:`CkksSum.set_mean`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.privacy.he import MAX_SUM_UPDATES, HEContext, read_ciphertext
from fedmq.tensor import Tensor
from fedmq.update.accumulate import Accumulated, CheckedUpdate, Weights
from fedmq.update.codecs.ckks import CKKS, Ckks, tensor_name

__all__ = ["CheckedCiphertexts", "CkksSum", "HEPending", "sum_digest"]


class HEPending(ValueError):
    """The sum is not decrypted yet (the round cannot close)."""


@dataclass(frozen=True)
class CheckedCiphertexts(CheckedUpdate):
    """A checked ``ckks`` update and its parsed ciphertexts."""

    vectors: tuple[Any, ...] = field(default=(), repr=False, compare=False)


def sum_digest(blobs: Iterable[bytes]) -> str:
    """SHA-256 over the serialised sum's ciphertexts (length-prefixed)."""
    h = hashlib.sha256()
    for b in blobs:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class CkksSum:
    """Sum of encrypted ``weight * delta`` updates; see the module docstring."""

    kind = "ckks_sum"

    def __init__(self, template: Mapping[str, tuple[int, ...]], he: HEContext,
                 max_updates: int = MAX_SUM_UPDATES) -> None:
        if not template:
            raise ValueError("template must name at least one tensor")
        self._shapes = {n: tuple(int(d) for d in s) for n, s in template.items()}
        self.he = he
        self.codec = Ckks(he)
        self.values = sum(math.prod(s) for s in self._shapes.values())
        self.sizes = he.batch_sizes(self.values)
        self.names = tuple(tensor_name(i) for i in range(len(self.sizes)))
        self.max_updates = min(max_updates, MAX_SUM_UPDATES)
        self._sum: list[Any] | None = None
        self._count = 0
        self._total_weight = 0.0
        self._sealed: tuple[list[bytes], str] | None = None
        self._mean: Weights | None = None

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self._shapes

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    @property
    def sealed(self) -> bool:
        return self._sealed is not None

    @property
    def decrypted(self) -> bool:
        return self._mean is not None

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        if codec != CKKS:
            raise Rejected(f"this round takes encrypted (ckks) updates, not {codec}",
                           RejectReason.BAD_CODEC)
        self._check_room()
        c = self.codec
        by_name: dict[str, Tensor] = {}
        for t in tensors:
            if t.name not in self.names or t.name in by_name:
                raise Rejected(
                    f"tensor {t.name!r} is not one of the {len(self.names)} ciphertexts "
                    f"{self.names[0]}..{self.names[-1]} (or appears twice)",
                    RejectReason.SHAPE,
                )
            c.validate(t, (len(t.data),))
            if t.params["weight"] != weight:
                raise Rejected(
                    f"encrypted with weight {t.params['weight']:g} but folded with weight "
                    f"{weight:g} (a capped example count or a stale update): a ciphertext "
                    "cannot be re-weighted",
                    RejectReason.BAD_CODEC,
                )
            by_name[t.name] = t
        if len(by_name) != len(self.names):
            raise Rejected(
                f"{len(by_name)} ciphertexts, the model needs {len(self.names)}",
                RejectReason.SHAPE,
            )
        ordered = tuple(by_name[n] for n in self.names)
        vectors = tuple(
            read_ciphertext(self.he, t.data, size, f"tensor {t.name!r}")
            for t, size in zip(ordered, self.sizes, strict=True)
        )
        return CheckedCiphertexts(ordered, c, float(weight), (), self, vectors=vectors)

    def _check_room(self) -> None:
        if self._sealed is not None:
            raise Rejected("the round's encrypted sum went to the decryptor",
                           RejectReason.ROUND_CLOSED)
        if self._count >= self.max_updates:
            raise Rejected(f"the encrypted sum holds {self.max_updates} updates already",
                           RejectReason.ROUND_CLOSED)

    def add(self, checked: CheckedUpdate) -> None:
        if checked.owner is not self or not isinstance(checked, CheckedCiphertexts):
            raise ValueError("this update was checked by another accumulator")
        self._check_room()
        if self._sum is None:
            self._sum = [v.copy() for v in checked.vectors]
        else:
            for acc, v in zip(self._sum, checked.vectors, strict=True):
                acc.add_(v)
        self._count += 1
        self._total_weight += checked.weight

    def fold(self, tensors: Iterable[Tensor], codec: str, weight: float) -> None:
        self.add(self.check(tensors, codec, weight))

    def sum_blobs(self) -> list[bytes]:
        if self._sum is None:
            raise ValueError("no update was folded")
        return [bytes(v.serialize()) for v in self._sum]

    def seal(self) -> tuple[list[bytes], str]:
        """Take no more updates; the sum's ciphertexts and their digest (same every call)."""
        if self._sealed is None:
            blobs = self.sum_blobs()
            self._sealed = (blobs, sum_digest(blobs))
        return self._sealed

    def set_mean(self, digest: str, count: int, total_weight: float, mean: Weights) -> None:
        """The decryptor's mean for the sealed sum ``digest``; ``ValueError`` when it is not
        this sum's (another digest, count, weight or model)."""
        if self._sealed is None or digest != self._sealed[1]:
            raise ValueError("the decrypted mean is for another sum (digest differs)")
        if count != self._count or total_weight != self._total_weight:
            raise ValueError(
                f"the decrypted mean is of {count} updates of weight {total_weight:g}, the "
                f"sum holds {self._count} of weight {self._total_weight:g}"
            )
        if {n: tuple(np.shape(v)) for n, v in mean.items()} != self._shapes:
            raise ValueError("the decrypted mean does not have the model's tensors")
        if not all(np.isfinite(v).all() for v in mean.values()):
            raise ValueError("the decrypted mean holds NaN or infinite values")
        self._mean = {n: np.asarray(mean[n], np.float32) for n in self._shapes}

    def result(self) -> Accumulated:
        if self._mean is None:
            raise HEPending("the encrypted sum is not decrypted yet")
        return Accumulated(self._count, self._total_weight, dict(self._mean))

    def merge(self, other: CkksSum) -> None:
        if not isinstance(other, CkksSum) or other._shapes != self._shapes:
            raise ValueError("only CKKS sums of the same model merge")
        if other._sum is None:
            return
        if self._sealed is not None or self._count + other._count > self.max_updates:
            raise Rejected("the encrypted sum cannot take these updates",
                           RejectReason.ROUND_CLOSED)
        if self._sum is None:
            self._sum = [v.copy() for v in other._sum]
        else:
            for acc, v in zip(self._sum, other._sum, strict=True):
                acc.add_(v)
        self._count += other._count
        self._total_weight += other._total_weight

    def to_bytes(self) -> bytes:
        obj = {
            "accumulator": self.kind, "format": 1, "count": self._count,
            "total_weight": self._total_weight,
            "sum": self.sum_blobs() if self._sum is not None else [],
        }
        out = msgpack.packb(obj, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def from_bytes(cls, data: bytes, template: Mapping[str, tuple[int, ...]],
                   he: HEContext) -> CkksSum:
        acc = cls(template, he)
        try:
            obj = msgpack.unpackb(data, raw=False, max_ext_len=0)
        except Exception as exc:  # msgpack raises several types on garbage
            raise WireError(f"serialised CKKS sum is not msgpack: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("accumulator") != cls.kind:
            raise WireError("not a serialised CKKS sum")
        blobs, count, total = obj.get("sum"), obj.get("count"), obj.get("total_weight")
        if not (isinstance(blobs, list) and isinstance(count, int) and isinstance(total, float)):
            raise WireError("serialised CKKS sum: bad fields")
        if blobs:
            if len(blobs) != len(acc.sizes):
                raise WireError("serialised CKKS sum: wrong number of ciphertexts")
            acc._sum = [read_ciphertext(he, b, s) for b, s in zip(blobs, acc.sizes, strict=True)]
        acc._count, acc._total_weight = count, total
        return acc
