"""The sharded ingest's shared store, in Redis: the open round, per-device claims, each
worker's committed partial sum and the coordinator's model. docs/scaling.md has the layout.

Every state change is ONE Lua script, which Redis runs atomically:

- :meth:`ShardStore.commit` (a worker, per batch of updates: group commit): if the round is
  still open and none of the batch's devices has a claim in (epoch, round), set every claim
  AND the worker's new partial sum together; else nothing changes and the caller learns why
  (closed, or which devices are claimed and by whom: it takes those out and commits again).
  The claim records how the update was folded (:class:`Fold`: claimed examples, the capped
  weight, the norm-clip factor, the norm), so the committed partial and its record of
  decisions cannot disagree; nothing is decided again after a restart.
  The worker sends its MQTT PUBACKs only after this returns, so an update is either in a
  committed partial (and claimed) or still owned by the broker (redelivered). One script
  call per batch writes the partial (8 bytes per parameter) once for all of its updates.
- :meth:`ShardStore.commit_partial` (a site gateway's partial, docs/scaling.md "Site
  gateways"): if the round is open, the gateway has no partial of it yet and none of its
  devices has a claim, claim every device AND store the partial as ``gateway:<name>``
  together (and remember it as the gateway's last committed partial); else nothing
  changes. The coordinator merges it like a worker's.
- :meth:`ShardStore.close` (the coordinator): mark the round closed and read every partial;
  after it no commit of that round can land, so the merge sees a final set.
- :meth:`ShardStore.finish` (the coordinator): store the next model and strategy state and
  open the next round, dropping the closed round's claims and partials, only if that round
  is still the closed one (a restarted coordinator finishing twice changes nothing).

Each round record carries its :class:`RoundRules` (the codec the round asked for, the
ingest bounds frozen for the round, the examples cap), written by the coordinator when it
opens the round: every worker checks against the same rules. The fleet's pool of recent
norms and claims (:class:`aggregator.bounds.FleetBounds`) is stored by ``finish`` in the
same script as the round it was updated from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import msgpack
import numpy as np
import redis

from aggregator.bounds import RoundBounds
from fedmq.errors import StateError, WireError
from fedmq.topics import validate_name
from fedmq.wire import TrainingConfig

__all__ = [
    "Claim", "CommitResult", "Fold", "GatewayClaim", "IngestStore", "OpenRound", "RoundRules",
    "ShardStore", "gateway_partial_key", "pack_arrays", "parse_claim",
    "unpack_arrays",
]

log = logging.getLogger(__name__)

_COMMIT = """
if redis.call('GET', KEYS[4]) ~= ARGV[4] then return {'fenced'} end
local st = redis.call('HMGET', KEYS[1], 'epoch', 'round_id', 'state')
if st[1] ~= ARGV[1] or st[2] ~= ARGV[2] or st[3] ~= 'open' then return {'closed'} end
local out = {'claimed'}
for i = 6, #ARGV, 2 do
  local prev = redis.call('HGET', KEYS[2], ARGV[i])
  if prev then table.insert(out, ARGV[i]); table.insert(out, prev) end
end
if #out > 1 then return out end
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
return {'ok'}
"""

_COMMIT_PARTIAL = """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'round_id', 'state')
if st[1] ~= ARGV[1] or st[2] ~= ARGV[2] or st[3] ~= 'open' then return {'closed', ''} end
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  return {'claimed', redis.call('HGET', KEYS[2], ARGV[6]) or ''}
end
for i = 6, #ARGV do
  local prev = redis.call('HGET', KEYS[2], ARGV[i])
  if prev then return {'conflict', prev, ARGV[i]} end
end
for i = 6, #ARGV do redis.call('HSET', KEYS[2], ARGV[i], ARGV[4]) end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[5])
redis.call('SET', KEYS[4], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. ARGV[4])
return {'ok', ''}
"""

_NOTE_NORM = """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'round_id', 'state')
if st[1] ~= ARGV[1] or st[2] ~= ARGV[2] or st[3] ~= 'open' then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

_CLOSE = """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'round_id', 'state')
if st[1] ~= ARGV[1] or st[2] ~= ARGV[2] then return false end
if st[3] == 'open' then redis.call('HSET', KEYS[1], 'state', 'closed') end
local out = redis.call('HGETALL', KEYS[3])
table.insert(out, 1, 'ok')
return out
"""

_FINISH = """
local st = redis.call('HMGET', KEYS[1], 'epoch', 'round_id', 'state')
if st[1] ~= ARGV[1] or st[2] ~= ARGV[2] or st[3] ~= 'closed' then return 0 end
redis.call('HSET', KEYS[4], 'version', ARGV[3], 'weights', ARGV[4], 'strategy', ARGV[5],
           'round_id', ARGV[2], 'epoch', ARGV[1], 'contributors', ARGV[6])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
redis.call('SET', KEYS[6], ARGV[11])
redis.call('HSET', KEYS[1], 'round_id', ARGV[7], 'base_version', ARGV[3], 'deadline', ARGV[8],
           'target', ARGV[9], 'rules', ARGV[10], 'state', 'open')
return 1
"""


def gateway_partial_key(gateway: str) -> str:
    """The field of a gateway's partial in a round's partials (a worker name has no ':')."""
    return f"gateway:{validate_name(gateway, 'gateway')}"


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named float32 arrays to bytes (model weights, strategy state)."""
    obj = {
        n: {"shape": list(a.shape), "data": np.ascontiguousarray(a, "<f4").tobytes()}
        for n, a in arrays.items()
    }
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    try:
        obj = msgpack.unpackb(data, raw=False, max_ext_len=0)
        out = {}
        for n, item in obj.items():
            shape = tuple(int(d) for d in item["shape"])
            out[str(n)] = np.frombuffer(item["data"], "<f4").reshape(shape).copy()
        return out
    except Exception as exc:  # any damage: one error naming the store
        raise WireError(f"stored arrays are unreadable: {exc}") from exc


@dataclass(frozen=True)
class RoundRules:
    """What every worker checks an update of the round against, besides its round: the
    round's training config (its codec must be the update's), the ingest bounds frozen for
    the round and the cap on claimed examples (``max_claimed_examples``)."""

    config: TrainingConfig
    bounds: RoundBounds = field(default_factory=RoundBounds)
    max_examples: int = 10_000_000

    def to_json(self) -> str:
        return json.dumps({"config": self.config.to_dict(), "bounds": self.bounds.to_json(),
                           "max_examples": self.max_examples})

    @classmethod
    def from_json(cls, text: str) -> RoundRules:
        try:
            obj = json.loads(text)
            return cls(TrainingConfig.from_dict(obj["config"]),
                       RoundBounds.from_json(obj["bounds"]), int(obj["max_examples"]))
        except (ValueError, TypeError, KeyError, WireError) as exc:
            raise StateError(f"the store's round rules are unreadable: {exc}") from exc


@dataclass(frozen=True)
class OpenRound:
    """The round as the store has it; ``state`` is ``open`` or ``closed``."""

    epoch: str
    round_id: int
    base_version: int
    deadline: float
    target: int
    state: str
    rules: RoundRules


@dataclass(frozen=True)
class Fold:
    """How a worker folded a device's update (kept in the device's claim): the update id,
    the claimed examples, the weight folded (capped), the delta's norm-clip factor (1.0:
    not clipped) and the update's L2 norm before the clip."""

    worker: str
    update_id: str
    claimed: int
    weight: float
    scale: float
    norm: float

    def to_claim(self) -> str:
        return json.dumps([self.worker, self.update_id, self.claimed, self.weight, self.scale,
                           self.norm])

    @classmethod
    def from_claim(cls, text: str) -> Fold:
        try:
            worker, update_id, claimed, weight, scale, norm = json.loads(text)
            return cls(str(worker), str(update_id), int(claimed), float(weight), float(scale),
                       float(norm))
        except (ValueError, TypeError) as exc:
            raise StateError(f"a stored claim is unreadable: {text[:200]!r}") from exc


@dataclass(frozen=True)
class GatewayClaim:
    """A device claimed by a site gateway's partial (:meth:`ShardStore.commit_partial`),
    stored as ``gateway:<gw> <partial id>``. The cloud folded no update of that device
    itself: the gateway's partial holds it, so there is no per-device weight or norm here
    (the fleet's norm and claim pools leave such devices out, docs/scaling.md)."""

    gateway: str
    partial_id: str

    @property
    def worker(self) -> str:
        """The field of the gateway's partial (``gateway:<gw>``), as a worker name is."""
        return gateway_partial_key(self.gateway)

    @property
    def update_id(self) -> str:
        return self.partial_id

    def to_claim(self) -> str:
        return f"{self.worker} {self.partial_id}"

    @classmethod
    def from_claim(cls, text: str) -> GatewayClaim:
        key, _, partial_id = text.partition(" ")
        kind, _, gateway = key.partition(":")
        if kind != "gateway" or not gateway or not partial_id:
            raise StateError(f"a stored gateway claim is unreadable: {text[:200]!r}")
        return cls(gateway, partial_id)


#: what a device's claim in a round records: a worker's fold or a gateway's partial
Claim = Fold | GatewayClaim


def parse_claim(text: str) -> Claim:
    """A stored claim of either kind (a worker's JSON :class:`Fold`, a gateway's
    ``gateway:<gw> <partial id>``); :class:`StateError` when it is neither."""
    if text.startswith("gateway:"):
        return GatewayClaim.from_claim(text)
    return Fold.from_claim(text)


@dataclass(frozen=True)
class CommitResult:
    """``status``: ``ok`` (claimed and committed), ``closed`` (round not open: nothing
    changed), ``fenced`` (a newer process of this worker name runs: nothing changed) or
    ``claimed`` (a worker's batch: ``conflicts`` maps each device of the batch that already
    has a claim to that claim, a worker's :class:`Fold` or a site gateway's
    :class:`GatewayClaim`; nothing changed. A gateway's partial: the gateway already has one,
    ``claim`` is the claim of the partial's first device) or ``conflict`` (a gateway's
    partial: ``device`` is claimed elsewhere, ``claim`` its claim; nothing changed)."""

    status: str
    claim: Claim | None = None
    device: str = ""
    conflicts: Mapping[str, Claim] = field(default_factory=dict)


class IngestStore(Protocol):
    """What a :class:`~aggregator.shard_worker.ShardWorker` needs from its store: the Redis
    :class:`ShardStore` (cloud workers) or a site gateway's local
    :class:`~aggregator.site_store.SiteStore`."""

    @property
    def fleet(self) -> str: ...

    def open_round(self) -> OpenRound | None:
        """The round with the :class:`RoundRules` every update of it is checked against."""
        ...

    def partial(self, epoch: str, round_id: int, worker: str) -> bytes | None: ...

    def register_worker(self, worker: str) -> int: ...

    def commit(
        self, epoch: str, round_id: int, worker: str, folds: Mapping[str, Fold],
        partial: bytes, generation: int,
    ) -> CommitResult: ...

    def note_rejected_norm(self, epoch: str, round_id: int, device: str, norm: float) -> None:
        ...


class ShardStore:
    """One fleet's keys (``fedmq:<fleet>:*``) in a Redis database."""

    def __init__(self, url: str, fleet: str, *, timeout: float = 5.0) -> None:
        validate_name(fleet, "fleet")
        self.fleet = fleet
        self.url = url
        self.r = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False,
        )
        self._commit = self.r.register_script(_COMMIT)
        self._commit_partial = self.r.register_script(_COMMIT_PARTIAL)
        self._close = self.r.register_script(_CLOSE)
        self._finish = self.r.register_script(_FINISH)
        self._note_norm = self.r.register_script(_NOTE_NORM)

    # -- keys --------------------------------------------------------------------------------
    def _k(self, *parts: object) -> str:
        return ":".join(["fedmq", self.fleet, *map(str, parts)])

    @property
    def round_key(self) -> str:
        return self._k("round")

    @property
    def model_key(self) -> str:
        return self._k("model")

    def claims_key(self, epoch: str, round_id: int) -> str:
        return self._k("claims", epoch, round_id)

    def partials_key(self, epoch: str, round_id: int) -> str:
        return self._k("partials", epoch, round_id)

    def gateway_last_key(self, gateway: str) -> str:
        """``<epoch> <round> gateway:<gw> <partial id>`` of the gateway's last committed
        partial: a copy arriving after its round closed is still known as committed."""
        return self._k("gateway", validate_name(gateway, "gateway"), "last")

    def norms_key(self, epoch: str, round_id: int) -> str:
        """Norms of the round's updates rejected for their norm (``norm_action = reject``)."""
        return self._k("norms", epoch, round_id)

    @property
    def bounds_key(self) -> str:
        return self._k("bounds")

    # -- reads --------------------------------------------------------------------------------
    def ping(self) -> None:
        self.r.ping()

    def open_round(self) -> OpenRound | None:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.round_key))
        if not raw:
            return None
        try:
            return OpenRound(
                epoch=raw[b"epoch"].decode(),
                round_id=int(raw[b"round_id"]),
                base_version=int(raw[b"base_version"]),
                deadline=float(raw[b"deadline"]),
                target=int(raw[b"target"]),
                state=raw[b"state"].decode(),
                rules=RoundRules.from_json(raw[b"rules"].decode()),
            )
        except (KeyError, ValueError) as exc:
            raise StateError(f"the store's round record {self.round_key} is damaged") from exc

    def claim_count(self, epoch: str, round_id: int) -> int:
        return int(self.r.hlen(self.claims_key(epoch, round_id)))

    def claims(self, epoch: str, round_id: int) -> dict[str, Claim]:
        """Every claimed device of (epoch, round): how a worker folded its update, or the
        gateway partial that holds it."""
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.claims_key(epoch, round_id)))
        return {k.decode(): parse_claim(v.decode()) for k, v in raw.items()}

    def rejected_norms(self, epoch: str, round_id: int) -> dict[str, float]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.norms_key(epoch, round_id)))
        return {k.decode(): float(v) for k, v in raw.items()}

    def fleet_bounds(self) -> str | None:
        """The fleet's pool of recent norms and claims (``FleetBounds.to_json``), if any."""
        raw = self.r.get(self.bounds_key)
        return None if raw is None else cast(bytes, raw).decode()

    def partial(self, epoch: str, round_id: int, worker: str) -> bytes | None:
        return cast(bytes | None, self.r.hget(self.partials_key(epoch, round_id), worker))

    def model_version(self) -> int | None:
        raw = self.r.hget(self.model_key, "version")
        return None if raw is None else int(cast(bytes, raw))

    def model(self) -> dict[str, Any] | None:
        """``version``, ``weights``, ``strategy`` (state arrays), ``round_id``, ``epoch``,
        ``contributors`` of the newest model; None before the first."""
        raw = cast(dict[bytes, bytes], self.r.hgetall(self.model_key))
        if not raw:
            return None
        return {
            "version": int(raw[b"version"]),
            "weights": unpack_arrays(raw[b"weights"]),
            "strategy": unpack_arrays(raw[b"strategy"]),
            "round_id": int(raw[b"round_id"]),
            "epoch": raw[b"epoch"].decode(),
            "contributors": int(raw[b"contributors"]),
        }

    # -- writes -------------------------------------------------------------------------------
    def init(
        self, epoch: str, weights: Mapping[str, np.ndarray], round_id: int, deadline: float,
        target: int, rules: RoundRules,
    ) -> bool:
        """The first model (version 0) and round, unless the fleet already has state."""
        if self.r.hsetnx(self.model_key, "version", 0) == 0:
            return False
        self.r.hset(self.model_key, mapping={
            "weights": pack_arrays(weights), "strategy": pack_arrays({}),
            "round_id": 0, "epoch": epoch, "contributors": 0,
        })
        self.r.hset(self.round_key, mapping={
            "epoch": epoch, "round_id": round_id, "base_version": 0, "deadline": repr(deadline),
            "target": target, "rules": rules.to_json(), "state": "open",
        })
        return True

    def register_worker(self, worker: str) -> int:
        """A new generation for ``worker``: commits of an older process with the same name
        are refused from now on (``fenced``), so two processes never overwrite one partial."""
        return int(self.r.incr(self._k("worker", worker, "generation")))

    def commit(
        self, epoch: str, round_id: int, worker: str, folds: Mapping[str, Fold],
        partial: bytes, generation: int,
    ) -> CommitResult:
        """Claim every device of ``folds`` for (epoch, round) with its fold and store
        ``worker``'s partial, atomically, if ``generation`` is still the worker's newest and
        none of the devices is claimed yet (else ``claimed`` with the ``conflicts``)."""
        if not folds:
            raise ValueError("a commit holds at least one update")
        pairs = [x for device, fold in folds.items() for x in (device, fold.to_claim())]
        out = cast(list[bytes], self._commit(
            keys=[self.round_key, self.claims_key(epoch, round_id),
                  self.partials_key(epoch, round_id), self._k("worker", worker, "generation")],
            args=[epoch, str(round_id), worker, str(generation), partial, *pairs],
        ))
        conflicts = {out[i].decode(): parse_claim(out[i + 1].decode())
                     for i in range(1, len(out) - 1, 2)}
        return CommitResult(out[0].decode(), conflicts=conflicts)

    def note_rejected_norm(self, epoch: str, round_id: int, device: str, norm: float) -> None:
        """Remember the norm of ``device``'s update rejected for its norm, while the round
        is open (the next round's adaptive bound also learns from those, as in one process)."""
        self._note_norm(keys=[self.round_key, self.norms_key(epoch, round_id)],
                        args=[epoch, str(round_id), device, repr(norm)])

    def commit_partial(
        self, epoch: str, round_id: int, gateway: str, partial_id: str,
        devices: tuple[str, ...], partial: bytes,
    ) -> CommitResult:
        """Claim every one of ``devices`` for (epoch, round) as ``gateway:<name> <partial id>``
        and store the gateway's partial, atomically, unless the round is not open, the
        gateway already has a partial of it, or a device is claimed (see the module)."""
        if not devices:
            raise ValueError("a gateway's partial holds at least one device")
        out = self._commit_partial(
            keys=[self.round_key, self.claims_key(epoch, round_id),
                  self.partials_key(epoch, round_id), self.gateway_last_key(gateway)],
            args=[epoch, str(round_id), gateway_partial_key(gateway),
                  f"{gateway_partial_key(gateway)} {partial_id}", partial, *devices],
        )
        status, claim, device = [*cast(list[bytes], out), b"", b""][:3]
        return CommitResult(status.decode(), parse_claim(claim.decode()) if claim else None,
                            device.decode())

    def gateway_committed(self, epoch: str, round_id: int, gateway: str,
                          partial_id: str) -> bool:
        """Whether this partial is the gateway's last committed one (a late copy of it)."""
        raw = self.r.get(self.gateway_last_key(gateway))
        want = f"{epoch} {round_id} {gateway_partial_key(gateway)} {partial_id}"
        return raw is not None and cast(bytes, raw).decode() == want

    def close(self, epoch: str, round_id: int) -> dict[str, bytes] | None:
        """Close (epoch, round) if open; every worker's partial. None: not the store's round."""
        out = self._close(
            keys=[self.round_key, self.claims_key(epoch, round_id),
                  self.partials_key(epoch, round_id)],
            args=[epoch, str(round_id)],
        )
        if not out:
            return None
        items = cast(list[bytes], out)[1:]
        return {items[i].decode(): items[i + 1] for i in range(0, len(items), 2)}

    def finish(
        self, epoch: str, round_id: int, version: int, weights: Mapping[str, np.ndarray],
        strategy: Mapping[str, np.ndarray], contributors: int, next_deadline: float,
        target: int, rules: RoundRules, fleet_bounds: str,
    ) -> bool:
        """Store model ``version`` and the fleet's bounds pool, and open round
        ``round_id + 1`` with ``rules``; False when (epoch, round) is not the closed round
        (already finished)."""
        done = self._finish(
            keys=[self.round_key, self.claims_key(epoch, round_id),
                  self.partials_key(epoch, round_id), self.model_key,
                  self.norms_key(epoch, round_id), self.bounds_key],
            args=[epoch, str(round_id), str(version), pack_arrays(weights),
                  pack_arrays(strategy), str(contributors), str(round_id + 1),
                  repr(next_deadline), str(target), rules.to_json(), fleet_bounds],
        )
        return bool(done)

    def extend(self, epoch: str, round_id: int, deadline: float) -> None:
        """A new deadline for the open round (nothing arrived in time)."""
        current = self.open_round()
        if current and current.epoch == epoch and current.round_id == round_id:
            self.r.hset(self.round_key, "deadline", repr(deadline))

    def close_connection(self) -> None:
        self.r.close()
