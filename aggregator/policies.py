"""Round policies: when the coordinator opens a round, and when it closes or abandons it.

A policy is asked three things by :class:`aggregator.coordinator.Coordinator` and nothing
else: :meth:`RoundPolicy.plan` (open a round now? with which selection, target, quorum and
deadline), :meth:`RoundPolicy.is_ready` (close the open round now) and
:meth:`RoundPolicy.is_abandoned` (drop it, no new model). Policies are pure (no I/O, the
caller passes ``now``) and registered by name; the config key ``round_policy`` picks one.
``"sync"`` (:class:`SyncRounds`) is the synchronous round of docs/protocol.md;
``"fedbuff"`` (:class:`FedBuffRounds`) is asynchronous buffered aggregation (docs/rounds.md).
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from aggregator.round_state import RoundPlan, RoundState, select_devices
from aggregator.staleness import StalenessRule
from fedmq.errors import ConfigError
from fedmq.wire import TrainingConfig

if TYPE_CHECKING:
    from aggregator.config import AggregatorConfig

__all__ = [
    "DEFAULT_ROUND_POLICY",
    "FEDBUFF_HORIZON",
    "FedBuffRounds",
    "RoundContext",
    "RoundPolicy",
    "RoundPolicyFactory",
    "SyncRounds",
    "make_round_policy",
    "poisson_sample",
    "register_round_policy",
    "round_policy_names",
    "unregister_round_policy",
]

DEFAULT_ROUND_POLICY = "sync"
#: The announced deadline of a ``fedbuff`` buffer without ``flush_after``: it never waits
#: for a device, so its deadline is only far enough that no device skips it as past.
FEDBUFF_HORIZON = 365 * 24 * 3600.0


@dataclass(frozen=True)
class RoundContext:
    """What the coordinator knows when no round is open and it may open one."""

    round_id: int  # the id the next round gets
    base_version: int  # the current model version
    online: frozenset[str]  # devices whose retained status says they are online
    now: float
    training: TrainingConfig  # what devices are told to train with

    def __post_init__(self) -> None:
        if self.round_id < 1 or self.base_version < 0:
            raise ValueError("round_id must be >= 1 and base_version >= 0")


class RoundPolicy(Protocol):
    """The coordinator's questions about rounds; see the module docstring."""

    def plan(self, ctx: RoundContext) -> RoundPlan | None:
        """The plan of a round to open now, or None to wait (e.g. too few devices online)."""
        ...

    def is_ready(self, state: RoundState, now: float) -> bool:
        """Whether the open round should close now (aggregate, publish a new model)."""
        ...

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        """Whether the open round should be dropped now (asked only when not ready)."""
        ...


RoundPolicyFactory = Callable[["AggregatorConfig"], RoundPolicy]


class SyncRounds:
    """Synchronous rounds: a seeded selection, a quorum, a deadline and a grace time.

    Opens a round once ``min_devices`` devices are online. ``selection="sample"`` names a
    seeded sample of ``clients_per_round`` online devices (too few for the quorum: any device
    may contribute); the target is the number selected, else ``clients_per_round``. Ready
    when ``min_updates`` are in and every selected device is in or was finally rejected
    (``RoundState.refuse``), the target is reached or the deadline passed; abandoned without
    quorum at ``deadline + abandon_after``, or at once when every selected device answered.

    Under DP with ``dp_sampling = "poisson"`` the selection is :func:`poisson_sample` with
    rate ``clients_per_round / dp_population`` (the accountant's rate), never widened to
    "any device" when small (the quorum shrinks to the sample instead).
    """

    def __init__(self, config: AggregatorConfig) -> None:
        self.selection = config.selection
        self.clients_per_round = config.clients_per_round
        self.min_updates = config.min_updates
        self.min_devices = config.min_devices
        self.seed = config.seed
        self.round_timeout = config.round_timeout
        self.abandon_after = config.abandon_after
        # DP with Poisson sampling: each online device independently with this rate.
        self.poisson_rate: float | None = None
        if config.dp and config.dp_sampling == "poisson":
            self.poisson_rate = config.clients_per_round / config.dp_population
        self.dp_seed = config.dp_seed

    def plan(self, ctx: RoundContext) -> RoundPlan | None:
        if len(ctx.online) < self.min_devices:
            return None
        selected: tuple[str, ...] = ()
        if self.poisson_rate is not None:
            selected = poisson_sample(ctx.online, self.poisson_rate, self.dp_seed, ctx.round_id)
            if not selected:
                return None  # nobody drawn: the next tick draws again (docs/privacy.md)
        elif self.selection == "sample" and ctx.online:
            selected = select_devices(ctx.online, self.clients_per_round, self.seed, ctx.round_id)
            if len(selected) < self.min_updates:
                selected = ()  # too few online for a quorum of named devices: open the round
        target = len(selected) if selected else self.clients_per_round
        deadline = ctx.now + self.round_timeout
        return RoundPlan(
            round_id=ctx.round_id,
            base_version=ctx.base_version,
            selected=selected,
            target=target,
            min_updates=min(self.min_updates, target),
            opened_at=ctx.now,
            deadline=deadline,
            abandon_at=deadline + self.abandon_after,
            config=ctx.training,
        )

    def is_ready(self, state: RoundState, now: float) -> bool:
        p = state.plan
        if state.count < p.min_updates:
            return False
        return state.all_selected_answered() or state.count >= p.target or now >= p.deadline

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        if state.count >= state.plan.min_updates:
            return False
        return now >= state.plan.abandon_at or state.all_selected_answered()


class FedBuffRounds:
    """Asynchronous buffered aggregation (FedBuff): one buffer always open, no waiting.

    Each round is one buffer on the current version, announced to any device (no
    selection, no quorum wait, a deadline :data:`FEDBUFF_HORIZON` ahead). Updates of earlier
    rounds whose base is at most ``max_staleness`` versions behind are folded too, their
    weight times ``(1 + staleness) ** -staleness_exponent`` (:class:`StalenessRule`, checked
    by the round state). Ready once ``buffer_size`` updates are in, or with ``flush_after``
    > 0 once that many seconds passed since it opened with at least one update in. An empty
    buffer stays open (dropped only at its horizon, so devices never see it past its
    deadline).
    """

    def __init__(self, config: AggregatorConfig) -> None:
        self.buffer_size = config.buffer_size
        self.flush_after = config.flush_after
        self.rule = StalenessRule(config.max_staleness, config.staleness_exponent)

    def plan(self, ctx: RoundContext) -> RoundPlan:
        deadline = ctx.now + FEDBUFF_HORIZON
        return RoundPlan(
            round_id=ctx.round_id,
            base_version=ctx.base_version,
            selected=(),
            target=self.buffer_size,
            min_updates=1,
            opened_at=ctx.now,
            deadline=deadline,
            abandon_at=deadline,
            config=ctx.training,
            staleness=self.rule,
        )

    def is_ready(self, state: RoundState, now: float) -> bool:
        if state.count >= state.plan.target:
            return True
        if state.count < 1:
            return False
        flush = self.flush_after > 0 and now >= state.plan.opened_at + self.flush_after
        return flush or now >= state.plan.deadline

    def is_abandoned(self, state: RoundState, now: float) -> bool:
        return state.count == 0 and now >= state.plan.abandon_at


def poisson_sample(
    online: Iterable[str], rate: float, seed: int | None, round_id: int
) -> tuple[str, ...]:
    """Each of the ``online`` devices independently with probability ``rate`` (sorted).

    ``seed`` None draws from the OS (``secrets``): under DP the server's sampling must not be
    predictable; a seed makes it reproducible (tests). A draw with nobody is returned as
    such (the caller waits and draws again)."""
    if not 0 < rate <= 1:
        raise ValueError(f"rate must be in (0, 1], got {rate}")
    rng: random.Random
    if seed is None:
        rng = secrets.SystemRandom()
    else:
        rng = random.Random(f"fedmq-poisson:{seed}:{round_id}")
    return tuple(d for d in sorted(set(online)) if rng.random() < rate)


def _secagg_rounds(config: AggregatorConfig) -> RoundPolicy:
    from aggregator.secagg import SecAggRounds  # it builds on SyncRounds: imported late

    return SecAggRounds(config)


_REGISTRY: dict[str, RoundPolicyFactory] = {
    DEFAULT_ROUND_POLICY: SyncRounds,
    "fedbuff": FedBuffRounds,
    "secagg": _secagg_rounds,  # secure aggregation (aggregator.secagg, docs/privacy.md)
}


def register_round_policy(name: str, factory: RoundPolicyFactory) -> None:
    """Make ``round_policy = name`` build a policy with ``factory(config)``."""
    if not name.replace("-", "_").isidentifier():
        raise ValueError(f"round policy name {name!r} must be a word (letters, digits, - or _)")
    if name in _REGISTRY:
        raise ValueError(f"round policy {name!r} is already registered")
    _REGISTRY[name] = factory


def unregister_round_policy(name: str) -> None:
    """Remove a registered policy (tests); the default cannot be removed."""
    if name == DEFAULT_ROUND_POLICY:
        raise ValueError(f"the default round policy {name!r} cannot be removed")
    _REGISTRY.pop(name, None)


def round_policy_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def make_round_policy(config: AggregatorConfig) -> RoundPolicy:
    """The policy named by ``config.round_policy``; unknown names are a ConfigError."""
    factory = _REGISTRY.get(config.round_policy)
    if factory is None:
        raise ConfigError(
            f"round_policy must be one of {round_policy_names()}, got {config.round_policy!r}"
        )
    return factory(config)
