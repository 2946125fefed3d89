"""Run a whole local federation: a broker, the aggregator and N agents as real processes.

Used by ``fedmq demo`` (digits, 8 agents) and ``fedmq experiment`` (Fashion-MNIST, other
models). Every part is the real thing: the broker is Mosquitto (or amqtt when Mosquitto is
missing), the aggregator and each agent run as their own OS process from generated TOML
configs, and progress is read from the retained model topic like any other MQTT client
would. The result is a table of rounds, a JSON file and optionally a PNG.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aggregator.policies import DEFAULT_ROUND_POLICY, round_policy_names
from fedmq import wire
from fedmq.chunks import MIN_MESSAGE_BYTES
from fedmq.downlink import DOWNLINK_FULL, downlink_modes
from fedmq.errors import ConfigError, FedmqError
from fedmq.net.localbroker import BrokerOptions, LocalBroker
from fedmq.net.mqtt import MqttSettings
from fedmq.net.procs import stop_processes
from fedmq.topics import Topics
from fedmq.update.codecs.topk import check_topk_fraction
from fedmq_ops.observer import FleetObserver

__all__ = [
    "FederationResult", "FederationSpec", "RoundRow", "run_federation", "write_configs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationSpec:
    agents: int = 8
    rounds: int = 20
    dataset: str = "digits"
    model: str = "digits-mlp"
    partition: str = "dirichlet:0.5"
    codec: str = "int8"
    topk_fraction: float | None = None  # top-k codecs: the rounds' topk_fraction; None = default
    epochs: int = 2
    lr: float = 0.2
    seed: int = 0
    strategy: str = "fedavg"
    server_lr: float | None = None
    clients_per_round: int = 0  # 0 = every agent
    min_updates: int = 0  # 0 = clients_per_round (or all agents)
    round_timeout: float = 120.0
    eval_dataset: str = ""  # "" = the dataset's test split
    eval_examples: int = 0
    max_examples: int = 0
    broker: str = "auto"  # auto | mosquitto | amqtt | HOST:PORT
    workdir: Path | None = None
    fleet: str = "demo"
    agent_threads: int = 1
    timeout: float = 3600.0
    round_policy: str = DEFAULT_ROUND_POLICY  # a registered round policy ("sync", "fedbuff")
    buffer_size: int | None = None  # fedbuff: updates per new model; None = aggregator default
    max_message_bytes: int = 0  # chunk messages above this size (aggregator and agents); 0 = never
    # How the model reaches devices: "full" every version, or deltas in a codec
    # (the aggregator's `downlink` key, docs/protocol.md "Compressed downlink").
    downlink: str = DOWNLINK_FULL
    # Federated evaluation (docs/strategies.md): each agent's held-out fraction (0 = off);
    # the last eval_only_agents agents never train and only evaluate each round's model.
    eval_fraction: float = 0.0
    eval_only_agents: int = 0
    prune: float = 0.0  # target sparsity of the kernels (docs/pruning.md); 0 = no pruning
    extra_agent: dict[str, Any] = field(default_factory=dict)
    extra_aggregator: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.agents < 1 or self.rounds < 1:
            raise ConfigError("agents and rounds must be at least 1")
        check_topk_fraction(self.codec, self.topk_fraction)
        if self.clients_per_round > self.agents:
            raise ConfigError("clients_per_round cannot exceed the number of agents")
        if self.round_policy not in round_policy_names():
            raise ConfigError(
                f"round_policy must be one of {round_policy_names()}, got {self.round_policy!r}"
            )
        if not 0 <= self.eval_only_agents < self.agents:
            raise ConfigError(
                f"eval_only_agents must be in [0, {self.agents}): some agent must train"
            )
        if self.buffer_size is not None and self.buffer_size < 1:
            raise ConfigError(f"buffer_size must be at least 1, got {self.buffer_size}")
        if self.downlink not in downlink_modes():
            raise ConfigError(
                f"downlink must be one of {downlink_modes()}, got {self.downlink!r}"
            )
        if not 0.0 <= self.prune <= 0.99:
            raise ConfigError(f"prune must be in [0, 0.99], got {self.prune}")
        if self.max_message_bytes != 0 and self.max_message_bytes < MIN_MESSAGE_BYTES:
            raise ConfigError(
                f"max_message_bytes must be 0 (no chunking) or >= {MIN_MESSAGE_BYTES}, "
                f"got {self.max_message_bytes}"
            )


@dataclass(frozen=True)
class RoundRow:
    round_id: int
    version: int
    participants: int
    accuracy: float
    loss: float
    # The aggregator's own count of update bytes it received this round (devices' uplink).
    bytes_in: int
    # What the devices downloaded: model and round announcement, once per device (fan-out;
    # the aggregator itself publishes each once, its bytes_out). With a compressed downlink
    # the model part is the index and the version's delta (a device that kept up).
    bytes_delivered: int
    seconds: float
    wall: float
    # The devices' federated evaluation of the round's base model (nan: none reported).
    fed_accuracy: float = float("nan")
    fed_loss: float = float("nan")


@dataclass
class FederationResult:
    spec: dict[str, Any]
    rows: list[RoundRow]
    wall_seconds: float
    broker: str
    model_bytes: int
    workdir: str
    agent_peak_rss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def max_agent_rss_mb(self) -> float:
        return max(self.agent_peak_rss_mb.values(), default=float("nan"))

    @property
    def final_accuracy(self) -> float:
        return self.rows[-1].accuracy if self.rows else float("nan")

    def downlink_per_device(self) -> float:
        agents = int(self.spec.get("agents", 1)) or 1
        if not self.rows:
            return float("nan")
        return sum(r.bytes_delivered for r in self.rows) / len(self.rows) / agents

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "rounds": [asdict(r) for r in self.rows],
            "final_accuracy": self.final_accuracy,
            "wall_seconds": self.wall_seconds,
            "bytes_in": sum(r.bytes_in for r in self.rows),
            "bytes_delivered": sum(r.bytes_delivered for r in self.rows),
            # Model and announcement bytes one device downloads per round, on average.
            "downlink_bytes_per_device_per_round": self.downlink_per_device(),
            "broker": self.broker,
            "model_bytes": self.model_bytes,
            "agent_peak_rss_mb": self.agent_peak_rss_mb,
            "max_agent_peak_rss_mb": self.max_agent_rss_mb,
        }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def _write_toml(path: Path, section: str, values: dict[str, Any]) -> None:
    """``values`` as a service config: keys ``mqtt.<key>`` go to the ``[mqtt]`` table."""
    tables: dict[str, list[str]] = {section: [], "mqtt": []}
    for key, value in values.items():
        if value is None:
            continue
        table, _, name = key.rpartition(".")
        tables[table or section].append(f"{name} = {_toml_value(value)}")
    lines = [line for name, body in tables.items() for line in (f"[{name}]", *body)]
    path.write_text("\n".join(lines) + "\n")


class _RoundRecorder:
    """Turns every new model version the observer sees into a RoundRow, and keeps each
    agent's peak memory from its status (called from the observer's MQTT thread)."""

    def __init__(self, agents: int) -> None:
        self._agents = agents
        self._observer: FleetObserver | None = None
        self.rows: list[RoundRow] = []
        self.agent_rss_mb: dict[str, float] = {}
        self._t0 = time.monotonic()
        self._last = self._t0

    def follow(self, host: str, port: int, protocol: str, topics: Topics) -> FleetObserver:
        settings = MqttSettings(host=host, port=port, protocol=protocol,
                                client_id=f"observer-{os.getpid()}", clean_start=True,
                                session_expiry=0)
        self._observer = FleetObserver(settings, topics, self.on_model, self.on_status)
        return self._observer.start()

    def on_status(self, status: wire.StatusMessage) -> None:
        rss = status.metrics.get("peak_rss_mb")
        if rss is not None:
            prev = self.agent_rss_mb.get(status.device, 0.0)
            self.agent_rss_mb[status.device] = max(prev, rss)

    def on_model(self, model: wire.ModelMessage, size: int) -> None:
        now = time.monotonic()
        if model.version > 0:
            m = model.metrics
            round_bytes = self._observer.view.round_bytes if self._observer else 0
            # Every agent downloads the model and the round announcement once per round.
            down = (size + round_bytes) * self._agents
            self.rows.append(
                RoundRow(
                    round_id=model.round_id,
                    version=model.version,
                    participants=int(m.get("participants", 0)),
                    accuracy=float(m.get("accuracy", float("nan"))),
                    loss=float(m.get("loss", float("nan"))),
                    bytes_in=int(m.get("bytes_in", 0)),
                    bytes_delivered=down,
                    seconds=float(m.get("round_seconds", now - self._last)),
                    wall=now - self._t0,
                    fed_accuracy=float(m.get("fed_accuracy", float("nan"))),
                    fed_loss=float(m.get("fed_loss", float("nan"))),
                )
            )
        self._last = now


def _spawn(cmd: list[str], logfile: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out = open(logfile, "wb")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    finally:
        out.close()


def write_configs(
    spec: FederationSpec, workdir: Path, host: str, port: int, protocol: str
) -> tuple[Path, list[Path]]:
    """Write ``aggregator.toml`` and one ``agent-NNN.toml`` per agent into ``workdir`` for a
    broker at ``host:port``; the paths (aggregator, agents in order)."""
    # eval-only agents report on each round but never count towards its updates
    per_round = spec.clients_per_round or spec.agents - spec.eval_only_agents
    chunking = {"max_message_bytes": spec.max_message_bytes}
    common = {
        "fleet": spec.fleet,
        "mqtt.host": host,
        "mqtt.port": port,
        "mqtt.protocol": protocol,
        "model": spec.model,
    }
    agg_cfg = {
        **common,
        "state_dir": str(workdir / "aggregator"),
        "eval_dataset": spec.eval_dataset or spec.dataset,
        "eval_examples": spec.eval_examples,
        "rounds": spec.rounds,
        "clients_per_round": per_round,
        "min_updates": spec.min_updates or per_round,
        "min_devices": per_round,
        **({"selection": "any"} if spec.eval_only_agents else {}),
        "round_timeout": spec.round_timeout,
        "epochs": spec.epochs,
        "lr": spec.lr,
        "codec": spec.codec,
        "topk_fraction": spec.topk_fraction,
        "seed": spec.seed,
        "strategy": spec.strategy,
        "server_lr": spec.server_lr,
        "round_policy": spec.round_policy,
        "buffer_size": spec.buffer_size,
        "downlink": spec.downlink,
        "prune_target": spec.prune,
        **chunking,
        **spec.extra_aggregator,
    }
    agg_path = workdir / "aggregator.toml"
    _write_toml(agg_path, "aggregator", agg_cfg)
    agent_paths: list[Path] = []
    for i in range(spec.agents):
        agent_cfg = {
            **common,
            "device_id": f"agent-{i:03d}",
            "state_dir": str(workdir / "agents" / f"agent-{i:03d}"),
            "source": spec.dataset,
            "partition": spec.partition,
            "num_clients": spec.agents,
            "client_index": i,
            "seed": spec.seed,
            "num_threads": spec.agent_threads,
            "max_examples": spec.max_examples or None,
            **_eval_settings(spec, i),
            **chunking,
            **spec.extra_agent,
        }
        path = workdir / f"agent-{i:03d}.toml"
        _write_toml(path, "agent", agent_cfg)
        agent_paths.append(path)
    return agg_path, agent_paths


def _eval_settings(spec: FederationSpec, index: int) -> dict[str, Any]:
    """Agent ``index``'s federated-evaluation keys (none when off: the agent defaults)."""
    if index >= spec.agents - spec.eval_only_agents:
        return {"eval_only": True}
    return {"eval_fraction": spec.eval_fraction} if spec.eval_fraction else {}


def run_federation(
    spec: FederationSpec, on_round: Callable[[RoundRow], None] | None = None
) -> FederationResult:
    """Start everything, wait for ``spec.rounds`` new model versions, stop everything."""
    owns_dir = spec.workdir is None
    workdir = Path(spec.workdir or tempfile.mkdtemp(prefix="fedmq-federation-"))
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    broker: LocalBroker | None = None
    procs: list[subprocess.Popen[bytes]] = []
    observer: FleetObserver | None = None
    recorder = _RoundRecorder(spec.agents)
    t0 = time.monotonic()
    try:
        if ":" in spec.broker:
            host, port_s = spec.broker.rsplit(":", 1)
            port, kind = int(port_s), "external"
        else:
            broker = LocalBroker(BrokerOptions(), workdir=workdir / "broker", kind=spec.broker)
            broker.start()
            host, port, kind = broker.host, broker.port, broker.kind
        protocol = "3.1.1" if kind == "amqtt" else "5"
        topics = Topics(spec.fleet)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        agg_path, agent_paths = write_configs(spec, workdir, host, port, protocol)
        observer = recorder.follow(host, port, protocol, topics)
        procs.append(
            _spawn(
                [sys.executable, "-m", "aggregator", "--config", str(agg_path)],
                workdir / "logs" / "aggregator.log",
                env,
            )
        )
        for path in agent_paths:
            procs.append(
                _spawn(
                    [sys.executable, "-m", "edge_agent", "--config", str(path)],
                    workdir / "logs" / f"{path.stem}.log",
                    env,
                )
            )

        def alive() -> None:
            for p in procs:
                code = p.poll()
                if code not in (None, 0):
                    name = Path(str(p.args[-1])).stem  # type: ignore[index]
                    tail = _tail(workdir / "logs", name)
                    raise FedmqError(f"{name} exited with code {code}; its log ends:\n{tail}")

        shown = 0
        for version in range(1, spec.rounds + 1):
            observer.wait_for_version(version, spec.timeout, alive)
            with observer.view.lock:
                rows = list(recorder.rows)
            while on_round is not None and shown < len(rows):
                on_round(rows[shown])
                shown += 1
        with observer.view.lock:
            rows = list(recorder.rows)
            model_bytes, rss = observer.view.model_bytes, dict(recorder.agent_rss_mb)
        return FederationResult(
            spec={k: str(v) if isinstance(v, Path) else v for k, v in asdict(spec).items()},
            rows=rows,
            wall_seconds=time.monotonic() - t0,
            broker=kind,
            model_bytes=model_bytes,
            workdir=str(workdir),
            agent_peak_rss_mb=rss,
        )
    finally:
        stop_processes(procs)
        if observer is not None:
            observer.close()
        if broker is not None:
            broker.stop()
        if owns_dir and os.environ.get("FEDMQ_KEEP_WORKDIR") != "1":
            shutil.rmtree(workdir, ignore_errors=True)


def _tail(logdir: Path, name: str, lines: int = 30) -> str:
    for candidate in (logdir / f"{name}.log",):
        if candidate.exists():
            return "\n".join(candidate.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"
