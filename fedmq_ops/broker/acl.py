"""Render the per-identity Mosquitto ACL (no patterns, nothing for anonymous clients)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedmq.chunks import chunk_wildcard
from fedmq.downlink import downlink_topics
from fedmq.errors import ConfigError
from fedmq.privacy.he_decrypt import he_topics
from fedmq.topics import Topics
from fedmq_ops.broker.gateway import bridge_topics
from fedmq_ops.broker.settings import (
    AGGREGATOR_USER,
    DECRYPTOR_USER,
    MONITOR_USER,
    SHARD_WORKER,
    BrokerSettings,
    ack_login,
)

__all__ = ["SERVICE_GRANTS", "render_acl"]


def _fleet_topics(s: BrokerSettings, name: str, fleet: str, kind: str) -> Topics:
    if fleet not in s.fleets:
        raise ConfigError(f"{kind} {name} belongs to fleet {fleet!r}, not in {s.fleets}")
    return Topics(fleet, s.topic_prefix)


def _gateway_block(s: BrokerSettings, name: str, fleet: str) -> list[str]:
    """A site gateway's bridge login: exactly the topics its bridge carries
    (:func:`~fedmq_ops.broker.gateway.bridge_topics`), its own partial up, its own answer,
    the round and the model down."""
    bridged = bridge_topics(_fleet_topics(s, name, fleet, "gateway"), name)
    return ["", f"user {name}", *(f"topic write {t}" for t in bridged.out),
            *(f"topic read {t}" for t in bridged.into)]


def _ack_wildcard(t: Topics) -> str:
    return f"{t.base}/ack/+"


def _receiver_lines(t: Topics) -> list[str]:
    """The partial receiver's (site gateways): every gateway's partial, their answers."""
    return [f"topic read {t.gateway_partial_wildcard}", f"topic write {t.base}/gateway/+/ack"]


def _worker_lines(t: Topics) -> list[str]:
    """A shard worker's: the devices' updates. Mosquitto 2.0's acl_file grants every
    subscription and checks ``read`` against each message's own topic when it delivers it,
    so this line is the one that lets ``$share/<group>/fl/F/update/+`` deliver (a
    ``topic read $share/...`` line grants nothing; the group cannot be restricted)."""
    return [f"topic read {t.update_wildcard}"]


def _coordinator_lines(t: Topics) -> list[str]:
    """The shard coordinator's: it publishes the model and the round (retained), reads
    nothing from the broker (the store holds the rest)."""
    return [f"topic write {t.model}", f"topic write {t.round}"]


#: What each service role (``fedmq broker add-service --role``) may do in its fleet.
SERVICE_GRANTS: dict[str, Callable[[Topics], list[str]]] = {
    SHARD_WORKER: _worker_lines,
    "shard-coordinator": _coordinator_lines,
    "partial-receiver": _receiver_lines,
}


def _service_blocks(s: BrokerSettings, role: str, name: str, fleet: str) -> list[str]:
    """A service's block; a shard worker's ack login's too (it only sends the acks)."""
    t = _fleet_topics(s, name, fleet, role)
    lines = ["", f"user {name}", *SERVICE_GRANTS[role](t)]
    if role == SHARD_WORKER:
        lines += ["", f"user {ack_login(name)}", f"topic write {_ack_wildcard(t)}"]
    return lines


def render_acl(s: BrokerSettings, devices: Mapping[str, str],
               gateways: Mapping[str, str] | None = None,
               services: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """One ``user`` block per identity; nothing for anonymous clients; no patterns.
    ``devices`` and ``gateways`` (site gateways' bridge logins) map a name to its fleet,
    ``services`` a role (:data:`SERVICE_GRANTS`) to such a map."""
    lines = [
        "# fedmq broker ACL. Rendered by `fedmq broker`; re-run it instead of editing.",
        "# Mosquitto denies everything not granted here. No `topic` lines come before the",
        "# first `user` (those would apply to anonymous clients) and there are no `pattern`",
        "# lines (those would apply to every user, the monitor and the aggregator included).",
        "",
        f"user {AGGREGATOR_USER}",
    ]
    for fleet in s.fleets:
        t = Topics(fleet, s.topic_prefix)
        lines += [
            f"topic read {t.update_wildcard}",
            f"topic read {t.status_wildcard}",
            f"topic readwrite {t.model}",
            f"topic readwrite {chunk_wildcard(t.model)}",
            *(f"topic readwrite {x}" for x in downlink_topics(t)),
            f"topic readwrite {t.round}",
            f"topic write {_ack_wildcard(t)}",
            *_receiver_lines(t),
            f"topic read {t.secagg_in_wildcard}",
            f"topic write {t.secagg_out}",
            f"topic write {t.secagg_out}/+",
        ]
        # Homomorphic aggregation: a sum above max_message_bytes goes out as retained chunks.
        he_sum, he_mean = he_topics(t.base)
        lines += [f"topic write {he_sum}", f"topic write {chunk_wildcard(he_sum)}",
                  f"topic read {he_mean}"]
    if s.monitor:
        lines += ["", f"user {MONITOR_USER}"]
        for fleet in s.fleets:
            t = Topics(fleet, s.topic_prefix)
            lines += [
                f"topic read {t.status_wildcard}",
                f"topic read {t.model}",
                f"topic read {chunk_wildcard(t.model)}",
                *(f"topic read {x}" for x in downlink_topics(t)),
                f"topic read {t.round}",
            ]
        lines.append("topic read $SYS/#")
    if s.decryptor:
        # Reads the (possibly chunked) sum; the only identity that may write the mean.
        lines += ["", f"user {DECRYPTOR_USER}"]
        for fleet in s.fleets:
            he_sum, he_mean = he_topics(Topics(fleet, s.topic_prefix).base)
            lines += [f"topic read {he_sum}", f"topic read {chunk_wildcard(he_sum)}",
                      f"topic write {he_mean}"]
    for name in sorted(devices):
        t = _fleet_topics(s, name, devices[name], "device")
        lines += [
            "",
            f"user {name}",
            f"topic write {t.update(name)}",
            f"topic write {t.status(name)}",
            f"topic read {t.model}",
            f"topic read {chunk_wildcard(t.model)}",
            *(f"topic read {x}" for x in downlink_topics(t)),
            f"topic read {t.round}",
            f"topic read {t.ack(name)}",
            f"topic write {t.secagg_in(name)}",
            f"topic read {t.secagg_out}",
            f"topic read {t.secagg_relay(name)}",
        ]
    for name in sorted(gateways or {}):
        lines += _gateway_block(s, name, (gateways or {})[name])
    for role in SERVICE_GRANTS:
        users = (services or {}).get(role, {})
        for name in sorted(users):
            lines += _service_blocks(s, role, name, users[name])
    return "\n".join(lines) + "\n"
