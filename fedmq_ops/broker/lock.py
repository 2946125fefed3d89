"""One ``fedmq broker`` command at a time per broker directory (``DIR/.lock``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from fedmq.errors import ConfigError

__all__ = ["locked"]


@contextlib.contextmanager
def locked(root: Path, create: bool = False) -> Iterator[None]:
    """One ``fedmq broker`` command at a time per directory."""
    if create:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # init sets its final mode
    elif not (root / "broker.json").exists():
        raise ConfigError(f"{root} is not a broker directory: run `fedmq broker init` "
                          "(no broker.json)")
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
