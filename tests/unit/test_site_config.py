"""The site gateway services' strict TOML configs (aggregator.site_config) and their `fedmq`
subcommands: typos name the key, missing essentials are refused, flags win over the file,
the `python -m` entry points take the same flags, the example files under deploy/ load."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from aggregator.partial_receiver import build_parser as receiver_parser
from aggregator.site_config import (
    gateway_config_from_args,
    load_gateway_config,
    load_receiver_config,
    receiver_config_from_args,
)
from aggregator.site_gateway import build_parser as gateway_parser
from fedmq.errors import ConfigError
from fedmq_ops.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]

SITE = """
[gateway]
fleet = "plant7"
name = "gw-3"
key = "/var/lib/fedmq-gateway/gw-3.key"
state = "/var/lib/fedmq-gateway/site.db"
registry = "/var/lib/fedmq-gateway/devices.json"
expect = 40
lead = 8.0
max_update_norm = 50.0
norm_action = "reject"

[mqtt]
host = "127.0.0.1"
port = 1884
username = "gateway"
"""

CLOUD = """
[receiver]
fleet = "plant7"
redis = "redis://store.internal:6379/0"
gateways = "/var/lib/fedmq/gateways.json"

[mqtt]
host = "broker.internal"
port = 8883
tls_ca = "/etc/fedmq/ca.crt"
username = "aggregator"
"""


@pytest.fixture(autouse=True)
def _no_fedmq_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith(("FEDMQ_GATEWAY_", "FEDMQ_RECEIVER_"))]:
        monkeypatch.delenv(var)


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "service.toml"
    path.write_text(text)
    return path


def test_valid_files_set_every_table(tmp_path: Path) -> None:
    gw = load_gateway_config(_file(tmp_path, SITE), environ={})
    assert (gw.fleet, gw.name, gw.expect, gw.lead, gw.max_update_norm, gw.norm_action) == (
        "plant7", "gw-3", 40, 8.0, 50.0, "reject")
    assert (gw.mqtt.host, gw.mqtt.port, gw.mqtt.username, gw.mqtt.client_id) == (
        "127.0.0.1", 1884, "gateway", "")
    rx = load_receiver_config(_file(tmp_path, CLOUD), environ={})
    assert (rx.fleet, rx.redis, rx.gateways) == (
        "plant7", "redis://store.internal:6379/0", "/var/lib/fedmq/gateways.json")
    assert (rx.mqtt.host, rx.mqtt.port, rx.mqtt.tls_ca, rx.mqtt.username) == (
        "broker.internal", 8883, "/etc/fedmq/ca.crt", "aggregator")


@pytest.mark.parametrize(("text", "typo", "named"), [
    (SITE, "[gateway]\nexpekt = 3", "unknown key 'expekt' in [gateway] (did you mean expect?)"),
    (SITE, "[gateway]\ngateway = \"gw-1\"", "unknown key 'gateway' in [gateway]"),
    (SITE, "[gateway]\nhost = \"x\"", "'host' moved to [mqtt] host"),
    (SITE, "[mqtt]\npasword = \"x\"", "unknown key 'pasword' in [mqtt] (did you mean password?)"),
    (SITE, "[gatway]\nexpect = 3", "unknown table [gatway] (did you mean [gateway]?)"),
    (CLOUD, "[receiver]\nredis_url = \"redis://x\"", "(did you mean redis?)"),
    (CLOUD, "[receiver]\ngateway = \"g.json\"", "(did you mean gateways?)"),
    (CLOUD, "[receiver]\nworker = \"w1\"", "unknown key 'worker' in [receiver]"),
])
def test_a_typo_is_refused_naming_the_key(tmp_path: Path, text: str, typo: str,
                                          named: str) -> None:
    table, line = typo.split("\n")
    if f"{table}\n" in text:
        text = text.replace(f"{table}\n", f"{table}\n{line}\n", 1)
    else:
        text += f"\n{typo}\n"
    load = load_gateway_config if text.lstrip().startswith("[gateway]") else load_receiver_config
    with pytest.raises(ConfigError, match=re.escape(named)):
        load(_file(tmp_path, text), environ={})


@pytest.mark.parametrize(("change", "message"), [
    (('name = "gw-3"', ""), "gateway.name is needed (or --gateway)"),
    (('key = "/var/lib/fedmq-gateway/gw-3.key"', ""), "gateway.key is needed (or --key)"),
    (('name = "gw-3"', 'name = "gw 3"'), "gateway.name"),
    (('norm_action = "reject"', 'norm_action = "drop"'), "gateway.norm_action must be one of"),
    (("lead = 8.0", "lead = -1.0"), "gateway.lead must be >= 0"),
    (("expect = 40", "expect = -2"), "gateway.expect must be >= 0"),
    (("[mqtt]\n", '[mqtt]\nclient_id = "mine"\n'), "mqtt.client_id is derived by the site"),
])
def test_a_bad_site_setting_is_refused(tmp_path: Path, change: tuple[str, str],
                                       message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_gateway_config(_file(tmp_path, SITE.replace(*change)), environ={})


@pytest.mark.parametrize(("change", "message"), [
    (('redis = "redis://store.internal:6379/0"', ""), "receiver.redis must name the store"),
    (('redis = "redis://store.internal:6379/0"', 'redis = "store:6379"'),
     "receiver.redis must be a redis:// URL"),
    (('gateways = "/var/lib/fedmq/gateways.json"', ""), "receiver.gateways is needed"),
    (("[mqtt]\n", '[mqtt]\nclient_id = "mine"\n'), "mqtt.client_id is derived by the partial"),
])
def test_a_bad_receiver_setting_is_refused(tmp_path: Path, change: tuple[str, str],
                                           message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_receiver_config(_file(tmp_path, CLOUD.replace(*change)), environ={})


def test_the_environment_is_strict_and_below_the_flags(tmp_path: Path) -> None:
    path = _file(tmp_path, SITE)
    cfg = load_gateway_config(path, environ={"FEDMQ_GATEWAY_EXPECT": "7",
                                             "FEDMQ_GATEWAY_MQTT_PASSWORD": "s3cret"})
    assert (cfg.expect, cfg.mqtt.password) == (7, "s3cret")
    cfg = load_gateway_config(path, overrides={"expect": 9},
                              environ={"FEDMQ_GATEWAY_EXPECT": "7"})
    assert cfg.expect == 9
    with pytest.raises(ConfigError, match="FEDMQ_GATEWAY_EXPECT"):
        load_gateway_config(path, environ={"FEDMQ_GATEWAY_EXPEKT": "7"})
    with pytest.raises(ConfigError, match="FEDMQ_RECEIVER_GATEWAYS"):
        load_receiver_config(_file(tmp_path, CLOUD), environ={"FEDMQ_RECEIVER_GATEWAY": "x"})


def test_the_fedmq_subcommands_read_the_file_and_flags_win(tmp_path: Path) -> None:
    site, cloud = _file(tmp_path, SITE), tmp_path / "cloud.toml"
    cloud.write_text(CLOUD)
    args = build_parser().parse_args(
        ["aggregator", "site-gateway", "--config", str(site), "--gateway", "gw-9",
         "--port", "1999", "--norm-action", "clip"])
    cfg = gateway_config_from_args(args)
    assert (cfg.name, cfg.mqtt.port, cfg.norm_action, cfg.fleet, cfg.expect) == (
        "gw-9", 1999, "clip", "plant7", 40)
    args = build_parser().parse_args(
        ["aggregator", "partial-receiver", "--config", str(cloud), "--redis",
         "redis://other:6379/2"])
    rx = receiver_config_from_args(args)
    assert (rx.redis, rx.mqtt.host, rx.gateways) == (
        "redis://other:6379/2", "broker.internal", "/var/lib/fedmq/gateways.json")


def test_the_python_m_entry_points_keep_their_flags_without_a_file() -> None:
    args = gateway_parser().parse_args(
        ["--fleet", "f", "--gateway", "gw-1", "--key", "/k", "--state", "/s.db", "--host",
         "127.0.0.1", "--port", "1885", "--prefix", "t1", "--expect", "12", "--lead", "1",
         "--session-expiry", "60", "--ready-file", "/r", "-v"])
    cfg = gateway_config_from_args(args)
    assert (cfg.fleet, cfg.name, cfg.key, cfg.state, cfg.mqtt.port, cfg.topic_prefix,
            cfg.expect, cfg.lead, cfg.mqtt.session_expiry, cfg.ready_file) == (
        "f", "gw-1", "/k", "/s.db", 1885, "t1", 12, 1.0, 60, "/r")
    args = receiver_parser().parse_args(
        ["--fleet", "f", "--redis", "redis://127.0.0.1:1/0", "--gateways", "/g.json",
         "--port", "1886"])
    rx = receiver_config_from_args(args)
    assert (rx.fleet, rx.redis, rx.gateways, rx.mqtt.port) == (
        "f", "redis://127.0.0.1:1/0", "/g.json", 1886)


def test_a_single_process_option_before_the_role_is_refused(tmp_path: Path) -> None:
    from fedmq_ops.cli import main

    assert main(["aggregator", "--rounds", "3", "site-gateway", "--config",
                 str(_file(tmp_path, SITE))]) == 1


@pytest.mark.parametrize(("name", "load"), [
    ("site-gateway.toml", load_gateway_config),
    ("partial-receiver.toml", load_receiver_config),
])
def test_the_example_files_load(name: str, load: object) -> None:
    cfg = load(ROOT / "deploy" / "gateway" / name, environ={})  # type: ignore[operator]
    assert cfg.fleet == "lab"
