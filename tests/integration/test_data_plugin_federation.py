"""A data-source plugin feeds a real federation.

Real Mosquitto, the real aggregator process and two real agent processes (prebuilt
digits-mlp). Both agents' config says ``source = "plugin:..."``: the example plugin of
``examples/sensor_plugin`` reads a sensor CSV that this test writes and appends to between
rounds (windows of 16 rows x 4 features = the model's 64 inputs; labels 0-9). Device B goes
through a wrapper plugin that returns a NaN in round 2.

The aggregator takes any device and closes each round at its deadline (target 3 updates, 2
devices, quorum 1), which leaves the test the time between "both updates of round r are on
the broker" and "round r+1 is announced" to append rows; the test checks that order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from aggregator.store import Store
from fedmq.net.localbroker import LocalBroker
from fedmq.net.procs import stop_process
from fedmq.topics import Topics
from fedmq.wire import decode_round, decode_status, decode_update
from tests.fakes import AggregatorProcess, connect

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
_EXAMPLE = _ROOT / "examples" / "sensor_plugin"
FLEET = "sensors"
WINDOW, STRIDE = 16, 8
HEADER = "ax,ay,az,temp,label\n"
NAN_ROUND = 2

# Device B's plugin: the example plugin, except that round 2 hands over a NaN.
_NAN_PLUGIN = f"""
import sensor_plugin

def load_round(device_id, round_id, params, spec):
    x, y = sensor_plugin.load_round(device_id, round_id, params, spec)
    if round_id == {NAN_ROUND}:
        x[0, 5] = float("nan")
    return x, y
"""


def windows(rows: int) -> int:
    return (rows - WINDOW) // STRIDE + 1 if rows >= WINDOW else 0


class SensorLog:
    """The CSV another process keeps appending to: whole lines, one write each batch."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.rows = 0
        self._rng = np.random.default_rng(seed)
        path.write_text(HEADER)

    def append(self, n: int) -> None:
        values = self._rng.normal(size=(n, 4))
        labels = self._rng.integers(0, 10, size=n)
        lines = "".join(
            f"{a:.4f},{b:.4f},{c:.4f},{d:.4f},{label}\n"
            for (a, b, c, d), label in zip(values, labels, strict=True)
        )
        with self.path.open("a") as fh:
            fh.write(lines)
        self.rows += n


class Spy:
    """Updates (device, round) -> num_examples, statuses and round announcements as the
    broker delivers them."""

    def __init__(self, b: LocalBroker, topics: Topics) -> None:
        self.updates: dict[tuple[str, int], int] = {}
        self.skips: dict[str, dict[str, object]] = {}
        self.rounds: set[int] = set()
        self._topics = topics
        self._cond = threading.Condition()
        self.client = connect(b)
        self.client.on_message = self._on_message
        self.client.subscribe(
            [(topics.update_wildcard, 1), (topics.round, 1), (f"{topics.base}/status/+", 1)]
        )

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        payload = bytes(msg.payload)
        with self._cond:
            if msg.topic == self._topics.round:
                self.rounds.add(decode_round(payload).round_id)
            elif "/status/" in msg.topic:
                status = decode_status(payload)
                skip = status.capabilities.get("last_skip")
                if isinstance(skip, dict):
                    self.skips[status.device] = skip
            else:
                u = decode_update(payload)
                self.updates[(u.device, u.round_id)] = u.num_examples
            self._cond.notify_all()

    def wait(self, pred: Callable[[], bool], what: str, timeout: float = 90) -> None:
        with self._cond:
            assert self._cond.wait_for(pred, timeout), f"timed out waiting for {what}"

    def announced(self, round_id: int) -> bool:
        with self._cond:
            return round_id in self.rounds

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Agent:
    """``python -m edge_agent --config agent.toml`` with a plugin source."""

    def __init__(self, b: LocalBroker, prefix: str, device: str, source: str, root: Path,
                 plugins: Path) -> None:
        self.device = device
        self.state_dir = root / f"agent-{device}"
        self.log_path = root / f"agent-{device}.log"
        config = root / f"agent-{device}.toml"
        config.write_text(textwrap.dedent(f"""\
            [agent]
            device_id = "{device}"
            fleet = "{FLEET}"
            model = "digits-mlp"
            source = "{source}"
            state_dir = "{self.state_dir}"
        """))
        cmd = [
            sys.executable, "-m", "edge_agent", "-v", "--config", str(config),
            "--host", b.host, "--port", str(b.port), "--topic-prefix", prefix,
        ]
        path = os.pathsep.join([str(_ROOT), str(_EXAMPLE), str(plugins)])
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONPATH": path}, cwd=_ROOT)

    def stop(self) -> int:
        return stop_process(self.proc, 20)

    def counters(self) -> dict[str, int]:
        obj = json.loads((self.state_dir / "state.json").read_text())
        return {str(k): int(v) for k, v in obj.get("counters", {}).items()}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.mark.timeout(240)
def test_plugin_data_feeds_a_federation_and_bad_data_skips_one_round(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path
) -> None:
    topics = Topics(FLEET, topic_prefix)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "nan_sensors.py").write_text(_NAN_PLUGIN)
    log_a, log_b = SensorLog(tmp_path / "a.csv", 1), SensorLog(tmp_path / "b.csv", 2)
    log_a.append(40)
    log_b.append(32)
    options = f"num_classes=10&window={WINDOW}&stride={STRIDE}&label=label"
    sources = {
        # A keeps the newest 8 windows; B all of them.
        "pi-a": f"plugin:sensor_plugin:load_round?{options}&path={log_a.path}&newest=8",
        "pi-b": f"plugin:nan_sensors:load_round?{options}&path={log_b.path}",
    }
    spy = Spy(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "agg",
        "--model", "digits-mlp", "--eval-dataset", "digits", "--codec", "int8",
        "--selection", "any", "--clients-per-round", "3", "--min-updates", "1",
        "--min-devices", "2", "--rounds", "3", "--epochs", "1", "--lr", "0.05",
        "--round-timeout", "12", fleet=FLEET,
    ).start()
    agents = {d: Agent(broker, topic_prefix, d, s, tmp_path, plugins) for d, s in sources.items()}
    a, b = agents["pi-a"], agents["pi-b"]
    expected: dict[tuple[str, int], int] = {}
    try:
        # Round 1: both train on what the files hold now.
        expected[("pi-a", 1)] = min(windows(log_a.rows), 8)
        expected[("pi-b", 1)] = windows(log_b.rows)
        spy.wait(lambda: {("pi-a", 1), ("pi-b", 1)} <= spy.updates.keys(), "round 1 updates")
        log_a.append(24)  # 64 rows: 7 windows
        log_b.append(16)  # 48 rows: 5 windows
        assert not spy.announced(2), "round 2 opened before the files grew: raise the timeout"

        # Round 2: B's plugin returns a NaN: B skips, A's update is folded alone.
        expected[("pi-a", 2)] = min(windows(log_a.rows), 8)
        spy.wait(lambda: ("pi-a", 2) in spy.updates and spy.skips.get("pi-b", {}).get("round")
                 == NAN_ROUND, "A's round 2 update and B's skip")
        log_a.append(32)  # 96 rows: 11 windows, the newest 8 kept
        log_b.append(32)  # 80 rows: 9 windows
        assert not spy.announced(3), "round 3 opened before the files grew: raise the timeout"

        # Round 3: both again, on the grown files.
        expected[("pi-a", 3)] = min(windows(log_a.rows), 8)
        expected[("pi-b", 3)] = windows(log_b.rows)
        spy.wait(lambda: {("pi-a", 3), ("pi-b", 3)} <= spy.updates.keys(), "round 3 updates")
        assert agg.wait(90) == 0, "the aggregator did not finish its 3 rounds cleanly"
        codes = {d: agent.stop() for d, agent in agents.items()}

        print(f"\nexpected examples {expected}\nseen {spy.updates}\nB's skip {spy.skips}")
        assert codes == {"pi-a": 0, "pi-b": 0}
        assert expected == {
            ("pi-a", 1): 4, ("pi-b", 1): 3, ("pi-a", 2): 7, ("pi-a", 3): 8, ("pi-b", 3): 9,
        }
        assert spy.updates == expected  # B sent nothing for round 2
        with Store(tmp_path / "agg") as store:
            history = [(r.round_id, r.status, r.participants) for r in store.history()]
            folded = {
                (dev, r): n for r in (1, 2, 3) for dev, _uid, n, _bytes in store.contributions(r)
            }
        assert history == [(1, "closed", 2), (2, "closed", 1), (3, "closed", 2)]
        assert folded == expected  # the weights are the windows each device had that round

        reason = (
            "data plugin nan_sensors:load_round: x holds 1 non-finite value(s) (NaN or inf)"
        )
        assert spy.skips["pi-b"] == {"round": NAN_ROUND, "reason": reason}
        skip_lines = [line for line in b.log().splitlines() if "skipped" in line]
        assert len(skip_lines) == 1 and skip_lines[0].endswith(
            f"round {NAN_ROUND} skipped: {reason}"), skip_lines
        assert b.counters().get("data_skips") == 1 and "data_skips" not in a.counters()
        for agent in agents.values():
            assert "Traceback" not in agent.log()
    except BaseException:
        print(agg.log()[-6000:])
        for agent in agents.values():
            print(f"--- {agent.device}\n{agent.log()[-4000:]}")
        raise
    finally:
        for agent in agents.values():
            agent.stop()
        agg.stop()
        spy.close()


def test_a_plugin_that_cannot_be_imported_stops_the_agent_with_one_line(
    tmp_path: Path,
) -> None:
    cmd = [
        sys.executable, "-m", "edge_agent", "--device-id", "pi-x", "--fleet", FLEET,
        "--state-dir", str(tmp_path / "state"), "--model", "digits-mlp",
        "--source", f"plugin:no_such_plugin_{uuid.uuid4().hex[:6]}:load?num_classes=10",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=_ROOT,
                          env={**os.environ, "PYTHONPATH": str(_ROOT)})
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1, done.stderr
    assert "cannot import data plugin 'no_such_plugin_" in lines[0]
    assert "ModuleNotFoundError: No module named" in lines[0]
    assert "Traceback" not in done.stderr
