"""AgentConfig: precedence, validation, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.cli import build_parser, config_from_args
from edge_agent.config import AgentConfig, load_agent_config
from edge_agent.systemd import SystemdNotifier, sd_notify, watchdog_interval
from fedmq.errors import ConfigError


def test_precedence_toml_env_flags(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text('[agent]\ndevice_id = "pi-1"\nport = 1000\nfleet = "a"\nack_timeout = 5\n')
    env = {"FEDMQ_AGENT_PORT": "2000", "FEDMQ_AGENT_FLEET": "b"}
    cfg = load_agent_config(toml, {"fleet": "c"}, environ=env)
    assert (cfg.device_id, cfg.port, cfg.fleet, cfg.ack_timeout) == ("pi-1", 2000, "c", 5.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"device_id": "a/b"},
        {"port": 0},
        {"client_index": 4, "num_clients": 4, "partition": "iid"},
        {"backoff_min": 10, "backoff_max": 1},
        {"ack_timeout": 0},
        {"tls_cert": "c.pem"},
        {"password": "x"},
        {"protocol": "4"},
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
    assert AgentConfig(username="u", password="secret").redacted()["password"] == "***"


def test_cli_flags_override(tmp_path: Path) -> None:
    toml = tmp_path / "a.toml"
    toml.write_text('[agent]\nport = 1000\nclass_balanced = true\n')
    args = build_parser().parse_args(
        ["--config", str(toml), "--port", "1884", "--no-class-balanced", "--device-id", "x"]
    )
    cfg = config_from_args(args)
    assert (cfg.port, cfg.class_balanced, cfg.device_id) == (1884, False, "x")


def test_help_lists_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--state-dir" in out and "--ack-timeout" in out and "FEDMQ_AGENT_" in out


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
