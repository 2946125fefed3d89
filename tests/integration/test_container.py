"""The container images, really built and run with podman against the test Mosquitto.

- Both images are built the registry-less way (``deploy/docker/build-offline.sh``): a Debian
  12 base made by debootstrap, python3 from its apt, the wheels downloaded on the host and
  installed offline. Both run as uid 10001 and cannot import TensorFlow.
- The aggregator container (``--network host``, config and state volume mounted) folds two
  rounds of two real agents running on the host; it is then SIGKILLed (``podman kill``),
  removed, and a new container on the same volume carries on with model version 3.
- The agent container completes a round with a host aggregator.
- ``deploy/compose/compose.yaml`` comes up with podman-compose (with ``compose.podman.yaml``:
  local images, ulimits) on broker files made by ``fedmq broker init``: the aggregator logs
  in over TLS by the service name, both health checks pass, and a host client reads the
  retained model through the published TLS port. It publishes the fixed ports 8883 and 9108.

Podman's flags are the ones this machine kind needs (docs/deployment.md): runc with cgroupfs
and explicit ulimits. The base image and the wheels are cached in ``.cache/containers/``.
The tests are skipped only when podman cannot run a container here at all.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from fedmq.data.local import load_source
from fedmq.net.localbroker import LocalBroker, free_port
from fedmq.net.procs import stop_processes
from fedmq.topics import Topics
from fedmq.wire import decode_model
from tests.fakes import AckCollector, AggregatorProcess, Watcher, fedmq_cli

#: Bound of one ``build-offline.sh`` run (a cold base is debootstrap: ~25 s on a quiet machine,
#: 8 minutes measured on the shared 2-core VM under load).
BUILD_TIMEOUT = 900
#: pytest-timeout covers the session fixtures' builds inside the first test that needs them:
#: on a fresh machine that test waits for up to three builds (base, aggregator, mosquitto),
#: so the suite's 600 s default would fail it before the build finished.
TEST_TIMEOUT = 3 * BUILD_TIMEOUT + 600

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "deploy" / "docker" / "build-offline.sh"
BASE_IMAGE = "localhost/debian:bookworm"
AGGREGATOR_IMAGE = "localhost/fedmq-aggregator:test"
AGENT_IMAGE = "localhost/fedmq-agent:test"
MOSQUITTO_IMAGE = "localhost/fedmq-mosquitto:test"
PODMAN = ("podman", "--runtime", "/usr/sbin/runc", "--cgroup-manager=cgroupfs")
RUN_FLAGS = ("--network", "host", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
UID = "10001"


def podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


def build(target: str, tag: str, log: Path) -> float:
    """``build-offline.sh TARGET TAG`` with the test's Python downloading the wheels;
    returns the seconds it took (printed, never asserted)."""
    t0 = time.monotonic()
    with log.open("wb") as out:
        code = subprocess.run(
            ["bash", str(BUILD), target, tag], stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHON": sys.executable}, timeout=BUILD_TIMEOUT,
        ).returncode
    seconds = time.monotonic() - t0
    print(f"build-offline.sh {target}: {seconds:.1f} s")
    assert code == 0, f"build-offline.sh {target} exited {code}:\n{log.read_text()[-6000:]}"
    return seconds


@pytest.fixture(scope="session")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: `make test` installs podman runc debootstrap")
    if os.geteuid() != 0:
        pytest.skip("the offline image build needs root (debootstrap, rootful podman)")
    build("base", BASE_IMAGE, tmp_path_factory.mktemp("build") / "base.log")
    probe = podman("run", "--rm", *RUN_FLAGS, BASE_IMAGE, "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers on this machine: {probe.stderr.strip()}")
    return BASE_IMAGE


@pytest.fixture(scope="session")
def aggregator_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    build("aggregator", AGGREGATOR_IMAGE, tmp_path_factory.mktemp("build") / "aggregator.log")
    return AGGREGATOR_IMAGE


@pytest.fixture(scope="session")
def agent_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    build("agent", AGENT_IMAGE, tmp_path_factory.mktemp("build") / "agent.log")
    return AGENT_IMAGE


@pytest.fixture(scope="session")
def mosquitto_image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    build("mosquitto", MOSQUITTO_IMAGE, tmp_path_factory.mktemp("build") / "mosquitto.log")
    return MOSQUITTO_IMAGE


class Containers:
    """Named containers and volumes of one test, removed at its end."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]
        self.names: list[str] = []
        self.volumes: list[str] = []

    def volume(self, what: str) -> str:
        name = f"fedmq-test-{what}-{self.tag}"
        podman("volume", "create", name)
        self.volumes.append(name)
        return name

    def run(self, what: str, image: str, *args: str) -> str:
        name = f"fedmq-test-{what}-{self.tag}-{len(self.names)}"
        podman("run", "-d", "--name", name, *RUN_FLAGS, *args, image)
        self.names.append(name)
        return name

    def logs(self, name: str) -> str:
        done = podman("logs", name, check=False)
        return (done.stdout + done.stderr)[-8000:]

    def close(self) -> None:
        for name in self.names:
            podman("rm", "-f", name, check=False)
        for vol in self.volumes:
            podman("volume", "rm", "-f", vol, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    c = Containers()
    yield c
    c.close()


_MQTT_KEYS = frozenset({"host", "port", "client_id"})  # these go in the [mqtt] table


def write_toml(path: Path, section: str, values: dict[str, object]) -> Path:
    def line(key: str, value: object) -> str:
        return f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value!r}"

    lines = [f"[{section}]"]
    lines += [line(k, v) for k, v in values.items() if k not in _MQTT_KEYS]
    lines += ["[mqtt]"] + [line(k, v) for k, v in values.items() if k in _MQTT_KEYS]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)  # read by uid 10001 in the container
    return path


def metrics(port: int) -> dict[str, float]:
    """The aggregator's Prometheus metrics (samples without labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            out[name] = float(value)
    return out


def retained_version(watcher: Watcher, timeout: float = 30.0) -> int:
    """The version of the retained model a new watcher receives on subscribing."""
    end = time.monotonic() + timeout
    while not watcher.models and time.monotonic() < end:
        time.sleep(0.05)
    assert watcher.models, f"no retained model within {timeout}s"
    return max(watcher.models)


@pytest.mark.parametrize("image", ["aggregator_image", "agent_image"])
def test_image_runs_as_uid_10001_without_tensorflow(
    image: str, request: pytest.FixtureRequest
) -> None:
    tag = request.getfixturevalue(image)
    user = podman("image", "inspect", "--format", "{{.Config.User}}", tag).stdout.strip()
    assert user == f"{UID}:{UID}"
    ids = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "python", tag, "-c",
                 "import os; print(os.getuid(), os.getgid(), os.getcwd())")
    home = "/var/lib/fedmq" if image == "aggregator_image" else "/var/lib/fedmq-agent"
    assert ids.stdout.split() == [UID, UID, home]
    tf = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "python", tag, "-c",
                "import tensorflow", check=False)
    assert tf.returncode == 1
    assert "ModuleNotFoundError: No module named 'tensorflow'" in tf.stderr
    # The entry point is the fedmq command of the image's venv.
    helped = podman("run", "--rm", *RUN_FLAGS, tag, "--help")
    assert "--config" in helped.stdout


def _start_host_agents(
    b: LocalBroker, fleet: str, workdir: Path, n: int
) -> list[subprocess.Popen[bytes]]:
    procs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for i in range(n):
        cfg = write_toml(workdir / f"agent-{i}.toml", "agent", {
            "device_id": f"host-agent-{i}", "fleet": fleet, "host": b.host, "port": b.port,
            "state_dir": str(workdir / f"agent-{i}"), "model": "digits-mlp",
            "source": "digits", "partition": "iid", "num_clients": n, "client_index": i,
            "max_examples": 200,
        })
        with (workdir / f"agent-{i}.log").open("ab") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--config", str(cfg)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            ))
    return procs


def test_aggregator_container_federates_and_resumes_after_kill(
    broker: LocalBroker, aggregator_image: str, containers: Containers, tmp_path: Path
) -> None:
    fleet = f"ctr-{uuid.uuid4().hex[:8]}"
    topics = Topics(fleet)
    port = free_port()
    config = write_toml(tmp_path / "aggregator.toml", "aggregator", {
        "fleet": fleet, "host": broker.host, "port": broker.port, "client_id": f"agg-{fleet}",
        "model": "digits-mlp", "eval_dataset": "none", "rounds": 0,
        "clients_per_round": 2, "min_updates": 2, "min_devices": 2, "round_timeout": 600.0,
        "epochs": 1, "lr": 0.2, "codec": "int8",
    })
    state = containers.volume("state")
    args = ("-e", f"FEDMQ_AGGREGATOR_METRICS_PORT={port}", "-v", f"{state}:/var/lib/fedmq",
            "-v", f"{config}:/etc/fedmq/aggregator.toml:ro")
    first = containers.run("aggregator", aggregator_image, *args)
    watcher = Watcher(broker, topics)
    agents = _start_host_agents(broker, fleet, tmp_path, 2)
    resumed: Watcher | None = None
    try:
        try:
            for version in (1, 2):
                model = watcher.model(version, timeout=240)
                assert model.metrics["participants"] == 2
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncontainer log:\n{containers.logs(first)}") from exc
        # No agent, no new round: the container is killed with a round open.
        stop_processes(agents)
        assert metrics(port)["fedmq_model_version"] >= 2
        # The image's HEALTHCHECK (GET /metrics on the configured port) passes.
        assert podman("healthcheck", "run", first, check=False).returncode == 0
        # The state is in the volume, written by uid 10001.
        mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", state).stdout.strip()
        files = list(Path(mount).iterdir())
        assert files and all(f.stat().st_uid == int(UID) for f in files), files

        podman("kill", first)
        assert podman("inspect", "--format", "{{.State.Running}}", first).stdout.strip() == "false"
        podman("rm", first)
        # A new watcher gets the retained model: the last version the killed container made.
        resumed = Watcher(broker, topics)
        saved = retained_version(resumed)
        assert saved >= max(watcher.models) >= 2
        second = containers.run("aggregator", aggregator_image, *args)
        agents = _start_host_agents(broker, fleet, tmp_path, 2)
        try:
            model = resumed.model(saved + 1, timeout=240)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ncontainer log:\n{containers.logs(second)}") from exc
        assert model.round_id > saved and model.metrics["participants"] == 2
        # Nothing older than the saved version was published again: no fresh start at v0.
        assert min(resumed.models) == saved, sorted(resumed.models)
        assert metrics(port)["fedmq_model_version"] >= saved + 1
    finally:
        stop_processes(agents)
        watcher.close()
        if resumed is not None:
            resumed.close()


def test_agent_container_federates_and_resumes_after_kill(
    broker: LocalBroker, agent_image: str, containers: Containers, topic_prefix: str,
    tmp_path: Path,
) -> None:
    fleet = "f1"
    topics = Topics(fleet, topic_prefix)
    digits = load_source("digits")
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x[:300], y=digits.y[:300])
    data.chmod(0o644)
    acks = AckCollector(broker, topics)
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "aggregator", "--eval-dataset", "none",
        "--clients-per-round", "1", "--min-updates", "1", "--min-devices", "1", "--rounds", "3",
        "--round-timeout", "300", fleet=fleet,
    ).start()
    device = f"ctr-agent-{containers.tag}"
    config = write_toml(tmp_path / "agent.toml", "agent", {
        "device_id": device, "fleet": fleet, "host": broker.host, "port": broker.port,
        "topic_prefix": topic_prefix, "model": "digits-mlp",
        "source": "npz:/data/digits.npz?num_classes=10", "max_examples": 200,
    })
    state = containers.volume("agent-state")
    args = ("-v", f"{state}:/var/lib/fedmq-agent", "-v", f"{config}:/etc/fedmq/agent.toml:ro",
            "-v", f"{data}:/data/digits.npz:ro")
    agent = containers.run("agent", agent_image, *args)
    try:
        try:
            for round_id in (1, 2):
                ack = acks.wait(device, timeout=240)
                assert ack.accepted and ack.code == "ok" and ack.round_id == round_id, ack
                if round_id == 2:  # killed at once: round 3 is trained by the next container
                    podman("kill", agent)
                model = watcher.model(round_id, timeout=120)
                assert model.metrics["participants"] == 1
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nagent container log:\n{containers.logs(agent)}\n"
                f"aggregator log:\n{agg.log()[-4000:]}"
            ) from exc
        # The agent kept its state (device id, outbox, model) in the volume, as uid 10001.
        mount = podman("volume", "inspect", "--format", "{{.Mountpoint}}", state).stdout.strip()
        files = list(Path(mount).iterdir())
        assert files and all(f.stat().st_uid == int(UID) for f in files), files

        assert podman("inspect", "--format", "{{.State.Running}}", agent).stdout.strip() == "false"
        podman("rm", agent)
        # A new container on the same volume: the same device, which takes part in round 3
        # (an update the killed one had sent already is answered duplicate: folded once).
        second = containers.run("agent", agent_image, *args)
        try:
            ack = acks.wait(device, timeout=240)
            model = watcher.model(3, timeout=120)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nagent container log:\n{containers.logs(second)}\n"
                f"aggregator log:\n{agg.log()[-4000:]}"
            ) from exc
        assert ack.accepted and ack.code in ("ok", "duplicate") and ack.round_id == 3, ack
        assert model.metrics["participants"] == 1
        assert agg.wait(120) == 0  # --rounds 3: the aggregator is done
        # Every answer the device got was an acceptance: nothing was refused or lost.
        assert all(a.accepted for a in acks.seen if a.device == device), acks.seen
    finally:
        agg.stop()
        acks.close()
        watcher.close()


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_log(name: str, text: str, timeout: float) -> str:
    end = time.monotonic() + timeout
    while True:
        done = podman("logs", name, check=False)
        log = done.stdout + done.stderr
        if text in log or time.monotonic() > end:
            return log
        time.sleep(0.5)


def _retained_model_over_tls(ca: Path, password: str) -> int:
    """Log in as `monitor` on 127.0.0.1:8883 (TLS) and read the retained model's version."""
    got: queue.Queue[int] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="monitor",
                    protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(ca))
    c.username_pw_set("monitor", password)
    c.on_connect = lambda cl, *_a: cl.subscribe(Topics("default").model, qos=1)
    c.on_message = lambda _c, _u, msg: got.put(decode_model(bytes(msg.payload)).version)
    c.connect("127.0.0.1", 8883)
    c.loop_start()
    try:
        return got.get(timeout=60)
    finally:
        c.disconnect()
        c.loop_stop()


def test_compose_comes_up_with_podman_compose(
    aggregator_image: str, mosquitto_image: str, tmp_path: Path
) -> None:
    compose = shutil.which("podman-compose")
    if compose is None:
        pytest.fail("podman-compose is not installed: `make test` installs it (apt-get)")
    busy = [p for p in (8883, 9108) if _port_in_use(p)]
    assert not busy, f"compose.yaml publishes 127.0.0.1 ports {busy}, which are in use here"
    # The repository's compose files, beside broker files made by the broker tooling (at
    # ../../broker, where compose.yaml mounts them), in a scratch tree.
    here = tmp_path / "deploy" / "compose"
    here.mkdir(parents=True)
    for name in ("compose.yaml", "compose.podman.yaml", "aggregator.toml"):
        shutil.copy(ROOT / "deploy" / "compose" / name, here / name)
    broker_dir = tmp_path / "broker"
    init = fedmq_cli("broker", "init", "--dir", str(broker_dir), "--hostname", "mosquitto",
                     "--monitor", "--owner", "1883:1883")
    assert init.returncode == 0, init.stderr
    secrets = {}
    for who in ("aggregator", "monitor"):
        for line in (broker_dir / "credentials" / f"{who}.env").read_text().splitlines():
            if line.startswith("FEDMQ_"):
                key, _, value = line.partition("=")
                secrets[key] = value
    (here / ".env").write_text("".join(f"{k}={v}\n" for k, v in secrets.items()))
    project = f"fedmq-test-{uuid.uuid4().hex[:8]}"
    cmd = [compose, "--podman-args", " ".join(PODMAN[1:]), "-p", project,
           "-f", "compose.yaml", "-f", "compose.podman.yaml"]
    env = {**os.environ, "FEDMQ_AGGREGATOR_IMAGE": aggregator_image,
           "FEDMQ_MOSQUITTO_IMAGE": mosquitto_image}

    def compose_run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cmd, *args], cwd=here, env=env, capture_output=True,
                              text=True, timeout=300)

    try:
        up = compose_run("up", "-d", "--no-build")
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        broker_name, agg_name = f"{project}_mosquitto_1", f"{project}_aggregator_1"
        log = _wait_for_log(agg_name, "connected to mosquitto:8883 as aggregator", 120)
        assert "connected to mosquitto:8883 as aggregator" in log, log[-6000:]
        running = podman("ps", "--filter", f"label=io.podman.compose.project={project}",
                         "--format", "{{.Names}}").stdout.split()
        assert sorted(running) == sorted([broker_name, agg_name])
        # Both compose health checks (monitor login on the broker's loopback listener;
        # GET /metrics in the aggregator) pass when run by hand.
        for name in (broker_name, agg_name):
            check = podman("healthcheck", "run", name, check=False)
            assert check.returncode == 0, (name, check.stdout, check.stderr)
        assert _retained_model_over_tls(broker_dir / "certs" / "ca.crt",
                                        secrets["FEDMQ_MONITOR_PASSWORD"]) == 0
        assert metrics(9108)["fedmq_model_version"] == 0
        # The aggregator runs read-only as uid 10001 with every capability dropped.
        info = podman("inspect", "--format",
                      "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{.EffectiveCaps}}",
                      agg_name).stdout
        assert info.split() == ["10001:10001", "true", "[]"], info
    finally:
        down = compose_run("down", "-v")
        podman("network", "rm", "-f", f"{project}_default", check=False)
        assert down.returncode == 0, down.stderr[-4000:]
