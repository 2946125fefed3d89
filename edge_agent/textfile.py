"""The agent's metrics as a Prometheus textfile (node_exporter's textfile collector).

Devices rarely expose a port, so the agent writes ``NAME.prom`` into the directory that
node_exporter's ``--collector.textfile.directory`` reads, replacing it atomically (the
collector never sees a half-written file: the temporary file starts with a dot and ends in
``.tmp``, which it ignores). Text exposition format 0.0.4; no prometheus_client on the device.

The metrics an agent may write are listed in :data:`AGENT_METRICS` (name, type, help): one
catalogue for the code and docs/monitoring.md.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import ConfigError
from fedmq.fsutil import atomic_write

__all__ = [
    "AGENT_METRICS",
    "TEXTFILE_MODE",
    "TEXTFILE_SUFFIX",
    "AgentMetric",
    "check_textfile_path",
    "render_textfile",
    "write_textfile",
]

log = logging.getLogger(__name__)

#: node_exporter's textfile collector reads only files with this suffix.
TEXTFILE_SUFFIX = ".prom"
#: node_exporter runs as its own user: the file must be readable by it.
TEXTFILE_MODE = 0o644

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_KINDS = ("gauge", "counter")


@dataclass(frozen=True)
class AgentMetric:
    """One metric an agent writes: its Prometheus type and HELP text."""

    kind: str
    help: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"metric kind must be one of {_KINDS}, got {self.kind!r}")
        if not self.help.strip():
            raise ValueError("metric help must not be empty")


AGENT_METRICS: Mapping[str, AgentMetric] = {
    "fedmq_agent_last_round": AgentMetric("gauge", "Id of the last round this device trained"),
    "fedmq_agent_last_round_timestamp_seconds": AgentMetric(
        "gauge", "Unix time this device finished its last round's update"
    ),
    "fedmq_agent_model_version": AgentMetric(
        "gauge", "Global model version this device holds"
    ),
    "fedmq_agent_train_loss": AgentMetric("gauge", "Training loss of the last round"),
    "fedmq_agent_train_seconds": AgentMetric("gauge", "Training time of the last round"),
    "fedmq_agent_train_examples": AgentMetric(
        "gauge", "Examples trained on in the last round"
    ),
    "fedmq_agent_update_bytes": AgentMetric("gauge", "Size of the last update payload"),
    "fedmq_agent_peak_rss_bytes": AgentMetric(
        "gauge", "Peak resident memory of the agent process"
    ),
    "fedmq_agent_outbox_pending": AgentMetric(
        "gauge", "Updates written to the outbox and not yet acknowledged"
    ),
    "fedmq_agent_updates_accepted_total": AgentMetric(
        "counter", "Updates the aggregator accepted"
    ),
    "fedmq_agent_updates_rejected_total": AgentMetric(
        "counter", "Updates the aggregator rejected (duplicates not counted)"
    ),
    "fedmq_agent_updates_resent_total": AgentMetric(
        "counter", "Updates sent again after no ack came"
    ),
    "fedmq_agent_train_failures_total": AgentMetric("counter", "Rounds whose training failed"),
}


def check_textfile_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if node_exporter would read it; :class:`ConfigError` if not."""
    p = Path(path)
    if p.suffix != TEXTFILE_SUFFIX or p.name.startswith("."):
        raise ConfigError(
            f"metrics textfile {str(path)!r} must be named NAME{TEXTFILE_SUFFIX} "
            f"(node_exporter's textfile collector reads only those)"
        )
    return p


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_textfile(metrics: Mapping[str, float], labels: Mapping[str, str]) -> str:
    """The exposition text: for each metric (sorted) its HELP, TYPE and one sample carrying
    ``labels``. :class:`ValueError` names the first metric or label that is not allowed."""
    if not metrics:
        raise ValueError("no metrics to write")
    for label in labels:
        if not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ValueError(f"invalid label name {label!r}")
    selector = ",".join(f'{k}="{_escape_label_value(str(v))}"' for k, v in sorted(labels.items()))
    lines: list[str] = []
    for name in sorted(metrics):
        info = AGENT_METRICS.get(name)
        if info is None:
            raise ValueError(
                f"unknown agent metric {name!r}: add it to edge_agent.textfile.AGENT_METRICS "
                f"(known: {', '.join(sorted(AGENT_METRICS))})"
            )
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"metric {name}: value must be a number, got {value!r}")
        lines.append(f"# HELP {name} {_escape_help(info.help)}")
        lines.append(f"# TYPE {name} {info.kind}")
        sample = f"{name}{{{selector}}}" if selector else name
        lines.append(f"{sample} {_format_value(float(value))}")
    return "\n".join(lines) + "\n"


def write_textfile(
    path: str | Path, metrics: Mapping[str, float], labels: Mapping[str, str]
) -> bool:
    """Replace ``path`` (``NAME.prom``) atomically with ``metrics``, each sample carrying
    ``labels`` (e.g. device and fleet), world-readable for node_exporter.

    True when written. A file system error (directory missing, disk full, no permission)
    is logged as one warning and gives False: metrics never stop the agent. Bad names or
    values are the caller's bug: :class:`ValueError` (:class:`ConfigError` for the path).
    """
    p = check_textfile_path(path)
    data = render_textfile(metrics, labels).encode()
    try:
        atomic_write(p, data, mode=TEXTFILE_MODE)
    except OSError as exc:
        log.warning("cannot write the metrics textfile %s: %s", p, exc.strerror or exc)
        return False
    return True
