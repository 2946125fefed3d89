"""AgentConfig: precedence, validation, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import build_parser, config_from_args
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.systemd import SystemdNotifier, sd_notify, watchdog_interval
from fedmq.errors import ConfigError
from fedmq.net.mqtt import MqttSettings


def test_precedence_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[agent]\ndevice_id = "pi-1"\nfleet = "a"\nack_timeout = 5\n'
                    '[mqtt]\nport = 1000\nhost = "h"\nkeepalive = 9\n')
    env = {"FEDMQ_AGENT_MQTT_PORT": "2000", "FEDMQ_AGENT_FLEET": "b"}
    cfg = load_agent_config(toml, {"fleet": "c", "mqtt.keepalive": 11}, environ=env)
    assert (cfg.device_id, cfg.mqtt.port, cfg.fleet, cfg.ack_timeout) == ("pi-1", 2000, "c", 5.0)
    assert (cfg.mqtt.host, cfg.mqtt.keepalive) == ("h", 11)


@pytest.mark.parametrize(
    "bad",
    [
        {"device_id": "a/b"},
        {"mqtt.port": 0},
        {"client_index": 4, "num_clients": 4, "partition": "iid"},
        {"mqtt.reconnect_min": 10, "mqtt.reconnect_max": 1},
        {"ack_timeout": 0},
        {"mqtt.tls_cert": "c.pem"},
        {"mqtt.password": "x"},
        {"mqtt.protocol": "4"},
        {"mqtt.client_id": "other"},
        {"host": "h"},
        {"source": "no-such-dataset"},
        {"augment": "bogus"},
        {"sample_fraction": 1.5},
        {"train_delay": -1.0},
        {"train_delay": float("nan")},
    ],
)
def test_invalid_settings_are_config_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_agent_config(overrides=bad, environ={})


def test_data_config_and_mqtt_settings() -> None:
    cfg = AgentConfig(device_id="d", partition="dirichlet:0.5", num_clients=4, client_index=2)
    data = cfg.data_config()
    assert (data.partition, data.num_clients, data.client_index) == ("dirichlet:0.5", 4, 2)
    assert AgentConfig().data_config().num_clients is None  # unpartitioned
    ms = cfg.mqtt_settings("d")
    assert ms.client_id == "d" and ms.clean_start is False and ms.session_expiry > 0
    secret = AgentConfig(mqtt=MqttSettings(username="u", password="secret"))
    assert secret.redacted()["mqtt"]["password"] == "***"
    assert "secret" not in str(secret.redacted())


def test_cli_flags_override(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('[agent]\nclass_balanced = true\n[mqtt]\nport = 1000\nhost = "h"\n')
    args = build_parser().parse_args(
        ["--config", str(toml), "--port", "1884", "--no-class-balanced", "--device-id", "x",
         "--reconnect-max", "7", "--retry-forever"]
    )
    cfg = config_from_args(args)
    assert (cfg.mqtt.port, cfg.class_balanced, cfg.device_id) == (1884, False, "x")
    assert (cfg.mqtt.host, cfg.mqtt.reconnect_max, cfg.mqtt.retry_forever) == ("h", 7.0, True)


def test_help_lists_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--state-dir" in out and "--ack-timeout" in out and "FEDMQ_AGENT_" in out
    assert "--host" in out and "--tls-ca" in out and "--reconnect-min" in out
    assert "--backoff-min" not in out and "--client-id" not in out


def test_sd_notify_sends_datagrams(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "10000000"}
        n = SystemdNotifier(env)
        assert n.ready("hi") and n.watchdog()
        assert server.recv(100) == b"READY=1\nSTATUS=hi"
        assert server.recv(100) == b"WATCHDOG=1"
        assert n.watchdog_interval == 5.0
    assert sd_notify("READY=1", {}) is False
    assert watchdog_interval({}) is None
