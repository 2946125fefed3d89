"""The FMNIST grid of bench_compression.py (``--task fmnist``): issue 9's uplink goal.

Goal: uplink <= 1/16 of float32 per device per round at <= 1 point below the int8 run's
final accuracy; stretch 1/64. Every run is a real local federation (broker, aggregator and
10 agent processes); see bench_compression.py's docstring for what each figure counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from codec_timing import real_deltas, time_codec
from machine import machine_info

from fedmq.errors import ConfigError
from fedmq.update.codecs import codec_names
from fedmq.update.codecs.topk import check_topk_fraction, topk_params
from fedmq_ops.experiment import PRESETS
from fedmq_ops.localfleet import FederationSpec, RoundRow, run_federation

__all__ = [
    "DEFAULT_SETTINGS", "base_spec", "markdown_table", "merge_runs", "parse_setting",
    "plot_front", "print_table", "run_setting", "summarize", "timing",
]

REFERENCE = "int8"
GOAL_DIVISOR = 16
STRETCH_DIVISOR = 64
GOAL_POINTS = 1.0
LAST_K = 5
FULL = "full"  # the downlink as it is without the downlink setting: the float32 model
DEFAULT_SETTINGS = (
    "int8", "topk-int8@0.05", "topk-int8@0.1", "stc@0.05", "topk-int8@0.01", "float32",
    "int4", "topk-f16@0.05", "topk-int4@0.05", "topk-f16@0.01", "topk-f16@0.1",
)
MODELS_DIR = Path(tempfile.gettempdir()) / "fedmq-compression-models"


def parse_setting(text: str) -> tuple[str, float | None]:
    """``codec`` or ``codec@fraction`` -> (codec, topk_fraction); ConfigError when bad."""
    codec, at, frac = text.strip().partition("@")
    if codec not in codec_names():
        raise ConfigError(f"unknown codec {codec!r} in {text!r}; choose from {codec_names()}")
    try:
        fraction = float(frac) if at else None
    except ValueError:
        raise ConfigError(f"{text!r}: the fraction after @ must be a number") from None
    check_topk_fraction(codec, fraction)
    return codec, fraction


def label(codec: str, fraction: float | None) -> str:
    return codec if fraction is None else f"{codec}@{fraction:g}"


def base_spec(rounds: int, broker: str) -> FederationSpec:
    """The `fedmq experiment fmnist-cnn` preset (10 agents, dirichlet:0.5, 1 epoch, lr 0.2)
    with the aggregator's norm bound off: every round needs all 10 updates, and the adaptive
    bound (3 x the median L2 norm) refused an honest device's int8 update in round 10 of
    seed 1 (norm 4.65 against a bound of 4.50), so the round waited out its deadline. The
    bound only refuses, so runs without a refusal are the same with it off."""
    return dataclasses.replace(PRESETS["fmnist-cnn"], rounds=rounds, broker=broker,
                               extra_aggregator={"norm_bound": "off"})


def _with_downlink(spec: FederationSpec, downlink: str | None) -> FederationSpec:
    if downlink is None:
        return spec
    if "downlink" not in {f.name for f in dataclasses.fields(FederationSpec)}:
        raise ConfigError(
            "--downlink needs FederationSpec.downlink (the compressed downlink branch); "
            "this tree only has the full float32 model downlink"
        )
    return dataclasses.replace(spec, downlink=downlink)  # type: ignore[call-arg]


def run_setting(
    base: FederationSpec, setting: str, seed: int, downlink: str | None, models_dir: Path
) -> dict[str, Any]:
    """One federation of ``setting``; its figures, and its mid-run global model kept in
    ``models_dir`` (the timing's starting point)."""
    codec, fraction = parse_setting(setting)
    name = label(codec, fraction)
    workdir = Path(tempfile.mkdtemp(prefix="fedmq-compression-"))
    spec = _with_downlink(
        dataclasses.replace(base, seed=seed, codec=codec, topk_fraction=fraction,
                            workdir=workdir),
        downlink,
    )
    load = os.getloadavg()

    def progress(row: RoundRow) -> None:
        if row.round_id % 5 == 0 or row.round_id == 1:
            print(f"    {name} seed {seed} round {row.round_id:2}: accuracy "
                  f"{100 * row.accuracy:6.2f} %  {row.participants} updates  "
                  f"{row.bytes_in:>9,} B in  {row.wall:6.0f} s", flush=True)

    try:
        result = run_federation(spec, on_round=progress)
        mid = max(1, spec.rounds // 2)
        src = workdir / "aggregator" / "models" / f"v{mid}.npz"
        if src.is_file():
            models_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, models_dir / f"{name}-s{seed}-v{mid}.npz")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = result.rows
    updates = sum(r.participants for r in rows)
    bytes_in = sum(r.bytes_in for r in rows)
    delivered = sum(r.bytes_delivered for r in rows)
    device_rounds = spec.agents * len(rows)
    tail = [r.accuracy for r in rows[-LAST_K:]]
    return {
        "setting": name,
        "codec": codec,
        "topk_fraction": fraction,
        "downlink": downlink or FULL,
        "seed": seed,
        "rounds": len(rows),
        "agents": spec.agents,
        "final_accuracy": result.final_accuracy,
        "last5_accuracy": statistics.fmean(tail) if tail else math.nan,
        "updates": updates,
        "min_participants": min((r.participants for r in rows), default=0),
        "uplink_bytes": bytes_in,
        # every device takes part every round, so per update = per device per round
        "uplink_bytes_per_update": bytes_in / updates if updates else math.nan,
        "uplink_bytes_per_device_round": bytes_in / device_rounds,
        "downlink_bytes": delivered,
        "downlink_bytes_per_device_round": delivered / device_rounds,
        "model_message_bytes": result.model_bytes,
        "wall_seconds": result.wall_seconds,
        "max_agent_peak_rss_mb": result.max_agent_rss_mb,
        "load_average_at_start": load,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "curve": [r.accuracy for r in rows],
    }


def _key(run: dict[str, Any]) -> tuple[Any, ...]:
    return run["setting"], run["seed"], run["downlink"], run["rounds"]


def merge_runs(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` with every run of ``new`` added; a new run replaces an old one of the same
    setting, seed, downlink and rounds."""
    fresh = {_key(r) for r in new}
    return [r for r in old if _key(r) not in fresh] + new


def summarize(runs: list[dict[str, Any]], rounds: int,
              timings: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Per setting (and downlink): accuracy over seeds, points vs int8 (paired by seed where
    int8 ran that seed), bytes each way, timing, and the goal checks."""
    runs = [r for r in runs if r["rounds"] == rounds]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        key = r["setting"] if r["downlink"] == FULL else f"{r['setting']} down:{r['downlink']}"
        groups.setdefault(key, []).append(r)
    ref = {r["seed"]: r for r in groups.get(REFERENCE, [])}
    ref_mean = statistics.fmean(r["final_accuracy"] for r in ref.values()) if ref else math.nan
    f32_bytes, f32_source = float32_bytes(groups, timings)
    out: dict[str, dict[str, Any]] = {}
    for key, rs in sorted(groups.items(), key=lambda kv: -kv[1][0]["uplink_bytes_per_update"]):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [r["final_accuracy"] for r in rs]
        paired = [100 * (r["final_accuracy"] - ref[r["seed"]]["final_accuracy"])
                  for r in rs if r["seed"] in ref]
        up = statistics.fmean(r["uplink_bytes_per_update"] for r in rs)
        points = statistics.fmean(paired) if paired else 100 * (statistics.fmean(acc) - ref_mean)
        t = timings.get(rs[0]["setting"], {})
        out[key] = {
            "setting": rs[0]["setting"],
            "downlink": rs[0]["downlink"],
            "seeds": [r["seed"] for r in rs],
            "mean_final_accuracy": statistics.fmean(acc),
            "stdev_final_accuracy": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "mean_last5_accuracy": statistics.fmean(r["last5_accuracy"] for r in rs),
            "points_vs_int8": points,
            "points_vs_int8_paired_seeds": [r["seed"] for r in rs if r["seed"] in ref],
            "uplink_bytes_per_device_round": up,
            "uplink_ratio_vs_float32": f32_bytes / up,
            "downlink_bytes_per_device_round": statistics.fmean(
                r["downlink_bytes_per_device_round"] for r in rs),
            "encode_ms": t.get("encode_ms", math.nan),
            "fold_mb_per_s": t.get("fold_mb_per_s", math.nan),
            "fold_updates_per_s": t.get("fold_updates_per_s", math.nan),
            "float32_bytes": f32_bytes,
            "float32_bytes_source": f32_source,
            "meets_goal": bool(up <= f32_bytes / GOAL_DIVISOR and points >= -GOAL_POINTS),
            "meets_stretch": bool(up <= f32_bytes / STRETCH_DIVISOR and points >= -GOAL_POINTS),
            "mean_wall_seconds": statistics.fmean(r["wall_seconds"] for r in rs),
        }
    return out


def float32_bytes(groups: dict[str, list[dict[str, Any]]],
                  timings: dict[str, dict[str, float]]) -> tuple[float, str]:
    """float32 bytes per update: measured in the float32 runs, else (no float32 run yet) the
    int8 runs' bytes plus the difference of a float32 and an int8 message of the same real
    delta (the timing's payloads: the tensor data differ, the framing is the same)."""
    f32 = groups.get("float32", [])
    if f32:
        return statistics.fmean(r["uplink_bytes_per_update"] for r in f32), "float32 runs"
    ref = groups.get(REFERENCE, [])
    if ref and "float32" in timings and REFERENCE in timings:
        int8 = statistics.fmean(r["uplink_bytes_per_update"] for r in ref)
        diff = timings["float32"]["payload_bytes"] - timings[REFERENCE]["payload_bytes"]
        return int8 + diff, "int8 runs + (float32 - int8) message size of one real delta"
    return math.nan, "unknown"


def goal_bytes(summary: dict[str, dict[str, Any]]) -> tuple[float, float]:
    base = next(iter(summary.values()))["float32_bytes"] if summary else math.nan
    return base / GOAL_DIVISOR, base / STRETCH_DIVISOR


def print_table(summary: dict[str, dict[str, Any]], title: str) -> None:
    goal, stretch = goal_bytes(summary)
    print(f"\n{title}")
    print(f"{'setting':24} {'seeds':>5} {'final acc %':>13} {'vs int8':>7} {'last-5 %':>8} "
          f"{'up B/dev/rnd':>12} {'f32/x':>6} {'down B/dev/rnd':>14} {'enc ms':>7} "
          f"{'fold MB/s':>9} {'upd/s':>7}  goal")
    for key, s in summary.items():
        acc = f"{100 * s['mean_final_accuracy']:.2f}+-{100 * s['stdev_final_accuracy']:.2f}"
        mark = "stretch" if s["meets_stretch"] else "yes" if s["meets_goal"] else ""
        up, down = s["uplink_bytes_per_device_round"], s["downlink_bytes_per_device_round"]
        print(f"{key:24} {len(s['seeds']):>5} {acc:>13} {s['points_vs_int8']:>+7.2f} "
              f"{100 * s['mean_last5_accuracy']:>8.2f} {up:>12,.0f} "
              f"{s['uplink_ratio_vs_float32']:>5.1f}x {down:>14,.0f} {s['encode_ms']:>7.2f} "
              f"{s['fold_mb_per_s']:>9.0f} {s['fold_updates_per_s']:>7.0f}  {mark}")
    print(f"goal: uplink <= {goal:,.0f} B (float32/{GOAL_DIVISOR}) at >= -{GOAL_POINTS} point "
          f"vs int8; stretch <= {stretch:,.0f} B (float32/{STRETCH_DIVISOR})")


def markdown_table(summary: dict[str, dict[str, Any]]) -> str:
    """The table as Markdown (docs/codecs.md, README)."""
    lines = [
        "| setting | seeds | final accuracy | vs int8 (points) | last-5 mean"
        " | uplink B/device/round | vs float32 | downlink B/device/round | device encode ms"
        " | decode+fold MB/s | updates/s | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        acc = f"{100 * s['mean_final_accuracy']:.2f} %"
        if len(s["seeds"]) > 1:
            acc += f" +- {100 * s['stdev_final_accuracy']:.2f}"
        mark = ("stretch" if s["meets_stretch"] else "yes" if s["meets_goal"] else "no")
        ref = " (reference)" if key == REFERENCE else ""
        lines.append(
            f"| `{key}`{ref} | {len(s['seeds'])} | {acc} | {s['points_vs_int8']:+.2f} | "
            f"{100 * s['mean_last5_accuracy']:.2f} % | {s['uplink_bytes_per_device_round']:,.0f} | "
            f"1/{s['uplink_ratio_vs_float32']:.1f} | {s['downlink_bytes_per_device_round']:,.0f} | "
            f"{s['encode_ms']:.2f} | {s['fold_mb_per_s']:,.0f} | {s['fold_updates_per_s']:,.0f} | "
            f"{mark} |"
        )
    return "\n".join(lines)


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The points no other point beats on both fewer bytes and higher accuracy, by bytes."""
    front: list[tuple[float, float, str]] = []
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y, name))
    return front


def plot_front(summary: dict[str, dict[str, Any]], runs: list[dict[str, Any]], rounds: int,
               path: Path, title: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    pts = []
    for key, s in summary.items():
        x = s["uplink_bytes_per_device_round"] / 1e3
        y = 100 * s["mean_final_accuracy"]
        seeds = [100 * r["final_accuracy"] for r in runs
                 if r["rounds"] == rounds and r["setting"] == s["setting"]
                 and r["downlink"] == s["downlink"]]
        ax.errorbar(x, y, yerr=[[y - min(seeds)], [max(seeds) - y]], fmt="o", capsize=3,
                    color="tab:green" if s["meets_goal"] else "tab:blue")
        ax.annotate(f"{key} ({len(seeds)})", (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
        pts.append((x, y, key))
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:orange",
            label="Pareto front (mean final accuracy)")
    goal, stretch = goal_bytes(summary)
    if REFERENCE in summary:
        ax.axhline(100 * summary[REFERENCE]["mean_final_accuracy"] - GOAL_POINTS, color="grey",
                   linestyle=":", label=f"int8 - {GOAL_POINTS:g} point")
    if math.isfinite(goal):
        ax.axvline(goal / 1e3, color="tab:red", linestyle=":", label="float32/16 (goal)")
        ax.axvline(stretch / 1e3, color="tab:purple", linestyle=":", label="float32/64 (stretch)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500]))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("uplink KB per device per round (whole update message, log scale)")
    ax.set_ylabel(f"final test accuracy after {rounds} rounds, % (bars: seed min-max)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timing(settings: list[str], models_dir: Path, base: FederationSpec, devices: int,
           seed: int = 0) -> dict[str, Any]:
    """Encode ms and decode+fold throughput of every setting on the same real deltas."""
    mid = max(1, base.rounds // 2)
    start = models_dir / f"{REFERENCE}-s{seed}-v{mid}.npz"
    alpha = float(base.partition.split(":", 1)[1])
    deltas, info = real_deltas(base.model, start if start.is_file() else None,
                               devices=devices, num_clients=base.agents, alpha=alpha,
                               seed=seed, lr=base.lr, epochs=base.epochs)
    print(f"timing on {devices} real deltas from {info['start']} "
          f"({info['parameters']:,} parameters)", flush=True)
    out: dict[str, dict[str, float]] = {}
    for setting in settings:
        codec, fraction = parse_setting(setting)
        out[setting] = time_codec(deltas, codec, topk_params(fraction))
        t = out[setting]
        print(f"  {setting:18} encode {t['encode_ms']:7.2f} ms  {t['payload_bytes']:>9,.0f} B  "
              f"decode+fold {t['fold_mb_per_s']:7.1f} MB/s {t['fold_updates_per_s']:7.0f} "
              f"updates/s", flush=True)
    return {"deltas": info, "machine": machine_info(("numpy", "msgpack", "ai-edge-litert")),
            "settings": out}


def load_report(path: Path) -> dict[str, Any]:
    if path.is_file():
        report: dict[str, Any] = json.loads(path.read_text())
        return report
    return {"benchmark": "compression_fmnist", "runs": []}


def write_report(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
