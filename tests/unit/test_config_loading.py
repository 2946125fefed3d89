"""Strict config loading for both services: the [mqtt] table, moved keys, misspellings.

A misspelled table, a key outside any table, an old flat key or an unknown ``FEDMQ_*``
variable is one ConfigError naming the closest valid name; the CLIs turn it into one log
line and exit code 1.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from aggregator.cli import main as aggregator_main
from aggregator.config import AggregatorConfig, load_aggregator_config
from aggregator.metrics import AggregatorMetrics
from edge_agent.cli import main as agent_main
from edge_agent.config import load_agent_config
from fedmq.errors import ConfigError
from fedmq.net.localbroker import free_port
from fedmq.net.mqtt import MqttSettings
from fedmq_ops.cli import main as fedmq_main


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("loader", "text", "message"),
    [
        (load_aggregator_config, '[aggregater]\nfleet = "x"\n',
         "unknown table [aggregater] (did you mean [aggregator]?)"),
        (load_agent_config, '[agnet]\ndevice_id = "d"\n',
         "unknown table [agnet] (did you mean [agent]?)"),
        (load_agent_config, '[agent]\n[mqt]\nhost = "h"\n',
         "unknown table [mqt] (did you mean [mqtt]?)"),
        (load_aggregator_config, 'fleet = "x"\n[mqtt]\nhost = "h"\n',
         "'fleet' is outside any table: put it under [aggregator]"),
        (load_agent_config, 'host = "h"\n[agent]\n',
         "'host' is outside any table: put it under [mqtt]"),
        (load_aggregator_config, '[mqtt]\nhost = "h"\n', "no [aggregator] table"),
        (load_aggregator_config, '[aggregator]\nhost = "h"\n',
         "'host' moved to [mqtt] host"),
        (load_aggregator_config, '[aggregator]\ntls_ca = "ca.crt"\n',
         "'tls_ca' moved to [mqtt] tls_ca"),
        (load_agent_config, '[agent]\nbackoff_min = 1\n',
         "'backoff_min' moved to [mqtt] reconnect_min"),
        (load_agent_config, '[agent]\n[mqtt]\nbackoff_max = 1\n',
         "'backoff_max' moved to [mqtt] reconnect_max"),
        (load_aggregator_config, '[aggregator]\nmetrics_prot = 1\n',
         "unknown key 'metrics_prot' in [aggregator] (did you mean metrics_port?)"),
        (load_agent_config, '[agent]\n[mqtt]\npasword = "x"\n',
         "unknown key 'pasword' in [mqtt] (did you mean password?)"),
        (load_agent_config, '[agent]\nkeepalive = 9\n', "'keepalive' moved to [mqtt] keepalive"),
        (load_agent_config, '[agent]\nquantum_flux = 9\n', "unknown key 'quantum_flux' in [agent]"),
        (load_aggregator_config, '[aggregator]\nmax_examples_per_update = 5\n',
         "'max_examples_per_update' moved to [aggregator] max_claimed_examples"),
        (load_aggregator_config, '[aggregator]\neval_max_examples = 5\n',
         "'eval_max_examples' moved to [aggregator] eval_examples"),
        (load_aggregator_config, '[aggregator]\n[aggregator.mqtt]\nhost = "h"\n',
         "[aggregator.mqtt] is not a table of this file: use [mqtt]"),
    ],
)
def test_file_mistakes_are_one_clear_error(
    tmp_path: Path, loader: object, text: str, message: str
) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        loader(path, environ={})  # type: ignore[operator]
    assert str(err.value) == f"config file {path}: {message}"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FEDMQ_AGENT_HOST": "h"},
         "environment FEDMQ_AGENT_HOST: 'host' moved to [mqtt] host (FEDMQ_AGENT_MQTT_HOST)"),
        ({"FEDMQ_AGENT_PASSWORD": "x"}, "environment FEDMQ_AGENT_PASSWORD: 'password' moved "
         "to [mqtt] password (FEDMQ_AGENT_MQTT_PASSWORD)"),
        ({"FEDMQ_AGENT_BACKOFF_MIN": "1"}, "environment FEDMQ_AGENT_BACKOFF_MIN: 'backoff_min' "
         "moved to [mqtt] reconnect_min (FEDMQ_AGENT_MQTT_RECONNECT_MIN)"),
        ({"FEDMQ_AGENT_MQTT_PASWORD": "x"}, "environment FEDMQ_AGENT_MQTT_PASWORD: unknown "
         "setting (did you mean FEDMQ_AGENT_MQTT_PASSWORD?)"),
        ({"FEDMQ_AGENT_DEVICEID": "x"}, "environment FEDMQ_AGENT_DEVICEID: unknown setting "
         "(did you mean FEDMQ_AGENT_DEVICE_ID?)"),
    ],
)
def test_environment_mistakes_are_one_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_agent_config(environ=env)
    assert str(err.value) == message


def test_mqtt_table_environment_and_overrides_nest(tmp_path: Path) -> None:
    path = _file(tmp_path, '[aggregator]\nfleet = "lab"\n[mqtt]\nhost = "broker"\nport = 8883\n'
                           'username = "aggregator"\nreconnect_max = 5\n')
    env = {"FEDMQ_AGGREGATOR_MQTT_PASSWORD": "pw", "FEDMQ_AGGREGATOR_MQTT_PORT": "9883"}
    cfg = load_aggregator_config(path, {"mqtt.host": "other"}, environ=env)
    assert cfg.mqtt == MqttSettings(host="other", port=9883, username="aggregator",
                                    password="pw", reconnect_max=5.0)
    # the aggregator's own default reconnect_max (30) when the table does not set it
    assert load_aggregator_config(environ={}).mqtt.reconnect_max == 30.0
    settings = cfg.mqtt_settings()
    assert (settings.client_id, settings.clean_start) == ("fedmq-aggregator-lab", False)


def test_both_services_share_one_mqtt_shape(tmp_path: Path) -> None:
    table = ('[mqtt]\nhost = "b"\nport = 8883\nprotocol = "3.1.1"\nkeepalive = 20\n'
             'session_expiry = 60\nusername = "u"\npassword = "p"\nreconnect_min = 2\n'
             'reconnect_max = 4\nretry_forever = true\ntls_insecure = true\n')
    agg = load_aggregator_config(_file(tmp_path, "[aggregator]\n" + table), environ={})
    agent = load_agent_config(_file(tmp_path, "[agent]\n" + table), environ={})
    assert agg.mqtt == agent.mqtt
    assert agent.mqtt_settings("dev").client_id == "dev"


def test_agent_refuses_a_client_id_other_than_its_device_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the agent's client id is its device_id"):
        load_agent_config(_file(tmp_path, '[agent]\n[mqtt]\nclient_id = "x"\n'), environ={})


@pytest.mark.parametrize("entry", ["aggregator", "agent", "fedmq aggregator", "fedmq agent"])
def test_cli_misspelled_table_is_one_line_and_exit_1(
    tmp_path: Path, entry: str, caplog: pytest.LogCaptureFixture
) -> None:
    section = "aggregater" if "aggregator" in entry else "agnet"
    path = _file(tmp_path, f'[{section}]\nfleet = "x"\n')
    main = {"aggregator": aggregator_main, "agent": agent_main}.get(entry)
    with caplog.at_level(logging.INFO):
        if main is not None:
            code = main(["--config", str(path)])
        else:
            code = fedmq_main([entry.split()[1], "--config", str(path)])
    assert code == 1
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and "unknown table" in errors[0].getMessage()
    assert errors[0].exc_info is None


# ------------------------------------------------------------------------ metrics bind address
def _outside_address() -> str | None:
    """An address of this host that is not loopback (None if there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing address
        except OSError:
            return None
        ip = str(s.getsockname()[0])
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_metrics_bind_loopback_by_default_and_metrics_host_opens_them() -> None:
    assert AggregatorConfig().metrics_host == "127.0.0.1"
    outside = _outside_address()
    if outside is None:
        pytest.skip("this host has no non-loopback IPv4 address to test from")
    port = free_port()
    AggregatorMetrics().serve(port)  # what the service does with the default metrics_host
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((outside, port), timeout=5)
    open_port = free_port()
    AggregatorMetrics().serve(open_port, "0.0.0.0")
    socket.create_connection((outside, open_port), timeout=5).close()


def test_metrics_host_flag_and_environment() -> None:
    import argparse

    from aggregator.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--metrics-host", "0.0.0.0", "--retry-forever", "--port", "1"])
    assert (args.metrics_host, getattr(args, "mqtt.retry_forever"), getattr(args, "mqtt.port")) \
        == ("0.0.0.0", True, 1)
    cfg = load_aggregator_config(environ={"FEDMQ_AGGREGATOR_METRICS_HOST": "10.0.0.1"})
    assert cfg.metrics_host == "10.0.0.1"
    with pytest.raises(ConfigError, match="metrics_host"):
        load_aggregator_config(overrides={"metrics_host": " "}, environ={})
