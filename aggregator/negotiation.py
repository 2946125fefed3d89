"""Codec negotiation: which online devices can send an update in the round's codec.

A device lists the codecs it can encode in its retained status, ``capabilities["codecs"]``
(docs/protocol.md). A status without that capability comes from an agent older than the
negotiation and counts as supporting :data:`LEGACY_CODECS`, the three codecs every agent
has had. The coordinator selects only devices that support the round's codec.

A device that never trains (an edge agent with ``eval_only = true``) says so with
``capabilities["eval_only"] = true`` (:func:`status_eval_only`): it is never selected to
train, and its evaluation-only reports are taken even when it is not selected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["LEGACY_CODECS", "status_codecs", "status_eval_only"]

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


def status_eval_only(capabilities: Mapping[str, Any]) -> bool:
    """Whether a device's status capabilities say it only evaluates (never trains).

    Absent means False (a training device, or an agent older than the capability). Raises
    ValueError when ``eval_only`` is present but not a bool (``1``, ``"true"``: refused)."""
    value = capabilities.get("eval_only", False)
    if not isinstance(value, bool):
        raise ValueError(f"capability 'eval_only' must be true or false, got {value!r}")
    return value
