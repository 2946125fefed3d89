"""A simulated fleet over several processes: enrol its keys, start the shards, merge counts.

:func:`run_fleet` is what ``fedmq fleet simulate`` calls; with more than one process it
starts ``python -m fedmq_ops.simfleet.worker SPEC.json INDEX OUT.json`` per shard
(:func:`shard_main`) and merges what they write.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError
from fedmq.fsutil import atomic_write
from fedmq.net.procs import stop_processes
from fedmq.signing import Registry
from fedmq_ops.simfleet.limits import raise_nofile
from fedmq_ops.simfleet.plan import Arrival, FleetPlan
from fedmq_ops.simfleet.shard import RoundTally, Shard, ShardResult, ShardSettings

__all__ = ["FleetReport", "FleetSpec", "enroll_fleet", "run_fleet", "shard_main"]

log = logging.getLogger(__name__)

#: Seconds the shard processes get after SIGTERM before SIGKILL when the run is cut short.
STOP_GRACE = 30.0


@dataclass(frozen=True)
class FleetSpec:
    """Everything a shard process needs (JSON round-trip via :meth:`to_json`)."""

    plan: FleetPlan
    settings: ShardSettings
    processes: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.processes <= 256:
            raise ConfigError(f"processes must be 1..256, got {self.processes}")
        if self.processes > self.plan.devices:
            raise ConfigError(f"{self.processes} processes for {self.plan.devices} devices")

    def to_json(self) -> str:
        plan = asdict(self.plan)
        plan["arrival"] = str(self.plan.arrival)
        settings = asdict(self.settings)
        settings["passwords"] = dict(self.settings.passwords or {}) or None
        settings["unclipped"] = sorted(self.settings.unclipped)
        return json.dumps({"plan": plan, "settings": settings, "processes": self.processes})

    @classmethod
    def from_json(cls, text: str) -> FleetSpec:
        raw = json.loads(text)
        plan = dict(raw["plan"])
        plan["arrival"] = Arrival.parse(plan["arrival"])
        plan["examples"] = tuple(plan["examples"])
        settings = dict(raw["settings"])
        settings["unclipped"] = frozenset(settings.get("unclipped", ()))
        settings["brokers"] = tuple(settings.get("brokers", ()))
        return cls(FleetPlan(**plan), ShardSettings(**settings), int(raw["processes"]))


@dataclass
class FleetReport:
    """The shards' results and their sums."""

    shards: list[ShardResult] = field(default_factory=list)
    failed_processes: int = 0

    def total(self, key: str) -> int:
        return sum(int(getattr(s, key)) for s in self.shards)

    @property
    def rejected(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for code, n in s.rejected.items():
                out[code] = out.get(code, 0) + n
        return out

    @property
    def completed(self) -> bool:
        return not self.failed_processes and all(s.completed for s in self.shards)

    def rounds(self) -> dict[int, RoundTally]:
        """Per round: counts summed, first times the earliest, last times the latest."""
        out: dict[int, RoundTally] = {}
        for s in self.shards:
            for rid, t in s.rounds.items():
                m = out.setdefault(rid, RoundTally())
                m.sent += t.sent
                m.accepted += t.accepted
                m.dropouts += t.dropouts
                m.opened_at = max(m.opened_at, t.opened_at)
                m.first_send = min(x for x in (m.first_send, t.first_send) if x) \
                    if (m.first_send or t.first_send) else 0.0
                m.last_send = max(m.last_send, t.last_send)
                m.last_ack = max(m.last_ack, t.last_ack)
                m.model_seen = min(x for x in (m.model_seen, t.model_seen) if x) \
                    if (m.model_seen or t.model_seen) else 0.0
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        keys = ("devices", "sent", "resent", "accepted", "expired", "dropouts",
                "acks_repeated", "acks_unknown", "disconnects")
        return {
            "completed": self.completed,
            "failed_processes": self.failed_processes,
            **{k: self.total(k) for k in keys},
            "rejected": self.rejected,
            "rounds": {str(k): v.to_dict() for k, v in self.rounds().items()},
            "shards": [s.to_dict() for s in self.shards],
        }

    def lines(self) -> list[str]:
        """A human summary: totals, then one line per round."""
        out = [
            f"simulated fleet: {self.total('devices')} devices in {len(self.shards)} "
            f"process(es); sent {self.total('sent')} (+{self.total('resent')} resent), "
            f"accepted {self.total('accepted')}, rejected {self.rejected or 0}, expired "
            f"{self.total('expired')}, dropped out {self.total('dropouts')}; "
            f"{'completed' if self.completed else 'NOT completed'}",
            "round    sent  accepted  dropouts  ingest s  updates/s  model after last ack s",
        ]
        for rid, t in self.rounds().items():
            start = max(t.opened_at, t.first_send)
            span = (t.last_ack - start) if t.last_ack and start else 0.0
            rate = t.accepted / span if span > 0 else 0.0
            close = (t.model_seen - t.last_ack) if t.model_seen and t.last_ack else float("nan")
            out.append(f"{rid:5d} {t.sent:7d} {t.accepted:9d} {t.dropouts:9d} {span:9.2f} "
                       f"{rate:10.0f} {close:23.2f}")
        for i, s in enumerate(self.shards):
            out.append(f"process {i}: {s.devices} devices ({s.peak_connected} connected at "
                       f"most), all connected in {s.connect_seconds:.1f}s, "
                       f"cpu {s.cpu_seconds:.1f}s, peak RSS {s.peak_rss_mb:.0f} MiB, "
                       f"open-file limit {s.nofile_soft}/{s.nofile_hard}")
        return out


def enroll_fleet(plan: FleetPlan, registry: Path) -> int:
    """Enrol every device's public key in the registry JSON (one atomic write; devices
    already enrolled with the same key are kept, with another key refused). Returns how many
    were added."""
    current = Registry(registry).devices()
    raw: dict[str, Any] = {}
    if registry.exists():
        raw = json.loads(registry.read_text()).get("devices", {})
    added = 0
    now = time.time()
    for device in plan.device_ids():
        pub = plan.key(device).public_hex
        old = current.get(device)
        if old == pub:
            continue
        if old is not None:
            raise ConfigError(f"device {device} is enrolled in {registry} with another key; "
                              "revoke it or use another --name or --seed")
        raw[device] = {"public_key": pub, "enrolled_at": now}
        added += 1
    if added:
        registry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(registry, json.dumps({"devices": raw}, sort_keys=True).encode())
    return added


def run_fleet(spec: FleetSpec, registry: Path | None = None,
              env: Mapping[str, str] | None = None) -> FleetReport:
    """Run the fleet; with ``registry``, enrol its keys there first (and sign updates)."""
    if registry is not None:
        n = enroll_fleet(spec.plan, registry)
        log.info("enrolled %d simulated device(s) in %s", n, registry)
    soft, hard = raise_nofile()
    log.info("open-file limit %d (hard %d); %d devices in %d process(es)", soft, hard,
             spec.plan.devices, spec.processes)
    if spec.processes == 1:
        shard = Shard(spec.plan, spec.plan.device_ids(), spec.settings)
        return FleetReport([shard.run()])
    return _run_processes(spec, env)


def _run_processes(spec: FleetSpec, env: Mapping[str, str] | None) -> FleetReport:
    report = FleetReport()
    with tempfile.TemporaryDirectory(prefix="fedmq-simfleet-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.to_json())
        procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        child_env = {**os.environ, **(env or {})}
        try:
            for i in range(spec.processes):
                out = Path(tmp) / f"shard-{i}.json"
                cmd = [sys.executable, "-m", "fedmq_ops.simfleet.worker", str(spec_path),
                       str(i), str(out)]
                procs.append((subprocess.Popen(cmd, env=child_env), out))
            for proc, out in procs:
                code = proc.wait(spec.settings.timeout + 120)
                if code != 0 or not out.exists():
                    report.failed_processes += 1
                    log.error("simulated fleet process %d exited with %s", proc.pid, code)
                    continue
                report.shards.append(_result_from_json(out.read_text()))
        finally:
            stop_processes([proc for proc, _ in procs], STOP_GRACE)
    return report


def _result_from_json(text: str) -> ShardResult:
    raw = json.loads(text)
    rounds = {int(k): RoundTally(**v) for k, v in raw.pop("rounds").items()}
    return ShardResult(**raw, rounds=rounds)


def shard_main(argv: Sequence[str] | None = None) -> int:
    from fedmq.logs import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3:
        print("usage: python -m fedmq_ops.simfleet.worker SPEC.json INDEX OUT.json",
              file=sys.stderr)
        return 2
    setup_logging(0, False)
    spec = FleetSpec.from_json(Path(args[0]).read_text())
    index = int(args[1])
    shard = Shard(spec.plan, spec.plan.shard(index, spec.processes), spec.settings)
    result = shard.run()
    Path(args[2]).write_text(json.dumps(result.to_dict()))
    return 0

