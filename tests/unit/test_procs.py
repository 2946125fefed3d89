"""stop_process / stop_processes with real child processes."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from fedmq.net.procs import stop_process, stop_processes

_IGNORES_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)
_EXITS_ON_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _start(code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_process_that_handles_sigterm_exits_with_its_own_code() -> None:
    assert stop_process(_start(_EXITS_ON_TERM)) == 3


def test_a_process_that_ignores_sigterm_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    proc = _start(_IGNORES_TERM)
    assert stop_process(proc, timeout=0.5) == -signal.SIGKILL
    assert f"process {proc.pid} did not stop within 0.5s of SIGTERM: sending SIGKILL" \
        in caplog.text


def test_many_at_once_and_already_exited() -> None:
    done = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    done.wait()
    procs = [_start(_EXITS_ON_TERM), done, _start(_IGNORES_TERM)]
    assert stop_processes(procs, timeout=0.5) == [3, 7, -signal.SIGKILL]


def test_no_other_module_stops_processes_by_hand() -> None:
    """One process-stop helper: outside fedmq/net/procs.py no project module or bench sends
    SIGTERM itself (``terminate``, ``send_signal``, ``os.kill``); a deliberate SIGKILL to
    simulate a crash (``LocalBroker.kill``) is not a stop and stays allowed, nor is pausing
    and resuming one with SIGSTOP/SIGCONT (an offline device in a benchmark)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    helper = root / "fedmq" / "net" / "procs.py"
    found = []
    for package in ("fedmq", "edge_agent", "aggregator", "fedmq_ops", "bench"):
        for path in sorted((root / package).rglob("*.py")):
            if path == helper:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                    continue
                func = node.func
                by_os = isinstance(func.value, ast.Name) and func.value.id == "os"
                pause = func.attr == "send_signal" and all(
                    "SIGSTOP" in ast.unparse(a) or "SIGCONT" in ast.unparse(a)
                    for a in node.args) and "SIGTERM" not in ast.unparse(node)
                if not pause and (func.attr in ("terminate", "send_signal") or (
                    by_os and func.attr in ("kill", "killpg")
                )):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {func.attr}")
    assert not found, "use fedmq.net.procs.stop_processes:\n" + "\n".join(found)
