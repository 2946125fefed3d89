"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret (at most 64 bytes, e.g. a 32-byte X25519 private key or mask seed) is the constant
term of a random polynomial of degree ``t - 1``; the share of the party with index ``x``
(1-based, never 0) is the polynomial at ``x``. Any ``t`` shares give the secret back by
Lagrange interpolation at 0; fewer reveal nothing about it (every secret is equally likely).
Shares are :data:`SHARE_BYTES` big-endian bytes on the wire.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from fedmq.errors import Rejected, RejectReason

__all__ = ["PRIME", "SHARE_BYTES", "reconstruct", "share_from_bytes", "share_to_bytes", "split"]

#: The Mersenne prime 2^521 - 1: every 64-byte secret is a field element.
PRIME = (1 << 521) - 1
SHARE_BYTES = 66
_MAX_SECRET = 64


def split(secret: bytes, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` for the parties ``xs`` (distinct, in [1, 2^32)); any
    ``threshold`` of them reconstruct it."""
    points = list(xs)
    if len(secret) > _MAX_SECRET:
        raise ValueError(f"a secret is at most {_MAX_SECRET} bytes")
    if len(set(points)) != len(points) or any(not 0 < x < 1 << 32 for x in points):
        raise ValueError("share indices must be distinct and in [1, 2^32)")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be in [1, {len(points)}]")
    coefs = [int.from_bytes(secret, "big")]
    coefs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, int] = {}
    for x in points:
        y = 0
        for c in reversed(coefs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y
    return out


def reconstruct(shares: Mapping[int, int], size: int) -> bytes:
    """The ``size``-byte secret from ``threshold`` (or more: all are used) shares.

    With more shares than the threshold the result is still the polynomial's constant term
    only when all shares lie on one polynomial of degree < len(shares); callers check the
    result against a commitment (a hash, a public key)."""
    if not shares:
        raise ValueError("no shares")
    xs = list(shares)
    secret = 0
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + shares[xi] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * size):
        raise Rejected("shares do not reconstruct a secret of the right size",
                       RejectReason.BAD_SHARE)
    return secret.to_bytes(size, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise Rejected(f"a share is {SHARE_BYTES} bytes, got {len(data)}", RejectReason.BAD_SHARE)
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise Rejected("share is not a field element", RejectReason.BAD_SHARE)
    return y
