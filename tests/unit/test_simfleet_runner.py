"""The simulated fleet's process runner stops its worker processes with the one helper."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import pytest

from fedmq_ops.simfleet import FleetPlan, FleetSpec, ShardSettings, run_fleet, runner

_IGNORES_TERM = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_failed_start_stops_the_workers_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second worker cannot be started (fork failed, no file descriptors left): the first,
    which ignores SIGTERM, is killed after the grace period (SIGTERM, grace, SIGKILL) and the
    start failure is what the caller sees, not a timeout of the clean-up."""
    real_popen = subprocess.Popen
    started: list[subprocess.Popen[Any]] = []

    def popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        if started:
            raise OSError(24, "Too many open files")
        proc = real_popen([sys.executable, "-c", _IGNORES_TERM], stdout=subprocess.PIPE,
                          text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        started.append(proc)
        return proc

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.setattr(runner, "STOP_GRACE", 0.5, raising=False)
    try:
        with pytest.raises(OSError, match="Too many open files"):
            run_fleet(FleetSpec(FleetPlan(2), ShardSettings(), processes=2))
        [proc] = started
        assert proc.poll() == -signal.SIGKILL
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
