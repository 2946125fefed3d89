"""`fedmq demo`/`fedmq experiment` flags reach the generated aggregator and agent configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, load_aggregator_config
from edge_agent.config import load_agent_config
from fedmq.errors import ConfigError
from fedmq.update.codecs import codec_names, get_codec
from fedmq.update.strategies import make_strategy, strategy_names
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
def test_prune_flag_reaches_the_aggregator(tmp_path: Path) -> None:
    parser = build_parser()
    demo = spec_from_args(parser.parse_args(["demo", "--prune", "0.8"]))
    exp = spec_from_args(apply_preset(parser.parse_args(["experiment", "fmnist-cnn",
                                                         "--prune", "0.9"])))
    plain = spec_from_args(apply_preset(parser.parse_args(["experiment", "fmnist-cnn"])))
    for spec, want in ((demo, 0.8), (exp, 0.9), (plain, 0.0)):
        (tmp_path / str(want)).mkdir()
        agg_path, _ = _written(spec, tmp_path / str(want))
        agg = load_aggregator_config(agg_path, environ={})
        assert agg.prune_target == want and agg.codec == "int8"
    with pytest.raises(ConfigError, match="prune"):
        FederationSpec(prune=1.0)
def test_topk_fraction_flag_reaches_the_rounds_and_the_device_encode(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["demo", "--agents", "1", "--codec", "topk-int8", "--topk-fraction", "0.1"]
    )
    agg_path, _ = _written(spec_from_args(args), tmp_path)
    assert "topk_fraction = 0.1" in agg_path.read_text()
    agg = load_aggregator_config(agg_path, environ={})
    # What the round announcement carries, through the strategy's per-round configure.
    training = make_strategy(agg.strategy).configure(3, agg.training_config())
    assert training.params == {"topk_fraction": 0.1}
    # The device's codec set up by those params keeps ceil(0.1 * n) values per tensor.
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(size=(20, 50)).astype(np.float32), "b": np.ones(7, np.float32)}
    tensors = get_codec(training.codec).configure(training.params).encode(delta, rng).tensors
    assert [int(t.params["k"]) for t in tensors] == [100, 1]


def test_experiment_topk_fraction_overrides_the_preset_and_defaults_to_unset(
    tmp_path: Path,
) -> None:
    parse = build_parser().parse_args
    spec = spec_from_args(apply_preset(parse(
        ["experiment", "fmnist-cnn", "--codec", "stc", "--topk-fraction", "0.05"]
    )))
    assert (spec.codec, spec.topk_fraction) == ("stc", 0.05)
    plain = spec_from_args(apply_preset(parse(["experiment", "fmnist-cnn", "--codec", "stc"])))
    assert plain.topk_fraction is None
    agg_path, _ = _written(plain, tmp_path)
    assert "topk_fraction =" not in agg_path.read_text()
    agg = load_aggregator_config(agg_path, environ={})
    assert agg.topk_fraction is None and agg.training_config().params == {}


def test_every_registered_codec_is_a_codec_choice() -> None:
    for codec in codec_names():
        args = build_parser().parse_args(["experiment", "fmnist-cnn", "--codec", codec])
        assert spec_from_args(apply_preset(args)).codec == codec


@pytest.mark.parametrize(("kw", "message"), [
    ({"codec": "int8", "topk_fraction": 0.05},
     "topk_fraction applies only to the top-k codecs (topk-f16, topk-int8, topk-int4, stc), "
     "not to codec 'int8'"),
    ({"codec": "stc", "topk_fraction": 0.0}, "topk_fraction must be a number in (0, 1], got 0.0"),
    ({"codec": "stc", "topk_fraction": 1.5}, "topk_fraction must be a number in (0, 1], got 1.5"),
    ({"codec": "stc", "topk_fraction": float("nan")}, "topk_fraction must be a number in (0, 1]"),
])
def test_bad_topk_fraction_is_a_config_error_everywhere(
    kw: dict[str, object], message: str, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        FederationSpec(**kw)  # type: ignore[arg-type]
    assert message in str(err.value)
    toml = tmp_path / "aggregator.toml"
    codec, fraction = kw["codec"], kw["topk_fraction"]
    toml.write_text(f'[aggregator]\ncodec = "{codec}"\ntopk_fraction = {fraction}\n')
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(toml, environ={})
    assert message in str(err.value)


def test_topk_fraction_from_the_environment(tmp_path: Path) -> None:
    agg = load_aggregator_config(None, environ={
        "FEDMQ_AGGREGATOR_CODEC": "topk-f16", "FEDMQ_AGGREGATOR_TOPK_FRACTION": "0.02",
    })
    assert agg.training_config().params == {"topk_fraction": 0.02}


def test_every_strategy_announces_the_operators_topk_fraction() -> None:
    base = AggregatorConfig(codec="stc", topk_fraction=0.05).training_config()
    for name in strategy_names():
        assert make_strategy(name).configure(1, base).params["topk_fraction"] == 0.05, name
