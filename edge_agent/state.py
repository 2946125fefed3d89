"""The device's durable state in its state directory (``state.json``, written atomically).

It holds the device's identity, the rounds it already submitted to (round id -> update id),
the last model version it saw and a few counters. An agent restarted with the same state
directory keeps its identity and never trains twice for one round.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError, StateError
from fedmq.fsutil import atomic_write
from fedmq.topics import validate_name

__all__ = [
    "MAX_REMEMBERED_ROUNDS",
    "STATE_FILE",
    "AgentState",
    "StateStore",
    "atomic_write",
    "default_device_id",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_FORMAT = 1
#: Submissions older than the newest this many rounds are forgotten (rounds never repeat).
MAX_REMEMBERED_ROUNDS = 1000




def default_device_id() -> str:
    """``<hostname>-<6 hex>``, reduced to the characters a topic level may hold."""
    host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname())
    host = host.strip("-_.")[:48] or "device"
    return f"{host}-{secrets.token_hex(3)}"


@dataclass
class AgentState:
    """The plain data kept on disk."""

    device_id: str
    submitted: dict[int, str] = field(default_factory=dict)
    model_version: int | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "device_id": self.device_id,
            "submitted": {str(k): v for k, v in sorted(self.submitted.items())},
            "model_version": self.model_version,
            "counters": dict(sorted(self.counters.items())),
        }

    @classmethod
    def from_json(cls, obj: Any) -> AgentState:
        if not isinstance(obj, Mapping):
            raise StateError("state file must hold a JSON object")
        if obj.get("format") != STATE_FORMAT:
            raise StateError(f"unsupported state format {obj.get('format')!r}")
        try:
            device_id = validate_name(obj["device_id"], "device_id")
            submitted = {int(k): str(v) for k, v in dict(obj.get("submitted", {})).items()}
            version = obj.get("model_version")
            if version is not None and (not isinstance(version, int) or version < 0):
                raise ValueError(f"bad model_version {version!r}")
            counters = {str(k): int(v) for k, v in dict(obj.get("counters", {})).items()}
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise StateError(f"state file is inconsistent: {exc}") from exc
        return cls(device_id, submitted, version, counters)


class StateStore:
    """Loads (or creates) ``state_dir/state.json``; every change is saved at once.

    Thread-safe. ``device_id``: the configured id; empty = keep the stored one (or make a
    new one on first start). A configured id differing from the stored one is an error:
    the stored submissions belong to the other identity.
    """

    def __init__(self, state_dir: str | os.PathLike[str], device_id: str = "") -> None:
        self.dir = Path(state_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"cannot create state directory {self.dir}: {exc}") from exc
        self.path = self.dir / STATE_FILE
        self._lock = threading.Lock()
        self._state = self._load(device_id)

    def _load(self, device_id: str) -> AgentState:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            state = AgentState(device_id or default_device_id())
            log.info("new device state in %s (device id %s)", self.dir, state.device_id)
            self._write(state)
            return state
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc}") from exc
        try:
            state = AgentState.from_json(json.loads(text))
        except ValueError as exc:
            raise StateError(f"{self.path} is not valid JSON: {exc}") from exc
        if device_id and device_id != state.device_id:
            raise StateError(
                f"state directory {self.dir} belongs to device {state.device_id!r}, "
                f"not {device_id!r}; use another state_dir or the same device id"
            )
        log.info(
            "loaded device state from %s (device id %s, %d rounds submitted, model version %s)",
            self.dir, state.device_id, len(state.submitted), state.model_version,
        )
        return state

    def _write(self, state: AgentState) -> None:
        data = json.dumps(state.to_json(), indent=1).encode() + b"\n"
        try:
            atomic_write(self.path, data)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc}") from exc

    # -------------------------------------------------------------------- reading
    @property
    def device_id(self) -> str:
        return self._state.device_id

    @property
    def model_version(self) -> int | None:
        with self._lock:
            return self._state.model_version

    def submitted_update(self, round_id: int) -> str | None:
        """The update id submitted for ``round_id``, if any."""
        with self._lock:
            return self._state.submitted.get(round_id)

    def has_submitted(self, round_id: int) -> bool:
        return self.submitted_update(round_id) is not None

    @property
    def last_submitted_round(self) -> int | None:
        with self._lock:
            return max(self._state.submitted, default=None)

    def counter(self, name: str) -> int:
        with self._lock:
            return self._state.counters.get(name, 0)

    def snapshot(self) -> AgentState:
        """A copy of the current state."""
        with self._lock:
            s = self._state
            return AgentState(s.device_id, dict(s.submitted), s.model_version, dict(s.counters))

    # -------------------------------------------------------------------- changes
    def record_submission(self, round_id: int, update_id: str) -> None:
        with self._lock:
            self._state.submitted[round_id] = update_id
            if len(self._state.submitted) > MAX_REMEMBERED_ROUNDS:
                for old in sorted(self._state.submitted)[:-MAX_REMEMBERED_ROUNDS]:
                    del self._state.submitted[old]
            self._state.counters["updates_submitted"] = (
                self._state.counters.get("updates_submitted", 0) + 1
            )
            self._write(self._state)

    def set_model_version(self, version: int) -> None:
        with self._lock:
            if self._state.model_version == version:
                return
            self._state.model_version = version
            self._write(self._state)

    def bump(self, name: str, n: int = 1) -> int:
        with self._lock:
            value = self._state.counters.get(name, 0) + n
            self._state.counters[name] = value
            self._write(self._state)
            return value
