"""The agent's Prometheus textfile: valid exposition format (parsed back with
prometheus_client's parser and linted by promtool), escaped labels, atomic replacement,
readable by node_exporter, and a file system error is one warning, never a crash."""

from __future__ import annotations

import logging
import math
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.textfile import (
    AGENT_METRICS,
    TEXTFILE_MODE,
    check_textfile_path,
    render_textfile,
    write_textfile,
)
from fedmq.errors import ConfigError

LABELS = {"device": "pi-0001", "fleet": 'odd "fleet" \\ with\nnewline'}


def parse(text: str) -> dict[str, tuple[str, str, list[tuple[str, dict[str, str], float]]]]:
    """{family: (type, help, [(sample name, labels, value)])}."""
    return {
        f.name: (f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
        for f in text_string_to_metric_families(text)
    }


def test_every_catalogue_metric_round_trips_with_escaped_labels(tmp_path: Path) -> None:
    values = {name: float(i) + 0.25 for i, name in enumerate(sorted(AGENT_METRICS))}
    path = tmp_path / "fedmq_agent.prom"
    assert write_textfile(path, values, LABELS) is True

    got = parse(path.read_text())
    expected = {}
    for name, value in values.items():
        info = AGENT_METRICS[name]
        family = name.removesuffix("_total") if info.kind == "counter" else name
        expected[family] = (info.kind, info.help, [(name, LABELS, value)])
    assert got == expected
    # counters end in _total, gauges do not (what promtool's linter also checks below)
    for name, info in AGENT_METRICS.items():
        assert name.endswith("_total") == (info.kind == "counter"), name


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (apt-get install prometheus; make test does)")
def test_promtool_lints_the_textfile_clean(tmp_path: Path) -> None:
    path = tmp_path / "fedmq_agent.prom"
    write_textfile(path, {name: 1.0 for name in AGENT_METRICS}, LABELS)
    done = subprocess.run(["promtool", "check", "metrics"], input=path.read_bytes(),
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == b""


def test_special_values_and_no_labels() -> None:
    text = render_textfile(
        {"fedmq_agent_train_loss": math.nan, "fedmq_agent_train_seconds": math.inf,
         "fedmq_agent_last_round": 12},
        {},
    )
    assert "fedmq_agent_last_round 12.0\n" in text
    got = parse(text)
    assert math.isnan(got["fedmq_agent_train_loss"][2][0][2])
    assert got["fedmq_agent_train_seconds"][2] == [("fedmq_agent_train_seconds", {}, math.inf)]
    assert got["fedmq_agent_last_round"][2] == [("fedmq_agent_last_round", {}, 12.0)]


def test_replaces_the_file_readable_by_others_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "fedmq_agent.prom"
    write_textfile(path, {"fedmq_agent_last_round": 1, "fedmq_agent_train_loss": 0.5}, LABELS)
    assert write_textfile(path, {"fedmq_agent_last_round": 2}, LABELS)
    got = parse(path.read_text())
    assert list(got) == ["fedmq_agent_last_round"]
    assert got["fedmq_agent_last_round"][2][0][2] == 2.0
    assert stat.S_IMODE(path.stat().st_mode) == TEXTFILE_MODE == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fedmq_agent.prom"]


def test_bad_input_raises_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "fedmq_agent.prom"
    write_textfile(path, {"fedmq_agent_last_round": 1}, LABELS)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="unknown agent metric 'fedmq_agent_bogus'"):
        write_textfile(path, {"fedmq_agent_last_round": 2, "fedmq_agent_bogus": 1}, LABELS)
    with pytest.raises(ValueError, match="invalid label name '__name__'"):
        write_textfile(path, {"fedmq_agent_last_round": 2}, {"__name__": "x"})
    with pytest.raises(ValueError, match="invalid label name 'bad-label'"):
        write_textfile(path, {"fedmq_agent_last_round": 2}, {"bad-label": "x"})
    with pytest.raises(ValueError, match="value must be a number"):
        write_textfile(path, {"fedmq_agent_last_round": "2"}, LABELS)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="no metrics to write"):
        write_textfile(path, {}, LABELS)
    assert path.read_bytes() == before


@pytest.mark.parametrize("name", ["fedmq_agent.txt", "fedmq_agent", ".fedmq_agent.prom"])
def test_a_name_node_exporter_would_ignore_is_a_config_error(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match=r"must be named NAME\.prom"):
        check_textfile_path(tmp_path / name)
    with pytest.raises(ConfigError):
        write_textfile(tmp_path / name, {"fedmq_agent_last_round": 1}, LABELS)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_one_warning_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "absent" / "fedmq_agent.prom"
    with caplog.at_level(logging.DEBUG, logger="edge_agent.textfile"):
        assert write_textfile(path, {"fedmq_agent_last_round": 1}, LABELS) is False
    records = [r for r in caplog.records if r.name == "edge_agent.textfile"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", f"cannot write the metrics textfile {path}: No such file or directory")
    ]
    assert records[0].exc_info is None
    assert not path.parent.exists()
