"""A whole secure round in one process (tests, benchmarks): real keys, real messages, every
payload encoded, signed, decoded and verified, with chosen devices dropping out."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedmq.errors import Rejected
from fedmq.secagg.client import SecAggClient
from fedmq.secagg.server import SecAggResult, SecAggServer
from fedmq.signing import DeviceKey

__all__ = ["Simulation", "simulate_round"]


@dataclass
class Simulation:
    result: SecAggResult | None
    server: SecAggServer
    sent_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    received_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    client_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    server_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def simulate_round(
    updates: Mapping[str, np.ndarray],
    *,
    clip: float = 1.0,
    min_survivors: int = 2,
    drop_before_shares: Collection[str] = (),
    drop_after_shares: Collection[str] = (),
    drop_before_unmask: Collection[str] = (),
    keys: Mapping[str, DeviceKey] | None = None,
    tamper: Callable[[str, str, bytes], bytes] | None = None,
    fleet: str = "sim",
    epoch: str = "e0",
    round_id: int = 1,
    strict: bool = True,
) -> Simulation:
    """Run one round over ``updates`` (device -> flat int8). ``tamper(device, phase,
    payload)`` may rewrite what a device sends. A message the server rejects raises, or with
    ``strict=False`` is dropped as the aggregator does (counted in ``server.rejected``)."""
    devices = sorted(updates)
    keys = dict(keys) if keys else {d: DeviceKey.generate() for d in devices}
    public = {d: keys[d].public_hex for d in devices}
    length = int(next(iter(updates.values())).size)
    server = SecAggServer(fleet, epoch, round_id, clip=clip, length=length,
                          public_key=public.get, min_survivors=min_survivors,
                          selected=devices)
    sim = Simulation(None, server)
    clients = {d: SecAggClient(fleet, epoch, round_id, d, keys[d], public) for d in devices}

    def send(d: str, phase: str, make: Callable[[], bytes]) -> None:
        t0 = time.perf_counter()
        payload = make()
        sim.client_seconds[d] += time.perf_counter() - t0
        if tamper is not None:
            payload = tamper(d, phase, payload)
        sim.sent_bytes[d] += len(payload)
        t0 = time.perf_counter()
        try:
            server.receive(payload, d)
        except Rejected:
            if strict:
                raise
        sim.server_seconds[phase] += time.perf_counter() - t0

    def close(phase: str) -> list[tuple[str, bytes]]:
        t0 = time.perf_counter()
        out = server.close_phase()
        sim.server_seconds[phase] += time.perf_counter() - t0
        return out

    for d in devices:
        send(d, "keys", clients[d].advertise)
    ((_, roster),) = close("keys")
    alive = [d for d in devices if d not in drop_before_shares]
    for d in alive:
        sim.received_bytes[d] += len(roster)
        send(d, "shares", lambda d=d: clients[d].on_roster(roster))  # type: ignore[misc]
    relays = dict(close("shares"))
    alive = [d for d in alive if d not in drop_after_shares]
    for d in alive:
        sim.received_bytes[d] += len(relays[d])
        send(d, "masked",
             lambda d=d: clients[d].on_relay(relays[d], updates[d]))  # type: ignore[misc]
    out = close("masked")
    if server.phase == "abandoned":
        return sim
    ((_, survivors),) = out
    alive = [d for d in alive if d not in drop_before_unmask]
    for d in alive:
        sim.received_bytes[d] += len(survivors)
        send(d, "unmask", lambda d=d: clients[d].on_survivors(survivors))  # type: ignore[misc]
    close("unmask")
    if server.phase == "done":
        t0 = time.perf_counter()
        sim.result = server.result()
        sim.server_seconds["result"] += time.perf_counter() - t0
    return sim
