"""The aggregator's HE mode (docs/privacy.md, "Homomorphic encryption").

With ``he_context`` set, :func:`install_he` loads the **public** context (one with a secret
key is refused), registers the ``ckks`` codec, and wraps the engine's strategy and round
policy:

- :class:`HEStrategy`: rounds announce codec ``ckks`` and fold into a
  :class:`~fedmq.privacy.he_sum.CkksSum` (ciphertexts added, never decrypted here);
- :class:`AwaitDecryption`: when the inner policy says the round is ready, the sum is
  *sealed* (later updates are ``round_closed``) and an ``he_sum`` message is queued for the
  retained topic ``fl/<fleet>/he/sum``; the round closes once the decryptor's ``he_mean`` for
  that digest is in (:meth:`AwaitDecryption.on_message`), or is abandoned after
  ``he_decrypt_timeout`` seconds without it.

The service subscribes to :attr:`AwaitDecryption.subscriptions`, routes messages on them to
:meth:`AwaitDecryption.on_message` and publishes :meth:`AwaitDecryption.take_outgoing` after
each tick.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine
from aggregator.outgoing import Outgoing
from aggregator.policies import RoundContext, RoundPolicy
from aggregator.round_state import RoundPlan, RoundState
from fedmq.errors import ConfigError, WireError
from fedmq.privacy.he import HEContext
from fedmq.privacy.he_decrypt import MeanResult, SumRequest, he_topics
from fedmq.privacy.he_sum import CkksSum
from fedmq.update.accumulate import Accumulator
from fedmq.update.codecs.ckks import CKKS, register_ckks
from fedmq.update.strategies import Strategy, StrategyWrapper
from fedmq.wire import TrainingConfig

__all__ = ["AwaitDecryption", "HEStrategy", "he_mode", "install_he", "load_public_context"]

log = logging.getLogger(__name__)


def load_public_context(path: str) -> HEContext:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"he_context {path}: {exc}") from exc
    return HEContext.load(data, secret=False, what=f"he_context {path}")


class HEStrategy(StrategyWrapper):
    """Encrypted rounds: codec ``ckks``, a :class:`CkksSum` accumulator; the inner strategy
    applies the decrypted mean."""

    def __init__(self, inner: Strategy, he: HEContext) -> None:
        super().__init__(inner)
        self.he = he

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        cfg = self.inner.configure(round_id, base)
        return TrainingConfig(**{**cfg.to_dict(), "codec": CKKS})

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> Accumulator:
        return CkksSum(shapes, self.he)


class AwaitDecryption:
    """A round policy wrapper: close only once the decryptor answered; see the module
    docstring."""

    def __init__(self, inner: RoundPolicy, engine: Engine, timeout: float) -> None:
        self.inner = inner
        self.engine = engine
        self.timeout = timeout
        self.sum_topic, self.mean_topic = he_topics(engine.config.topics.base)
        self._sealed_at: dict[int, float] = {}
        self._outgoing: list[Outgoing] = []

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return (self.mean_topic,)

    def _fold(self) -> CkksSum | None:
        fold = self.engine.ingest.fold
        return fold if isinstance(fold, CkksSum) else None

    # -- RoundPolicy ------------------------------------------------------------------------
    def plan(self, ctx: RoundContext) -> RoundPlan | None:
        self._sealed_at.clear()
        return self.inner.plan(ctx)

    def is_ready(self, state: RoundState, now: float) -> bool:
        fold = self._fold()
        if fold is None:
            return self.inner.is_ready(state, now)
        if fold.decrypted:
            return True
        if not fold.sealed:
            if not self.inner.is_ready(state, now):
                return False
            self._seal(state, fold, now)
        return False

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        fold = self._fold()
        if fold is None or not fold.sealed:
            return self.inner.is_abandoned(state, now)
        sealed_at = self._sealed_at.setdefault(state.round_id, now)
        if now - sealed_at <= self.timeout:
            return False
        log.error(
            "round %d abandoned: no decrypted mean from the decryptor on %s within "
            "he_decrypt_timeout %gs (is `fedmq he decrypt` running?)",
            state.round_id, self.sum_topic, self.timeout,
        )
        return True

    def _seal(self, state: RoundState, fold: CkksSum, now: float) -> None:
        blobs, digest = fold.seal()
        self._sealed_at[state.round_id] = now
        coord = self.engine.coordinator
        req = SumRequest(
            self.engine.config.fleet, coord.epoch, state.round_id, fold.count,
            fold.total_weight, dict(fold.shapes), tuple(blobs), digest,
        )
        payload = req.encode()
        self._outgoing.append(coord.traffic.emit(self.sum_topic, payload))
        log.info(
            "round %d: encrypted sum of %d update(s) (weight %g, %d ciphertexts, %d bytes) "
            "sent to the decryptor, digest %s", state.round_id, fold.count, fold.total_weight,
            len(blobs), len(payload), digest[:16],
        )

    # -- the service's hooks -----------------------------------------------------------------
    def take_outgoing(self) -> list[Outgoing]:
        out, self._outgoing = self._outgoing, []
        return out

    def on_message(self, topic: str, payload: bytes) -> None:
        """The decryptor's answer: set the open round's mean when it is for its sealed sum."""
        if topic != self.mean_topic or not payload:
            return
        try:
            res = MeanResult.decode(payload)
        except WireError as exc:
            log.warning("ignoring a bad decrypted mean on %s: %s", topic, exc.reason)
            return
        state, fold = self.engine.coordinator.round, self._fold()
        coord = self.engine.coordinator
        if (state is None or fold is None or not fold.sealed or fold.decrypted
                or res.fleet != self.engine.config.fleet or res.epoch != coord.epoch
                or res.round_id != state.round_id):
            log.debug("ignoring a decrypted mean for round %d (not the sealed round)",
                      res.round_id)
            return
        try:
            fold.set_mean(res.digest, res.count, res.total_weight, res.mean)
        except ValueError as exc:
            log.warning("ignoring the decrypted mean of round %d: %s", res.round_id, exc)
            return
        log.info("round %d: decrypted mean received (%d updates)", res.round_id, res.count)


def install_he(config: AggregatorConfig, engine: Engine) -> AwaitDecryption | None:
    """Turn ``engine`` into an HE aggregator when ``he_context`` is set (before start)."""
    if not config.he_context:
        return None
    he = load_public_context(config.he_context)
    register_ckks(he)
    coord = engine.coordinator
    coord.strategy = HEStrategy(coord.strategy, he)
    policy = AwaitDecryption(coord.policy, engine, config.he_decrypt_timeout)
    coord.policy = policy
    log.info(
        "homomorphic encryption on: updates are CKKS ciphertexts (N=%d, %d slots); the "
        "decryptor answers on %s", he.params.poly_degree, he.params.slots, policy.mean_topic,
    )
    return policy


def he_mode(engine: Engine) -> AwaitDecryption | None:
    """The HE policy installed on ``engine`` (None when HE is off)."""
    policy = engine.coordinator.policy
    return policy if isinstance(policy, AwaitDecryption) else None
