"""Codec state travels with its outbox entry: a crash at any point leaves the old state and
no entry, or the new entry and the new state, never a mix (raised errors and real SIGKILLs)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge_agent import outbox as outbox_module
from edge_agent.outbox import CODEC_STATE_FILE, CodecState, Outbox


class Crash(Exception):
    """Stands for the process dying at this point."""


def _seeded(path: Path) -> Outbox:
    box = Outbox(path)
    box.put(1, "u1", b"p1", epoch="e", codec_state=b"old")
    return box


def _view(path: Path) -> tuple[list[str], CodecState]:
    box = Outbox(path)
    return [e.update_id for e in box.pending()], box.codec_state


def test_codec_state_is_committed_with_its_entry_and_survives_reopen(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    assert box.codec_state == CodecState()
    entry = box.put(3, "u3", b"payload", epoch="e", codec_state=b"residual")
    assert (entry.seq, entry.codec_state, entry.epoch) == (1, b"residual", "e")
    assert box.codec_state == CodecState(1, "u3", b"residual")
    box.remove("u3")  # answered: the entry goes, the committed state stays
    assert _view(tmp_path) == ([], CodecState(1, "u3", b"residual"))


def test_crash_while_writing_the_entry_keeps_the_old_state_and_no_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    box = _seeded(tmp_path)
    real = outbox_module.atomic_write

    def dies_before_rename(path: Path, data: bytes, mode: int | None = None) -> None:
        if path.name.endswith(".update"):
            raise Crash
        real(path, data, mode)

    monkeypatch.setattr(outbox_module, "atomic_write", dies_before_rename)
    with pytest.raises(Crash):
        box.put(2, "u2", b"p2", epoch="e", codec_state=b"new")
    monkeypatch.undo()
    assert _view(tmp_path) == (["u1"], CodecState(1, "u1", b"old"))


def test_crash_between_entry_and_commit_rolls_the_new_state_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    box = _seeded(tmp_path)

    def dies(self: Outbox, state: CodecState) -> None:
        raise Crash

    monkeypatch.setattr(Outbox, "_commit_codec_state", dies)
    with pytest.raises(Crash):
        box.put(2, "u2", b"p2", epoch="e", codec_state=b"new")
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="edge_agent.outbox"):
        assert _view(tmp_path) == (["u1", "u2"], CodecState(2, "u2", b"new"))
    assert any("codec state of update u2 recovered" in r.getMessage() for r in caplog.records)
    # The next update numbers on from the recovered state.
    assert Outbox(tmp_path).put(3, "u3", b"p3", codec_state=b"newer").seq == 3


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from edge_agent import outbox as m
    box = m.Outbox(Path(sys.argv[1]))
    box.put(1, "u1", b"p1", epoch="e", codec_state=b"old")
    where = sys.argv[2]
    if where == "entry":  # killed inside the entry's atomic write, before its rename
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith(".update"):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
    else:  # killed after the entry is on disk, before the codec state is committed
        def commit(self, state):
            os.kill(os.getpid(), signal.SIGKILL)
        m.Outbox._commit_codec_state = commit
    box.put(2, "u2", b"p2", epoch="e", codec_state=b"new")
    """
)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("entry", (["u1"], CodecState(1, "u1", b"old"))),
        ("commit", (["u1", "u2"], CodecState(2, "u2", b"new"))),
    ],
)
def test_sigkill_at_each_point_leaves_old_or_new_never_a_mix(
    tmp_path: Path, where: str, expected: tuple[list[str], CodecState]
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path), where],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / CODEC_STATE_FILE).exists()
    assert _view(tmp_path) == expected
    assert not list(tmp_path.glob(".*.tmp"))  # an interrupted write's temp file is cleaned
