"""Staleness of an update in asynchronous buffered rounds (the ``fedbuff`` round policy).

An update trained on model version ``base`` and arriving while version ``current`` is the
newest has staleness ``s = current - base``. It is folded with its usual weight (examples,
capped) times ``(1 + s) ** -exponent``; an update with ``s > max_staleness`` (or a base newer
than the current version) is refused. Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedmq.errors import Rejected, RejectReason

__all__ = ["StalenessRule"]


@dataclass(frozen=True)
class StalenessRule:
    """How far behind an update's base version may be, and how much it then counts."""

    max_staleness: int
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.max_staleness, bool) or self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness!r}")
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"staleness exponent must be a finite number >= 0, "
                             f"got {self.exponent!r}")

    def staleness(self, current_version: int, base_version: int) -> int:
        """``current - base``; raise :class:`WireError` (``wrong_base_version``, the
        staleness in the reason) for a base newer than current or older than allowed."""
        s = current_version - base_version
        if s < 0:
            raise Rejected(
                f"base version {base_version} is newer than the current version "
                f"{current_version}", RejectReason.WRONG_BASE,
            )
        if s > self.max_staleness:
            raise Rejected(
                f"stale: base version {base_version} is {s} version(s) behind the current "
                f"version {current_version} (max_staleness {self.max_staleness})",
                RejectReason.WRONG_BASE,
            )
        return s

    def factor(self, staleness: int) -> float:
        """The weight factor ``(1 + s) ** -exponent`` (1.0 for a fresh update)."""
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        return float((1.0 + staleness) ** -self.exponent)

    def to_json(self) -> dict[str, Any]:
        return {"max_staleness": self.max_staleness, "exponent": self.exponent}

    @classmethod
    def from_json(cls, obj: Any) -> StalenessRule:
        if not isinstance(obj, dict):
            raise ValueError(f"a staleness rule is a mapping, got {type(obj).__name__}")
        return cls(max_staleness=int(obj["max_staleness"]), exponent=float(obj["exponent"]))
