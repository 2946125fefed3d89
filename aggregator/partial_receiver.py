"""The cloud end of the site gateways (docs/scaling.md, "Site gateways"): receives each
gateway's signed partial of a round and commits it to the sharded ingest's store, where the
:class:`~aggregator.shard_coordinator.ShardCoordinator` merges it like a worker's partial.

Per partial (:meth:`PartialReceiver.handle`, no MQTT): decode (``site-partial``, strict and
bounded), the gateway in the topic is the one in the body, the signature over the exact body
bytes against the GATEWAY registry (a separate file from the device registry: a gateway key
cannot sign a device's update and a device key cannot sign a partial, which weighs as much
as all of a site's devices), the fleet, epoch, round and base version against the store's open
round, the partial against the model (:meth:`FixedPointSum.from_bytes`: tensors, shapes,
bounds) holding exactly one update per listed device, at most the gateway's ``max_weight``
per device when its enrolment has one. Then ONE atomic Redis script
(:meth:`~aggregator.shard_store.ShardStore.commit_partial`) claims every device and stores the
partial, or changes nothing: a resent partial (the gateway's journal, a bridge redelivery) is
answered ``duplicate`` and counted once, also after its round closed (the store remembers
each gateway's last committed partial); a partial naming a device that another worker or
gateway already claimed is refused whole (a device is enrolled in exactly one place).

The MQTT shell subscribes to ``fl/<fleet>/gateway/+/partial`` with a fixed client id and a
persistent session, answers on ``fl/<fleet>/gateway/<gw>/ack`` and sends the PUBACK only after
the store answered (manual ack), so a partial is either committed or still the broker's.
Run as a service: ``fedmq aggregator partial-receiver --config partial-receiver.toml`` (a
strict ``[receiver]`` + ``[mqtt]`` file, :mod:`aggregator.site_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis

from aggregator.bundles import resolve_bundle
from aggregator.service_loop import EXIT_STORE, run_until_signalled, service_main
from aggregator.shard_store import GatewayClaim, ShardStore
from aggregator.site_config import ReceiverConfig, add_receiver_flags, receiver_config_from_args
from fedmq.errors import ConfigError, Rejected, RejectReason, SecurityError, WireError
from fedmq.net.mqtt import make_client
from fedmq.signing import Registry, verify_site_partial
from fedmq.topics import Topics, validate_name
from fedmq.update.fixedpoint import DEFAULT_SCALE_BITS, FixedPointSum
from fedmq.wire import AckMessage, Limits, SitePartial, encode, receive_site_partial

__all__ = ["PartialReceiver", "command", "main", "read_partial", "receiver_client_id"]

log = logging.getLogger(__name__)


def receiver_client_id(fleet: str) -> str:
    return f"fedmq-partials-{validate_name(fleet, 'fleet')}"


def read_partial(
    msg: SitePartial, template: dict[str, tuple[int, ...]], max_bytes: int,
) -> FixedPointSum:
    """A site partial's sum checked against the model (pure; raises :class:`Rejected`): a
    serialised :class:`FixedPointSum` of these tensors at the cloud's scale, one update per
    listed device, every integer sum within the bound it declares (``from_bytes``) and
    mergeable without overflow."""
    try:
        acc = FixedPointSum.from_bytes(msg.partial, template, max_bytes)
    except WireError as exc:
        raise Rejected(exc.reason, RejectReason.SHAPE) from exc
    if acc.scale_bits != DEFAULT_SCALE_BITS:
        raise Rejected(f"fixed-point scale 2**{acc.scale_bits}, the cloud's is "
                       f"2**{DEFAULT_SCALE_BITS}", RejectReason.SHAPE)
    if acc.count != len(msg.devices):
        raise Rejected(f"the partial holds {acc.count} updates for {len(msg.devices)} devices",
                       RejectReason.MALFORMED)
    FixedPointSum(template).merge(acc)  # raises Rejected when it could overflow
    return acc


class PartialReceiver:
    """See the module docstring; :meth:`handle` is the per-partial path."""

    def __init__(
        self,
        store: ShardStore,
        template: dict[str, tuple[int, ...]],
        gateways: Registry,
        *,
        max_partial_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.fleet = store.fleet
        self.template = template
        self.gateways = gateways
        self.limits = Limits(max_bytes=max_partial_bytes)
        self.committed = 0

    def handle(self, topic_gateway: str, payload: bytes, now: float) -> AckMessage:
        """Check and commit one partial; the answer for the gateway. Raises
        :class:`redis.RedisError` when the store fails (nothing is acknowledged then)."""
        try:
            validate_name(topic_gateway, "gateway")
            received = receive_site_partial(payload, self.limits)
        except (ConfigError, WireError) as exc:
            reason = exc.reason if isinstance(exc, WireError) else str(exc)
            log.warning("rejected partial from gateway %s (%d bytes): %s", topic_gateway,
                        len(payload), reason)
            return AckMessage(self.fleet, 0, topic_gateway, "", False, RejectReason.MALFORMED,
                              reason[:1000], now)
        msg = received.message

        def answer(code: str, reason: str, accepted: bool = False) -> AckMessage:
            if not accepted:
                log.warning("rejected partial %s of gateway %s (round %d, %d devices): %s: %s",
                            msg.partial_id, topic_gateway, msg.round_id, len(msg.devices),
                            code, reason)
            return AckMessage(self.fleet, msg.round_id, topic_gateway, msg.partial_id,
                              accepted, code, reason[:1000], now)

        if msg.gateway != topic_gateway:
            return answer(RejectReason.DEVICE_MISMATCH,
                          f"partial of gateway {msg.gateway!r} on another gateway's topic")
        try:
            verify_site_partial(received, self.gateways.public_key(msg.gateway))
        except Rejected as exc:
            return answer(exc.code, exc.reason)
        except SecurityError as exc:
            return answer(RejectReason.UNKNOWN_DEVICE, str(exc))
        if msg.fleet != self.fleet:
            return answer(RejectReason.WRONG_FLEET, f"partial is for fleet {msg.fleet!r}")
        rnd = self.store.open_round()
        if (rnd is None or (msg.epoch, msg.round_id) != (rnd.epoch, rnd.round_id)
                or rnd.state != "open") and self._committed_before(msg):
            return answer(RejectReason.DUPLICATE, f"partial {msg.partial_id} was already "
                                                  "committed", accepted=True)
        if rnd is None or msg.epoch != rnd.epoch or msg.round_id > rnd.round_id:
            return answer(RejectReason.WRONG_ROUND, f"round {msg.round_id} is not open")
        if msg.round_id < rnd.round_id or rnd.state != "open":
            return answer(RejectReason.ROUND_CLOSED, f"round {msg.round_id} is closed")
        if msg.base_version != rnd.base_version:
            return answer(RejectReason.WRONG_BASE,
                          f"folded on version {msg.base_version}, the round's base is "
                          f"{rnd.base_version}")
        try:
            acc = read_partial(msg, self.template, self.limits.max_bytes)
        except Rejected as exc:
            return answer(exc.code, exc.reason)
        cap = self.gateways.max_weight(msg.gateway)
        if cap is not None and acc.total_weight > cap * acc.count:
            return answer(RejectReason.NORM_BOUND,
                          f"weight {acc.total_weight:g} exceeds the gateway's max_weight "
                          f"{cap} per device")
        res = self.store.commit_partial(rnd.epoch, rnd.round_id, msg.gateway, msg.partial_id,
                                        msg.devices, msg.partial)
        if res.status == "ok":
            self.committed += 1
            log.info("committed partial %s of gateway %s: round %d, %d update(s), weight %.6g",
                     msg.partial_id, msg.gateway, rnd.round_id, acc.count, acc.total_weight)
            return answer("ok", "", accepted=True)
        if res.status == "closed":
            if self._committed_before(msg):
                return answer(RejectReason.DUPLICATE, f"partial {msg.partial_id} was already "
                                                      "committed", accepted=True)
            return answer(RejectReason.ROUND_CLOSED, f"round {msg.round_id} closed meanwhile")
        if res.status == "conflict":
            device = res.device
            claim = "?" if res.claim is None else f"{res.claim.worker} {res.claim.update_id}"
            log.error("partial %s of gateway %s names device %s, already claimed by %s in round "
                      "%d: the whole partial (%d devices) is refused; enrol each device in "
                      "one place only", msg.partial_id, msg.gateway, device, claim,
                      rnd.round_id, len(msg.devices))
            return answer(RejectReason.DUPLICATE,
                          f"device {device} is already claimed by {claim}")
        if isinstance(res.claim, GatewayClaim) and res.claim.partial_id == msg.partial_id:
            log.info("partial %s of gateway %s was already committed: answered duplicate",
                     msg.partial_id, msg.gateway)
            return answer(RejectReason.DUPLICATE,
                          f"partial {msg.partial_id} was already committed in round "
                          f"{rnd.round_id}", accepted=True)
        return answer(RejectReason.DUPLICATE, f"gateway {msg.gateway} already has a partial "
                                              f"in round {rnd.round_id}")


    def _committed_before(self, msg: SitePartial) -> bool:
        """A copy of a partial committed in a round that has closed since (claims gone)."""
        if self.store.gateway_committed(msg.epoch, msg.round_id, msg.gateway, msg.partial_id):
            log.info("partial %s of gateway %s was already committed (round %d, closed "
                     "since): answered duplicate", msg.partial_id, msg.gateway, msg.round_id)
            return True
        return False


class _Runner:
    """The MQTT side: persistent session, manual PUBACK after the store answered."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.topics = Topics(config.fleet, config.topic_prefix)
        self.settings = replace(config.mqtt, client_id=receiver_client_id(config.fleet),
                                clean_start=False)
        bundle = resolve_bundle(config.model)
        template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        gateways = Registry(Path(config.gateways))
        gateways.devices()  # a missing or malformed registry: one error at start
        self.store = ShardStore(config.redis, config.fleet)
        self.receiver = PartialReceiver(self.store, template, gateways,
                                        max_partial_bytes=config.max_partial_bytes)
        self.ready_file = Path(config.ready_file) if config.ready_file else None
        self.client = make_client(self.settings, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.failed = threading.Event()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.error("broker refused the connection: %s", rc)
            return
        log.info("partial receiver connected (session present: %s)", flags.session_present)
        client.subscribe(self.topics.gateway_partial_wildcard, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any = None) -> None:
        log.info("partial receiver subscribed to %s", self.topics.gateway_partial_wildcard)
        if self.ready_file is not None:
            self.ready_file.write_text("ready\n")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.failed.is_set():
            return
        gateway = self.topics.gateway_of(message.topic) or ""
        try:
            ack = self.receiver.handle(gateway, bytes(message.payload), time.time())
        except (redis.RedisError, OSError) as exc:
            log.error("store %s failed: %s; exiting without acknowledging the partial of %s",
                      self.store.url, exc, gateway)
            self.failed.set()
            client.disconnect()
            return
        with contextlib.suppress(ConfigError):
            client.publish(self.topics.gateway_ack(gateway), encode(ack), qos=1)
        client.ack(message.mid, message.qos)

    def run(self) -> int:
        def stopped() -> None:
            log.info("partial receiver stopped (%d partial(s) committed)",
                     self.receiver.committed)

        return run_until_signalled(self.client, self.settings, ping=self.store.ping,
                                   failed=self.failed, stopped=stopped)


def command(args: argparse.Namespace) -> int:
    """Load the configuration from ``args`` (``--config`` < environment < flags) and run."""
    try:
        config = receiver_config_from_args(args)
        config.mqtt.check_files()
        return _Runner(config).run()
    except (ConfigError, SecurityError, redis.RedisError, OSError) as exc:
        log.error("partial receiver: %s", exc)
        return EXIT_STORE if isinstance(exc, redis.RedisError) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.partial_receiver",
                                description="commits site gateways' partials to the sharded "
                                            "ingest's store (docs/scaling.md)")
    add_receiver_flags(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    return service_main(build_parser(), argv, command, log=log)


if __name__ == "__main__":
    sys.exit(main())
