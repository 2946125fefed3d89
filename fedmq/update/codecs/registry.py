"""The codec registry: every place that lists, validates or uses codecs reads it."""

from __future__ import annotations

from fedmq.errors import RejectReason, WireError
from fedmq.update.codecs.base import Codec

__all__ = ["codec_names", "get_codec", "register", "unregister"]

_MAX_NAME = 16  # the wire's limit for the update's ``codec`` field
_CODECS: dict[str, Codec] = {}


def register(codec: Codec, *, replace: bool = False) -> Codec:
    """Make ``codec`` known by its name (to the wire, the fold, configs and CLIs)."""
    name = getattr(codec, "name", None)
    if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME or not name.isprintable():
        raise ValueError(f"a codec name is 1-{_MAX_NAME} printable characters, got {name!r}")
    if name in _CODECS and not replace:
        raise ValueError(f"codec {name!r} is already registered")
    _CODECS[name] = codec
    return codec


def unregister(name: str) -> None:
    """Forget a codec (tests and plugins that registered one for a while)."""
    _CODECS.pop(name, None)


def get_codec(name: str) -> Codec:
    """The codec called ``name``; an unknown name is a ``bad_codec`` :class:`WireError`."""
    codec = _CODECS.get(name)
    if codec is None:
        raise WireError(
            f"unknown codec {name!r} (known: {', '.join(_CODECS)})", RejectReason.BAD_CODEC
        )
    return codec


def codec_names() -> tuple[str, ...]:
    """Registered codec names, in registration order."""
    return tuple(_CODECS)
