"""What an operator sees when the broker connection goes wrong: the real aggregator and agent
processes (``python -m aggregator|edge_agent --config FILE``) against a real Mosquitto.

- unreachable (closed port): one WARNING naming host:port and the cause, not one per retry,
  and the service keeps retrying;
- bad credentials, TLS to a plaintext port, a host name not in the certificate, a bad TLS
  file: one ERROR line, exit code 1, no traceback (``retry_forever`` keeps retrying);
- a publish the broker's ACL refuses (PUBACK 0x87): logged once with topic and reason and
  counted (aggregator: ``fedmq_publish_failures_total``; agent: its ``publish_failures``);
- a broker restart: one WARNING on disconnect, one INFO on reconnect, no paho noise.

Waits are on log lines (e.g. "three more failed attempts were seen"), never on the clock.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedmq.net.localbroker import LocalBroker, free_port, mosquitto_path
from fedmq_ops.broker import BrokerLayout, BrokerSettings, add_device, init_broker
from tests.conftest import _track
from tests.integration.test_broker_security import SecuredBroker

pytestmark = pytest.mark.integration

_ROOT = Path(__file__).resolve().parents[2]
FLEET = "f1"
LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+(\S+): (.*)$")
# A failed attempt as the services log it at -vv (quiet repeats are DEBUG); the paho line
# is what the code before ConnectionWatch logged on every attempt.
ATTEMPT = re.compile(r"cannot connect to .*; retrying|Client is not connected")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))


def write_config(path: Path, section: str, service: dict[str, Any], mqtt: dict[str, Any]) -> Path:
    lines = [f"[{section}]", *(f"{k} = {_toml_value(v)}" for k, v in service.items())]
    lines += ["[mqtt]", *(f"{k} = {_toml_value(v)}" for k, v in mqtt.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def parse(text: str) -> list[tuple[str, str, str]]:
    """(level, logger, message) of every log line (other output skipped)."""
    out: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            out.append((m.group(1), m.group(2), m.group(3)))
    return out


class Service:
    """``python -m aggregator|edge_agent --config FILE`` with its log in a file."""

    def __init__(self, kind: str, config: Path, *flags: str) -> None:
        self.kind = kind
        self.log_path = config.with_suffix(".log")
        module = {"aggregator": "aggregator", "agent": "edge_agent"}[kind]
        env = {**os.environ, "PYTHONPATH": str(_ROOT)}
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "--config", str(config), *flags],
                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=config.parent,
            )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[tuple[str, str, str]]:
        return parse(self.text())

    def wait_for(self, what: str, pred: Callable[[str], bool], timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.text()
            if pred(text):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited ({self.proc.returncode}) before "
                                     f"{what}:\n{text}")
            time.sleep(0.1)
        raise AssertionError(f"{self.kind}: no {what} within {timeout}s:\n{self.text()}")

    def wait_attempts(self, n: int, after: int = 0) -> None:
        """Until ``n`` failed connection attempts were logged after log offset ``after``."""
        self.wait_for(f"{n} failed attempts", lambda t: len(ATTEMPT.findall(t[after:])) >= n)

    def exit_code(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"{self.kind} still running:\n{self.text()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exit_code()


def at_least(level: str, records: list[tuple[str, str, str]]) -> list[str]:
    order = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    return [msg for lvl, _, msg in records if order.index(lvl) >= order.index(level)]


@dataclass
class Secure:
    broker: SecuredBroker
    layout: BrokerLayout
    tls_port: int
    plain_port: int
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def _secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    root = tmp_path_factory.mktemp("secure-broker")
    settings = BrokerSettings(
        fleets=(FLEET,), hostnames=("localhost",), tls_port=free_port(),
        health_port=free_port(), config_root=str(root), data_dir=f"{root}/data/",
        run_as="root" if os.geteuid() == 0 else "mosquitto",
    )
    result = init_broker(root, settings)
    (root / "data").mkdir(exist_ok=True)
    passwords = dict(result.passwords)
    pw = add_device(root, "dev-a")
    assert pw is not None
    passwords["dev-a"] = pw
    layout = BrokerLayout(root)
    broker = SecuredBroker(layout, settings)
    broker.start()
    assert settings.health_port is not None
    yield Secure(broker, layout, settings.tls_port, settings.health_port, passwords)
    broker.stop()


@pytest.fixture
def secure(request: pytest.FixtureRequest, _secure: Secure) -> Secure:
    _track(request, _secure.broker)
    assert _secure.broker.running, _secure.broker.read_log()
    return _secure


def service_config(kind: str, tmp_path: Path, mqtt: dict[str, Any], **extra: Any) -> Path:
    if kind == "aggregator":
        service = {"fleet": FLEET, "state_dir": str(tmp_path / "agg-state"),
                   "eval_dataset": "none", **extra}
        return write_config(tmp_path / "aggregator.toml", "aggregator", service, mqtt)
    service = {"device_id": "dev-a", "fleet": FLEET, "state_dir": str(tmp_path / "agent-state"),
               "source": "digits", **extra}
    return write_config(tmp_path / "agent.toml", "agent", service, mqtt)


def login(secure: Secure, kind: str, password: str | None = None, **mqtt: Any) -> dict[str, Any]:
    user = "aggregator" if kind == "aggregator" else "dev-a"
    out: dict[str, Any] = {
        "host": "127.0.0.1", "port": secure.tls_port, "tls_ca": str(secure.layout.ca_crt),
        "username": user, "password": password or secure.passwords[user],
        "reconnect_min": 1, "reconnect_max": 1,
    }
    if kind == "aggregator":
        out["client_id"] = user  # the broker binds the client id to the user name
    return out | mqtt


def assert_fatal(svc: Service, *expected: str) -> None:
    """Exit code 1 and exactly one ERROR line, which contains each of ``expected``."""
    code = svc.exit_code()
    text = svc.text()
    assert code == 1, text
    assert "Traceback" not in text, text
    errors = at_least("ERROR", svc.records())
    assert len(errors) == 1 and all(e in errors[0] for e in expected), text


# ------------------------------------------------------------------------ unreachable
@pytest.mark.parametrize("kind", ["aggregator", "agent"])
def test_closed_port_warns_once_and_keeps_retrying(kind: str, tmp_path: Path) -> None:
    port = free_port()  # nothing listens here
    cfg = service_config(kind, tmp_path, {"port": port, "reconnect_min": 1, "reconnect_max": 1})
    svc = Service(kind, cfg, "-vv")
    try:
        svc.wait_attempts(4)
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
    problems = at_least("WARNING", svc.records())
    expected = (f"cannot connect to 127.0.0.1:{port}: connection refused (is the broker "
                "running and listening on this port?); retrying")
    connect_lines = [m for m in problems if "cannot connect" in m or "not connected" in m]
    assert connect_lines == [expected], svc.text()
    assert not at_least("ERROR", svc.records()), svc.text()


# ------------------------------------------------------------------------ start-up refusals
@pytest.mark.parametrize("kind", ["aggregator", "agent"])
def test_wrong_password_exits_1_with_one_line(kind: str, secure: Secure, tmp_path: Path) -> None:
    cfg = service_config(kind, tmp_path, login(secure, kind, password="wrong"))
    assert_fatal(Service(kind, cfg), (
        f"cannot use the broker at 127.0.0.1:{secure.tls_port}: the broker refused the "
        "connection: Not authorized (check mqtt.username, mqtt.password and the broker's ACL)"
    ))


def test_wrong_password_with_retry_forever_keeps_retrying(secure: Secure, tmp_path: Path) -> None:
    cfg = service_config("agent", tmp_path, login(secure, "agent", password="wrong",
                                                  retry_forever=True))
    svc = Service("agent", cfg, "-vv")
    try:
        svc.wait_attempts(4)
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
    errors = at_least("ERROR", svc.records())
    assert errors == [
        f"cannot connect to 127.0.0.1:{secure.tls_port}: the broker refused the connection: "
        "Not authorized (check mqtt.username, mqtt.password and the broker's ACL); retrying"
    ], svc.text()


@pytest.mark.parametrize("kind", ["aggregator", "agent"])
def test_tls_to_a_plaintext_port_exits_1(kind: str, secure: Secure, tmp_path: Path) -> None:
    cfg = service_config(kind, tmp_path, login(secure, kind, port=secure.plain_port))
    assert_fatal(
        Service(kind, cfg),
        f"cannot use the broker at 127.0.0.1:{secure.plain_port}: TLS handshake failed",
        "(is this port a TLS listener?)",
    )


@pytest.mark.parametrize("kind", ["aggregator", "agent"])
def test_host_not_in_the_certificate_exits_1(kind: str, secure: Secure, tmp_path: Path) -> None:
    # 127.0.0.2 reaches the same listener (all of 127/8 is loopback) but is not among the
    # certificate's names (localhost, 127.0.0.1, ::1).
    cfg = service_config(kind, tmp_path, login(secure, kind, host="127.0.0.2"))
    assert_fatal(Service(kind, cfg), (
        f"cannot use the broker at 127.0.0.2:{secure.tls_port}: TLS certificate not accepted: "
        "IP address mismatch, certificate is not valid for '127.0.0.2'."
    ))


@pytest.mark.parametrize("kind", ["aggregator", "agent"])
@pytest.mark.parametrize("problem", ["missing", "directory", "not PEM"])
def test_bad_tls_ca_exits_1_before_connecting(kind: str, problem: str, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    if problem == "directory":
        ca.mkdir()
    elif problem == "not PEM":
        ca.write_bytes(b"\x30\x82garbage")
    expected = {"missing": "no such file", "directory": "not a file",
                "not PEM": "not a PEM file"}[problem]
    cfg = service_config(kind, tmp_path, {"port": free_port(), "tls_ca": str(ca)})
    assert_fatal(Service(kind, cfg), f"mqtt.tls_ca {ca}: {expected}")


# ------------------------------------------------------------------------ PUBACK failures
def test_agent_publishing_outside_its_acl_logs_and_counts(secure: Secure, tmp_path: Path) -> None:
    # dev-a's credentials, another device id: the ACL lets dev-a write only its own topics.
    cfg = service_config("agent", tmp_path, login(secure, "agent"), device_id="dev-z")
    svc = Service("agent", cfg)
    try:
        svc.wait_for("the refused status", lambda t: "did not accept" in t)
    finally:
        code = svc.stop()  # publishes the "offline" status: refused as well
    assert code == 0, svc.text()
    warnings = at_least("WARNING", svc.records())
    refused = [w for w in warnings if "did not accept" in w]
    assert refused == [
        f"the broker did not accept a message on fl/{FLEET}/status/dev-z: Not authorized (0x87)"
    ], svc.text()
    state = json.loads((tmp_path / "agent-state" / "state.json").read_text())
    assert state["counters"]["publish_failures"] == 2  # "online" on connect, "offline" on stop


def test_aggregator_of_a_fleet_outside_the_acl_logs_and_counts(
    secure: Secure, tmp_path: Path
) -> None:
    metrics_port = free_port()
    cfg = service_config("aggregator", tmp_path, login(secure, "aggregator"), fleet="f2",
                         metrics_port=metrics_port)
    svc = Service("aggregator", cfg)
    try:
        svc.wait_for("the refused round", lambda t: "message on fl/f2/round" in t)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        code = svc.stop()
    assert code == 0, svc.text()
    assert 'fedmq_publish_failures_total{reason="not_authorized"} 2.0' in metrics, metrics
    refused = [w for w in at_least("WARNING", svc.records()) if "did not accept" in w]
    assert refused == [
        "the broker did not accept a message on fl/f2/model: Not authorized (0x87)",
        "the broker did not accept a message on fl/f2/round: Not authorized (0x87)",
    ], svc.text()


# ------------------------------------------------------------------------ broker restart
def test_broker_restart_logs_one_warning_and_one_info(
    fresh_broker: LocalBroker, tmp_path: Path
) -> None:
    mqtt = {"port": fresh_broker.port, "reconnect_min": 1, "reconnect_max": 1}
    services = [
        Service("aggregator", service_config("aggregator", tmp_path, mqtt), "-vv"),
        Service("agent", service_config("agent", tmp_path, mqtt), "-vv"),
    ]
    connected = re.compile(r"INFO\s+\S+: connected to 127\.0\.0\.1:\d+ as ")
    try:
        for svc in services:
            svc.wait_for("a connection", lambda t: len(connected.findall(t)) == 1)
        marks = [len(svc.text()) for svc in services]
        fresh_broker.stop()
        for svc, mark in zip(services, marks, strict=True):
            svc.wait_attempts(3, after=mark)
        fresh_broker.start()
        for svc in services:
            svc.wait_for("a reconnection", lambda t: len(connected.findall(t)) == 2)
    finally:
        codes = [svc.stop() for svc in services]
    assert codes == [0, 0], [svc.text() for svc in services]
    for svc, mark in zip(services, marks, strict=True):
        text = svc.text()[mark:]  # from the broker's stop to the service's stop
        records = parse(text)
        problems = at_least("WARNING", records)
        assert len(problems) == 1 and "disconnected from the broker" in problems[0], text
        infos = [msg for lvl, _, msg in records if lvl == "INFO" and "connected to" in msg]
        assert len(infos) == 1, text
