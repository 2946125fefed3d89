"""How the aggregator publishes each model version (config key ``downlink``).

``full`` (the default): the whole float32 model, retained on ``fl/<fleet>/model``, as before.

A codec name (``int8``, ``int4``, ``topk-int8``, ...): compressed downlink
(docs/protocol.md, "Compressed downlink"). Each new version travels as a delta from the
previous one (:func:`fedmq.downlink.encode_step`, server-side error feedback), retained on
``fl/<fleet>/model/delta/<version>``; every ``snapshot_every`` versions the full model is
retained on ``fl/<fleet>/model/snapshot``; the model topic holds a small
:class:`~fedmq.wire.ModelIndex`. The weights devices rebuild from the deltas *are* the
global model: :meth:`Downlink.stage` hands them to the coordinator, which evaluates,
stores and trains on them, so the server's copy and the devices' never drift.

What is published lives under ``<state_dir>/downlink/`` (the snapshot and every retained
delta as the exact payloads sent, the residual, ``state.json``), so a restart republishes
the same bytes. Deltas older than ``downlink_window`` versions are deleted and their
retained topics (and chunk topics) cleared with an empty retained payload.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aggregator.outgoing import Outgoing, RoundTraffic
from fedmq.chunks import publications
from fedmq.downlink import (
    DOWNLINK_FULL,
    DownlinkSettings,
    delta_topic,
    encode_step,
    snapshot_topic,
)
from fedmq.errors import WireError
from fedmq.fsutil import atomic_write
from fedmq.topics import Topics
from fedmq.update.codecs import pack_state, unpack_state
from fedmq.wire import ModelDelta, ModelIndex, decode_model, decode_model_index, encode

__all__ = ["Downlink", "Staged", "index_facts"]

log = logging.getLogger(__name__)

_DELTA_PREFIX = "delta-"


@dataclass(frozen=True)
class Staged:
    """A new version ready to store: the weights to store and publish (what devices will
    rebuild), and, with a compressed downlink, its delta payload and the new residual."""

    version: int
    round_id: int
    weights: dict[str, np.ndarray]
    delta: bytes | None = None
    residual: dict[str, np.ndarray] | None = None


class Downlink:
    """Publishes model versions in the configured downlink mode (see the module docstring)."""

    def __init__(
        self,
        settings: DownlinkSettings,
        root: Path,
        topics: Topics,
        shapes: Mapping[str, tuple[int, ...]],
        fleet: str,
        model_id: str,
        traffic: RoundTraffic,
    ) -> None:
        self.settings = settings
        self.dir = root / "downlink"
        self.topics = topics
        self.shapes = dict(shapes)
        self.fleet = fleet
        self.model_id = model_id
        self.traffic = traffic

    @property
    def full(self) -> bool:
        return self.settings.mode == DOWNLINK_FULL

    # ------------------------------------------------------------------ new versions
    def stage(
        self,
        version: int,
        round_id: int,
        base: Mapping[str, np.ndarray],
        target: dict[str, np.ndarray],
        epoch: str,
        now: float,
    ) -> Staged:
        """The strategy proposed ``target`` for ``version``; what will be stored and sent.
        Nothing changes on disk until :meth:`publish`."""
        if self.full:
            return Staged(version, round_id, target)
        s = self.settings
        try:
            step = encode_step(
                s.mode, base, target, self._residual(),
                np.random.default_rng([s.seed, version]), self.shapes, s.fraction,
            )
        except WireError as exc:  # e.g. a non-finite candidate: the guard refuses it next
            log.warning("version %d cannot be sent as a %s delta (%s): it would go out as "
                        "a snapshot", version, s.mode, exc.reason)
            return Staged(version, round_id, target)
        delta = encode(ModelDelta(
            fleet=self.fleet, version=version, base_version=version - 1, round_id=round_id,
            model_id=self.model_id, codec=s.mode, tensors=step.tensors, created_at=now,
            epoch=epoch,
        ))
        return Staged(version, round_id, step.weights, delta, step.residual)

    def bytes_per_device(self, staged: Staged, model_payload: bytes, epoch: str,
                         now: float) -> int:
        """What a device holding the previous version downloads for ``staged``: the model
        (``full``) or the index and the delta (exactly what :meth:`publish` will send)."""
        if self.full or staged.delta is None:
            return len(model_payload)  # (with a compressed downlink: a snapshot, see publish)
        planned = self._planned(staged, model_payload, epoch, now)
        if planned is None:  # starts over from a snapshot: the index and the snapshot
            return len(model_payload)
        return len(planned[0]) + len(staged.delta)

    def _planned(
        self, staged: Staged, model_payload: bytes, epoch: str, now: float
    ) -> tuple[bytes, int] | None:
        """(index payload, snapshot version) once ``staged`` is out; None when there is no
        downlink state of the previous version to build on."""
        assert staged.delta is not None
        state = self._state()
        if state is None or state.get("epoch") != epoch or (
            state.get("version") != staged.version - 1
        ):
            return None
        snap_version, snap_bytes = self._next_snapshot(staged.version, state)
        if snap_version == staged.version:
            snap_bytes = len(model_payload)
        deltas = self._deltas_after(staged.version, {staged.version: len(staged.delta)})
        model = decode_model(model_payload)
        index = self._index(staged.version, model.round_id, model.metrics, epoch, now,
                            snap_version, snap_bytes, deltas)
        return index, snap_version

    def publish(self, staged: Staged, model_payload: bytes, epoch: str,
                now: float) -> list[Outgoing]:
        """After the version is stored: persist and publish it (``model_payload`` is the
        full model message of ``staged.weights``, its metrics are the index's)."""
        if self.full:
            self.traffic.metrics.downlink_bytes.set(len(model_payload))
            return [self.traffic.emit(self.topics.model, model_payload)]
        planned = (None if staged.delta is None
                   else self._planned(staged, model_payload, epoch, now))
        if planned is None or staged.delta is None:
            # No downlink state of the previous version (first version in this mode, a new
            # epoch, or a crash between the store and this method): start from a snapshot.
            return self.current(staged.version, model_payload, epoch, now)
        index, snap_version = planned
        self.dir.mkdir(parents=True, exist_ok=True)
        out: list[Outgoing] = []
        atomic_write(self._delta_path(staged.version), staged.delta)
        out.append(self.traffic.emit(delta_topic(self.topics, staged.version), staged.delta))
        if snap_version == staged.version:
            atomic_write(self.dir / "snapshot.bin", model_payload)
            out.append(self.traffic.emit(snapshot_topic(self.topics), model_payload))
        if staged.residual is not None:
            atomic_write(self.dir / "residual.bin", pack_state(staged.residual))
        self._write_state(staged.version, snap_version, epoch)
        self.traffic.metrics.downlink_bytes.set(len(index) + len(staged.delta))
        out.append(self.traffic.emit(self.topics.model, index))
        out += self._prune(staged.version)
        return out

    # ------------------------------------------------------------------ (re)publishing
    def current(self, version: int, model_payload: bytes, epoch: str,
                now: float) -> list[Outgoing]:
        """The retained state to (re)publish at start and on every reconnect. When the
        stored downlink state is not this version's (or epoch's), it starts over from a
        snapshot of ``model_payload`` and clears the deltas it held."""
        if self.full:
            self.traffic.metrics.downlink_bytes.set(len(model_payload))
            return [self.traffic.emit(self.topics.model, model_payload)]
        state = self._state()
        snapshot = self.dir / "snapshot.bin"
        out: list[Outgoing] = []
        if (
            state is None or state.get("version") != version or state.get("epoch") != epoch
            or not snapshot.is_file()
        ):
            self.dir.mkdir(parents=True, exist_ok=True)
            out += self._prune(None)
            (self.dir / "residual.bin").unlink(missing_ok=True)
            atomic_write(snapshot, model_payload)
            self._write_state(version, version, epoch)
            state = self._state()
            log.info("downlink %s: snapshot of version %d", self.settings.mode, version)
        snap_payload = snapshot.read_bytes()
        out.append(self.traffic.emit(snapshot_topic(self.topics), snap_payload))
        deltas = self._deltas_after(version, {})
        for v, _ in deltas:
            out.append(self.traffic.emit(delta_topic(self.topics, v),
                                         self._delta_path(v).read_bytes()))
        snap = (state or {}).get("snapshot_version")
        model = decode_model(model_payload)
        index = self._index(version, model.round_id, model.metrics, epoch, now,
                            snap if isinstance(snap, int) else version, len(snap_payload),
                            deltas)
        self.traffic.metrics.downlink_bytes.set(len(index) + dict(deltas).get(version, 0))
        out.append(self.traffic.emit(self.topics.model, index))
        return out

    # ------------------------------------------------------------------ helpers
    def _residual(self) -> dict[str, np.ndarray] | None:
        path = self.dir / "residual.bin"
        if not path.is_file():
            return None
        try:
            state = unpack_state(path.read_bytes())
        except WireError as exc:
            log.warning("downlink residual %s is damaged (%s): starting without", path, exc)
            return None
        if {k: tuple(v.shape) for k, v in state.items()} != self.shapes:
            return None
        return dict(state)

    def _state(self) -> dict[str, object] | None:
        try:
            raw = json.loads((self.dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def _write_state(self, version: int, snapshot_version: int, epoch: str) -> None:
        data = {"version": version, "snapshot_version": snapshot_version, "epoch": epoch,
                "mode": self.settings.mode}
        atomic_write(self.dir / "state.json", json.dumps(data).encode())

    def _next_snapshot(self, version: int, state: Mapping[str, object] | None) -> tuple[int, int]:
        """(snapshot version, its bytes or 0 when not yet written) once ``version`` is out."""
        last = state.get("snapshot_version") if state else None
        if not isinstance(last, int) or version - last >= self.settings.snapshot_every:
            return version, 0
        path = self.dir / "snapshot.bin"
        return last, path.stat().st_size if path.is_file() else 0

    def _delta_path(self, version: int) -> Path:
        return self.dir / f"{_DELTA_PREFIX}{version}.bin"

    def _held_deltas(self) -> dict[int, int]:
        out: dict[int, int] = {}
        if not self.dir.is_dir():
            return out
        for p in self.dir.iterdir():
            stem = p.name.removeprefix(_DELTA_PREFIX).removesuffix(".bin")
            if p.name.startswith(_DELTA_PREFIX) and p.name.endswith(".bin") and stem.isdigit():
                out[int(stem)] = p.stat().st_size
        return out

    def _deltas_after(self, version: int, extra: Mapping[int, int]) -> list[tuple[int, int]]:
        """The retained deltas once ``version`` is out: within the window, in order."""
        held = {**self._held_deltas(), **extra}
        low = version - self.settings.window
        return sorted((v, n) for v, n in held.items() if low < v <= version)

    def _index(
        self, version: int, round_id: int, metrics: Mapping[str, float], epoch: str,
        now: float, snap_version: int, snap_bytes: int, deltas: list[tuple[int, int]],
    ) -> bytes:
        return encode(ModelIndex(
            fleet=self.fleet, version=version, round_id=round_id, model_id=self.model_id,
            codec=self.settings.mode, snapshot_version=snap_version, snapshot_bytes=snap_bytes,
            deltas=tuple(deltas), metrics=dict(metrics), created_at=now, epoch=epoch,
        ))

    def _prune(self, version: int | None) -> list[Outgoing]:
        """Delete the deltas that left the window (all of them when ``version`` is None)
        and clear their retained topics, chunk topics included."""
        out: list[Outgoing] = []
        low = -1 if version is None else version - self.settings.window
        for v in sorted(self._held_deltas()):
            if version is not None and v > low:
                continue
            path = self._delta_path(v)
            topic = delta_topic(self.topics, v)
            for pub in publications(topic, path.read_bytes(), True,
                                    self.settings.max_message_bytes):
                out.append(self.traffic.emit(pub.topic, b""))
            path.unlink()
        return out


def index_facts(payload: bytes) -> tuple[str, str, int, int] | None:
    """(fleet, epoch, version, round) of a retained model index, None when it is not one."""
    try:
        idx = decode_model_index(payload)
    except WireError:
        return None
    return idx.fleet, idx.epoch, idx.version, idx.round_id
