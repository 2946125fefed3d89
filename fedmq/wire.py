"""The wire format: msgpack maps with a schema version, strict and bounded decoding.

Every message is a msgpack map with ``v`` (schema version) and ``type``. Tensors are maps
``{name, dtype, shape, params, data}`` where ``data`` holds the raw little-endian bytes of
``dtype`` and ``params`` the codec parameters (``scale`` for int8, ...). Decoding checks the
payload size before unpacking, then types, ranges, the dtype allowlist, that the byte length
agrees with the shape and that every float is finite. msgpack extension types (and so any
object serialisation) are refused. Every failure is a :class:`WireError` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgpack
import numpy as np

from fedmq.errors import RejectReason, WireError

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "AckMessage",
    "Limits",
    "ModelMessage",
    "RoundAnnouncement",
    "StatusMessage",
    "Tensor",
    "TrainingConfig",
    "UpdateMessage",
    "decode_ack",
    "decode_model",
    "decode_round",
    "decode_status",
    "decode_update",
    "encode",
    "message_type",
    "signing_bytes",
]

SCHEMA_VERSION = 1
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
ALLOWED_DTYPES: Mapping[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
}
_MAX_NDIM = 8
_MAX_NAME = 128
_MAX_TEXT = 4096
_CODEC_NAMES = ("float32", "float16", "int8")
_MAX_EPOCH = 64


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


@dataclass(frozen=True)
class Tensor:
    """One named tensor as carried on the wire (raw bytes, codec params)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    params: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_tensor_fields(self.name, self.dtype, self.shape, self.data, self.params)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def array(self) -> np.ndarray:
        """A read-only view of the raw values (no copy), shaped."""
        return np.frombuffer(self.data, dtype=ALLOWED_DTYPES[self.dtype]).reshape(self.shape)

    @classmethod
    def from_array(
        cls, name: str, array: np.ndarray, params: Mapping[str, float] | None = None
    ) -> Tensor:
        arr = np.asarray(array)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        key = _dtype_name(dtype)
        data = np.ascontiguousarray(arr, dtype=ALLOWED_DTYPES[key]).tobytes()
        return cls(name, key, tuple(int(d) for d in arr.shape), data, dict(params or {}))


@dataclass(frozen=True)
class TrainingConfig:
    """What a device should do in a round."""

    epochs: int = 1
    lr: float = 0.05
    codec: str = "int8"
    max_examples: int | None = None
    sample_fraction: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 1000:
            raise ValueError(f"epochs must be 1..1000, got {self.epochs}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 100):
            raise ValueError(f"lr must be in (0, 100], got {self.lr}")
        if self.codec not in _CODEC_NAMES:
            raise ValueError(f"codec must be one of {_CODEC_NAMES}, got {self.codec!r}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("max_examples must be >= 1")
        if self.sample_fraction is not None and not 0 < self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in (0, 1]")


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
    signature: bytes | None = None
    epoch: str = ""

    @property
    def payload_bytes(self) -> int:
        return sum(len(t.data) for t in self.tensors)


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


Message = ModelMessage | RoundAnnouncement | UpdateMessage | AckMessage | StatusMessage
STATUS_STATES = ("online", "offline", "training", "idle")

# ---------------------------------------------------------------------------- encoding


def _tensor_map(t: Tensor) -> dict[str, Any]:
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "params": {k: float(v) for k, v in sorted(t.params.items())},
        "data": t.data,
    }


def _config_map(c: TrainingConfig) -> dict[str, Any]:
    return {
        "epochs": c.epochs,
        "lr": float(c.lr),
        "codec": c.codec,
        "max_examples": c.max_examples,
        "sample_fraction": c.sample_fraction,
    }


def _floats(m: Mapping[str, float]) -> dict[str, float]:
    return {str(k): float(v) for k, v in sorted(m.items())}


def _to_map(msg: Message, *, with_signature: bool = True) -> dict[str, Any]:
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
            "tensors": [_tensor_map(t) for t in msg.tensors],
            "metrics": _floats(msg.metrics),
            "created_at": float(msg.created_at),
        }
        if with_signature and msg.signature is not None:
            body["signature"] = msg.signature
        _put_epoch(body, msg.epoch)
    elif isinstance(msg, ModelMessage):
        body = {
            "type": "model",
            "fleet": msg.fleet,
            "version": msg.version,
            "round": msg.round_id,
            "model_id": msg.model_id,
            "tensors": [_tensor_map(t) for t in msg.tensors],
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
            "config": _config_map(msg.config),
            "selected": list(msg.selected),
            "min_updates": msg.min_updates,
            "model_id": msg.model_id,
            "opened_at": float(msg.opened_at),
        }
        _put_epoch(body, msg.epoch)
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
    else:  # pragma: no cover - typing makes this unreachable
        raise TypeError(f"not a fedmq message: {type(msg).__name__}")
    head.update(body)
    return head


def _put_epoch(body: dict[str, Any], epoch: str) -> None:
    """``epoch`` only when set: an update without one encodes (and signs) as before epochs."""
    if epoch:
        body["epoch"] = epoch


def encode(msg: Message) -> bytes:
    """Serialise a message to msgpack bytes (deterministic for equal messages)."""
    out = msgpack.packb(_to_map(msg), use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def signing_bytes(msg: UpdateMessage) -> bytes:
    """The canonical bytes a device signs: the update encoded without its signature."""
    out = msgpack.packb(_to_map(msg, with_signature=False), use_bin_type=True)
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


def _expect_type(obj: dict[str, Any], expected: str) -> None:
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


def _epoch(obj: Mapping[str, Any]) -> str:
    """The optional ``epoch`` (the aggregator state's identity): "" when absent."""
    if not _opt(obj, "epoch"):
        return ""
    value = _str(obj, "epoch", _MAX_EPOCH, empty=True)
    if not value.isprintable():
        raise WireError("field 'epoch' is not printable")
    return value


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


def _dtype_name(dtype: np.dtype[Any]) -> str:
    for name, allowed in ALLOWED_DTYPES.items():
        if dtype == allowed:
            return name
    raise WireError(f"dtype {dtype} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")


def _check_tensor_fields(
    name: str, dtype: str, shape: tuple[int, ...], data: bytes, params: Mapping[str, float]
) -> None:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
        raise WireError(f"tensor name {name!r} must be 1-{_MAX_NAME} characters")
    if dtype not in ALLOWED_DTYPES:
        raise WireError(
            f"tensor {name!r}: dtype {dtype!r} is not allowed "
            f"(allowed: {', '.join(ALLOWED_DTYPES)})",
            RejectReason.BAD_CODEC,
        )
    if len(shape) > _MAX_NDIM or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
    ):
        raise WireError(f"tensor {name!r}: bad shape {list(shape)}", RejectReason.SHAPE)
    expected = math.prod(shape) * ALLOWED_DTYPES[dtype].itemsize
    if len(data) != expected:
        raise WireError(
            f"tensor {name!r}: {len(data)} data bytes do not match shape {list(shape)} "
            f"of {dtype} ({expected} bytes)",
            RejectReason.SHAPE,
        )
    for key, value in params.items():
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise WireError(
                f"tensor {name!r}: param {key!r} is not finite", RejectReason.NON_FINITE
            )


def _tensor(raw: Any, limits: Limits) -> Tensor:
    if not isinstance(raw, dict):
        raise WireError("a tensor must be a map")
    name = _str(raw, "name", _MAX_NAME)
    dtype = _str(raw, "dtype", 16)
    shape_raw = _get(raw, "shape", list, "a list")
    if len(shape_raw) > _MAX_NDIM:
        raise WireError(f"tensor {name!r} has more than {_MAX_NDIM} dimensions", RejectReason.SHAPE)
    shape = tuple(shape_raw)
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise WireError(f"tensor {name!r}: bad shape {shape_raw}", RejectReason.SHAPE)
    if math.prod(shape) > limits.max_elements:
        raise WireError(f"tensor {name!r} has too many elements", RejectReason.TOO_LARGE)
    data = _get(raw, "data", bytes, "bytes")
    params = _float_map(raw, "params", 16)
    tensor = Tensor(name, dtype, shape, data, params)
    if dtype in ("float32", "float16") and tensor.size and not _all_finite(tensor):
        raise WireError(f"tensor {name!r} holds NaN or infinite values", RejectReason.NON_FINITE)
    return tensor


def _all_finite(tensor: Tensor) -> bool:
    if tensor.dtype == "float16":
        # NaN/inf have an all-ones exponent; integer ops on the bits beat float16 isfinite 6x.
        bits = np.frombuffer(tensor.data, dtype="<u2")
        return not bool(((bits & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(tensor.array()).all())


def _tensors(obj: Mapping[str, Any], limits: Limits) -> tuple[Tensor, ...]:
    raw = _get(obj, "tensors", list, "a list")
    if len(raw) > limits.max_tensors:
        raise WireError(f"more than {limits.max_tensors} tensors", RejectReason.TOO_LARGE)
    tensors = tuple(_tensor(t, limits) for t in raw)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise WireError("duplicate tensor names", RejectReason.SHAPE)
    return tensors


def _device_id(obj: Mapping[str, Any], key: str = "device") -> str:
    value = _str(obj, key, 64)
    if any(c in value for c in "/+#\0 ") or not value.isprintable():
        raise WireError(f"field {key!r} is not a valid device id")
    return value


def decode_update(payload: bytes, limits: Limits | None = None) -> UpdateMessage:
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    _expect_type(obj, "update")
    codec = _str(obj, "codec", 16)
    if codec not in _CODEC_NAMES:
        raise WireError(f"unknown codec {codec!r}", RejectReason.BAD_CODEC)
    signature = obj.get("signature")
    if signature is not None and (not isinstance(signature, bytes) or len(signature) > 512):
        raise WireError("field 'signature' must be at most 512 bytes")
    update_id = _str(obj, "update_id", 64)
    if not update_id.isprintable():
        raise WireError("field 'update_id' is not printable")
    return UpdateMessage(
        fleet=_str(obj, "fleet", 64),
        round_id=_int(obj, "round"),
        base_version=_int(obj, "base_version"),
        device=_device_id(obj),
        update_id=update_id,
        num_examples=_int(obj, "num_examples", 1, 2**40),
        codec=codec,
        tensors=_tensors(obj, lim),
        metrics=_float_map(obj, "metrics"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        signature=signature,
        epoch=_epoch(obj),
    )


def decode_model(payload: bytes, limits: Limits | None = None) -> ModelMessage:
    lim = limits or Limits()
    obj = _unpack(payload, lim)
    _expect_type(obj, "model")
    return ModelMessage(
        fleet=_str(obj, "fleet", 64),
        version=_int(obj, "version"),
        round_id=_int(obj, "round"),
        model_id=_str(obj, "model_id", 256, empty=True),
        tensors=_tensors(obj, lim),
        metrics=_float_map(obj, "metrics"),
        created_at=_float(obj, "created_at") if _opt(obj, "created_at") else 0.0,
        epoch=_epoch(obj),
    )


def _training_config(raw: Any) -> TrainingConfig:
    if not isinstance(raw, dict):
        raise WireError("field 'config' must be a map")
    try:
        return TrainingConfig(
            epochs=_int(raw, "epochs", 1, 1000),
            lr=_float(raw, "lr"),
            codec=_str(raw, "codec", 16),
            max_examples=_int(raw, "max_examples", 1) if _opt(raw, "max_examples") else None,
            sample_fraction=_float(raw, "sample_fraction")
            if _opt(raw, "sample_fraction")
            else None,
        )
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
