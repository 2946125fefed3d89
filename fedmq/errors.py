"""One exception hierarchy for fedmq; each error carries a short readable reason."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataError",
    "FedmqError",
    "ModelError",
    "RejectReason",
    "Rejected",
    "SecurityError",
    "StateError",
    "StorageFullError",
    "WireError",
]


class FedmqError(Exception):
    """Base class: ``str(err)`` is a reason a person can read."""


class ConfigError(FedmqError):
    """Invalid or missing configuration."""


class DataError(FedmqError):
    """Bad or missing dataset."""


class ModelError(FedmqError):
    """A model bundle, its weights or the interpreter disagree."""


class StateError(FedmqError):
    """Persistent state is missing or inconsistent."""


class StorageFullError(StateError):
    """The filesystem of a state directory is full (ENOSPC, SQLite's SQLITE_FULL).

    Whatever the failed write was for did not happen (the transaction rolled back); the
    caller keeps its state and may retry once space is freed. ``update_id`` and ``device``
    name the update that was not journaled, when it was one.
    """

    def __init__(self, directory: str, detail: str, update_id: str = "", device: str = "") -> None:
        super().__init__(f"state directory {directory} is full: {detail}")
        self.directory = directory
        self.detail = detail
        self.update_id = update_id
        self.device = device


class SecurityError(FedmqError):
    """Signature, key or enrolment problem."""


class RejectReason:
    """Stable machine-readable codes for rejected messages (metric labels, acks)."""

    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    SCHEMA = "schema_version"
    WRONG_FLEET = "wrong_fleet"
    WRONG_ROUND = "wrong_round"
    WRONG_BASE = "wrong_base_version"
    DUPLICATE = "duplicate"
    NOT_SELECTED = "not_selected"
    UNKNOWN_DEVICE = "unknown_device"
    DEVICE_MISMATCH = "device_mismatch"
    SHAPE = "shape_mismatch"
    NON_FINITE = "non_finite"
    BAD_CODEC = "bad_codec"
    ROUND_CLOSED = "round_closed"
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    NORM_BOUND = "norm_bound"
    RETAINED = "retained"
    BAD_CHUNK = "bad_chunk"
    WRONG_PHASE = "wrong_phase"  # a secure-aggregation message for another phase
    BAD_SHARE = "bad_share"  # a secret share that does not match its commitment
    ALL = (
        MALFORMED,
        TOO_LARGE,
        SCHEMA,
        WRONG_FLEET,
        WRONG_ROUND,
        WRONG_BASE,
        DUPLICATE,
        NOT_SELECTED,
        UNKNOWN_DEVICE,
        DEVICE_MISMATCH,
        SHAPE,
        NON_FINITE,
        BAD_CODEC,
        ROUND_CLOSED,
        UNSIGNED,
        BAD_SIGNATURE,
        NORM_BOUND,
        RETAINED,
        BAD_CHUNK,
        WRONG_PHASE,
        BAD_SHARE,
    )


class Rejected(FedmqError):
    """A message that is not accepted (an update refused by the ingest, a signature that
    does not verify, a round that does not match); ``code`` is one of
    :class:`RejectReason`, sent back on the ack topic with ``reason``."""

    def __init__(self, reason: str, code: str = RejectReason.MALFORMED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class WireError(Rejected):
    """A rejection for the message's bytes themselves: not msgpack, a missing or mistyped
    field, a size or dtype outside the format's bounds, non-finite values."""
