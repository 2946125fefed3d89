"""Mosquitto password files: ``$7$`` hashes, parsing and formatting, new passwords."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping

from fedmq.errors import ConfigError

__all__ = [
    "PBKDF2_ITERATIONS",
    "format_passwd",
    "hash_password",
    "new_password",
    "parse_passwd",
    "verify_password",
]

# Mosquitto's "$7$" format: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte digest, standard base64.
PBKDF2_ITERATIONS = 20_000
_SALT_BYTES = 12


def hash_password(
    password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """Mosquitto 2.0's ``$7$`` hash (what ``mosquitto_passwd`` writes by default).

    Done in Python rather than with ``mosquitto_passwd -b``, which would put the password on
    a command line where every local user can read it (``/proc/PID/cmdline``).
    """
    if not password:
        raise ConfigError("empty password")
    if "\n" in password or "\r" in password:
        raise ConfigError("a password cannot contain a line break")
    if iterations < 1:
        raise ConfigError("iterations must be positive")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(encoded: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` (or ``$6$``) hash of a password file."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations = int(parts[2])
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except ValueError:
        return False
    return False


def parse_passwd(text: str) -> dict[str, str]:
    """``username -> hash`` of a Mosquitto password file (comments and blanks skipped)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ConfigError(f"password file line {n} is not `user:hash`")
        out[user] = hashed
    return out


def format_passwd(entries: Mapping[str, str]) -> str:
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


def new_password() -> str:
    return secrets.token_urlsafe(24)
