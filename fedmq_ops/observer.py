"""One read-only MQTT observer of a fleet's retained topics, for every operator tool.

:class:`FleetObserver` subscribes to ``status/+``, ``round`` and ``model`` of one fleet and
keeps what they say in a :class:`FleetView`: the retained messages give the picture at
once, later ones update it. ``fedmq status`` renders the view; the local fleet runner
(``fedmq demo`` / ``experiment``) waits on model versions and hooks ``on_model`` and
``on_status`` to record rounds and device memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedmq import wire
from fedmq.chunks import Reassembler, ReassemblyLimits, chunk_wildcard, is_manifest, transfer_id
from fedmq.errors import FedmqError
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.topics import Topics

__all__ = ["FleetObserver", "FleetView", "OnModel", "OnStatus"]

log = logging.getLogger(__name__)

# Called from the MQTT thread, under the view's lock: (model, payload bytes) for each newer
# model version, and each decoded status.
OnModel = Callable[[wire.ModelMessage, int], None]
OnStatus = Callable[[wire.StatusMessage], None]


@dataclass
class FleetView:
    """What the status, round and model topics say (written by the MQTT thread under
    ``lock``; ``changed`` is notified after every accepted message)."""

    devices: dict[str, wire.StatusMessage] = field(default_factory=dict)
    round: wire.RoundAnnouncement | None = None
    round_bytes: int = 0
    model: wire.ModelMessage | None = None
    model_bytes: int = 0
    bad_messages: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    @property
    def version(self) -> int:
        """The newest model version seen; -1 before any."""
        return -1 if self.model is None else self.model.version


class FleetObserver:
    """A read-only MQTT client following one fleet's retained topics into :attr:`view`."""

    def __init__(
        self,
        settings: MqttSettings,
        topics: Topics,
        on_model: OnModel | None = None,
        on_status: OnStatus | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.view = FleetView()
        self._on_model = on_model
        self._on_status = on_status
        self._chunks = Reassembler(ReassemblyLimits(remember_expired=0))  # the model's
        self.client = make_client(settings)
        self.client.on_connect = self._subscribe
        self.client.on_message = lambda _c, _u, msg: self.apply(msg.topic, bytes(msg.payload))

    def start(self) -> FleetObserver:
        """Connect (a FedmqError naming the broker when it cannot be reached) and follow."""
        try:
            connect(self.client, self.settings, asynchronous=False)
        except OSError as exc:
            raise FedmqError(
                f"cannot reach the broker at {self.settings.host}:{self.settings.port}: {exc}"
            ) from exc
        self.client.loop_start()
        return self

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> FleetObserver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _subscribe(self, client: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        t = self.topics
        client.subscribe([
            (t.status_wildcard, 1), (t.round, 1), (t.model, 1), (chunk_wildcard(t.model), 1),
        ])

    def apply(self, topic: str, payload: bytes) -> None:
        """Take one message of the fleet's topics into the view (the MQTT callback)."""
        t, view = self.topics, self.view
        try:
            if topic.startswith(chunk_wildcard(t.model)[:-1]):  # the model, in chunks
                whole = self._chunks.feed("model", payload, time.time()) if payload else None
                if whole is None:
                    return
                self._chunks.finish("model", transfer_id(whole))
                topic, payload = t.model, whole
            if topic == t.model and is_manifest(payload):
                return  # its chunks carry the model
            if topic == t.round:
                # An empty retained round: the aggregator cleared it (the federation is done).
                rnd = wire.decode_round(payload) if payload else None
                with view.lock:
                    view.round, view.round_bytes = rnd, len(payload)
                    view.changed.notify_all()
            elif topic == t.model:
                model, size = _model_view(payload)
                with view.lock:
                    newer = model.version > view.version
                    view.model_bytes = size
                    if newer:
                        view.model = model
                        if self._on_model is not None:
                            self._on_model(model, size)
                    view.changed.notify_all()
            elif t.device_of(topic) is not None and payload:  # empty = retained one cleared
                status = wire.decode_status(payload)
                with view.lock:
                    view.devices[status.device] = status
                    if self._on_status is not None:
                        self._on_status(status)
                    view.changed.notify_all()
        except FedmqError as exc:
            log.warning("ignoring an undecodable message on %s: %s", topic, exc)
            with view.lock:
                view.bad_messages += 1

    def wait_for_version(
        self, version: int, timeout: float, alive: Callable[[], None] = lambda: None
    ) -> None:
        """Block until model ``version`` (or newer) was seen. ``alive`` is called about once
        a second (without the lock) and may raise to give up; after ``timeout`` seconds a
        FedmqError says which version was awaited and which one is there."""
        end = time.monotonic() + timeout
        view = self.view
        with view.lock:
            while view.version < version:
                left = end - time.monotonic()
                if left <= 0:
                    raise FedmqError(
                        f"timed out after {timeout:.0f}s waiting for model version {version} "
                        f"(have {view.version})"
                    )
                view.changed.wait(min(left, 1.0))
                view.lock.release()
                try:
                    alive()
                finally:
                    view.lock.acquire()


def _model_view(payload: bytes) -> tuple[wire.ModelMessage, int]:
    """The model topic's message as a model, and the bytes a device that held the previous
    version downloads for it. With a compressed downlink (a model index) that is the index
    plus the new version's delta, and the model carries the index's facts, no tensors."""
    if wire.message_type(payload) != "model-index":
        return wire.decode_model(payload), len(payload)
    idx = wire.decode_model_index(payload)
    model = wire.ModelMessage(
        fleet=idx.fleet, version=idx.version, round_id=idx.round_id, model_id=idx.model_id,
        tensors=(), metrics=idx.metrics, created_at=idx.created_at, epoch=idx.epoch,
    )
    return model, len(payload) + dict(idx.deltas).get(idx.version, 0)
