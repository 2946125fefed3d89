"""The device's part in secure rounds (docs/privacy.md, "Secure aggregation").

A round whose announcement carries ``secagg_clip`` is secure: the device advertises fresh
X25519 keys on ``secagg/in/<device>`` as soon as the round is announced, trains meanwhile,
answers the roster (``secagg/out``) with its encrypted shares, sends its masked input once
it has both its trained delta and the shares relayed to it (``secagg/out/<device>``), and
answers the survivors list with the shares the aggregator needs. Its delta is clipped
elementwise to ``secagg_clip`` and quantised on the round-fixed int8 scale
``secagg_clip / 127`` (so the integer sum is meaningful), flattened by tensor name.

Keys live in memory for one round only: a device that restarts mid-round has dropped out of
it. A server message that is wrong for this round (a retained one of an earlier round, a
phase already answered) is ignored; one that fails a check (a roster without this device, a
share that does not decrypt, too few survivors) makes the device leave the round (one
WARNING line).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

import numpy as np

from edge_agent.core import Publish
from fedmq.errors import Rejected, RejectReason, SecurityError, WireError
from fedmq.secagg import messages, ring
from fedmq.secagg.client import SecAggClient
from fedmq.signing import DeviceKey, Registry
from fedmq.topics import Topics
from fedmq.wire import AckMessage, RoundAnnouncement

__all__ = ["CLIP_PARAM", "SECAGG_ACK_PREFIX", "SecureRounds", "flatten_delta"]

log = logging.getLogger(__name__)

CLIP_PARAM = "secagg_clip"
#: The update id of the aggregator's answers to phase messages (they have none of their own).
SECAGG_ACK_PREFIX = "secagg:"
_IGNORED = (RejectReason.WRONG_ROUND, RejectReason.WRONG_PHASE)


def flatten_delta(delta: Mapping[str, np.ndarray]) -> np.ndarray:
    """The delta as one float32 vector, tensors in name order (the aggregator's order)."""
    return np.concatenate([np.asarray(delta[n], np.float32).reshape(-1) for n in sorted(delta)])


class SecureRounds:
    """One device's secure-round client, driven by the edge core."""

    def __init__(self, fleet: str, device: str, topics: Topics, key: DeviceKey,
                 peers: Registry | None = None, seed: int = 0) -> None:
        self.fleet, self.device, self.topics, self.key = fleet, device, topics, key
        self.peers = peers  # with it, every advertisement in a roster is verified
        self.seed = seed
        self.client: SecAggClient | None = None
        self._relay: bytes | None = None
        self._q: np.ndarray | None = None
        self._examples = 0
        self._metrics: dict[str, float] = {}
        #: the int8 values of the last masked input sent (what the unmasked sum adds up)
        self.last_q: np.ndarray | None = None
        self.rejected = 0  # phase messages the aggregator refused

    @staticmethod
    def is_secure(ann: RoundAnnouncement) -> bool:
        return CLIP_PARAM in ann.config.params

    def _current(self, ann: RoundAnnouncement) -> bool:
        c = self.client
        return c is not None and (c.round_id, c.epoch) == (ann.round_id, ann.epoch)

    def wants_training(self, ann: RoundAnnouncement) -> bool:
        """A secure round this device takes part in and has no delta for yet."""
        return self._current(ann) and self._q is None

    @staticmethod
    def is_secure_ack(ack: AckMessage) -> bool:
        return ack.update_id.startswith(SECAGG_ACK_PREFIX)

    def on_ack(self, ack: AckMessage) -> list[Publish]:
        """The aggregator refused one of this device's phase messages (it says why)."""
        self.rejected += 1
        log.warning("secure round %d: the aggregator rejected a message: %s: %s",
                    ack.round_id, ack.code, ack.reason)
        return []

    def handles(self, topic: str) -> bool:
        return topic in (self.topics.secagg_out, self.topics.secagg_relay(self.device))

    # ------------------------------------------------------------------ events
    def on_round(self, ann: RoundAnnouncement) -> list[Publish]:
        if not self.is_secure(ann) or self._current(ann):
            return []
        if ann.selected and self.device not in ann.selected:
            return []
        try:
            peer_keys = self.peers.devices() if self.peers is not None else None
        except SecurityError as exc:
            log.error("secure round %d: not taking part: %s", ann.round_id, exc)
            return []
        self.client = SecAggClient(self.fleet, ann.epoch, ann.round_id, self.device, self.key,
                                   peer_keys)
        self._relay, self._q, self.last_q = None, None, None
        log.info("secure round %d: keys advertised", ann.round_id)
        return [self._publish(self.client.advertise())]

    def on_delta(self, ann: RoundAnnouncement, delta: Mapping[str, np.ndarray],
                 num_examples: int, metrics: Mapping[str, float]) -> list[Publish]:
        """The trained delta of a secure round: quantised, masked once the shares are in."""
        if not self._current(ann) or self._q is not None:
            return []
        rng = np.random.default_rng([self.seed, zlib.crc32(self.device.encode()),
                                     ann.round_id, 1])
        self._q = ring.quantize(flatten_delta(delta), float(ann.config.params[CLIP_PARAM]), rng)
        self._examples, self._metrics = num_examples, dict(metrics)
        return self._masked()

    def on_message(self, topic: str, payload: bytes) -> list[Publish]:
        c = self.client
        if c is None or not payload:
            return []
        try:
            if topic != self.topics.secagg_out:
                self._relay = payload
                return self._masked()
            msg = messages.decode(payload)
            if isinstance(msg, messages.Roster):
                return [self._publish(c.on_roster(payload))]
            if isinstance(msg, messages.Survivors):
                out = [self._publish(c.on_survivors(payload))]
                log.info("secure round %d: unmasking shares sent (%d survivors)",
                         c.round_id, len(msg.survivors))
                return out
            return []
        except (Rejected, WireError) as exc:
            return self._failed(c, exc)

    # ------------------------------------------------------------------ helpers
    def _masked(self) -> list[Publish]:
        c = self.client
        if c is None or self._q is None or self._relay is None or c.phase != "shares":
            return []
        try:
            payload = c.on_relay(self._relay, self._q, self._examples, self._metrics)
        except (Rejected, WireError) as exc:
            self._relay = None
            return self._failed(c, exc)
        self.last_q = self._q
        log.info("secure round %d: masked input sent (%d bytes)", c.round_id, len(payload))
        return [self._publish(payload)]

    def _failed(self, c: SecAggClient, exc: Rejected) -> list[Publish]:
        if exc.code in _IGNORED:
            log.debug("secure round %d: ignoring %s", c.round_id, exc.reason)
            return []
        log.warning("secure round %d: leaving the round: %s (%s)", c.round_id, exc.reason,
                    exc.code)
        self.client = None
        return []

    def _publish(self, payload: bytes) -> Publish:
        return Publish(self.topics.secagg_in(self.device), payload, qos=1)
