"""Durable device state: identity, submissions, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_agent.state import STATE_FILE, StateStore, atomic_write, default_device_id
from fedmq.errors import StateError
from fedmq.topics import validate_name


def test_new_state_gets_an_identity_that_survives_a_restart(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    validate_name(first.device_id, "device")
    first.record_submission(3, "abc")
    first.set_model_version(2)
    first.bump("updates_accepted")

    again = StateStore(tmp_path)
    assert again.device_id == first.device_id
    assert again.submitted_update(3) == "abc"
    assert again.has_submitted(3) and not again.has_submitted(4)
    assert again.model_version == 2
    assert again.counter("updates_accepted") == 1
    assert again.counter("updates_submitted") == 1
    assert again.last_submitted_round == 3


def test_configured_id_is_kept_and_a_different_one_is_refused(tmp_path: Path) -> None:
    assert StateStore(tmp_path, "dev-1").device_id == "dev-1"
    assert StateStore(tmp_path).device_id == "dev-1"
    with pytest.raises(StateError, match="belongs to device 'dev-1'"):
        StateStore(tmp_path, "dev-2")


def test_corrupt_state_is_a_readable_error(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        StateStore(tmp_path)
    (tmp_path / STATE_FILE).write_text(json.dumps({"format": 1, "device_id": "a/b"}))
    with pytest.raises(StateError):
        StateStore(tmp_path)


def test_atomic_write_leaves_old_content_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_store_write_failure_keeps_previous_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = StateStore(tmp_path, "dev")
    store.record_submission(1, "u1")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("ro fs")))
    with pytest.raises(StateError, match="cannot write"):
        store.record_submission(2, "u2")
    monkeypatch.undo()
    assert StateStore(tmp_path).submitted_update(2) is None
    assert StateStore(tmp_path).submitted_update(1) == "u1"


def test_default_device_id_is_a_valid_topic_level() -> None:
    a, b = default_device_id(), default_device_id()
    validate_name(a, "device")
    assert a != b
