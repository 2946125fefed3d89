"""Wire messages of the secure-aggregation phases, strict and bounded.

Devices send (each signed: ``{v: 2, type: "signed", body, sig}``, Ed25519 over the exact
body bytes, like updates), on ``fl/<fleet>/secagg/<device>``:

- ``sa_keys``: the round's two X25519 public keys (``c_pk`` for share encryption, ``s_pk``
  for pairwise masks);
- ``sa_shares``: for each neighbour, its encrypted shares (``ct``) and hash commitments of
  the two shares (``cb``, ``cs``), plus ``b_commit``, the hash of the self-mask seed;
- ``sa_masked``: the masked input, ``count`` values of ``bits`` bits packed in ``data``;
- ``sa_unmask``: the shares the server asks for (``kind`` ``"b"`` of a survivor's self-mask
  seed, ``"s"`` of a dropped device's mask key) with the nonce that opens each commitment.

The aggregator publishes (retained, QoS 1), on ``fl/<fleet>/secagg/server`` the
``sa_roster`` (the signed ``sa_keys`` of every device in the round, ring size, graph degree,
threshold, clip, vector length) and later ``sa_survivors``; on
``fl/<fleet>/secagg/relay/<device>`` the ``sa_relay`` (ciphertexts addressed to that
device).

Every message names fleet, epoch and round; decoding checks types, sizes and lengths before
anything else and raises :class:`WireError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from fedmq.errors import RejectReason, WireError
from fedmq.secagg.shamir import SHARE_BYTES

__all__ = [
    "DEVICE_TYPES",
    "EncShare",
    "KeysMsg",
    "MaskedMsg",
    "Message",
    "Relay",
    "RelayShare",
    "Reveal",
    "Roster",
    "SecAggLimits",
    "SharesMsg",
    "Signed",
    "Survivors",
    "UnmaskMsg",
    "context",
    "decode",
    "decode_signed",
    "encode",
]

SCHEMA_VERSION = 2
_KEY = 32
_HASH = 32
_NONCE = 16
_SIG = 64
_MAX_CT = 256
_MAX_ADVERT = 512
_MAX_TEXT = 64


@dataclass(frozen=True)
class SecAggLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_devices: int = 10_000


@dataclass(frozen=True)
class KeysMsg:
    fleet: str
    epoch: str
    round_id: int
    device: str
    c_pk: bytes
    s_pk: bytes
    TYPE = "sa_keys"


@dataclass(frozen=True)
class Roster:
    fleet: str
    epoch: str
    round_id: int
    bits: int
    degree: int
    threshold: int
    min_survivors: int
    clip: float
    length: int
    adverts: tuple[bytes, ...]  # signed sa_keys payloads, as the devices sent them
    TYPE = "sa_roster"


@dataclass(frozen=True)
class EncShare:
    to: str
    ct: bytes
    cb: bytes
    cs: bytes


@dataclass(frozen=True)
class SharesMsg:
    fleet: str
    epoch: str
    round_id: int
    device: str
    b_commit: bytes
    shares: tuple[EncShare, ...]
    TYPE = "sa_shares"


@dataclass(frozen=True)
class RelayShare:
    sender: str
    ct: bytes


@dataclass(frozen=True)
class Relay:
    fleet: str
    epoch: str
    round_id: int
    device: str
    shares: tuple[RelayShare, ...]
    TYPE = "sa_relay"


@dataclass(frozen=True)
class MaskedMsg:
    fleet: str
    epoch: str
    round_id: int
    device: str
    num_examples: int
    bits: int
    count: int
    data: bytes
    metrics: dict[str, float] = field(default_factory=dict)
    TYPE = "sa_masked"


@dataclass(frozen=True)
class Survivors:
    fleet: str
    epoch: str
    round_id: int
    survivors: tuple[str, ...]
    TYPE = "sa_survivors"


@dataclass(frozen=True)
class Reveal:
    of: str
    kind: str  # "b": self-mask seed share of a survivor; "s": mask-key share of a dropout
    share: bytes
    nonce: bytes


@dataclass(frozen=True)
class UnmaskMsg:
    fleet: str
    epoch: str
    round_id: int
    device: str
    reveals: tuple[Reveal, ...]
    TYPE = "sa_unmask"


@dataclass(frozen=True)
class Signed:
    body: bytes
    sig: bytes


Message = KeysMsg | Roster | SharesMsg | Relay | MaskedMsg | Survivors | UnmaskMsg
#: Messages a device sends (always signed).
DEVICE_TYPES = (KeysMsg.TYPE, SharesMsg.TYPE, MaskedMsg.TYPE, UnmaskMsg.TYPE)


def context(fleet: str, epoch: str, round_id: int) -> bytes:
    """The bytes that bind keys, masks and shares to one round."""
    return f"{fleet}|{epoch}|{round_id}".encode()


def _head(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"v": SCHEMA_VERSION, "type": msg.TYPE, "fleet": msg.fleet,
                           "round": msg.round_id}
    if msg.epoch:
        out["epoch"] = msg.epoch
    return out


def encode(msg: Message | Signed) -> bytes:
    if isinstance(msg, Signed):
        obj: dict[str, Any] = {"v": SCHEMA_VERSION, "type": "signed", "body": msg.body,
                               "sig": msg.sig}
        return bytes(msgpack.packb(obj, use_bin_type=True))
    obj = _head(msg)
    if isinstance(msg, KeysMsg):
        obj.update(device=msg.device, c_pk=msg.c_pk, s_pk=msg.s_pk)
    elif isinstance(msg, Roster):
        obj.update(bits=msg.bits, degree=msg.degree, threshold=msg.threshold,
                   min_survivors=msg.min_survivors, clip=msg.clip, length=msg.length,
                   adverts=list(msg.adverts))
    elif isinstance(msg, SharesMsg):
        obj.update(device=msg.device, b_commit=msg.b_commit,
                   shares=[[s.to, s.ct, s.cb, s.cs] for s in msg.shares])
    elif isinstance(msg, Relay):
        obj.update(device=msg.device, shares=[[s.sender, s.ct] for s in msg.shares])
    elif isinstance(msg, MaskedMsg):
        obj.update(device=msg.device, num_examples=msg.num_examples, bits=msg.bits,
                   count=msg.count, data=msg.data, metrics=dict(msg.metrics))
    elif isinstance(msg, Survivors):
        obj.update(survivors=list(msg.survivors))
    else:
        obj.update(device=msg.device,
                   reveals=[[r.of, r.kind, r.share, r.nonce] for r in msg.reveals])
    return bytes(msgpack.packb(obj, use_bin_type=True))


# ---------------------------------------------------------------------------- decoding


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not allowed")


def _unpack(payload: bytes, limits: SecAggLimits) -> dict[str, Any]:
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise WireError("payload is not bytes")
    if len(payload) > limits.max_bytes:
        raise WireError(f"payload of {len(payload)} bytes exceeds the limit of "
                        f"{limits.max_bytes}", RejectReason.TOO_LARGE)
    try:
        obj = msgpack.unpackb(
            payload, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
            max_str_len=4096, max_bin_len=limits.max_bytes,
            max_array_len=max(limits.max_devices, 8), max_map_len=64, max_ext_len=0,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types on garbage
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(f"message must be a map, got {type(obj).__name__}")
    version = obj.get("v")
    if isinstance(version, bool) or not isinstance(version, int):
        raise WireError("missing schema version 'v'", RejectReason.SCHEMA)
    if version != SCHEMA_VERSION:
        raise WireError(f"schema version {version} is not supported", RejectReason.SCHEMA)
    return obj


def _get(obj: Any, key: str | int, kind: type | tuple[type, ...], what: str) -> Any:
    try:
        value = obj[key]
    except (KeyError, IndexError, TypeError):
        raise WireError(f"missing field {key!r}") from None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise WireError(f"field {key!r} must be {what}, got {type(value).__name__}")
    return value


def _text(obj: Any, key: str | int, device: bool = False, max_len: int = _MAX_TEXT) -> str:
    value: str = _get(obj, key, str, "a string")
    if not value or len(value) > max_len or not value.isprintable():
        raise WireError(f"field {key!r} is empty, too long or not printable")
    if device and any(c in value for c in "/+#\0 "):
        raise WireError(f"field {key!r} is not a valid device id")
    return value


def _int(obj: Any, key: str | int, lo: int, hi: int) -> int:
    value: int = _get(obj, key, int, "an integer")
    if not lo <= value <= hi:
        raise WireError(f"field {key!r}={value} is outside [{lo}, {hi}]")
    return value


def _bin(obj: Any, key: str | int, lo: int, hi: int | None = None) -> bytes:
    value: bytes = _get(obj, key, bytes, "bytes")
    hi = lo if hi is None else hi
    if not lo <= len(value) <= hi:
        raise WireError(f"field {key!r} has {len(value)} bytes, expected {lo}..{hi}")
    return value


def _list(obj: Any, key: str | int, limit: int, width: int | None = None) -> list[Any]:
    value: list[Any] = _get(obj, key, list, "a list")
    if len(value) > limit:
        raise WireError(f"field {key!r} has more than {limit} entries", RejectReason.TOO_LARGE)
    if width is not None:
        for item in value:
            if not isinstance(item, list) or len(item) != width:
                raise WireError(f"field {key!r}: each entry must be a list of {width}")
    return value


def _unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise WireError(f"{what} names a device twice")


def decode_signed(payload: bytes, limits: SecAggLimits | None = None) -> tuple[Signed, Message]:
    """A device's signed message: the envelope and its decoded body (not yet verified)."""
    limits = limits or SecAggLimits()
    obj = _unpack(payload, limits)
    if obj.get("type") != "signed":
        raise WireError("secure-aggregation messages from devices must be signed",
                        RejectReason.UNSIGNED)
    env = Signed(_bin(obj, "body", 1, limits.max_bytes), _bin(obj, "sig", _SIG))
    msg = decode(env.body, limits)
    if msg.TYPE not in DEVICE_TYPES:
        raise WireError(f"a {msg.TYPE!r} message is not a device's")
    return env, msg


def decode(payload: bytes, limits: SecAggLimits | None = None) -> Message:
    limits = limits or SecAggLimits()
    obj = _unpack(payload, limits)
    kind = obj.get("type")
    fleet = _text(obj, "fleet")
    rid = _int(obj, "round", 1, 2**62)
    epoch = _text(obj, "epoch") if obj.get("epoch") is not None else ""
    n = limits.max_devices
    if kind == KeysMsg.TYPE:
        return KeysMsg(fleet, epoch, rid, _text(obj, "device", True), _bin(obj, "c_pk", _KEY),
                       _bin(obj, "s_pk", _KEY))
    if kind == Roster.TYPE:
        clip = _get(obj, "clip", (int, float), "a number")
        if not 0 < float(clip) < 1e30:
            raise WireError(f"field 'clip'={clip} is not a positive finite number")
        adverts = [_bin([a], 0, 1, _MAX_ADVERT) for a in _list(obj, "adverts", n)]
        degree = _int(obj, "degree", 0, n)
        return Roster(fleet, epoch, rid, _int(obj, "bits", 1, 32), degree,
                      _int(obj, "threshold", 1, max(degree, 1)),
                      _int(obj, "min_survivors", 1, n), float(clip),
                      _int(obj, "length", 1, 1 << 31), tuple(adverts))
    if kind == SharesMsg.TYPE:
        shares = tuple(
            EncShare(_text(s, 0, True), _bin(s, 1, 1, _MAX_CT), _bin(s, 2, _HASH),
                     _bin(s, 3, _HASH))
            for s in _list(obj, "shares", n, 4)
        )
        _unique([s.to for s in shares], "shares")
        return SharesMsg(fleet, epoch, rid, _text(obj, "device", True),
                         _bin(obj, "b_commit", _HASH), shares)
    if kind == Relay.TYPE:
        relayed = tuple(RelayShare(_text(s, 0, True), _bin(s, 1, 1, _MAX_CT))
                        for s in _list(obj, "shares", n, 2))
        _unique([s.sender for s in relayed], "relay")
        return Relay(fleet, epoch, rid, _text(obj, "device", True), relayed)
    if kind == MaskedMsg.TYPE:
        raw_metrics = _get(obj, "metrics", dict, "a map")
        if len(raw_metrics) > 32:
            raise WireError("field 'metrics' has more than 32 entries")
        metrics: dict[str, float] = {}
        for k, v in raw_metrics.items():
            if not isinstance(k, str) or len(k) > 128 or isinstance(v, bool) \
                    or not isinstance(v, int | float) or not abs(float(v)) < float("inf"):
                raise WireError("field 'metrics' has a bad entry", RejectReason.NON_FINITE)
            metrics[k] = float(v)
        return MaskedMsg(fleet, epoch, rid, _text(obj, "device", True),
                         _int(obj, "num_examples", 0, 2**62), _int(obj, "bits", 1, 32),
                         _int(obj, "count", 1, 1 << 31),
                         _bin(obj, "data", 1, limits.max_bytes), metrics)
    if kind == Survivors.TYPE:
        survivors = [_text([d], 0, True) for d in _list(obj, "survivors", n)]
        _unique(survivors, "survivors")
        return Survivors(fleet, epoch, rid, tuple(survivors))
    if kind == UnmaskMsg.TYPE:
        reveals = []
        for r in _list(obj, "reveals", 2 * n, 4):
            rkind = _text(r, 1)
            if rkind not in ("b", "s"):
                raise WireError(f"reveal kind {rkind!r} is not 'b' or 's'")
            reveals.append(Reveal(_text(r, 0, True), rkind, _bin(r, 2, SHARE_BYTES),
                                  _bin(r, 3, _NONCE)))
        _unique([r.of for r in reveals], "reveals")
        return UnmaskMsg(fleet, epoch, rid, _text(obj, "device", True), tuple(reveals))
    raise WireError(f"unknown secure-aggregation message type {kind!r}")
