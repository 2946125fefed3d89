"""The site aggregator of a gateway (docs/scaling.md, "Site gateways").

A site runs its own Mosquitto, bridged to the cloud broker (config: ``fedmq broker
gateway-conf``), and this process on it. Devices talk only to the site broker. Per round:

- the cloud's round announcement comes down the bridge (``fl/<fleet>/round``, direction
  ``in``); the gateway makes it the site's round in its local store
  (:class:`~aggregator.site_store.SiteStore`, SQLite);
- each device update on ``fl/<fleet>/update/<device>`` goes through the SAME checks and fold
  as a cloud ingest worker (:class:`~aggregator.shard_worker.ShardWorker`: decode, the
  device's signature against the site's device registry, fleet/epoch/round/base version, the
  round's codec, the tensors against the model, the claimed-examples cap, the fold weight
  capped by the site registry, the L2-norm bound with clip or reject, claim + partial
  committed in one transaction) and is answered on
  the site broker; the MQTT PUBACK follows the commit. Individual updates never leave the
  site: the bridge forwards no update topic;
- when every expected device is in (``--expect``) or at the cloud's deadline minus
  ``--lead`` seconds, :meth:`SiteGateway.tick` seals the round: closes it and journals ONE
  signed ``site-partial`` (the site's ``FixedPointSum``, its devices) in the same
  transaction, then publishes it QoS 1 on ``fl/<fleet>/gateway/<gw>/partial`` (direction
  ``out``). The site broker queues it for the bridge while the cloud is unreachable;
- the cloud's answer comes back on ``fl/<fleet>/gateway/<gw>/ack`` (direction ``in``). Until
  it does, the journaled payload is re-sent, byte for byte, at start, on every reconnect and
  whenever the bridge comes up (the site broker's notification topic
  ``fl/<fleet>/gateway/<gw>/bridge`` turns "1") and, if set, every ``--resend-after``
  seconds; the cloud commits a partial once (a resend is answered ``duplicate``). Re-sending
  only then keeps an outage's bridge queue at one partial per round plus one per reconnection.

A new round announced while the site's round is still open seals it first (the cloud moved
on: its answer, ``round_closed``, is logged with the number of devices it cost).

The round's rules at the site: the announcement carries the cloud's training config (the
codec every update must use) but not the cloud's bounds, which are frozen in the cloud's
store and adaptive. The site applies its OWN fixed ceilings instead (``--max-update-norm``
with ``--norm-action``, ``--max-claimed-examples``; no relative weight cap), frozen with the
announced config into the site round's :class:`~aggregator.shard_store.RoundRules`.

Run as a service: ``fedmq aggregator site-gateway --config site-gateway.toml`` (a strict
``[gateway]`` + ``[mqtt]`` file, :mod:`aggregator.site_config`; the flags above override it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import redis

from aggregator.bounds import RoundBounds
from aggregator.bundles import resolve_bundle
from aggregator.service_loop import service_main
from aggregator.shard_store import RoundRules
from aggregator.shard_worker import ShardWorker
from aggregator.site_config import GatewayConfig, add_gateway_flags, gateway_config_from_args
from aggregator.site_store import Outgoing, SealedRound, SiteStore
from fedmq.errors import ConfigError, SecurityError, StateError, WireError
from fedmq.net.mqtt import connect, make_client
from fedmq.signing import DeviceKey, Registry, load_key, sign_site_partial
from fedmq.topics import Topics, validate_name
from fedmq.wire import AckMessage, SitePartial, decode_ack, decode_round, encode

__all__ = ["SiteGateway", "command", "gateway_client_id", "main", "site_bounds"]

log = logging.getLogger(__name__)


def gateway_client_id(fleet: str, gateway: str) -> str:
    return f"fedmq-gateway-{validate_name(fleet, 'fleet')}-{validate_name(gateway, 'gateway')}"


class SiteGateway:
    """The transport-independent site aggregator: payloads and the time in, acks and the
    partials to publish out."""

    def __init__(
        self,
        store: SiteStore,
        template: dict[str, tuple[int, ...]],
        gateway: str,
        key: DeviceKey,
        *,
        registry: Registry | None = None,
        expect: int = 0,
        lead: float = 5.0,
        bounds: RoundBounds | None = None,
        max_examples: int = 10_000_000,
    ) -> None:
        if expect < 0 or lead < 0:
            raise ConfigError("--expect and --lead must be >= 0")
        if max_examples < 1:
            raise ConfigError("--max-claimed-examples must be >= 1")
        #: the site's fixed bounds, frozen into every site round with the cloud's config
        self.bounds = bounds or RoundBounds()
        self.max_examples = max_examples
        self.store = store
        self.fleet = store.fleet
        self.gateway = validate_name(gateway, "gateway")
        self.key = key
        self.expect = expect
        self.lead = lead
        self.worker = ShardWorker(store, template, self.gateway, registry=registry)

    # -- devices ------------------------------------------------------------------------------
    def on_update(self, device: str, payload: bytes, now: float) -> AckMessage:
        """The cloud worker's checks and fold, committed to the site store."""
        return self.worker.handle(device, payload, now)

    # -- the cloud ----------------------------------------------------------------------------
    def on_round(self, payload: bytes, now: float) -> Outgoing | None:
        """A round announcement from the cloud: the site's new round (after sealing an open
        older one, whose partial is returned to publish)."""
        try:
            ann = decode_round(payload)
        except WireError as exc:
            log.warning("ignored a round announcement (%d bytes): %s", len(payload), exc.reason)
            return None
        if ann.fleet != self.fleet or not ann.epoch:
            log.warning("ignored a round announcement of fleet %r epoch %r", ann.fleet,
                        ann.epoch)
            return None
        current = self.store.open_round()
        if current is not None:
            if (current.epoch, current.round_id) == (ann.epoch, ann.round_id):
                return None
            if current.epoch == ann.epoch and ann.round_id < current.round_id:
                return None  # an older announcement arriving late
        sealed = None
        if current is not None and current.state == "open":
            log.warning("round %d announced while the site's round %d is open: sealing it",
                        ann.round_id, current.round_id)
            sealed = self._seal(current.epoch, current.round_id, now)
        self.store.open(ann.epoch, ann.round_id, ann.base_version, ann.deadline, self.expect,
                        RoundRules(ann.config, self.bounds, self.max_examples))
        log.info("gateway %s: round %d open (base version %d, deadline in %.1fs)",
                 self.gateway, ann.round_id, ann.base_version, ann.deadline - now)
        return sealed

    def tick(self, now: float) -> Outgoing | None:
        """Seal the open round when every expected device is in or its time is up."""
        rnd = self.store.open_round()
        if rnd is None or rnd.state != "open":
            return None
        count = self.store.claim_count(rnd.epoch, rnd.round_id)
        if (self.expect and count >= self.expect) or now >= rnd.deadline - self.lead:
            return self._seal(rnd.epoch, rnd.round_id, now)
        return None

    def _seal(self, epoch: str, round_id: int, now: float) -> Outgoing | None:
        def build(sealed: SealedRound) -> Outgoing:
            partial_id = f"{self.gateway}-{round_id}-{secrets.token_hex(6)}"
            msg = SitePartial(self.fleet, sealed.epoch, sealed.round_id, sealed.base_version,
                              self.gateway, partial_id, sealed.devices, sealed.partial, now)
            return Outgoing(sealed.epoch, sealed.round_id, partial_id, len(sealed.devices),
                            sign_site_partial(msg, self.key))

        out = self.store.seal(epoch, round_id, self.gateway, build)
        if out is None:
            log.info("gateway %s: round %d sealed with no update: nothing to send",
                     self.gateway, round_id)
        else:
            log.info("gateway %s: round %d sealed: partial %s of %d device(s), %d bytes",
                     self.gateway, round_id, out.partial_id, out.devices, len(out.payload))
        return out

    def on_ack(self, payload: bytes) -> AckMessage | None:
        """The cloud's answer to a partial: it is not re-sent any more."""
        try:
            ack = decode_ack(payload)
        except WireError as exc:
            log.warning("ignored a partial ack (%d bytes): %s", len(payload), exc.reason)
            return None
        if ack.device != self.gateway or not self.store.answered(ack.update_id, ack.code):
            return None
        if ack.accepted:
            log.info("gateway %s: the cloud committed partial %s (round %d, %s)",
                     self.gateway, ack.update_id, ack.round_id, ack.code)
        else:
            log.error("gateway %s: the cloud refused partial %s of round %d: %s: %s",
                      self.gateway, ack.update_id, ack.round_id, ack.code, ack.reason)
        return ack

    def pending(self) -> list[Outgoing]:
        return self.store.pending()


class _Runner:
    """The MQTT side on the site broker."""

    def __init__(self, config: GatewayConfig) -> None:
        self.topics = Topics(config.fleet, config.topic_prefix)
        self.settings = replace(config.mqtt, client_id=gateway_client_id(config.fleet,
                                                                         config.name),
                                clean_start=False)
        bundle = resolve_bundle(config.model)
        template = {t.name: t.shape for t in bundle.spec.trainable_specs}
        registry = Registry(Path(config.registry)) if config.registry else None
        if registry is not None:
            registry.devices()  # a malformed registry: one error at start
        self.store = SiteStore(Path(config.state), config.fleet)
        self.gw = SiteGateway(self.store, template, config.name, load_key(Path(config.key)),
                              registry=registry, expect=config.expect, lead=config.lead,
                              bounds=site_bounds(config.max_update_norm, config.norm_action),
                              max_examples=config.max_claimed_examples)
        self.poll = config.poll
        self.resend_after = config.resend_after
        self.ready_file = Path(config.ready_file) if config.ready_file else None
        self.client = make_client(self.settings, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.stopping = threading.Event()
        self.failed = threading.Event()
        self.resend_due = threading.Event()
        self.partial_topic = self.topics.gateway_partial(config.name)
        self.ack_topic = self.topics.gateway_ack(config.name)
        self.bridge_topic = self.topics.gateway_bridge(config.name)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any,
                    props: Any = None) -> None:
        if rc.is_failure:
            log.error("site broker refused the connection: %s", rc)
            return
        log.info("gateway %s connected to the site broker (session present: %s)",
                 self.gw.gateway, flags.session_present)
        client.subscribe([(self.topics.update_wildcard, 1), (self.topics.round, 1),
                          (self.ack_topic, 1), (self.bridge_topic, 1)])
        self.resend_due.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, rcs: Any,
                      props: Any = None) -> None:
        if self.ready_file is not None:
            self.ready_file.write_text("ready\n")

    def _publish(self, out: Outgoing | None) -> None:
        if out is not None:
            self.client.publish(self.partial_topic, out.payload, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self.failed.is_set():
            return  # never acknowledged: the site broker redelivers after the restart
        payload = bytes(message.payload)
        try:
            if message.topic == self.topics.round:
                self._publish(self.gw.on_round(payload, time.time()))
            elif message.topic == self.ack_topic:
                self.gw.on_ack(payload)
            elif message.topic == self.bridge_topic:
                log.info("gateway %s: the bridge to the cloud is %s", self.gw.gateway,
                         "up" if payload == b"1" else "down")
                if payload == b"1":
                    self.resend_due.set()
            else:
                device = self.topics.device_of(message.topic)
                if device is not None and payload:
                    ack = self.gw.on_update(device, payload, time.time())
                    with contextlib.suppress(ConfigError):
                        client.publish(self.topics.ack(device), encode(ack), qos=1)
        except (StateError, WireError, OSError, redis.RedisError) as exc:
            log.error("site store %s failed: %s; stopping without acknowledging",
                      self.store.path, exc)
            self.failed.set()
            client.disconnect()
            return
        client.ack(message.mid, message.qos)

    def run(self) -> int:
        def stop(signum: int, frame: Any) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        connect(self.client, self.settings, asynchronous=True)
        self.client.loop_start()
        last_resend = time.monotonic()
        try:
            while not (self.stopping.is_set() or self.failed.is_set()):
                self._publish(self.gw.tick(time.time()))
                periodic = self.resend_after and time.monotonic() - last_resend > self.resend_after
                if self.resend_due.is_set() or periodic:
                    self.resend_due.clear()
                    last_resend = time.monotonic()
                    for out in self.gw.pending():
                        log.info("gateway %s: sending partial %s of round %d (%d device(s))",
                                 self.gw.gateway, out.partial_id, out.round_id, out.devices)
                        self._publish(out)
                self.stopping.wait(self.poll)
        except (StateError, OSError) as exc:
            log.error("site store %s failed: %s", self.store.path, exc)
            self.failed.set()
        self.client.disconnect()
        self.client.loop_stop()
        return 3 if self.failed.is_set() else 0


def site_bounds(max_update_norm: float, norm_action: str) -> RoundBounds:
    """The site's fixed bounds: ``max_update_norm`` (0 = none) with ``norm_action``."""
    if not max_update_norm >= 0:
        raise ConfigError(f"--max-update-norm must be >= 0, got {max_update_norm}")
    limit = (max_update_norm, "max_update_norm") if max_update_norm > 0 else None
    return RoundBounds(norm_action, limit)


def command(args: argparse.Namespace) -> int:
    """Load the configuration from ``args`` (``--config`` < environment < flags) and run."""
    try:
        config = gateway_config_from_args(args)
        config.mqtt.check_files()
        return _Runner(config).run()
    except (ConfigError, SecurityError, StateError, OSError) as exc:
        log.error("site gateway: %s", exc)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aggregator.site_gateway",
                                description="a site gateway's aggregator (docs/scaling.md)")
    add_gateway_flags(p)
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    return service_main(build_parser(), argv, command, log=log)


if __name__ == "__main__":
    sys.exit(main())
