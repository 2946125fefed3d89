"""A real Prometheus scrapes a running aggregator and evaluates deploy/monitoring/alerts.yml:
while no device is online FedmqNoDevicesOnline is pending and FedmqRoundStalled is quiet;
once a device is online and the round it opened gets no update, FedmqRoundStalled fires,
seen through Prometheus's HTTP API (/api/v1/alerts).

The Prometheus config is deploy/monitoring/prometheus.example.yml with 1 s scrape and
evaluation intervals and the test's target; the rules are alerts.yml with only
FedmqRoundStalled's ``for:`` shortened (its 30-minute window holds the few seconds of data).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fedmq.net.localbroker import LocalBroker, free_port
from fedmq.net.procs import stop_process
from fedmq.topics import Topics
from tests.fakes import AggregatorProcess, FakeDevice, Watcher

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
FLEET = "f1"
JOB = "fedmq-aggregator"
STALLED = "FedmqRoundStalled"
WAIT = 60.0  # bound of every wait below (the whole test takes a few seconds)


def _wait(what: str, check: Callable[[], Any], diagnose: Callable[[], str],
          timeout: float = WAIT) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{diagnose()}")
        time.sleep(0.2)


@dataclass
class Prometheus:
    """A Prometheus server of the test's own: config and tsdb in a temporary directory."""

    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, config: dict[str, Any], rules: dict[str, Any]) -> None:
        assert PROMETHEUS is not None
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        (self.workdir / "alerts.yml").write_text(yaml.safe_dump(rules))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        _wait("Prometheus ready", self.ready, self.log)

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}\n{self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query (None when it has no result)."""
        result = self.api("query", query=promql)["result"]
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> dict[str, dict[str, Any]]:
        return {a["labels"]["alertname"]: a for a in self.api("alerts")["alerts"]}

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20.0)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not installed: `make test` installs the Debian package "
                    "prometheus (Makefile APT_PACKAGES)")
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prom = Prometheus(workdir, free_port())
    yield prom
    prom.stop()


def prometheus_config(metrics_port: int) -> dict[str, Any]:
    """The shipped example config: 1 s intervals, the aggregator's port as the only target."""
    config: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus.example.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    config["scrape_configs"] = jobs
    assert config["rule_files"] == ["alerts.yml"]
    return config


def stalled_rules() -> dict[str, Any]:
    """alerts.yml unchanged but for FedmqRoundStalled's ``for:``."""
    rules: dict[str, Any] = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    stalled = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == STALLED]
    assert len(stalled) == 1 and stalled[0]["for"] == "15m"
    stalled[0]["for"] = "1s"
    return rules


@pytest.mark.timeout(240)
def test_prometheus_sees_a_stalled_round_fire(
    broker: LocalBroker, topic_prefix: str, tmp_path: Path, prometheus: Prometheus
) -> None:
    topics = Topics(FLEET, topic_prefix)
    metrics_port = free_port()
    instance = f"127.0.0.1:{metrics_port}"
    watcher = Watcher(broker, topics)
    agg = AggregatorProcess(
        broker, topic_prefix, tmp_path / "state",
        "--eval-dataset", "none", "--selection", "any", "--min-devices", "1",
        "--clients-per-round", "1", "--min-updates", "1",
        "--round-timeout", "600", "--abandon-after", "600",
        "--metrics-port", str(metrics_port),
    ).start()
    device: FakeDevice | None = None

    def diagnose() -> str:
        try:
            alerts: Any = prometheus.alerts()
        except (AssertionError, OSError) as exc:
            alerts = f"(no answer: {exc})"
        return (f"alerts: {alerts}\n--- prometheus log\n{prometheus.log()}\n"
                f"--- aggregator log\n{agg.log()[-6000:]}")

    try:
        watcher.model(0, timeout=WAIT)  # the aggregator is up (and its exporter with it)
        prometheus.start(prometheus_config(metrics_port), stalled_rules())

        # Every rule loaded and evaluated without error over the real series.
        groups = prometheus.api("rules")["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        shipped = yaml.safe_load((MONITORING / "alerts.yml").read_text())
        assert set(loaded) == {r["alert"] for g in shipped["groups"] for r in g["rules"]}

        # No device online: FedmqNoDevicesOnline is pending (for: 10m), the stall is quiet.
        _wait("fedmq_online_devices == 0 scraped twice",
              lambda: (prometheus.value(
                  f'count_over_time(fedmq_online_devices{{instance="{instance}"}}[1m])'
              ) or 0) >= 2,
              diagnose)
        _wait("FedmqNoDevicesOnline pending",
              lambda: prometheus.alerts().get("FedmqNoDevicesOnline", {}).get("state")
              == "pending", diagnose)
        assert prometheus.value(f'fedmq_online_devices{{instance="{instance}"}}') == 0.0
        assert STALLED not in prometheus.alerts()
        assert prometheus.value(f'ALERTS{{alertname="{STALLED}"}}') is None
        assert all(r["health"] == "ok" for g in prometheus.api("rules")["groups"]
                   for r in g["rules"]), prometheus.api("rules")

        # A device comes online; the aggregator opens round 1; nobody sends an update.
        device = FakeDevice(broker, topics, "pi-0001")
        device.status("online")
        ann = watcher.round(1, timeout=WAIT)
        assert ann.round_id == 1

        firing = _wait(
            f"{STALLED} firing",
            lambda: (a := prometheus.alerts().get(STALLED)) and a["state"] == "firing" and a,
            diagnose,
        )
        assert firing["labels"] == {
            "alertname": STALLED, "instance": instance, "job": JOB, "severity": "warning",
        }
        assert firing["annotations"]["summary"] == (
            f"fedmq: no round completed on {instance} for 45 minutes"
        )
        assert firing["annotations"]["runbook"] == "docs/monitoring.md#fedmqroundstalled"
        # what it fired on, as Prometheus scraped it from the running aggregator
        assert prometheus.value(f'fedmq_online_devices{{instance="{instance}"}}') == 1.0
        assert prometheus.value(f'fedmq_current_round{{instance="{instance}"}}') == 1.0
        assert prometheus.value(f'fedmq_rounds_completed_total{{instance="{instance}"}}') == 0.0
        assert prometheus.value(f'up{{job="{JOB}"}}') == 1.0
        _wait("FedmqNoDevicesOnline resolved",
              lambda: "FedmqNoDevicesOnline" not in prometheus.alerts(), diagnose)
        assert agg.proc is not None and agg.proc.poll() is None, agg.log()
    finally:
        prometheus.stop()
        if device is not None:
            device.close()
        watcher.close()
        agg.stop()
