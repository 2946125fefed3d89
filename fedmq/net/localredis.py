"""Run a local Redis server as a child process (the sharded ingest's shared store, in tests
and benchmarks): a generated config on a free loopback port, its own directory; ``start()``
returns once it accepts TCP connections. Never the machine's own Redis.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.net.localbroker import free_port, wait_for_port
from fedmq.net.procs import LocalServerFiles, stop_process

__all__ = ["LocalRedis", "RedisOptions", "redis_server_path"]

log = logging.getLogger(__name__)


def redis_server_path() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    candidate = Path("/usr/bin/redis-server")
    return str(candidate) if candidate.exists() else None


@dataclass(frozen=True)
class RedisOptions:
    """``appendfsync``: ``always`` (every committed partial on disk before the worker
    acknowledges; the production setting, docs/scaling.md) or ``everysec``/``no``."""

    port: int = 0
    appendonly: bool = True
    appendfsync: str = "always"


class LocalRedis(LocalServerFiles):
    """A redis-server child process on 127.0.0.1 with its own directory, config and log."""

    def __init__(self, options: RedisOptions | None = None, workdir: Path | None = None) -> None:
        self.options = options or RedisOptions()
        if self.options.appendfsync not in ("always", "everysec", "no"):
            raise ConfigError(f"appendfsync must be always, everysec or no, not "
                              f"{self.options.appendfsync!r}")
        self.port = self.options.port or free_port()
        self.host = "127.0.0.1"
        self._owns_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def config(self) -> str:
        o = self.options
        return "\n".join([
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"dir {self.workdir}",
            'save ""',
            f"appendonly {'yes' if o.appendonly else 'no'}",
            f"appendfsync {o.appendfsync}",
            "daemonize no",
            "loglevel notice",
            "logfile \"\"",
        ]) + "\n"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> LocalRedis:
        if self.running:
            return self
        exe = redis_server_path()
        if exe is None:
            raise ConfigError("redis-server is not installed (apt-get install redis-server)")
        conf = self.workdir / "redis.conf"
        conf.write_text(self.config())
        with open(self.log_path, "ab") as logf:
            self._proc = subprocess.Popen(
                [exe, str(conf)], stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir,
                start_new_session=True,
            )
        if not wait_for_port(self.host, self.port, timeout) or not self._ping(timeout):
            self.stop()
            raise ConfigError(
                f"redis-server did not accept connections on port {self.port} within "
                f"{timeout:.0f}s; log:\n{self.read_log()}"
            )
        log.info("redis-server listening on %s:%d", self.host, self.port)
        return self

    def _ping(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout, kill_timeout=timeout)

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
