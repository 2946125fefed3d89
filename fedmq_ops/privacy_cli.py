"""``fedmq privacy plan``: calibrate DP-FedAvg's noise for a fleet and a target epsilon.

Given the fleet size N, devices per round K (Poisson: expected), rounds R and the target
(epsilon, delta), calibrates the noise multiplier z with ``dp-accounting``'s
``calibrate_dp_mechanism`` and prints z, the noise sd on the mean per unit of clip, and the
epsilon curve every 10 rounds. Needs ``dp-accounting`` (the aggregator's extra).
"""

from __future__ import annotations

import argparse
from typing import Any

from fedmq.errors import ConfigError
from fedmq.privacy.accounting import ACCOUNTANTS, SAMPLINGS, PrivacyPlan

__all__ = ["add_parser", "cmd_plan", "plan_lines"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    privacy = subparsers.add_parser("privacy", help="differential privacy planning")
    sub = privacy.add_subparsers(
        dest="privacy_command", metavar="{plan,experiment}", required=True
    )
    plan = sub.add_parser(
        "plan", help="calibrate the noise multiplier for a fleet and a target epsilon"
    )
    plan.add_argument("--devices", type=int, required=True, help="fleet size N")
    plan.add_argument(
        "--per-round", type=int, required=True, help="devices per round K (poisson: expected)"
    )
    plan.add_argument("--rounds", type=int, required=True, help="rounds R")
    plan.add_argument("--epsilon", type=float, required=True, help="target epsilon after R")
    plan.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    plan.add_argument("--sampling", choices=SAMPLINGS, default="poisson")
    plan.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    plan.add_argument(
        "--clip-count-sd", type=float, default=None,
        help="adaptive clipping: noise sd of the clipped count (accounted too)",
    )
    plan.add_argument("--every", type=int, default=10, help="curve step in rounds (10)")
    plan.set_defaults(func=cmd_plan)
    from fedmq_ops.privacy_experiment import add_parser as add_experiment

    add_experiment(sub)
    return plan


def plan_lines(plan: PrivacyPlan, rounds: int, target: float, every: int = 10) -> list[str]:
    """The report :func:`cmd_plan` prints (``plan``'s noise multiplier is calibrated)."""
    from fedmq.privacy.accounting import calibrate_noise_multiplier

    z = calibrate_noise_multiplier(plan, rounds, target)
    calibrated = PrivacyPlan(
        plan.population, plan.per_round, z, plan.delta, plan.sampling, plan.accountant,
        plan.clip_count_sd,
    )
    lines = [
        f"fleet {plan.population} devices, {plan.per_round} per round ({plan.sampling} "
        f"sampling, rate {plan.rate:.4g}), {rounds} rounds, {plan.accountant} accountant",
        f"noise multiplier z = {z:.4f}: noise sd on the sum = {z:.4f} x C, on the mean "
        f"= {z / plan.per_round:.4g} x C (divided by the expected {plan.per_round})",
        f"target epsilon {target:g} at delta {plan.delta:g}",
        "round  epsilon",
    ]
    steps = sorted({*range(every, rounds + 1, every), rounds}) if every > 0 else [rounds]
    lines += [f"{r:5d}  {calibrated.epsilon(r):.4f}" for r in steps]
    return lines


def cmd_plan(args: argparse.Namespace) -> int:
    try:
        plan = PrivacyPlan(
            population=args.devices, per_round=args.per_round, noise_multiplier=0.0,
            delta=args.delta, sampling=args.sampling, accountant=args.accountant,
            clip_count_sd=args.clip_count_sd,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if args.rounds < 1 or not args.epsilon > 0:
        raise ConfigError("--rounds must be >= 1 and --epsilon > 0")
    try:
        import dp_accounting  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ConfigError(
            "fedmq privacy needs dp-accounting: pip install 'fedmq[aggregator]'"
        ) from exc
    for line in plan_lines(plan, args.rounds, args.epsilon, args.every):
        print(line)
    return 0
