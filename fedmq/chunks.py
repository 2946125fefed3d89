"""Chunked transfer: payloads above a broker's message limit travel as content-addressed chunks.

A payload larger than ``max_message_bytes`` is split into :class:`~fedmq.wire.ChunkMessage`
chunks ``{v, type: "chunk", transfer, index, count, total_bytes, data}`` where ``transfer``
is the sha256 (hex) of the whole payload and the layout is fixed by
:func:`~fedmq.wire.chunk_layout`. :func:`publications` says where they go (docs/protocol.md,
"Chunked transfer"):

- a non-retained message (an update): every chunk on the message's own topic, in order;
- a retained message (the model): chunk ``i`` retained on ``<topic>/chunk/<i>`` and a
  :class:`~fedmq.wire.ChunkManifest` retained on ``<topic>`` itself, published last, so a
  device that subscribes later gets every chunk from the broker's retained store.

:class:`Reassembler` puts them back together with bounded memory: the per-transfer size
limit is checked from ``total_bytes`` before anything is stored, each sender has at most
``max_transfers_per_sender`` transfers in progress (a new one evicts its oldest), chunks
already held survive reconnects (QoS 1 duplicates are counted and ignored), transfers idle
for ``timeout`` seconds expire (counted), and the whole payload must hash to ``transfer``.
Where the chunks live is a :class:`ChunkStore`: :class:`MemoryChunkStore` (agents, tools) or
:class:`DirChunkStore` (the aggregator: every chunk written durably before its PUBACK, and
reloaded after a restart).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedmq.errors import RejectReason, WireError
from fedmq.fsutil import atomic_write
from fedmq.wire import (
    MAX_CHUNKS,
    ChunkManifest,
    ChunkMessage,
    Limits,
    chunk_layout,
    decode_chunk,
    encode,
)

__all__ = [
    "CHUNK_HEADROOM",
    "MIN_MESSAGE_BYTES",
    "ChunkStore",
    "DirChunkStore",
    "MemoryChunkStore",
    "Publication",
    "ReassemblyLimits",
    "Reassembler",
    "chunk_topic",
    "chunk_wildcard",
    "is_chunk",
    "is_manifest",
    "publications",
    "split",
    "transfer_id",
]

log = logging.getLogger(__name__)

#: Bytes of a chunk message besides its data (msgpack keys, the 64-digit transfer id, ints)
#: plus the MQTT fixed header, topic and properties of its PUBLISH packet: a chunk's data is
#: ``max_message_bytes - CHUNK_HEADROOM`` bytes, so its whole packet stays under the limit.
CHUNK_HEADROOM = 512
#: The smallest ``max_message_bytes`` that chunking accepts.
MIN_MESSAGE_BYTES = 1024

_PREFIX_PROBE = "0" * 64
_CHUNK_PREFIX = encode(ChunkMessage(_PREFIX_PROBE, 0, 1, 1, b"x")).split(b"chunk")[0] + b"chunk"
_MANIFEST_PREFIX = (
    encode(ChunkManifest(_PREFIX_PROBE, 1, 1)).split(b"manifest")[0] + b"manifest"
)
_TRANSFER_DIR = re.compile(r"^([0-9a-f]{64})-(\d{1,5})-(\d{1,13})$")
_INDEX_FILE = re.compile(r"^\d{1,5}$")


def transfer_id(payload: bytes) -> str:
    """The id of a transfer: the sha256 of the whole payload, in hex."""
    return hashlib.sha256(payload).hexdigest()


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk ``index`` of a retained message on ``topic`` is retained."""
    return f"{topic}/chunk/{index}"


def chunk_wildcard(topic: str) -> str:
    """The subscription for every retained chunk of ``topic``."""
    return f"{topic}/chunk/+"


def is_chunk(payload: bytes) -> bool:
    """Whether ``payload`` starts like an encoded chunk (a cheap test, no unpacking)."""
    return bytes(payload[: len(_CHUNK_PREFIX)]) == _CHUNK_PREFIX


def is_manifest(payload: bytes) -> bool:
    """Whether ``payload`` starts like an encoded manifest (a cheap test, no unpacking)."""
    return bytes(payload[: len(_MANIFEST_PREFIX)]) == _MANIFEST_PREFIX


def _check_max(max_message_bytes: int) -> None:
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(
            f"max_message_bytes must be at least {MIN_MESSAGE_BYTES}, got {max_message_bytes}"
        )


def split(payload: bytes, max_message_bytes: int) -> list[ChunkMessage]:
    """The chunks of ``payload``: each encodes (with its PUBLISH header) within
    ``max_message_bytes``."""
    _check_max(max_message_bytes)
    if not payload:
        raise ValueError("an empty payload has no chunks")
    per_chunk = max_message_bytes - CHUNK_HEADROOM
    count = math.ceil(len(payload) / per_chunk)
    if count > MAX_CHUNKS:
        raise ValueError(f"{len(payload)} bytes need more than {MAX_CHUNKS} chunks")
    size, _ = chunk_layout(len(payload), count)
    transfer = transfer_id(payload)
    return [
        ChunkMessage(transfer, i, count, len(payload), bytes(payload[i * size : (i + 1) * size]))
        for i in range(count)
    ]


@dataclass(frozen=True)
class Publication:
    """One MQTT publish (topic, payload, retain); QoS is the caller's."""

    topic: str
    payload: bytes
    retain: bool = False


def publications(
    topic: str, payload: bytes, retain: bool, max_message_bytes: int
) -> list[Publication]:
    """How to publish ``payload`` on ``topic`` under ``max_message_bytes`` (0 = no limit):
    as it is when it fits; else its chunks on ``topic`` (not retained) or on retained
    per-index topics followed by the retained manifest on ``topic``."""
    if max_message_bytes <= 0 or len(payload) + CHUNK_HEADROOM <= max_message_bytes:
        return [Publication(topic, payload, retain)]
    chunks = split(payload, max_message_bytes)
    if not retain:
        return [Publication(topic, encode(c), False) for c in chunks]
    first = chunks[0]
    manifest = ChunkManifest(first.transfer, first.count, first.total_bytes)
    return [Publication(chunk_topic(topic, c.index), encode(c), True) for c in chunks] + [
        Publication(topic, encode(manifest), True)
    ]


# ---------------------------------------------------------------------------- storage


class ChunkStore(Protocol):
    """Where the chunks of transfers in progress are held."""

    def put(self, sender: str, chunk: ChunkMessage) -> None: ...

    def read(self, sender: str, transfer: str, count: int) -> bytes: ...

    def drop(self, sender: str, transfer: str) -> None: ...

    def held(self) -> list[tuple[str, ChunkManifest, frozenset[int]]]:
        """What the store holds (sender, transfer header, indices): a restart reloads it."""
        ...


class MemoryChunkStore:
    """Chunks in memory (bounded by the reassembler's limits)."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, str], dict[int, bytes]] = {}

    def put(self, sender: str, chunk: ChunkMessage) -> None:
        self._data.setdefault((sender, chunk.transfer), {})[chunk.index] = chunk.data

    def read(self, sender: str, transfer: str, count: int) -> bytes:
        parts = self._data[(sender, transfer)]
        return b"".join(parts[i] for i in range(count))

    def drop(self, sender: str, transfer: str) -> None:
        self._data.pop((sender, transfer), None)

    def held(self) -> list[tuple[str, ChunkManifest, frozenset[int]]]:
        return []  # nothing survives the process


class DirChunkStore:
    """Chunks as files ``<root>/<sender>/<transfer>-<count>-<total_bytes>/<index>``, each
    written atomically and fsynced before :meth:`put` returns."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, sender: str, transfer: str, count: int, total: int) -> Path:
        return self.root / sender / f"{transfer}-{count}-{total}"

    def _find(self, sender: str, transfer: str) -> Path | None:
        base = self.root / sender
        if not base.is_dir():
            return None
        for d in base.glob(f"{transfer}-*"):
            return d
        return None

    def put(self, sender: str, chunk: ChunkMessage) -> None:
        d = self._dir(sender, chunk.transfer, chunk.count, chunk.total_bytes)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / str(chunk.index), chunk.data)

    def read(self, sender: str, transfer: str, count: int) -> bytes:
        d = self._find(sender, transfer)
        if d is None:
            raise FileNotFoundError(f"no chunks of transfer {transfer[:12]} from {sender}")
        return b"".join((d / str(i)).read_bytes() for i in range(count))

    def drop(self, sender: str, transfer: str) -> None:
        d = self._find(sender, transfer)
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    def held(self) -> list[tuple[str, ChunkManifest, frozenset[int]]]:
        out: list[tuple[str, ChunkManifest, frozenset[int]]] = []
        for sender_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for d in sorted(p for p in sender_dir.iterdir() if p.is_dir()):
                m = _TRANSFER_DIR.match(d.name)
                try:
                    if m is None:
                        raise WireError(f"not a transfer directory: {d.name}")
                    head = ChunkManifest(m.group(1), int(m.group(2)), int(m.group(3)))
                except WireError as exc:
                    log.warning("chunk store: removing %s: %s", d, exc.reason)
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                indices = frozenset(
                    int(f.name) for f in d.iterdir()
                    if _INDEX_FILE.match(f.name) and int(f.name) < head.count
                )
                out.append((sender_dir.name, head, indices))
        return out


# ---------------------------------------------------------------------------- reassembly


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds of a :class:`Reassembler`.

    ``max_transfer_bytes``: the largest payload a transfer may announce (checked from
    ``total_bytes`` before anything is stored); ``max_transfers_per_sender``: transfers in
    progress per sender; ``timeout``: seconds a transfer may go without a new chunk before it
    expires; ``remember_expired``: how many expired transfer ids are remembered so that a late
    chunk of one is refused (a transfer sent again from chunk 0 starts afresh).
    """

    max_transfer_bytes: int = Limits().max_bytes
    max_transfers_per_sender: int = 2
    timeout: float = 300.0
    remember_expired: int = 1024

    def __post_init__(self) -> None:
        if self.max_transfer_bytes < 1 or self.max_transfers_per_sender < 1:
            raise ValueError("max_transfer_bytes and max_transfers_per_sender must be >= 1")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"timeout must be > 0, got {self.timeout}")
        if self.remember_expired < 0:
            raise ValueError("remember_expired must be >= 0")


@dataclass
class _Transfer:
    head: ChunkManifest
    last_seen: float
    held: set[int] = field(default_factory=set)


@dataclass
class ReassemblyCounters:
    """What a reassembler has seen (metrics, status)."""

    chunks: int = 0
    duplicates: int = 0
    completed: int = 0
    expired: int = 0
    evicted: int = 0
    rejected: int = 0


class Reassembler:
    """Collects chunks per (sender, transfer) and returns each whole payload once.

    :meth:`feed` returns the payload when a chunk completes its transfer (else None) and
    raises :class:`WireError` with a reason for a bad chunk. The completed transfer's chunks
    stay in the store until :meth:`finish` (the caller journals the payload first).
    """

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        store: ChunkStore | None = None,
        now: float = 0.0,
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self.store: ChunkStore = store if store is not None else MemoryChunkStore()
        self.counters = ReassemblyCounters()
        self._transfers: dict[str, dict[str, _Transfer]] = {}
        self._expired: collections.OrderedDict[tuple[str, str], None] = (
            collections.OrderedDict()
        )
        for sender, head, indices in self.store.held():
            self._transfers.setdefault(sender, {})[head.transfer] = _Transfer(
                head, now, set(indices)
            )
        if self._transfers:
            log.info(
                "chunk store: resuming %d transfer(s) in progress",
                sum(len(t) for t in self._transfers.values()),
            )

    def in_progress(self) -> int:
        return sum(len(t) for t in self._transfers.values())

    def feed(self, sender: str, payload: bytes, now: float) -> bytes | None:
        """Decode and hold one chunk; the whole payload when it was the last one missing."""
        try:
            chunk = decode_chunk(payload, Limits(max_bytes=max(len(payload), 1)))
            return self._feed(sender, chunk, now)
        except WireError:
            self.counters.rejected += 1
            raise

    def _feed(self, sender: str, chunk: ChunkMessage, now: float) -> bytes | None:
        lim = self.limits
        if chunk.total_bytes > lim.max_transfer_bytes:
            raise WireError(
                f"transfer of {chunk.total_bytes} bytes exceeds the limit of "
                f"{lim.max_transfer_bytes}", RejectReason.TOO_LARGE,
            )
        transfers = self._transfers.setdefault(sender, {})
        current = transfers.get(chunk.transfer)
        head = ChunkManifest(chunk.transfer, chunk.count, chunk.total_bytes)
        if current is None:
            key = (sender, chunk.transfer)
            if key in self._expired:
                if chunk.index != 0:
                    raise WireError(
                        f"chunk {chunk.index} of transfer {chunk.transfer[:12]}, which expired",
                        RejectReason.BAD_CHUNK,
                    )
                del self._expired[key]  # sent again from the start
            while len(transfers) >= lim.max_transfers_per_sender:
                oldest = min(transfers, key=lambda t: transfers[t].last_seen)
                old = transfers.pop(oldest)
                self.store.drop(sender, oldest)
                self.counters.evicted += 1
                log.warning(
                    "chunks: %s started a new transfer, dropping its transfer %s (%d of %d "
                    "chunks held): at most %d at a time", sender, oldest[:12], len(old.held),
                    old.head.count, lim.max_transfers_per_sender,
                )
            current = transfers[chunk.transfer] = _Transfer(head, now)
        elif current.head != head:
            raise WireError(
                f"chunk {chunk.index} of transfer {chunk.transfer[:12]} says {chunk.count} "
                f"chunks of {chunk.total_bytes} bytes, its first chunk said "
                f"{current.head.count} of {current.head.total_bytes}", RejectReason.BAD_CHUNK,
            )
        current.last_seen = now
        self.counters.chunks += 1
        if chunk.index in current.held:
            self.counters.duplicates += 1
            if len(current.held) < chunk.count:
                return None
            # A complete transfer not yet finished (its payload's handling was interrupted,
            # e.g. a restart before the journal write): the redelivery hands it out again.
        else:
            self.store.put(sender, chunk)
            current.held.add(chunk.index)
            if len(current.held) < chunk.count:
                return None
        whole = self.store.read(sender, chunk.transfer, chunk.count)
        if transfer_id(whole) != chunk.transfer:
            self._forget(sender, chunk.transfer)
            raise WireError(
                f"reassembled {len(whole)} bytes hash to {transfer_id(whole)[:12]}, not to "
                f"transfer {chunk.transfer[:12]}", RejectReason.BAD_CHUNK,
            )
        self.counters.completed += 1
        return whole

    def finish(self, sender: str, transfer: str) -> None:
        """Drop a completed transfer's chunks (after its payload was handled)."""
        self._forget(sender, transfer)

    def _forget(self, sender: str, transfer: str) -> None:
        transfers = self._transfers.get(sender, {})
        transfers.pop(transfer, None)
        if not transfers:
            self._transfers.pop(sender, None)
        self.store.drop(sender, transfer)

    def expire(self, now: float) -> int:
        """Drop transfers that had no chunk for ``timeout`` seconds; how many."""
        n = 0
        for sender in list(self._transfers):
            for transfer, t in list(self._transfers[sender].items()):
                if now - t.last_seen < self.limits.timeout:
                    continue
                self._forget(sender, transfer)
                n += 1
                log.warning(
                    "chunks: transfer %s from %s expired with %d of %d chunks after %.0fs "
                    "without a new chunk", transfer[:12], sender, len(t.held), t.head.count,
                    now - t.last_seen,
                )
                if self.limits.remember_expired:
                    self._expired[(sender, transfer)] = None
                    while len(self._expired) > self.limits.remember_expired:
                        self._expired.popitem(last=False)
        self.counters.expired += n
        return n
