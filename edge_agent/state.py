"""The device's durable state in its state directory (``state.json``, written atomically).

It holds the device's identity, the aggregator epoch it follows (one lineage of the
aggregator's state) and the epochs it left, the rounds it already submitted to in that epoch
(round id -> update id), the last model version it saw, the outcome of its recent updates
(update id -> outcome, so each update is counted once) and a few counters. An agent
restarted with the same state directory keeps its identity and never trains twice for one
round of one epoch.
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
    "ACCEPTED",
    "EXPIRED",
    "MAX_REMEMBERED_ROUNDS",
    "STATE_FILE",
    "AgentState",
    "StateStore",
    "atomic_write",
    "default_device_id",
    "rejected",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_FORMAT = 1
#: Submissions older than the newest this many rounds are forgotten (rounds never repeat).
MAX_REMEMBERED_ROUNDS = 1000
#: How many settled update ids (and left epochs) are remembered.
MAX_REMEMBERED_OUTCOMES = 256
MAX_REMEMBERED_EPOCHS = 32
#: Outcomes of an update; a rejection is ``"rejected:<code>"``.
ACCEPTED = "accepted"
EXPIRED = "expired"
_REJECTED = "rejected:"


def _outcome_counters(outcome: str) -> tuple[str, ...]:
    """The counters one outcome adds to."""
    if outcome == ACCEPTED:
        return ("updates_accepted",)
    if outcome == EXPIRED:
        return ("updates_expired",)
    code = outcome.removeprefix(_REJECTED)
    return ("updates_rejected", f"updates_rejected_{code}")


def rejected(code: str) -> str:
    """The outcome of an update the aggregator rejected with ``code``."""
    return f"{_REJECTED}{code}"


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
    epoch: str = ""
    retired_epochs: list[str] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "device_id": self.device_id,
            "epoch": self.epoch,
            "retired_epochs": list(self.retired_epochs),
            "submitted": {str(k): v for k, v in sorted(self.submitted.items())},
            "model_version": self.model_version,
            "counters": dict(sorted(self.counters.items())),
            "outcomes": dict(self.outcomes),
        }

    def copy(self) -> AgentState:
        return AgentState(
            self.device_id, dict(self.submitted), self.model_version, dict(self.counters),
            self.epoch, list(self.retired_epochs), dict(self.outcomes),
        )

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
            epoch = obj.get("epoch", "")
            retired = list(obj.get("retired_epochs", []))
            outcomes = {str(k): str(v) for k, v in dict(obj.get("outcomes", {})).items()}
            if not isinstance(epoch, str) or not all(isinstance(e, str) for e in retired):
                raise ValueError("epochs must be strings")
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise StateError(f"state file is inconsistent: {exc}") from exc
        return cls(device_id, submitted, version, counters, epoch, retired, outcomes)


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
            "loaded device state from %s (device id %s, epoch %s, %d rounds submitted, model "
            "version %s)",
            self.dir, state.device_id, state.epoch or "(none)", len(state.submitted),
            state.model_version,
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

    @property
    def epoch(self) -> str:
        """The aggregator epoch this device follows ("" before it saw one)."""
        with self._lock:
            return self._state.epoch

    def is_retired(self, epoch: str) -> bool:
        """True for an epoch this device followed and left (its messages are stale)."""
        with self._lock:
            return epoch in self._state.retired_epochs

    def outcome(self, update_id: str) -> str | None:
        """How the update ended (accepted, rejected:<code>, expired), None while open."""
        with self._lock:
            return self._state.outcomes.get(update_id)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._state.counters)

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
            return self._state.copy()

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

    def adopt_epoch(self, epoch: str) -> None:
        """Follow ``epoch`` from now on: the old one is retired, and the round bookkeeping
        and the model version start over (the new lineage numbers its rounds afresh)."""
        with self._lock:
            s = self._state
            if s.epoch == epoch:
                return
            if s.epoch not in s.retired_epochs:
                s.retired_epochs = [*s.retired_epochs, s.epoch][-MAX_REMEMBERED_EPOCHS:]
            s.retired_epochs = [e for e in s.retired_epochs if e != epoch]
            s.epoch = epoch
            s.submitted = {}
            s.model_version = None
            s.counters["epoch_changes"] = s.counters.get("epoch_changes", 0) + 1
            self._write(s)

    def settle(self, update_id: str, outcome: str) -> str | None:
        """Record how an update ended and count it, once per update id, in one write.

        Returns the outcome it had before (None: first time; then it was counted now). A
        final outcome (accepted, rejected) is never changed; an ``expired`` update that gets
        a late answer moves from the expired counter to the answer's.
        """
        with self._lock:
            s = self._state
            before = s.outcomes.get(update_id)
            if before is not None and (before != EXPIRED or outcome == EXPIRED):
                return before
            if before is not None:
                for name in _outcome_counters(before):
                    s.counters[name] = max(0, s.counters.get(name, 0) - 1)
            for name in _outcome_counters(outcome):
                s.counters[name] = s.counters.get(name, 0) + 1
            s.outcomes.pop(update_id, None)
            s.outcomes[update_id] = outcome
            while len(s.outcomes) > MAX_REMEMBERED_OUTCOMES:
                del s.outcomes[next(iter(s.outcomes))]
            self._write(s)
            return before

    def bump(self, name: str, n: int = 1) -> int:
        with self._lock:
            value = self._state.counters.get(name, 0) + n
            self._state.counters[name] = value
            self._write(self._state)
            return value
