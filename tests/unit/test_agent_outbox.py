"""The on-disk outbox: durable puts, removal, crash leftovers, the older file format."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from edge_agent.outbox import CodecState, Outbox


def test_put_pending_remove_survive_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    box.put(2, "u2", b"payload-2")
    box.put(1, "u1", b"payload-1")
    reopened = Outbox(tmp_path)
    assert [(e.round_id, e.update_id, e.payload) for e in reopened.pending()] == [
        (1, "u1", b"payload-1"),
        (2, "u2", b"payload-2"),
    ]
    assert len(reopened) == 2
    assert reopened.get("u2") is not None and reopened.get("nope") is None
    assert reopened.remove("u1") is True
    assert reopened.remove("u1") is False
    assert [e.update_id for e in Outbox(tmp_path).pending()] == ["u2"]


def test_failed_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = Outbox(tmp_path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(Exception, match="disk full"):
        box.put(1, "u1", b"x")
    monkeypatch.undo()
    assert box.pending() == [] and list(tmp_path.iterdir()) == []


def test_interrupted_write_and_corrupt_files_are_handled(tmp_path: Path) -> None:
    Outbox(tmp_path).put(1, "good", b"ok")
    (tmp_path / ".r000000000001-x.update.abc.tmp").write_bytes(b"half")  # crash mid-write
    (tmp_path / "r000000000001-bad.update").write_bytes(b"\xc1garbage")
    box = Outbox(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    assert [e.update_id for e in box.pending()] == ["good"]
    assert (tmp_path / "r000000000001-bad.update.corrupt").exists()


def test_update_ids_must_be_file_name_safe(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    with pytest.raises(ValueError):
        box.put(1, "../escape", b"x")
    assert box.remove("../escape") is False


def test_entries_of_the_first_format_still_load(tmp_path: Path) -> None:
    old = {"v": 1, "round": 4, "update_id": "u4", "written_at": 5.0, "payload": b"p"}
    (tmp_path / "r000000000004-u4.update").write_bytes(msgpack.packb(old, use_bin_type=True))
    box = Outbox(tmp_path)
    [entry] = box.pending()
    assert (entry.round_id, entry.epoch, entry.seq, entry.codec_state) == (4, "", 0, b"")
    assert box.codec_state == CodecState()
    assert box.put(5, "u5", b"q").seq == 1
