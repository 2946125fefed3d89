"""The wire format: msgpack maps with a schema version, strict and bounded decoding.

Every message is a msgpack map with ``v`` (schema version) and ``type``. Tensors
(:class:`fedmq.tensor.Tensor`) are maps ``{name, dtype, shape, params, data[, extra]}``:
``data`` holds raw little-endian values of ``dtype``, ``params`` named numbers and ``extra``
named byte strings of the update's codec. A signed update is an envelope
``{v, type: "signed", body, sig}`` whose ``body`` is the exact bytes of the update message
and ``sig`` an Ed25519 signature over them (:mod:`fedmq.signing`).

Decoding checks the payload size before unpacking, then types, ranges, the dtype allowlist,
that tensor data are whole values, that every float is finite and that the codec is
registered. Whether a tensor fits the model (shape, element count, params) is its codec's
check, made once by the accumulator. msgpack extension types (and so any object
serialisation) are refused. Every failure is a :class:`WireError` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack

from fedmq.errors import RejectReason, WireError
from fedmq.evaluation import EvalReport
from fedmq.tensor import ALLOWED_DTYPES, MAX_NDIM, Tensor, tensor_from_map
from fedmq.update.codecs import codec_names

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CHUNKS",
    "MAX_STEPS",
    "SCHEMA_VERSION",
    "AckMessage",
    "ChunkManifest",
    "ChunkMessage",
    "Limits",
    "MAX_INDEX_DELTAS",
    "ModelDelta",
    "ModelIndex",
    "ModelMessage",
    "ReceivedUpdate",
    "RoundAnnouncement",
    "ReceivedSitePartial",
    "SignedUpdate",
    "SitePartial",
    "StatusMessage",
    "Tensor",
    "TrainingConfig",
    "UpdateMessage",
    "chunk_layout",
    "decode_ack",
    "decode_chunk",
    "decode_manifest",
    "decode_model",
    "decode_model_delta",
    "decode_model_index",
    "decode_round",
    "decode_site_partial",
    "decode_status",
    "decode_update",
    "encode",
    "message_type",
    "receive_site_partial",
    "receive_update",
]

SCHEMA_VERSION = 2
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_MAX_NDIM = MAX_NDIM
_MAX_NAME = 128
_MAX_TEXT = 4096
_MAX_EPOCH = 64
_MAX_SIGNATURE = 512
_MAX_CONFIG_PARAMS = 32
_MAX_CONFIG_KEY = 64
#: The largest local step count an update may report (FedNova).
MAX_STEPS = 10**9
#: A chunked transfer has at most this many chunks (a 1 KB chunk size still carries 64 MiB).
MAX_CHUNKS = 65536
#: A model index lists at most this many retained deltas (compressed downlink).
MAX_INDEX_DELTAS = 1024
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Limits:
    """Bounds applied while decoding (before and during unpacking)."""

    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensors: int = 4096
    max_elements: int = 64 * 1024 * 1024
    max_devices: int = 100_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_tensors <= 0 or self.max_elements <= 0:
            raise ValueError("limits must be positive")


# ---------------------------------------------------------------------------- messages


ConfigValue = int | float | str | bool


@dataclass(frozen=True)
class TrainingConfig:
    """What a device should do in a round (a strategy's :meth:`configure` decides it).

    ``params`` is a free-form map for what a strategy or codec tells devices beyond the
    fixed fields (FedProx's ``mu``, a clip norm, top-k's ``k``): at most 32 entries, names
    of 1-64 characters, values finite numbers, bools or strings of at most 256 characters.
    :meth:`to_dict` / :meth:`from_dict` are its one serialisation (wire, round plans).
    """

    epochs: int = 1
    lr: float = 0.05
    codec: str = "int8"
    max_examples: int | None = None
    sample_fraction: float | None = None
    params: Mapping[str, ConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be 1..1000, got {self.epochs}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 100):
            raise ValueError(f"lr must be in (0, 100], got {self.lr}")
        if self.codec not in codec_names():
            raise ValueError(f"codec must be one of {codec_names()}, got {self.codec!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("max_examples must be >= 1")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")
        if len(self.params) > _MAX_CONFIG_PARAMS:
            raise ValueError(f"params has more than {_MAX_CONFIG_PARAMS} entries")
        for key, value in self.params.items():
            if not isinstance(key, str) or not 1 <= len(key) <= _MAX_CONFIG_KEY:
                raise ValueError(f"params name {key!r} must be 1-{_MAX_CONFIG_KEY} characters")
            if isinstance(value, str):
                if len(value) > 256:
                    raise ValueError(f"params {key!r} is longer than 256 characters")
            elif isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ValueError(f"params {key!r} is not finite")
            elif not isinstance(value, bool):
                raise ValueError(f"params {key!r} must be a number, bool or string")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (msgpack/JSON); :meth:`from_dict` reads it back."""
        return {
            "epochs": self.epochs,
            "lr": float(self.lr),
            "codec": self.codec,
            "max_examples": self.max_examples,
            "sample_fraction": self.sample_fraction,
            "params": dict(sorted(self.params.items())),
        }

    @classmethod
    def from_dict(cls, raw: Any) -> TrainingConfig:
        """Strictly typed inverse of :meth:`to_dict`; ``params`` may be absent (older plans).
        Raises :class:`ValueError` naming the bad field."""
        if not isinstance(raw, Mapping):
            raise ValueError("a training config must be a map")
        unknown = set(raw) - {"epochs", "lr", "codec", "max_examples", "sample_fraction",
                              "params"}
        if unknown:
            raise ValueError(f"unknown training config fields {sorted(map(str, unknown))}")

        def num(key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
            value = raw.get(key)
            if value is None and optional:
                return None
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"field {key!r} must be {what}")
            return value

        codec = raw.get("codec")
        if not isinstance(codec, str):
            raise ValueError("field 'codec' must be a string")
        params = raw.get("params") or {}
        if not isinstance(params, Mapping):
            raise ValueError("field 'params' must be a map")
        fraction = num("sample_fraction", (int, float), optional=True)
        return cls(
            epochs=num("epochs", int),
            lr=float(num("lr", (int, float))),
            codec=codec,
            max_examples=num("max_examples", int, optional=True),
            sample_fraction=None if fraction is None else float(fraction),
            params=dict(params),
        )


@dataclass(frozen=True)
class ModelMessage:
    """The global model (retained on ``fl/<fleet>/model``)."""

    fleet: str
    version: int
    round_id: int
    model_id: str
    tensors: tuple[Tensor, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    epoch: str = ""


@dataclass(frozen=True)
class RoundAnnouncement:
    """The open round (retained on ``fl/<fleet>/round``); ``selected`` empty = any device."""

    fleet: str
    round_id: int
    base_version: int
    deadline: float
    config: TrainingConfig
    selected: tuple[str, ...] = ()
    min_updates: int = 1
    model_id: str = ""
    opened_at: float = 0.0
    epoch: str = ""
    #: a pruned round's mask (fedmq.prune.mask bytes, checked by the device against its
    #: model); empty = not pruned, and then not encoded
    prune_mask: bytes = b""


@dataclass(frozen=True)
class UpdateMessage:
    """One device's encoded update (local weights minus global weights)."""

    fleet: str
    round_id: int
    base_version: int
    device: str
    update_id: str
    num_examples: int
    codec: str
    tensors: tuple[Tensor, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    epoch: str = ""
    #: local SGD steps the update took (FedNova normalises by it); 0 = not reported
    steps: int = 0
    #: the device's federated evaluation (:class:`fedmq.evaluation.EvalReport`); None = none
    evaluation: EvalReport | None = None


@dataclass(frozen=True)
class SignedUpdate:
    """The signed envelope: ``signature`` is Ed25519 over ``body``, the exact bytes of an
    encoded :class:`UpdateMessage` (built by :func:`fedmq.signing.sign_update`)."""

    body: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.body, bytes) or not self.body:
            raise WireError("field 'body' must be non-empty bytes")
        if not isinstance(self.signature, bytes) or not 0 < len(self.signature) <= _MAX_SIGNATURE:
            raise WireError(f"field 'sig' must be 1-{_MAX_SIGNATURE} bytes")


@dataclass(frozen=True)
class ReceivedUpdate:
    """An update payload as received: the decoded ``message``, the exact ``body`` bytes it
    was decoded from and the envelope's ``signature`` over them (None when unsigned).

    Built only by :func:`receive_update`, so ``message`` is always the decoding of ``body``.
    """

    message: UpdateMessage
    body: bytes
    signature: bytes | None = None


@dataclass(frozen=True)
class AckMessage:
    """The aggregator's answer to one update."""

    fleet: str
    round_id: int
    device: str
    update_id: str
    accepted: bool
    code: str = "ok"
    reason: str = ""
    created_at: float = 0.0


@dataclass(frozen=True)
class StatusMessage:
    """A device's retained status (also its last will with state 'offline')."""

    fleet: str
    device: str
    state: str
    runtime: str = ""
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    round_id: int | None = None
    created_at: float = 0.0
    epoch: str = ""
    model_version: int | None = None


def chunk_layout(total_bytes: int, count: int) -> tuple[int, int]:
    """(chunk size, last chunk's size) of ``total_bytes`` split into ``count`` chunks: every
    chunk but the last holds ``ceil(total_bytes / count)`` bytes, the last the rest (> 0).
    Raises :class:`WireError` when no such split exists."""
    if not (1 <= count <= MAX_CHUNKS and total_bytes >= count):
        raise WireError(
            f"{total_bytes} bytes cannot be split into {count} chunk(s)", RejectReason.BAD_CHUNK
        )
    size = -(-total_bytes // count)
    last = total_bytes - size * (count - 1)
    if last <= 0:
        raise WireError(
            f"{total_bytes} bytes cannot be split into {count} chunks of {size}",
            RejectReason.BAD_CHUNK,
        )
    return size, last


def _check_transfer(transfer: str) -> None:
    if not (isinstance(transfer, str) and len(transfer) == 64 and set(transfer) <= _HEX):
        raise WireError("field 'transfer' must be a sha256 in 64 lowercase hex digits",
                        RejectReason.BAD_CHUNK)


@dataclass(frozen=True)
class ChunkMessage:
    """Chunk ``index`` of ``count`` of a payload of ``total_bytes`` whose sha256 (hex) is
    ``transfer`` (fedmq.chunks splits and reassembles). The layout is fixed by
    :func:`chunk_layout`, so every chunk's length is checked on its own."""

    transfer: str
    index: int
    count: int
    total_bytes: int
    data: bytes

    def __post_init__(self) -> None:
        _check_transfer(self.transfer)
        size, last = chunk_layout(self.total_bytes, self.count)
        if not 0 <= self.index < self.count:
            raise WireError(f"chunk index {self.index} is outside [0, {self.count})",
                            RejectReason.BAD_CHUNK)
        want = last if self.index == self.count - 1 else size
        if not isinstance(self.data, bytes) or len(self.data) != want:
            got = len(self.data) if isinstance(self.data, bytes) else "no"
            raise WireError(
                f"chunk {self.index} of {self.count} of a {self.total_bytes}-byte transfer "
                f"must hold {want} bytes, got {got}", RejectReason.BAD_CHUNK,
            )


@dataclass(frozen=True)
class ChunkManifest:
    """What a retained topic holds when its payload travels in retained chunks."""

    transfer: str
    count: int
    total_bytes: int

    def __post_init__(self) -> None:
        _check_transfer(self.transfer)
        chunk_layout(self.total_bytes, self.count)


@dataclass(frozen=True)
class ModelDelta:
    """Compressed downlink: model ``version`` as ``codec``-encoded tensors to add to version
    ``base_version`` (= version - 1), retained on ``fl/<fleet>/model/delta/<version>``."""

    fleet: str
    version: int
    base_version: int
    round_id: int
    model_id: str
    codec: str
    tensors: tuple[Tensor, ...]
    created_at: float = 0.0
    epoch: str = ""


@dataclass(frozen=True)
class ModelIndex:
    """Compressed downlink: what the retained model topic holds instead of the model. Names
    the current ``version`` (its round, metrics), the retained snapshot (a full model of
    ``snapshot_version``, ``snapshot_bytes`` long) and the retained ``deltas``, (version,
    payload bytes) pairs in increasing version order, every version after the snapshot's
    included (docs/protocol.md, "Compressed downlink")."""

    fleet: str
    version: int
    round_id: int
    model_id: str
    codec: str
    snapshot_version: int
    snapshot_bytes: int
    deltas: tuple[tuple[int, int], ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    epoch: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.snapshot_version <= self.version:
            raise WireError(
                f"snapshot version {self.snapshot_version} is outside [0, {self.version}]"
            )
        if len(self.deltas) > MAX_INDEX_DELTAS:
            raise WireError(f"a model index lists at most {MAX_INDEX_DELTAS} deltas")
        previous = -1
        for version, size in self.deltas:
            if not (previous < version <= self.version and version >= 1 and size >= 1):
                raise WireError(
                    f"model index delta ({version}, {size}) is out of order or range"
                )
            previous = version
        listed = {v for v, _ in self.deltas}
        missing = [v for v in range(self.snapshot_version + 1, self.version + 1)
                   if v not in listed]
        if missing:
            raise WireError(
                f"model index of version {self.version} misses the deltas {missing[:5]} "
                f"after its snapshot (version {self.snapshot_version})"
            )


@dataclass(frozen=True)
class SitePartial:
    """A site gateway's fold of one round (docs/scaling.md, "Site gateways"): ``partial`` is
    the :class:`~fedmq.update.fixedpoint.FixedPointSum` serialisation (``to_bytes``) of the
    accepted updates of ``devices`` (sorted, unique, at least one) in round ``round_id`` of
    ``epoch``, trained on ``base_version``. ``partial_id`` names this fold: a resend carries
    the same one. Whether ``partial`` fits the model (and holds ``len(devices)`` updates) is
    the receiver's check (``FixedPointSum.from_bytes``), like a tensor's codec check."""

    fleet: str
    epoch: str
    round_id: int
    base_version: int
    gateway: str
    partial_id: str
    devices: tuple[str, ...]
    partial: bytes
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.epoch:
            raise WireError("a site partial must name its epoch")
        if not self.devices:
            raise WireError("a site partial must hold at least one device")
        if any(a >= b for a, b in zip(self.devices, self.devices[1:], strict=False)):
            raise WireError("a site partial's devices must be sorted and unique")
        if not isinstance(self.partial, bytes) or not self.partial:
            raise WireError("field 'partial' must be non-empty bytes")


@dataclass(frozen=True)
class ReceivedSitePartial:
    """A site partial payload as received: ``message`` decoded from the exact ``body`` bytes
    and the envelope's ``signature`` over them (None when unsigned). Built only by
    :func:`receive_site_partial`."""

    message: SitePartial
    body: bytes
    signature: bytes | None = None


Message = (
    ModelMessage | RoundAnnouncement | UpdateMessage | SignedUpdate | AckMessage | StatusMessage
    | ChunkMessage | ChunkManifest | ModelDelta | ModelIndex | SitePartial
)
STATUS_STATES = ("online", "offline", "training", "idle")

# ---------------------------------------------------------------------------- encoding


def _floats(m: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in sorted(m.items())}


def _to_map(msg: Message) -> dict[str, Any]:
    head: dict[str, Any] = {"v": SCHEMA_VERSION}
    if isinstance(msg, UpdateMessage):
        body: dict[str, Any] = {
            "type": "update",
            "fleet": msg.fleet,
            "round": msg.round_id,
            "base_version": msg.base_version,
            "device": msg.device,
            "update_id": msg.update_id,
            "num_examples": msg.num_examples,
            "codec": msg.codec,
            "tensors": [t.to_map() for t in msg.tensors],
            "metrics": _floats(msg.metrics),
            "created_at": float(msg.created_at),
        }
        _put_epoch(body, msg.epoch)
        if msg.steps:  # optional fields go on the wire only when set (golden bytes)
            body["steps"] = msg.steps
        if msg.evaluation is not None:
            body["eval"] = msg.evaluation.to_map()
    elif isinstance(msg, SignedUpdate):
        body = {"type": "signed", "body": msg.body, "sig": msg.signature}
    elif isinstance(msg, ModelMessage):
        body = {
            "type": "model",
            "fleet": msg.fleet,
            "version": msg.version,
            "round": msg.round_id,
            "model_id": msg.model_id,
            "tensors": [t.to_map() for t in msg.tensors],
            "metrics": _floats(msg.metrics),
            "created_at": float(msg.created_at),
        }
        _put_epoch(body, msg.epoch)
    elif isinstance(msg, RoundAnnouncement):
        body = {
            "type": "round",
            "fleet": msg.fleet,
            "round": msg.round_id,
            "base_version": msg.base_version,
            "deadline": float(msg.deadline),
            "config": msg.config.to_dict(),
            "selected": list(msg.selected),
            "min_updates": msg.min_updates,
            "model_id": msg.model_id,
            "opened_at": float(msg.opened_at),
        }
        _put_epoch(body, msg.epoch)
        if msg.prune_mask:
            body["prune_mask"] = bytes(msg.prune_mask)
    elif isinstance(msg, AckMessage):
        body = {
            "type": "ack",
            "fleet": msg.fleet,
            "round": msg.round_id,
            "device": msg.device,
            "update_id": msg.update_id,
            "accepted": bool(msg.accepted),
            "code": msg.code,
            "reason": msg.reason,
            "created_at": float(msg.created_at),
        }
    elif isinstance(msg, StatusMessage):
        body = {
            "type": "status",
            "fleet": msg.fleet,
            "device": msg.device,
            "state": msg.state,
            "runtime": msg.runtime,
            "capabilities": dict(msg.capabilities),
            "metrics": _floats(msg.metrics),
            "round": msg.round_id,
            "created_at": float(msg.created_at),
        }
        _put_epoch(body, msg.epoch)
        if msg.model_version is not None:
            body["model_version"] = msg.model_version
    elif isinstance(msg, ChunkMessage):
        body = {
            "type": "chunk",
            "transfer": msg.transfer,
            "index": msg.index,
            "count": msg.count,
            "total_bytes": msg.total_bytes,
            "data": msg.data,
        }
    elif isinstance(msg, ChunkManifest):
        body = {
            "type": "manifest",
            "transfer": msg.transfer,
            "count": msg.count,
            "total_bytes": msg.total_bytes,
        }
    elif isinstance(msg, ModelDelta):
        body = {
            "type": "model-delta",
            "fleet": msg.fleet,
            "version": msg.version,
            "base_version": msg.base_version,
            "round": msg.round_id,
            "model_id": msg.model_id,
            "codec": msg.codec,
            "tensors": [t.to_map() for t in msg.tensors],
            "created_at": float(msg.created_at),
        }
        _put_epoch(body, msg.epoch)
    elif isinstance(msg, ModelIndex):
        body = {
            "type": "model-index",
            "fleet": msg.fleet,
            "version": msg.version,
            "round": msg.round_id,
            "model_id": msg.model_id,
            "codec": msg.codec,
            "snapshot_version": msg.snapshot_version,
            "snapshot_bytes": msg.snapshot_bytes,
            "deltas": [[v, n] for v, n in msg.deltas],
            "metrics": _floats(msg.metrics),
            "created_at": float(msg.created_at),
        }
        _put_epoch(body, msg.epoch)
    elif isinstance(msg, SitePartial):
        body = {
            "type": "site-partial",
            "fleet": msg.fleet,
            "epoch": msg.epoch,
            "round": msg.round_id,
            "base_version": msg.base_version,
            "gateway": msg.gateway,
            "partial_id": msg.partial_id,
            "devices": list(msg.devices),
            "partial": bytes(msg.partial),
            "created_at": float(msg.created_at),
        }
    else:  # pragma: no cover - typing makes this unreachable
        raise TypeError(f"not a fedmq message: {type(msg).__name__}")
    head.update(body)
    return head


def _put_epoch(body: dict[str, Any], epoch: str) -> None:
    """``epoch`` goes on the wire only when set: messages without one keep their bytes."""
    if epoch:
        body["epoch"] = epoch


def encode(msg: Message) -> bytes:
    """Serialise a message to msgpack bytes (deterministic for equal messages)."""
    out = msgpack.packb(_to_map(msg), use_bin_type=True)
    assert isinstance(out, bytes)
    return out


# ---------------------------------------------------------------------------- decoding


def _ext_refused(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unpack(payload: bytes, limits: Limits) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise WireError("payload is not bytes")
    if len(payload) > limits.max_bytes:
        raise WireError(
            f"payload of {len(payload)} bytes exceeds the limit of {limits.max_bytes}",
            RejectReason.TOO_LARGE,
        )
    if len(payload) == 0:
        raise WireError("empty payload")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_ext_refused,
            max_str_len=1024 * 1024,
            max_bin_len=limits.max_bytes,
            max_array_len=max(limits.max_devices, limits.max_tensors, _MAX_NDIM),
            max_map_len=limits.max_tensors + 64,
            max_ext_len=0,
        )
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.exceptions.ExtraData) as exc:
        raise WireError(f"not a msgpack message: {exc}") from exc
    except Exception as exc:  # msgpack raises a few other types on garbage
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"message must be a map, got {type(obj).__name__}")
    version = obj.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError("missing schema version 'v'", RejectReason.SCHEMA)
    if version != SCHEMA_VERSION:
        raise WireError(
            f"schema version {version} is not supported (this build speaks {SCHEMA_VERSION})",
            RejectReason.SCHEMA,
        )
    return obj


def message_type(payload: bytes, limits: Limits | None = None) -> str:
    """The ``type`` of a message (after the same bounded checks as the decoders)."""
    return _str(_unpack(payload, limits or Limits()), "type")


def _expect_type(obj: Mapping[str, Any], expected: str) -> None:
    got = obj.get("type")
    if got != expected:
        raise WireError(f"expected a {expected!r} message, got type {got!r}")


_T = TypeVar("_T")


def _get(obj: Mapping[str, Any], key: str, kind: type[_T] | tuple[type, ...], what: str) -> Any:
    if key not in obj:
        raise WireError(f"missing field {key!r}")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise WireError(f"field {key!r} must be {what}, got a bool")
    if not isinstance(value, kind):
        raise WireError(f"field {key!r} must be {what}, got {type(value).__name__}")
    return value


def _str(obj: Mapping[str, Any], key: str, max_len: int = _MAX_TEXT, empty: bool = False) -> str:
    value: str = _get(obj, key, str, "a string")
    if len(value) > max_len:
        raise WireError(f"field {key!r} is longer than {max_len} characters")
    if not empty and not value:
        raise WireError(f"field {key!r} is empty")
    return value


def _int(obj: Mapping[str, Any], key: str, lo: int = 0, hi: int = 2**62) -> int:
    value: int = _get(obj, key, int, "an integer")
    if not lo <= value <= hi:
        raise WireError(f"field {key!r}={value} is outside [{lo}, {hi}]")
    return value


def _float(obj: Mapping[str, Any], key: str) -> float:
    value = _get(obj, key, (int, float), "a number")
    value = float(value)
    if not math.isfinite(value):
        raise WireError(f"field {key!r} is not finite", RejectReason.NON_FINITE)
    return value


def _opt(obj: Mapping[str, Any], key: str) -> bool:
    return obj.get(key) is not None


def _float_map(obj: Mapping[str, Any], key: str, max_items: int = 256) -> dict[str, float]:
    raw = obj.get(key, {})
    if not isinstance(raw, dict):
        raise WireError(f"field {key!r} must be a map")
    if len(raw) > max_items:
        raise WireError(f"field {key!r} has more than {max_items} entries")
    out: dict[str, float] = {}
    for k in raw:
        if not isinstance(k, str) or len(k) > _MAX_NAME:
            raise WireError(f"field {key!r} has a bad key")
        out[k] = _float(raw, k)
    return out


def _tensors(obj: Mapping[str, Any], limits: Limits) -> tuple[Tensor, ...]:
    raw = _get(obj, "tensors", list, "a list")
    if len(raw) > limits.max_tensors:
        raise WireError(f"more than {limits.max_tensors} tensors", RejectReason.TOO_LARGE)
    tensors = tuple(tensor_from_map(t, limits.max_elements) for t in raw)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise WireError("duplicate tensor names", RejectReason.SHAPE)
    return tensors


def _epoch(obj: Mapping[str, Any]) -> str:
    """The optional ``epoch`` (aggregator state lineage): 1-64 printable characters, or ""."""
    if not _opt(obj, "epoch"):
        return ""
    value = _str(obj, "epoch", _MAX_EPOCH)
    if not value.isprintable():
        raise WireError("field 'epoch' is not printable")
    return value


def _device_id(obj: Mapping[str, Any], key: str = "device") -> str:
    value = _str(obj, key, 64)
    if any(c in value for c in "/+#\0 ") or not value.isprintable():
        raise WireError(f"field {key!r} is not a valid device id")
    return value


def _update(obj: Mapping[str, Any], limits: Limits) -> UpdateMessage:
    _expect_type(obj, "update")
    codec = _str(obj, "codec", 16)
    if codec not in codec_names():
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    update_id = _str(obj, "update_id", 64)
    if not update_id.isprintable():
        raise WireError("field 'update_id' is not printable")
    tensors = _tensors(obj, limits)
    if not tensors and not _opt(obj, "eval"):
        raise WireError("an update without tensors must carry 'eval' (an evaluation report)",
                        RejectReason.SHAPE)
    return UpdateMessage(
        fleet=_str(obj, "fleet", 64),
        round_id=_int(obj, "round"),
        base_version=_int(obj, "base_version"),
        device=_device_id(obj),
        update_id=update_id,
        num_examples=_int(obj, "num_examples", 1, 2**40),
        codec=codec,
        tensors=tensors,
        metrics=_float_map(obj, "metrics"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
        steps=_int(obj, "steps", 1, MAX_STEPS) if _opt(obj, "steps") else 0,
        evaluation=_evaluation(obj.get("eval")) if _opt(obj, "eval") else None,
    )


def _evaluation(raw: Any) -> EvalReport:
    try:
        return EvalReport.from_map(raw)
    except ValueError as exc:
        raise WireError(f"bad field 'eval': {exc}") from exc


def receive_update(payload: bytes, limits: Limits | None = None) -> ReceivedUpdate:
    """Decode an update payload, bare or in a signed envelope, keeping the exact body bytes
    and the signature for :func:`fedmq.signing.verify_update` (nothing is re-encoded)."""
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    if obj.get("type") != "signed":
        return ReceivedUpdate(_update(obj, lim), bytes(payload), None)
    body = _get(obj, "body", bytes, "bytes")
    sig = _get(obj, "sig", bytes, "bytes")
    if not 0 < len(sig) <= _MAX_SIGNATURE:
        raise WireError(f"field 'sig' must be 1-{_MAX_SIGNATURE} bytes")
    inner = _unpack(body, lim)
    return ReceivedUpdate(_update(inner, lim), body, sig)


def decode_update(payload: bytes, limits: Limits | None = None) -> UpdateMessage:
    """The update in a payload, bare or signed (the signature is not checked here)."""
    return receive_update(payload, limits).message


def decode_model(payload: bytes, limits: Limits | None = None) -> ModelMessage:
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    _expect_type(obj, "model")
    tensors = _tensors(obj, lim)
    for t in tensors:
        t.array()  # model weights are dense: raises shape_mismatch otherwise
    return ModelMessage(
        fleet=_str(obj, "fleet", 64),
        version=_int(obj, "version"),
        round_id=_int(obj, "round"),
        model_id=_str(obj, "model_id", 256, empty=True),
        tensors=tensors,
        metrics=_float_map(obj, "metrics"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
    )


def _training_config(raw: Any) -> TrainingConfig:
    if not isinstance(raw, dict):
        raise WireError("field 'config' must be a map")
    try:
        return TrainingConfig.from_dict(raw)
    except ValueError as exc:
        raise WireError(f"bad training config: {exc}") from exc


def decode_round(payload: bytes, limits: Limits | None = None) -> RoundAnnouncement:
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    _expect_type(obj, "round")
    selected_raw = _get(obj, "selected", list, "a list")
    selected = tuple(_device_id({"device": d}) for d in selected_raw)
    return RoundAnnouncement(
        fleet=_str(obj, "fleet", 64),
        round_id=_int(obj, "round"),
        base_version=_int(obj, "base_version"),
        deadline=_float(obj, "deadline"),
        config=_training_config(obj.get("config")),
        selected=selected,
        min_updates=_int(obj, "min_updates", 1, lim.max_devices),
        model_id=_str(obj, "model_id", 256, empty=True),
        opened_at=_float(obj, "opened_at") if _opt(obj, "opened_at") else 0.0,
        epoch=_epoch(obj),
        prune_mask=_get(obj, "prune_mask", bytes, "bytes") if _opt(obj, "prune_mask") else b"",
    )


def decode_ack(payload: bytes, limits: Limits | None = None) -> AckMessage:
    obj = _unpack(payload, limits or Limits(max_bytes=64 * 1024))
    _expect_type(obj, "ack")
    return AckMessage(
        fleet=_str(obj, "fleet", 64),
        round_id=_int(obj, "round"),
        device=_device_id(obj),
        update_id=_str(obj, "update_id", 64, empty=True),
        accepted=_get(obj, "accepted", bool, "a bool"),
        code=_str(obj, "code", 64),
        reason=_str(obj, "reason", _MAX_TEXT, empty=True),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
    )


def _plain(value: Any, depth: int = 0) -> Any:
    """Capabilities are free-form but must be plain data of bounded depth."""
    if depth > 4:
        raise WireError("status capabilities nest too deeply")
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise WireError(f"status capabilities hold a {type(value).__name__}")


def decode_status(payload: bytes, limits: Limits | None = None) -> StatusMessage:
    obj = _unpack(payload, limits or Limits(max_bytes=256 * 1024))
    _expect_type(obj, "status")
    state = _str(obj, "state", 32)
    if state not in STATUS_STATES:
        raise WireError(f"unknown status state {state!r}")
    caps = obj.get("capabilities", {})
    if not isinstance(caps, dict):
        raise WireError("field 'capabilities' must be a map")
    return StatusMessage(
        fleet=_str(obj, "fleet", 64),
        device=_device_id(obj),
        state=state,
        runtime=_str(obj, "runtime", 256, empty=True) if _opt(obj, "runtime") else "",
        capabilities=_plain(caps),
        metrics=_float_map(obj, "metrics"),
        round_id=_int(obj, "round") if _opt(obj, "round") else None,
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
        model_version=_int(obj, "model_version") if _opt(obj, "model_version") else None,
    )


def decode_chunk(payload: bytes, limits: Limits | None = None) -> ChunkMessage:
    """One chunk; its layout (index, length against ``total_bytes`` and ``count``) checked."""
    obj = _unpack(payload, limits or Limits())
    _expect_type(obj, "chunk")
    return ChunkMessage(
        transfer=_str(obj, "transfer", 64),
        index=_int(obj, "index", 0, MAX_CHUNKS - 1),
        count=_int(obj, "count", 1, MAX_CHUNKS),
        total_bytes=_int(obj, "total_bytes", 1, 2**40),
        data=_get(obj, "data", bytes, "bytes"),
    )


def decode_manifest(payload: bytes, limits: Limits | None = None) -> ChunkManifest:
    obj = _unpack(payload, limits or Limits(max_bytes=64 * 1024))
    _expect_type(obj, "manifest")
    return ChunkManifest(
        transfer=_str(obj, "transfer", 64),
        count=_int(obj, "count", 1, MAX_CHUNKS),
        total_bytes=_int(obj, "total_bytes", 1, 2**40),
    )


def decode_model_delta(payload: bytes, limits: Limits | None = None) -> ModelDelta:
    """A model delta: structure, a registered codec, ``base_version = version - 1``; whether
    its tensors fit the model is the codec's check (:func:`fedmq.downlink.apply_delta`)."""
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    _expect_type(obj, "model-delta")
    codec = _str(obj, "codec", 16)
    if codec not in codec_names():
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    version = _int(obj, "version", 1)
    base = _int(obj, "base_version")
    if base != version - 1:
        raise WireError(
            f"model delta of version {version} names base version {base}, not {version - 1}",
            RejectReason.WRONG_BASE,
        )
    return ModelDelta(
        fleet=_str(obj, "fleet", 64),
        version=version,
        base_version=base,
        round_id=_int(obj, "round"),
        model_id=_str(obj, "model_id", 256, empty=True),
        codec=codec,
        tensors=_tensors(obj, lim),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
    )


def decode_model_index(payload: bytes, limits: Limits | None = None) -> ModelIndex:
    """A model index (at most 256 KB): snapshot and deltas consistent with its version."""
    obj = _unpack(payload, limits or Limits(max_bytes=256 * 1024))
    _expect_type(obj, "model-index")
    codec = _str(obj, "codec", 16)
    if codec not in codec_names():
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    raw = _get(obj, "deltas", list, "a list")
    if len(raw) > MAX_INDEX_DELTAS:
        raise WireError(f"field 'deltas' lists more than {MAX_INDEX_DELTAS} deltas",
                        RejectReason.TOO_LARGE)
    deltas: list[tuple[int, int]] = []
    for item in raw:
        if not isinstance(item, list) or len(item) != 2:
            raise WireError("field 'deltas' must hold [version, bytes] pairs")
        pair = {"version": item[0], "bytes": item[1]}
        deltas.append((_int(pair, "version", 1), _int(pair, "bytes", 1, 2**40)))
    return ModelIndex(
        fleet=_str(obj, "fleet", 64),
        version=_int(obj, "version"),
        round_id=_int(obj, "round"),
        model_id=_str(obj, "model_id", 256, empty=True),
        codec=codec,
        snapshot_version=_int(obj, "snapshot_version"),
        snapshot_bytes=_int(obj, "snapshot_bytes", 1, 2**40),
        deltas=tuple(deltas),
        metrics=_float_map(obj, "metrics"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
    )


def _site_partial(obj: Mapping[str, Any], limits: Limits) -> SitePartial:
    _expect_type(obj, "site-partial")
    unknown = set(obj) - {"v", "type", "fleet", "epoch", "round", "base_version", "gateway",
                          "partial_id", "devices", "partial", "created_at"}
    if unknown:
        raise WireError(f"unknown site partial fields {sorted(map(str, unknown))}")
    raw = _get(obj, "devices", list, "a list")
    if not 1 <= len(raw) <= limits.max_devices:
        raise WireError(f"field 'devices' must list 1-{limits.max_devices} devices",
                        RejectReason.TOO_LARGE if raw else RejectReason.MALFORMED)
    devices = tuple(_device_id({"device": d}) for d in raw)
    partial_id = _str(obj, "partial_id", 64)
    if not partial_id.isprintable():
        raise WireError("field 'partial_id' is not printable")
    epoch = _epoch(obj)
    if not epoch:
        raise WireError("missing field 'epoch'")
    return SitePartial(
        fleet=_str(obj, "fleet", 64),
        epoch=epoch,
        round_id=_int(obj, "round"),
        base_version=_int(obj, "base_version"),
        gateway=_device_id(obj, "gateway"),
        partial_id=partial_id,
        devices=devices,
        partial=_get(obj, "partial", bytes, "bytes"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
    )


def receive_site_partial(payload: bytes, limits: Limits | None = None) -> ReceivedSitePartial:
    """Decode a site partial payload, bare or in a signed envelope (the same envelope as a
    signed update), keeping the exact body bytes and the signature for
    :func:`fedmq.signing.verify_site_partial`."""
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    if obj.get("type") != "signed":
        return ReceivedSitePartial(_site_partial(obj, lim), bytes(payload), None)
    body = _get(obj, "body", bytes, "bytes")
    sig = _get(obj, "sig", bytes, "bytes")
    if not 0 < len(sig) <= _MAX_SIGNATURE:
        raise WireError(f"field 'sig' must be 1-{_MAX_SIGNATURE} bytes")
    return ReceivedSitePartial(_site_partial(_unpack(body, lim), lim), body, sig)


def decode_site_partial(payload: bytes, limits: Limits | None = None) -> SitePartial:
    """The site partial in a payload, bare or signed (the signature is not checked here)."""
    return receive_site_partial(payload, limits).message
