"""`fedmq demo`/`fedmq experiment` flags reach the generated aggregator and agent configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.config import load_aggregator_config
from edge_agent.config import load_agent_config
from fedmq.errors import ConfigError
from fedmq_ops.cli import build_parser
from fedmq_ops.demo import spec_from_args
from fedmq_ops.experiment import apply_preset
from fedmq_ops.localfleet import FederationSpec, write_configs


def _written(spec: FederationSpec, tmp_path: Path) -> tuple[Path, list[Path]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_configs(spec, tmp_path, "127.0.0.1", 18830, "5")


def test_demo_flags_reach_aggregator_and_agent_configs(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "demo", "--agents", "2", "--codec", "topk-int8", "--strategy", "fedadam",
        "--round-policy", "fedbuff", "--buffer-size", "3", "--max-message-bytes", "4096",
    ])
    agg_path, agent_paths = _written(spec_from_args(args), tmp_path)
    agg = load_aggregator_config(agg_path, environ={})
    assert (agg.codec, agg.strategy, agg.round_policy, agg.buffer_size, agg.max_message_bytes) == (
        "topk-int8", "fedadam", "fedbuff", 3, 4096
    )
    assert [p.name for p in agent_paths] == ["agent-000.toml", "agent-001.toml"]
    agents = [load_agent_config(p, environ={}) for p in agent_paths]
    assert [(a.device_id, a.max_message_bytes) for a in agents] == [
        ("agent-000", 4096), ("agent-001", 4096)
    ]


def test_experiment_flags_override_the_preset_and_unset_ones_keep_defaults(
    tmp_path: Path,
) -> None:
    args = apply_preset(build_parser().parse_args(
        ["experiment", "fmnist-cnn", "--agents", "1", "--round-policy", "fedbuff"]
    ))
    spec = spec_from_args(args)
    assert (spec.model, spec.round_policy, spec.buffer_size, spec.max_message_bytes) == (
        "fmnist-cnn", "fedbuff", None, 0
    )
    agg_path, [agent_path] = _written(spec, tmp_path)
    text = agg_path.read_text()
    assert 'round_policy = "fedbuff"' in text and "buffer_size" not in text  # aggregator default
    agg = load_aggregator_config(agg_path, environ={})
    assert (agg.round_policy, agg.buffer_size, agg.max_message_bytes) == ("fedbuff", 10, 0)
    assert load_agent_config(agent_path, environ={}).max_message_bytes == 0


@pytest.mark.parametrize("flag", [["--round-policy", "nope"], ["--codec", "nope"],
                                  ["--strategy", "nope"]])
def test_unknown_choices_are_refused_by_the_parser(
    flag: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", *flag])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(("kw", "message"), [
    ({"round_policy": "nope"}, "round_policy must be one of"),
    ({"buffer_size": 0}, "buffer_size must be at least 1, got 0"),
    ({"max_message_bytes": 100}, "max_message_bytes must be 0 (no chunking) or >= 1024, got 100"),
])
def test_bad_federation_settings_are_config_errors(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        FederationSpec(**kw)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_every_strategy_and_its_options_are_selectable_from_the_flags(tmp_path: Path) -> None:
    from fedmq.update.strategies import strategy_names

    assert {"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "fednova",
            "fedsgd", "median", "trimmed_mean", "krum"} <= set(strategy_names())
    for name in strategy_names():
        build_parser().parse_args(["demo", "--strategy", name])  # a valid choice
    args = build_parser().parse_args([
        "demo", "--agents", "6", "--strategy", "krum", "--krum-f", "1", "--krum-m", "2",
        "--robust-buffer", "8", "--clip-updates", "adaptive", "--clip-multiplier", "2.5",
        "--zero-outliers-k", "4", "--bias-correction", "true", "--server-beta1", "0.8",
    ])
    agg = load_aggregator_config(_written(spec_from_args(args), tmp_path / "k")[0], environ={})
    assert (agg.strategy, agg.krum_f, agg.krum_m, agg.robust_buffer, agg.clip_updates,
            agg.clip_multiplier, agg.zero_outliers_k, agg.bias_correction,
            agg.server_beta1) == ("krum", 1, 2, 8, "adaptive", 2.5, 4.0, True, 0.8)
    args = build_parser().parse_args([
        "demo", "--strategy", "fedsgd", "--grad-examples", "32", "--server-adam", "yes",
        "--server-lr", "0.01",
    ])
    agg = load_aggregator_config(_written(spec_from_args(args), tmp_path / "s")[0], environ={})
    assert (agg.strategy, agg.grad_examples, agg.server_adam) == ("fedsgd", 32, True)
    args = apply_preset(build_parser().parse_args(
        ["experiment", "fmnist-cnn", "--strategy", "fedprox", "--prox-mu", "0.1"]))
    agg_path, _ = _written(spec_from_args(args), tmp_path / "p")
    agg = load_aggregator_config(agg_path, environ={})
    assert (agg.strategy, agg.prox_mu) == ("fedprox", 0.1)
    assert "server_momentum" not in agg_path.read_text()  # unset: the aggregator's default


def test_federated_evaluation_flags_reach_the_agents(tmp_path: Path) -> None:
    args = build_parser().parse_args([
        "demo", "--agents", "4", "--strategy", "fednova", "--eval-dataset", "none",
        "--eval-fraction", "0.2", "--eval-only-agents", "1",
    ])
    agg_path, agent_paths = _written(spec_from_args(args), tmp_path)
    agg = load_aggregator_config(agg_path, environ={})
    assert (agg.strategy, agg.eval_dataset, agg.clients_per_round, agg.min_updates,
            agg.selection) == ("fednova", "none", 3, 3, "any")
    agents = [load_agent_config(p, environ={}) for p in agent_paths]
    assert [(a.eval_fraction, a.eval_only) for a in agents] == [
        (0.2, False), (0.2, False), (0.2, False), (0.0, True)]
    with pytest.raises(ConfigError, match="eval_only_agents"):
        FederationSpec(agents=2, eval_only_agents=2)
