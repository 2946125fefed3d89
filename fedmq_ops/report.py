"""``fedmq report``: a federation's history from an aggregator state directory.

    fedmq report STATE_DIR [--out fedmq-report.png] [--json] [--no-plot]

Reads the rounds the aggregator persisted (``aggregator.store``: per round status, resulting
model version, participants, examples, accuracy and loss of the evaluated model, bytes in and
out, seconds, rejected updates), prints a table (or JSON with ``--json``) and writes a PNG
with accuracy, loss and bytes per round (matplotlib, the ``plot`` extra). The state directory
is opened read-only, so a report can be made while the aggregator runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedmq.errors import ConfigError, StateError

__all__ = [
    "Report",
    "RoundRow",
    "add_parser",
    "format_table",
    "load_report",
    "plot_report",
    "report_json",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRow:
    """One round of the history (``None``: not known, e.g. an abandoned or open round)."""

    round_id: int
    status: str
    version: int | None
    participants: int
    num_examples: int
    accuracy: float | None
    loss: float | None
    bytes_in: int
    bytes_out: int | None
    seconds: float | None
    rejected: int = 0
    epsilon: float | None = None  # DP: central epsilon spent after this round (docs/privacy.md)


@dataclass(frozen=True)
class Report:
    state_dir: str
    fleet: str | None
    model_id: str | None
    initial: dict[str, float] = field(default_factory=dict)  # metrics of version 0
    rounds: tuple[RoundRow, ...] = ()

    @property
    def closed(self) -> tuple[RoundRow, ...]:
        return tuple(r for r in self.rounds if r.status == "closed")


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def load_report(state_dir: str | Path) -> Report:
    """The history of ``state_dir`` (read-only; works beside a running aggregator)."""
    from aggregator.store import Store  # the aggregator package: not on edge-only installs

    with Store(state_dir, read_only=True) as store:
        records = store.history()
        rejects = {r.round_id: sum(store.reject_counts(r.round_id).values()) for r in records}
        try:
            initial = {k: float(v) for k, v in store.model(0).metrics.items()}
        except StateError:  # no version 0 yet: nothing to show
            initial = {}
        fleet, model_id = store.get_meta("fleet"), store.get_meta("model_id")
    rows = []
    for r in records:
        m = r.metrics
        seconds = _num(m, "round_seconds")
        if seconds is None and r.closed is not None:
            seconds = max(0.0, r.closed - r.opened)
        bytes_out = _num(m, "bytes_out")
        rows.append(
            RoundRow(
                round_id=r.round_id, status=r.status, version=r.result_version,
                participants=r.participants, num_examples=r.num_examples,
                accuracy=_num(m, "accuracy"), loss=_num(m, "loss"), bytes_in=r.bytes_in,
                bytes_out=None if bytes_out is None else int(bytes_out), seconds=seconds,
                rejected=rejects.get(r.round_id, 0), epsilon=_num(m, "dp_epsilon"),
            )
        )
    return Report(str(state_dir), fleet, model_id, initial, tuple(rows))


def report_json(report: Report) -> dict[str, Any]:
    out = asdict(report)
    out["rounds"] = [asdict(r) for r in report.rounds]
    return out


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


_COLUMNS = (
    ("round", 5), ("status", 9), ("version", 7), ("devices", 7), ("examples", 8),
    ("accuracy", 8), ("loss", 8), ("bytes_in", 12), ("bytes_out", 12), ("seconds", 8),
    ("rejected", 8),
)


def format_table(report: Report) -> str:
    """A fixed-width table, one line per round (header first)."""
    lines = [
        f"state {report.state_dir}: fleet {report.fleet or '?'}, model {report.model_id or '?'}",
    ]
    if report.initial:
        lines.append(
            f"initial model: accuracy {_fmt(_num(report.initial, 'accuracy'), '.4f')}, "
            f"loss {_fmt(_num(report.initial, 'loss'), '.4f')}"
        )
    private = any(r.epsilon is not None for r in report.rounds)
    columns = _COLUMNS + ((("epsilon", 8),) if private else ())
    lines.append(" ".join(name.rjust(width) for name, width in columns))
    for r in report.rounds:
        cells: tuple[str, ...] = (
            str(r.round_id), r.status, _fmt(r.version, "d"), str(r.participants),
            str(r.num_examples), _fmt(r.accuracy, ".4f"), _fmt(r.loss, ".4f"),
            str(r.bytes_in), _fmt(r.bytes_out, "d"), _fmt(r.seconds, ".1f"), str(r.rejected),
        )
        if private:
            cells += (_fmt(r.epsilon, ".4f"),)
        lines.append(" ".join(c.rjust(w) for c, (_, w) in zip(cells, columns, strict=True)))
    closed = report.closed
    lines.append(
        f"{len(report.rounds)} round(s), {len(closed)} closed; "
        f"bytes in {sum(r.bytes_in for r in report.rounds)}, "
        f"out {sum(r.bytes_out or 0 for r in report.rounds)}"
    )
    return "\n".join(lines)


def plot_report(report: Report, path: str | Path) -> Path:
    """Write a PNG: accuracy, loss and bytes in/out per closed round (round 0 = initial);
    with DP, the epsilon spent on the accuracy panel's right axis."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ConfigError("the report plot needs matplotlib: pip install 'fedmq[plot]'") from exc
    path = Path(path)
    closed = report.closed
    rounds = [r.round_id for r in closed]
    fig, (ax_acc, ax_loss, ax_bytes) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    try:
        for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
            xs = [0] if _num(report.initial, key) is not None else []
            ys = [_num(report.initial, key)] if xs else []
            for r in closed:
                value = getattr(r, key)
                if value is not None:
                    xs.append(r.round_id)
                    ys.append(value)
            ax.plot(xs, ys, marker="o", markersize=3)
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        eps = [(r.round_id, r.epsilon) for r in closed if r.epsilon is not None]
        if eps:  # DP: the privacy spent, on the accuracy panel's right axis
            ax_eps = ax_acc.twinx()
            ax_eps.plot([x for x, _ in eps], [e for _, e in eps], color="tab:red",
                        marker="s", markersize=3, label="DP epsilon")
            ax_eps.set_ylabel("DP epsilon", color="tab:red")
            ax_eps.legend(loc="lower right", fontsize="small")
        width = 0.4
        ax_bytes.bar([x - width / 2 for x in rounds], [r.bytes_in for r in closed], width,
                     label="in (updates)")
        ax_bytes.bar([x + width / 2 for x in rounds], [r.bytes_out or 0 for r in closed],
                     width, label="out (model, round, acks)")
        ax_bytes.set_ylabel("bytes")
        ax_bytes.set_xlabel("round")
        ax_bytes.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_bytes.legend(loc="best", fontsize="small")
        ax_bytes.grid(True, axis="y", alpha=0.3)
        fig.suptitle(f"fedmq fleet {report.fleet or '?'}: {len(closed)} closed round(s)")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    log.info("wrote %s", path)
    return path


def _command(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir)
    if not (state_dir / "state.db").is_file():
        raise ConfigError(f"{state_dir} is not an aggregator state directory (no state.db)")
    report = load_report(state_dir)
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print(format_table(report))
    if not args.no_plot:
        out = Path(args.out) if args.out else Path("fedmq-report.png")
        plot_report(report, out)
        if not args.json:
            print(f"plot: {out}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``fedmq report``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "report",
        help="table and plot of a federation's rounds from an aggregator state directory",
        description="Print per-round accuracy, loss, participants, bytes and seconds from an "
        "aggregator state directory (read-only; the aggregator may be running) and write a "
        "PNG of accuracy, loss and bytes per round.",
    )
    p.add_argument("state_dir", help="the aggregator's state directory (its state_dir)")
    p.add_argument("-o", "--out", help="PNG path (default: ./fedmq-report.png)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.set_defaults(func=_command)
    return p
