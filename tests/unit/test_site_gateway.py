"""The site aggregator's core on a real SQLite site store (no MQTT): the cloud worker's
checks and exact fold, one signed partial per round journaled with the round's close, the
same bytes after a restart, the cloud's answer ends the re-sends."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.bounds import RoundBounds, update_norm
from aggregator.shard_store import Fold, GatewayClaim, RoundRules, parse_claim
from aggregator.site_gateway import SiteGateway, site_bounds
from aggregator.site_store import SiteStore
from fedmq.errors import ConfigError, RejectReason, StateError
from fedmq.signing import DeviceKey, Registry, sign_update, verify_site_partial
from fedmq.update.accumulate import scaled
from fedmq.update.codecs import get_codec
from fedmq.update.fixedpoint import FixedPointSum
from fedmq.wire import (
    AckMessage,
    RoundAnnouncement,
    TrainingConfig,
    UpdateMessage,
    decode_update,
    encode,
    receive_site_partial,
)
from fedmq_ops.broker.gateway import GatewayBrokerSettings, render_gateway_conf

FLEET = "site"
TEMPLATE = {"w": (4, 3), "b": (3,)}
EPOCH = "e" * 8


CODEC = "int8"  # the cloud's round codec: every update must use it


def _round(round_id: int, base: int, deadline: float = 1000.0) -> bytes:
    return encode(RoundAnnouncement(FLEET, round_id, base, deadline,
                                    TrainingConfig(codec=CODEC), epoch=EPOCH))


class Site:
    def __init__(self, tmp: Path, expect: int = 3, bounds: RoundBounds | None = None,
                 max_examples: int = 10_000_000) -> None:
        self.bounds = bounds
        self.max_examples = max_examples
        self.tmp = tmp
        self.registry = Registry(tmp / "devices.json")
        self.keys = {f"d{i}": DeviceKey.generate() for i in range(5)}
        for d, k in self.keys.items():
            self.registry.enroll(d, k.public_hex)
        self.gw_key = DeviceKey.generate()
        self.expect = expect
        self.rng = np.random.default_rng(3)
        self.open()

    def open(self) -> None:
        self.store = SiteStore(self.tmp / "site.db", FLEET)
        self.gw = SiteGateway(self.store, TEMPLATE, "gw-1", self.gw_key, registry=self.registry,
                              expect=self.expect, lead=2.0, bounds=self.bounds,
                              max_examples=self.max_examples)

    def update(self, device: str, round_id: int, base: int, key: DeviceKey | None = None,
               codec: str = CODEC, sigma: float = 0.01, examples: int = 0) -> bytes:
        delta = {n: self.rng.normal(0, sigma, s).astype(np.float32) for n, s in TEMPLATE.items()}
        msg = UpdateMessage(FLEET, round_id, base, device, uuid.uuid4().hex[:12],
                            examples or int(self.rng.integers(1, 100)), codec,
                            tuple(get_codec(codec).encode(delta, self.rng).tensors), epoch=EPOCH)
        return sign_update(msg, key or self.keys[device])


def _reference(payloads: list[bytes]) -> FixedPointSum:
    acc = FixedPointSum(TEMPLATE)
    for p in payloads:
        m = decode_update(p)
        acc.fold(m.tensors, m.codec, float(m.num_examples))
    return acc


def test_one_signed_partial_per_round_equal_to_the_one_process_sum(tmp_path: Path) -> None:
    site = Site(tmp_path)
    assert site.gw.on_round(_round(1, 0), 0.0) is None
    payloads = {d: site.update(d, 1, 0) for d in ("d2", "d0", "d1")}
    for d, p in payloads.items():
        assert site.gw.on_update(d, p, 1.0).code == "ok"
    # checks are the cloud worker's: a resend, a forged signature, a wrong base
    assert site.gw.on_update("d0", payloads["d0"], 1.0).code == RejectReason.DUPLICATE
    forged = site.update("d3", 1, 0, key=DeviceKey.generate())
    assert site.gw.on_update("d3", forged, 1.0).code == RejectReason.BAD_SIGNATURE
    assert site.gw.on_update("d4", site.update("d4", 1, 5), 1.0).code == RejectReason.WRONG_BASE
    out = site.gw.tick(2.0)  # 3 of 3 expected devices: sealed
    assert out is not None and out.devices == 3 and site.gw.tick(3.0) is None
    received = receive_site_partial(out.payload)
    verify_site_partial(received, site.gw_key.public_hex)
    msg = received.message
    assert (msg.fleet, msg.epoch, msg.round_id, msg.base_version, msg.gateway) == (
        FLEET, EPOCH, 1, 0, "gw-1")
    assert msg.devices == ("d0", "d1", "d2")
    got = FixedPointSum.from_bytes(msg.partial, TEMPLATE)
    want = _reference(list(payloads.values()))
    assert got.count == 3 and got.total_weight == want.total_weight
    for n, s in want.digest_sums().items():
        assert np.array_equal(got.digest_sums()[n], s)
    # after the seal the round is closed at the site
    late = site.update("d4", 1, 0)
    assert site.gw.on_update("d4", late, 4.0).code == RejectReason.ROUND_CLOSED


def test_the_journal_resends_the_same_bytes_after_a_restart_until_answered(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path, expect=0)  # seal at the deadline minus the lead
    site.gw.on_round(_round(1, 0, deadline=100.0), 0.0)
    site.gw.on_update("d1", site.update("d1", 1, 0), 1.0)
    assert site.gw.tick(97.9) is None
    out = site.gw.tick(98.0)
    assert out is not None
    site.store.close_connection()
    site.open()  # a restarted gateway: same key, same file
    assert [o.payload for o in site.gw.pending()] == [out.payload]
    ack = AckMessage(FLEET, 1, "gw-1", out.partial_id, True, RejectReason.DUPLICATE)
    other = AckMessage(FLEET, 1, "gw-2", out.partial_id, True)
    assert site.gw.on_ack(encode(other)) is None  # another gateway's answer
    assert site.gw.on_ack(encode(ack)) is not None
    assert site.gw.pending() == []
    assert site.gw.on_ack(encode(ack)) is None  # answered once
    site.gw.on_round(_round(2, 1), 99.0)  # the next round drops answered journal entries
    assert site.store._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0


def test_a_new_round_seals_the_open_one_and_a_stale_announcement_changes_nothing(
    tmp_path: Path,
) -> None:
    site = Site(tmp_path)
    site.gw.on_round(_round(1, 0), 0.0)
    site.gw.on_update("d1", site.update("d1", 1, 0), 1.0)
    sealed = site.gw.on_round(_round(2, 1), 2.0)
    assert sealed is not None and receive_site_partial(sealed.payload).message.round_id == 1
    assert site.gw.on_round(_round(1, 0), 3.0) is None
    rnd = site.store.open_round()
    assert rnd is not None and (rnd.round_id, rnd.base_version, rnd.state) == (2, 1, "open")
    assert site.gw.on_update("d1", site.update("d1", 2, 1), 4.0).code == "ok"
    # a round nobody contributed to seals with nothing to send
    assert site.gw.on_round(_round(3, 2), 5.0) is not None
    assert site.gw.on_round(_round(4, 3), 6.0) is None
    assert len(site.gw.pending()) == 2


def test_gateway_config_sets_the_bridge_for_no_loss() -> None:
    s = GatewayBrokerSettings("f1", "gw-1", "cloud.example", topic_prefix="t")
    conf = render_gateway_conf(s).splitlines()
    for line in ("cleansession false", "local_cleansession false", "persistence true",
                 "max_queued_messages 100000", "max_queued_bytes 0",
                 "topic t/fl/f1/gateway/gw-1/partial out 1",
                 "topic t/fl/f1/gateway/gw-1/ack in 1", "topic t/fl/f1/round in 1",
                 "topic t/fl/f1/model in 1", "topic t/fl/f1/model/chunk/+ in 1",
                 "topic t/fl/f1/model/snapshot in 1", "topic t/fl/f1/model/delta/+ in 1",
                 "topic t/fl/f1/model/delta/+/chunk/+ in 1",
                 "notification_topic t/fl/f1/gateway/gw-1/bridge",
                 "remote_clientid fedmq-bridge-f1-gw-1", "address cloud.example:8883"):
        assert line in conf
    assert not [line for line in conf if "update" in line and line.startswith("topic")]
    assert not [line for line in conf if "#" in line and line.startswith("topic")]
    with pytest.raises(ConfigError, match="below 4000"):
        GatewayBrokerSettings("f1", "gw-1", "c", site_devices=2000, max_queued_messages=1000)
    with pytest.raises(ConfigError, match="whitespace"):
        GatewayBrokerSettings("f1", "gw-1", "c\ntopic # both 1")
    with pytest.raises(ConfigError, match="gateway"):
        GatewayBrokerSettings("f1", "gw/+", "c")


def test_the_site_checks_the_round_codec_and_its_own_fixed_bounds(tmp_path: Path) -> None:
    """The announced codec and the site's fixed ceilings are the site round's rules (kept in
    the SQLite round row across a restart); a norm over the ceiling is folded clipped and the
    claim records the Fold; over the examples cap or in another codec: refused."""
    bounds = site_bounds(0.05, "clip")
    site = Site(tmp_path, expect=0, bounds=bounds, max_examples=500)
    site.gw.on_round(_round(1, 0), 0.0)
    rules = RoundRules(TrainingConfig(codec=CODEC), bounds, 500)
    site.store.close_connection()
    site.open()  # the rules survive a restart
    rnd = site.store.open_round()
    assert rnd is not None and rnd.rules == rules
    wrong = site.update("d0", 1, 0, codec="float32")
    assert site.gw.on_update("d0", wrong, 1.0).code == RejectReason.BAD_CODEC
    many = site.update("d0", 1, 0, examples=501)
    assert not site.gw.on_update("d0", many, 1.0).accepted
    small, big = site.update("d1", 1, 0, sigma=0.001), site.update("d2", 1, 0, sigma=1.0)
    assert site.gw.on_update("d1", small, 1.0).code == "ok"
    assert site.gw.on_update("d2", big, 1.0).code == "ok"
    want = FixedPointSum(TEMPLATE)
    clips = {}
    for d, p in (("d1", small), ("d2", big)):
        m = decode_update(p)
        checked = want.check(m.tensors, m.codec, float(m.num_examples))
        clips[d] = bounds.check_norm(update_norm(checked.tensors, m.codec))
        want.add(scaled(checked, clips[d]))
    assert clips["d1"] == 1.0 and clips["d2"] < 0.1  # the big one was clipped
    claim = site.store._db.execute("SELECT claim FROM claims WHERE device = 'd2'").fetchone()[0]
    fold = Fold.from_claim(claim)
    assert (fold.worker, fold.scale) == ("gw-1", clips["d2"])
    out = site.gw.tick(999.0)
    assert out is not None and out.devices == 2
    got = FixedPointSum.from_bytes(receive_site_partial(out.payload).message.partial, TEMPLATE)
    assert got.total_weight == want.total_weight
    for n, s in want.digest_sums().items():
        assert np.array_equal(got.digest_sums()[n], s)


def test_the_site_rejects_over_its_ceiling_with_norm_action_reject(tmp_path: Path) -> None:
    site = Site(tmp_path, bounds=site_bounds(0.05, "reject"))
    site.gw.on_round(_round(1, 0), 0.0)
    ack = site.gw.on_update("d2", site.update("d2", 1, 0, sigma=1.0), 1.0)
    assert ack.code == RejectReason.NORM_BOUND and not ack.accepted
    assert site.store.rejected_norms == 1
    assert site.gw.on_update("d1", site.update("d1", 1, 0, sigma=0.001), 1.0).code == "ok"
    with pytest.raises(ConfigError, match="max-update-norm"):
        site_bounds(-1.0, "clip")


def test_a_site_store_from_before_round_rules_is_refused_in_one_line(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE round (id INTEGER PRIMARY KEY CHECK (id = 1), epoch TEXT NOT NULL, "
               "round_id INTEGER NOT NULL, base_version INTEGER NOT NULL, deadline REAL NOT "
               "NULL, target INTEGER NOT NULL, state TEXT NOT NULL)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="before round rules"):
        SiteStore(tmp_path / "old.db", FLEET)


def test_claims_of_both_kinds_are_read_and_garbage_is_a_state_error() -> None:
    """A round's claims hold workers' Fold records and gateways' ``gateway:<gw> <id>``."""
    fold = Fold("w1", "u1", 12, 12.0, 0.5, 3.25)
    assert parse_claim(fold.to_claim()) == fold
    gw = parse_claim("gateway:gw-1 gw-1-3-abcdef")
    assert gw == GatewayClaim("gw-1", "gw-1-3-abcdef")
    assert (gw.worker, gw.update_id, gw.to_claim()) == (
        "gateway:gw-1", "gw-1-3-abcdef", "gateway:gw-1 gw-1-3-abcdef")
    for bad in ("w1 u1", "gateway:gw-1", "gateway: p1", "[1, 2]", ""):
        with pytest.raises(StateError):
            parse_claim(bad)
