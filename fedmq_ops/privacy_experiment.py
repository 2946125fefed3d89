"""``fedmq privacy experiment``: DP-FedAvg on a simulated fleet, in one process, no broker.

Every simulated device holds an IID shard of the digits training split and trains with the
real LiteRT trainer (one interpreter, its weights set per device: the shards are a few
examples, so a device-round is well under a millisecond). Each round draws devices by
Poisson sampling, clips each delta on the "device" (:func:`fedmq.privacy.device.privatize_delta`),
encodes it with the real codec and folds it into the real :class:`DPFedAvg` accumulator; the
non-private baseline is plain FedAvg (example-weighted mean, no clip, no noise) on the same
samples. Prints a table of z x (epsilon at delta after R rounds, final test accuracy).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmq.errors import ConfigError
from fedmq.privacy.accounting import PrivacyPlan
from fedmq.privacy.device import privatize_delta
from fedmq.privacy.dp_fedavg import DPFedAvg, DpOptions
from fedmq.privacy.noise import AdaptiveClip
from fedmq.update.codecs import encode_delta
from fedmq.update.strategies import FedAvg, Strategy

__all__ = ["ExperimentRow", "add_parser", "run_experiment"]


@dataclass(frozen=True)
class ExperimentRow:
    label: str
    noise_multiplier: float | None  # None: non-private
    epsilon: float | None
    accuracy: float
    final_clip: float | None


def run_experiment(
    *, devices: int, per_round: int, rounds: int, noise: list[float], clip: float,
    adaptive: bool, epochs: int, lr: float, server_lr: float, codec: str, delta: float,
    seed: int,
) -> list[ExperimentRow]:
    from edge_agent.trainer import LiteRTTrainer
    from fedmq.data.datasets import load_digits
    from fedmq.models.spec import load_bundle, prebuilt_bundle_path

    train, test = load_digits()
    if devices > len(train):
        raise ConfigError(f"{devices} devices but only {len(train)} training examples")
    path = prebuilt_bundle_path("digits-mlp")
    trainer = LiteRTTrainer(path)
    w0 = load_bundle(path).initial_trainable()
    shards = np.array_split(np.random.default_rng(seed).permutation(len(train)), devices)
    q = per_round / devices
    configs: list[tuple[str, float | None]] = [("non-private", None)]
    configs += [(f"z={z:g}", z) for z in noise]
    rows = []
    for label, z in configs:
        plan = PrivacyPlan(devices, per_round, z or 0.0, delta,
                           clip_count_sd=per_round / 20 if adaptive and z else None)
        strategy: Strategy = FedAvg(server_lr=server_lr)
        if z is not None:
            opts = DpOptions(
                noise_multiplier=z, clip=clip, expected_participants=per_round, plan=plan,
                adaptive=AdaptiveClip(count_sd=per_round / 20) if adaptive else None,
                seed=seed + 1,
            )
            strategy = DPFedAvg(strategy, opts)
        sampler = np.random.default_rng(seed + 2)  # same device draws for every config
        weights = dict(w0)
        shapes = {n: w.shape for n, w in w0.items()}
        for r in range(1, rounds + 1):
            chosen = np.flatnonzero(sampler.random(devices) < q)
            if chosen.size == 0:
                continue  # nobody drawn: no release (the service draws again)
            acc = strategy.new_accumulator(shapes)
            for d in chosen:
                idx = shards[d]
                rng = np.random.default_rng([seed, int(d), r])
                trainer.set_weights(weights)
                trainer.fit(train.x[idx], train.y[idx], epochs=epochs, lr=lr, rng=rng)
                local = trainer.get_weights()
                delta_w = {n: local[n] - weights[n] for n in shapes}
                params: dict[str, object] = {}
                if isinstance(strategy, DPFedAvg):
                    params["dp_clip"] = strategy.clip
                delta_w, metrics = privatize_delta(delta_w, params, rng)
                acc.fold(encode_delta(delta_w, codec, rng), codec, float(len(idx)))
                note = getattr(acc, "note_metrics", None)
                if note is not None:
                    note(metrics)
            weights = strategy.aggregate(weights, acc.result())
        trainer.set_weights(weights)
        accuracy = trainer.evaluate(test.x, test.y).accuracy
        private = isinstance(strategy, DPFedAvg)
        rows.append(ExperimentRow(
            label, z, plan.epsilon(rounds) if private else None, accuracy,
            strategy.clip if isinstance(strategy, DPFedAvg) else None,
        ))
    return rows


def format_rows(rows: list[ExperimentRow], delta: float, rounds: int) -> list[str]:
    out = [f"| run | z | epsilon at delta={delta:g} after {rounds} rounds | final accuracy |"
           " final C |", "|---|---|---|---|---|"]
    for row in rows:
        eps = "-" if row.epsilon is None else (
            "inf" if math.isinf(row.epsilon) else f"{row.epsilon:.2f}")
        z = "-" if row.noise_multiplier is None else f"{row.noise_multiplier:g}"
        c = "-" if row.final_clip is None else f"{row.final_clip:.3g}"
        out.append(f"| {row.label} | {z} | {eps} | {row.accuracy:.4f} | {c} |")
    return out


def _command(args: argparse.Namespace) -> int:
    noise = [float(v) for v in args.noise.split(",") if v.strip()]
    rows = run_experiment(
        devices=args.devices, per_round=args.per_round, rounds=args.rounds, noise=noise,
        clip=args.clip, adaptive=args.adaptive_clip, epochs=args.epochs, lr=args.lr,
        server_lr=args.server_lr, codec=args.codec, delta=args.delta, seed=args.seed,
    )
    for line in format_rows(rows, args.delta, args.rounds):
        print(line)
    return 0


def add_parser(privacy_sub: Any) -> argparse.ArgumentParser:
    """Adds ``experiment`` under ``fedmq privacy``."""
    p = privacy_sub.add_parser(
        "experiment", help="DP-FedAvg vs non-private on a simulated digits fleet (in-process)"
    )
    p.add_argument("--devices", type=int, default=400)
    p.add_argument("--per-round", type=int, default=40, help="expected (Poisson)")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--noise", default="0.3,0.5,1.0", help="noise multipliers, comma-separated")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--adaptive-clip", action="store_true")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--codec", default="int8")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_command)
    return p
