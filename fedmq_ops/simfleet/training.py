"""Real training for simulated devices: one LiteRT interpreter per process, trained in turn
for each of its devices on that device's own shard of a dataset (``fedmq.data`` partitions).

Slower than synthetic deltas by the training time (digits-mlp: milliseconds per device and
round), but the updates are what real devices would send, so accuracy means something.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edge_agent.trainer import LiteRTTrainer
from fedmq.data.datasets import load_dataset
from fedmq.data.partition import partition
from fedmq.data.sampling import sample_size
from fedmq.errors import ConfigError
from fedmq.models.spec import load_bundle, prebuilt_bundle_path
from fedmq.wire import TrainingConfig

__all__ = ["ShardTrainer"]


class ShardTrainer:
    """Trains the devices ``devices`` (ids ``<name>-NNNNN`` of a fleet of ``fleet_size``) of
    ``model`` on their shards of ``dataset`` split by ``scheme`` (``iid``,
    ``dirichlet:0.5``, ... as in ``fedmq demo --split``) with ``seed``."""

    def __init__(self, model: str, dataset: str, scheme: str, fleet_size: int,
                 devices: Sequence[str], seed: int) -> None:
        path = Path(model)
        bundle = load_bundle(path if path.is_dir() else prebuilt_bundle_path(model))
        self.trainer = LiteRTTrainer(bundle, num_threads=1)
        train, _test = load_dataset(dataset)
        if len(train.y) < fleet_size:
            raise ConfigError(f"{dataset} has {len(train.y)} training examples: too few for "
                              f"{fleet_size} devices to train on their own shards")
        parts = partition(train.y, fleet_size, scheme, seed)
        self.x, self.y = train.x, train.y
        self.seed = seed
        self._shards: dict[str, np.ndarray] = {}
        for device in devices:
            index = int(device.rsplit("-", 1)[1])
            self._shards[device] = parts[index]

    def examples(self, device: str) -> int:
        return len(self._shards[device])

    def delta(self, device: str, round_id: int, global_weights: Mapping[str, np.ndarray],
              cfg: TrainingConfig) -> tuple[dict[str, np.ndarray], int]:
        """Train ``device`` for ``round_id`` from ``global_weights``: (local - global, the
        number of examples trained on)."""
        idx = self._shards[device]
        rng = np.random.default_rng([self.seed, zlib.crc32(device.encode()), round_id, 6])
        m = sample_size(len(idx), cfg.sample_fraction, cfg.max_examples)
        pick = rng.permutation(idx)[:m]
        self.trainer.set_weights(global_weights)
        self.trainer.fit(self.x[pick], self.y[pick], epochs=cfg.epochs, lr=cfg.lr, rng=rng)
        local = self.trainer.get_weights()
        delta = {
            name: (np.asarray(local[name], np.float32) - np.asarray(w, np.float32))
            for name, w in global_weights.items()
        }
        return delta, int(m)
