"""The aggregator's side of one secure-aggregation round, as a state machine over messages.

Phases: ``keys`` -> ``shares`` -> ``masked`` -> ``unmask`` -> ``done`` (or ``abandoned``).
:meth:`SecAggServer.receive` takes a device's signed payload (and the device its topic
names) and raises :class:`Rejected` with a code (counted in :attr:`rejected`);
:meth:`SecAggServer.close_phase` ends the current phase (the caller calls it at the phase's
deadline, or as soon as :meth:`complete` says everyone expected is in) and returns what to
publish. A device that misses a phase is dropped from the round, never waited for. The
masked inputs are folded as they arrive into one ``length`` uint32 vector (O(model)
memory); nothing of a device's input is kept.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmq.errors import Rejected, RejectReason
from fedmq.secagg import graph, ring, shamir
from fedmq.secagg.common import commit, pair_context, seed_commit, self_context, verify
from fedmq.secagg.messages import (
    KeysMsg,
    MaskedMsg,
    Relay,
    RelayShare,
    Roster,
    SecAggLimits,
    SharesMsg,
    Survivors,
    UnmaskMsg,
    context,
    decode_signed,
    encode,
)
from fedmq.secagg.prg import agree, mask, public_bytes

__all__ = ["PHASES", "SecAggResult", "SecAggServer"]

PHASES = ("keys", "shares", "masked", "unmask", "done", "abandoned")
_PHASE_OF = {KeysMsg.TYPE: "keys", SharesMsg.TYPE: "shares", MaskedMsg.TYPE: "masked",
             UnmaskMsg.TYPE: "unmask"}


@dataclass(frozen=True)
class SecAggResult:
    """The unmasked integer sum of the survivors' int8 updates (``sum * scale`` is the sum
    of their clipped deltas)."""

    sum: np.ndarray  # int64, flat, length values
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]  # shared their keys, sent no masked input
    scale: float
    num_examples: int
    metrics: dict[str, dict[str, float]]


class SecAggServer:
    def __init__(self, fleet: str, epoch: str, round_id: int, *, clip: float, length: int,
                 public_key: Callable[[str], str | None], min_survivors: int,
                 selected: Iterable[str] = (), limits: SecAggLimits | None = None) -> None:
        if min_survivors < 2:
            raise ValueError("min_survivors must be >= 2 (one survivor's sum is its update)")
        self.fleet, self.epoch, self.round_id = fleet, epoch, round_id
        self.clip, self.length = clip, length
        self.public_key = public_key
        self.min_survivors = min_survivors
        self.selected = frozenset(selected)
        self.limits = limits or SecAggLimits(max_bytes=ring.packed_size(length, 32) + 4096)
        self.ctx = context(fleet, epoch, round_id)
        self.phase = "keys"
        self.reason = ""
        self.rejected: Counter[str] = Counter()
        self.liars: set[str] = set()
        self.keys: dict[str, KeysMsg] = {}
        self._adverts: dict[str, bytes] = {}
        self.graph: dict[str, frozenset[str]] = {}
        self.bits = self.degree = self.threshold = 0
        self.shares: dict[str, SharesMsg] = {}
        self._acc: np.ndarray | None = None
        self.masked: dict[str, tuple[int, dict[str, float]]] = {}
        self._b: dict[str, dict[int, int]] = {}
        self._s: dict[str, dict[int, int]] = {}
        self.unmasked: set[str] = set()
        self._index: dict[str, int] = {}

    # ------------------------------------------------------------------ receiving
    def receive(self, payload: bytes, topic_device: str) -> str:
        """Check and take one device message; returns its type. Raises Rejected."""
        try:
            return self._receive(payload, topic_device)
        except Rejected as exc:
            self.rejected[exc.code] += 1
            raise

    def _receive(self, payload: bytes, topic_device: str) -> str:
        env, msg = decode_signed(payload, self.limits)
        assert not isinstance(msg, Roster | Relay | Survivors)
        if msg.device != topic_device:
            raise Rejected(f"message names device {msg.device!r} on {topic_device!r}'s topic",
                           RejectReason.DEVICE_MISMATCH)
        verify(env, msg.device, self.public_key(msg.device))
        if msg.fleet != self.fleet:
            raise Rejected(f"fleet {msg.fleet!r} is not {self.fleet!r}", RejectReason.WRONG_FLEET)
        if msg.epoch != self.epoch or msg.round_id != self.round_id:
            raise Rejected(f"{msg.TYPE} is for round {msg.round_id} (epoch {msg.epoch!r}), the "
                           f"open secure round is {self.round_id} (epoch {self.epoch!r})",
                           RejectReason.WRONG_ROUND)
        if _PHASE_OF[msg.TYPE] != self.phase:
            raise Rejected(f"{msg.TYPE} from {msg.device} in phase {self.phase}",
                           RejectReason.WRONG_PHASE)
        if isinstance(msg, KeysMsg):
            self._on_keys(msg, payload)
        elif isinstance(msg, SharesMsg):
            self._on_shares(msg)
        elif isinstance(msg, MaskedMsg):
            self._on_masked(msg)
        else:
            self._on_unmask(msg)
        return msg.TYPE

    def _on_keys(self, msg: KeysMsg, payload: bytes) -> None:
        if self.selected and msg.device not in self.selected:
            raise Rejected(f"{msg.device} is not selected", RejectReason.NOT_SELECTED)
        if msg.device in self.keys:
            raise Rejected(f"{msg.device} already sent its keys", RejectReason.DUPLICATE)
        if len(payload) > 512:
            raise Rejected("advertisement larger than 512 bytes", RejectReason.TOO_LARGE)
        if msg.c_pk == msg.s_pk:
            raise Rejected("the two public keys must differ")
        self.keys[msg.device] = msg
        self._adverts[msg.device] = payload

    def _on_shares(self, msg: SharesMsg) -> None:
        if msg.device not in self.keys:
            raise Rejected(f"{msg.device} sent no keys", RejectReason.NOT_SELECTED)
        if msg.device in self.shares:
            raise Rejected(f"{msg.device} already sent its shares", RejectReason.DUPLICATE)
        to = {s.to for s in msg.shares}
        unknown = to - self.graph[msg.device]
        if unknown:
            raise Rejected(f"shares for unknown devices {sorted(unknown)} (not neighbours of "
                           f"{msg.device})", RejectReason.UNKNOWN_DEVICE)
        if to != self.graph[msg.device]:
            raise Rejected(f"shares for {len(to)} of {msg.device}'s "
                           f"{len(self.graph[msg.device])} neighbours", RejectReason.MALFORMED)
        self.shares[msg.device] = msg

    def _on_masked(self, msg: MaskedMsg) -> None:
        if msg.device not in self.shares:
            raise Rejected(f"{msg.device} sent no shares", RejectReason.NOT_SELECTED)
        if msg.device in self.masked:
            raise Rejected(f"{msg.device} already sent its masked input", RejectReason.DUPLICATE)
        if msg.bits != self.bits or msg.count != self.length:
            raise Rejected(f"masked input of {msg.count} x {msg.bits} bits, expected "
                           f"{self.length} x {self.bits}", RejectReason.SHAPE)
        y = ring.unpack(msg.data, self.bits, self.length)
        assert self._acc is not None
        self._acc += y
        self._acc &= np.uint32((1 << self.bits) - 1)
        self.masked[msg.device] = (msg.num_examples, dict(msg.metrics))

    def _on_unmask(self, msg: UnmaskMsg) -> None:
        v = msg.device
        if v not in self.masked:
            raise Rejected(f"{v} is not a survivor", RejectReason.NOT_SELECTED)
        if v in self.unmasked:
            raise Rejected(f"{v} already sent its shares", RejectReason.DUPLICATE)
        taken: list[tuple[dict[str, dict[int, int]], str, int]] = []
        for r in msg.reveals:
            dealer = self.shares.get(r.of)
            if dealer is None or r.of not in self.graph[v]:
                raise Rejected(f"{v} reveals a share of {r.of!r}, an unknown device or not "
                               "its neighbour", RejectReason.UNKNOWN_DEVICE)
            want = "b" if r.of in self.masked else "s"
            if r.kind != want:
                raise Rejected(f"{v} reveals a {r.kind!r} share of {r.of}, the round asks "
                               f"for {want!r}", RejectReason.BAD_SHARE)
            entry = next(s for s in dealer.shares if s.to == v)
            expected = entry.cb if want == "b" else entry.cs
            if commit(want, self.ctx, r.of, v, r.nonce, r.share) != expected:
                self.liars.add(v)
                raise Rejected(f"{v}'s share of {r.of} does not match {r.of}'s commitment",
                               RejectReason.BAD_SHARE)
            taken.append((self._b if want == "b" else self._s, r.of,
                          shamir.share_from_bytes(r.share)))
        for table, dealer_id, y in taken:
            table.setdefault(dealer_id, {})[self._index[v]] = y
        self.unmasked.add(v)

    # ------------------------------------------------------------------ phases
    def expected(self) -> frozenset[str]:
        """Devices the current phase waits for (it may close early once all are in)."""
        if self.phase == "keys":
            return self.selected
        if self.phase == "shares":
            return frozenset(self.keys)
        if self.phase == "masked":
            return frozenset(self.shares)
        if self.phase == "unmask":
            return frozenset(self.masked)
        return frozenset()

    def complete(self) -> bool:
        """Everyone expected is in (for ``unmask``: enough shares to finish)."""
        if self.phase == "unmask":
            return self.unmasked == set(self.masked) or self._missing() == []
        got: set[str] = set()
        if self.phase == "keys":
            got = set(self.keys)
        elif self.phase == "shares":
            got = set(self.shares)
        elif self.phase == "masked":
            got = set(self.masked)
        return bool(self.expected()) and self.expected() <= got

    def _abandon(self, reason: str) -> list[tuple[str, bytes]]:
        self.phase, self.reason, self._acc = "abandoned", reason, None
        return []

    def close_phase(self) -> list[tuple[str, bytes]]:
        """End the current phase; returns ``(target, payload)`` to publish: target
        ``"server"`` for the broadcast topic or a device id for its relay topic."""
        if self.phase == "keys":
            n = len(self.keys)
            if n < self.min_survivors:
                return self._abandon(f"{n} devices sent keys, below the minimum "
                                     f"{self.min_survivors}")
            self.bits = ring.ring_bits(n)
            self.degree = graph.default_degree(n)
            self.threshold = graph.threshold(self.degree)
            self.graph = graph.neighbours(self.keys, self.degree, self.ctx)
            self._index = {d: i + 1 for i, d in enumerate(sorted(self.keys))}
            roster = Roster(self.fleet, self.epoch, self.round_id, self.bits, self.degree,
                            self.threshold, self.min_survivors, self.clip, self.length,
                            tuple(self._adverts[d] for d in sorted(self._adverts)))
            self.phase = "shares"
            return [("server", encode(roster))]
        if self.phase == "shares":
            u2 = set(self.shares)
            if len(u2) < self.min_survivors:
                return self._abandon(f"{len(u2)} devices shared their keys, below the "
                                     f"minimum {self.min_survivors}")
            out = []
            for v in sorted(u2):
                items = tuple(RelayShare(u, next(s.ct for s in self.shares[u].shares
                                                 if s.to == v))
                              for u in sorted(self.graph[v] & u2))
                out.append((v, encode(Relay(self.fleet, self.epoch, self.round_id, v, items))))
            self._acc = np.zeros(self.length, np.uint32)
            self.phase = "masked"
            return out
        if self.phase == "masked":
            if len(self.masked) < self.min_survivors:
                return self._abandon(f"{len(self.masked)} masked inputs, below the minimum "
                                     f"{self.min_survivors}")
            self.phase = "unmask"
            return [("server", encode(Survivors(self.fleet, self.epoch, self.round_id,
                                                tuple(sorted(self.masked)))))]
        if self.phase == "unmask":
            missing = self._missing()
            if missing:
                return self._abandon("not enough shares to unmask: " + "; ".join(missing))
            self.phase = "done"
            return []
        raise Rejected(f"the round is {self.phase}", RejectReason.WRONG_PHASE)

    def _needed(self) -> list[tuple[str, str, dict[int, int]]]:
        """(kind, device, shares so far) of every secret the unmasking needs."""
        out = [("b", u, self._b.get(u, {})) for u in sorted(self.masked)]
        for u in sorted(set(self.shares) - set(self.masked)):
            if self.graph[u] & set(self.masked):
                out.append(("s", u, self._s.get(u, {})))
        return out

    def _missing(self) -> list[str]:
        return [f"{kind} of {u}: {len(got)} of {self.threshold} shares"
                for kind, u, got in self._needed() if len(got) < self.threshold]

    def result(self) -> SecAggResult:
        """Unmask the folded sum (phase ``done``). A secret that does not reconstruct to
        its commitment (the dealer lied in its shares) raises Rejected(bad_share) naming
        the dealer."""
        if self.phase != "done" or self._acc is None:
            raise Rejected(f"the round is {self.phase}, not done", RejectReason.WRONG_PHASE)
        acc = self._acc.copy()
        t = self.threshold
        for kind, u, got in self._needed():
            points = dict(sorted(got.items())[:t])
            try:
                secret = shamir.reconstruct(points, 32)
            except Rejected as exc:
                self.liars.add(u)
                raise Rejected(f"{u}'s shares do not reconstruct a secret: {exc}",
                               RejectReason.BAD_SHARE) from exc
            if kind == "b":
                seed = secret
                if seed_commit(self.ctx, u, seed) != self.shares[u].b_commit:
                    self.liars.add(u)
                    raise Rejected(f"{u}'s self-mask shares do not reconstruct its committed "
                                   "seed", RejectReason.BAD_SHARE)
                acc -= mask(seed, self.length, self.bits, self_context(self.ctx, u))
            else:
                sk = X25519PrivateKey.from_private_bytes(secret)
                if public_bytes(sk) != self.keys[u].s_pk:
                    self.liars.add(u)
                    raise Rejected(f"{u}'s key shares do not reconstruct its advertised key",
                                   RejectReason.BAD_SHARE)
                for v in sorted(self.graph[u] & set(self.masked)):
                    m = mask(agree(sk, self.keys[v].s_pk), self.length, self.bits,
                             pair_context(self.ctx, u, v))
                    if v < u:  # v added this mask, the partner's opposite never arrived
                        acc -= m
                    else:
                        acc += m
        acc &= np.uint32((1 << self.bits) - 1)
        survivors = tuple(sorted(self.masked))
        return SecAggResult(
            sum=ring.to_signed(acc, self.bits),
            survivors=survivors,
            dropped=tuple(sorted(set(self.shares) - set(self.masked))),
            scale=self.clip / ring.Q_MAX,
            num_examples=sum(self.masked[d][0] for d in survivors),
            metrics={d: self.masked[d][1] for d in survivors},
        )


