"""The device side of the compressed downlink (docs/protocol.md, "Compressed downlink").

With ``downlink`` set on the aggregator, the model topic holds a
:class:`~fedmq.wire.ModelIndex` instead of the model. :class:`DownlinkReceiver` (no network,
no threads) reads it, plans the cheaper way from the version it holds
(:func:`fedmq.downlink.plan_fetch`: a chain of deltas, or the snapshot and the deltas after
it), says which retained topics to subscribe to (and later to drop), collects what arrives
and rebuilds the model with :func:`fedmq.downlink.apply_delta`, exactly as the aggregator
did. The result is handed to the core as an ordinary model message, so everything the core
does with models (epochs, never stepping back, rounds) is unchanged.

A delta that fails (wrong base version, another shape, NaN, an unknown codec, an overflow)
is refused with one WARNING line and counted; the device then fetches the snapshot instead.
A snapshot path that fails too waits for the next index (one more line).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmq.downlink import (
    FetchPlan,
    apply_delta,
    delta_topic,
    delta_version_of,
    plan_fetch,
    snapshot_topic,
)
from fedmq.errors import Rejected, RejectReason, WireError
from fedmq.tensor import Tensor
from fedmq.topics import Topics
from fedmq.update.codecs import decode_tensor
from fedmq.wire import (
    ModelDelta,
    ModelIndex,
    ModelMessage,
    decode_model,
    decode_model_delta,
    decode_model_index,
    encode,
)

__all__ = ["DownlinkReceiver", "DownlinkStep", "is_index"]

log = logging.getLogger(__name__)

_INDEX_MARK = b"\xa4type\xabmodel-index"


def is_index(payload: bytes) -> bool:
    """Whether a model-topic payload looks like a model index (cheap: no unpacking)."""
    return _INDEX_MARK in bytes(payload[:64])


@dataclass
class DownlinkStep:
    """What the shell does next: topics to subscribe to and to drop (each with its chunk
    topics), bytes received, and a rebuilt model message for the core (or None)."""

    subscribe: list[str] = field(default_factory=list)
    unsubscribe: list[str] = field(default_factory=list)
    model: bytes | None = None
    rejected: int = 0
    # with ``model``: whether it was rebuilt from the snapshot, and how many deltas it took
    from_snapshot: bool = False
    deltas_applied: int = 0


class DownlinkReceiver:
    """Rebuilds the global model from a retained index, snapshot and deltas."""

    def __init__(self, topics: Topics, fleet: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.topics = topics
        self.fleet = fleet
        self.shapes = dict(shapes)
        self.epoch: str | None = None
        self.version: int | None = None
        self.weights: dict[str, np.ndarray] | None = None
        self._index: ModelIndex | None = None
        self._plan: FetchPlan | None = None
        self._snapshot: tuple[int, str, dict[str, np.ndarray]] | None = None
        self._deltas: dict[int, ModelDelta] = {}
        self.subscribed: set[str] = set()
        self.bytes_received = 0

    # ------------------------------------------------------------------ inputs
    def wants(self, topic: str) -> bool:
        """Whether ``topic`` is a snapshot or delta topic this receiver handles."""
        return topic == snapshot_topic(self.topics) or delta_version_of(self.topics, topic) \
            is not None

    def on_connected(self) -> DownlinkStep:
        """A new session (subscriptions may be gone): subscribe again to what is pending."""
        self.subscribed.clear()
        return self._subscriptions()

    def on_index(self, payload: bytes) -> DownlinkStep:
        """A model index arrived on the model topic (raises :class:`WireError` when bad)."""
        idx = decode_model_index(payload)
        if idx.fleet != self.fleet:
            log.warning("ignoring model index for fleet %r", idx.fleet)
            return DownlinkStep()
        self.bytes_received += len(payload)
        if idx.epoch != self.epoch:
            self.epoch, self.version, self.weights = idx.epoch, None, None
            self._snapshot, self._deltas = None, {}
        self._index = idx
        self._plan = plan_fetch(idx, self.version)
        keep = self._plan.deltas if self._plan else ()
        self._deltas = {v: d for v, d in self._deltas.items() if v in keep}
        if self._plan is None:
            return self._subscriptions()
        log.debug("model version %d: fetching %s", idx.version, self._describe(self._plan))
        return self._advance()

    def on_payload(self, topic: str, payload: bytes) -> DownlinkStep:
        """A (reassembled) payload of a snapshot or delta topic."""
        if topic == snapshot_topic(self.topics):
            return self._on_snapshot(payload)
        version = delta_version_of(self.topics, topic)
        if version is None:
            return DownlinkStep()
        return self._on_delta(version, payload)

    # ------------------------------------------------------------------ collecting
    def _on_snapshot(self, payload: bytes) -> DownlinkStep:
        plan, idx = self._plan, self._index
        if not payload or plan is None or idx is None or not plan.snapshot:
            return DownlinkStep()
        self.bytes_received += len(payload)
        try:
            msg = decode_model(payload)
            self._check_origin("snapshot", msg.fleet, msg.epoch, idx.epoch)
            weights = self._full_weights(msg.tensors)
        except Rejected as exc:
            log.warning("refusing the model snapshot: %s (%s); waiting for the next index",
                        exc.reason, exc.code)
            return self._give_up(1)
        if msg.version != idx.snapshot_version:
            return DownlinkStep()  # another snapshot than the index names (a newer one)
        self._snapshot = (msg.version, msg.epoch, weights)
        return self._advance()

    def _on_delta(self, version: int, payload: bytes) -> DownlinkStep:
        plan = self._plan
        if plan is None or version not in plan.deltas:
            return DownlinkStep()
        if not payload:  # cleared: it left the window before we got it
            return self._fall_back(version, "it left the retained window", count=0)
        self.bytes_received += len(payload)
        try:
            delta = decode_model_delta(payload)
            if delta.version != version:
                raise Rejected(f"it names version {delta.version}", RejectReason.WRONG_BASE)
            self._check_origin("it", delta.fleet, delta.epoch,
                               self._index.epoch if self._index else delta.epoch)
        except Rejected as exc:
            return self._fall_back(version, f"{exc.reason} ({exc.code})")
        self._deltas[version] = delta
        return self._advance()

    # ------------------------------------------------------------------ progress
    def _advance(self) -> DownlinkStep:
        """Rebuild the model when everything the plan needs is here."""
        plan, idx = self._plan, self._index
        if plan is None or idx is None:
            return self._subscriptions()
        if plan.snapshot:
            snap = self._snapshot
            if snap is None or snap[0] != idx.snapshot_version:
                return self._subscriptions()
            version, weights = snap[0], snap[2]
        else:
            if self.weights is None or self.version is None:
                return self._subscriptions()
            version, weights = self.version, self.weights
        if any(v not in self._deltas for v in plan.deltas):
            return self._subscriptions()
        for v in plan.deltas:
            delta = self._deltas[v]
            try:
                if delta.base_version != version:
                    raise Rejected(
                        f"its base is version {delta.base_version}, this device rebuilt "
                        f"version {version}", RejectReason.WRONG_BASE,
                    )
                weights = apply_delta(weights, delta.tensors, delta.codec, self.shapes)
            except Rejected as exc:
                return self._fall_back(v, f"{exc.reason} ({exc.code})")
            version = v
        self.version, self.weights = version, weights
        self._plan, self._snapshot, self._deltas = None, None, {}
        step = self._subscriptions()
        step.from_snapshot, step.deltas_applied = plan.snapshot, len(plan.deltas)
        step.model = encode(ModelMessage(
            fleet=self.fleet, version=idx.version, round_id=idx.round_id,
            model_id=idx.model_id,
            tensors=tuple(Tensor.from_array(n, w) for n, w in weights.items()),
            metrics=dict(idx.metrics), created_at=idx.created_at, epoch=idx.epoch,
        ))
        return step

    def _check_origin(self, what: str, fleet: str, epoch: str, want_epoch: str) -> None:
        """A well-formed payload of another fleet or epoch: refused as that (not as bytes)."""
        if fleet != self.fleet:
            raise Rejected(f"{what} is of fleet {fleet!r}", RejectReason.WRONG_FLEET)
        if epoch != want_epoch:
            raise Rejected(f"{what} is of epoch {epoch!r}, the index names {want_epoch!r}",
                           RejectReason.WRONG_ROUND)

    def _fall_back(self, version: int, reason: str, count: int = 1) -> DownlinkStep:
        plan, idx = self._plan, self._index
        assert plan is not None and idx is not None
        if plan.snapshot:
            log.warning(
                "refusing model delta %d: %s; the snapshot path needs it too: waiting for "
                "the next index", version, reason,
            )
            return self._give_up(count)
        log.warning("refusing model delta %d: %s; fetching the snapshot (version %d) instead",
                    version, reason, idx.snapshot_version)
        self._deltas.pop(version, None)
        self._plan = plan_fetch(idx, None)
        step = self._advance()
        step.rejected += count
        return step

    def _give_up(self, count: int) -> DownlinkStep:
        self._plan, self._snapshot, self._deltas = None, None, {}
        step = self._subscriptions()
        step.rejected += count
        return step

    def _subscriptions(self) -> DownlinkStep:
        """Subscribe to what the plan still misses, drop what it no longer needs."""
        wanted: set[str] = set()
        plan, idx = self._plan, self._index
        if plan is not None and idx is not None:
            if plan.snapshot and (self._snapshot is None
                                  or self._snapshot[0] != idx.snapshot_version):
                wanted.add(snapshot_topic(self.topics))
            wanted |= {delta_topic(self.topics, v) for v in plan.deltas if v not in self._deltas}
        step = DownlinkStep(
            subscribe=sorted(wanted - self.subscribed),
            unsubscribe=sorted(self.subscribed - wanted),
        )
        self.subscribed = wanted
        return step

    def _full_weights(self, tensors: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
        by_name = {t.name: t for t in tensors}
        if set(by_name) != set(self.shapes):
            raise WireError(
                f"snapshot holds tensors {sorted(by_name)}, the model has {sorted(self.shapes)}",
                RejectReason.SHAPE,
            )
        out: dict[str, np.ndarray] = {}
        for name, shape in self.shapes.items():
            values = decode_tensor(by_name[name], "float32")
            if tuple(values.shape) != tuple(shape):
                raise WireError(f"snapshot tensor {name!r} has shape {list(values.shape)}",
                                RejectReason.SHAPE)
            out[name] = values
        return out

    @staticmethod
    def _describe(plan: FetchPlan) -> str:
        what = "the snapshot and " if plan.snapshot else ""
        return f"{what}{len(plan.deltas)} delta(s), {plan.bytes} bytes"
