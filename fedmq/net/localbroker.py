"""Run a local MQTT broker as a child process: Mosquitto, or amqtt when Mosquitto is missing.

Used by ``fedmq demo`` and by the test harness. The broker gets a generated config on a free
loopback port; ``start()`` returns once it accepts TCP connections.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.net.procs import LocalServerFiles, stop_process

__all__ = [
    "LOG_LINES", "BrokerOptions", "LocalBroker", "free_port", "mosquitto_path", "wait_for_port",
]

log = logging.getLogger(__name__)


#: Mosquitto's logging in every config fedmq writes (this one, and the production and site
#: gateway configs of ``fedmq broker``, which add ISO timestamps): to stderr (stdout is
#: block-buffered when it is not a terminal, so lines would reach `docker logs` / journald
#: late or be lost on a crash), every level but debug, connections, timestamps.
LOG_LINES = (
    "log_dest stderr",
    "log_type error",
    "log_type warning",
    "log_type notice",
    "log_type information",
    "connection_messages true",
    "log_timestamp true",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_path() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass(frozen=True)
class BrokerOptions:
    """Settings for a local development broker (no TLS; see broker/ for production)."""

    port: int = 0
    persistence: bool = False
    # QoS 1 updates must not be dropped for a slow subscriber (docs/facts.md, Mosquitto).
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 100
    max_packet_size: int = 64 * 1024 * 1024
    extra_config: str = ""


class LocalBroker(LocalServerFiles):
    """A broker child process on 127.0.0.1 with its own directory, config and log."""

    def __init__(
        self,
        options: BrokerOptions | None = None,
        workdir: Path | None = None,
        kind: str = "auto",
    ) -> None:
        self.options = options or BrokerOptions()
        self.port = self.options.port or free_port()
        self.host = "127.0.0.1"
        self._owns_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "broker.log"
        if kind == "auto":
            kind = "mosquitto" if mosquitto_path() else "amqtt"
        if kind not in ("mosquitto", "amqtt"):
            raise ConfigError(f"unknown broker kind {kind!r}")
        self.kind = kind
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------ config

    def mosquitto_config(self) -> str:
        o = self.options
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"max_queued_messages {o.max_queued_messages}",
            "max_queued_bytes 0",
            f"max_inflight_messages {o.max_inflight_messages}",
            f"max_packet_size {o.max_packet_size}",
            *LOG_LINES,
        ]
        if os.geteuid() == 0:
            # Mosquitto started as root drops to the `mosquitto` user, which cannot write the
            # persistence file into a root-owned (test) directory: stay root for local runs.
            lines.append("user root")
        if o.persistence:
            lines += [
                "persistence true",
                f"persistence_location {self.workdir}/",
                "autosave_interval 1",
            ]
        if o.extra_config:
            lines.append(o.extra_config)
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> LocalBroker:
        if self.running:
            return self
        logf = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        if self.kind == "mosquitto":
            exe = mosquitto_path()
            if exe is None:
                raise ConfigError("mosquitto is not installed (apt-get install mosquitto)")
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self.mosquitto_config())
            cmd = [exe, "-c", str(conf)]
        else:
            cmd = [sys.executable, "-m", "fedmq.net.amqtt_broker", "--port", str(self.port)]
        self._proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        logf.close()
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise ConfigError(
                f"{self.kind} did not accept connections on port {self.port} within "
                f"{timeout:.0f}s; log:\n{self.read_log()}"
            )
        log.info("%s broker listening on %s:%d", self.kind, self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout, kill_timeout=timeout)

    def kill(self) -> None:
        """SIGKILL: the broker gets no chance to save anything since its last autosave."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
