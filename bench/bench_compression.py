"""Uplink bytes and final accuracy per update codec: float32 vs float16 vs int8, side by side.

Target (docs/facts.md): "Uplink bytes per update: int8 = 1/4 of float32 at <= 0.5 point accuracy
loss". Every run is a real local federation (`fedmq_ops.localfleet.run_federation`: broker,
aggregator and agent processes); runs differ only in the codec. One run's final accuracy is
noisy, so the digits comparison (digits-mlp, 8 agents, dirichlet:0.5, 2 local epochs, lr 0.2,
20 rounds, ~5-10 s per run) is repeated over ``--seeds`` seeds (seed = partition + initial
sampling; the agents' shuffling is not seeded, so even two runs of one seed differ a little)
and the codecs are interleaved per seed so machine-load drift hits them alike.

Bytes per update = update payload bytes received by the aggregator (whole msgpack message:
header, tensor metadata and data) / accepted updates. Prints a table and writes
bench/results/compression.json.

``--task fmnist`` is issue 9's communication measurement on the FMNIST task (the
`fedmq experiment fmnist-cnn` preset: fmnist-cnn, 10 devices, Dirichlet(0.5), 1 local epoch,
batch 32, lr 0.2, 20 rounds, every device every round): one real federation per setting
and seed, settings ``codec`` or ``codec@fraction`` (the rounds' ``topk_fraction``). Per
setting: final accuracy (round 20, and the mean of the last 5 rounds), uplink bytes per
device per round (the aggregator's count of update bytes / accepted updates), downlink
bytes per device per round (the model and round announcement every device receives: the
run's ``bytes_delivered`` / devices / rounds), and with ``--timing`` the device encode ms
and aggregator decode+fold MB/s and updates/s on real fmnist-cnn deltas (bench/codec_timing.py:
one local epoch from the mid-run global model v10 of an int8 run). Results are merged into
``--out`` (bench/results/compression_fmnist.json; a run of the same setting, seed and
downlink replaces the older one), so the grid can run in pieces; the table and the PNG of
accuracy vs uplink bytes (bench/results/compression_fmnist.png, the Pareto front) are
rebuilt from every run in the file.

    .venv/bin/python bench/bench_compression.py [--seeds 3] [--rounds 20]
    .venv/bin/python bench/bench_compression.py --task fmnist --codecs int8,topk-int8@0.05 \
        --seeds 0,1 [--downlink int8] [--timing]
    .venv/bin/python bench/bench_compression.py --task fmnist --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import compression_fmnist as fm
import numpy as np
from machine import machine_info as _machine_info

from fedmq.errors import ConfigError
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.update.codecs import codec_names, encode_delta, encoded_nbytes
from fedmq_ops.localfleet import FederationResult, FederationSpec, run_federation

__all__ = ["main", "run_one", "summarize"]

TARGET_RATIO = 4.0
TARGET_LOSS_POINTS = 0.5
LAST_K = 5  # rounds averaged for the (less noisy) "last-5" accuracy
RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict[str, Any]:
    return _machine_info(("numpy", "ai-edge-litert", "tflite-runtime", "paho-mqtt", "msgpack"))


def tensor_data_bytes(model: str, codec: str) -> int:
    """Bytes of tensor data alone in one update of ``model`` (payload minus message framing)."""
    bundle = load_bundle(prebuilt_bundle_path(model))
    delta = {n: np.zeros_like(bundle.initial_weights[n]) for n in bundle.spec.trainable}
    return encoded_nbytes(encode_delta(delta, codec, np.random.default_rng(0)))


def run_one(spec: FederationSpec) -> dict[str, Any]:
    """One federation; the figures this benchmark compares."""
    result: FederationResult = run_federation(spec)
    rows = result.rows
    updates = sum(r.participants for r in rows)
    bytes_in = sum(r.bytes_in for r in rows)
    tail = [r.accuracy for r in rows[-LAST_K:]]
    return {
        "seed": spec.seed,
        "codec": spec.codec,
        "final_accuracy": result.final_accuracy,
        "last5_accuracy": statistics.fmean(tail) if tail else float("nan"),
        "rounds": len(rows),
        "updates": updates,
        "bytes_in": bytes_in,
        "bytes_per_update": bytes_in / updates if updates else float("nan"),
        "tensor_data_bytes": tensor_data_bytes(spec.model, spec.codec),
        "wall_seconds": result.wall_seconds,
        "max_agent_peak_rss_mb": result.max_agent_rss_mb,
        "curve": [r.accuracy for r in rows],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per codec: mean/stdev accuracy, points vs float32 (paired by seed), bytes and ratio."""
    by_codec: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_codec.setdefault(r["codec"], []).append(r)
    base = {r["seed"]: r for r in by_codec.get("float32", [])}
    base_bytes = (
        statistics.fmean(r["bytes_per_update"] for r in base.values()) if base else float("nan")
    )
    base_data = next(iter(base.values()))["tensor_data_bytes"] if base else float("nan")
    out: dict[str, dict[str, Any]] = {}
    for codec, rs in by_codec.items():
        acc = [r["final_accuracy"] for r in rs]
        last = [r["last5_accuracy"] for r in rs]
        diffs = [
            100 * (r["final_accuracy"] - base[r["seed"]]["final_accuracy"])
            for r in rs
            if r["seed"] in base
        ]
        last_diffs = [
            100 * (r["last5_accuracy"] - base[r["seed"]]["last5_accuracy"])
            for r in rs
            if r["seed"] in base
        ]
        bpu = statistics.fmean(r["bytes_per_update"] for r in rs)
        data = rs[0]["tensor_data_bytes"]
        out[codec] = {
            "runs": len(rs),
            "mean_final_accuracy": statistics.fmean(acc),
            "stdev_final_accuracy": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "mean_last5_accuracy": statistics.fmean(last),
            "points_vs_float32": statistics.fmean(diffs) if diffs else float("nan"),
            "sem_points_vs_float32": (
                statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
            ),
            "points_vs_float32_per_seed": diffs,
            "last5_points_vs_float32": statistics.fmean(last_diffs) if last_diffs else float("nan"),
            "bytes_per_update": bpu,
            "ratio_vs_float32": base_bytes / bpu,
            "tensor_data_bytes": data,
            "framing_bytes": bpu - data,
            "tensor_data_ratio_vs_float32": base_data / data,
            "mean_wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs),
        }
    return out


def print_table(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(
        f"{'codec':8} {'runs':>4} {'final acc %':>14} {'pts vs f32':>10} {'last-5 %':>9} "
        f"{'pts vs f32':>10} {'bytes/update':>13} {'f32/x':>6} {'data B':>8} {'f32/x':>6} "
        f"{'s/run':>6}"
    )
    for codec, s in summary.items():
        acc = f"{100 * s['mean_final_accuracy']:.2f}+-{100 * s['stdev_final_accuracy']:.2f}"
        print(
            f"{codec:8} {s['runs']:>4} {acc:>14} {s['points_vs_float32']:>+10.2f} "
            f"{100 * s['mean_last5_accuracy']:>9.2f} {s['last5_points_vs_float32']:>+10.2f} "
            f"{s['bytes_per_update']:>13,.0f} {s['ratio_vs_float32']:>5.2f}x "
            f"{s['tensor_data_bytes']:>8,} {s['tensor_data_ratio_vs_float32']:>5.2f}x "
            f"{s['mean_wall_seconds']:>6.1f}"
        )
    if "int8" in summary:
        s = summary["int8"]
        ok_data = s["tensor_data_ratio_vs_float32"] >= TARGET_RATIO * 0.99
        ok_payload = s["ratio_vs_float32"] >= TARGET_RATIO * 0.99
        ok_acc = s["points_vs_float32"] >= -TARGET_LOSS_POINTS
        print(
            f"int8 vs float32: tensor data {s['tensor_data_ratio_vs_float32']:.2f}x smaller, "
            f"whole payload {s['ratio_vs_float32']:.2f}x (framing {s['framing_bytes']:,.0f} "
            f"B/update); target {TARGET_RATIO:.0f}x: {'met' if ok_data else 'NOT met'} on "
            f"tensor data, {'met' if ok_payload else 'NOT met'} on the payload"
        )
        print(
            f"int8 accuracy {s['points_vs_float32']:+.2f} +- {s['sem_points_vs_float32']:.2f} "
            f"points vs float32 (mean +- s.e. over paired seeds); target >= "
            f"-{TARGET_LOSS_POINTS}: {'met' if ok_acc else 'NOT met'}"
        )


def compare(
    base: FederationSpec, seeds: list[int], codecs: list[str], label: str
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    runs = []
    for seed in seeds:
        for codec in codecs:  # interleaved: load drift affects every codec alike
            spec = dataclasses.replace(base, seed=seed, codec=codec)
            r = run_one(spec)
            print(
                f"  {label} seed {seed} {codec:8} final {100 * r['final_accuracy']:6.2f} %  "
                f"last-5 {100 * r['last5_accuracy']:6.2f} %  "
                f"{r['bytes_per_update']:>9,.0f} B/update  {r['wall_seconds']:5.1f} s",
                flush=True,
            )
            runs.append(r)
    summary = summarize(runs)
    print_table(
        f"{label}: {base.model}, {base.agents} agents, {base.partition}, "
        f"{base.epochs} epoch(s), lr {base.lr}, {base.rounds} rounds, "
        f"seeds {seeds}",
        summary,
    )
    return runs, summary


def _seed_list(text: str) -> list[int]:
    """``a,b,...`` = those seeds (``0`` = seed 0)."""
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=("digits", "fmnist"), default="digits")
    ap.add_argument("--seeds", default=None,
                    help="digits: N runs per codec (seeds 0..N-1, default 3); fmnist: the "
                    "seeds, a list a,b (default 0)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--codecs", default=None,
                    help="comma-separated codecs; fmnist: codec or codec@topk_fraction "
                    f"(default: digits every codec, fmnist {','.join(fm.DEFAULT_SETTINGS)})")
    ap.add_argument("--downlink", default=None,
                    help="fmnist: FederationSpec.downlink for these runs (default: not set, "
                    "the full float32 model)")
    ap.add_argument("--timing", action="store_true",
                    help="fmnist: device encode ms and decode+fold on real deltas for every "
                    "setting in the results file and --codecs")
    ap.add_argument("--timing-devices", type=int, default=4)
    ap.add_argument("--report-only", action="store_true",
                    help="fmnist: no runs; rebuild the table and PNG from the results file")
    ap.add_argument("--markdown", action="store_true", help="fmnist: also print the table "
                    "as Markdown")
    ap.add_argument("--models-dir", type=Path, default=fm.MODELS_DIR,
                    help="fmnist: where each run's mid-run global model is kept (timing)")
    ap.add_argument("--broker", default="auto", help="auto | mosquitto | amqtt | HOST:PORT")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON (default bench/results/compression.json, or "
                    "compression_fmnist.json with --task fmnist; its PNG beside it)")
    args = ap.parse_args()
    if args.task == "fmnist":
        fmnist_main(ap, args)
        return
    seeds = list(range(int(args.seeds or "3")))
    out = args.out or RESULTS / "compression.json"
    codecs = [c.strip() for c in (args.codecs or ",".join(codec_names())).split(",") if c.strip()]
    if "float32" not in codecs:
        codecs.insert(0, "float32")
    unknown = [c for c in codecs if c not in codec_names()]
    if unknown:
        ap.error(f"unknown codecs {unknown}; choose from {codec_names()}")
    t0 = time.monotonic()
    digits = FederationSpec(
        agents=8, rounds=args.rounds, dataset="digits", model="digits-mlp",
        partition="dirichlet:0.5", epochs=2, lr=0.2, broker=args.broker,
    )  # fmt: skip
    report: dict[str, Any] = {
        "benchmark": "compression",
        "machine": machine_info(),
        "targets": {"int8_ratio_vs_float32": TARGET_RATIO, "max_points_lost": TARGET_LOSS_POINTS},
    }
    runs, summary = compare(digits, seeds, codecs, "digits")
    report["digits"] = {"spec": _spec_json(digits), "summary": summary, "runs": runs}
    report["total_seconds"] = time.monotonic() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['total_seconds']:.0f} s)")


def fmnist_main(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The FMNIST grid: run the settings x seeds asked for, merge them into the results
    file, then rebuild the table and the PNG from every run in it."""
    out = args.out or RESULTS / "compression_fmnist.json"
    settings = [c.strip() for c in (args.codecs or ",".join(fm.DEFAULT_SETTINGS)).split(",")
                if c.strip()]
    try:
        settings = [fm.label(*fm.parse_setting(c)) for c in settings]
    except ConfigError as exc:
        ap.error(str(exc))
    seeds = _seed_list(args.seeds or "0")
    base = fm.base_spec(args.rounds, args.broker)
    report = fm.load_report(out)
    if not args.report_only:
        for seed in seeds:
            for setting in settings:
                print(f"run {setting} seed {seed} downlink {args.downlink or fm.FULL}: "
                      f"{base.model}, {base.agents} agents, {base.rounds} rounds", flush=True)
                try:
                    run = fm.run_setting(base, setting, seed, args.downlink, args.models_dir)
                except ConfigError as exc:
                    ap.error(str(exc))
                print(f"  {setting} seed {seed}: final {100 * run['final_accuracy']:6.2f} %  "
                      f"last-5 {100 * run['last5_accuracy']:6.2f} %  up "
                      f"{run['uplink_bytes_per_device_round']:>9,.0f} B  down "
                      f"{run['downlink_bytes_per_device_round']:>9,.0f} B per device per "
                      f"round  {run['wall_seconds']:5.0f} s", flush=True)
                report = fm.load_report(out)  # another piece may have written meanwhile
                report["runs"] = fm.merge_runs(report["runs"], [run])
                report["spec"] = _spec_json(base)
                report["machine"] = machine_info()
                fm.write_report(out, report)
    if args.timing:
        known = sorted({r["setting"] for r in report["runs"]} | set(settings))
        report = fm.load_report(out)
        report["timing"] = fm.timing(known, args.models_dir, base, args.timing_devices)
        fm.write_report(out, report)
    timings = report.get("timing", {}).get("settings", {})
    summary = fm.summarize(report["runs"], args.rounds, timings)
    report["summary"] = summary
    goal, stretch = fm.goal_bytes(summary)
    report["goal"] = {
        "uplink_bytes": goal, "stretch_uplink_bytes": stretch,
        "max_points_below_int8": fm.GOAL_POINTS,
        "meets_goal": [k for k, s in summary.items() if s["meets_goal"]],
        "meets_stretch": [k for k, s in summary.items() if s["meets_stretch"]],
    }
    fm.write_report(out, report)
    title = (f"{base.model}, {base.agents} devices, {base.partition}, {base.epochs} epoch, "
             f"lr {base.lr}, {args.rounds} rounds")
    fm.print_table(summary, title)
    if args.markdown:
        print(fm.markdown_table(summary))
    png = out.with_suffix(".png")
    fm.plot_front(summary, report["runs"], args.rounds, png, f"FMNIST task: {title}")
    print(f"wrote {out} and {png}")


def _spec_json(spec: FederationSpec) -> dict[str, Any]:
    skip = ("workdir", "seed", "codec")
    return {k: v for k, v in dataclasses.asdict(spec).items() if k not in skip}


if __name__ == "__main__":
    main()
