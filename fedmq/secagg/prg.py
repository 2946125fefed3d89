"""Key agreement and the cryptographic mask generator.

Pairwise seeds come from X25519 (``agree``); every seed is expanded by HKDF-SHA256 (info
binds the purpose and the round context) into a ChaCha20 key whose keystream, read as
little-endian uint32 and reduced modulo ``2^bits``, is the mask (uniform, since ``2^bits``
divides ``2^32``). Share encryption uses AES-256-GCM under an HKDF key of the channel
agreement.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmq.errors import Rejected, RejectReason

__all__ = ["agree", "derive_key", "mask", "public_bytes"]

_NONCE = bytes(16)  # ChaCha20's 16-byte counter||nonce: each derived key is used once
_BLOCK = 1 << 20  # values per keystream call (bounded temporary memory)


def derive_key(secret: bytes, label: bytes, context: bytes) -> bytes:
    """A 32-byte key for ``label`` in ``context`` (HKDF-SHA256)."""
    info = b"fedmq-secagg|" + label + b"|" + context
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret with ``peer_public`` (32 raw bytes)."""
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length, or a low-order point (all-zero secret)
        raise Rejected(f"bad X25519 public key: {exc}", RejectReason.MALFORMED) from exc


def mask(seed: bytes, length: int, bits: int, context: bytes) -> np.ndarray:
    """``length`` uniform values in [0, 2^bits) (uint32) expanded from ``seed``."""
    if not 1 <= bits <= 32:
        raise ValueError("bits must be in [1, 32]")
    key = derive_key(seed, b"mask", context)
    enc = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
    out = np.empty(length, np.uint32)
    for start in range(0, length, _BLOCK):
        n = min(_BLOCK, length - start)
        out[start : start + n] = np.frombuffer(enc.update(bytes(4 * n)), "<u4")
    if bits < 32:
        out &= np.uint32((1 << bits) - 1)
    return out
