"""Compressed downlink: the global model as a codec-encoded delta against a version the
device holds, with a periodic full snapshot (docs/protocol.md, "Compressed downlink").

The pure logic both sides share:

- :func:`encode_step` (aggregator): the delta from the published version to the strategy's
  new weights, plus the server's error-feedback residual, encoded with a registered codec;
  returns the tensors, the weights a device rebuilds from them (they become the global
  model) and the new residual.
- :func:`apply_delta` (aggregator and device): ``base + decode(delta)``, tensor by tensor,
  in float32, after the codec's checks against the model. Both sides run this very function
  on the same float32 inputs, so they hold the same bits.
- :func:`plan_fetch` (device): from a :class:`~fedmq.wire.ModelIndex` and the version held,
  the cheaper of the chain of deltas from it and the snapshot plus its following deltas.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.chunks import chunk_wildcard
from fedmq.errors import ConfigError, RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.topics import Topics
from fedmq.update.codecs import codec_names, get_codec
from fedmq.update.codecs.topk import FRACTION_PARAM
from fedmq.wire import ModelIndex

__all__ = [
    "DEFAULT_DOWNLINK_FRACTION",
    "DEFAULT_SNAPSHOT_EVERY",
    "DOWNLINK_FULL",
    "DeltaStep",
    "DownlinkSettings",
    "FetchPlan",
    "apply_delta",
    "check_downlink_settings",
    "delta_topic",
    "delta_version_of",
    "downlink_modes",
    "downlink_topics",
    "encode_step",
    "plan_fetch",
    "snapshot_topic",
]

DOWNLINK_FULL = "full"
DEFAULT_SNAPSHOT_EVERY = 10
DEFAULT_DOWNLINK_FRACTION = 0.1

Weights = Mapping[str, np.ndarray]
Shapes = Mapping[str, tuple[int, ...]]


def downlink_modes() -> tuple[str, ...]:
    """``full`` (the whole float32 model every version) or a registered codec's name."""
    return (DOWNLINK_FULL, *codec_names())


def check_downlink_settings(
    mode: str, snapshot_every: int, window: int, fraction: float
) -> None:
    """Raise :class:`ConfigError` naming the bad aggregator key."""
    if mode not in downlink_modes():
        raise ConfigError(f"downlink must be one of {downlink_modes()}, got {mode!r}")
    for name, value in (("snapshot_every", snapshot_every), ("downlink_window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise ConfigError(f"{name} must be an integer in [1, 1000], got {value!r}")
    if window < snapshot_every:
        raise ConfigError(
            f"downlink_window ({window}) must be >= snapshot_every ({snapshot_every}): every "
            "delta after the latest snapshot stays retained"
        )
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not (
        0 < fraction <= 1
    ):
        raise ConfigError(f"downlink_fraction must be in (0, 1], got {fraction!r}")


def snapshot_topic(topics: Topics) -> str:
    """Where the latest full snapshot is retained (a ``model`` message)."""
    return f"{topics.model}/snapshot"


def delta_topic(topics: Topics, version: int) -> str:
    """Where the delta that makes ``version`` (from ``version - 1``) is retained."""
    return f"{topics.model}/delta/{version}"


def downlink_topics(topics: Topics) -> tuple[str, ...]:
    """The topic filters of the snapshot and the deltas, chunk topics included (ACLs)."""
    snap, deltas = snapshot_topic(topics), f"{topics.model}/delta/+"
    return (snap, chunk_wildcard(snap), deltas, chunk_wildcard(deltas))


def delta_version_of(topics: Topics, topic: str) -> int | None:
    """The version of a delta topic of this fleet (not its chunk topics), else None."""
    head = f"{topics.model}/delta/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head):]
    if not rest.isdigit() or len(rest) > 18:
        return None
    return int(rest)


def apply_delta(
    base: Weights, tensors: Iterable[Tensor], codec: str, shapes: Shapes
) -> dict[str, np.ndarray]:
    """``base + decode(tensor)`` for every tensor of the model, in float32 (a new dict in
    ``shapes`` order). Raises :class:`WireError` (shape_mismatch, bad_codec, non_finite)
    when a tensor is missing, extra, of another shape or codec, or the sum is not finite."""
    c = get_codec(codec)
    by_name: dict[str, Tensor] = {}
    for t in tensors:
        if t.name in by_name:
            raise WireError(f"delta names tensor {t.name!r} twice", RejectReason.SHAPE)
        by_name[t.name] = t
    if set(by_name) != set(shapes):
        raise WireError(
            f"delta holds tensors {sorted(by_name)}, the model has {sorted(shapes)}",
            RejectReason.SHAPE,
        )
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        t = by_name[name]
        c.validate(t, tuple(shape))
        held = base[name]
        if held.dtype != np.float32 or tuple(held.shape) != tuple(shape):
            raise WireError(f"base tensor {name!r} is not float32 of shape {list(shape)}",
                            RejectReason.SHAPE)
        values = np.add(held, c.decode(t).reshape(shape), dtype=np.float32)
        if not np.isfinite(values).all():
            raise WireError(f"delta makes tensor {name!r} non-finite", RejectReason.NON_FINITE)
        out[name] = values
    return out


@dataclass(frozen=True)
class DownlinkSettings:
    """The aggregator's downlink keys (validated by :func:`check_downlink_settings`)."""

    mode: str
    snapshot_every: int
    window: int
    fraction: float
    max_message_bytes: int
    seed: int


@dataclass(frozen=True)
class DeltaStep:
    """One downlink step: the wire tensors, the weights devices rebuild, the new residual."""

    tensors: tuple[Tensor, ...]
    weights: dict[str, np.ndarray]
    residual: dict[str, np.ndarray]


def encode_step(
    codec: str,
    base: Weights,
    target: Weights,
    residual: Weights | None,
    rng: np.random.Generator,
    shapes: Shapes,
    fraction: float = DEFAULT_DOWNLINK_FRACTION,
) -> DeltaStep:
    """Encode ``target - base + residual`` (server-side error feedback: what earlier deltas
    did not carry is sent later) and rebuild the weights from the encoding exactly as a
    device does (:func:`apply_delta`); the residual is what this delta did not carry."""
    wanted: dict[str, np.ndarray] = {}
    for name in shapes:
        d = np.subtract(target[name], base[name], dtype=np.float32)
        if residual and name in residual:
            d = np.add(d, residual[name], dtype=np.float32)
        wanted[name] = d
    c = get_codec(codec).configure({FRACTION_PARAM: fraction})
    tensors = c.encode(wanted, rng, None).tensors
    weights = apply_delta(base, tensors, codec, shapes)
    new_residual = {
        n: np.subtract(wanted[n], np.subtract(weights[n], base[n], dtype=np.float32),
                       dtype=np.float32)
        for n in shapes
    }
    return DeltaStep(tuple(tensors), weights, new_residual)


@dataclass(frozen=True)
class FetchPlan:
    """What a device fetches to reach the index's version: the snapshot (or not: then it
    starts from the version it holds) and the deltas, in order; ``bytes`` is their size."""

    snapshot: bool
    deltas: tuple[int, ...]
    bytes: int


def plan_fetch(index: ModelIndex, held: int | None) -> FetchPlan | None:
    """The smaller of the chain of deltas from ``held`` (when it is older than the index's
    version and every delta is listed) and the snapshot with the deltas after it; None when
    ``held`` is already the index's version (or newer)."""
    if held is not None and held >= index.version:
        return None
    sizes = dict(index.deltas)
    after_snapshot = tuple(range(index.snapshot_version + 1, index.version + 1))
    via_snapshot = FetchPlan(
        True, after_snapshot, index.snapshot_bytes + sum(sizes[v] for v in after_snapshot)
    )
    if held is None:
        return via_snapshot
    chain = tuple(range(held + 1, index.version + 1))
    if all(v in sizes for v in chain):
        by_chain = FetchPlan(False, chain, sum(sizes[v] for v in chain))
        if by_chain.bytes <= via_snapshot.bytes:
            return by_chain
    return via_snapshot
