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
    # Federated evaluation (docs/strategies.md): the devices' held-out figures of the model
    # version ``fed_version`` (the round's base), example-weighted, with the spread.
    fed_accuracy: float | None = None
    fed_accuracy_min: float | None = None
    fed_accuracy_max: float | None = None
    fed_loss: float | None = None
    fed_personal_accuracy: float | None = None
    fed_version: float | None = None
    fed_devices: int = 0


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
                fed_accuracy=_num(m, "fed_accuracy"),
                fed_accuracy_min=_num(m, "fed_accuracy_min"),
                fed_accuracy_max=_num(m, "fed_accuracy_max"), fed_loss=_num(m, "fed_loss"),
                fed_personal_accuracy=_num(m, "fed_personal_accuracy"),
                fed_version=_num(m, "fed_eval_version"),
                fed_devices=int(_num(m, "fed_eval_devices") or 0),
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


#: Federated evaluation columns (shown when a round has them): weighted accuracy, its min and
#: max across devices, weighted loss, devices reporting; fed_pers: personalized accuracy.
_FED_COLUMNS = (("fed_acc", 8), ("fed_min", 8), ("fed_max", 8), ("fed_loss", 8),
                ("fed_devs", 8))


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
    federated = any(r.fed_accuracy is not None for r in report.rounds)
    personal = any(r.fed_personal_accuracy is not None for r in report.rounds)
    columns = _COLUMNS + ((("epsilon", 8),) if private else ())
    columns += _FED_COLUMNS if federated else ()
    columns += (("fed_pers", 8),) if personal else ()
    lines.append(" ".join(name.rjust(width) for name, width in columns))
    for r in report.rounds:
        cells: tuple[str, ...] = (
            str(r.round_id), r.status, _fmt(r.version, "d"), str(r.participants),
            str(r.num_examples), _fmt(r.accuracy, ".4f"), _fmt(r.loss, ".4f"),
            str(r.bytes_in), _fmt(r.bytes_out, "d"), _fmt(r.seconds, ".1f"), str(r.rejected),
        )
        if private:
            cells += (_fmt(r.epsilon, ".4f"),)
        if federated:
            cells += (_fmt(r.fed_accuracy, ".4f"), _fmt(r.fed_accuracy_min, ".4f"),
                      _fmt(r.fed_accuracy_max, ".4f"), _fmt(r.fed_loss, ".4f"),
                      str(r.fed_devices))
        if personal:
            cells += (_fmt(r.fed_personal_accuracy, ".4f"),)
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
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=f"server {label}")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        _plot_federated(report, ax_acc, ax_loss)
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


def _plot_federated(report: Report, ax_acc: Any, ax_loss: Any) -> None:
    """The devices' held-out figures (federated evaluation), drawn at the round that made
    the evaluated model (its version; the curve the server would draw with a test set),
    with the min-max band across devices and the personalized accuracy."""
    rows = sorted(
        (r for r in report.rounds if r.fed_accuracy is not None),
        key=lambda r: (r.fed_version if r.fed_version is not None else r.round_id - 1),
    )
    if not rows:
        return
    xs = [r.fed_version if r.fed_version is not None else r.round_id - 1 for r in rows]
    ax_acc.plot(xs, [r.fed_accuracy for r in rows], marker="^", markersize=3,
                color="tab:green", label="federated (devices' held-out)")
    lo = [r.fed_accuracy_min if r.fed_accuracy_min is not None else r.fed_accuracy
          for r in rows]
    hi = [r.fed_accuracy_max if r.fed_accuracy_max is not None else r.fed_accuracy
          for r in rows]
    ax_acc.fill_between(xs, lo, hi, color="tab:green", alpha=0.15, label="min-max of devices")
    pers = [(x, r.fed_personal_accuracy) for x, r in zip(xs, rows, strict=True)
            if r.fed_personal_accuracy is not None]
    if pers:
        ax_acc.plot([x for x, _ in pers], [a for _, a in pers], marker="v", markersize=3,
                    color="tab:purple", label="personalized (after local training)")
    ax_acc.legend(loc="lower right", fontsize="small")
    losses = [(x, r.fed_loss) for x, r in zip(xs, rows, strict=True) if r.fed_loss is not None]
    ax_loss.plot([x for x, _ in losses], [v for _, v in losses], marker="^", markersize=3,
                 color="tab:green", label="federated")
    ax_loss.legend(loc="upper right", fontsize="small")


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
