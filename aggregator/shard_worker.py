"""One sharded ingest worker: a member of the MQTT shared subscription of a fleet's updates.

Run N of them (``fedmq aggregator shard-worker --config F --worker w1`` or
``python -m aggregator.shard_worker --worker w1 ...``), each with a FIXED
worker name: its MQTT client id (``fedmq-ingest-<fleet>-<worker>``), its persistent session
(clean_start false, MQTT v5 session expiry) and its partial sum's key in the store all
derive from it, so a restarted worker (systemd ``Restart=always``, a StatefulSet pod) gets
its session's unacknowledged updates back and continues its committed partial.

Per update, in the MQTT network thread: decode and authenticate (optional registry), then
the single-process ingest's checks and bounds (:mod:`aggregator.ingest`), reused: the
fleet/device/epoch/round/base version, the round's codec, the tensors against the model
(:class:`~fedmq.update.fixedpoint.FixedPointSum`), the claimed-examples cap
(:class:`~aggregator.round_state.RoundState`), the fold weight capped by the registry and
the relative cap, the L2-norm bound with ``norm_action`` clip or reject
(:class:`~aggregator.bounds.RoundBounds`, frozen for the round by the coordinator so every
worker decides alike). It adds the (clipped) update to the in-memory partial, then commits
the claim (epoch, round, device) with how it was folded (weight, clip factor, norm) and the
whole partial in ONE atomic Redis script (:meth:`~aggregator.shard_store.ShardStore.commit`).
Only then the ack goes to the device and the MQTT PUBACK to the broker. Two ways to send it
(``--ack-mode``): ``manual`` (default) uses paho's ``manual_ack`` and
:meth:`paho.mqtt.client.Client.ack` after the commit;
``callback`` lets paho send the PUBACK when ``on_message`` returns, which it does only after
the commit. Both acknowledge only committed (or answered) updates, at the same speed here
(1,000 updates through one worker: 1,733 and 1,679 updates/s). A refused commit (round
closed, device already claimed by this or another worker) takes the update back out of the
partial (exact integer subtraction). When the store fails the worker exits non-zero WITHOUT
acknowledging (in ``callback`` mode by ``os._exit`` inside the callback, so paho never sends
that PUBACK): the broker redelivers the update to the same session when the worker comes back.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis

from aggregator.bounds import update_norm
from aggregator.bundles import resolve_bundle
from aggregator.round_state import RoundPlan, RoundState
from aggregator.service_loop import EXIT_STORE, run_until_signalled, service_main
from aggregator.shard_config import WORKER_FLAGS, ShardConfig, add_flags, config_from_args
from aggregator.shard_store import Fold, GatewayClaim, IngestStore, OpenRound, ShardStore
from fedmq.errors import ConfigError, Rejected, RejectReason, SecurityError, StateError, WireError
from fedmq.net.mqtt import make_client
from fedmq.signing import Registry, verify_update
from fedmq.topics import validate_name
from fedmq.update.accumulate import CheckedUpdate, scaled
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import AckMessage, Limits, encode, receive_update

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
        """Check, fold and commit one update; the ack for the device. Raises
        :class:`redis.RedisError` (or WireError for a damaged stored partial) when the store
        fails: nothing is acknowledged then."""
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
        rnd = self.store.open_round()

        def reject(code: str, reason: str, accepted: bool = False) -> AckMessage:
            if not accepted:
                log.warning("rejected update %s from %s (round %d): %s: %s",
                            msg.update_id, topic_device, msg.round_id, code, reason)
            return AckMessage(self.fleet, msg.round_id, topic_device, msg.update_id, accepted,
                              code, reason[:1000], now)

        if msg.fleet != self.fleet:
            return reject(RejectReason.WRONG_FLEET, f"update is for fleet {msg.fleet!r}")
        if msg.device != topic_device:
            return reject(RejectReason.DEVICE_MISMATCH,
                          f"payload device {msg.device!r} differs from topic device")
        if self.registry is not None:
            try:
                verify_update(received, self.registry.public_key(msg.device))
            except Rejected as exc:
                return reject(exc.code, exc.reason)
            except SecurityError as exc:
                return reject(RejectReason.UNKNOWN_DEVICE, str(exc))
        if rnd is None or (msg.epoch and msg.epoch != rnd.epoch) or msg.round_id > rnd.round_id:
            return reject(RejectReason.WRONG_ROUND, f"round {msg.round_id} is not open")
        if msg.round_id < rnd.round_id or rnd.state != "open":
            return reject(RejectReason.ROUND_CLOSED, f"round {msg.round_id} is closed")
        self._load(rnd.epoch, rnd.round_id)
        bounds = rnd.rules.bounds
        # The single-process ingest's checks in its order (aggregator.ingest): the capped
        # weight, the round checks (base version, the round's codec, the tensors against the
        # model with that weight, the examples cap), then the norm bound, under the limits
        # the coordinator froze for this round.
        weight = bounds.weight(msg.num_examples, self._registry_cap(msg.device))
        checked: list[CheckedUpdate] = []
        try:
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
            return reject(exc.code, exc.reason)
        except ValueError as exc:
            return reject(RejectReason.MALFORMED, str(exc))
        folded = scaled(checked[0], clip)
        self.acc.add(folded)
        fold = Fold(self.worker, msg.update_id, msg.num_examples, folded.weight, clip, norm)
        try:
            res = self.store.commit(rnd.epoch, rnd.round_id, msg.device, fold,
                                    self.acc.to_bytes(), self.generation)
        except BaseException:
            self.acc.remove(folded)  # unknown outcome: the reload on restart decides
            self.loaded = None
            raise
        if res.status == "ok":
            self.committed += 1
            log.debug("committed update %s from %s (round %d, partial of %d)",
                      msg.update_id, msg.device, rnd.round_id, self.acc.count)
            notes = []
            if clip < 1.0:
                notes.append(f"update L2 norm {norm:.4g} over the bound: delta folded scaled "
                             f"by {clip:.6g} (to norm {norm * clip:.4g})")
            if folded.weight < msg.num_examples:
                notes.append(f"claims {msg.num_examples} examples: folded with weight "
                             f"{folded.weight:.6g} (capped)")
            if notes:
                log.info("update %s from %s: %s", msg.update_id, msg.device, "; ".join(notes))
            return reject("ok", "; ".join(notes), accepted=True)
        self.acc.remove(folded)
        if res.status == "fenced":
            raise Fenced(f"another process runs as worker {self.worker!r}: this one stops")
        if res.status == "closed" or res.claim is None:
            return reject(RejectReason.ROUND_CLOSED, f"round {msg.round_id} closed meanwhile")
        if isinstance(res.claim, Fold) and res.claim.update_id == msg.update_id:
            log.info("update %s from %s was already committed (by %s): answered duplicate",
                     msg.update_id, msg.device, res.claim.worker)
            return reject(RejectReason.DUPLICATE,
                          f"update {msg.update_id} was already folded in round {rnd.round_id}",
                          accepted=True)
        if isinstance(res.claim, GatewayClaim):
            return reject(RejectReason.DUPLICATE,
                          f"device {msg.device} is in gateway {res.claim.gateway}'s partial "
                          f"{res.claim.partial_id} of round {rnd.round_id}")
        return reject(RejectReason.DUPLICATE,
                      f"device {msg.device} already has update {res.claim.update_id} in round "
                      f"{rnd.round_id}")


class _Runner:
    """The MQTT side: shared subscription, persistent session, manual PUBACK."""

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
        self.store = ShardStore(shard.redis, config.fleet)
        self.worker = ShardWorker(self.store, template, shard.worker, registry=registry,
                                  max_update_bytes=config.max_update_bytes)
        self.group = shard.group
        self.ready_file = Path(shard.ready_file) if shard.ready_file else None
        self.manual_ack = shard.ack_mode == "manual"
        self.client = make_client(self.settings, manual_ack=self.manual_ack)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.failed = threading.Event()
        self.stopping = False

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

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: Any,
                    props: Any = None) -> None:
        # fedmq.net.mqtt's client remembers each QoS 1 message's topic until it is acked:
        # forget it here, or a worker's memory would grow by one entry per device ack.
        topics = getattr(client, "topic_of_mid", None)
        if topics is not None:
            topics.pop(mid, None)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.failed.is_set():
            return  # never acknowledged: redelivered to this session after the restart
        device = message.topic.rsplit("/", 1)[-1]
        try:
            ack = self.worker.handle(device, bytes(message.payload), time.time())
        except (redis.RedisError, WireError, StateError, OSError) as exc:
            log.error("store %s failed: %s; exiting without acknowledging update of %s",
                      self.store.url, exc, device)
            if not self.manual_ack:  # returning would let paho send the PUBACK
                logging.shutdown()
                os._exit(EXIT_STORE)
            self.failed.set()
            client.disconnect()
            return
        with contextlib.suppress(ConfigError):  # a device id that cannot be a topic
            client.publish(self.topics.ack(device), encode(ack), qos=1)
        if self.manual_ack:
            client.ack(message.mid, message.qos)

    def run(self) -> int:
        def stopping() -> None:
            self.stopping = True

        def stopped() -> None:
            log.info("worker %s stopped (%d update(s) committed)", self.worker.worker,
                     self.worker.committed)

        return run_until_signalled(self.client, self.settings, ping=self.store.ping,
                                   failed=self.failed, stopped=stopped, on_signal=stopping)


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
