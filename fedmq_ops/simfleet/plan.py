"""What a simulated fleet does, as pure functions of a seed: device ids, arrivals, dropouts,
example counts, update ids, signing keys and the synthetic deltas.

Every choice is a deterministic function of ``(seed, device, round)``, so a resend rebuilds
the same bytes (no payload is kept per device), any process of a sharded fleet agrees with
the others without talking to them, and a test can recompute exactly what the fleet sent
(:meth:`FleetPlan.encoded_delta`) and so the model the aggregator must publish.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from fedmq.errors import ConfigError
from fedmq.signing import DeviceKey
from fedmq.tensor import Tensor
from fedmq.topics import validate_name
from fedmq.update import codecs

__all__ = ["ARRIVALS", "Arrival", "FleetPlan"]

ARRIVALS = ("at-once", "spread")


@dataclass(frozen=True)
class Arrival:
    """When a device sends after its round opens: ``at-once`` (as soon as it can) or
    ``spread`` (uniformly over ``window`` seconds, a fixed offset per device and round)."""

    kind: str = "at-once"
    window: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVALS:
            raise ConfigError(f"arrival must be one of {ARRIVALS}, got {self.kind!r}")
        if not (math.isfinite(self.window) and self.window >= 0):
            raise ConfigError(f"arrival window must be >= 0 seconds, got {self.window}")
        if self.kind == "spread" and self.window <= 0:
            raise ConfigError("arrival 'spread' needs a window: spread:SECONDS")

    @classmethod
    def parse(cls, text: str) -> Arrival:
        """``at-once`` or ``spread:SECONDS``."""
        kind, _, window = text.partition(":")
        if kind == "at-once" and not window:
            return cls("at-once")
        if kind == "spread":
            try:
                return cls("spread", float(window))
            except ValueError:
                pass
        raise ConfigError(f"arrival {text!r}: expected 'at-once' or 'spread:SECONDS'")

    def __str__(self) -> str:
        return self.kind if self.kind == "at-once" else f"spread:{self.window:g}"


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *parts])


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass(frozen=True)
class FleetPlan:
    """A fleet of ``devices`` identities named ``<name>-00000`` ...

    ``dropout`` is the fraction of the fleet that does not send in a round: exactly
    ``round(dropout * devices)`` devices, a fresh seeded choice per round. ``examples`` is
    the inclusive range the claimed example counts are drawn from; ``delta_scale`` the
    standard deviation of the synthetic deltas.
    """

    devices: int
    seed: int = 0
    name: str = "sim"
    dropout: float = 0.0
    arrival: Arrival = field(default_factory=Arrival)
    examples: tuple[int, int] = (16, 48)
    delta_scale: float = 0.01

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= 1_000_000:
            raise ConfigError(f"devices must be 1..1000000, got {self.devices}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        lo, hi = self.examples
        if not 1 <= lo <= hi:
            raise ConfigError(f"examples range {lo}..{hi} must satisfy 1 <= lo <= hi")
        if not (math.isfinite(self.delta_scale) and self.delta_scale > 0):
            raise ConfigError("delta_scale must be > 0")
        validate_name(self.device_id(self.devices - 1), "device")

    # ------------------------------------------------------------------ identities
    def device_id(self, index: int) -> str:
        return f"{self.name}-{index:05d}"

    def device_ids(self) -> list[str]:
        return [self.device_id(i) for i in range(self.devices)]

    def shard(self, index: int, count: int) -> list[str]:
        """The devices process ``index`` of ``count`` runs (every count-th device)."""
        if not 0 <= index < count:
            raise ConfigError(f"shard {index} of {count} does not exist")
        return [self.device_id(i) for i in range(index, self.devices, count)]

    def key(self, device: str) -> DeviceKey:
        """The device's Ed25519 key, derived from the seed (a simulator's keys are not
        secrets: anyone with the seed can sign as the simulated devices)."""
        seed = hashlib.sha256(f"fedmq-simfleet/{self.seed}/{device}".encode()).digest()
        return DeviceKey.from_seed(seed)

    # ------------------------------------------------------------------ per round
    def dropped(self, round_id: int) -> frozenset[str]:
        """The devices that do not send in ``round_id``."""
        return _dropped(self.seed, self.devices, self.dropout, round_id, self.name)

    def senders(self, round_id: int, devices: Sequence[str] | None = None) -> list[str]:
        """The devices (of ``devices``, default all) that send in ``round_id``."""
        gone = self.dropped(round_id)
        return [d for d in (devices if devices is not None else self.device_ids())
                if d not in gone]

    def offset(self, device: str, round_id: int) -> float:
        """Seconds after the round opened at which ``device`` sends."""
        if self.arrival.kind == "at-once":
            return 0.0
        return float(_rng(self.seed, _crc(device), round_id, 1).uniform(0, self.arrival.window))

    def num_examples(self, device: str, round_id: int) -> int:
        lo, hi = self.examples
        return int(_rng(self.seed, _crc(device), round_id, 2).integers(lo, hi + 1))

    def update_id(self, device: str, epoch: str, round_id: int) -> str:
        raw = f"{self.seed}/{device}/{epoch}/{round_id}".encode()
        return hashlib.sha256(raw).hexdigest()[:32]

    def synthetic_delta(
        self, device: str, round_id: int, shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, np.ndarray]:
        """A float32 delta of the model's shapes: N(0, delta_scale), seeded per device and
        round."""
        rng = _rng(self.seed, _crc(device), round_id, 3)
        return {
            name: rng.standard_normal(shape, dtype=np.float32) * np.float32(self.delta_scale)
            for name, shape in shapes.items()
        }

    def encoded_delta(
        self, device: str, round_id: int, shapes: Mapping[str, tuple[int, ...]], codec: str
    ) -> tuple[Tensor, ...]:
        """The wire tensors the device sends: its synthetic delta through the round's
        (stateless) codec, with a seeded rounding generator."""
        delta = self.synthetic_delta(device, round_id, shapes)
        return codecs.encode_delta(delta, codec, _rng(self.seed, _crc(device), round_id, 4))

    def expected_mean(
        self,
        devices: Sequence[str],
        round_id: int,
        shapes: Mapping[str, tuple[int, ...]],
        codec: str,
    ) -> dict[str, np.ndarray]:
        """The example-weighted mean of what ``devices`` send in ``round_id`` (decoded as
        the aggregator decodes it), in float64: FedAvg's model moves by exactly this."""
        total = {n: np.zeros(s, np.float64) for n, s in shapes.items()}
        weight = 0
        for d in devices:
            n = self.num_examples(d, round_id)
            for t in self.encoded_delta(d, round_id, shapes, codec):
                total[t.name] += n * codecs.decode_tensor(t, codec).astype(np.float64)
            weight += n
        return {k: v / max(weight, 1) for k, v in total.items()}


@lru_cache(maxsize=8)
def _dropped(seed: int, devices: int, dropout: float, round_id: int, name: str) -> frozenset[str]:
    count = round(dropout * devices)
    if count == 0:
        return frozenset()
    picks = _rng(seed, round_id, 5).choice(devices, size=count, replace=False)
    return frozenset(f"{name}-{int(i):05d}" for i in picks)
