"""The device's side of one secure-aggregation round, as a state machine over messages.

``advertise()`` -> ``sa_keys``; ``on_roster(roster)`` -> ``sa_shares``;
``on_relay(relay, q)`` -> ``sa_masked`` (``q``: the int8 update on the round's fixed scale);
``on_survivors(survivors)`` -> ``sa_unmask``. Each returns the signed payload to publish and
raises :class:`Rejected` when the server's message is wrong (then the device leaves the
round: it sends nothing more). No I/O.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedmq.errors import Rejected, RejectReason
from fedmq.secagg import graph, ring, shamir
from fedmq.secagg.common import (
    commit,
    decrypt_share,
    encrypt_share,
    pair_context,
    seed_commit,
    self_context,
    sign,
    verify,
)
from fedmq.secagg.messages import (
    EncShare,
    KeysMsg,
    MaskedMsg,
    Message,
    Relay,
    Reveal,
    Roster,
    SharesMsg,
    Survivors,
    UnmaskMsg,
    context,
    decode,
    decode_signed,
)
from fedmq.secagg.prg import agree, mask, public_bytes
from fedmq.signing import DeviceKey

__all__ = ["SecAggClient"]

_SEED = 32
_PLAIN = 2 * shamir.SHARE_BYTES + 16


class SecAggClient:
    """One device in one round. ``peer_keys`` (device -> Ed25519 public key hex, e.g. the
    fleet registry) makes the device check every advertisement in the roster; without it
    the device trusts the aggregator to relay the keys unchanged."""

    def __init__(self, fleet: str, epoch: str, round_id: int, device: str, key: DeviceKey,
                 peer_keys: Mapping[str, str] | None = None) -> None:
        self.fleet, self.epoch, self.round_id, self.device = fleet, epoch, round_id, device
        self.key = key
        self.peer_keys = peer_keys
        self.ctx = context(fleet, epoch, round_id)
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._seed = os.urandom(_SEED)
        self.phase = "keys"
        self.roster: Roster | None = None
        self.keys: dict[str, KeysMsg] = {}
        self.neighbours: frozenset[str] = frozenset()
        self._held: dict[str, tuple[bytes, bytes, bytes]] = {}

    # ------------------------------------------------------------------ helpers
    def _check(self, msg: Message, phase: str) -> None:
        if msg.fleet != self.fleet or msg.epoch != self.epoch or msg.round_id != self.round_id:
            raise Rejected(
                f"{msg.TYPE} is for round {msg.round_id} (fleet {msg.fleet}, epoch "
                f"{msg.epoch!r}), not {self.round_id}", RejectReason.WRONG_ROUND)
        if self.phase != phase:
            raise Rejected(f"{msg.TYPE} arrived in phase {self.phase}, expected {phase}",
                           RejectReason.WRONG_PHASE)

    def _decode(self, payload: bytes, kind: type) -> Message:
        msg = decode(payload)
        if not isinstance(msg, kind):
            raise Rejected(f"expected {kind.__name__}, got {msg.TYPE}", RejectReason.MALFORMED)
        return msg

    # ------------------------------------------------------------------ phases
    def advertise(self) -> bytes:
        return sign(KeysMsg(self.fleet, self.epoch, self.round_id, self.device,
                            public_bytes(self._c_sk), public_bytes(self._s_sk)), self.key)

    def on_roster(self, payload: bytes) -> bytes:
        roster = self._decode(payload, Roster)
        assert isinstance(roster, Roster)
        self._check(roster, "keys")
        keys: dict[str, KeysMsg] = {}
        for advert in roster.adverts:
            env, msg = decode_signed(advert)
            if not isinstance(msg, KeysMsg) or msg.device in keys:
                raise Rejected("roster has a bad or repeated advertisement")
            if (msg.fleet, msg.epoch, msg.round_id) != (self.fleet, self.epoch, self.round_id):
                raise Rejected(f"roster advert of {msg.device} is for another round",
                               RejectReason.WRONG_ROUND)
            if self.peer_keys is not None:
                verify(env, msg.device, self.peer_keys.get(msg.device))
            keys[msg.device] = msg
        mine = keys.get(self.device)
        if mine is None or mine.c_pk != public_bytes(self._c_sk) \
                or mine.s_pk != public_bytes(self._s_sk):
            raise Rejected("the roster does not hold this device's keys", RejectReason.MALFORMED)
        n = len(keys)
        if roster.bits != ring.ring_bits(n) or roster.threshold != graph.threshold(roster.degree) \
                or roster.degree < min(n - 1, graph.default_degree(n)) \
                or roster.min_survivors < 2:
            raise Rejected(f"roster parameters are not safe for {n} devices")
        self.roster, self.keys = roster, keys
        self.neighbours = graph.neighbours(keys, roster.degree, self.ctx)[self.device]
        index = {d: i + 1 for i, d in enumerate(sorted(keys))}
        xs = [index[v] for v in sorted(self.neighbours)]
        t = roster.threshold
        b_shares = shamir.split(self._seed, t, xs)
        s_shares = shamir.split(self._s_sk.private_bytes_raw(), t, xs)
        out = []
        for v in sorted(self.neighbours):
            nonce = os.urandom(16)
            sb = shamir.share_to_bytes(b_shares[index[v]])
            ss = shamir.share_to_bytes(s_shares[index[v]])
            secret = agree(self._c_sk, keys[v].c_pk)
            ct = encrypt_share(secret, self.ctx, self.device, v, os.urandom(12), sb + ss + nonce)
            out.append(EncShare(v, ct, commit("b", self.ctx, self.device, v, nonce, sb),
                                commit("s", self.ctx, self.device, v, nonce, ss)))
        self.phase = "shares"
        return sign(SharesMsg(self.fleet, self.epoch, self.round_id, self.device,
                              seed_commit(self.ctx, self.device, self._seed), tuple(out)),
                    self.key)

    def on_relay(self, payload: bytes, q: np.ndarray, num_examples: int = 0,
                 metrics: Mapping[str, float] | None = None) -> bytes:
        relay = self._decode(payload, Relay)
        assert isinstance(relay, Relay) and self.roster is not None
        self._check(relay, "shares")
        if relay.device != self.device:
            raise Rejected(f"relay is for {relay.device}", RejectReason.DEVICE_MISMATCH)
        q = np.asarray(q).reshape(-1)
        if q.dtype != np.int8 or q.size != self.roster.length:
            raise ValueError(f"the update must be {self.roster.length} int8 values")
        held: dict[str, tuple[bytes, bytes, bytes]] = {}
        for item in relay.shares:
            if item.sender not in self.neighbours:
                raise Rejected(f"relay holds a share from {item.sender!r}, not a neighbour",
                               RejectReason.UNKNOWN_DEVICE)
            secret = agree(self._c_sk, self.keys[item.sender].c_pk)
            plain = decrypt_share(secret, self.ctx, item.sender, self.device, item.ct)
            if len(plain) != _PLAIN:
                raise Rejected(f"share from {item.sender!r} has a bad size",
                               RejectReason.BAD_SHARE)
            k = shamir.SHARE_BYTES
            held[item.sender] = (plain[:k], plain[k : 2 * k], plain[2 * k :])
        bits = self.roster.bits
        y = mask(self._seed, q.size, bits, self_context(self.ctx, self.device))
        y += q.astype(np.int64).astype(np.uint32)  # two's complement: q mod 2^32
        for v in sorted(held):
            m = mask(agree(self._s_sk, self.keys[v].s_pk), q.size, bits,
                     pair_context(self.ctx, self.device, v))
            if self.device < v:
                y += m
            else:
                y -= m
        y &= np.uint32((1 << bits) - 1)
        self._held = held
        self.phase = "masked"
        return sign(MaskedMsg(self.fleet, self.epoch, self.round_id, self.device, num_examples,
                              bits, q.size, ring.pack(y, bits), dict(metrics or {})), self.key)

    def on_survivors(self, payload: bytes) -> bytes:
        msg = self._decode(payload, Survivors)
        assert isinstance(msg, Survivors) and self.roster is not None
        self._check(msg, "masked")
        survivors = set(msg.survivors)
        if self.device not in survivors:
            raise Rejected("this device is not among the survivors", RejectReason.NOT_SELECTED)
        if not survivors <= set(self.keys) or len(survivors) < self.roster.min_survivors:
            raise Rejected(f"{len(survivors)} survivors: below the round's minimum "
                           f"{self.roster.min_survivors} or not in the roster")
        reveals = []
        for u in sorted(self._held):
            sb, ss, nonce = self._held[u]
            if u in survivors:
                reveals.append(Reveal(u, "b", sb, nonce))
            else:
                reveals.append(Reveal(u, "s", ss, nonce))
        self.phase = "done"
        return sign(UnmaskMsg(self.fleet, self.epoch, self.round_id, self.device,
                              tuple(reveals)), self.key)
