"""DP-FedAvg (McMahan et al. 2018, user-level, central noise) as a strategy wrapper.

:class:`DPFedAvg` wraps any strategy: it tells devices the clip bound (``params``:
``dp_clip``, and ``dp_local_noise`` for local DP), folds every update with weight 1 into a
:class:`ClippedSum` (re-clipped to exactly C: see below), adds ``N(0, (z C)^2)`` to the sum,
divides by the EXPECTED number of participants (never by the claimed example counts nor the
actual count: both would leak) and hands the inner strategy that noised mean.

Clip bound at the aggregator: an update whose decoded norm is within
``C * (1 + clip_tolerance)`` is re-clipped to C (a device that clipped to C before a
quantising codec lands slightly above C: int8's stochastic rounding moves each value by
less than one step); one further above is rejected (``norm_bound``: the device did not clip).
Either way what is folded has norm <= C, so the sum's sensitivity is C whatever the codec.

Adaptive clipping (:class:`~fedmq.privacy.noise.AdaptiveClip`): devices report
``dp_unclipped`` (1.0 when their norm was <= C) in the update's metrics; the noised count
moves C after every round. Server-side adaptive optimisers (Adam-like state) are refused
unless ``allow_adaptive``: the noise dominates their second-moment estimates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.errors import ConfigError, Rejected, RejectReason
from fedmq.privacy.accounting import PrivacyPlan
from fedmq.privacy.clip import clip_factor, l2_norm
from fedmq.privacy.noise import AdaptiveClip, add_gaussian_noise
from fedmq.tensor import Tensor
from fedmq.update.accumulate import (
    Accumulated,
    BufferedUpdates,
    CheckedUpdate,
    WeightedSum,
    Weights,
)
from fedmq.update.codecs import get_codec
from fedmq.update.strategies import AdaptiveServer, Strategy, StrategyWrapper
from fedmq.wire import TrainingConfig

__all__ = [
    "ClippedSum",
    "DPFedAvg",
    "DpOptions",
    "UNCLIPPED_METRIC",
    "local_noise_allowance",
]

log = logging.getLogger(__name__)

#: The update metric a device sets to 1.0 when its norm was within the clip (adaptive).
UNCLIPPED_METRIC = "dp_unclipped"


@dataclass(frozen=True)
class DpOptions:
    """DP-FedAvg settings (docs/privacy.md): noise multiplier z, initial clip C, expected
    participants per round, the re-clip tolerance, adaptive clipping (None = fixed C),
    local noise multiplier (0 = off), the noise seed (None = OS entropy; tests only) and
    whether an adaptive server optimiser is allowed."""

    noise_multiplier: float
    clip: float
    expected_participants: int
    plan: PrivacyPlan
    clip_tolerance: float = 0.1
    adaptive: AdaptiveClip | None = None
    local_noise: float = 0.0
    seed: int | None = None
    allow_adaptive: bool = False
    model_values: int = 0  # trainable values of the model (needed with local noise)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ConfigError(f"dp_noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"dp_clip must be > 0, got {self.clip}")
        if self.expected_participants < 1:
            raise ConfigError("the expected number of participants must be >= 1")
        if not (math.isfinite(self.clip_tolerance) and 0 <= self.clip_tolerance <= 1):
            raise ConfigError(f"dp_clip_tolerance must be in [0, 1], got {self.clip_tolerance}")
        if not (math.isfinite(self.local_noise) and self.local_noise >= 0):
            raise ConfigError(f"dp_local_noise must be >= 0, got {self.local_noise}")



def local_noise_allowance(local_noise: float, values: int) -> float:
    """How far above C (in units of C) a clipped update with local noise ``N(0, (z_l C)^2)``
    on ``values`` values may be: ``z_l (sqrt(values) + 6.5)``, exceeded by the noise's
    norm with probability below 1e-9 (Gaussian norm concentration, Laurent-Massart)."""
    return 0.0 if local_noise <= 0 else local_noise * (math.sqrt(values) + 6.5)


class ClippedSum(WeightedSum):
    """A :class:`WeightedSum` of updates re-clipped to ``clip`` with weight 1 each (the
    weight ingest passes is ignored): the result's ``mean`` is the plain mean of the clipped
    updates, ``total_weight`` the count. Counts the devices that reported ``dp_unclipped``."""

    kind = "clipped_sum"

    def __init__(
        self, template: Mapping[str, tuple[int, ...]], clip: float, tolerance: float,
        local_noise: float = 0.0,
    ) -> None:
        super().__init__(template)
        self.clip = float(clip)
        self.tolerance = float(tolerance)
        values = sum(math.prod(s) for s in self._shapes.values())
        #: what one folded update's norm is bounded by (its sensitivity): C, plus with local
        #: DP the norm of the device's noise (:func:`local_noise_allowance`).
        self.bound = self.clip * (1 + local_noise_allowance(local_noise, values))
        self._slack = self.clip * self.tolerance
        self.unclipped = 0
        self.reclipped = 0

    def check(self, tensors: Iterable[Tensor], codec: str, weight: float) -> CheckedUpdate:
        """Reject an update above ``clip * (1 + tolerance)``; fold one within it with the
        factor that scales it to norm <= clip."""
        tensors = tuple(tensors)
        c = get_codec(codec)
        probe = super().check(tensors, codec, 1.0)  # model, codec and range checks first
        norm = l2_norm({t.name: c.decode(t) for t in probe.tensors})
        limit = self.bound + self._slack
        if not norm <= limit:
            what = "clip" if self.bound == self.clip else "clip plus local noise bound"
            raise Rejected(
                f"update L2 norm {norm:.6g} exceeds the DP {what} {self.bound:.6g} "
                f"(tolerance {self.tolerance:g} x C): the device did not clip its update",
                RejectReason.NORM_BOUND,
            )
        factor = clip_factor(norm, self.bound) * (1 - 1e-6 if norm > self.bound else 1.0)
        return super().check(tensors, codec, factor)

    def _add(self, checked: CheckedUpdate) -> None:
        super()._add(checked)
        if checked.weight < 1.0:
            self.reclipped += 1

    def note_metrics(self, metrics: Mapping[str, float]) -> None:
        """The device's clip bit (adaptive clipping): ``dp_unclipped`` >= 0.5 counts."""
        if float(metrics.get(UNCLIPPED_METRIC, 0.0)) >= 0.5:
            self.unclipped += 1

    def result(self) -> Accumulated:
        if self._count == 0:
            raise ValueError("no update was folded")
        inv = np.float32(1.0 / self._count)
        mean = {n: s * inv for n, s in self._sum.items()}
        return Accumulated(self._count, float(self._count), mean)

    def clipped_sum(self) -> Weights:
        """The sum of the clipped updates (a copy)."""
        return {n: s.copy() for n, s in self._sum.items()}


class DPFedAvg(StrategyWrapper):
    """Central DP around ``inner``; see the module docstring."""

    def __init__(self, inner: Strategy, options: DpOptions) -> None:
        if _is_adaptive(inner) and not options.allow_adaptive:
            raise ConfigError(
                f"strategy {inner.name!r} keeps adaptive server state that DP noise distorts: "
                "set dp_allow_adaptive = true to use it anyway"
            )
        if isinstance(inner.new_accumulator({"probe": (1,)}), BufferedUpdates):
            raise ConfigError(
                f"strategy {inner.name!r} needs every update; DP-FedAvg folds clipped sums only"
            )
        if options.local_noise > 0 and options.model_values < 1:
            raise ConfigError("local DP needs the model's number of values (model_values)")
        super().__init__(inner)
        self.options = options
        self.clip = options.clip
        self.rounds = 0  # rounds aggregated (released) under DP
        self._rng = np.random.default_rng(options.seed)
        self._fold: ClippedSum | None = None
        self.last_unclipped_fraction: float | None = None
        self.released_clip: float | None = None  # C of the last aggregated round

    @property
    def name(self) -> str:
        return f"dpfedavg({self.inner.name})"

    def central_plan(self) -> PrivacyPlan:
        """The plan the central accountant uses: with local noise, a folded update's norm is
        bounded by ``C (1 + allowance)`` instead of C, so the central noise ``z C`` is worth
        ``z / (1 + allowance)`` noise multipliers."""
        allowance = local_noise_allowance(self.options.local_noise, self.options.model_values)
        if allowance == 0:
            return self.options.plan
        z = self.options.noise_multiplier / (1 + allowance)
        return dataclasses.replace(self.options.plan, noise_multiplier=z)

    def central_epsilon(self, rounds: int | None = None) -> float:
        """Central epsilon at the plan's delta after ``rounds`` (default: those released)."""
        return self.central_plan().epsilon(self.rounds if rounds is None else rounds)

    def epsilon(self, rounds: int | None = None) -> float:
        """The epsilon of the released models: the central figure, or with local DP the
        smaller of central and local (both bound the same releases; the models are
        post-processing of locally private updates)."""
        central = self.central_epsilon(rounds)
        local = self.local_epsilon(rounds)
        return central if local is None else min(central, local)

    def local_epsilon(self, rounds: int | None = None) -> float | None:
        """Local-DP epsilon of one device that took part in every round (None: no local
        noise); accounted separately from the central figure."""
        if self.options.local_noise <= 0:
            return None
        from fedmq.privacy.accounting import local_epsilon

        r = self.rounds if rounds is None else rounds
        return local_epsilon(self.options.local_noise, r, self.options.plan.delta)

    def configure(self, round_id: int, base: TrainingConfig) -> TrainingConfig:
        cfg = self.inner.configure(round_id, base)
        params: dict[str, float | int | bool | str] = {**cfg.params, "dp_clip": self.clip}
        if self.options.local_noise > 0:
            params["dp_local_noise"] = self.options.local_noise
        return dataclasses.replace(cfg, params=params)

    def new_accumulator(self, shapes: Mapping[str, tuple[int, ...]]) -> ClippedSum:
        values = sum(math.prod(s) for s in shapes.values())
        if self.options.local_noise > 0 and values != self.options.model_values:
            raise ValueError(
                f"DpOptions.model_values is {self.options.model_values}, the model has {values}"
            )
        self._fold = ClippedSum(
            shapes, self.clip, self.options.clip_tolerance, self.options.local_noise
        )
        return self._fold

    def aggregate(
        self, global_weights: Mapping[str, np.ndarray], result: Accumulated
    ) -> Weights:
        fold = self._fold
        if fold is None or fold.count != result.count:
            raise ValueError("DPFedAvg aggregates only the ClippedSum it made for the round")
        expected = self.options.expected_participants
        sd = self.options.noise_multiplier * fold.clip  # z C (see central_plan with local DP)
        noised = add_gaussian_noise(fold.clipped_sum(), sd, self._rng)
        inv = np.float32(1.0 / expected)
        mean = {n: (s * inv).astype(np.float32) for n, s in noised.items()}
        out = self.inner.aggregate(global_weights, Accumulated(result.count, expected, mean))
        if self.options.adaptive is not None:
            self.clip, self.last_unclipped_fraction = self.options.adaptive.next_clip(
                fold.clip, fold.unclipped, expected, self._rng
            )
        self.rounds += 1
        self.released_clip = fold.clip
        if fold.reclipped:
            log.info(
                "DP round: %d of %d update(s) re-clipped to %.6g (within the quantisation "
                "tolerance)", fold.reclipped, fold.count, fold.clip,
            )
        return out

    def state(self) -> Weights:
        return {
            **self.inner.state(),
            "dp/clip": np.array([self.clip], np.float64),
            "dp/rounds": np.array([self.rounds], np.int64),
        }

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state({k: v for k, v in state.items() if not k.startswith("dp/")})
        clip = state.get("dp/clip")
        rounds = state.get("dp/rounds")
        self.clip = self.options.clip if clip is None else float(np.asarray(clip).reshape(-1)[0])
        self.rounds = 0 if rounds is None else int(np.asarray(rounds).reshape(-1)[0])


def _is_adaptive(strategy: Strategy) -> bool:
    while isinstance(strategy, StrategyWrapper):
        strategy = strategy.inner
    return isinstance(strategy, AdaptiveServer)
