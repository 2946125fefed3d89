"""The on-disk outbox: finished updates waiting for the aggregator's answer.

An update is written (atomically, one file per update) **before** it is published and
removed when the aggregator answers it (or when the agent gives up on it). After a crash, a
restart or a lost connection the pending updates are re-sent with the same update id.
A file is a msgpack map ``{v, round, update_id, written_at, payload, epoch, seq,
codec_state}`` where ``payload`` is the encoded (and signed) :class:`fedmq.wire.UpdateMessage`.

Codec state (e.g. an error-feedback residual: what the device's codec still owes after this
update) travels in the same file as its update, so one atomic write stores both. The
device's *current* codec state is committed to ``codec_state`` (also atomically) right
after; if the process dies in between, opening the outbox rolls the newer entry's state
forward. A restart therefore finds either the old state and no entry, or the new entry and
the new state, never a mix. Entries are numbered (``seq``) so "newer" is exact.
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

__all__ = ["CODEC_STATE_FILE", "OUTBOX_SUFFIX", "CodecState", "Outbox", "OutboxEntry"]

log = logging.getLogger(__name__)

OUTBOX_SUFFIX = ".update"
CODEC_STATE_FILE = "codec_state"
_FORMAT = 2
_FORMATS = (1, 2)  # format 1: no epoch, seq or codec state
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
    epoch: str = ""
    seq: int = 0
    codec_state: bytes = b""


@dataclass(frozen=True)
class CodecState:
    """The device's committed codec state: ``blob`` as left by update ``update_id``
    (number ``seq``); empty for stateless codecs and before the first update."""

    seq: int = 0
    update_id: str = ""
    blob: bytes = b""


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
        self._codec_state = self._recover_codec_state()

    def _clean_temp_files(self) -> None:
        """Temp files of writes a crash interrupted are garbage: the update was never sent."""
        for tmp in self.dir.glob(".*.tmp"):
            log.info("outbox: removing interrupted write %s", tmp.name)
            tmp.unlink(missing_ok=True)

    def _path(self, round_id: int, update_id: str) -> Path:
        return self.dir / f"r{round_id:012d}-{update_id}{OUTBOX_SUFFIX}"

    # -------------------------------------------------------------------- codec state
    @property
    def codec_state(self) -> CodecState:
        """The committed codec state (what the next update's codec starts from)."""
        with self._lock:
            return self._codec_state

    def _read_codec_state(self) -> CodecState:
        path = self.dir / CODEC_STATE_FILE
        try:
            obj = msgpack.unpackb(path.read_bytes(), raw=False)
            seq, update_id, blob = obj["seq"], obj["update_id"], obj["state"]
            if not (isinstance(seq, int) and isinstance(update_id, str)
                    and isinstance(blob, bytes)):
                raise ValueError("bad field types")
        except FileNotFoundError:
            return CodecState()
        except Exception as exc:
            raise StateError(f"codec state file {path} is unreadable: {exc}") from exc
        return CodecState(seq, update_id, blob)

    def _commit_codec_state(self, state: CodecState) -> None:
        path = self.dir / CODEC_STATE_FILE
        blob = msgpack.packb(
            {"v": 1, "seq": state.seq, "update_id": state.update_id, "state": state.blob},
            use_bin_type=True,
        )
        try:
            atomic_write(path, blob)
        except OSError as exc:
            raise StateError(f"cannot write codec state {path}: {exc}") from exc
        self._codec_state = state

    def _recover_codec_state(self) -> CodecState:
        committed = self._read_codec_state()
        newest = max(self._pending_unlocked(), key=lambda e: e.seq, default=None)
        if newest is None or newest.seq <= committed.seq:
            return committed
        state = CodecState(newest.seq, newest.update_id, newest.codec_state)
        log.info(
            "outbox: codec state of update %s recovered from its entry (the process stopped "
            "before committing it)", newest.update_id,
        )
        self._commit_codec_state(state)
        return state

    # -------------------------------------------------------------------- entries
    def put(
        self,
        round_id: int,
        update_id: str,
        payload: bytes,
        *,
        epoch: str = "",
        codec_state: bytes = b"",
        written_at: float | None = None,
    ) -> OutboxEntry:
        """Store an update and the codec state it leaves durably (returns once both are on
        disk): one atomic write of the entry, then the codec state is committed."""
        if not _UPDATE_ID.match(update_id):
            raise ValueError(f"update id {update_id!r} is not file-name safe")
        if round_id < 0:
            raise ValueError(f"round id must be >= 0, got {round_id}")
        written_at = time.time() if written_at is None else written_at
        path = self._path(round_id, update_id)
        with self._lock:
            seq = self._codec_state.seq + 1
            blob = msgpack.packb(
                {
                    "v": _FORMAT,
                    "round": round_id,
                    "update_id": update_id,
                    "written_at": written_at,
                    "payload": bytes(payload),
                    "epoch": epoch,
                    "seq": seq,
                    "codec_state": bytes(codec_state),
                },
                use_bin_type=True,
            )
            try:
                atomic_write(path, blob)
            except OSError as exc:
                raise StateError(f"cannot write outbox file {path}: {exc}") from exc
            self._commit_codec_state(CodecState(seq, update_id, bytes(codec_state)))
        log.debug("outbox: stored update %s of round %d (%d bytes)", update_id, round_id,
                  len(payload))
        return OutboxEntry(
            round_id, update_id, bytes(payload), written_at, path, epoch, seq, bytes(codec_state)
        )

    def _read(self, path: Path) -> OutboxEntry | None:
        try:
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise ValueError("file too large")
            obj = msgpack.unpackb(path.read_bytes(), raw=False)
            if not isinstance(obj, dict) or obj.get("v") not in _FORMATS:
                raise ValueError("unknown format")
            round_id, update_id = obj["round"], obj["update_id"]
            payload, written_at = obj["payload"], obj["written_at"]
            epoch, seq = obj.get("epoch", ""), obj.get("seq", 0)
            codec_state = obj.get("codec_state", b"")
            if not (isinstance(round_id, int) and isinstance(update_id, str)
                    and isinstance(payload, bytes) and isinstance(written_at, int | float)
                    and isinstance(epoch, str) and isinstance(seq, int)
                    and isinstance(codec_state, bytes)):
                raise ValueError("bad field types")
        except FileNotFoundError:
            return None
        except Exception as exc:  # corrupt file: keep it aside for a person to look at
            bad = path.with_name(path.name + ".corrupt")
            log.error("outbox: unreadable file %s (%s); moved to %s", path.name, exc, bad.name)
            with contextlib.suppress(OSError):
                path.replace(bad)
            return None
        return OutboxEntry(
            round_id, update_id, payload, float(written_at), path, epoch, seq, codec_state
        )

    def _pending_unlocked(self) -> list[OutboxEntry]:
        paths = sorted(self.dir.glob(f"r*{OUTBOX_SUFFIX}"))
        return [e for e in (self._read(p) for p in paths) if e is not None]

    def pending(self) -> list[OutboxEntry]:
        """Stored updates, oldest round first."""
        with self._lock:
            return self._pending_unlocked()

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

    def __len__(self) -> int:
        with self._lock:
            return sum(1 for _ in self.dir.glob(f"r*{OUTBOX_SUFFIX}"))
