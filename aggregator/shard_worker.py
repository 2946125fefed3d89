"""One sharded ingest worker: a member of the MQTT shared subscription of a fleet's updates.

Run N of them (``fedmq aggregator shard-worker --config F --worker w1`` or
``python -m aggregator.shard_worker --worker w1 ...``), each with a FIXED
worker name: its MQTT client id (``fedmq-ingest-<fleet>-<worker>``), its persistent session
(clean_start false, MQTT v5 session expiry) and its partial sum's key in the store all
derive from it, so a restarted worker (systemd ``Restart=always``, a StatefulSet pod) gets
its session's unacknowledged updates back and continues its committed partial.

Per update: decode and authenticate (optional registry), then the single-process ingest's
checks and bounds (:mod:`aggregator.ingest`), reused: the device against the topic, the
signature, the fleet/epoch/round (:func:`~aggregator.round_state.check_route`: a stale round
is ``wrong_round``, the store's closed round ``round_closed``, as in one process), the base
version, the round's codec, the tensors against the model
(:class:`~fedmq.update.fixedpoint.FixedPointSum`), the claimed-examples cap
(:class:`~aggregator.round_state.RoundState`), the fold weight capped by the registry and
the relative cap, the L2-norm bound with ``norm_action`` clip or reject
(:class:`~aggregator.bounds.RoundBounds`, frozen for the round by the coordinator so every
worker decides alike). It adds the (clipped) update to the in-memory partial.

Group commit (:meth:`ShardWorker.handle_batch`): the updates the broker has delivered and
the worker has not yet handled (up to :data:`MAX_BATCH` and :data:`MAX_BATCH_BYTES`) are
checked one by one, then their
claims (epoch, round, device) with how each was folded (weight, clip factor, norm) and the
whole partial go to the store in ONE atomic Redis script
(:meth:`~aggregator.shard_store.ShardStore.commit`): the partial (8 bytes per parameter) is
written once per batch, not once per update. A device the store finds claimed is taken back
out of the partial (exact integer subtraction) and answered; the rest is committed again.
Only after the commit the acks go to the devices and the MQTT PUBACKs to the broker. Two ways
to send the PUBACK (``--ack-mode``): ``manual`` (default: the network thread queues, one
ingest thread commits batches, then :meth:`paho.mqtt.client.Client.ack`) and ``callback``
(each update handled and committed alone in the network thread; paho PUBACKs it when
``on_message`` returns). The acks to devices go out on a second MQTT connection
(``<client id>-acks``), so their PUBACKs do not queue behind the stream of updates. When the
store fails the worker exits non-zero WITHOUT acknowledging (in ``callback`` mode by
``os._exit`` inside the callback, so paho never sends that PUBACK): the broker redelivers
the updates to the same session when the worker comes back.

Not done by a worker (docs/scaling.md): staleness weighting (rounds are synchronous),
secure aggregation, DP clipping and the per-update journal; the committed partial and the
claims are the durable record. Settings: :mod:`aggregator.shard_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis

from aggregator.bounds import update_norm
from aggregator.bundles import resolve_bundle
from aggregator.inbox import Inbox
from aggregator.round_state import RoundPlan, RoundState, check_route
from aggregator.service_loop import EXIT_STORE, run_until_signalled, service_main
from aggregator.shard_config import WORKER_FLAGS, ShardConfig, add_flags, config_from_args
from aggregator.shard_metrics import MeteredShardStore, ShardWorkerMetrics
from aggregator.shard_store import (
    Claim,
    Fold,
    GatewayClaim,
    IngestStore,
    OpenRound,
)
from fedmq.errors import ConfigError, Rejected, RejectReason, SecurityError, StateError, WireError
from fedmq.net.mqtt import MqttSettings, connect, make_client
from fedmq.signing import Registry, verify_update
from fedmq.topics import validate_name
from fedmq.update.accumulate import CheckedUpdate, scaled
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import AckMessage, Limits, ReceivedUpdate, UpdateMessage, encode, receive_update

__all__ = ["Fenced", "ShardWorker", "add_arguments", "command", "main", "worker_client_id"]

log = logging.getLogger(__name__)


def worker_client_id(fleet: str, worker: str) -> str:
    return f"fedmq-ingest-{validate_name(fleet, 'fleet')}-{validate_name(worker, 'worker')}"


class Fenced(redis.RedisError):
    """A newer process registered the same worker name: this one must stop, unacknowledged."""


class ShardWorker:
    """See the module docstring; :meth:`handle` is the per-update path (no MQTT)."""

    def __init__(
        self,
        store: IngestStore,
        template: dict[str, tuple[int, ...]],
        worker: str,
        *,
        registry: Registry | None = None,
        max_update_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.fleet = store.fleet
        self.template = template
        self.worker = validate_name(worker, "worker")
        self.registry = registry
        self.limits = Limits(max_bytes=max_update_bytes)
        self.loaded: tuple[str, int] | None = None
        self.generation = store.register_worker(self.worker)
        self.acc = FixedPointSum(template)
        self.committed = 0
        self._state: tuple[tuple[str, int, int], RoundState] | None = None

    def _load(self, epoch: str, round_id: int) -> None:
        """This worker's committed partial of (epoch, round), or an empty one."""
        if self.loaded == (epoch, round_id):
            return
        blob = self.store.partial(epoch, round_id, self.worker)
        self.acc = (
            FixedPointSum(self.template) if blob is None
            else FixedPointSum.from_bytes(blob, self.template)
        )
        self.loaded = (epoch, round_id)
        if blob is not None:
            log.info("worker %s continues its partial of round %d (%d update(s))",
                     self.worker, round_id, self.acc.count)

    def _round_state(self, rnd: OpenRound) -> RoundState:
        """The single-process round checks (:class:`RoundState`) for the store's round."""
        key = (rnd.epoch, rnd.round_id, rnd.base_version)
        if self._state is None or self._state[0] != key:
            plan = RoundPlan(
                round_id=rnd.round_id, base_version=rnd.base_version, selected=(),
                target=max(1, rnd.target), min_updates=1, opened_at=rnd.deadline,
                deadline=rnd.deadline, abandon_at=rnd.deadline, config=rnd.rules.config,
                epoch=rnd.epoch,
            )
            self._state = (key, RoundState(self.fleet, plan, rnd.rules.max_examples))
        return self._state[1]

    def _registry_cap(self, device: str) -> int | None:
        if self.registry is None:
            return None
        try:
            return self.registry.max_weight(device)
        except SecurityError as exc:
            log.error("device registry: %s", exc)
            return None

    def handle(self, topic_device: str, payload: bytes, now: float) -> AckMessage:
        """Check, fold and commit one update; the ack for the device (see
        :meth:`handle_batch`)."""
        return self.handle_batch([(topic_device, payload)], now)[0]

    def handle_batch(self, items: Sequence[tuple[str, bytes]], now: float) -> list[AckMessage]:
        """Check and fold each (topic device, payload) of ``items``, then commit them
        together (group commit: one store call and one write of the partial for the batch);
        the acks, in the order of ``items``. A device's second update in the batch commits
        the first one's batch before it is checked. Raises :class:`redis.RedisError` (or
        WireError for a damaged stored partial) when the store fails: nothing of the batch
        may be acknowledged then (the updates stay the broker's, redelivered)."""
        acks: dict[int, AckMessage] = {}
        staged: dict[str, _Staged] = {}
        rnd = self.store.open_round()
        for index, (device, payload) in enumerate(items):
            if device in staged and rnd is not None:
                acks.update(self._commit(rnd, staged, now))
                staged = {}
            out = self._check(index, device, payload, rnd, now)
            if isinstance(out, AckMessage):
                acks[index] = out
            else:
                staged[device] = out
        if staged and rnd is not None:
            acks.update(self._commit(rnd, staged, now))
        return [acks[i] for i in range(len(items))]

    def _check(self, index: int, topic_device: str, payload: bytes, rnd: OpenRound | None,
               now: float) -> AckMessage | _Staged:
        """The single-process ingest's checks of the batch's ``index``-th update against the
        store's round; the update folded into the in-memory partial (not yet committed), or
        the refusal."""
        try:
            validate_name(topic_device, "device")
            received = receive_update(payload, self.limits)
        except (ConfigError, WireError) as exc:
            reason = exc.reason if isinstance(exc, WireError) else str(exc)
            log.warning("rejected update from %s (%d bytes): %s", topic_device, len(payload),
                        reason)
            return AckMessage(self.fleet, 0, topic_device, "", False, RejectReason.MALFORMED,
                              reason[:1000], now)
        msg = received.message
        try:
            # the single-process order (aggregator.ingest): the device against the topic,
            # the signature, then the fleet and the round
            check_route(msg, topic_device)
            self._authenticate(received)
            rnd = self._check_round(msg, topic_device, rnd)
            self._load(rnd.epoch, rnd.round_id)
            bounds = rnd.rules.bounds
            # the capped weight, the round checks (base version, the round's codec, the
            # tensors against the model with that weight, the examples cap), then the norm
            # bound, under the limits the coordinator froze for this round
            weight = bounds.weight(msg.num_examples, self._registry_cap(msg.device))
            checked: list[CheckedUpdate] = []
            self._round_state(rnd).check(
                msg, topic_device,
                lambda m: checked.append(self.acc.check(m.tensors, m.codec, weight)),
            )
            norm = update_norm(checked[0].tensors, msg.codec)
            try:
                clip = bounds.check_norm(norm)
            except Rejected:
                if math.isfinite(norm):
                    self.store.note_rejected_norm(rnd.epoch, rnd.round_id, msg.device, norm)
                raise
        except Rejected as exc:
            return self._refuse(msg, topic_device, exc.code, exc.reason, now)
        except ValueError as exc:
            return self._refuse(msg, topic_device, RejectReason.MALFORMED, str(exc), now)
        folded = scaled(checked[0], clip)
        self.acc.add(folded)
        fold = Fold(self.worker, msg.update_id, msg.num_examples, folded.weight, clip, norm)
        return _Staged(index, msg, topic_device, folded, fold)

    def _authenticate(self, received: ReceivedUpdate) -> None:
        if self.registry is None:
            return
        msg = received.message
        try:
            verify_update(received, self.registry.public_key(msg.device))
        except SecurityError as exc:
            raise Rejected(str(exc), RejectReason.UNKNOWN_DEVICE) from exc

    def _check_round(self, msg: UpdateMessage, topic_device: str,
                     rnd: OpenRound | None) -> OpenRound:
        """The open round; none open: refused as the single process refuses it
        (``round_closed`` for the store's closed round or an earlier one, else
        ``wrong_round``). The open round's own checks are :class:`RoundState`'s."""
        if rnd is not None and rnd.state == "open":
            return rnd
        if rnd is None:
            check_route(msg, topic_device, self.fleet)
        else:
            check_route(msg, topic_device, self.fleet, last_round=rnd.round_id,
                        epoch=rnd.epoch)
        raise Rejected(f"round {msg.round_id} is not open", RejectReason.WRONG_ROUND)

    def _commit(self, rnd: OpenRound, staged: dict[str, _Staged],
                now: float) -> dict[int, AckMessage]:
        """Commit the staged updates together; a device the store finds claimed is taken
        out of the partial and answered, and the rest committed again."""
        acks: dict[int, AckMessage] = {}
        staged = dict(staged)
        while staged:
            try:
                res = self.store.commit(rnd.epoch, rnd.round_id, self.worker,
                                        {d: s.fold for d, s in staged.items()},
                                        self.acc.to_bytes(), self.generation)
            except BaseException:
                for s in staged.values():  # unknown outcome: the reload on restart decides
                    self.acc.remove(s.folded)
                self.loaded = None
                raise
            if res.status == "ok":
                self.committed += len(staged)
                for s in staged.values():
                    acks[s.index] = self._accepted(s, now)
                return acks
            if res.status == "claimed" and res.conflicts:
                for device, claim in res.conflicts.items():
                    s = staged.pop(device)
                    self.acc.remove(s.folded)
                    acks[s.index] = self._claimed(s, claim, rnd.round_id, now)
                continue
            for s in staged.values():
                self.acc.remove(s.folded)
            if res.status == "fenced":
                raise Fenced(f"another process runs as worker {self.worker!r}: this one stops")
            for s in staged.values():
                acks[s.index] = self._refuse(s.msg, s.device, RejectReason.ROUND_CLOSED,
                                             f"round {s.msg.round_id} closed meanwhile", now)
            return acks
        return acks

    def _accepted(self, s: _Staged, now: float) -> AckMessage:
        msg, fold = s.msg, s.fold
        log.debug("committed update %s from %s (round %d, partial of %d)",
                  msg.update_id, msg.device, msg.round_id, self.acc.count)
        notes = []
        if fold.scale < 1.0:
            notes.append(f"update L2 norm {fold.norm:.4g} over the bound: delta folded scaled "
                         f"by {fold.scale:.6g} (to norm {fold.norm * fold.scale:.4g})")
        if fold.weight < msg.num_examples:
            notes.append(f"claims {msg.num_examples} examples: folded with weight "
                         f"{fold.weight:.6g} (capped)")
        if notes:
            log.info("update %s from %s: %s", msg.update_id, msg.device, "; ".join(notes))
        return self._answer(msg, s.device, "ok", "; ".join(notes), True, now)

    def _claimed(self, s: _Staged, claim: Claim, round_id: int, now: float) -> AckMessage:
        msg = s.msg
        if isinstance(claim, Fold) and claim.update_id == msg.update_id:
            log.info("update %s from %s was already committed (by %s): answered duplicate",
                     msg.update_id, msg.device, claim.worker)
            return self._answer(msg, s.device, RejectReason.DUPLICATE,
                                f"update {msg.update_id} was already folded in round "
                                f"{round_id}", True, now)
        if isinstance(claim, GatewayClaim):
            return self._refuse(msg, s.device, RejectReason.DUPLICATE,
                                f"device {msg.device} is in gateway {claim.gateway}'s partial "
                                f"{claim.partial_id} of round {round_id}", now)
        return self._refuse(msg, s.device, RejectReason.DUPLICATE,
                            f"device {msg.device} already has update {claim.update_id} in "
                            f"round {round_id}", now)

    def _refuse(self, msg: UpdateMessage, topic_device: str, code: str, reason: str,
                now: float) -> AckMessage:
        log.warning("rejected update %s from %s (round %d): %s: %s",
                    msg.update_id, topic_device, msg.round_id, code, reason)
        return self._answer(msg, topic_device, code, reason, False, now)

    def _answer(self, msg: UpdateMessage, topic_device: str, code: str, reason: str,
                accepted: bool, now: float) -> AckMessage:
        return AckMessage(self.fleet, msg.round_id, topic_device, msg.update_id, accepted,
                          code, reason[:1000], now)


@dataclass(frozen=True)
class _Staged:
    """An update checked and folded into the worker's partial, not yet committed; ``index``
    is its place in the batch (its ack's)."""

    index: int
    msg: UpdateMessage
    device: str
    folded: CheckedUpdate
    fold: Fold


#: most updates, and most payload bytes, one group commit takes from the queue. A staged
#: update holds its decoded tensors until the commit, so the bytes bound the worker's memory
#: beyond its queue (``ingest_queue_bytes``): O(model) whatever the number of devices
#: (docs/scaling.md).
MAX_BATCH = 64
MAX_BATCH_BYTES = 4 * 1024 * 1024


class _Runner:
    """The MQTT side: shared subscription, persistent session, PUBACK after the commit.

    ``manual`` acks: the network thread only queues each update in the single process's
    :class:`~aggregator.inbox.Inbox` (bounded by ``ingest_queue_bytes``: when it is full the
    network thread waits and the broker keeps the backlog); one ingest thread takes whatever
    is queued (up to :data:`MAX_BATCH` updates and :data:`MAX_BATCH_BYTES`), commits it as
    one group and then answers and PUBACKs each update. ``callback``: each update is handled
    (and committed alone) in the network thread, and paho PUBACKs it when the callback
    returns. Either way the acks to devices (QoS 1) go out on a second connection (client
    id ``<worker's>-acks``, clean start; login ``[shard] ack_username``, the worker's own by
    default): on the subscription's connection their PUBACKs queue behind the updates the
    broker keeps sending, and paho's network thread also stops writing while the inbox is
    full, so under a backlog the acks fell further and further behind the commits
    (docs/scaling.md)."""

    def __init__(self, config: ShardConfig) -> None:
        self.topics = config.topics
        shard = config.shard
        self.settings = replace(
            config.mqtt, client_id=worker_client_id(config.fleet, shard.worker),
            clean_start=False,
        )
        bundle = resolve_bundle(config.model)
        template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        registry = Registry(Path(config.registry)) if config.registry else None
        self.metrics = ShardWorkerMetrics()
        self.metrics_port = shard.worker_metrics_port
        self.metrics_host = config.metrics_host
        self.store = MeteredShardStore(shard.redis, config.fleet, self.metrics)
        self.worker = ShardWorker(self.store, template, shard.worker, registry=registry,
                                  max_update_bytes=config.max_update_bytes)
        self.group = shard.group
        self.ready_file = Path(shard.ready_file) if shard.ready_file else None
        self.manual_ack = shard.ack_mode == "manual"
        self.client = make_client(self.settings, manual_ack=self.manual_ack)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.ack_settings = ack_connection(self.settings, shard.ack_username)
        self.acks = make_client(self.ack_settings)
        self.inbox: Inbox[mqtt.MQTTMessage] = Inbox(config.ingest_queue_bytes,
                                                    max(1.0, self.settings.keepalive / 4))
        self.failed = threading.Event()
        self.largest_batch = 0

    @property
    def subscription(self) -> str:
        return f"$share/{self.group}/{self.topics.update_wildcard}"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        log.info("worker %s connected (session present: %s)", self.worker.worker,
                 flags.session_present)
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any = None) -> None:
        log.info("worker %s subscribed to %s", self.worker.worker, self.subscription)
        if self.ready_file is not None:
            self.ready_file.write_text("ready\n")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.failed.is_set():
            return  # never acknowledged: redelivered to this session after the restart
        if self.manual_ack:
            self.inbox.put(message, len(message.payload))  # waits while the inbox is full
        else:
            self._ingest([message])

    def _ingest_loop(self) -> None:
        """The manual-ack ingest thread: group commits of whatever the broker delivered."""
        while not self.failed.is_set():
            first = self.inbox.get(timeout=0.2)
            if first is None:
                continue
            batch, size = [first], len(first.payload)
            while len(batch) < MAX_BATCH and size < MAX_BATCH_BYTES:
                more = self.inbox.get(timeout=0)
                if more is None:
                    break
                batch.append(more)
                size += len(more.payload)
            self.largest_batch = max(self.largest_batch, len(batch))
            self._ingest(batch)

    def _ingest(self, batch: list[mqtt.MQTTMessage]) -> None:
        items = [(m.topic.rsplit("/", 1)[-1], bytes(m.payload)) for m in batch]
        self.metrics.bytes_in.inc(sum(len(p) for _, p in items))
        try:
            answers = self.worker.handle_batch(items, time.time())
        except (redis.RedisError, WireError, StateError, OSError) as exc:
            log.error("store %s failed: %s; exiting without acknowledging %d update(s)",
                      self.store.url, exc, len(batch))
            if not self.manual_ack:  # returning would let paho send the PUBACK
                logging.shutdown()
                os._exit(EXIT_STORE)
            self.failed.set()
            self.client.disconnect()
            return
        self.metrics.count_acks(answers)
        for message, (device, _), ack in zip(batch, items, answers, strict=True):
            with contextlib.suppress(ConfigError):  # a device id that cannot be a topic
                self.acks.publish(self.topics.ack(device), encode(ack), qos=1)
            if self.manual_ack:
                self.client.ack(message.mid, message.qos)

    def run(self) -> int:
        def stopped() -> None:
            log.info("worker %s stopped (%d update(s) committed; largest group commit %d, "
                     "queue peak %d bytes)", self.worker.worker, self.worker.committed,
                     self.largest_batch, self.inbox.peak_bytes)

        if self.metrics_port:
            self.metrics.serve(self.metrics_port, self.metrics_host)
        connect(self.acks, self.ack_settings)
        self.acks.loop_start()
        ingest = threading.Thread(target=self._ingest_loop, name="ingest", daemon=True)
        if self.manual_ack:
            ingest.start()
        try:
            return run_until_signalled(self.client, self.settings, ping=self.store.ping,
                                       failed=self.failed, stopped=stopped)
        finally:
            self.failed.set()  # ends the ingest thread after its batch
            self.inbox.close()  # releases a waiting put: those updates stay unacknowledged
            if ingest.is_alive():
                ingest.join(timeout=30)
            self.acks.disconnect()
            self.acks.loop_stop()


def ack_connection(settings: MqttSettings, username: str) -> MqttSettings:
    """The settings of a worker's ack connection: ``<client id>-acks``, clean start, as
    ``username`` (with the worker's password) when given, else with the worker's login. A
    broker that binds client ids to logins (``use_username_as_clientid``, as ``fedmq broker
    init`` does) needs its own login for it: ``fedmq broker add-service``."""
    return replace(settings, client_id=f"{settings.client_id}-acks", clean_start=True,
                   session_expiry=0, username=username or settings.username)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_flags(p, WORKER_FLAGS)


def command(args: argparse.Namespace) -> int:
    """Load the configuration from ``args`` and run the worker."""
    try:
        config = config_from_args(args, WORKER_FLAGS).for_worker()
        config.mqtt.check_files()
        return _Runner(config).run()
    except (ConfigError, StateError, redis.RedisError, OSError) as exc:
        log.error("shard worker: %s", exc)
        return EXIT_STORE if isinstance(exc, redis.RedisError) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.shard_worker",
                                description="a sharded ingest worker (docs/scaling.md)")
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    return service_main(build_parser(), argv, command, log=log)


if __name__ == "__main__":
    sys.exit(main())
