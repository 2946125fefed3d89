"""Writing the broker directory's files in place with explicit modes and owners."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["write_file", "write_if_changed"]

_PRIVATE_DIRS = ("private", "credentials", "clients")


def write_file(path: Path, data: bytes | str, mode: int, owner: tuple[int, int] | None = None,
           keep_group_read: bool = False) -> None:
    """Write in place (same inode, so single-file bind mounts see it) with ``mode``.

    The file is created with ``mode`` already set, so a secret is never readable by others,
    not even for a moment; an existing file gets ``mode`` before its new content.
    ``keep_group_read`` keeps a group-read bit already there (never world access).
    """
    raw = data.encode() if isinstance(data, str) else data
    if keep_group_read and path.exists():
        # an operator's `chgrp 1883 && chmod 0640` (broker's group) survives rewrites
        mode |= stat.S_IMODE(path.stat().st_mode) & stat.S_IRGRP
    if not path.parent.exists():
        path.parent.mkdir(parents=True)
        if path.parent.name in _PRIVATE_DIRS:
            os.chmod(path.parent, 0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        os.ftruncate(fd, 0)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_if_changed(path: Path, data: str, mode: int,
                      owner: tuple[int, int] | None = None) -> bool:
    if path.exists() and path.read_text() == data:
        os.chmod(path, mode)
        return False
    write_file(path, data, mode, owner)
    return True
