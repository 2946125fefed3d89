"""``fedmq report``: table, JSON and PNG from a state directory the real engine wrote."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq_ops.cli import main
from fedmq_ops.report import format_table, load_report
from tests.fakes import exact_delta, make_update

T0 = 1_000.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Evaluator:
    """Deterministic 'evaluation': accuracy rises and loss falls with each call."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.calls += 1
        return {"accuracy": 0.1 * self.calls, "loss": 2.0 / self.calls}


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three closed rounds (2, 3, 2 devices), then one abandoned, one open; some rejects."""
    root = tmp_path_factory.mktemp("report") / "state"
    cfg = AggregatorConfig(
        fleet="f", state_dir=root, eval_dataset="none", codec="float32", selection="any",
        clients_per_round=3, min_updates=2, round_timeout=10.0, abandon_after=5.0,
        max_update_bytes=64 * 1024,
    )
    engine = Engine(cfg, Store(root), resolve_bundle("digits-mlp"), _Evaluator())
    now = T0
    engine.start(now)
    shapes = dict(engine.template)
    for round_id, devices in ((1, 2), (2, 3), (3, 2)):
        for i in range(devices):
            payload = make_update("f", round_id, round_id - 1, f"d{i}",
                                  exact_delta(shapes, i), 10 + i, "float32", f"u{round_id}-{i}")
            assert engine.handle_update(f"d{i}", payload, now + 1).accepted
        engine.handle_update("d0", b"garbage", now + 1)  # one reject per round
        now += 12.0  # past the deadline: close with what arrived
        engine.tick(now)
    now += 20.0
    engine.tick(now)  # round 4 had no update: abandoned; round 5 opens
    engine.store.close()
    return root


def test_report_matches_the_history(state_dir: Path) -> None:
    report = load_report(state_dir)
    with Store(state_dir, read_only=True) as store:
        history = store.history()
    assert [r.round_id for r in report.rounds] == [h.round_id for h in history] == [1, 2, 3, 4, 5]
    assert [r.status for r in report.rounds] == ["closed"] * 3 + ["abandoned", "open"]
    assert [r.participants for r in report.closed] == [2, 3, 2]
    assert [r.version for r in report.closed] == [1, 2, 3]
    assert [r.accuracy for r in report.closed] == pytest.approx([0.2, 0.3, 0.4])
    assert [r.loss for r in report.closed] == pytest.approx([1.0, 2 / 3, 0.5])
    assert report.initial["accuracy"] == pytest.approx(0.1)
    for row, h in zip(report.rounds, history, strict=True):
        assert row.bytes_in == h.bytes_in and row.num_examples == h.num_examples
    for row in report.closed:
        assert row.bytes_in > 2 * 19_000
        assert row.bytes_out is not None and row.bytes_out > 19_000  # the model at least
        assert row.seconds == pytest.approx(12.0)
        assert row.rejected == 1
    assert report.rounds[3].accuracy is None and report.rounds[3].version is None


def test_cli_prints_the_table_and_writes_a_png(
    state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "out" / "report.png"
    assert main(["-q", "report", str(state_dir), "--out", str(png)]) == 0
    table = capsys.readouterr().out
    assert table.startswith(format_table(load_report(state_dir)))
    data = png.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (800, 900)
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["round", "status"])
    rows = [line.split() for line in lines[header + 1: header + 6]]
    report = load_report(state_dir)
    for cells, r in zip(rows, report.rounds, strict=True):
        assert int(cells[0]) == r.round_id and cells[1] == r.status
        assert int(cells[3]) == r.participants and int(cells[7]) == r.bytes_in
        if r.accuracy is not None:
            assert float(cells[5]) == pytest.approx(r.accuracy, abs=1e-4)
        else:
            assert cells[5] == "-"


def test_cli_json(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "report", str(state_dir), "--json", "--no-plot"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fleet"] == "f"
    assert [r["participants"] for r in data["rounds"]] == [2, 3, 2, 0, 0]
    assert data["rounds"][0]["accuracy"] == pytest.approx(0.2)


def test_report_reads_beside_a_running_aggregator(state_dir: Path) -> None:
    with Store(state_dir):  # the aggregator holds the lock
        assert len(load_report(state_dir).rounds) == 5


def test_not_a_state_directory(tmp_path: Path) -> None:
    assert main(["-q", "report", str(tmp_path), "--no-plot"]) == 1
