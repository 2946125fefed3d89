"""Stopping child processes: SIGTERM, a grace period, then SIGKILL.

The one way the local broker, the local fleet runner and the tests stop what they started.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LocalServerFiles", "stop_process", "stop_processes"]

log = logging.getLogger(__name__)


def stop_processes(
    procs: Sequence[subprocess.Popen[Any]], timeout: float = 10.0, kill_timeout: float = 10.0
) -> list[int | None]:
    """SIGTERM every process still running, give them ``timeout`` seconds together, then
    SIGKILL the ones left and wait up to ``kill_timeout``. Returns their exit codes (None
    only for a process that survived SIGKILL, e.g. stuck in the kernel)."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("process %d did not stop within %gs of SIGTERM: sending SIGKILL",
                        p.pid, timeout)
            p.kill()
            try:
                p.wait(kill_timeout)
            except subprocess.TimeoutExpired:
                log.error("process %d is still running after SIGKILL", p.pid)
    return [p.returncode for p in procs]


def stop_process(
    proc: subprocess.Popen[Any], timeout: float = 10.0, kill_timeout: float = 10.0
) -> int | None:
    """:func:`stop_processes` for one process; its exit code."""
    return stop_processes([proc], timeout, kill_timeout)[0]


class LocalServerFiles:
    """The files of a server started on loopback (Mosquitto, Redis): its log and its work
    directory, removed on :meth:`cleanup` when the server made it. Subclasses set
    ``workdir``, ``log_path`` and ``_owns_dir`` and implement :meth:`stop`."""

    workdir: Path
    log_path: Path
    _owns_dir: bool

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
