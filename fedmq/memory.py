"""Peak memory of this process, measured so that it means what it says.

``getrusage().ru_maxrss`` survives ``execve``: a process started by a large parent (pytest
with TensorFlow loaded, say) reports the parent's high-water mark. Linux's ``VmHWM`` in
``/proc/self/status`` belongs to the process's own address space, so it is used first.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
