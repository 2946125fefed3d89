"""Authenticated updates: Ed25519 device keys, signatures and the registry of enrolled devices.

A device encodes its update and signs those exact bytes (:func:`sign_update`); the payload
it sends is the envelope ``{v, type: "signed", body, sig}`` (:class:`fedmq.wire.SignedUpdate`).
The aggregator verifies ``sig`` over the ``body`` bytes it received
(:func:`verify_update` on :func:`fedmq.wire.receive_update`'s result) against the public key
enrolled for the device the body names; nothing is re-encoded, so a client in any language
signs whatever msgpack it produced. The body covers fleet, round, base version, device,
update id, codec, metrics and every tensor byte: an update cannot be forged, moved to another
device or altered; a replay of the same update id is a duplicate and a replay into a later
round fails the round check.

The registry is a JSON file ``{"devices": {device_id: {"public_key": hex, "enrolled_at": t}}}``
written atomically (an entry may add ``"max_weight": n``, the most its updates weigh in a
fold); private keys are raw 32-byte Ed25519 seeds in files readable only by
their owner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedmq.errors import Rejected, RejectReason, SecurityError
from fedmq.fsutil import atomic_write
from fedmq.topics import validate_name
from fedmq.wire import (
    ReceivedSitePartial,
    ReceivedUpdate,
    SignedUpdate,
    SitePartial,
    UpdateMessage,
    encode,
)

__all__ = [
    "DeviceKey",
    "Registry",
    "create_key",
    "load_key",
    "load_or_create_key",
    "sign_site_partial",
    "sign_update",
    "verify_site_partial",
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


def load_key(path: Path, private_only: bool = True) -> DeviceKey:
    """The key at ``path``: a regular file holding a hex seed that (``private_only``) only
    its owner can read."""
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise SecurityError(f"key file {path} is not a regular file (a directory?)")
        if private_only and st.st_mode & 0o077:
            raise SecurityError(
                f"key file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                "a private key must be 0600; `chmod 600` it if it never leaked, or make a new "
                "one with `fedmq keygen --force` and enrol that"
            )
        raw = path.read_bytes().strip()
    except OSError as exc:
        raise SecurityError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    try:
        seed = bytes.fromhex(raw.decode()) if len(raw) == 64 else raw
    except ValueError as exc:
        raise SecurityError(f"key file {path} is not a hex Ed25519 seed") from exc
    if len(seed) != 32:
        raise SecurityError(f"key file {path} is not a hex Ed25519 seed (32 bytes)")
    return DeviceKey.from_seed(seed)


def create_key(path: Path, overwrite: bool = False) -> DeviceKey:
    """A new key written to ``path`` (mode 0600 whatever the umask); an existing file is
    replaced only with ``overwrite``."""
    path = Path(path)
    key = DeviceKey.generate()
    data = (key.seed().hex() + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and path.exists():
            if not path.is_file():
                raise SecurityError(f"key file {path} is not a regular file (a directory?)")
            atomic_write(path, data, mode=0o600)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(data)
    except FileExistsError as exc:
        raise SecurityError(f"key file {path} exists; not overwritten") from exc
    except OSError as exc:
        raise SecurityError(f"cannot write key file {path}: {exc.strerror or exc}") from exc
    return key


def load_or_create_key(path: Path) -> DeviceKey:
    """The device's key at ``path``, created (mode 0600) on first use."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        return load_key(path)
    return create_key(path)


def sign_update(update: UpdateMessage, key: DeviceKey) -> bytes:
    """The signed envelope payload of ``update``: its encoding, signed as is."""
    body = encode(update)
    return encode(SignedUpdate(body, key.sign(body)))


def _public_key(hex_key: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(hex_key)
        if len(raw) != 32:
            raise ValueError("length")
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecurityError(f"not an Ed25519 public key: {hex_key!r}") from exc


def _verify(
    signature: bytes | None, body: bytes, public_key_hex: str | None, who: str, what: str
) -> None:
    """Raise Rejected (unknown_device / unsigned / bad_signature) unless ``signature`` holds
    over the exact ``body`` bytes for the key enrolled for ``who``."""
    if public_key_hex is None:
        raise Rejected(f"{who} is not enrolled", RejectReason.UNKNOWN_DEVICE)
    if not signature:
        raise Rejected(f"{what} is not signed", RejectReason.UNSIGNED)
    try:
        _public_key(public_key_hex).verify(signature, body)
    except InvalidSignature as exc:
        raise Rejected(f"signature does not verify for {who}",
                       RejectReason.BAD_SIGNATURE) from exc


def verify_update(received: ReceivedUpdate, public_key_hex: str | None) -> None:
    """Raise Rejected (unknown_device / unsigned / bad_signature) unless the envelope's
    signature holds over the exact body bytes received."""
    _verify(received.signature, received.body, public_key_hex,
            f"device {received.message.device!r}", "update")


def sign_site_partial(partial: SitePartial, key: DeviceKey) -> bytes:
    """The signed envelope payload of a gateway's site partial: its encoding, signed as is
    with the gateway's key (the same envelope as a signed update; the body's ``type`` says
    what it holds)."""
    body = encode(partial)
    return encode(SignedUpdate(body, key.sign(body)))


def verify_site_partial(received: ReceivedSitePartial, public_key_hex: str | None) -> None:
    """Like :func:`verify_update`, for a site partial and its gateway's enrolled key (the
    gateway registry, a separate file from the device registry: docs/scaling.md)."""
    _verify(received.signature, received.body, public_key_hex,
            f"gateway {received.message.gateway!r}", "site partial")


class Registry:
    """Enrolled devices and their public keys (a JSON file, re-read when it changes).

    Every way the file can be wrong (unreadable, a directory, not JSON, ``devices`` not an
    object of ``{"public_key": hex}``) is a :class:`SecurityError` naming the path and what
    is wrong.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._bad_mtime: float | None = None
        self._devices: dict[str, str] = {}
        self._caps: dict[str, int] = {}

    @staticmethod
    def fingerprint(public_key_hex: str) -> str:
        """A short, stable name of a public key for logs: ``SHA256:`` + 16 hex digits."""
        digest = hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()
        return f"SHA256:{digest[:16]}"

    def _read(self) -> dict[str, dict[str, object]]:
        """The registry's ``devices`` table, checked; {} when the file does not exist."""
        try:
            if self.path.exists() and not self.path.is_file():
                raise SecurityError(f"registry {self.path} is not a file (a directory?)")
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            why = exc.strerror or exc
            raise SecurityError(f"cannot read registry {self.path}: {why}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SecurityError(f"registry {self.path} is malformed: not JSON ({exc})") from exc
        devices = data.get("devices") if isinstance(data, dict) else None
        if not isinstance(devices, dict):
            found = type(devices).__name__ if isinstance(data, dict) else type(data).__name__
            raise SecurityError(
                f"registry {self.path} is malformed: expected {{\"devices\": {{DEVICE: "
                f"{{\"public_key\": HEX}}}}}}, found {found}"
            )
        for device, entry in devices.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
                raise SecurityError(
                    f"registry {self.path} is malformed: device {device!r} has no "
                    "\"public_key\" string"
                )
        return devices

    def _max_weight(self, device: str, entry: Mapping[str, object]) -> int | None:
        """An enrolment's optional ``max_weight``: a positive integer (or absent/null)."""
        value = entry.get("max_weight")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SecurityError(
                f"registry {self.path} is malformed: device {device!r} has max_weight "
                f"{value!r}, expected an integer >= 1"
            )
        return value

    def _load(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            self._devices, self._mtime, self._bad_mtime = {}, None, None
            self._caps = {}
            return
        except OSError as exc:
            why = exc.strerror or exc
            raise SecurityError(f"cannot read registry {self.path}: {why}") from exc
        if mtime == self._mtime:
            return
        try:
            devices = self._read()
            parsed = {str(k): str(v["public_key"]) for k, v in devices.items()}
            caps = {str(k): self._max_weight(k, v) for k, v in devices.items()}
        except SecurityError as exc:
            if self._mtime is None:
                raise
            # A running service keeps the last good registry (and fails closed for devices
            # added since) rather than rejecting everyone over one bad edit.
            if mtime != self._bad_mtime:
                log.error("%s: keeping the previous one", exc)
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

    def max_weight(self, device: str) -> int | None:
        """The device's optional ``max_weight``: its enrolment's cap on the fold weight (the
        most examples its updates count for, whatever they claim)."""
        self._load()
        return self._caps.get(device)

    def enroll(self, device: str, public_key_hex: str, replace: bool = False) -> str | None:
        """Enrol ``device`` with ``public_key_hex``; returns the key it had before, if any.

        A device enrolled with another key is refused unless ``replace`` (then the old and
        the new fingerprints are logged); enrolling the same key again changes nothing.
        """
        validate_name(device, "device")
        _public_key(public_key_hex)
        devices = self._read()
        old = devices.get(device)
        old_key = str(old["public_key"]) if old is not None else None
        if old_key == public_key_hex:
            return old_key
        if old_key is not None:
            if not replace:
                raise SecurityError(
                    f"device {device} is already enrolled in {self.path} with key "
                    f"{self.fingerprint(old_key)}; refusing to replace it with "
                    f"{self.fingerprint(public_key_hex)} (use --replace if the device "
                    "really has a new key)"
                )
            log.warning("device %s: replacing key %s with %s", device,
                        self.fingerprint(old_key), self.fingerprint(public_key_hex))
        devices[device] = {"public_key": public_key_hex, "enrolled_at": time.time()}
        self._write({"devices": devices})
        return old_key

    def revoke(self, device: str) -> bool:
        devices = self._read()
        if devices.pop(device, None) is None:
            return False
        self._write({"devices": devices})
        return True

    def _write(self, data: object) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        except OSError as exc:
            why = exc.strerror or exc
            raise SecurityError(f"cannot write registry {self.path}: {why}") from exc
        self._mtime = None
