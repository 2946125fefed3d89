"""Writing the broker directory's files in place with explicit modes and owners."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fedmq.errors import ConfigError

__all__ = ["DIR_MODES", "ensure_dir", "write_file", "write_if_changed"]

# Modes of the directories under DIR, set explicitly (never left to the umask). DIR and
# certs/ are 0750: the broker's group (--owner) may enter them, nobody else.
DIR_MODES = {"": 0o750, "certs": 0o750, "private": 0o700, "credentials": 0o700,
             "clients": 0o700, "data": 0o700}


def _chown(path: Path | int, owner: tuple[int, int], name: Path) -> None:
    try:
        if isinstance(path, int):
            os.fchown(path, *owner)
        else:
            os.chown(path, *owner, follow_symlinks=False)
    except PermissionError as exc:
        raise ConfigError(f"cannot give {name} to {owner[0]}:{owner[1]}: {exc.strerror} "
                          "(--owner needs root)") from exc


def ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Create ``path`` if needed and give it ``mode`` (and ``owner``; -1 keeps one part)
    explicitly, whatever the umask. A new directory is 0700 until then."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise ConfigError(f"{path} must be a directory")
    os.chmod(path, mode)
    if owner is not None:
        _chown(path, owner, path)


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
        ensure_dir(path.parent, DIR_MODES.get(path.parent.name, 0o700))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            _chown(fd, owner, path)
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
