"""Codec negotiation: which online devices can send an update in the round's codec.

A device lists the codecs it can encode in its retained status, ``capabilities["codecs"]``
(docs/protocol.md). A status without that capability comes from an agent older than the
negotiation and counts as supporting :data:`LEGACY_CODECS`, the three codecs every agent
has had. The coordinator selects only devices that support the round's codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LEGACY_CODECS", "status_codecs"]

#: What a status without a ``codecs`` capability is taken to support (older agents).
LEGACY_CODECS = frozenset({"float32", "float16", "int8"})


def status_codecs(capabilities: Mapping[str, Any]) -> frozenset[str]:
    """The codecs a device's status capabilities say it supports.

    Raises ValueError when ``codecs`` is present but not a list of strings (the caller logs
    it once and treats the device as supporting none)."""
    if "codecs" not in capabilities:
        return LEGACY_CODECS
    codecs = capabilities["codecs"]
    if not isinstance(codecs, list | tuple) or not all(isinstance(c, str) for c in codecs):
        raise ValueError(f"capability 'codecs' must be a list of codec names, got {codecs!r}")
    return frozenset(codecs)
