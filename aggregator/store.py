"""Durable aggregator state: SQLite (WAL, synchronous=FULL) + model files in a directory.

Layout of ``state_dir``::

    state.db          models, rounds, the journal of accepted updates, rejects, strategy state
    models/v{N}.npz   global weights of version N (written atomically: tmp + fsync + rename)

Crash safety (SIGKILL at any point): a model file is complete before the transaction that
names it commits, and a version exists only once that transaction committed; an accepted
update is committed (fsynced) to the journal before the caller acknowledges it. Orphan model
files from an interrupted close are overwritten when the round closes again.

A full filesystem (ENOSPC from a model file, SQLITE_FULL from SQLite) raises
:class:`~fedmq.errors.StorageFullError` after the transaction rolled back: nothing of the
failed operation is stored and the caller may retry it once space is freed. The directory
is 0700 and ``state.db`` (so its -wal/-shm/-journal files, which SQLite creates with the
database's mode) and the model files are 0600: the journal holds raw device updates.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedmq.errors import StateError, StorageFullError
from fedmq.fsutil import atomic_write

__all__ = ["JournalEntry", "RoundRecord", "Store", "StoredModel"]

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    round_id INTEGER,
    path TEXT NOT NULL,
    metrics TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    id INTEGER PRIMARY KEY,
    base_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed', 'abandoned')),
    plan TEXT NOT NULL,
    opened REAL NOT NULL,
    closed REAL,
    participants INTEGER NOT NULL DEFAULT 0,
    num_examples INTEGER NOT NULL DEFAULT 0,
    bytes_in INTEGER NOT NULL DEFAULT 0,
    result_version INTEGER,
    metrics TEXT
);
CREATE TABLE IF NOT EXISTS journal (
    update_id TEXT PRIMARY KEY,
    round_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    payload BLOB NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_round ON journal (round_id);
CREATE TABLE IF NOT EXISTS contributions (
    round_id INTEGER NOT NULL,
    device TEXT NOT NULL,
    update_id TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (round_id, device)
);
CREATE INDEX IF NOT EXISTS contributions_update ON contributions (update_id);
CREATE TABLE IF NOT EXISTS rejects (
    round_id INTEGER NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (round_id, code)
);
CREATE TABLE IF NOT EXISTS server_state (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    version INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


@dataclass(frozen=True)
class StoredModel:
    version: int
    round_id: int | None
    path: Path
    metrics: dict[str, float]
    created: float


@dataclass(frozen=True)
class RoundRecord:
    round_id: int
    base_version: int
    status: str
    plan: dict[str, Any]
    opened: float
    closed: float | None
    participants: int
    num_examples: int
    bytes_in: int
    result_version: int | None
    metrics: dict[str, float]


@dataclass(frozen=True)
class JournalEntry:
    update_id: str
    round_id: int
    device: str
    num_examples: int
    payload: bytes
    received_at: float
    weight: float | None = None  # the fold weight used; None (older journals) = num_examples
    scale: float = 1.0  # the norm clip's factor on the decoded delta (NULL/older: 1.0)


def _add_journal_weight(db: sqlite3.Connection) -> None:
    """Journals written before fold weights were capped lack the column: add it (NULL)."""
    columns = {str(row[1]) for row in db.execute("PRAGMA table_info(journal)")}
    if "weight" not in columns:
        db.execute("ALTER TABLE journal ADD COLUMN weight REAL")
    if "scale" not in columns:  # journals written before the norm clip (aggregator.bounds)
        db.execute("ALTER TABLE journal ADD COLUMN scale REAL")


_FILE_MODE = 0o600
_DIR_MODE = 0o700
_DB_FILES = ("state.db", "state.db-wal", "state.db-shm", "state.db-journal")
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _is_full(err: BaseException) -> bool:
    """True for "no space left" from the OS or SQLite (SQLITE_FULL, also as extended code)."""
    if isinstance(err, OSError):
        return err.errno in _FULL_ERRNOS
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF == sqlite3.SQLITE_FULL


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def _npz_load(data: bytes | Path) -> dict[str, np.ndarray]:
    src: Any = io.BytesIO(data) if isinstance(data, bytes) else data
    with np.load(src, allow_pickle=False) as npz:
        return {k: np.array(npz[k]) for k in npz.files}


class Store:
    """The aggregator's state directory. One process at a time (an advisory lock is taken).

    ``read_only=True`` opens an existing state directory for reading without the lock (a
    report on the state of a running aggregator): SQLite's WAL gives a consistent snapshot
    per query, and any write raises :class:`StateError`.
    """

    def __init__(self, state_dir: str | os.PathLike[str], read_only: bool = False) -> None:
        self.root = Path(state_dir)
        self.models_dir = self.root / "models"
        self.read_only = read_only
        self._reject_buf: dict[tuple[int, str], int] = {}
        self._rejects_in_tx: dict[tuple[int, str], int] = {}
        self._lock: BinaryIO | None = None
        if read_only:
            self._db = self._connect_read_only()
            return
        try:
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self.models_dir.mkdir(mode=_DIR_MODE, exist_ok=True)
            self._private_db_files()
            self._lock = open(self.root / "lock", "a+b")  # noqa: SIM115 - held while open
        except OSError as exc:
            raise StateError(f"cannot open state directory {self.root}: {exc}") from exc
        try:
            fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            raise StateError(f"state directory {self.root} is in use by another process") from exc
        try:
            self._db = sqlite3.connect(
                self.root / "state.db", isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            _add_journal_weight(self._db)
        except (OSError, sqlite3.Error) as exc:
            self._lock.close()
            raise StateError(f"cannot open state database in {self.root}: {exc}") from exc
        for tmp in self.models_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _private_db_files(self) -> None:
        """Create ``state.db`` 0600 before SQLite opens it (SQLite gives its -wal, -shm and
        -journal files the database's mode); tighten files an older version left 0644."""
        os.close(os.open(self.root / "state.db", os.O_CREAT | os.O_RDWR, _FILE_MODE))
        for name in _DB_FILES:
            path = self.root / name
            if path.exists() and path.stat().st_mode & 0o777 != _FILE_MODE:
                os.chmod(path, _FILE_MODE)

    def _connect_read_only(self) -> sqlite3.Connection:
        path = self.root / "state.db"
        if not path.is_file():
            raise StateError(f"{self.root} holds no aggregator state (no state.db)")
        try:
            db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                check_same_thread=False,
            )
            db.execute("SELECT COUNT(*) FROM rounds").fetchone()
        except sqlite3.Error as exc:
            raise StateError(f"cannot read the state database in {self.root}: {exc}") from exc
        return db

    def close(self) -> None:
        if not self.read_only:
            try:
                self._flush_rejects()
            except StateError as exc:
                log.warning("reject counts not saved: %s", exc)
        self._db.close()
        if self._lock is not None:
            self._lock.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        self._rejects_in_tx = {}
        return _Transaction(self._db, str(self.root), self._write_rejects, self._unwrite_rejects)

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return self._db.execute(sql, args).fetchone()

    # -- meta ------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- models ----------------------------------------------------------------------------
    def _model(self, row: Any) -> StoredModel:
        return StoredModel(
            version=int(row[0]),
            round_id=None if row[1] is None else int(row[1]),
            path=self.root / str(row[2]),
            metrics=json.loads(row[3]),
            created=float(row[4]),
        )

    def current_model(self) -> StoredModel | None:
        row = self._one(
            "SELECT version, round_id, path, metrics, created FROM models "
            "ORDER BY version DESC LIMIT 1"
        )
        return None if row is None else self._model(row)

    def model(self, version: int) -> StoredModel:
        row = self._one(
            "SELECT version, round_id, path, metrics, created FROM models WHERE version = ?",
            (version,),
        )
        if row is None:
            raise StateError(f"model version {version} is not in {self.root}")
        return self._model(row)

    def load_weights(self, version: int) -> dict[str, np.ndarray]:
        m = self.model(version)
        try:
            return {k: v.astype(np.float32, copy=False) for k, v in _npz_load(m.path).items()}
        except (OSError, ValueError) as exc:
            raise StateError(f"model file {m.path} is unreadable: {exc}") from exc

    def _write_model_file(self, version: int, weights: Mapping[str, np.ndarray]) -> str:
        rel = f"models/v{version}.npz"
        try:
            atomic_write(self.root / rel, _npz_bytes(weights), mode=_FILE_MODE)
        except OSError as exc:
            if _is_full(exc):
                raise StorageFullError(
                    str(self.root), f"model file {rel} not written: {exc}"
                ) from exc
            raise StateError(f"cannot write model file {self.root / rel}: {exc}") from exc
        return rel

    def save_initial_model(
        self, weights: Mapping[str, np.ndarray], metrics: Mapping[str, float], now: float
    ) -> StoredModel:
        """Version 0 (only when there is no model yet)."""
        if self.current_model() is not None:
            raise StateError(f"{self.root} already holds a model")
        rel = self._write_model_file(0, weights)
        with self._tx() as db:
            db.execute(
                "INSERT INTO models (version, round_id, path, metrics, created) "
                "VALUES (0, NULL, ?, ?, ?)",
                (rel, json.dumps(dict(metrics)), now),
            )
        return self.model(0)

    # -- rounds ----------------------------------------------------------------------------
    def _round(self, row: Any) -> RoundRecord:
        return RoundRecord(
            round_id=int(row[0]),
            base_version=int(row[1]),
            status=str(row[2]),
            plan=json.loads(row[3]),
            opened=float(row[4]),
            closed=None if row[5] is None else float(row[5]),
            participants=int(row[6]),
            num_examples=int(row[7]),
            bytes_in=int(row[8]),
            result_version=None if row[9] is None else int(row[9]),
            metrics=json.loads(row[10]) if row[10] else {},
        )

    _ROUND_COLS = (
        "id, base_version, status, plan, opened, closed, participants, num_examples, "
        "bytes_in, result_version, metrics"
    )

    def open_round(self) -> RoundRecord | None:
        rows = self._db.execute(
            f"SELECT {self._ROUND_COLS} FROM rounds WHERE status = 'open' ORDER BY id"
        ).fetchall()
        if len(rows) > 1:
            raise StateError(f"{self.root} has {len(rows)} open rounds")
        return self._round(rows[0]) if rows else None

    def last_round_id(self) -> int | None:
        row = self._one("SELECT MAX(id) FROM rounds")
        return None if row is None or row[0] is None else int(row[0])

    def closed_rounds(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM rounds WHERE status = 'closed'")[0])

    def create_round(
        self, round_id: int, base_version: int, plan: Mapping[str, Any], now: float
    ) -> None:
        with self._tx() as db:
            if db.execute("SELECT 1 FROM rounds WHERE status = 'open'").fetchone():
                raise StateError("a round is already open")
            last = db.execute("SELECT MAX(id) FROM rounds").fetchone()[0]
            if last is not None and round_id <= last:
                raise StateError(f"round id {round_id} is not above the last round {last}")
            db.execute(
                "INSERT INTO rounds (id, base_version, status, plan, opened) "
                "VALUES (?, ?, 'open', ?, ?)",
                (round_id, base_version, json.dumps(dict(plan)), now),
            )

    def abandon_round(
        self, round_id: int, now: float, metrics: Mapping[str, float] | None = None
    ) -> None:
        """Mark the open round abandoned (``metrics``: what it still measured, e.g. the
        devices' federated evaluation of an eval-only round; None = none)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE rounds SET status = 'abandoned', closed = ?, "
                "participants = (SELECT COUNT(*) FROM journal WHERE round_id = ?), "
                "metrics = ? WHERE id = ? AND status = 'open'",
                (now, round_id, json.dumps(dict(metrics)) if metrics else None, round_id),
            )
            if cur.rowcount != 1:
                raise StateError(f"round {round_id} is not open")
            db.execute("DELETE FROM journal WHERE round_id = ?", (round_id,))

    def close_round(
        self,
        round_id: int,
        weights: Mapping[str, np.ndarray],
        metrics: Mapping[str, float],
        server_state: Mapping[str, np.ndarray],
        now: float,
    ) -> StoredModel:
        """Publish the next version from round ``round_id`` in one transaction.

        The model file is written (atomically) first; then the version row, the round's
        closing and its statistics, the server state and dropping the journal commit together.
        """
        current = self.current_model()
        if current is None:
            raise StateError("no model to build on")
        version = current.version + 1
        rel = self._write_model_file(version, weights)
        state_blob = _npz_bytes(server_state)
        with self._tx() as db:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(num_examples), 0), "
                "COALESCE(SUM(LENGTH(payload)), 0) FROM journal WHERE round_id = ?",
                (round_id,),
            ).fetchone()
            participants, examples, bytes_in = int(row[0]), int(row[1]), int(row[2])
            cur = db.execute(
                "UPDATE rounds SET status = 'closed', closed = ?, participants = ?, "
                "num_examples = ?, bytes_in = ?, result_version = ?, metrics = ? "
                "WHERE id = ? AND status = 'open'",
                (now, participants, examples, bytes_in, version, json.dumps(dict(metrics)),
                 round_id),
            )
            if cur.rowcount != 1:
                raise StateError(f"round {round_id} is not open")
            db.execute(
                "INSERT INTO models (version, round_id, path, metrics, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (version, round_id, rel, json.dumps(dict(metrics)), now),
            )
            db.execute(
                "INSERT INTO contributions (round_id, device, update_id, num_examples, bytes) "
                "SELECT round_id, device, update_id, num_examples, LENGTH(payload) "
                "FROM journal WHERE round_id = ?",
                (round_id,),
            )
            db.execute("DELETE FROM journal WHERE round_id = ?", (round_id,))
            db.execute(
                "INSERT OR REPLACE INTO server_state (id, version, data) VALUES (0, ?, ?)",
                (version, state_blob),
            )
        return self.model(version)

    def round(self, round_id: int) -> RoundRecord:
        row = self._one(f"SELECT {self._ROUND_COLS} FROM rounds WHERE id = ?", (round_id,))
        if row is None:
            raise StateError(f"round {round_id} is not in {self.root}")
        return self._round(row)

    def history(self) -> list[RoundRecord]:
        """Every round, oldest first (status, participants, bytes, metrics)."""
        rows = self._db.execute(f"SELECT {self._ROUND_COLS} FROM rounds ORDER BY id").fetchall()
        return [self._round(r) for r in rows]

    def contributions(self, round_id: int) -> list[tuple[str, str, int, int]]:
        """(device, update_id, num_examples, bytes) of a closed round."""
        rows = self._db.execute(
            "SELECT device, update_id, num_examples, bytes FROM contributions "
            "WHERE round_id = ? ORDER BY device",
            (round_id,),
        ).fetchall()
        return [(str(a), str(b), int(c), int(d)) for a, b, c, d in rows]

    # -- journal ---------------------------------------------------------------------------
    def append_update(
        self,
        update_id: str,
        round_id: int,
        device: str,
        num_examples: int,
        payload: bytes,
        now: float,
        weight: float | None = None,
        scale: float = 1.0,
    ) -> None:
        """Journal an accepted update; returns once it is durable (committed, fsynced).

        ``weight`` is the fold weight actually used when it differs from ``num_examples``
        (a capped claim), and ``scale`` the norm clip's factor on its delta (the adaptive
        bound moves, so it is stored, not recomputed), so that a restart re-folds identically.
        """
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO journal (update_id, round_id, device, num_examples, payload, "
                    "received_at, weight, scale) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (update_id, round_id, device, num_examples, bytes(payload), now, weight,
                     None if scale == 1.0 else scale),
                )
        except sqlite3.IntegrityError as exc:
            raise StateError(f"update {update_id!r} is already journaled") from exc

    def journal(self, round_id: int) -> Iterator[JournalEntry]:
        """The journaled updates of a round in arrival order (one at a time)."""
        ids = self._db.execute(
            "SELECT update_id FROM journal WHERE round_id = ? ORDER BY rowid", (round_id,)
        ).fetchall()
        for (update_id,) in ids:
            row = self._one(
                "SELECT update_id, round_id, device, num_examples, payload, received_at, weight, "
                "scale FROM journal WHERE update_id = ?",
                (update_id,),
            )
            if row is not None:
                yield JournalEntry(
                    str(row[0]), int(row[1]), str(row[2]), int(row[3]), bytes(row[4]),
                    float(row[5]), None if row[6] is None else float(row[6]),
                    1.0 if row[7] is None else float(row[7]),
                )

    def folded_update(self, update_id: str) -> tuple[int, str] | None:
        """(round, device) an update id was folded in: the open round's journal or the
        contributions of a closed round (abandoned rounds' updates are not kept)."""
        row = self._one("SELECT round_id, device FROM journal WHERE update_id = ?", (update_id,))
        if row is None:
            row = self._one(
                "SELECT round_id, device FROM contributions WHERE update_id = ? "
                "ORDER BY round_id LIMIT 1",
                (update_id,),
            )
        return None if row is None else (int(row[0]), str(row[1]))

    # -- rejects and server state ----------------------------------------------------------
    def add_reject(self, round_id: int, code: str) -> None:
        """Count a reject. Buffered: written with the next transaction (no fsync of its own,
        so a flood of garbage cannot turn into a flood of fsyncs)."""
        key = (round_id, code)
        self._reject_buf[key] = self._reject_buf.get(key, 0) + 1

    def _write_rejects(self, db: sqlite3.Connection) -> None:
        buf, self._reject_buf = self._reject_buf, {}
        self._rejects_in_tx = dict(buf)
        for (round_id, code), n in buf.items():
            db.execute(
                "INSERT INTO rejects (round_id, code, count) VALUES (?, ?, ?) "
                "ON CONFLICT (round_id, code) DO UPDATE SET count = count + excluded.count",
                (round_id, code, n),
            )

    def _unwrite_rejects(self) -> None:
        """The transaction that carried the buffered rejects rolled back: buffer them again."""
        buf, self._rejects_in_tx = self._rejects_in_tx, {}
        for key, n in buf.items():
            self._reject_buf[key] = self._reject_buf.get(key, 0) + n

    def _flush_rejects(self) -> None:
        if self._reject_buf:
            with self._tx():
                pass

    def reject_counts(self, round_id: int | None = None) -> dict[str, int]:
        self._flush_rejects()
        if round_id is None:
            rows = self._db.execute("SELECT code, SUM(count) FROM rejects GROUP BY code")
        else:
            rows = self._db.execute(
                "SELECT code, count FROM rejects WHERE round_id = ?", (round_id,)
            )
        return {str(c): int(n) for c, n in rows.fetchall()}

    def server_state(self) -> dict[str, np.ndarray]:
        row = self._one("SELECT data FROM server_state WHERE id = 0")
        return {} if row is None else _npz_load(bytes(row[0]))


def _nothing() -> None:
    return None


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error).

    Every sqlite error becomes a :class:`StateError` (:class:`StorageFullError` when the disk
    is full), also when SQLite already rolled the transaction back itself (as it does on a
    failed COMMIT): then there is nothing left to roll back and no second error.
    """

    def __init__(
        self,
        db: sqlite3.Connection,
        root: str,
        before_commit: Callable[[sqlite3.Connection], None],
        on_rollback: Callable[[], None],
    ) -> None:
        self._db = db
        self._root = root
        self._before_commit = before_commit
        self._on_rollback = on_rollback

    def __enter__(self) -> sqlite3.Connection:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error("cannot start a transaction", exc) from exc
        return self._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._before_commit(self._db)
                self._db.execute("COMMIT")
                self._on_rollback = _nothing  # committed: nothing to undo
                return
            except sqlite3.Error as err:
                self._rollback()
                raise self._error("commit failed", err) from err
        self._rollback()
        if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
            raise self._error("state database error", exc) from exc

    def _rollback(self) -> None:
        self._on_rollback()
        self._on_rollback = _nothing
        if not self._db.in_transaction:
            return  # SQLite rolled back already (e.g. SQLITE_FULL at COMMIT)
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as err:
            log.warning("rollback in %s failed: %s", self._root, err)

    def _error(self, what: str, err: sqlite3.Error) -> StateError:
        if _is_full(err):
            return StorageFullError(self._root, f"{what}: {err}")
        return StateError(f"{what}: {err}")
