"""A SUBACK that refuses some topics: they are logged and subscribed again after a delay on
the same connection, and not after a reconnection (which subscribes everything anew)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.subscriptions import Subscriptions


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[list[tuple[str, int]]] = []

    def subscribe(self, topic: list[tuple[str, int]]) -> tuple[int, int | None]:
        self.calls.append(topic)
        return 0, len(self.calls)  # mids 1, 2, ...


def _rc(code: int) -> ReasonCode:
    return ReasonCode(PacketTypes.SUBACK, identifier=code)


def test_refused_topics_are_subscribed_again_on_the_same_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    later: list[tuple[float, Callable[[], None]]] = []
    subs = Subscriptions(2.0, schedule=lambda delay, fn: later.append((delay, fn)))
    client = FakeClient()
    asked = [("fl/f/model", 1), ("fl/f/round", 1), ("fl/f/ack/d1", 1)]
    subs.subscribe(client, asked)
    with caplog.at_level(logging.WARNING, logger="edge_agent.subscriptions"):
        refused = subs.on_suback(client, 1, [_rc(1), _rc(0x80), _rc(0x87)])
    assert refused == ["fl/f/round", "fl/f/ack/d1"] and subs.refused == 2
    assert [r.getMessage() for r in caplog.records] == [
        "the broker refused the subscription to fl/f/round, fl/f/ack/d1; subscribing again "
        "in 2s"]
    assert [d for d, _ in later] == [2.0] and client.calls == [asked]
    later.pop()[1]()
    assert client.calls[-1] == [("fl/f/round", 1), ("fl/f/ack/d1", 1)]
    # granted this time: nothing more to do
    assert subs.on_suback(client, 2, [_rc(1), _rc(1)]) == [] and later == []


def test_a_granted_or_unknown_suback_does_nothing_and_a_reconnection_cancels_retries() -> None:
    later: list[tuple[float, Callable[[], None]]] = []
    subs = Subscriptions(1.0, schedule=lambda delay, fn: later.append((delay, fn)))
    client = FakeClient()
    subs.subscribe(client, [("fl/f/model", 1)])
    assert subs.on_suback(client, 1, [_rc(1)]) == []
    assert subs.on_suback(client, 99, [_rc(0x80)]) == []  # not ours
    subs.subscribe(client, [("fl/f/round", 1)])
    assert subs.on_suback(client, 2, [_rc(0x80)]) == ["fl/f/round"]
    subs.new_connection()  # the new session subscribes everything itself
    later.pop()[1]()
    assert len(client.calls) == 2 and later == []
