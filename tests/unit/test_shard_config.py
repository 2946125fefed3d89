"""The sharded services' strict TOML config (aggregator.shard_config) and their `fedmq`
subcommands: typos name the closest key, unsupported settings are refused, flags win."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from aggregator.shard_config import (
    COORDINATOR_FLAGS,
    WORKER_FLAGS,
    config_from_args,
    load_shard_config,
)
from fedmq.errors import ConfigError
from fedmq_ops.cli import build_parser

GOOD = """
[aggregator]
fleet = "plant7"
model = "digits-mlp"
codec = "int8"
clients_per_round = 500
min_updates = 400
round_timeout = 120.0
norm_bound = "adaptive"
max_update_norm = 50.0
weight_cap_multiplier = 2.0

[mqtt]
host = "broker.internal"
port = 8883
session_expiry = 86400

[shard]
redis = "redis://store.internal:6379/0"
worker = "w3"
group = "ingest"
"""


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_a_valid_file_sets_every_table(tmp_path: Path) -> None:
    cfg = load_shard_config(_file(tmp_path, GOOD), environ={}).for_worker()
    assert (cfg.fleet, cfg.codec, cfg.clients_per_round, cfg.min_updates) == (
        "plant7", "int8", 500, 400)
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.session_expiry) == (
        "broker.internal", 8883, 86400)
    assert (cfg.shard.redis, cfg.shard.worker, cfg.shard.group, cfg.shard.ack_mode) == (
        "redis://store.internal:6379/0", "w3", "ingest", "manual")
    bounds = cfg.bounds_config()
    assert (bounds.norm_bound, bounds.norm_action, bounds.max_update_norm) == (
        "adaptive", "clip", 50.0)
    assert cfg.selection == "any" and cfg.eval_dataset == "none"


@pytest.mark.parametrize(("typo", "named"), [
    ('[shard]\nworkr = "w1"', "did you mean worker?"),
    ('[shard]\nredis_url = "redis://x"', "did you mean redis?"),
    ("[aggregator]\nnorm_bond = \"fixed\"", "did you mean norm_bound?"),
    ("[aggregator]\nweight_cap_multiplyer = 1.0", "did you mean weight_cap_multiplier?"),
    ('[shards]\nredis = "redis://x"', "did you mean [shard]?"),
    ('[aggregator]\nworker = "w1"', "it belongs under [shard]"),
])
def test_a_typo_is_an_error_naming_the_key(tmp_path: Path, typo: str, named: str) -> None:
    table, key = typo.split("\n")
    text = GOOD.replace("[shard]\n", f"[shard]\n{key}\n") if table == "[shard]" else \
        GOOD.replace("[shard]\n", f"{typo}\n\n[shard]\n") if table == "[shards]" else \
        GOOD.replace("[aggregator]\n", f"{typo}\n", 1)
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_shard_config(_file(tmp_path, text), environ={})


@pytest.mark.parametrize(("extra", "message"), [
    ("dp = true", "dp = True is not supported by the sharded ingest"),
    ('round_policy = "fedbuff"', "round_policy = 'fedbuff' is not supported"),
    ('selection = "sample"', 'needs selection = "any"'),
    ('strategy = "median"', "strategy 'median' needs every update"),
    ("max_message_bytes = 131072", "max_message_bytes = 131072 is not supported"),
])
def test_what_the_sharded_ingest_cannot_do_is_refused(
    tmp_path: Path, extra: str, message: str
) -> None:
    text = GOOD.replace("[aggregator]\n", f"[aggregator]\n{extra}\n", 1)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_shard_config(_file(tmp_path, text), environ={})


def test_missing_store_client_id_and_worker_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("shard.redis must name the store")):
        load_shard_config(_file(tmp_path, GOOD.replace('redis = "redis://store', '# ')),
                          environ={})
    with pytest.raises(ConfigError, match=re.escape("mqtt.client_id is derived")):
        load_shard_config(_file(tmp_path, GOOD.replace("[mqtt]\n", '[mqtt]\nclient_id = "a"\n')),
                          environ={})
    cfg = load_shard_config(_file(tmp_path, GOOD.replace('worker = "w3"', "")), environ={})
    with pytest.raises(ConfigError, match="a shard worker needs a fixed name"):
        cfg.for_worker()
    with pytest.raises(ConfigError, match="worker"):
        load_shard_config(_file(tmp_path, GOOD.replace('"w3"', '"w 3"')), environ={})


@pytest.fixture
def good_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GOOD in a file, and no FEDMQ_AGGREGATOR_* variable in the environment."""
    for var in [v for v in os.environ if v.startswith("FEDMQ_AGGREGATOR_")]:
        monkeypatch.delenv(var)
    return _file(tmp_path, GOOD)


def test_the_fedmq_subcommands_read_the_file_and_flags_win(
    good_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = good_file
    args = build_parser().parse_args(
        ["aggregator", "shard-worker", "--config", str(path), "--worker", "w9", "--port", "1884"])
    cfg = config_from_args(args, WORKER_FLAGS).for_worker()
    assert (cfg.shard.worker, cfg.mqtt.port, cfg.fleet) == ("w9", 1884, "plant7")
    args = build_parser().parse_args(
        ["aggregator", "shard-coordinator", "--config", str(path), "--target", "1000",
         "--norm-action", "reject"])
    cfg = config_from_args(args, COORDINATOR_FLAGS)
    assert (cfg.clients_per_round, cfg.norm_action) == (1000, "reject")
    monkeypatch.setenv("FEDMQ_AGGREGATOR_SHARD_WORKR", "w1")
    with pytest.raises(ConfigError, match="FEDMQ_AGGREGATOR_SHARD_WORKER"):
        config_from_args(args, COORDINATOR_FLAGS)


def test_metrics_ports_and_evaluation_keys(tmp_path: Path) -> None:
    text = GOOD.replace("[aggregator]\n", '[aggregator]\nmetrics_port = 9108\nmetrics_host = '
                        '"0.0.0.0"\neval_dataset = "digits"\neval_examples = 500\n', 1)
    text = text.replace("[shard]\n", "[shard]\nworker_metrics_port = 9110\n")
    cfg = load_shard_config(_file(tmp_path, text), environ={})
    assert (cfg.metrics_port, cfg.metrics_host, cfg.shard.worker_metrics_port) == (
        9108, "0.0.0.0", 9110)
    assert (cfg.eval_dataset, cfg.eval_examples) == ("digits", 500)
    default = load_shard_config(_file(tmp_path, GOOD), environ={})
    assert (default.metrics_port, default.shard.worker_metrics_port) == (0, 0)
    assert default.eval_dataset == "none"  # the sharded default: no evaluation
    env = load_shard_config(_file(tmp_path, GOOD), environ={
        "FEDMQ_AGGREGATOR_SHARD_WORKER_METRICS_PORT": "9111"})
    assert env.shard.worker_metrics_port == 9111


@pytest.mark.parametrize(("line", "message"), [
    ("worker_metrics_port = 70000", "shard.worker_metrics_port must be a port in [0, 65535]"),
    ("worker_metrics_port = -1", "shard.worker_metrics_port must be a port in [0, 65535]"),
    ("worker_metrics_prot = 9110", "did you mean worker_metrics_port?"),
])
def test_a_bad_worker_metrics_port_is_refused_naming_the_key(
    tmp_path: Path, line: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_shard_config(_file(tmp_path, GOOD.replace("[shard]\n", f"[shard]\n{line}\n")),
                          environ={})


def test_the_metrics_and_evaluation_flags_set_each_role_s_keys(good_file: Path) -> None:
    path = good_file
    args = build_parser().parse_args(
        ["aggregator", "shard-worker", "--config", str(path), "--metrics-port", "9111",
         "--metrics-host", "0.0.0.0"])
    cfg = config_from_args(args, WORKER_FLAGS).for_worker()
    # a worker's port is shard.worker_metrics_port; metrics_port stays the coordinator's
    assert (cfg.shard.worker_metrics_port, cfg.metrics_port, cfg.metrics_host) == (
        9111, 0, "0.0.0.0")
    args = build_parser().parse_args(
        ["aggregator", "shard-coordinator", "--config", str(path), "--metrics-port", "9108",
         "--eval-dataset", "digits", "--eval-examples", "300"])
    cfg = config_from_args(args, COORDINATOR_FLAGS)
    assert (cfg.metrics_port, cfg.shard.worker_metrics_port) == (9108, 0)
    assert (cfg.eval_dataset, cfg.eval_examples) == ("digits", 300)
    with pytest.raises(SystemExit):  # the worker does not evaluate: no such flag
        build_parser().parse_args(
            ["aggregator", "shard-worker", "--config", str(path), "--eval-dataset", "digits"])


def test_the_ack_connection_has_its_own_client_id_and_optionally_its_own_login(
    tmp_path: Path,
) -> None:
    from aggregator.shard_worker import ack_connection, worker_client_id

    text = GOOD.replace("[mqtt]\n", '[mqtt]\nusername = "ingest-w3"\npassword = "s3cret"\n', 1)
    cfg = load_shard_config(_file(tmp_path, text), environ={}).for_worker()
    main = dataclasses.replace(cfg.mqtt, client_id=worker_client_id(cfg.fleet, "w3"))
    same = ack_connection(main, cfg.shard.ack_username)
    assert (same.client_id, same.clean_start, same.session_expiry) == (
        "fedmq-ingest-plant7-w3-acks", True, 0)
    assert (same.username, same.password) == ("ingest-w3", "s3cret")
    text = text.replace("[shard]\n", '[shard]\nack_username = "ingest-w3-acks"\n', 1)
    cfg = load_shard_config(_file(tmp_path, text), environ={}).for_worker()
    own = ack_connection(main, cfg.shard.ack_username)
    assert (own.username, own.password) == ("ingest-w3-acks", "s3cret")
    with pytest.raises(ConfigError, match=re.escape("shard.ack_username")):
        load_shard_config(_file(tmp_path, text.replace('"ingest-w3-acks"', '"a b"')),
                          environ={})
