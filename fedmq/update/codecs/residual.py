"""What an error-feedback residual does while its device skips rounds.

A device that is not selected (or offline) for some rounds comes back to a global model
that moved on; the residual it kept was measured against an older model. The round's
``params`` choose the policy (:class:`ResidualPolicy`):

- ``keep``: add it to the next delta unchanged;
- ``decay`` (the default, with ``residual_decay`` 0.5): multiply it by ``residual_decay``
  once per skipped round (a device selected every round keeps it whole);
- ``reset``: drop it when any round was skipped;
- ``off``: no error feedback at all (no residual is kept; for measurements).

The state records the round it was made in (:data:`ROUND_KEY`, two float32 halves so it
survives the state's float32 storage exactly); :meth:`ResidualPolicy.carry` reads it and
returns the residual for this round's encode, :func:`stamp` writes it into the new state.
docs/codecs.md has the measurements behind the default.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.update.codecs.base import CodecState, Encoded
from fedmq.update.codecs.registry import get_codec

__all__ = [
    "DECAY_PARAM",
    "POLICIES",
    "POLICY_PARAM",
    "ROUND_KEY",
    "ResidualPolicy",
    "encode_round",
    "skipped_rounds",
    "stamp",
]

log = logging.getLogger(__name__)

POLICY_PARAM = "residual_policy"
DECAY_PARAM = "residual_decay"
POLICIES = ("keep", "decay", "reset", "off")
ROUND_KEY = "__round__"
_HALF = 1 << 20
_MAX_ROUND = 1 << 40


@dataclass(frozen=True)
class ResidualPolicy:
    policy: str = "decay"
    decay: float = 0.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"{POLICY_PARAM} must be one of {', '.join(POLICIES)}, got "
                             f"{self.policy!r}")
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not (
            0.0 <= self.decay <= 1.0
        ):
            raise ValueError(f"{DECAY_PARAM} must be in [0, 1], got {self.decay!r}")

    @classmethod
    def from_params(cls, params: Mapping[str, object]) -> ResidualPolicy:
        policy = params.get(POLICY_PARAM, "decay")
        decay = params.get(DECAY_PARAM, 0.5)
        if not isinstance(policy, str):
            raise ValueError(f"{POLICY_PARAM} must be a string, got {policy!r}")
        if isinstance(decay, bool) or not isinstance(decay, int | float):
            raise ValueError(f"{DECAY_PARAM} must be a number, got {decay!r}")
        return cls(policy, float(decay))

    def carry(self, state: CodecState | None, round_id: int) -> dict[str, np.ndarray]:
        """The residual to add to round ``round_id``'s delta (without the round stamp)."""
        if not state or self.policy == "off":
            return {}
        residual = {k: v for k, v in state.items() if k != ROUND_KEY}
        skipped = skipped_rounds(state, round_id)
        if skipped == 0 or self.policy == "keep":
            return residual
        if self.policy == "reset":
            return {}
        factor = np.float32(self.decay**skipped)
        return {k: v * factor for k, v in residual.items()}


def skipped_rounds(state: CodecState, round_id: int) -> int:
    """Rounds between the state's round and ``round_id`` (0 when it has no stamp)."""
    raw = state.get(ROUND_KEY)
    if raw is None or raw.shape != (2,):
        return 0
    last = int(raw[0]) + int(raw[1]) * _HALF
    return max(0, round_id - last - 1)


def stamp(state: CodecState, round_id: int) -> dict[str, np.ndarray]:
    """``state`` marked as made in round ``round_id``."""
    if not 0 <= round_id < _MAX_ROUND:
        raise ValueError(f"round id {round_id} out of range")
    out = dict(state)
    out[ROUND_KEY] = np.array([round_id % _HALF, round_id // _HALF], np.float32)
    return out


def encode_round(
    codec: str, delta: Mapping[str, np.ndarray], rng: np.random.Generator,
    state: CodecState | None, params: Mapping[str, object], round_id: int,
) -> Encoded:
    """Encode round ``round_id``'s ``delta`` with ``codec`` set up by the round's ``params``,
    from the device's stored ``state``: the policy decides what of the residual is carried,
    the new state is stamped with the round (empty for stateless codecs and policy off)."""
    impl = get_codec(codec).configure(params)
    if not impl.stateful:
        if state and any(k != ROUND_KEY for k in state):
            log.info("codec %s keeps no residual: the residual of an earlier codec is dropped",
                     codec)
        return impl.encode(delta, rng)
    policy = ResidualPolicy.from_params(params)
    encoded = impl.encode(delta, rng, policy.carry(state, round_id) or None)
    if policy.policy == "off":
        return Encoded(encoded.tensors)
    return Encoded(encoded.tensors, stamp(encoded.state, round_id))
