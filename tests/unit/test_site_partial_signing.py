"""A gateway's site partial signed with its key and verified over the exact body bytes."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq import wire
from fedmq.errors import Rejected, RejectReason
from fedmq.signing import (
    DeviceKey,
    sign_site_partial,
    sign_update,
    verify_site_partial,
    verify_update,
)
from fedmq.tensor import Tensor

PARTIAL = wire.SitePartial("flt", "e1", 4, 3, "gw-1", "p1", ("d1", "d2"), b"\x01\x02", 1.0)


def test_signed_partial_verifies_for_its_gateway_only() -> None:
    key, other = DeviceKey.generate(), DeviceKey.generate()
    received = wire.receive_site_partial(sign_site_partial(PARTIAL, key))
    assert received.message == PARTIAL
    verify_site_partial(received, key.public_hex)
    for public, code in ((other.public_hex, RejectReason.BAD_SIGNATURE),
                         (None, RejectReason.UNKNOWN_DEVICE)):
        with pytest.raises(Rejected, match="gateway 'gw-1'") as info:
            verify_site_partial(received, public)
        assert info.value.code == code


def test_unsigned_or_altered_partials_are_refused() -> None:
    key = DeviceKey.generate()
    bare = wire.receive_site_partial(wire.encode(PARTIAL))
    with pytest.raises(Rejected, match="site partial is not signed") as info:
        verify_site_partial(bare, key.public_hex)
    assert info.value.code == RejectReason.UNSIGNED
    signed = wire.receive_site_partial(sign_site_partial(PARTIAL, key))
    # one more device claimed under the same signature
    more = wire.SitePartial(**{**PARTIAL.__dict__, "devices": ("d1", "d2", "d3")})
    forged = wire.ReceivedSitePartial(more, wire.encode(more), signed.signature)
    with pytest.raises(Rejected) as info:
        verify_site_partial(forged, key.public_hex)
    assert info.value.code == RejectReason.BAD_SIGNATURE


def test_a_device_signature_is_no_partial_and_a_partial_is_no_update() -> None:
    key = DeviceKey.generate()
    update = wire.UpdateMessage("flt", 4, 3, "gw-1", "u1", 5, "float32",
                                (Tensor.from_array("w", np.ones((1, 1), np.float32)),), epoch="e1")
    with pytest.raises(wire.WireError, match="expected a 'site-partial'"):
        wire.receive_site_partial(sign_update(update, key))
    with pytest.raises(wire.WireError, match="expected a 'update'"):
        wire.receive_update(sign_site_partial(PARTIAL, key))
    verify_update(wire.receive_update(sign_update(update, key)), key.public_hex)
