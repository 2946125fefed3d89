"""The decryptor role and the two HE messages (docs/privacy.md, "Homomorphic encryption").

- ``he_sum`` (aggregator -> decryptor, retained on ``fl/<fleet>/he/sum``): the round's
  encrypted sum: fleet, epoch, round, update count, total weight, the model's tensor names and
  shapes, the ciphertexts and their digest.
- ``he_mean`` (decryptor -> aggregator, retained on ``fl/<fleet>/he/mean``): the same ids,
  the digest it decrypted and the mean delta (sum / total weight) as float32 tensors.

:class:`Decryptor` holds the secret context and answers a sum with a mean under its rules:
at least ``min_updates`` updates in the sum; **one sum per (epoch, round)** (the same digest
again gets the same answer: an aggregator restart; another digest for a decrypted round is
refused, which stops a differencing attack within a round); the rounds it decrypted are kept
in a state file so a restart keeps the rule. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from fedmq.errors import FedmqError, StateError, WireError
from fedmq.fsutil import atomic_write
from fedmq.privacy.he import HEContext, decrypt_flat, read_ciphertext, unflatten
from fedmq.privacy.he_sum import sum_digest
from fedmq.tensor import Tensor, tensor_from_map

__all__ = ["Decryptor", "MeanResult", "SumRequest", "he_topics"]

log = logging.getLogger(__name__)

_MAX_BYTES = 1 << 30


def he_topics(base: str) -> tuple[str, str]:
    """(sum topic, mean topic) under a fleet's topic base (``Topics.base``)."""
    return f"{base}/he/sum", f"{base}/he/mean"


def _unpack(payload: bytes, kind: str) -> dict[str, Any]:
    if len(payload) > _MAX_BYTES:
        raise WireError(f"{kind} message of {len(payload)} bytes is too large")
    try:
        obj = msgpack.unpackb(payload, raw=False, max_ext_len=0, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types on garbage
        raise WireError(f"{kind} message is not msgpack: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("type") != kind or obj.get("v") != 1:
        raise WireError(f"not a version-1 {kind} message")
    return obj


def _field(obj: Mapping[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, typ):
        raise WireError(f"field {key!r} is missing or mistyped")
    return value


def _ids(obj: Mapping[str, Any]) -> tuple[str, str, int, int, float]:
    fleet, epoch = _field(obj, "fleet", str), _field(obj, "epoch", str)
    round_id, count = _field(obj, "round", int), _field(obj, "count", int)
    total = float(_field(obj, "total_weight", (int, float)))
    if round_id < 1 or count < 1 or not (math.isfinite(total) and total > 0):
        raise WireError("round, count and total_weight must be positive")
    return fleet, epoch, round_id, count, total


@dataclass(frozen=True)
class SumRequest:
    fleet: str
    epoch: str
    round_id: int
    count: int
    total_weight: float
    shapes: dict[str, tuple[int, ...]]
    ciphertexts: tuple[bytes, ...]
    digest: str

    def encode(self) -> bytes:
        out = msgpack.packb({
            "v": 1, "type": "he_sum", "fleet": self.fleet, "epoch": self.epoch,
            "round": self.round_id, "count": self.count, "total_weight": self.total_weight,
            "shapes": [[n, list(s)] for n, s in self.shapes.items()],
            "ciphertexts": list(self.ciphertexts), "digest": self.digest,
        }, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def decode(cls, payload: bytes) -> SumRequest:
        obj = _unpack(payload, "he_sum")
        fleet, epoch, round_id, count, total = _ids(obj)
        raw_shapes, cts = _field(obj, "shapes", list), _field(obj, "ciphertexts", list)
        shapes: dict[str, tuple[int, ...]] = {}
        for item in raw_shapes:
            ok = (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                  and isinstance(item[1], list) and len(item[1]) <= 8
                  and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                          for d in item[1]))
            if not ok or item[0] in shapes:
                raise WireError("he_sum: bad shapes")
            shapes[item[0]] = tuple(item[1])
        if not shapes or not cts or not all(isinstance(c, bytes) for c in cts):
            raise WireError("he_sum: needs shapes and ciphertexts")
        digest = _field(obj, "digest", str)
        if digest != sum_digest(cts):
            raise WireError("he_sum: digest does not match the ciphertexts")
        return cls(fleet, epoch, round_id, count, total, shapes, tuple(cts), digest)


@dataclass(frozen=True)
class MeanResult:
    fleet: str
    epoch: str
    round_id: int
    count: int
    total_weight: float
    digest: str
    mean: dict[str, np.ndarray]

    def encode(self) -> bytes:
        out = msgpack.packb({
            "v": 1, "type": "he_mean", "fleet": self.fleet, "epoch": self.epoch,
            "round": self.round_id, "count": self.count, "total_weight": self.total_weight,
            "digest": self.digest,
            "tensors": [Tensor.from_array(n, np.asarray(a, np.float32)).to_map()
                        for n, a in self.mean.items()],
        }, use_bin_type=True)
        assert isinstance(out, bytes)
        return out

    @classmethod
    def decode(cls, payload: bytes) -> MeanResult:
        obj = _unpack(payload, "he_mean")
        fleet, epoch, round_id, count, total = _ids(obj)
        digest = _field(obj, "digest", str)
        mean: dict[str, np.ndarray] = {}
        for item in _field(obj, "tensors", list):
            t = tensor_from_map(item, _MAX_BYTES)
            if t.dtype != "float32" or not t.dense or t.name in mean:
                raise WireError(f"he_mean: bad tensor {t.name!r}")
            mean[t.name] = np.array(t.array(), np.float32)
        return cls(fleet, epoch, round_id, count, total, digest, mean)


class Decryptor:
    """Answers encrypted sums with means; see the module docstring."""

    def __init__(self, he: HEContext, fleet: str, state_path: Path, min_updates: int = 2) -> None:
        if not he.has_secret_key:
            raise StateError("the decryptor needs the secret context")
        if min_updates < 1:
            raise ValueError("min_updates must be >= 1")
        self.he, self.fleet, self.state_path, self.min_updates = he, fleet, state_path, min_updates
        self.done: dict[str, str] = {}  # "epoch/round" -> digest decrypted
        if state_path.exists():
            try:
                loaded = json.loads(state_path.read_text())
                assert isinstance(loaded, dict)
                self.done = {str(k): str(v) for k, v in loaded.items()}
            except (ValueError, AssertionError, OSError) as exc:
                raise StateError(f"decryptor state {state_path} is unreadable: {exc}") from exc
        self._answers: dict[str, bytes] = {}

    def handle(self, payload: bytes) -> bytes | None:
        """The ``he_mean`` payload answering an ``he_sum`` payload, or None (one log line
        says why: not for this fleet, malformed, too few updates, another sum of a round
        already decrypted)."""
        try:
            req = SumRequest.decode(payload)
        except WireError as exc:
            log.warning("refused an encrypted sum: %s", exc.reason)
            return None
        if req.fleet != self.fleet:
            log.warning("refused the sum of round %d: fleet %s, not %s",
                        req.round_id, req.fleet, self.fleet)
            return None
        key = f"{req.epoch}/{req.round_id}"
        seen = self.done.get(key)
        if seen is not None and seen != req.digest:
            log.error(
                "refused a second, different sum for round %d (epoch %s): one decryption per "
                "round (a differencing attack would need two)", req.round_id, req.epoch,
            )
            return None
        if req.count < self.min_updates:
            log.warning("refused the sum of round %d: %d update(s), at least %d required",
                        req.round_id, req.count, self.min_updates)
            return None
        if seen is not None and key in self._answers:
            return self._answers[key]
        try:
            answer = self._decrypt(req)
        except (FedmqError, ValueError) as exc:
            log.warning("refused the sum of round %d: %s", req.round_id, exc)
            return None
        self.done[key] = req.digest
        atomic_write(self.state_path, json.dumps(self.done, sort_keys=True).encode())
        self._answers = {key: answer}
        log.info("decrypted the sum of round %d (epoch %s): %d update(s), weight %g",
                 req.round_id, req.epoch, req.count, req.total_weight)
        return answer

    def _decrypt(self, req: SumRequest) -> bytes:
        values = sum(math.prod(s) for s in req.shapes.values())
        sizes = self.he.batch_sizes(values)
        if len(sizes) != len(req.ciphertexts):
            raise ValueError(f"{len(req.ciphertexts)} ciphertexts for {values} values")
        vectors = [read_ciphertext(self.he, c, n, f"ciphertext {i}")
                   for i, (c, n) in enumerate(zip(req.ciphertexts, sizes, strict=True))]
        flat = decrypt_flat(self.he, vectors) / req.total_weight
        mean = unflatten(flat, req.shapes)
        return MeanResult(req.fleet, req.epoch, req.round_id, req.count, req.total_weight,
                          req.digest, mean).encode()


