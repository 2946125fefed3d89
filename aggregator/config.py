"""The aggregator's configuration: one frozen, validated object per process.

Sources, lowest to highest precedence: defaults < TOML file (``[aggregator]`` table, the
broker connection in ``[mqtt]``) < environment (``FEDMQ_AGGREGATOR_<FIELD>``, e.g.
``FEDMQ_AGGREGATOR_FLEET``; ``FEDMQ_AGGREGATOR_MQTT_<KEY>`` for ``[mqtt]``) < flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aggregator.bounds import BoundsConfig
from aggregator.policies import DEFAULT_ROUND_POLICY, round_policy_names
from fedmq.chunks import MIN_MESSAGE_BYTES
from fedmq.config import load_config
from fedmq.downlink import DownlinkSettings, check_downlink_settings
from fedmq.errors import ConfigError, FedmqError
from fedmq.net.mqtt import MqttSettings
from fedmq.privacy.accounting import SAMPLINGS as DP_SAMPLINGS
from fedmq.privacy.accounting import PrivacyPlan
from fedmq.privacy.dp_fedavg import DpOptions
from fedmq.privacy.noise import AdaptiveClip
from fedmq.prune.strategy import PruneSchedule, check_prune_settings
from fedmq.topics import Topics, validate_name
from fedmq.update.accumulate import BufferedUpdates
from fedmq.update.codecs import codec_names
from fedmq.update.codecs.topk import check_topk_fraction, topk_params
from fedmq.update.strategies import StrategyOptions, make_strategy, strategy_names
from fedmq.wire import TrainingConfig

__all__ = [
    "DP_CLIP_MODES",
    "ENV_PREFIX",
    "EVAL_DATASETS",
    "MOVED",
    "SELECTIONS",
    "TOML_SECTION",
    "AggregatorConfig",
    "load_aggregator_config",
]

ENV_PREFIX = "FEDMQ_AGGREGATOR_"
TOML_SECTION = "aggregator"
DP_CLIP_MODES = ("fixed", "adaptive")
EVAL_DATASETS = ("digits", "fashion-mnist", "fashion-mnist-seq", "none")
SELECTIONS = ("sample", "any")
#: Flat keys of older configs and where they live now (refused with this hint).
MOVED = {
    name: f"mqtt.{name}"
    for name in ("host", "port", "client_id", "protocol", "keepalive", "session_expiry",
                 "reconnect_min", "reconnect_max", "username", "password", "tls_ca",
                 "tls_cert", "tls_key")
} | {"backoff_min": "mqtt.reconnect_min", "backoff_max": "mqtt.reconnect_max",
     "mqtt.backoff_min": "mqtt.reconnect_min", "mqtt.backoff_max": "mqtt.reconnect_max",
     # one name per concept: the cap on a device's claimed num_examples, the evaluation size
     "max_examples_per_update": "max_claimed_examples",
     "eval_max_examples": "eval_examples"}


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything the aggregator service needs (see docs/protocol.md for the round rules).

    ``selection="sample"`` names a seeded sample of ``clients_per_round`` online devices in
    each round; ``"any"`` lets any device contribute (the round targets ``clients_per_round``
    updates). ``rounds=0`` runs forever; otherwise the service stops once that many rounds
    have closed (counted over the state directory's whole history).
    """

    fleet: str = "default"
    # The broker connection ([mqtt]); client_id empty = fedmq-aggregator-<fleet>.
    mqtt: MqttSettings = field(default_factory=lambda: MqttSettings(reconnect_max=30.0))
    topic_prefix: str = ""
    state_dir: Path = Path("fedmq-aggregator-state")
    # a bundle directory or the name of a bundle shipped with fedmq
    model: str = "digits-mlp"
    # "digits", "fashion-mnist", "fashion-mnist-seq", "none" or a path to an .npz (x, y)
    eval_dataset: str = "digits"
    eval_examples: int = 2000  # 0 = the whole test split
    rounds: int = 0
    clients_per_round: int = 10
    min_updates: int = 1
    min_devices: int = 0
    selection: str = "sample"
    # a registered round policy (aggregator.policies): "sync" = synchronous rounds
    round_policy: str = DEFAULT_ROUND_POLICY
    round_timeout: float = 300.0
    abandon_after: float = 300.0
    # -- round_policy = "fedbuff" (docs/rounds.md): asynchronous buffered aggregation --
    buffer_size: int = 10  # a new model every this many accepted updates
    max_staleness: int = 10  # updates trained on an older base are refused (reason says)
    staleness_exponent: float = 0.5  # fold weight x (1 + staleness) ** -exponent
    flush_after: float = 0.0  # seconds; > 0 = apply a partial buffer after this long
    epochs: int = 1
    lr: float = 0.05
    codec: str = "int8"
    # top-k codecs (topk-f16/int8/int4, stc): the round's params["topk_fraction"]; None = the
    # codec's default (docs/codecs.md). Refused with any other codec.
    topk_fraction: float | None = None
    train_max_examples: int | None = None
    sample_fraction: float | None = None
    strategy: str = "fedavg"
    server_lr: float | None = None
    server_momentum: float = 0.9
    # -- strategy options (docs/strategies.md): adaptive servers, robust aggregation ---------
    server_beta1: float = 0.9  # fedadam/fedyogi/fedadagrad (Reddi et al. 2021)
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    bias_correction: bool = False  # Algorithm 2 has none
    robust_buffer: int = 64  # updates kept per round by median/trimmed_mean/krum/wrappers
    trim: float = 0.1  # trimmed_mean: fraction dropped each side
    krum_f: int = 1  # krum: Byzantine devices assumed (rounds need >= 2 krum_f + 3 updates)
    krum_m: int = 0  # krum: updates averaged, 0 = n - krum_f
    clip_updates: str = "off"  # server-side norm bounding: "off", "fixed", "adaptive"
    clip_norm: float = 0.0  # "fixed": the L2 bound of each update
    clip_multiplier: float = 1.0  # "adaptive": bound = this x the round's median norm
    zero_outliers_k: float = 0.0  # zero values > k MADs from the median; 0 = off
    prox_mu: float = 0.01  # fedprox: the proximal weight sent to devices as params "mu"
    grad_examples: int = 64  # fedsgd: examples per device gradient
    server_adam: bool = False  # fedsgd: Adam on the mean gradient instead of SGD
    # -- differential privacy (docs/privacy.md): DP-FedAvg with an accountant -------------
    dp: bool = False
    dp_population: int = 0  # devices in the fleet (N); the sampling rate is clients/N
    dp_sampling: str = "poisson"  # "poisson" (rate clients_per_round/N) or "fixed"
    dp_noise_multiplier: float = 1.0  # z: noise sd = z * clip on the sum
    dp_clip: float = 1.0  # C (adaptive: the initial C)
    dp_clip_mode: str = "fixed"  # "fixed" or "adaptive" (Andrew et al. 2021)
    dp_target_quantile: float = 0.5  # adaptive: the norm quantile C tracks
    dp_clip_lr: float = 0.2  # adaptive: geometric learning rate of C
    dp_clip_count_sd: float = 0.0  # adaptive: noise sd of the clipped count; 0 = clients/20
    dp_clip_tolerance: float = 0.1  # re-clip up to C*(1+tol) (quantisation); reject above
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"  # "rdp" or "pld" (Poisson sampling only)
    dp_epsilon_budget: float = 0.0  # no round opens that would exceed it; 0 = no budget
    dp_local_noise: float = 0.0  # local DP: noise multiplier added on the device; 0 = off
    dp_allow_adaptive: bool = False  # fedadam/fedyogi/fedadagrad under DP
    dp_seed: int | None = None  # seed of the server's noise and sampling (tests only)
    # -- round_policy = "secagg" (docs/privacy.md): secure aggregation --
    secagg_clip: float = 0.05  # |delta| clip per value; the round's int8 scale is clip/127
    secagg_phase_timeout: float = 30.0  # seconds per phase (keys, shares, unmasking)
    secagg_min_survivors: int = 3  # fewer masked inputs: the round is abandoned
    # -- homomorphic encryption (docs/privacy.md): sum CKKS ciphertexts, "" = off ----------
    he_context: str = ""  # the public context of `fedmq he keygen` (never the secret one)
    he_decrypt_timeout: float = 600.0  # a sealed sum without the decryptor's answer: abandon
    seed: int = 0
    max_update_bytes: int = 16 * 1024 * 1024
    # Chunked transfer (docs/protocol.md): messages above this many bytes are split into
    # chunks; 0 = never (set it to the broker's limit, e.g. 131072 for AWS IoT Core).
    max_message_bytes: int = 0
    chunk_timeout: float = 300.0  # an update's transfer without a new chunk this long expires
    max_transfers_per_device: int = 2  # chunked transfers in progress per device
    # Bytes of received messages waiting for the main thread (docs/scaling.md, "Ingest
    # queue"); above it paho stops reading and the backlog stays in the broker.
    ingest_queue_bytes: int = 16 * 1024 * 1024
    # Compressed downlink (docs/protocol.md): "full" model every version, or a codec name:
    # deltas in that codec, a full snapshot every `snapshot_every` versions, deltas of the
    # last `downlink_window` versions retained; sparse codecs keep `downlink_fraction`.
    downlink: str = "full"
    snapshot_every: int = 10
    downlink_window: int = 10
    downlink_fraction: float = 0.1
    max_claimed_examples: int = 10_000_000
    # Enrolled devices' public keys (JSON written by `fedmq enroll`); see docs/protocol.md.
    registry: str | None = None
    # None = required exactly when a registry is set. False with a registry: signatures
    # are checked when present for enrolled devices, unsigned updates pass (migration).
    require_signatures: bool | None = None
    # Prometheus exporter: off by default; loopback unless an operator opens it (the
    # container image sets 0.0.0.0, see docs/deployment.md).
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_every: int = 1
    tick_interval: float = 0.2
    # -- ingest bounds and the model-publication guard (docs/protocol.md, "Ingest bounds") --
    # L2-norm bound of an update: "adaptive" (norm_multiplier x the median of the fleet's
    # recent norms, once bounds_warmup devices are known), "fixed" (max_update_norm) or "off".
    norm_bound: str = "adaptive"
    # Over the bound: "clip" (fold the delta scaled down to the bound; acked accepted) or
    # "reject" (ack norm_bound; the device's work is lost).
    norm_action: str = "clip"
    max_update_norm: float = 0.0  # a fixed ceiling on the L2 norm; 0 = none
    norm_multiplier: float = 3.0
    # Fold weight = min(num_examples, the registry's max_weight for the device,
    # weight_cap_multiplier x the median of recent claims); 0 = no relative cap.
    weight_cap_multiplier: float = 2.0
    bounds_window: int = 100  # medians over the latest value of this many recent devices
    bounds_warmup: int = 3  # median bounds apply once this many devices are known
    # A candidate model with a weight of |w| above this (or non-finite) is not published.
    max_model_weight: float = 1e4
    # -- pruning (docs/pruning.md): magnitude pruning with a server-owned mask -------------
    prune_target: float = 0.0  # final sparsity of the kernels, 0 = off (at most 0.99)
    prune_schedule_rounds: int = 10  # aggregations until prune_target (cubic ramp)
    prune_every: int = 2  # the mask is re-chosen every this many aggregations

    def __post_init__(self) -> None:
        validate_name(self.fleet, "fleet")
        if not isinstance(self.mqtt, MqttSettings):
            raise ConfigError("mqtt must be an MqttSettings")
        Topics(self.fleet, self.topic_prefix)  # validates the prefix
        if not self.model:
            raise ConfigError("model must name a bundle directory or a prebuilt bundle")
        if not self.eval_dataset:
            raise ConfigError("eval_dataset must not be empty (use 'none' to skip evaluation)")
        _at_least(self.eval_examples, 0, "eval_examples")
        _at_least(self.rounds, 0, "rounds")
        _at_least(self.clients_per_round, 1, "clients_per_round")
        _at_least(self.min_updates, 1, "min_updates")
        _at_least(self.min_devices, 0, "min_devices")
        if self.min_updates > self.clients_per_round:
            raise ConfigError(
                f"min_updates ({self.min_updates}) exceeds clients_per_round "
                f"({self.clients_per_round})"
            )
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.round_policy not in round_policy_names():
            raise ConfigError(
                f"round_policy must be one of {round_policy_names()}, got {self.round_policy!r}"
            )
        _at_least(self.buffer_size, 1, "buffer_size")
        _at_least(self.max_staleness, 0, "max_staleness")
        for name in ("staleness_exponent", "flush_after"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("round_timeout", "abandon_after", "tick_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.round_timeout <= 0:
            raise ConfigError("round_timeout must be > 0")
        if self.codec not in codec_names():
            raise ConfigError(f"codec must be one of {codec_names()}, got {self.codec!r}")
        check_topk_fraction(self.codec, self.topk_fraction)
        if self.strategy not in strategy_names():
            raise ConfigError(
                f"strategy must be one of {strategy_names()}, got {self.strategy!r}"
            )
        lr = self.server_lr
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        self._check_strategy_options()
        self._check_privacy()
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
            raise ConfigError(f"secagg_clip must be > 0, got {self.secagg_clip}")
        if not (math.isfinite(self.secagg_phase_timeout) and self.secagg_phase_timeout > 0):
            raise ConfigError(f"secagg_phase_timeout must be > 0, got {self.secagg_phase_timeout}")
        _at_least(self.secagg_min_survivors, 2, "secagg_min_survivors")
        from aggregator.secagg import check_secagg_config  # late: it imports the policies

        check_secagg_config(self)
        self._check_he()
        check_prune_settings(self.prune_schedule(), self.codec, self.strategy, self.dp)
        _at_least(self.max_update_bytes, 1024, "max_update_bytes")
        _check_chunking(self.max_message_bytes, self.chunk_timeout)
        _at_least(self.max_transfers_per_device, 1, "max_transfers_per_device")
        _at_least(self.ingest_queue_bytes, 65536, "ingest_queue_bytes")
        check_downlink_settings(
            self.downlink, self.snapshot_every, self.downlink_window, self.downlink_fraction
        )
        _at_least(self.max_claimed_examples, 1, "max_claimed_examples")
        _at_least(self.metrics_port, 0, "metrics_port")
        if self.metrics_port > 65535:
            raise ConfigError(f"metrics_port {self.metrics_port} is out of range")
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host must be an address to bind (e.g. 127.0.0.1)")
        _at_least(self.log_every, 1, "log_every")
        if self.registry is not None and not self.registry.strip():
            raise ConfigError("registry must be a path (or unset)")
        if self.require_signatures and self.registry is None:
            raise ConfigError("require_signatures needs a registry of enrolled devices")
        if not (math.isfinite(self.max_model_weight) and self.max_model_weight > 0):
            raise ConfigError(f"max_model_weight must be > 0, got {self.max_model_weight}")
        try:
            self.training_config()
            self.bounds_config()
        except (ValueError, FedmqError) as exc:
            raise ConfigError(str(exc)) from exc

    def _check_strategy_options(self) -> None:
        options = self.strategy_options()
        needed = options.min_updates_needed(self.strategy)
        if self.min_updates < needed:
            raise ConfigError(
                f"strategy {self.strategy!r} with krum_f={self.krum_f} needs min_updates >= "
                f"{needed}, got {self.min_updates}"
            )
        if self.strategy == "krum" and self.krum_m > self.min_updates:
            raise ConfigError(
                f"krum_m ({self.krum_m}) exceeds min_updates ({self.min_updates}): a round "
                "of min_updates updates could not select that many"
            )
        if self.strategy_buffers() and self.robust_buffer < self.min_updates:
            raise ConfigError(
                f"robust_buffer ({self.robust_buffer}) is below min_updates "
                f"({self.min_updates}): the round could never close"
            )

    def _check_privacy(self) -> None:
        if not self.dp:
            return
        if self.strategy == "fednova":
            raise ConfigError(
                "dp folds clipped updates with equal weight; fednova's step normalisation "
                "is not accounted for: choose fedavg (or another strategy) with dp"
            )
        if self.dp_sampling not in DP_SAMPLINGS:
            raise ConfigError(
                f"dp_sampling must be one of {DP_SAMPLINGS}, got {self.dp_sampling!r}"
            )
        if self.dp_clip_mode not in DP_CLIP_MODES:
            raise ConfigError(
                f"dp_clip_mode must be one of {DP_CLIP_MODES}, got {self.dp_clip_mode!r}"
            )
        if self.dp_population < self.clients_per_round:
            raise ConfigError(
                f"dp needs dp_population (the fleet size, {self.dp_population}) >= "
                f"clients_per_round ({self.clients_per_round})"
            )
        if self.selection != "sample":
            raise ConfigError('dp needs selection = "sample": the accountant assumes sampling')
        if self.dp_sampling == "fixed" and self.min_devices < self.dp_population:
            raise ConfigError(
                "dp_sampling = \"fixed\" is accounted as clients_per_round of dp_population "
                f"without replacement: set min_devices >= dp_population ({self.dp_population})"
            )
        if not (math.isfinite(self.dp_epsilon_budget) and self.dp_epsilon_budget >= 0):
            raise ConfigError(f"dp_epsilon_budget must be >= 0, got {self.dp_epsilon_budget}")
        try:
            self.dp_options()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def _check_he(self) -> None:
        if not self.he_context:
            return
        if not (math.isfinite(self.he_decrypt_timeout) and self.he_decrypt_timeout > 0):
            raise ConfigError(f"he_decrypt_timeout must be > 0, got {self.he_decrypt_timeout}")
        # What the aggregator cannot do with a ciphertext (docs/privacy.md): see its norm,
        # clip or noise it (DP), keep it for a median, re-weight it for staleness.
        unfit = [
            text for bad, text in (
                (self.norm_bound != "off", 'norm_bound = "off"'),
                (self.dp, "dp = false"),
                (self.round_policy != "sync", 'round_policy = "sync"'),
                (self.strategy not in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
                 "a mean-delta strategy (fedavg, fedavgm, fedadam, fedyogi, fedadagrad)"),
                (self.clip_updates != "off", 'clip_updates = "off"'),
                (self.zero_outliers_k != 0, "zero_outliers_k = 0"),
            ) if bad
        ]
        if unfit:
            raise ConfigError(f"he_context (encrypted updates) needs {', '.join(unfit)}")

    # -- derived ---------------------------------------------------------------------------
    def dp_options(self) -> DpOptions | None:
        """The DP-FedAvg settings (None when ``dp`` is off)."""
        if not self.dp:
            return None
        adaptive = None
        count_sd = None
        if self.dp_clip_mode == "adaptive":
            count_sd = self.dp_clip_count_sd or self.clients_per_round / 20
            adaptive = AdaptiveClip(self.dp_target_quantile, self.dp_clip_lr, count_sd)
        plan = PrivacyPlan(
            population=self.dp_population,
            per_round=self.clients_per_round,
            noise_multiplier=self.dp_noise_multiplier,
            delta=self.dp_delta,
            sampling=self.dp_sampling,
            accountant=self.dp_accountant,
            clip_count_sd=count_sd,
        )
        return DpOptions(
            noise_multiplier=self.dp_noise_multiplier,
            clip=self.dp_clip,
            expected_participants=self.clients_per_round,
            plan=plan,
            clip_tolerance=self.dp_clip_tolerance,
            adaptive=adaptive,
            local_noise=self.dp_local_noise,
            seed=self.dp_seed,
            allow_adaptive=self.dp_allow_adaptive,
        )

    def prune_schedule(self) -> PruneSchedule:
        """The pruning schedule (``enabled`` False when ``prune_target`` is 0)."""
        return PruneSchedule(self.prune_target, self.prune_schedule_rounds, self.prune_every)

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(
            server_lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            tau=self.server_tau,
            bias_correction=self.bias_correction,
            robust_buffer=self.robust_buffer,
            trim=self.trim,
            krum_f=self.krum_f,
            krum_m=self.krum_m,
            clip_updates=self.clip_updates,
            clip_norm=self.clip_norm,
            clip_multiplier=self.clip_multiplier,
            zero_outliers_k=self.zero_outliers_k,
            prox_mu=self.prox_mu,
            grad_examples=self.grad_examples,
            server_adam=self.server_adam,
        )

    def strategy_buffers(self) -> bool:
        """Whether the configured strategy keeps each update (a bounded buffer)."""
        strategy = make_strategy(self.strategy, options=self.strategy_options())
        return isinstance(strategy.new_accumulator({"probe": (1,)}), BufferedUpdates)

    @property
    def effective_client_id(self) -> str:
        """A fixed client id (persistent session): ``fedmq-aggregator-<fleet>`` by default."""
        return self.mqtt.client_id or f"fedmq-aggregator-{self.fleet}"

    @property
    def signatures_required(self) -> bool:
        """Whether every update must carry a valid signature of an enrolled device."""
        if self.require_signatures is None:
            return self.registry is not None
        return self.require_signatures

    @property
    def topics(self) -> Topics:
        return Topics(self.fleet, self.topic_prefix)

    def training_config(self) -> TrainingConfig:
        return TrainingConfig(
            epochs=self.epochs,
            lr=self.lr,
            codec=self.codec,
            max_examples=self.train_max_examples,
            sample_fraction=self.sample_fraction,
            params=topk_params(self.topk_fraction),
        )

    def downlink_settings(self) -> DownlinkSettings:
        return DownlinkSettings(
            self.downlink, self.snapshot_every, self.downlink_window,
            float(self.downlink_fraction), self.max_message_bytes, self.seed,
        )

    def bounds_config(self) -> BoundsConfig:
        return BoundsConfig(
            norm_bound=self.norm_bound,
            norm_action=self.norm_action,
            max_update_norm=self.max_update_norm,
            norm_multiplier=self.norm_multiplier,
            weight_cap_multiplier=self.weight_cap_multiplier,
            bounds_window=self.bounds_window,
            bounds_warmup=self.bounds_warmup,
        )

    def mqtt_settings(self) -> MqttSettings:
        """``[mqtt]`` with the effective client id and a persistent session."""
        return replace(self.mqtt, client_id=self.effective_client_id, clean_start=False)


def _at_least(value: int, low: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def load_aggregator_config(
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> AggregatorConfig:
    """Defaults < TOML ``[aggregator]``/``[mqtt]`` < ``FEDMQ_AGGREGATOR_*`` < ``overrides``
    (field names, ``mqtt.<key>`` for the connection)."""
    return load_config(
        AggregatorConfig,
        toml_path,
        section=TOML_SECTION,
        env_prefix=ENV_PREFIX,
        overrides=overrides,
        environ=environ,
        moved=MOVED,
    )


def _check_chunking(max_message_bytes: int, chunk_timeout: float) -> None:
    if max_message_bytes != 0 and max_message_bytes < MIN_MESSAGE_BYTES:
        raise ConfigError(
            f"max_message_bytes must be 0 (no chunking) or >= {MIN_MESSAGE_BYTES}, "
            f"got {max_message_bytes}"
        )
    if not (math.isfinite(chunk_timeout) and chunk_timeout > 0):
        raise ConfigError(f"chunk_timeout must be > 0 seconds, got {chunk_timeout}")
