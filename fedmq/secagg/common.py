"""Helpers shared by the client and server state machines: signatures, commitments, mask
contexts and share encryption."""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedmq.errors import Rejected, RejectReason
from fedmq.secagg.messages import Message, Signed, encode
from fedmq.secagg.prg import derive_key
from fedmq.signing import DeviceKey

__all__ = [
    "commit",
    "decrypt_share",
    "encrypt_share",
    "pair_context",
    "seed_commit",
    "self_context",
    "sign",
    "verify",
]

_GCM_NONCE = 12


def sign(msg: Message, key: DeviceKey) -> bytes:
    body = encode(msg)
    return encode(Signed(body, key.sign(body)))


def verify(env: Signed, device: str, public_key_hex: str | None) -> None:
    """Raise Rejected (unknown_device / bad_signature) unless ``env`` is signed by the key
    enrolled for ``device``."""
    if public_key_hex is None:
        raise Rejected(f"device {device!r} is not enrolled", RejectReason.UNKNOWN_DEVICE)
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(env.sig, env.body)
    except (InvalidSignature, ValueError) as exc:
        raise Rejected(f"signature does not verify for device {device!r}",
                       RejectReason.BAD_SIGNATURE) from exc


def commit(kind: str, ctx: bytes, dealer: str, holder: str, nonce: bytes, share: bytes) -> bytes:
    """The hash commitment to one share (``kind`` "b" or "s") dealt by ``dealer`` to
    ``holder``; the 16-byte random ``nonce`` hides the share until it is revealed."""
    h = hashlib.sha256(b"fedmq-secagg-share|" + kind.encode() + b"|" + ctx)
    h.update(b"|" + dealer.encode() + b"|" + holder.encode() + b"|" + nonce + share)
    return h.digest()


def seed_commit(ctx: bytes, device: str, seed: bytes) -> bytes:
    return hashlib.sha256(b"fedmq-secagg-seed|" + ctx + b"|" + device.encode() + seed).digest()


def self_context(ctx: bytes, device: str) -> bytes:
    return ctx + b"|self|" + device.encode()


def pair_context(ctx: bytes, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return ctx + b"|pair|" + lo.encode() + b"|" + hi.encode()


def _share_key(secret: bytes, ctx: bytes, sender: str, recipient: str) -> bytes:
    return derive_key(secret, b"share", ctx + b"|" + sender.encode() + b">" + recipient.encode())


def encrypt_share(secret: bytes, ctx: bytes, sender: str, recipient: str, nonce: bytes,
                  plaintext: bytes) -> bytes:
    """AES-256-GCM of ``plaintext`` under the channel key; ``nonce`` (12 bytes) first."""
    ad = ctx + b"|" + sender.encode() + b">" + recipient.encode()
    key = _share_key(secret, ctx, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, ad)


def decrypt_share(secret: bytes, ctx: bytes, sender: str, recipient: str, ct: bytes) -> bytes:
    ad = ctx + b"|" + sender.encode() + b">" + recipient.encode()
    key = _share_key(secret, ctx, sender, recipient)
    try:
        return AESGCM(key).decrypt(ct[:_GCM_NONCE], ct[_GCM_NONCE:], ad)
    except (InvalidTag, ValueError) as exc:
        raise Rejected(f"share from {sender!r} does not decrypt", RejectReason.BAD_SHARE) from exc
