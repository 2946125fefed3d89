"""``fedmq demo``: a local federation on scikit-learn's digits, shown round by round."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aggregator.policies import round_policy_names
from fedmq.downlink import downlink_modes
from fedmq.update.codecs import codec_names
from fedmq.update.strategies import strategy_names
from fedmq_ops.localfleet import FederationSpec, RoundRow, run_federation
from fedmq_ops.progress import plot_curve, print_header, print_row, print_summary

__all__ = [
    "STRATEGY_OPTION_FLAGS", "add_federation_arguments", "add_parser", "run_from_args",
    "spec_from_args", "strategy_options_from_args",
]


def _flag(value: str) -> bool:
    """A boolean flag value: true/false (also 1/0, yes/no)."""
    low = value.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _NoDefaults:
    """Every attribute is None: flags left unset are filled in later (experiment presets)."""

    def __getattr__(self, name: str) -> None:
        return None


def add_federation_arguments(
    p: argparse.ArgumentParser, defaults: FederationSpec | None
) -> None:
    d: Any = defaults if defaults is not None else _NoDefaults()
    p.add_argument("--agents", type=int, default=d.agents, help="number of agents (processes)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds to run")
    p.add_argument(
        "--dataset", default=d.dataset, help="digits | fashion-mnist | fashion-mnist-seq"
    )
    p.add_argument(
        "--model",
        default=d.model,
        help="prebuilt bundle name or bundle directory (fedmq model export)",
    )
    p.add_argument(
        "--partition",
        default=d.partition,
        help="iid | dirichlet:ALPHA | classes:K | quantity:ALPHA",
    )
    p.add_argument(
        "--codec", default=d.codec, choices=codec_names(), help="uplink update codec"
    )
    p.add_argument(
        "--topk-fraction",
        type=float,
        default=d.topk_fraction,
        help="top-k codecs (topk-f16/int8/int4, stc): fraction of each tensor's values sent "
        "per update, in (0, 1] (default: the codec's, 0.01)",
    )
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per round")
    p.add_argument("--lr", type=float, default=d.lr, help="local SGD learning rate")
    p.add_argument(
        "--strategy",
        default=d.strategy,
        choices=strategy_names(),
        help="server-side aggregation strategy",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=d.server_lr,
        help="server learning rate (default: 1 for fedavg/fedavgm, 0.01 for fedadam)",
    )
    p.add_argument(
        "--round-policy",
        default=d.round_policy,
        choices=round_policy_names(),
        help="when rounds open and close: sync rounds or fedbuff (asynchronous buffers)",
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        default=d.buffer_size,
        help="fedbuff: accepted updates per new model (default: the aggregator's)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="split updates and models above this many bytes into chunks, on the "
        "aggregator and every agent (0 = never)",
    )
    p.add_argument(
        "--downlink",
        default=d.downlink,
        choices=downlink_modes(),
        help="how the global model reaches devices: full (float32 every version) or a "
        "codec for deltas against the version a device holds",
    )
    p.add_argument(
        "--prune",
        type=float,
        default=d.prune,
        metavar="SPARSITY",
        help="prune the kernels to this sparsity along the aggregator's schedule, e.g. 0.8 "
        "(docs/pruning.md; int8/float16 values travel as masked-int8/masked-f16); 0 = off",
    )
    p.add_argument(
        "--clients-per-round",
        type=int,
        default=d.clients_per_round,
        help="devices sampled per round (0 = all)",
    )
    p.add_argument(
        "--max-examples",
        type=int,
        default=d.max_examples,
        help="cap on local examples per round (0 = all)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--broker",
        default=d.broker,
        help="auto | mosquitto | amqtt | HOST:PORT of a running broker",
    )
    p.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds before a round closes with the updates it has",
    )
    p.add_argument("--threads", type=int, default=d.agent_threads, help="LiteRT threads per agent")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep state and logs here (default: a temporary directory)",
    )
    add_strategy_option_arguments(p)
    p.add_argument(
        "--eval-dataset",
        default=d.eval_dataset,
        help="the aggregator's test set: '' = the dataset's test split, 'none' = no server "
        "test set (the curve then comes from the devices' federated evaluation)",
    )
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="federated evaluation: fraction of each agent's examples held out and "
        "evaluated on (0 = off)",
    )
    p.add_argument(
        "--eval-only-agents",
        type=int,
        default=d.eval_only_agents,
        help="the last N agents never train, only evaluate each round's model",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy curve as PNG")


#: Strategy options (aggregator config keys, docs/strategies.md) as ``--flag`` -> (type,
#: help); unset flags leave the aggregator's default.
STRATEGY_OPTION_FLAGS: dict[str, tuple[Any, str]] = {
    "server_momentum": (float, "fedavgm: server momentum"),
    "server_beta1": (float, "fedadam/fedyogi/fedadagrad (and fedsgd --server-adam): beta1"),
    "server_beta2": (float, "fedadam/fedyogi (and fedsgd --server-adam): beta2"),
    "server_tau": (float, "adaptive servers: tau (adaptivity)"),
    "bias_correction": (_flag, "adaptive servers: bias-correct m and v (true/false)"),
    "prox_mu": (float, "fedprox: proximal weight mu sent to devices"),
    "grad_examples": (int, "fedsgd: examples per device gradient"),
    "server_adam": (_flag, "fedsgd: Adam on the mean gradient (true/false)"),
    "robust_buffer": (int, "median/trimmed_mean/krum and the wrappers: updates kept per round"),
    "trim": (float, "trimmed_mean: fraction dropped at each side"),
    "krum_f": (int, "krum: Byzantine devices assumed"),
    "krum_m": (int, "krum: updates averaged (0 = n - f)"),
    "clip_updates": (str, "server-side norm bounding: off | fixed | adaptive"),
    "clip_norm": (float, "clip_updates = fixed: the L2 bound"),
    "clip_multiplier": (float, "clip_updates = adaptive: bound = this x the median norm"),
    "zero_outliers_k": (float, "zero values more than k MADs from the median (0 = off)"),
}


def add_strategy_option_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("strategy options (default: the aggregator's)")
    for key, (kind, text) in STRATEGY_OPTION_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None,
                           help=text)


def strategy_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The strategy options given on the command line (aggregator config keys)."""
    return {k: getattr(args, k) for k in STRATEGY_OPTION_FLAGS if getattr(args, k, None)
            is not None}


def spec_from_args(args: argparse.Namespace, **extra: Any) -> FederationSpec:
    """The federation the parsed flags of ``fedmq demo``/``fedmq experiment`` describe."""
    extra["extra_aggregator"] = {
        **strategy_options_from_args(args), **extra.get("extra_aggregator", {})
    }
    return FederationSpec(
        agents=args.agents,
        rounds=args.rounds,
        dataset=args.dataset,
        model=args.model,
        partition=args.partition,
        codec=args.codec,
        topk_fraction=args.topk_fraction,
        epochs=args.epochs,
        lr=args.lr,
        strategy=args.strategy,
        server_lr=args.server_lr,
        clients_per_round=args.clients_per_round,
        max_examples=args.max_examples,
        seed=args.seed,
        broker=args.broker,
        round_timeout=args.round_timeout,
        agent_threads=args.threads,
        round_policy=args.round_policy,
        buffer_size=args.buffer_size,
        max_message_bytes=args.max_message_bytes,
        downlink=args.downlink,
        eval_dataset=args.eval_dataset,
        eval_fraction=args.eval_fraction,
        eval_only_agents=args.eval_only_agents,
        prune=args.prune,
        workdir=args.workdir,
        **extra,
    )


def run_from_args(
    args: argparse.Namespace, title: str, reference: float | None = None, **extra: Any
) -> int:
    spec = spec_from_args(args, **extra)
    codec = spec.codec if spec.topk_fraction is None else f"{spec.codec}@{spec.topk_fraction:g}"
    print(
        f"{title}: {spec.agents} agents, {spec.dataset} split {spec.partition}, model "
        f"{spec.model}, {codec} updates, {spec.epochs} local epoch(s), {spec.rounds} rounds"
        + (f", {spec.downlink} downlink" if spec.downlink != "full" else ""),
        flush=True,
    )
    shown: list[int] = []

    def show(row: RoundRow) -> None:
        if not shown:
            print_header(sys.stdout)
        shown.append(row.round_id)
        print_row(row, sys.stdout)

    result = run_federation(spec, on_round=show)
    print_summary(result, sys.stdout)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        plot_curve(
            result.rows,
            args.plot,
            f"{title}: {spec.model} on {spec.dataset}, "
            f"{spec.agents} devices, {spec.partition}, {codec}",
            reference=reference,
        )
        print(f"wrote {args.plot}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return run_from_args(args, "fedmq demo")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a local federation on digits (broker + aggregator + agents)",
        description="Start a local broker (mosquitto, or the embedded amqtt broker when "
        "mosquitto is missing), an aggregator and N agents as separate processes; each agent "
        "trains the digits MLP with LiteRT on its own non-IID share of scikit-learn's digits. "
        "Prints every round (participants, test accuracy, bytes up/down) and the totals.",
    )
    add_federation_arguments(p, FederationSpec())
    p.set_defaults(func=_run)
