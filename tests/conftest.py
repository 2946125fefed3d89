"""Test harness: a real Mosquitto on a free port per test session (and per test on demand).

- ``broker``: one Mosquitto for the session, shared; each test gets its own topic prefix
  (``topic_prefix``) so tests cannot see each other's retained messages.
- ``fresh_broker``: a Mosquitto of the test's own (for restarts, persistence, kills).
- When a test fails, the log of every broker it used is printed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmq.net.localbroker import BrokerOptions, LocalBroker, mosquitto_path

_BROKERS_KEY = pytest.StashKey[list[LocalBroker]]()


def _require_mosquitto() -> None:
    if mosquitto_path() is None:
        pytest.fail(
            "mosquitto is not installed: `make test` installs it (apt-get install mosquitto)"
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.failed:
        for b in item.stash.get(_BROKERS_KEY, []):
            report.sections.append((f"{b.kind} log (port {b.port})", b.read_log()[-20000:]))
    return report


def _track(request: pytest.FixtureRequest, b: LocalBroker) -> None:
    node = request.node
    node.stash.setdefault(_BROKERS_KEY, []).append(b)


@pytest.fixture(scope="session")
def _session_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    _require_mosquitto()
    b = LocalBroker(BrokerOptions(), workdir=tmp_path_factory.mktemp("mosquitto"), kind="mosquitto")
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker(request: pytest.FixtureRequest, _session_broker: LocalBroker) -> LocalBroker:
    if not _session_broker.running:
        _session_broker.start()
    _track(request, _session_broker)
    return _session_broker


@pytest.fixture
def fresh_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalBroker]:
    _require_mosquitto()
    b = LocalBroker(
        BrokerOptions(persistence=True), workdir=tmp_path / "mosquitto", kind="mosquitto"
    )
    _track(request, b)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
