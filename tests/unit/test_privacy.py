"""Differential privacy (docs/privacy.md): the accountant against direct dp-accounting calls,
the aggregator's clip bound, the noise's measured sd, adaptive clipping, Poisson sampling
and the budget stop through the real engine."""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.policies import poisson_sample
from aggregator.store import Store
from fedmq.errors import ConfigError, RejectReason
from fedmq.models.spec import ModelBundle
from fedmq.privacy.accounting import (
    PrivacyPlan,
    calibrate_noise_multiplier,
    effective_noise_multiplier,
    local_epsilon,
)
from fedmq.privacy.clip import clip_to_norm, l2_norm
from fedmq.privacy.device import privatize_delta
from fedmq.privacy.dp_fedavg import ClippedSum, DPFedAvg, DpOptions
from fedmq.privacy.noise import AdaptiveClip
from fedmq.update.codecs import encode_delta
from fedmq.update.strategies import FedAdam, FedAvg
from fedmq.wire import TrainingConfig, decode_model, decode_round
from fedmq_ops.fleet_status import render
from fedmq_ops.observer import FleetView
from fedmq_ops.report import format_table, load_report, plot_report
from tests.fakes import make_update, model_weights

T0 = 1_000.0
SHAPES = {"w": (40, 25), "b": (25,)}


def _direct_poisson(q: float, z: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    return float(acc.get_epsilon(delta))


# -- accountant ------------------------------------------------------------------------------
def test_poisson_rdp_epsilon_equals_a_direct_dp_accounting_call() -> None:
    plan = PrivacyPlan(population=1000, per_round=50, noise_multiplier=1.1, delta=1e-5)
    for rounds in (1, 10, 100):
        assert plan.epsilon(rounds) == _direct_poisson(0.05, 1.1, rounds, 1e-5)
    assert plan.epsilon(0) == 0.0


def test_pld_and_fixed_size_epsilon_equal_direct_calls() -> None:
    pld = PrivacyPlan(1000, 50, 1.1, 1e-5, accountant="pld")
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.1)), 20)
    assert pld.epsilon(20) == float(acc.get_epsilon(1e-5))
    fixed = PrivacyPlan(1000, 50, 1.1, 1e-5, sampling="fixed")
    rdp = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    # replace-one: the clipped sum's sensitivity is 2C, so the multiplier is z / 2
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 50, dp_accounting.GaussianDpEvent(0.55)
    )
    rdp.compose(event, 20)
    assert fixed.epsilon(20) == float(rdp.get_epsilon(1e-5))


def test_adaptive_clipping_count_noise_is_accounted() -> None:
    z, sd_b = 1.0, 5.0
    plan = PrivacyPlan(1000, 100, z, 1e-5, clip_count_sd=sd_b)
    zeff = 1 / math.sqrt(z**-2 + sd_b**-2)
    assert effective_noise_multiplier(z, sd_b) == pytest.approx(zeff)
    assert plan.epsilon(50) == pytest.approx(_direct_poisson(0.1, zeff, 50, 1e-5), rel=1e-12)
    assert plan.epsilon(50) > PrivacyPlan(1000, 100, z, 1e-5).epsilon(50)


def test_calibrated_noise_meets_the_target_epsilon() -> None:
    plan = PrivacyPlan(2000, 100, 0.0, 1e-5)
    z = calibrate_noise_multiplier(plan, 200, 4.0)
    assert _direct_poisson(0.05, z, 200, 1e-5) <= 4.0
    assert _direct_poisson(0.05, z * 0.99, 200, 1e-5) > 4.0  # and is (nearly) the smallest


def test_local_epsilon_is_a_gaussian_of_sensitivity_two_c() -> None:
    acc = dp_accounting.rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    acc.compose(dp_accounting.GaussianDpEvent(2.0), 10)
    assert local_epsilon(4.0, 10, 1e-5) == float(acc.get_epsilon(1e-5))


# -- clip, noise, adaptive clip (pure) -------------------------------------------------------
def _delta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.normal(0, scale, s)).astype(np.float32) for n, s in SHAPES.items()}


def test_device_clip_then_int8_stays_within_the_tolerance() -> None:
    for seed in range(20):
        clipped, metrics = privatize_delta(_delta(seed), {"dp_clip": 0.5}, np.random.default_rng(0))
        assert l2_norm(clipped) <= 0.5 and metrics == {"dp_unclipped": 0.0}
        tensors = encode_delta(clipped, "int8", np.random.default_rng(seed))
        acc = ClippedSum(SHAPES, clip=0.5, tolerance=0.1)
        acc.fold(tensors, "int8", 7.0)  # within tolerance: folded (re-clipped), weight 1
        assert l2_norm(acc.clipped_sum()) <= 0.5
        assert acc.result().total_weight == 1.0
    _, metrics = privatize_delta(_delta(1, 1e-4), {"dp_clip": 0.5}, np.random.default_rng(0))
    assert metrics == {"dp_unclipped": 1.0}
    with pytest.raises(ValueError, match="dp_clip"):
        privatize_delta(_delta(1), {"dp_clip": -1.0}, np.random.default_rng(0))


def test_clipped_sum_rejects_an_update_above_the_tolerance() -> None:
    from fedmq.errors import Rejected

    acc = ClippedSum(SHAPES, clip=1.0, tolerance=0.1)
    over, _ = clip_to_norm(_delta(3), 1.2)
    with pytest.raises(Rejected, match="exceeds the DP clip") as info:
        acc.fold(encode_delta(over, "float32", np.random.default_rng(0)), "float32", 1.0)
    assert info.value.code == RejectReason.NORM_BOUND and acc.count == 0


def _options(z: float, clip: float, expected: int, **kw: Any) -> DpOptions:
    plan = PrivacyPlan(1000, expected, z, 1e-5)
    return DpOptions(noise_multiplier=z, clip=clip, expected_participants=expected, plan=plan,
                     **kw)


def test_noise_sd_measured_over_many_rounds_is_z_times_c() -> None:
    """All-zero updates: the model moves by noise / expected only; its sd over 20 rounds of
    1,025 values is z*C/expected within 5 standard errors (se of an sd: sd / sqrt(2n))."""
    z, clip, expected = 1.3, 0.7, 4
    dp = DPFedAvg(FedAvg(), _options(z, clip, expected, seed=1234))
    zero = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    samples = []
    weights = dict(zero)
    for _ in range(20):
        acc = dp.new_accumulator(SHAPES)
        for d in range(3):  # fewer than expected: still divided by expected
            acc.fold(encode_delta(zero, "float32", np.random.default_rng(d)), "float32", 50.0)
        new = dp.aggregate(weights, acc.result())
        samples.append(np.concatenate([(new[n] - weights[n]).ravel() for n in SHAPES]))
        weights = new
    values = np.concatenate(samples).astype(np.float64)
    expected_sd = z * clip / expected
    se = expected_sd / math.sqrt(2 * values.size)
    assert abs(values.std() - expected_sd) < 5 * se
    assert abs(values.mean()) < 5 * expected_sd / math.sqrt(values.size)
    assert dp.rounds == 20 and dp.epsilon() == dp.options.plan.epsilon(20)


def test_mean_is_the_clipped_sum_over_the_expected_count_not_the_examples() -> None:
    dp = DPFedAvg(FedAvg(), _options(0.0, 10.0, 5))
    acc = dp.new_accumulator(SHAPES)
    a, b = _delta(1, 0.01), _delta(2, 0.01)
    acc.fold(encode_delta(a, "float32", np.random.default_rng(0)), "float32", 1000.0)
    acc.fold(encode_delta(b, "float32", np.random.default_rng(0)), "float32", 1.0)
    zero = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
    out = dp.aggregate(zero, acc.result())
    for n in SHAPES:
        np.testing.assert_allclose(out[n], (a[n] + b[n]) / 5, rtol=1e-5, atol=1e-7)


def test_adaptive_clip_moves_towards_the_target_quantile() -> None:
    schedule = AdaptiveClip(target_quantile=0.5, learning_rate=0.2, count_sd=1e-9)
    rng = np.random.default_rng(0)
    up, frac = schedule.next_clip(1.0, unclipped=0, expected=10, rng=rng)  # all clipped
    assert up == pytest.approx(math.exp(0.1)) and frac == pytest.approx(0.0, abs=1e-9)
    down, _ = schedule.next_clip(1.0, unclipped=10, expected=10, rng=rng)
    assert down == pytest.approx(math.exp(-0.1))
    dp = DPFedAvg(FedAvg(), _options(0.0, 1.0, 2, adaptive=schedule))
    acc = dp.new_accumulator(SHAPES)
    acc.fold(encode_delta(_delta(1, 1e-3), "float32", rng), "float32", 1.0)
    acc.note_metrics({"dp_unclipped": 1.0})
    acc.fold(encode_delta(_delta(2, 1e-3), "float32", rng), "float32", 1.0)
    acc.note_metrics({"dp_unclipped": 1.0})
    dp.aggregate({n: np.zeros(s, np.float32) for n, s in SHAPES.items()}, acc.result())
    assert dp.clip == pytest.approx(math.exp(-0.1))
    assert dp.configure(2, TrainingConfig()).params["dp_clip"] == dp.clip
    state = dp.state()
    again = DPFedAvg(FedAvg(), _options(0.0, 1.0, 2, adaptive=schedule))
    again.load_state(state)
    assert (again.clip, again.rounds) == (dp.clip, 1)


def test_adaptive_server_optimisers_need_the_explicit_flag() -> None:
    with pytest.raises(ConfigError, match="dp_allow_adaptive"):
        DPFedAvg(FedAdam(), _options(1.0, 1.0, 2))
    assert DPFedAvg(FedAdam(), _options(1.0, 1.0, 2, allow_adaptive=True)).name == (
        "dpfedavg(fedadam)"
    )


def test_poisson_sample_draws_each_device_with_the_rate() -> None:
    online = [f"d{i:04d}" for i in range(2000)]
    sizes = [len(poisson_sample(online, 0.05, 7, r)) for r in range(1, 51)]
    mean = sum(sizes) / len(sizes)  # binomial(2000, 0.05): mean 100, sd of the mean ~1.4
    assert abs(mean - 100) < 7
    assert poisson_sample(online, 0.05, 7, 3) == poisson_sample(reversed(online), 0.05, 7, 3)


# -- through the real engine -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return resolve_bundle("digits-mlp")


def _config(tmp_path: Path, **kw: Any) -> AggregatorConfig:
    base: dict[str, Any] = {
        "fleet": "f", "state_dir": tmp_path / "state", "eval_dataset": "none",
        "codec": "float32", "selection": "sample", "clients_per_round": 2, "min_updates": 2,
        "round_timeout": 60.0, "abandon_after": 30.0, "max_update_bytes": 64 * 1024,
        "dp": True, "dp_population": 4, "dp_sampling": "fixed", "min_devices": 4,
        "dp_noise_multiplier": 2.0, "dp_clip": 0.5, "dp_seed": 5, "norm_bound": "off",
    }
    base.update(kw)
    return AggregatorConfig(**base)


def _online(engine: Engine, devices: list[str], now: float) -> list[Any]:
    from fedmq.wire import StatusMessage, encode

    out: list[Any] = []
    for d in devices:
        status = StatusMessage(fleet="f", device=d, state="online", created_at=now)
        out += engine.on_status(d, encode(status), now)
    return out


def test_budget_stops_the_federation_before_it_is_exceeded(
    tmp_path: Path, bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    plan = PrivacyPlan(4, 2, 2.0, 1e-5, sampling="fixed")
    budget = (plan.epsilon(2) + plan.epsilon(3)) / 2  # two rounds fit, a third would not
    cfg = _config(tmp_path, dp_epsilon_budget=budget)
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    engine.start(T0)
    devices = ["a", "b", "c", "d"]
    assert engine.metrics.value("fedmq_dp_epsilon_budget") == budget
    assert engine.metrics.value("fedmq_dp_budget_exhausted") == 0.0
    now = T0
    shapes = dict(engine.template)
    out = _online(engine, devices, now) + engine.tick(now)
    for round_id in (1, 2):
        [ann] = [decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload]
        assert ann.round_id == round_id and len(ann.selected) == 2
        assert ann.config.params["dp_clip"] == 0.5
        for i, d in enumerate(ann.selected):
            delta, _ = clip_to_norm(_delta_for(shapes, i), 0.5)
            payload = make_update(
                "f", round_id, round_id - 1, d, delta, 10, "float32", f"{d}{round_id}"
            )
            assert engine.handle_update(d, payload, now).accepted
        now += 1
        with caplog.at_level(logging.ERROR, logger="aggregator.coordinator"):
            out = engine.tick(now)
    records = [engine.store.round(r) for r in (1, 2)]
    assert [r.metrics["dp_epsilon"] for r in records] == [plan.epsilon(1), plan.epsilon(2)]
    assert engine.metrics.dp_epsilon._value.get() == plan.epsilon(2)
    # the gauges the privacy alerts read (deploy/monitoring/alerts.yml)
    assert engine.metrics.value("fedmq_dp_epsilon_budget") == budget
    assert engine.metrics.value("fedmq_dp_budget_exhausted") == 1.0
    assert [decode_model(o.payload).version for o in out if o.topic.endswith("/model")] == [2]
    assert not [o for o in out if o.topic.endswith("/round") and o.payload]  # no round 3
    lines = [r.getMessage() for r in caplog.records if "privacy budget" in r.getMessage()]
    assert len(lines) == 1 and "round 3" in lines[0]
    assert engine.tick(now + 100) == [] and engine.round is None
    assert len([r for r in caplog.records if "privacy budget" in r.getMessage()]) == 1
    # the epsilon reaches `fedmq report` (table and PNG) and `fedmq status` (model metrics)
    report = load_report(cfg.state_dir)
    assert [r.epsilon for r in report.closed] == [plan.epsilon(1), plan.epsilon(2)]
    table = format_table(report).splitlines()
    assert table[1].split()[-1] == "epsilon"
    assert table[2].split()[-1] == f"{plan.epsilon(1):.4f}"
    png = plot_report(report, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [model_out] = [o for o in engine.current_messages(now) if o.topic.endswith("/model")]
    view = FleetView(model=decode_model(model_out.payload))
    text = io.StringIO()
    render(view, "f", text, now=now)
    assert f"DP epsilon {plan.epsilon(2):.3f}" in text.getvalue()
    engine.store.close()


def _delta_for(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 1, s).astype(np.float32) for n, s in shapes.items()}


def test_the_engine_rejects_an_unclipped_update_and_folds_a_clipped_one(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    cfg = _config(tmp_path, dp_noise_multiplier=0.0)
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    engine.start(T0)
    out = _online(engine, ["a", "b", "c", "d"], T0) + engine.tick(T0)
    [ann] = [decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload]
    shapes = dict(engine.template)
    raw = _delta_for(shapes, 1)  # norm >> 0.5: the device did not clip
    first, second = ann.selected
    bad = make_update("f", 1, 0, first, raw, 10, "float32", "bad")
    ack = engine.handle_update(first, bad, T0)
    assert (ack.accepted, ack.code) == (False, RejectReason.NORM_BOUND)
    assert "exceeds the DP clip 0.5" in ack.reason
    slightly, _ = clip_to_norm(raw, 0.52)  # within the 10 % tolerance: re-clipped to 0.5
    good = make_update("f", 1, 0, first, slightly, 10, "float32", "good")
    assert engine.handle_update(first, good, T0).accepted
    clipped, _ = clip_to_norm(_delta_for(shapes, 2), 0.5)
    other = make_update("f", 1, 0, second, clipped, 10_000, "float32", "other")
    assert engine.handle_update(second, other, T0).accepted
    out = engine.tick(T0 + 1)
    [model] = [decode_model(o.payload) for o in out if o.topic.endswith("/model")]
    new = model_weights(model)
    w0 = bundle.initial_trainable()
    moved = {n: new[n] - w0[n] for n in shapes}
    expect = {n: (slightly[n] * np.float32(0.5 / 0.52) + clipped[n]) / 2 for n in shapes}
    for n in shapes:
        np.testing.assert_allclose(moved[n], expect[n], rtol=1e-4, atol=1e-6)
    engine.store.close()


def test_dp_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="dp_population"):
        AggregatorConfig(dp=True, dp_population=3, clients_per_round=10)
    with pytest.raises(ConfigError, match="min_devices"):
        AggregatorConfig(dp=True, dp_population=100, dp_sampling="fixed")
    with pytest.raises(ConfigError, match="PLD"):
        AggregatorConfig(dp=True, dp_population=100, dp_sampling="fixed", min_devices=100,
                         dp_accountant="pld")


def test_privacy_plan_command_prints_the_calibrated_noise_and_curve(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedmq_ops.cli import main

    args = ["privacy", "plan", "--devices", "1000", "--per-round", "50", "--rounds", "30",
            "--epsilon", "2", "--delta", "1e-5"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    z = calibrate_noise_multiplier(PrivacyPlan(1000, 50, 0.0, 1e-5), 30, 2.0)
    assert f"noise multiplier z = {z:.4f}" in out[1]
    curve = [line.split() for line in out[out.index("round  epsilon") + 1:]]
    assert [int(r) for r, _ in curve] == [10, 20, 30]
    for r, eps in curve:
        assert float(eps) == pytest.approx(_direct_poisson(0.05, z, int(r), 1e-5), abs=1e-4)
    assert float(curve[-1][1]) <= 2.0
    assert main([*args[:3], "10", *args[4:]]) == 1  # more per round than devices: one line


def test_the_experiment_runs_private_and_non_private_on_the_same_draws() -> None:
    from fedmq_ops.privacy_experiment import run_experiment

    rows = run_experiment(
        devices=60, per_round=10, rounds=3, noise=[1.0], clip=0.3, adaptive=False, epochs=1,
        lr=0.1, server_lr=1.0, codec="int8", delta=1e-5, seed=0,
    )
    assert [r.label for r in rows] == ["non-private", "z=1"]
    assert rows[0].epsilon is None
    assert rows[1].epsilon == PrivacyPlan(60, 10, 1.0, 1e-5).epsilon(3)
    assert all(0 <= r.accuracy <= 1 for r in rows)


def test_local_dp_updates_pass_the_widened_bound_and_are_accounted_separately() -> None:
    from fedmq.errors import Rejected
    from fedmq.privacy.dp_fedavg import local_noise_allowance

    values = 40 * 25 + 25
    z_local, clip = 0.05, 0.5
    opts = _options(1.0, clip, 4, local_noise=z_local, model_values=values)
    dp = DPFedAvg(FedAvg(), opts)
    assert dp.configure(1, TrainingConfig()).params["dp_local_noise"] == z_local
    acc = dp.new_accumulator(SHAPES)
    for seed in range(5):
        noised, _ = privatize_delta(
            _delta(seed), {"dp_clip": clip, "dp_local_noise": z_local}, np.random.default_rng(seed)
        )
        assert l2_norm(noised) > clip * 1.1  # the local noise alone is far above C
        acc.fold(encode_delta(noised, "int8", np.random.default_rng(seed)), "int8", 1.0)
    assert acc.count == 5
    too_noisy = {n: np.random.default_rng(9).normal(0, 3 * z_local * clip, s).astype(np.float32)
                 for n, s in SHAPES.items()}
    with pytest.raises(Rejected, match="local noise bound"):
        acc.fold(encode_delta(too_noisy, "float32", np.random.default_rng(0)), "float32", 1.0)
    allowance = local_noise_allowance(z_local, values)
    central = PrivacyPlan(1000, 4, 1.0 / (1 + allowance), 1e-5).epsilon(10)
    assert dp.central_epsilon(10) == central
    assert dp.local_epsilon(10) == local_epsilon(z_local, 10, 1e-5)
    assert dp.epsilon(10) == min(central, local_epsilon(z_local, 10, 1e-5))


def test_adaptive_clip_through_the_engine_reads_the_devices_bits(
    tmp_path: Path, bundle: ModelBundle
) -> None:
    from fedmq.update.codecs import encode_delta as encode
    from fedmq.wire import UpdateMessage
    from fedmq.wire import encode as encode_msg

    cfg = _config(tmp_path, dp_noise_multiplier=0.0, dp_clip_mode="adaptive",
                  dp_clip_count_sd=1e-9, dp_clip_lr=0.2, dp_target_quantile=0.5)
    engine = Engine(cfg, Store(cfg.state_dir), bundle)
    engine.start(T0)
    out = _online(engine, ["a", "b", "c", "d"], T0) + engine.tick(T0)
    [ann] = [decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload]
    shapes = dict(engine.template)
    for i, d in enumerate(ann.selected):
        delta, _ = clip_to_norm(_delta_for(shapes, i), 0.1)
        msg = UpdateMessage(
            fleet="f", round_id=1, base_version=0, device=d, update_id=f"u{i}",
            num_examples=5, codec="float32",
            tensors=encode(delta, "float32", np.random.default_rng(0)),
            metrics={"dp_unclipped": 1.0},
        )
        assert engine.handle_update(d, encode_msg(msg), T0).accepted
    out = engine.tick(T0 + 1)
    [ann2] = [decode_round(o.payload) for o in out if o.topic.endswith("/round") and o.payload]
    # both devices were within C: b = 2/2 = 1, C <- 0.5 exp(-0.2 (1 - 0.5))
    assert ann2.config.params["dp_clip"] == pytest.approx(0.5 * math.exp(-0.1), rel=1e-6)
    assert engine.store.round(1).metrics["dp_clip"] == 0.5  # the C round 1 used
    engine.store.close()


def test_sync_rounds_use_the_accountants_poisson_rate(tmp_path: Path) -> None:
    from aggregator.policies import RoundContext, make_round_policy

    online = frozenset(f"d{i:03d}" for i in range(200))
    cfg = _config(tmp_path, dp_sampling="poisson", dp_population=400, clients_per_round=40,
                  min_devices=0, min_updates=5, dp_seed=11)
    policy = make_round_policy(cfg)
    assert cfg.dp_options() is not None and cfg.dp_options().plan.rate == 0.1  # type: ignore[union-attr]
    sizes = []
    for r in range(1, 41):
        ctx = RoundContext(round_id=r, base_version=0, online=online, now=T0,
                           training=TrainingConfig())
        plan = policy.plan(ctx)
        assert plan is not None
        assert plan.selected == poisson_sample(online, 0.1, 11, r)  # rate 40 / 400 per device
        assert plan.target == len(plan.selected) and plan.min_updates <= len(plan.selected)
        sizes.append(len(plan.selected))
    # 200 online of 400: each drawn with q = 0.1, so ~20 per round (sd of the mean ~0.7)
    assert abs(sum(sizes) / len(sizes) - 20) < 3.5
