"""Federated evaluation through the real engine (no broker): the devices' reports become
the round records' fed_* figures, the gauges, `fedmq report`'s table and PNG and the
`fedmq status` line; an eval-only round is recorded (abandoned: the model is unchanged)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, resolve_bundle
from aggregator.store import Store
from fedmq.evaluation import EvalReport
from fedmq.wire import StatusMessage, UpdateMessage, encode
from fedmq_ops.fleet_status import federated_summary
from fedmq_ops.report import format_table, load_report, plot_report
from tests.fakes import exact_delta, make_update

T0 = 1_000.0

#: (round, device) -> (accuracy, count): accuracy rises round by round, devices differ.
REPORTS = {(r, i): (0.2 * r + 0.05 * i, 10 * (i + 1)) for r in (1, 2, 3) for i in range(3)}


def test_round_records_carry_the_federated_figures(tmp_path: Path) -> None:
    root = tmp_path / "state"
    cfg = AggregatorConfig(
        fleet="f", state_dir=root, eval_dataset="none", codec="float32", selection="any",
        clients_per_round=3, min_updates=3, round_timeout=10.0, abandon_after=5.0,
        max_update_bytes=64 * 1024,
    )
    engine = Engine(cfg, Store(root), resolve_bundle("digits-mlp"))
    now = T0
    engine.start(now)
    shapes = dict(engine.template)
    for r in (1, 2, 3):
        for i in range(3):
            acc, n = REPORTS[(r, i)]
            report = EvalReport(loss=1.0 / r, accuracy=acc, count=n,
                                personal_loss=0.5 / r, personal_accuracy=min(1.0, acc + 0.1))
            payload = make_update("f", r, r - 1, f"d{i}", exact_delta(shapes, i), 10,
                                  evaluation=report, steps=3)
            assert engine.handle_update(f"d{i}", payload, now).accepted
        now += 1.0
        engine.tick(now)  # target reached: the round closes
    # round 4: only an eval-only device reports; abandoned at its deadline, figures kept
    only = UpdateMessage("f", 4, 3, "watcher", "e4", 50, "float32", (),
                         evaluation=EvalReport(0.25, 0.9, 50))
    ack = engine.handle_update("watcher", encode(only), now)
    assert ack.accepted and "nothing folded" in ack.reason
    now += 20.0
    engine.tick(now)
    engine.store.close()

    report = load_report(root)
    rows = {r.round_id: r for r in report.rounds}
    for r in (1, 2, 3):
        counts = [REPORTS[(r, i)][1] for i in range(3)]
        accs = [REPORTS[(r, i)][0] for i in range(3)]
        want = sum(a * n for a, n in zip(accs, counts, strict=True)) / sum(counts)
        assert rows[r].status == "closed"
        assert rows[r].fed_accuracy == pytest.approx(want)
        assert (rows[r].fed_accuracy_min, rows[r].fed_accuracy_max) == pytest.approx(
            (min(accs), max(accs)))
        assert rows[r].fed_loss == pytest.approx(1.0 / r)
        assert rows[r].fed_version == r - 1 and rows[r].fed_devices == 3
        assert rows[r].accuracy is None  # eval_dataset = "none": no server figure at all
    curve = [rows[r].fed_accuracy for r in (1, 2, 3)]
    assert curve == sorted(curve)  # the learning curve without a server test set
    assert rows[4].status == "abandoned" and rows[4].version is None
    assert (rows[4].fed_accuracy, rows[4].fed_version, rows[4].fed_devices) == (0.9, 3.0, 1)
    with Store(root, read_only=True) as store:
        assert store.current_model().version == 3  # type: ignore[union-attr]
        model_metrics = store.current_model().metrics  # type: ignore[union-attr]
    # the table, the PNG and the status line show them
    table = format_table(report)
    assert "fed_acc" in table and "fed_pers" in table and f"{curve[2]:.4f}" in table
    png = plot_report(report, tmp_path / "report.png")
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100
    line = federated_summary(model_metrics)
    assert line.startswith(f", federated accuracy {curve[2] * 100:.2f}% (3 device(s)")
    assert "of version 2" in line and "personalized" in line
    # the gauges hold the last round's figures (the eval-only round's)
    got = engine.metrics.value("fedmq_federated_accuracy", {"model": "global", "stat": "mean"})
    assert got == pytest.approx(0.9)
    assert engine.metrics.value("fedmq_federated_eval_examples") == 50.0


def _status(device: str, **caps: object) -> bytes:
    return encode(StatusMessage(fleet="f", device=device, state="online", capabilities=caps))


def test_eval_only_device_under_sampled_selection(tmp_path: Path) -> None:
    """selection = "sample": a device whose status says eval_only is never selected, its
    report is recorded once (a second one is a duplicate) without counting toward the
    quorum, and the round closes as soon as the selected trainers are in (not at its
    deadline); tensors from it are refused."""
    root = tmp_path / "state"
    cfg = AggregatorConfig(
        fleet="f", state_dir=root, eval_dataset="none", codec="float32", selection="sample",
        clients_per_round=2, min_updates=2, min_devices=2, round_timeout=100.0,
        abandon_after=5.0, max_update_bytes=64 * 1024, seed=7,
    )
    engine = Engine(cfg, Store(root), resolve_bundle("digits-mlp"))
    now = T0
    engine.start(now, tick=False)
    trainers = [f"d{i}" for i in range(4)]
    for d in trainers:
        engine.on_status(d, _status(d, codecs=["float32"]), now)
    engine.on_status("watcher", _status("watcher", codecs=["float32"], eval_only=True), now)
    shapes = dict(engine.template)
    for r in (1, 2, 3):
        engine.tick(now)
        state = engine.round
        assert state is not None and state.round_id == r
        assert len(state.plan.selected) == 2 and "watcher" not in state.plan.selected
        assert (state.plan.target, state.plan.min_updates) == (2, 2)
        report = EvalReport(loss=0.5, accuracy=0.1 * r, count=40)
        only = UpdateMessage("f", r, r - 1, "watcher", f"w{r}", 40, "float32", (),
                             evaluation=report, epoch=engine.epoch)
        ack = engine.handle_update("watcher", encode(only), now)
        assert (ack.accepted, ack.code) == (True, "ok") and "nothing folded" in ack.reason
        again = UpdateMessage("f", r, r - 1, "watcher", f"w{r}b", 40, "float32", (),
                              evaluation=EvalReport(0.9, 0.99, 40), epoch=engine.epoch)
        dup = engine.handle_update("watcher", encode(again), now)
        assert (dup.accepted, dup.code) == (True, "duplicate")
        assert engine.handle_update("watcher", encode(only), now).code == "duplicate"
        assert state.count == 0  # never toward the quorum
        engine.tick(now + 1.0)
        assert engine.round is state  # nothing from the trainers yet: still open
        for i, d in enumerate(state.plan.selected):
            payload = make_update("f", r, r - 1, d, exact_delta(shapes, i), 10,
                                  evaluation=EvalReport(0.4, 0.5, 10))
            assert engine.handle_update(d, payload, now).accepted
        now += 2.0  # far before the deadline (100 s)
        engine.tick(now)
        assert engine.round is not None and engine.round.round_id == r + 1  # next opened
        assert engine.version == r
    # tensors from a device whose status says eval_only are refused, clearly
    assert engine.round is not None
    r = engine.round.round_id
    ack = engine.handle_update(
        "watcher", make_update("f", r, r - 1, "watcher", exact_delta(shapes, 9), 10), now
    )
    assert (ack.accepted, ack.code) == (False, "not_selected") and "eval_only" in ack.reason
    assert engine.round.count == 0
    engine.store.close()
    with Store(root, read_only=True) as store:
        closed = [rec for rec in store.history() if rec.status == "closed"]
        assert [rec.round_id for rec in closed] == [1, 2, 3]
        for rec in closed:
            m = rec.metrics
            assert m["participants"] == 2.0 and m["round_seconds"] == 2.0
            assert m["fed_eval_devices"] == 3.0 and m["fed_eval_examples"] == 60.0
            want = (0.1 * rec.round_id * 40 + 0.5 * 20) / 60  # the first report, not the dup
            assert m["fed_accuracy"] == pytest.approx(want)


def test_eval_only_capability_is_strictly_a_bool(tmp_path: Path) -> None:
    """eval_only = 1 or "true" is not a bool: that status is taken as offline (one warning),
    so the device is neither selected nor taken as eval-only."""
    root = tmp_path / "state"
    cfg = AggregatorConfig(fleet="f", state_dir=root, eval_dataset="none", codec="float32")
    engine = Engine(cfg, Store(root), resolve_bundle("digits-mlp"))
    engine.start(T0, tick=False)
    engine.on_status("w", _status("w", eval_only=True), T0)
    assert engine.online == {"w"} and engine.coordinator.eval_only == {"w"}
    for bad in (1, "true"):
        engine.on_status("w", _status("w", eval_only=bad), T0)
        assert engine.online == set() and engine.coordinator.eval_only == set()
    engine.on_status("w", _status("w", eval_only=False), T0)
    assert engine.online == {"w"} and engine.coordinator.eval_only == set()
    engine.store.close()
