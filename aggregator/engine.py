"""The aggregator without MQTT: payloads and a clock in, messages to publish out.

A thin composition of :class:`~aggregator.ingest.Ingest` (decode, authenticate, check,
journal, fold, ack one update) and :class:`~aggregator.coordinator.Coordinator` (rounds as
the round policy says, strategy, evaluation, model and round publication). The service feeds
it raw update payloads (:meth:`Engine.handle_update`), status payloads
(:meth:`Engine.on_status`) and timer ticks (:meth:`Engine.tick`); the engine answers with
:class:`Outgoing` messages. An accepted update is journaled durably before
:meth:`Engine.handle_update` returns, so the caller may send the MQTT PUBACK afterwards.
"""

from __future__ import annotations

import numpy as np

from aggregator.bundles import content_digest, model_id_of, resolve_bundle
from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator, RoundResult
from aggregator.evaluate import Evaluator
from aggregator.ingest import Ingest
from aggregator.metrics import AggregatorMetrics
from aggregator.outgoing import Outgoing, RoundTraffic
from aggregator.policies import RoundPolicy
from aggregator.round_state import RoundState
from aggregator.store import Store
from fedmq.models.spec import ModelBundle
from fedmq.update.accumulate import Accumulator
from fedmq.update.strategies import Strategy
from fedmq.wire import AckMessage

__all__ = [
    "Engine",
    "Outgoing",
    "RoundResult",
    "content_digest",
    "model_id_of",
    "resolve_bundle",
]


class Engine:
    """One ingest and one coordinator over a :class:`Store`; no network I/O."""

    def __init__(
        self,
        config: AggregatorConfig,
        store: Store,
        bundle: ModelBundle,
        evaluator: Evaluator | None = None,
        metrics: AggregatorMetrics | None = None,
        policy: RoundPolicy | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.bundle = bundle
        self.metrics = metrics or AggregatorMetrics()
        self.template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        traffic = RoundTraffic(self.metrics)
        self.ingest = Ingest(config, store, self.template, traffic, self.metrics)
        self.coordinator = Coordinator(config, store, bundle, self.ingest, evaluator, policy)

    # -- the coordinator -------------------------------------------------------------------
    def start(self, now: float, tick: bool = True) -> list[Outgoing]:
        """Load (or create) the state and rebuild the open round (see Coordinator.start)."""
        return self.coordinator.start(now, tick)

    def on_status(self, topic_device: str, payload: bytes, now: float) -> list[Outgoing]:
        """A device's status; what to publish (after an epoch rotation, see Coordinator)."""
        return self.coordinator.on_status(topic_device, payload, now)

    def on_model(self, payload: bytes, now: float) -> list[Outgoing]:
        """The retained model on the broker; what to publish (see Coordinator.on_model)."""
        return self.coordinator.on_model(payload, now)

    @property
    def epoch(self) -> str:
        return self.coordinator.epoch

    def tick(self, now: float) -> list[Outgoing]:
        return self.coordinator.tick(now)

    def current_messages(self, now: float) -> list[Outgoing]:
        return self.coordinator.current_messages(now)

    def pop_results(self) -> list[RoundResult]:
        return self.coordinator.pop_results()

    @property
    def done(self) -> bool:
        return self.coordinator.done

    @property
    def round(self) -> RoundState | None:
        return self.coordinator.round

    @property
    def version(self) -> int:
        return self.coordinator.version

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.coordinator.weights

    @property
    def strategy(self) -> Strategy:
        return self.coordinator.strategy

    @property
    def model_id(self) -> str:
        return self.coordinator.model_id

    @property
    def online(self) -> set[str]:
        return self.coordinator.online

    # -- the ingest ------------------------------------------------------------------------
    def handle_update(
        self, topic_device: str, payload: bytes, now: float, *, retained: bool = False
    ) -> AckMessage:
        """Decode, check, journal (durably), fold; the ack to send (see Ingest)."""
        return self.ingest.handle_update(topic_device, payload, now, retained=retained)

    def ack_outgoing(self, ack: AckMessage) -> Outgoing | None:
        return self.ingest.ack_outgoing(ack)

    @property
    def fold(self) -> Accumulator | None:
        return self.ingest.fold
