"""Chunked transfer (fedmq.chunks): split, wire format, bounded and resumable reassembly."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgpack
import pytest

from fedmq.chunks import (
    CHUNK_HEADROOM,
    DirChunkStore,
    MemoryChunkStore,
    Reassembler,
    ReassemblyLimits,
    chunk_topic,
    is_chunk,
    is_manifest,
    publications,
    split,
)
from fedmq.errors import RejectReason, WireError
from fedmq.wire import ChunkMessage, decode_chunk, decode_manifest, encode

PAYLOAD = bytes(random.Random(7).getrandbits(8) for _ in range(10_000))
TRANSFER = hashlib.sha256(PAYLOAD).hexdigest()


def _chunks(payload: bytes = PAYLOAD, limit: int = 2048) -> list[bytes]:
    return [encode(c) for c in split(payload, limit)]


def test_split_fits_the_limit_and_reassembles_in_any_order_once() -> None:
    limit = 2048
    stream = _chunks(limit=limit)
    assert len(stream) == 7  # ceil(10000 / (2048 - 512))
    topic = "fl/some-fleet/update/device-0123456789"
    assert all(len(c) + len(topic) + 32 <= limit for c in stream)
    assert all(is_chunk(c) and not is_manifest(c) for c in stream)
    order = list(reversed(stream)) + stream[:3]  # and QoS 1 redeliveries within the transfer
    asm = Reassembler()
    out = [asm.feed("dev", c, 0.0) for c in order[: len(stream)]]
    assert out[:-1] == [None] * (len(stream) - 1) and out[-1] == PAYLOAD
    asm.finish("dev", TRANSFER)
    assert asm.in_progress() == 0
    assert asm.counters.completed == 1 and asm.counters.duplicates == 0


def test_duplicates_before_completion_are_counted_and_harmless() -> None:
    stream = _chunks()
    asm = Reassembler()
    for c in stream[:-1] + stream[:-1]:
        assert asm.feed("dev", c, 0.0) is None
    assert asm.feed("dev", stream[-1], 0.0) == PAYLOAD
    assert asm.counters.duplicates == len(stream) - 1


def test_publications_small_payload_unchanged_and_retained_model_in_indexed_chunks() -> None:
    assert [(p.topic, p.payload, p.retain) for p in publications("t/m", b"abc", True, 2048)] == [
        ("t/m", b"abc", True)
    ]
    assert len(publications("t/m", PAYLOAD, True, 0)) == 1  # 0 = never chunk
    pubs = publications("t/m", PAYLOAD, True, 2048)
    assert [p.topic for p in pubs] == [chunk_topic("t/m", i) for i in range(7)] + ["t/m"]
    assert all(p.retain for p in pubs)
    manifest = decode_manifest(pubs[-1].payload)  # the manifest goes last
    assert (manifest.transfer, manifest.count, manifest.total_bytes) == (TRANSFER, 7, 10_000)
    updates = publications("t/u/dev", PAYLOAD, False, 2048)
    assert {p.topic for p in updates} == {"t/u/dev"} and not any(p.retain for p in updates)
    assert [decode_chunk(p.payload).index for p in updates] == list(range(7))


def _chunk_map(**change: object) -> bytes:
    c = split(PAYLOAD, 2048)[1]
    m = {"v": 2, "type": "chunk", "transfer": c.transfer, "index": c.index, "count": c.count,
         "total_bytes": c.total_bytes, "data": c.data}
    m.update(change)
    out = msgpack.packb(m, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"index": 7}, "outside [0, 7)"),
        ({"count": 3}, "must hold 3334 bytes"),
        ({"total_bytes": 10_100}, "must hold 1443 bytes"),
        ({"data": b"x" * 100}, "got 100"),
        ({"transfer": "ab" * 31}, "sha256"),
        ({"count": 0}, "outside"),
        ({"total_bytes": 3, "count": 7}, "cannot be split"),
    ],
)
def test_bad_chunks_are_refused_with_a_reason(change: dict[str, object], words: str) -> None:
    asm = Reassembler()
    with pytest.raises(WireError) as err:
        asm.feed("dev", _chunk_map(**change), 0.0)
    assert words in err.value.reason
    assert asm.counters.rejected == 1 and asm.in_progress() == 0


class _CountingStore(MemoryChunkStore):
    def __init__(self) -> None:
        super().__init__()
        self.puts = 0

    def put(self, sender: str, chunk: ChunkMessage) -> None:
        self.puts += 1
        super().put(sender, chunk)


def test_oversize_transfer_is_refused_before_anything_is_stored() -> None:
    store = _CountingStore()
    asm = Reassembler(ReassemblyLimits(max_transfer_bytes=9_999), store)
    with pytest.raises(WireError) as err:
        asm.feed("dev", _chunks()[0], 0.0)
    assert err.value.code == RejectReason.TOO_LARGE
    assert "10000 bytes exceeds the limit of 9999" in err.value.reason
    assert store.puts == 0


def test_header_disagreeing_with_the_first_chunk_is_refused() -> None:
    asm = Reassembler()
    asm.feed("dev", _chunks()[0], 0.0)
    other = ChunkMessage(TRANSFER, 1, 2, 20, bytes(10))  # same id, another layout
    with pytest.raises(WireError, match="its first chunk said 7 of 10000"):
        asm.feed("dev", encode(other), 0.0)


def test_hash_mismatch_is_refused_and_forgotten() -> None:
    forged = [ChunkMessage("f" * 64, i, 2, 4, b"ab" if i == 0 else b"cd") for i in range(2)]
    asm = Reassembler()
    assert asm.feed("dev", encode(forged[0]), 0.0) is None
    with pytest.raises(WireError) as err:
        asm.feed("dev", encode(forged[1]), 0.0)
    assert err.value.code == RejectReason.BAD_CHUNK and "not to transfer ffffffffffff" in str(
        err.value
    )
    assert asm.in_progress() == 0


def test_a_sender_holds_at_most_n_transfers_the_oldest_is_evicted() -> None:
    asm = Reassembler(ReassemblyLimits(max_transfers_per_sender=2))
    streams = [_chunks(bytes([k]) * 5000) for k in range(3)]
    for t, stream in enumerate(streams):
        asm.feed("dev", stream[0], float(t))
    asm.feed("other", streams[0][0], 0.0)  # another sender's transfers are its own
    assert asm.in_progress() == 3 and asm.counters.evicted == 1
    for c in streams[0][1:]:  # the evicted one starts over and cannot complete
        assert asm.feed("dev", c, 5.0) is None
    assert asm.feed("other", streams[0][1], 5.0) is None
    assert [asm.feed("other", c, 5.0) for c in streams[0][2:]][-1] == bytes([0]) * 5000


def test_incomplete_transfers_expire_are_counted_and_late_chunks_are_refused() -> None:
    stream = _chunks()
    asm = Reassembler(ReassemblyLimits(timeout=60.0))
    asm.feed("dev", stream[0], 0.0)
    asm.feed("dev", stream[1], 30.0)
    assert asm.expire(89.0) == 0
    assert asm.expire(90.0) == 1
    assert asm.counters.expired == 1 and asm.in_progress() == 0
    with pytest.raises(WireError, match="which expired"):
        asm.feed("dev", stream[2], 91.0)
    # Sent again from the start (the device's resend): a fresh transfer that completes.
    assert [asm.feed("dev", c, 92.0) for c in stream][-1] == PAYLOAD


def test_durable_store_resumes_after_a_restart(tmp_path: Path) -> None:
    stream = _chunks()
    first = Reassembler(store=DirChunkStore(tmp_path / "chunks"))
    for c in stream[:4]:
        first.feed("dev", c, 0.0)
    del first  # the process dies: only the files remain
    files = sorted(p.name for p in (tmp_path / "chunks" / "dev").iterdir())
    assert files == [f"{TRANSFER}-7-10000"]
    second = Reassembler(store=DirChunkStore(tmp_path / "chunks"), now=100.0)
    assert second.in_progress() == 1
    assert second.feed("dev", stream[2], 100.0) is None  # a redelivery of a held chunk
    assert second.counters.duplicates == 1
    assert [second.feed("dev", c, 100.0) for c in stream[4:]][-1] == PAYLOAD
    # Completed but not finished (a crash before the journal write): the redelivered last
    # chunk hands the payload out again after the next restart.
    third = Reassembler(store=DirChunkStore(tmp_path / "chunks"))
    assert third.feed("dev", stream[-1], 0.0) == PAYLOAD
    third.finish("dev", TRANSFER)
    assert list((tmp_path / "chunks" / "dev").iterdir()) == []


def test_durable_store_removes_what_is_not_a_transfer(tmp_path: Path) -> None:
    (tmp_path / "dev" / "junk").mkdir(parents=True)
    assert Reassembler(store=DirChunkStore(tmp_path)).in_progress() == 0
    assert not (tmp_path / "dev" / "junk").exists()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1024"):
        split(PAYLOAD, CHUNK_HEADROOM)
    with pytest.raises(ValueError, match="timeout"):
        ReassemblyLimits(timeout=0)
