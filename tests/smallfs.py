"""A size-limited tmpfs mounted for one test (we run as root), and a way to fill it up.

Tests that need a real full disk use :func:`small_tmpfs`; where mounting is impossible (no
root, no mount(8), a container without CAP_SYS_ADMIN) the test is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "small_tmpfs"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` (created), unmount it afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("mount")
    if exe is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        [exe, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write ``directory/name`` until the filesystem is full; returns the file (delete it to
    free the space)."""
    target = directory / name
    chunk = b"\0" * 65536
    with open(target, "wb", buffering=0) as fh:
        while True:
            try:
                fh.write(chunk)
            except OSError:
                break
    # Whatever is left is smaller than a chunk: take it byte-block by byte-block.
    with open(target, "ab", buffering=0) as fh:
        while True:
            try:
                fh.write(b"\0" * 512)
            except OSError:
                break
    return target
