"""Run a local NATS cluster as child processes (the clustered-broker path of the sharded
ingest, in tests): N nats-server nodes on free loopback ports, each with JetStream (its own
store directory), the MQTT gateway and a monitoring port, routed to each other.

``start()`` returns once every node accepts connections and reports a JetStream meta
leader; :meth:`LocalNatsCluster.kill` SIGKILLs one node and :meth:`LocalNatsCluster.restart`
brings it back with the same ports and store. Never the machine's own NATS.

Facts the configuration relies on (nats-server 2.9, docs/scaling.md "Clustered broker:
NATS"): the MQTT gateway needs ``server_name`` and JetStream; it speaks MQTT 3.1.1 only
(no MQTT 5, no ``$share``); its own session and retained-message streams get
``mqtt.stream_replicas`` replicas.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq.net.localbroker import free_port, wait_for_port
from fedmq.net.procs import LocalServerFiles, stop_processes

__all__ = ["LocalNatsCluster", "NatsNode", "nats_server_path"]

log = logging.getLogger(__name__)


def nats_server_path() -> str | None:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = Path("/usr/sbin/nats-server")
    return str(candidate) if candidate.exists() else None


@dataclass(frozen=True)
class NatsNode:
    """One node's name and loopback ports (fixed for its life, also across restarts)."""

    name: str
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"


class LocalNatsCluster(LocalServerFiles):
    """``size`` nats-server processes on 127.0.0.1 forming one cluster (``size`` 1: a
    single JetStream server, no routes)."""

    host = "127.0.0.1"

    def __init__(
        self, size: int = 3, workdir: Path | None = None, *, max_payload_mb: int = 8,
        name: str = "fedmq", consumer_replicas: int = 0, consumer_memory: bool = False,
    ) -> None:
        """``consumer_replicas``/``consumer_memory``: the gateway's ``mqtt.consumer_replicas``
        (0: NATS' default, the stream's replicas) and ``mqtt.consumer_memory_storage`` for
        the JetStream consumer it makes per QoS 1 subscription of an MQTT client."""
        if size < 1:
            raise ConfigError(f"a NATS cluster needs at least 1 node, not {size}")
        if not 1 <= max_payload_mb <= 64:
            raise ConfigError(f"max_payload_mb must be 1..64 (NATS' limit), not {max_payload_mb}")
        self.size = size
        self.max_payload_mb = max_payload_mb
        if not 0 <= consumer_replicas <= min(size, 3):
            raise ConfigError(
                f"consumer_replicas must be 0..{min(size, 3)}, not {consumer_replicas}"
            )
        self.consumer_replicas = consumer_replicas
        self.consumer_memory = consumer_memory
        self.cluster_name = name
        self._owns_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fedmq-nats-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = [
            NatsNode(f"n{i}", free_port(), free_port(), free_port(), free_port())
            for i in range(size)
        ]
        self.log_path = self.workdir / "n0.log"
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def servers(self) -> list[str]:
        """Every node's client URL (what a NATS client is given to fail over)."""
        return [n.url for n in self.nodes]

    def config(self, i: int) -> str:
        node = self.nodes[i]
        store = self.workdir / node.name / "jetstream"
        routes = ", ".join(
            f"nats-route://{self.host}:{n.cluster_port}" for n in self.nodes if n is not node
        )
        lines = [
            f"server_name: {node.name}",
            f"listen: {self.host}:{node.client_port}",
            f"http: {self.host}:{node.http_port}",
            f"max_payload: {self.max_payload_mb}MB",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 64MB",
            "  max_file_store: 2GB",
            "}",
            "mqtt {",
            f"  listen: {self.host}:{node.mqtt_port}",
            f"  stream_replicas: {min(self.size, 3)}",
            *([f"  consumer_replicas: {self.consumer_replicas}"] if self.consumer_replicas
              else []),
            *(["  consumer_memory_storage: true"] if self.consumer_memory else []),
            "}",
        ]
        if self.size > 1:
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: {self.host}:{node.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    # -- lifecycle ------------------------------------------------------------------------------
    def running(self, i: int) -> bool:
        proc = self._procs[i]
        return proc is not None and proc.poll() is None

    def _spawn(self, i: int) -> None:
        exe = nats_server_path()
        if exe is None:
            raise ConfigError("nats-server is not installed (apt-get install nats-server)")
        node = self.nodes[i]
        (self.workdir / node.name).mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"{node.name}.conf"
        conf.write_text(self.config(i))
        with open(self.workdir / f"{node.name}.log", "ab") as logf:
            self._procs[i] = subprocess.Popen(
                [exe, "-c", str(conf)], stdout=logf, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
            )

    def start(self, timeout: float = 30.0) -> LocalNatsCluster:
        """Start every node not running; return once each has a JetStream meta leader."""
        for i in range(self.size):
            if not self.running(i):
                self._spawn(i)
        end = time.monotonic() + timeout
        for i in range(self.size):
            self._wait_ready(i, end, healthy=True)
        log.info("NATS cluster of %d node(s) ready (client ports %s)", self.size,
                 [n.client_port for n in self.nodes])
        return self

    def _wait_ready(self, i: int, end: float, healthy: bool) -> None:
        """Ports open and a meta leader; ``healthy``: also /healthz ok (every stream and
        consumer current: true at a fresh start, but after a restart a consumer of a gone
        MQTT session can stay "not current" for a long time)."""
        node = self.nodes[i]
        for port in (node.client_port, node.mqtt_port, node.http_port):
            if not wait_for_port(self.host, port, max(0.1, end - time.monotonic())):
                self._fail(f"node {node.name} did not listen on port {port}")
        while time.monotonic() < end:
            if not self.running(i):
                self._fail(f"node {node.name} exited")
            if self.meta_leader(i) and (not healthy or self._healthy(i)):
                return
            time.sleep(0.1)
        self._fail(f"node {node.name} had no JetStream meta leader")

    def _fail(self, what: str) -> None:
        logs = self.read_log()
        self.stop()
        raise ConfigError(f"NATS cluster: {what}; logs:\n{logs[-4000:]}")

    def _monitor(self, i: int, path: str) -> Any:
        url = f"http://{self.host}:{self.nodes[i].http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError, urllib.error.URLError):
            return None

    def meta_leader(self, i: int) -> str:
        """The JetStream meta leader's name as node ``i`` sees it ("" when none)."""
        jsz = self._monitor(i, "/jsz")
        if not isinstance(jsz, dict):
            return ""
        meta = jsz.get("meta_cluster") or {}
        if self.size == 1:
            return self.nodes[i].name if jsz.get("config") else ""
        return str(meta.get("leader") or "")

    def _healthy(self, i: int) -> bool:
        health = self._monitor(i, "/healthz")
        return isinstance(health, dict) and health.get("status") == "ok"

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no clean shutdown, no flush of anything not yet on disk."""
        proc, self._procs[i] = self._procs[i], None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.info("NATS node %s killed", self.nodes[i].name)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node ``i`` again (same ports and store) and wait until it is ready."""
        if not self.running(i):
            self._spawn(i)
        self._wait_ready(i, time.monotonic() + timeout, healthy=False)

    def stop(self, timeout: float = 10.0) -> None:
        procs = [p for p in self._procs if p is not None]
        self._procs = [None] * self.size
        stop_processes(procs, timeout, kill_timeout=timeout)

    def read_log(self) -> str:
        parts = []
        for node in self.nodes:
            path = self.workdir / f"{node.name}.log"
            try:
                parts.append(f"--- {node.name} ---\n{path.read_text(errors='replace')}")
            except OSError:
                continue
        return "\n".join(parts)

    def __enter__(self) -> LocalNatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
