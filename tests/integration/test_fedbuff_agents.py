"""FedBuff with real agent processes (prebuilt digits-mlp, LiteRT) through Mosquitto: two fast
agents and two slowed ones (``--train-delay``). The model advances on the fast agents' updates
without waiting; the slow agents' updates arrive trained on older versions and are folded
with weight ``num_examples x (1 + staleness) ** -0.5``, as their acks say exactly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmq.errors import RejectReason
from fedmq.net.localbroker import LocalBroker
from fedmq.net.procs import stop_processes
from fedmq.topics import Topics
from tests.fakes import AckLog, AggregatorProcess, Watcher

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
_NOTE = re.compile(
    r"staleness (\d+): weight (\S+) x \(1 \+ (\d+)\) \*\* -(\S+) = (\S+), folded into round (\d+)"
)
AGENTS = {"fast-0": 0.0, "fast-1": 0.0, "slow-2": 4.0, "slow-3": 4.0}  # train_delay seconds


def _agent(broker: LocalBroker, prefix: str, tmp: Path, index: int, name: str,
           delay: float) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "edge_agent", "--host", broker.host, "--port", str(broker.port),
        "--topic-prefix", prefix, "--fleet", "f1", "--device-id", name,
        "--state-dir", str(tmp / name), "--partition", "iid", "--num-clients", str(len(AGENTS)),
        "--client-index", str(index), "--train-delay", str(delay),
    ]
    env = {**os.environ, "PYTHONPATH": str(_ROOT), "PYTHONUNBUFFERED": "1"}
    with open(tmp / f"{name}.log", "ab") as logf:
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=_ROOT)


def test_slow_agents_updates_are_folded_stale_with_their_weight(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMQ_AGGREGATOR_WEIGHT_CAP_MULTIPLIER", "0")  # weight = num_examples
    # An update trained on version 0 is several times the norm of later ones: the adaptive
    # norm bound (3 x the median) would refuse the first stale updates (docs/rounds.md).
    monkeypatch.setenv("FEDMQ_AGGREGATOR_NORM_BOUND", "off")
    topics = Topics("f1", topic_prefix)
    acks = AckLog(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "state",
        "--eval-dataset", "digits", "--eval-examples", "400", "--round-policy", "fedbuff",
        "--buffer-size", "2", "--max-staleness", "1000", "--epochs", "1", "--lr", "0.2",
    ).start()
    agents = [
        _agent(broker, topic_prefix, tmp_path, i, name, delay)
        for i, (name, delay) in enumerate(AGENTS.items())
    ]

    def stale_ok(device: str) -> list[re.Match[str]]:
        found = []
        for ack in acks.by_device.get(device, []):
            m = _NOTE.fullmatch(ack.reason) if ack.accepted and ack.code == "ok" else None
            if m is not None and int(m.group(1)) >= 1:
                found.append(m)
        return found

    try:
        end = time.monotonic() + 240
        while not (stale_ok("slow-2") and stale_ok("slow-3")) and time.monotonic() < end:
            for p in (agg.proc, *agents):
                assert p is not None and p.poll() is None, "a process exited"
            time.sleep(0.5)
        # Each slow agent had an update folded that was trained versions ago: the buffers
        # closed (new models) on the fast agents' updates while the slow ones trained.
        for slow in ("slow-2", "slow-3"):
            assert stale_ok(slow), f"no stale update of {slow} folded: {acks.by_device}"
            print(slow, [m.group(0) for m in stale_ok(slow)])
        for ack in [a for device_acks in acks.by_device.values() for a in device_acks]:
            if ack.accepted and ack.code == "ok" and ack.reason:
                m = _NOTE.fullmatch(ack.reason)
                assert m is not None, ack.reason
                s, weight, exponent, folded = (
                    int(m.group(1)), float(m.group(2)), float(m.group(4)), float(m.group(5))
                )
                assert int(m.group(3)) == s and exponent == 0.5
                assert weight == int(weight) and weight >= 1  # its examples, no cap
                assert folded == weight * (1 + s) ** -0.5
            elif not ack.accepted:
                # the one refusal fedbuff makes here: a device's second update in a buffer
                assert ack.code == RejectReason.WRONG_ROUND, ack
                assert "already has an update in the buffer" in ack.reason, ack
        latest = max(watcher.models)
        assert latest >= 2
        print("versions", latest, {v: m.metrics.get("accuracy") for v, m in watcher.models.items()})
        assert watcher.models[latest].metrics["accuracy"] > watcher.model(0).metrics["accuracy"]
    except BaseException:
        print(agg.log()[-8000:])
        for name in AGENTS:
            print(name, (tmp_path / f"{name}.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        stop_processes(agents)
        agg.stop()
        acks.close()
        watcher.close()
