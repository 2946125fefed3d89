"""Authenticated updates: Ed25519 device keys, signatures and the registry of enrolled devices.

A device signs ``wire.signing_bytes(update)`` (the update encoded without its signature,
which covers fleet, round, base version, device, update id and every tensor byte). The
aggregator verifies the signature against the public key enrolled for that device id, so
an update cannot be forged, moved to another device or altered; a replay of the same update
id is a duplicate and a replay into a later round fails the round check.

The registry is a JSON file ``{"devices": {device_id: {"public_key": hex, "enrolled_at": t}}}``
written atomically (an entry may add ``"max_examples": n``, the most its updates weigh in a
fold); private keys are raw 32-byte Ed25519 seeds in files readable only by
their owner.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.errors import RejectReason, SecurityError, WireError
from fedmq.fsutil import atomic_write
from fedmq.topics import validate_name
from fedmq.wire import UpdateMessage, signing_bytes

__all__ = [
    "DeviceKey",
    "Registry",
    "load_or_create_key",
    "sign_update",
    "verify_update",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceKey:
    """A device's Ed25519 key pair."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        if len(seed) != 32:
            raise SecurityError("an Ed25519 private key is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_hex(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            .hex()
        )

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def load_or_create_key(path: Path) -> DeviceKey:
    """The device's key at ``path``, created (mode 0600) on first use."""
    path = Path(path)
    if path.exists():
        raw = path.read_bytes().strip()
        try:
            seed = bytes.fromhex(raw.decode()) if len(raw) == 64 else raw
        except ValueError as exc:
            raise SecurityError(f"key file {path} is not a hex Ed25519 seed") from exc
        return DeviceKey.from_seed(seed)
    key = DeviceKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.seed().hex() + "\n")
    return key


def sign_update(update: UpdateMessage, key: DeviceKey) -> UpdateMessage:
    return replace(update, signature=key.sign(signing_bytes(update)))


def _public_key(hex_key: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(hex_key)
        if len(raw) != 32:
            raise ValueError("length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecurityError(f"not an Ed25519 public key: {hex_key!r}") from exc


def verify_update(update: UpdateMessage, public_key_hex: str | None) -> None:
    """Raise WireError (unknown_device / unsigned / bad_signature) unless the signature holds."""
    if public_key_hex is None:
        raise WireError(f"device {update.device!r} is not enrolled", RejectReason.UNKNOWN_DEVICE)
    if not update.signature:
        raise WireError("update is not signed", RejectReason.UNSIGNED)
    try:
        _public_key(public_key_hex).verify(update.signature, signing_bytes(update))
    except InvalidSignature as exc:
        raise WireError(
            f"signature does not verify for device {update.device!r}", RejectReason.BAD_SIGNATURE
        ) from exc


def _max_examples(device: object, entry: Any) -> int | None:
    """An enrolment's optional ``max_examples``: a positive integer (or absent/null)."""
    value = entry.get("max_examples")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"device {device}: max_examples must be an integer >= 1, got {value!r}")
    return value


class Registry:
    """Enrolled devices and their public keys (a JSON file, re-read when it changes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._bad_mtime: float | None = None
        self._devices: dict[str, str] = {}
        self._caps: dict[str, int] = {}

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._devices, self._mtime, self._bad_mtime = {}, None, None
            self._caps = {}
            return
        if mtime == self._mtime:
            return
        try:
            data = json.loads(self.path.read_text())
            devices = data["devices"]
            parsed = {str(k): str(v["public_key"]) for k, v in devices.items()}
            caps = {str(k): _max_examples(k, v) for k, v in devices.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if self._mtime is None:
                raise SecurityError(f"registry {self.path} is malformed: {exc}") from exc
            # A running service keeps the last good registry (and fails closed for devices
            # added since) rather than rejecting everyone over one bad edit.
            if mtime != self._bad_mtime:
                log.error(
                    "registry %s is malformed (%s): keeping the previous one", self.path, exc
                )
                self._bad_mtime = mtime
            return
        self._devices, self._mtime, self._bad_mtime = parsed, mtime, None
        self._caps = {k: v for k, v in caps.items() if v is not None}

    def devices(self) -> Mapping[str, str]:
        self._load()
        return dict(self._devices)

    def public_key(self, device: str) -> str | None:
        self._load()
        return self._devices.get(device)

    def max_examples(self, device: str) -> int | None:
        """The device's optional ``max_examples`` (its enrolment's cap on the fold weight)."""
        self._load()
        return self._caps.get(device)

    def enroll(self, device: str, public_key_hex: str) -> None:
        validate_name(device, "device")
        _public_key(public_key_hex)
        data: dict[str, dict[str, dict[str, object]]] = {"devices": {}}
        if self.path.exists():
            data = json.loads(self.path.read_text())
        data.setdefault("devices", {})[device] = {
            "public_key": public_key_hex,
            "enrolled_at": time.time(),
        }
        self._write(data)

    def revoke(self, device: str) -> bool:
        if not self.path.exists():
            return False
        data = json.loads(self.path.read_text())
        removed = data.get("devices", {}).pop(device, None) is not None
        self._write(data)
        return removed

    def _write(self, data: object) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        self._mtime = None
