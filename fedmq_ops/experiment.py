"""``fedmq experiment``: larger federations (Fashion-MNIST, CNN/LSTM) with a PNG of the curve."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedmq_ops.demo import add_federation_arguments, run_from_args
from fedmq_ops.localfleet import FederationSpec

__all__ = ["CENTRALIZED_ACCURACY", "PRESETS", "add_parser", "apply_preset"]

# Named experiments; any flag overrides the preset's value.
PRESETS: dict[str, FederationSpec] = {
    "fmnist-cnn": FederationSpec(
        agents=10,
        rounds=20,
        dataset="fashion-mnist",
        model="fmnist-cnn",
        partition="dirichlet:0.5",
        codec="int8",
        epochs=1,
        lr=0.2,
        round_timeout=600.0,
    ),
    "fmnist-lstm": FederationSpec(
        agents=10,
        rounds=20,
        dataset="fashion-mnist-seq",
        model="fmnist-lstm",
        partition="dirichlet:0.5",
        codec="int8",
        epochs=1,
        lr=0.2,
        round_timeout=600.0,
    ),
    "digits-mlp": FederationSpec(),
}

# Centralized training of the same model for the same number of sample passes (20 epochs),
# measured on the development machine (docs/facts.md); drawn as the reference line in the plot.
CENTRALIZED_ACCURACY: dict[str, float] = {"fmnist-cnn": 0.898}


def _run(args: argparse.Namespace) -> int:
    if args.plot is None:
        args.plot = Path(f"runs/{args.preset}.png")
    if args.json is None:
        args.json = Path(f"runs/{args.preset}.json")
    reference = CENTRALIZED_ACCURACY.get(args.preset) if args.model == args.preset else None
    return run_from_args(args, f"fedmq experiment {args.preset}", reference=reference)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run a named federated experiment and plot its accuracy curve",
        description="Run a preset federation through a local broker with real agent "
        "processes, print accuracy per round, and write runs/PRESET.png and .json. "
        f"Presets: {', '.join(PRESETS)}. Flags override the preset.",
    )
    p.add_argument("preset", choices=sorted(PRESETS), help="experiment preset")
    # Flags default to None; whatever is not given comes from the preset.
    add_federation_arguments(p, None)
    p.set_defaults(func=lambda a: _run(apply_preset(a)))


# argparse destination -> FederationSpec field, for flags that presets define.
_FIELDS = {"agents": "agents", "rounds": "rounds", "dataset": "dataset", "model": "model",
           "partition": "partition", "codec": "codec",
           "topk_fraction": "topk_fraction", "epochs": "epochs", "lr": "lr",
           "clients_per_round": "clients_per_round", "round_timeout": "round_timeout",
           "strategy": "strategy", "server_lr": "server_lr", "max_examples": "max_examples",
           "seed": "seed", "broker": "broker", "threads": "agent_threads",
           "round_policy": "round_policy", "buffer_size": "buffer_size",
           "max_message_bytes": "max_message_bytes", "downlink": "downlink",
           "eval_dataset": "eval_dataset", "eval_fraction": "eval_fraction",
           "eval_only_agents": "eval_only_agents",
           "prune": "prune"}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left unset (None) from the named preset."""
    preset = PRESETS[args.preset]
    for arg_name, field_name in _FIELDS.items():
        if getattr(args, arg_name) is None:
            setattr(args, arg_name, getattr(preset, field_name))
    return args
