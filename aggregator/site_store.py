"""A site gateway's local store (SQLite, one file): the round the cloud announced, the
site's claims and partial sum, and the journal (outbox) of sealed partials.

It gives :class:`~aggregator.shard_worker.ShardWorker` the same calls as the Redis
:class:`~aggregator.shard_store.ShardStore` (:class:`~aggregator.shard_store.IngestStore`), with
the same guarantees, each call one SQLite transaction (``BEGIN IMMEDIATE``, WAL,
``synchronous=FULL``: durable when it returns): :meth:`commit` claims (epoch, round, device)
and stores the partial together only while the round is open (the claim records the
:class:`~aggregator.shard_store.Fold`, as in Redis); :meth:`seal` closes the round
and writes the signed partial into the outbox together, so a gateway killed anywhere either
has not sealed (the round is still open and continues) or has the exact payload to re-send.
No Redis on a gateway: one process owns the file (the site aggregator).

The round row keeps the round's :class:`~aggregator.shard_store.RoundRules` (given to
:meth:`SiteStore.open` by the site aggregator: the cloud's announced training config and the
site's own fixed bounds, docs/scaling.md), so the site's worker checks each update exactly as
a cloud worker does. The site has no adaptive pool: :meth:`note_rejected_norm` only counts.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aggregator.shard_store import (
    Claim,
    CommitResult,
    Fold,
    OpenRound,
    RoundRules,
    parse_claim,
)
from fedmq.errors import StateError
from fedmq.topics import validate_name

__all__ = ["Outgoing", "SealedRound", "SiteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS round (
    id INTEGER PRIMARY KEY CHECK (id = 1), epoch TEXT NOT NULL, round_id INTEGER NOT NULL,
    base_version INTEGER NOT NULL, deadline REAL NOT NULL, target INTEGER NOT NULL,
    state TEXT NOT NULL, rules TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims (
    epoch TEXT NOT NULL, round_id INTEGER NOT NULL, device TEXT NOT NULL, claim TEXT NOT NULL,
    PRIMARY KEY (epoch, round_id, device));
CREATE TABLE IF NOT EXISTS partials (
    epoch TEXT NOT NULL, round_id INTEGER NOT NULL, worker TEXT NOT NULL, blob BLOB NOT NULL,
    PRIMARY KEY (epoch, round_id, worker));
CREATE TABLE IF NOT EXISTS workers (worker TEXT PRIMARY KEY, generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    epoch TEXT NOT NULL, round_id INTEGER NOT NULL, partial_id TEXT NOT NULL,
    devices INTEGER NOT NULL, payload BLOB NOT NULL, answer TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (epoch, round_id));
"""


@dataclass(frozen=True)
class SealedRound:
    """What :meth:`SiteStore.seal` hands the payload builder: the round's committed partial
    (the worker's ``FixedPointSum`` bytes) and its devices, sorted."""

    epoch: str
    round_id: int
    base_version: int
    partial: bytes
    devices: tuple[str, ...]


@dataclass(frozen=True)
class Outgoing:
    """A journaled partial: its payload until the cloud answers it."""

    epoch: str
    round_id: int
    partial_id: str
    devices: int
    payload: bytes


class SiteStore:
    """See the module docstring. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path, fleet: str) -> None:
        self.fleet = validate_name(fleet, "fleet")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {str(r[1]) for r in self._db.execute("PRAGMA table_info(round)")}
        except sqlite3.Error as exc:
            raise StateError(f"site store {self.path}: {exc}") from exc
        if "rules" not in columns:
            self._db.close()
            raise StateError(f"site store {self.path} is from before round rules: once its "
                             "journal is answered, move it away and start with a new file")
        self.rejected_norms = 0  # updates refused for their norm since start

    def _tx(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    out = fn(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return out
            except sqlite3.Error as exc:
                raise StateError(f"site store {self.path}: {exc}") from exc

    # -- the IngestStore calls (ShardWorker) -------------------------------------------------
    def open_round(self) -> OpenRound | None:
        def read(db: sqlite3.Connection) -> OpenRound | None:
            row = db.execute("SELECT epoch, round_id, base_version, deadline, target, state, "
                             "rules FROM round WHERE id = 1").fetchone()
            if row is None:
                return None
            return OpenRound(str(row[0]), int(row[1]), int(row[2]), float(row[3]), int(row[4]),
                             str(row[5]), RoundRules.from_json(str(row[6])))

        out = self._tx(read)
        assert out is None or isinstance(out, OpenRound)
        return out

    def partial(self, epoch: str, round_id: int, worker: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT blob FROM partials WHERE epoch = ? AND round_id = ? AND "
                             "worker = ?", (epoch, round_id, worker)).fetchone()
            return None if row is None else bytes(row[0])

        out = self._tx(read)
        assert out is None or isinstance(out, bytes)
        return out

    def register_worker(self, worker: str) -> int:
        def bump(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO workers VALUES (?, 1) ON CONFLICT(worker) DO UPDATE SET "
                       "generation = generation + 1", (worker,))
            row = db.execute("SELECT generation FROM workers WHERE worker = ?",
                             (worker,)).fetchone()
            return int(row[0])

        out = self._tx(bump)
        assert isinstance(out, int)
        return out

    def commit(
        self, epoch: str, round_id: int, worker: str, folds: Mapping[str, Fold],
        partial: bytes, generation: int,
    ) -> CommitResult:
        if not folds:
            raise ValueError("a commit holds at least one update")

        def commit(db: sqlite3.Connection) -> CommitResult:
            gen = db.execute("SELECT generation FROM workers WHERE worker = ?",
                             (worker,)).fetchone()
            if gen is None or gen[0] != generation:
                return CommitResult("fenced")
            st = db.execute("SELECT epoch, round_id, state FROM round WHERE id = 1").fetchone()
            if st is None or tuple(st) != (epoch, round_id, "open"):
                return CommitResult("closed")
            conflicts: dict[str, Claim] = {}
            for device in folds:
                prev = db.execute("SELECT claim FROM claims WHERE epoch = ? AND round_id = ? "
                                  "AND device = ?", (epoch, round_id, device)).fetchone()
                if prev is not None:
                    conflicts[device] = parse_claim(str(prev[0]))
            if conflicts:
                return CommitResult("claimed", conflicts=conflicts)
            db.executemany("INSERT INTO claims VALUES (?, ?, ?, ?)",
                           [(epoch, round_id, device, fold.to_claim())
                            for device, fold in folds.items()])
            db.execute("INSERT INTO partials VALUES (?, ?, ?, ?) ON CONFLICT(epoch, round_id, "
                       "worker) DO UPDATE SET blob = excluded.blob",
                       (epoch, round_id, worker, partial))
            return CommitResult("ok")

        out = self._tx(commit)
        assert isinstance(out, CommitResult)
        return out

    def note_rejected_norm(self, epoch: str, round_id: int, device: str, norm: float) -> None:
        """Counted only: the site's bounds are fixed (no pool to learn from), and the cloud's
        adaptive pool learns from its own workers' folds (docs/scaling.md)."""
        self.rejected_norms += 1

    # -- the gateway's round ------------------------------------------------------------------
    def claim_count(self, epoch: str, round_id: int) -> int:
        def count(db: sqlite3.Connection) -> int:
            return int(db.execute("SELECT COUNT(*) FROM claims WHERE epoch = ? AND round_id = ?",
                                  (epoch, round_id)).fetchone()[0])

        out = self._tx(count)
        assert isinstance(out, int)
        return out

    def open(self, epoch: str, round_id: int, base_version: int, deadline: float,
             target: int, rules: RoundRules) -> bool:
        """Make (epoch, round) the site's round, open, with ``rules`` (what the site's worker
        checks its updates against), unless it already is the site's round
        (open or sealed): True when it changed. The claims and partials of other rounds go,
        and so do journaled partials the cloud has answered."""
        def open_(db: sqlite3.Connection) -> bool:
            st = db.execute("SELECT epoch, round_id FROM round WHERE id = 1").fetchone()
            if st is not None and tuple(st) == (epoch, round_id):
                return False
            db.execute("INSERT INTO round VALUES (1, ?, ?, ?, ?, ?, 'open', ?) ON CONFLICT(id) "
                       "DO UPDATE SET epoch = excluded.epoch, round_id = excluded.round_id, "
                       "base_version = excluded.base_version, deadline = excluded.deadline, "
                       "target = excluded.target, state = 'open', rules = excluded.rules",
                       (epoch, round_id, base_version, deadline, target, rules.to_json()))
            db.execute("DELETE FROM claims WHERE NOT (epoch = ? AND round_id = ?)",
                       (epoch, round_id))
            db.execute("DELETE FROM partials WHERE NOT (epoch = ? AND round_id = ?)",
                       (epoch, round_id))
            db.execute("DELETE FROM outbox WHERE answer != ''")  # answered: never re-sent
            return True

        return bool(self._tx(open_))

    def seal(
        self, epoch: str, round_id: int, worker: str,
        build: Callable[[SealedRound], Outgoing],
    ) -> Outgoing | None:
        """Close (epoch, round) if it is the site's open round and journal ``build``'s payload
        of its partial in the same transaction. None: not open, or no device contributed
        (nothing to send)."""
        def seal(db: sqlite3.Connection) -> Outgoing | None:
            st = db.execute("SELECT base_version, state FROM round WHERE id = 1 AND epoch = ? "
                            "AND round_id = ?", (epoch, round_id)).fetchone()
            if st is None or st[1] != "open":
                return None
            db.execute("UPDATE round SET state = 'closed' WHERE id = 1")
            devices = tuple(str(r[0]) for r in db.execute(
                "SELECT device FROM claims WHERE epoch = ? AND round_id = ? ORDER BY device",
                (epoch, round_id)))
            row = db.execute("SELECT blob FROM partials WHERE epoch = ? AND round_id = ? AND "
                             "worker = ?", (epoch, round_id, worker)).fetchone()
            if not devices or row is None:
                return None
            out = build(SealedRound(epoch, round_id, int(st[0]), bytes(row[0]), devices))
            db.execute("INSERT INTO outbox (epoch, round_id, partial_id, devices, payload) "
                       "VALUES (?, ?, ?, ?, ?)",
                       (out.epoch, out.round_id, out.partial_id, out.devices, out.payload))
            return out

        out = self._tx(seal)
        assert out is None or isinstance(out, Outgoing)
        return out

    def pending(self) -> list[Outgoing]:
        """Journaled partials the cloud has not answered, oldest first."""
        def read(db: sqlite3.Connection) -> list[Outgoing]:
            rows = db.execute("SELECT epoch, round_id, partial_id, devices, payload FROM outbox "
                              "WHERE answer = '' ORDER BY round_id")
            return [Outgoing(str(e), int(r), str(p), int(n), bytes(b)) for e, r, p, n, b in rows]

        out = self._tx(read)
        assert isinstance(out, list)
        return out

    def answered(self, partial_id: str, code: str) -> bool:
        """Record the cloud's answer to a journaled partial (it is not re-sent any more);
        False when no unanswered partial has that id."""
        def mark(db: sqlite3.Connection) -> bool:
            cur = db.execute("UPDATE outbox SET answer = ? WHERE partial_id = ? AND answer = ''",
                             (code or "?", partial_id))
            return cur.rowcount > 0

        return bool(self._tx(mark))

    def close_connection(self) -> None:
        with self._lock:
            self._db.close()
