"""Test helpers: synthetic devices publishing crafted updates, a watcher of the retained
model/round topics, and the aggregator as a real subprocess (``python -m aggregator``).

Only for integration tests against a real broker: the devices speak the real wire format.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from fedmq.evaluation import EvalReport
from fedmq.net.localbroker import LocalBroker
from fedmq.net.procs import stop_process
from fedmq.signing import DeviceKey, sign_update
from fedmq.topics import Topics
from fedmq.update import codecs
from fedmq.wire import (
    AckMessage,
    ModelMessage,
    RoundAnnouncement,
    StatusMessage,
    Tensor,
    UpdateMessage,
    decode_ack,
    decode_model,
    decode_round,
    encode,
)

__all__ = [
    "AckCollector",
    "AckLog",
    "AgentProcess",
    "AggregatorProcess",
    "FakeDevice",
    "Watcher",
    "connect",
    "exact_delta",
    "fedmq_cli",
    "make_update",
    "model_weights",
]

_ROOT = Path(__file__).resolve().parents[1]

# What the TFLite runtime prints on stderr itself (C++, not Python logging) when a model loads.
_NATIVE_BANNERS = ("INFO: Created TensorFlow Lite",)


def fedmq_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m fedmq_ops ARGS`` as a real process from this checkout (exit code, output).

    ``.stderr`` keeps the Python log lines only: the TFLite runtime's own native banner is
    dropped so a test can count the lines a command logged.
    """
    env = {**os.environ, "PYTHONPATH": str(_ROOT)}
    done = subprocess.run([sys.executable, "-m", "fedmq_ops", *args], capture_output=True,
                          text=True, env=env, cwd=_ROOT, timeout=timeout)
    kept = [line for line in done.stderr.splitlines(keepends=True)
            if not line.startswith(_NATIVE_BANNERS)]
    done.stderr = "".join(kept)
    return done


def connect(b: LocalBroker, client_id: str = "") -> mqtt.Client:
    """A connected MQTT v5 client with its network loop running."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect(b.host, b.port)
    c.loop_start()
    return c



def make_update(
    fleet: str,
    round_id: int,
    base_version: int,
    device: str,
    delta: Mapping[str, np.ndarray],
    num_examples: int,
    codec: str = "float32",
    update_id: str | None = None,
    seed: int = 0,
    key: DeviceKey | None = None,
    steps: int = 0,
    evaluation: EvalReport | None = None,
) -> bytes:
    """An encoded update message for ``delta`` (the real codecs and wire format); with
    ``key``, the signed envelope of it; ``steps``/``evaluation`` as a device reports them."""
    tensors = codecs.encode_delta(delta, codec, np.random.default_rng(seed))
    msg = UpdateMessage(
        fleet=fleet, round_id=round_id, base_version=base_version, device=device,
        update_id=update_id or uuid.uuid4().hex, num_examples=num_examples, codec=codec,
        tensors=tensors, created_at=time.time(), steps=steps, evaluation=evaluation,
    )
    return encode(msg) if key is None else sign_update(msg, key)



def raw_update(
    fleet: str, round_id: int, base_version: int, device: str, tensors: Sequence[Tensor],
    num_examples: int = 1, codec: str = "float32", update_id: str | None = None,
) -> bytes:
    """An update with hand-made tensors (wrong shapes, NaN values ...), bypassing the codec."""
    return encode(
        UpdateMessage(
            fleet=fleet, round_id=round_id, base_version=base_version, device=device,
            update_id=update_id or uuid.uuid4().hex, num_examples=num_examples, codec=codec,
            tensors=tuple(tensors),
        )
    )


def exact_delta(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Deltas whose weighted sums are exact in float32: multiples of 1/16 in [-2, 2]."""
    rng = np.random.default_rng(seed)
    return {
        n: (rng.integers(-32, 33, size=s).astype(np.float32) / np.float32(16))
        for n, s in shapes.items()
    }


def model_weights(msg: ModelMessage) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.array(), dtype=np.float32) for t in msg.tensors}


class AckCollector:
    """Subscribes to every ack topic of a fleet; acks by device."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self._acks: queue.Queue[AckMessage] = queue.Queue()
        self.seen: list[AckMessage] = []
        self.client = connect(b)
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a, **_k: ready.set()
        self.client.on_message = self._on_message
        self.client.subscribe(f"{topics.base}/ack/+", qos=1)
        ready.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        self._acks.put(decode_ack(bytes(msg.payload)))

    def wait(self, device: str, timeout: float = 20.0, update_id: str | None = None) -> AckMessage:
        end = time.monotonic() + timeout
        for ack in self.seen:
            if ack.device == device and (update_id is None or ack.update_id == update_id):
                self.seen.remove(ack)
                return ack
        while time.monotonic() < end:
            try:
                ack = self._acks.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            if ack.device == device and (update_id is None or ack.update_id == update_id):
                return ack
            self.seen.append(ack)
        raise AssertionError(f"no ack for {device} ({update_id}) within {timeout}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AckLog:
    """Every ack of a fleet, in arrival order, for tests that count them in bulk."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self.acks: list[AckMessage] = []
        self._cond = threading.Condition()
        self.client = connect(b, f"acks-{uuid.uuid4().hex[:8]}")
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a, **_k: subscribed.set()
        self.client.on_message = self._on_message
        self.client.subscribe(f"{topics.base}/ack/+", qos=1)
        assert subscribed.wait(10), "ack subscription not confirmed"

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.acks.append(decode_ack(bytes(msg.payload)))
            self._cond.notify_all()

    def wait_count(self, n: int, timeout: float) -> int:
        """Wait until ``n`` acks arrived (or the timeout); returns how many did."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.acks) >= n, timeout)
            return len(self.acks)

    @property
    def by_device(self) -> dict[str, list[AckMessage]]:
        with self._cond:
            out: dict[str, list[AckMessage]] = {}
            for ack in self.acks:
                out.setdefault(ack.device, []).append(ack)
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watcher:
    """Follows the retained model and round topics."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self.topics = topics
        self.models: dict[int, ModelMessage] = {}
        self.rounds: dict[int, RoundAnnouncement] = {}
        self._cond = threading.Condition()
        self.client = connect(b)
        self.client.on_message = self._on_message
        self.client.subscribe([(topics.model, 1), (topics.round, 1)])

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        with self._cond:
            if msg.topic == self.topics.model:
                m = decode_model(bytes(msg.payload))
                self.models[m.version] = m
            else:
                r = decode_round(bytes(msg.payload))
                self.rounds[r.round_id] = r
            self._cond.notify_all()

    def model(self, version: int, timeout: float = 60.0) -> ModelMessage:
        with self._cond:
            if not self._cond.wait_for(lambda: version in self.models, timeout):
                raise AssertionError(f"model version {version} not published in {timeout}s")
            return self.models[version]

    def round(self, round_id: int, timeout: float = 60.0) -> RoundAnnouncement:
        with self._cond:
            if not self._cond.wait_for(lambda: round_id in self.rounds, timeout):
                raise AssertionError(f"round {round_id} not announced in {timeout}s")
            return self.rounds[round_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class FakeDevice:
    """A synthetic device: publishes status and crafted updates with QoS 1."""

    def __init__(self, b: LocalBroker, topics: Topics, device: str) -> None:
        self.topics = topics
        self.device = device
        self.client = connect(b, f"fake-{device}-{uuid.uuid4().hex[:6]}")

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        info = self.client.publish(topic or self.topics.update(self.device), payload, qos=1)
        info.wait_for_publish(10)

    def status(self, state: str = "online") -> None:
        msg = StatusMessage(fleet=self.topics.fleet, device=self.device, state=state)
        self.client.publish(self.topics.status(self.device), encode(msg), qos=1, retain=True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class AggregatorProcess:
    """``python -m aggregator`` as a child process (stderr captured to a log file)."""

    def __init__(self, b: LocalBroker, prefix: str, state_dir: Path, *args: str,
                 fleet: str = "f1") -> None:
        self.log_path = state_dir.parent / f"{state_dir.name}-aggregator.log"
        self.cmd = [
            sys.executable, "-m", "aggregator", "-v",
            "--host", b.host, "--port", str(b.port), "--topic-prefix", prefix,
            "--fleet", fleet, "--client-id", f"agg-{prefix}", "--state-dir", str(state_dir),
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AggregatorProcess:
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=_ROOT
            )
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class AgentProcess:
    """``python -m edge_agent`` as a child process: the real agent on its IID share of the
    digits data (``index`` of ``num_clients``), log and state under ``root``."""

    def __init__(self, b: LocalBroker, prefix: str, device: str, index: int, root: Path,
                 fleet: str, num_clients: int) -> None:
        self.device = device
        self.state_dir = root / f"agent-{device}"
        self.log_path = root / f"agent-{device}.log"
        cmd = [
            sys.executable, "-m", "edge_agent", "-v",
            "--device-id", device, "--fleet", fleet, "--host", b.host, "--port", str(b.port),
            "--topic-prefix", prefix, "--state-dir", str(self.state_dir),
            "--model", "digits-mlp", "--source", "digits", "--partition", "iid",
            "--num-clients", str(num_clients), "--client-index", str(index),
            "--reconnect-min", "1", "--reconnect-max", "1", "--ack-timeout", "4",
        ]
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                         cwd=_ROOT)

    def stop(self) -> int | None:
        """SIGTERM (SIGKILL after 20 s); the exit code, None if it had to be killed."""
        return stop_process(self.proc, 20)

    def outbox_size(self) -> int:
        """Updates waiting for an ack (read-only: an ``Outbox`` object would remove the
        temp files of a write in progress)."""
        return len(list((self.state_dir / "outbox").glob("*.update")))

    def submitted(self, round_id: int) -> str | None:
        """The update id the agent recorded for ``round_id`` (after training), if any."""
        try:
            obj = json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):
            return None
        uid = obj.get("submitted", {}).get(str(round_id))
        return uid if isinstance(uid, str) else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
