"""The on-disk outbox: finished updates waiting for the aggregator's ack.

An update is written (atomically, one file per update) **before** it is published and
removed when the aggregator accepts it (or answers ``duplicate``: it already has it). After a
crash, a restart or a lost connection the pending updates are re-sent with the same update
id while their round is still open; updates of rounds that are no longer current are
dropped. A file is a msgpack map ``{v, round, update_id, written_at, payload}`` where
``payload`` is the encoded :class:`fedmq.wire.UpdateMessage`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from fedmq.errors import StateError
from fedmq.fsutil import atomic_write

__all__ = ["OUTBOX_SUFFIX", "Outbox", "OutboxEntry"]

log = logging.getLogger(__name__)

OUTBOX_SUFFIX = ".update"
_FORMAT = 1
_UPDATE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_FILE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class OutboxEntry:
    """One stored update."""

    round_id: int
    update_id: str
    payload: bytes
    written_at: float
    path: Path


class Outbox:
    """A directory of pending updates (thread-safe)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create outbox {self.dir}: {exc}") from exc
        self._lock = threading.Lock()
        self._clean_temp_files()

    def _clean_temp_files(self) -> None:
        """Temp files of writes a crash interrupted are garbage: the update was never sent."""
        for tmp in self.dir.glob(".*.tmp"):
            log.info("outbox: removing interrupted write %s", tmp.name)
            tmp.unlink(missing_ok=True)

    def _path(self, round_id: int, update_id: str) -> Path:
        return self.dir / f"r{round_id:012d}-{update_id}{OUTBOX_SUFFIX}"

    def put(self, round_id: int, update_id: str, payload: bytes) -> OutboxEntry:
        """Store an update durably (returns once it is on disk)."""
        if not _UPDATE_ID.match(update_id):
            raise ValueError(f"update id {update_id!r} is not file-name safe")
        if round_id < 0:
            raise ValueError(f"round id must be >= 0, got {round_id}")
        written_at = time.time()
        blob = msgpack.packb(
            {
                "v": _FORMAT,
                "round": round_id,
                "update_id": update_id,
                "written_at": written_at,
                "payload": bytes(payload),
            },
            use_bin_type=True,
        )
        path = self._path(round_id, update_id)
        with self._lock:
            try:
                atomic_write(path, blob)
            except OSError as exc:
                raise StateError(f"cannot write outbox file {path}: {exc}") from exc
        log.debug("outbox: stored update %s of round %d (%d bytes)", update_id, round_id,
                  len(payload))
        return OutboxEntry(round_id, update_id, bytes(payload), written_at, path)

    def _read(self, path: Path) -> OutboxEntry | None:
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise ValueError("file too large")
            obj = msgpack.unpackb(path.read_bytes(), raw=False)
            if not isinstance(obj, dict) or obj.get("v") != _FORMAT:
                raise ValueError("unknown format")
            round_id, update_id = obj["round"], obj["update_id"]
            payload, written_at = obj["payload"], obj["written_at"]
            if not (isinstance(round_id, int) and isinstance(update_id, str)
                    and isinstance(payload, bytes) and isinstance(written_at, int | float)):
                raise ValueError("bad field types")
        except FileNotFoundError:
            return None
        except Exception as exc:  # corrupt file: keep it aside for a person to look at
            bad = path.with_name(path.name + ".corrupt")
            log.error("outbox: unreadable file %s (%s); moved to %s", path.name, exc, bad.name)
            with contextlib.suppress(OSError):
                path.replace(bad)
            return None
        return OutboxEntry(round_id, update_id, payload, float(written_at), path)

    def pending(self) -> list[OutboxEntry]:
        """Stored updates, oldest round first."""
        with self._lock:
            paths = sorted(self.dir.glob(f"r*{OUTBOX_SUFFIX}"))
            return [e for e in (self._read(p) for p in paths) if e is not None]

    def get(self, update_id: str) -> OutboxEntry | None:
        for entry in self.pending():
            if entry.update_id == update_id:
                return entry
        return None

    def remove(self, update_id: str) -> bool:
        """Delete the update with this id; False when it is not (or no longer) stored."""
        if not _UPDATE_ID.match(update_id):
            return False
        with self._lock:
            for path in self.dir.glob(f"r*-{update_id}{OUTBOX_SUFFIX}"):
                path.unlink(missing_ok=True)
                return True
        return False

    def drop_stale(self, current_round: int) -> list[OutboxEntry]:
        """Remove the updates of every round other than ``current_round``; returns them."""
        dropped = []
        for entry in self.pending():
            if entry.round_id == current_round:
                continue
            with self._lock:
                entry.path.unlink(missing_ok=True)
            log.info(
                "outbox: dropping unacknowledged update %s of round %d: the current round is %d",
                entry.update_id, entry.round_id, current_round,
            )
            dropped.append(entry)
        return dropped

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for _ in self.dir.glob(f"r*{OUTBOX_SUFFIX}"))
