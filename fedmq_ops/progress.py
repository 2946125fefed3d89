"""Showing a federation's progress: a line per round, totals, and a PNG of the curve."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["format_bytes", "plot_curve", "print_header", "print_row", "print_summary"]


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def print_header(out: TextIO) -> None:
    print(
        f"{'round':>5} {'devices':>7} {'accuracy':>9} {'loss':>7} {'up':>9} {'down':>9} "
        f"{'round s':>8} {'elapsed':>8} {'fed acc':>8}",
        file=out,
        flush=True,
    )


def print_row(row: Any, out: TextIO) -> None:
    print(
        f"{row.round_id:>5} {row.participants:>7} {row.accuracy * 100:>8.2f}% {row.loss:>7.3f} "
        f"{format_bytes(row.bytes_in):>9} {format_bytes(row.bytes_delivered):>9} "
        f"{row.seconds:>8.1f} {row.wall:>7.1f}s {_percent(getattr(row, 'fed_accuracy', None)):>8}",
        file=out,
        flush=True,
    )


def _percent(value: float | None) -> str:
    """A federated accuracy as a percentage, "-" when the devices reported none."""
    if value is None or value != value:  # nan: no federated evaluation this round
        return "-"
    return f"{value * 100:.2f}%"


def print_summary(result: Any, out: TextIO) -> None:
    rows = result.rows
    up = sum(r.bytes_in for r in rows)
    down = sum(r.bytes_delivered for r in rows)
    print(
        f"final test accuracy {result.final_accuracy * 100:.2f}% after {len(rows)} rounds; "
        f"{result.wall_seconds:.1f}s wall; uploaded {format_bytes(up)}, "
        f"downloaded {format_bytes(down)} (broker: {result.broker})",
        file=out,
        flush=True,
    )
    rss = getattr(result, "agent_peak_rss_mb", {})
    if rss:
        print(
            f"agent peak RSS: max {max(rss.values()):.0f} MB, "
            f"mean {sum(rss.values()) / len(rss):.0f} MB over {len(rss)} agents",
            file=out,
            flush=True,
        )


def plot_curve(rows: Sequence[Any], path: Path, title: str, reference: float | None = None) -> Path:
    """Accuracy per round (and cumulative upload) as a PNG; needs matplotlib (plot extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    rounds = [r.round_id for r in rows]
    ax.plot(rounds, [r.accuracy * 100 for r in rows], marker="o", ms=3, label="global model")
    if reference is not None:
        ax.axhline(
            reference * 100,
            ls="--",
            c="gray",
            label=f"centralized reference {reference * 100:.1f}%",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 70), fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    cum, total = [], 0
    for r in rows:
        total += r.bytes_in
        cum.append(total / 1e6)
    ax2.plot(rounds, cum, c="tab:orange", alpha=0.6, label="uploaded (MB, cumulative)")
    ax2.set_ylabel("uploaded MB (cumulative)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
