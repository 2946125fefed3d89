"""The aggregator's SQLite + model-file store, including SIGKILL crash safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.store import Store
from fedmq.errors import StateError, StorageFullError
from tests.smallfs import fill, small_tmpfs

ROOT = Path(__file__).resolve().parents[2]


def _w(value: float) -> dict[str, np.ndarray]:
    return {"a": np.full((3, 2), value, np.float32), "b": np.full(4, value, np.float32)}


def test_initial_model_rounds_journal_and_close(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        assert s.current_model() is None and s.open_round() is None and s.last_round_id() is None
        m0 = s.save_initial_model(_w(0.5), {"accuracy": 0.1}, 1.0)
        assert m0.version == 0 and m0.path.is_file()
        with pytest.raises(StateError):
            s.save_initial_model(_w(0.5), {}, 1.0)
        s.create_round(1, 0, {"k": 1}, 2.0)
        with pytest.raises(StateError):
            s.create_round(2, 0, {}, 2.0)  # one open round at a time
        s.append_update("u1", 1, "d1", 10, b"payload-1", 3.0)
        s.append_update("u2", 1, "d2", 30, b"payload-22", 3.5)
        with pytest.raises(StateError):
            s.append_update("u1", 1, "d3", 1, b"x", 4.0)
        assert [(e.update_id, e.payload) for e in s.journal(1)] == [
            ("u1", b"payload-1"), ("u2", b"payload-22")
        ]
        s.add_reject(1, "duplicate")
        s.add_reject(1, "duplicate")
        m1 = s.close_round(1, _w(1.5), {"accuracy": 0.9}, {"velocity/a": np.ones(2)}, 5.0)
        assert m1.version == 1 and m1.round_id == 1
        assert list(s.journal(1)) == [] and s.open_round() is None
        rec = s.round(1)
        assert (rec.status, rec.participants, rec.num_examples, rec.bytes_in) == (
            "closed", 2, 40, 19
        )
        assert rec.result_version == 1 and rec.metrics == {"accuracy": 0.9}
        assert s.contributions(1) == [("d1", "u1", 10, 9), ("d2", "u2", 30, 10)]
        assert s.reject_counts(1) == {"duplicate": 2}
        with pytest.raises(StateError):
            s.close_round(1, _w(2.0), {}, {}, 6.0)
        with pytest.raises(StateError):
            s.create_round(1, 1, {}, 6.0)  # ids never reused
        s.create_round(2, 1, {}, 6.0)
        s.append_update("u3", 2, "d1", 5, b"p", 7.0)
        s.abandon_round(2, 8.0)
        assert s.round(2).status == "abandoned" and list(s.journal(2)) == []
    with Store(tmp_path) as s:  # everything survives a reopen
        assert s.current_model() == m1
        np.testing.assert_array_equal(s.load_weights(1)["a"], _w(1.5)["a"])
        np.testing.assert_array_equal(s.server_state()["velocity/a"], np.ones(2))
        assert [r.status for r in s.history()] == ["closed", "abandoned"]
        assert s.closed_rounds() == 1 and s.last_round_id() == 2


def test_second_process_is_locked_out(tmp_path: Path) -> None:
    with Store(tmp_path), pytest.raises(StateError, match="in use"):
        Store(tmp_path)


def test_uncommitted_transaction_is_invisible_after_reopen(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.save_initial_model(_w(0.0), {}, 0.0)
    s.create_round(1, 0, {}, 0.0)
    db = s._db
    db.execute("BEGIN IMMEDIATE")
    db.execute(
        "INSERT INTO journal (update_id, round_id, device, num_examples, payload, received_at) "
        "VALUES ('lost', 1, 'd', 1, x'00', 0)"
    )
    db.execute("UPDATE rounds SET status = 'closed' WHERE id = 1")
    s.close()  # closed without COMMIT: as if the process died here
    with Store(tmp_path) as s2:
        assert list(s2.journal(1)) == []
        rec = s2.open_round()
        assert rec is not None and rec.round_id == 1


_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from aggregator.store import Store
    s = Store(sys.argv[1])
    if s.current_model() is None:
        s.save_initial_model({"w": np.zeros(20000, np.float32)}, {}, 0.0)
    print("ready", flush=True)
    n = 0
    while True:
        rec = s.open_round()
        if rec is None:
            rid = (s.last_round_id() or 0) + 1
            s.create_round(rid, s.current_model().version, {}, 0.0)
            rec = s.open_round()
        for i in range(3):
            uid = f"r{rec.round_id}-u{n}"
            n += 1
            s.append_update(uid, rec.round_id, f"d{n}", 1, b"x" * 1000, 0.0)
            print("acked", uid, flush=True)
        v = s.current_model().version + 1
        s.close_round(rec.round_id, {"w": np.full(20000, v, np.float32)}, {"v": v},
                      {"m": np.full(10, v, np.float32)}, 0.0)
        print("version", v, flush=True)
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_sigkill_at_any_point_leaves_consistent_state(tmp_path: Path, delay: float) -> None:
    state = tmp_path / "state"
    acked: set[str] = set()
    versions = 0
    for attempt in range(2):  # kill, restart on the same state, kill again
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(state)],
            stdout=subprocess.PIPE, cwd=ROOT, text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay + 0.2 * attempt)
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        for line in out.splitlines():
            kind, _, value = line.partition(" ")
            if kind == "acked":
                acked.add(value)
            elif kind == "version":
                versions = max(versions, int(value))
    with Store(state) as s:
        current = s.current_model()
        assert current is not None and current.version >= versions
        for v in range(current.version + 1):  # every committed version has its whole file
            w = s.load_weights(v)["w"]
            assert w.shape == (20000,) and np.all(w == v)
            assert s.model(v).metrics == ({"v": v} if v else {})
        if current.version:
            assert np.all(s.server_state()["m"] == current.version)
        journaled = {
            uid for r in s.history() for uid in
            ([e.update_id for e in s.journal(r.round_id)] if r.status == "open" else
             [c[1] for c in s.contributions(r.round_id)])
        }
        assert acked <= journaled, f"lost acknowledged updates: {sorted(acked - journaled)}"
        statuses = [r.status for r in s.history()]
        assert statuses.count("open") <= 1
        for r in s.history():
            if r.status == "closed":
                assert r.participants == len(s.contributions(r.round_id)) >= 3
                assert s.model(r.result_version or -1).round_id == r.round_id
        assert not list((state / "models").glob(".*.tmp"))
        json.dumps([r.plan for r in s.history()])


def test_full_database_raises_storage_full_and_keeps_nothing(tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count) rolls back cleanly and is a StorageFullError;
    the buffered reject counts of the failed transaction are kept for the next one."""
    with Store(tmp_path) as s:
        s.save_initial_model(_w(0.0), {}, 0.0)
        s.create_round(1, 0, {}, 0.0)
        pages = int(s._db.execute("PRAGMA page_count").fetchone()[0])
        s._db.execute(f"PRAGMA max_page_count = {pages}")
        s.add_reject(1, "malformed")
        with pytest.raises(StorageFullError, match=f"state directory {tmp_path} is full"):
            s.append_update("u1", 1, "d1", 3, b"x" * 200_000, 1.0)
        assert not s._db.in_transaction and list(s.journal(1)) == []
        assert s.folded_update("u1") is None
        s._db.execute("PRAGMA max_page_count = 1073741823")
        s.append_update("u1", 1, "d1", 3, b"x" * 200_000, 2.0)
        assert [e.update_id for e in s.journal(1)] == ["u1"]
        assert s.reject_counts(1) == {"malformed": 1}


def test_full_disk_at_close_keeps_the_round_open(tmp_path: Path) -> None:
    """A real full filesystem (tmpfs): the close fails with StorageFullError, the round stays
    open with its journal, no version is added; after freeing space the close works."""
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt, Store(mnt / "state") as s:
        s.save_initial_model(_w(0.0), {}, 0.0)
        s.create_round(1, 0, {}, 0.0)
        s.append_update("u1", 1, "d1", 3, b"p", 1.0)
        filler = fill(mnt)
        big = {"a": np.ones((256, 256), np.float32)}
        with pytest.raises(StorageFullError, match=f"state directory {mnt / 'state'} is full"):
            s.close_round(1, big, {}, {}, 2.0)
        assert s.open_round() is not None and s.current_model().version == 0  # type: ignore[union-attr]
        assert [e.update_id for e in s.journal(1)] == ["u1"]
        assert not list((mnt / "state" / "models").glob(".*.tmp"))
        filler.unlink()
        assert s.close_round(1, big, {}, {}, 3.0).version == 1
        assert s.contributions(1) == [("d1", "u1", 3, 1)]


def test_state_files_are_private(tmp_path: Path) -> None:
    """state.db and its -wal/-shm files and the model files hold raw updates: 0600, dir 0700."""
    old = os.umask(0o022)
    try:
        root = tmp_path / "state"
        with Store(root) as s:
            s.save_initial_model(_w(0.0), {}, 0.0)
            s.create_round(1, 0, {}, 0.0)
            s.append_update("u1", 1, "d1", 3, b"raw update", 1.0)
            s.close_round(1, _w(1.0), {}, {}, 2.0)
            names = ["state.db", "state.db-wal", "state.db-shm", "models/v0.npz", "models/v1.npz"]
            modes = {n: (root / n).stat().st_mode & 0o777 for n in names}
            assert modes == dict.fromkeys(names, 0o600)
            assert (root.stat().st_mode & 0o777, (root / "models").stat().st_mode & 0o777) == (
                0o700, 0o700
            )
        (root / "state.db").chmod(0o644)  # left by an older version: tightened on open
        with Store(root):
            assert (root / "state.db").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_folded_update_ids_are_found_in_any_round(tmp_path: Path) -> None:
    with Store(tmp_path) as s:
        s.save_initial_model(_w(0.0), {}, 0.0)
        s.create_round(1, 0, {}, 0.0)
        s.append_update("u1", 1, "d1", 3, b"p", 1.0)
        assert s.folded_update("u1") == (1, "d1")
        s.close_round(1, _w(1.0), {}, {}, 2.0)
        s.create_round(2, 1, {}, 3.0)
        s.append_update("u2", 2, "d1", 3, b"p", 4.0)
        assert (s.folded_update("u1"), s.folded_update("u2")) == ((1, "d1"), (2, "d1"))
        s.abandon_round(2, 5.0)
        assert s.folded_update("u2") is None and s.folded_update("nope") is None
