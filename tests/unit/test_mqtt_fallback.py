"""``mqtt.fallback_brokers``: strict parsing, and a real paho client (real loopback sockets,
no broker needed: paho's connect returns once CONNECT is written) moving to the next broker
after a failed attempt, round the list, synchronously and from its network thread."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.config import load_aggregator_config
from edge_agent.config import load_agent_config
from fedmq.errors import ConfigError
from fedmq.net.localbroker import free_port
from fedmq.net.mqtt import MqttSettings, connect, make_client, parse_endpoint

HOST = "127.0.0.1"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener standing in for a live broker (it accepts; nobody answers)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    s.listen(4)
    s.settimeout(10)
    yield s
    s.close()


def test_endpoints_are_the_host_then_the_fallbacks() -> None:
    s = MqttSettings(host="n1", port=1883, fallback_brokers=("n2:1884", "[::1]:1885"))
    assert s.endpoints == (("n1", 1883), ("n2", 1884), ("::1", 1885))
    assert MqttSettings().endpoints == (("127.0.0.1", 1883),)
    assert parse_endpoint(" n2:8883 ", "x") == ("n2", 8883)


@pytest.mark.parametrize("bad", ["n2", "n2:", ":1883", "n2:0", "n2:65536", "n2:x", ""])
def test_a_fallback_that_is_not_host_port_is_one_line(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^mqtt\.fallback_brokers: .* is not host:port"):
        MqttSettings(fallback_brokers=(bad,))


def test_a_repeated_broker_is_refused() -> None:
    with pytest.raises(ConfigError, match="must not repeat a broker"):
        MqttSettings(host="n1", port=1883, fallback_brokers=("n1:1883",))
    with pytest.raises(ConfigError, match="must not repeat a broker"):
        MqttSettings(fallback_brokers=("n2:1", "n2:1"))


def test_both_services_read_fallback_brokers_from_toml_and_refuse_a_typo(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[aggregator]\n[mqtt]\nhost = "n1"\nfallback_brokers = ["n2:1883", '
                    '"n3:1883"]\n')
    assert load_aggregator_config(path, environ={}).mqtt.endpoints[1:] == (
        ("n2", 1883), ("n3", 1883))
    path.write_text('[agent]\n[mqtt]\nhost = "n1"\nfallback_brokers = ["n2:1883"]\n')
    assert load_agent_config(path, environ={}).mqtt.fallback_brokers == ("n2:1883",)
    env = {"FEDMQ_AGGREGATOR_MQTT_FALLBACK_BROKERS": "n2:1883,n3:1884"}
    assert load_aggregator_config(environ=env).mqtt.fallback_brokers == ("n2:1883", "n3:1884")
    path.write_text('[aggregator]\n[mqtt]\nfallback_broker = ["n2:1883"]\n')
    with pytest.raises(ConfigError, match="fallback_brokers"):
        load_aggregator_config(path, environ={})


def test_synchronous_connect_goes_on_to_the_first_reachable_broker(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    dead1, dead2, live = free_port(), free_port(), listener.getsockname()[1]
    settings = MqttSettings(host=HOST, port=dead1, protocol="3.1.1", client_id="c1",
                            fallback_brokers=(f"{HOST}:{dead2}", f"{HOST}:{live}"))
    client = make_client(settings)
    with caplog.at_level(logging.INFO, logger="fedmq.net.mqtt"):
        connect(client, settings, asynchronous=False)
    conn, _ = listener.accept()  # the CONNECT reached the third broker
    conn.close()
    assert (client.host, client.port) == (HOST, live)
    assert f"{HOST}:{dead1}: trying {HOST}:{dead2} next (mqtt.fallback_brokers)" in caplog.text
    assert f"{HOST}:{dead2}: trying {HOST}:{live} next" in caplog.text
    client.disconnect()


def test_synchronous_connect_raises_when_no_broker_is_reachable() -> None:
    dead = [free_port() for _ in range(3)]
    settings = MqttSettings(host=HOST, port=dead[0],
                            fallback_brokers=tuple(f"{HOST}:{p}" for p in dead[1:]))
    client = make_client(settings)
    with pytest.raises(ConnectionRefusedError):
        connect(client, settings, asynchronous=False)
    assert client.port == dead[2]  # each was tried once, in order
    with pytest.raises(ConnectionRefusedError):
        client.reconnect()  # round the list: the first again
    assert client.port == dead[0]


def test_without_fallbacks_a_client_stays_on_its_broker() -> None:
    settings = MqttSettings(host=HOST, port=free_port())
    client = make_client(settings)
    with pytest.raises(ConnectionRefusedError):
        connect(client, settings, asynchronous=False)
    with pytest.raises(ConnectionRefusedError):
        client.reconnect()
    assert (client.host, client.port) == (HOST, settings.port)


def test_network_thread_reconnects_through_the_fallback(listener: socket.socket) -> None:
    dead, live = free_port(), listener.getsockname()[1]
    settings = MqttSettings(host=HOST, port=dead, reconnect_min=1, reconnect_max=1,
                            fallback_brokers=(f"{HOST}:{live}",))
    client = make_client(settings)
    connect(client, settings)  # asynchronous: the loop makes the attempts
    t0 = time.monotonic()
    client.loop_start()
    try:
        conn, _ = listener.accept()  # after one refused attempt and one back-off
        conn.close()
        assert time.monotonic() - t0 < 5
        assert client.port == live
    finally:
        client.disconnect()
        client.loop_stop()
