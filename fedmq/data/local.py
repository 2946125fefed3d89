"""A device's own training data: where it comes from and what each round trains on.

Sources (``LocalDataConfig.source``) are one string, ``KIND:LOCATION?key=value&...``
(the query part is optional; paths must not contain ``?``):

- a registered dataset name, optionally with loader options:
  ``digits``, ``digits?test_fraction=0.2``, ``fashion-mnist?layout=flat``,
  ``fashion-mnist-seq``. With ``partition`` set, every device loads the same train split,
  partitions it with the shared ``seed`` and ``num_clients``, and keeps slice
  ``client_index`` -- so devices of one experiment get disjoint data without talking.
- ``npz:/path/data.npz?x=x_train&y=y_train&num_classes=10&layout=flat``
  (keys default to ``x`` and ``y``).
- ``csv:/path/log.csv?window=50&stride=25&label=activity&features=ax,ay,az``
  with optional ``delimiter`` (``tab`` for a tab), ``classes=walk,run,idle`` (label names
  to ids) and ``num_classes``; ``stride`` defaults to ``window``.
  See :func:`fedmq.data.datasets.load_csv_windows`.
- ``idx:/path/images.gz,/path/labels.gz?layout=images&num_classes=10``
  (uint8 pixels are scaled to [0, 1]).
- ``plugin:mypkg.sensors:load_round?num_classes=4&path=...`` or ``plugin:NAME?...`` (an
  entry point): the device's own data, fetched from a Python callable once per round
  (:mod:`fedmq.data.plugin`); :meth:`LocalData.from_config` gives a :class:`PluginData`.

Each round, :meth:`LocalData.round_batch` draws this round's examples
(:func:`~fedmq.data.sampling.sample_indices`) and augments them, with a generator seeded
by (seed, client, round): the same round always yields the same batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from fedmq.data.augment import AugmentConfig, make_augmenter
from fedmq.data.datasets import (
    Dataset,
    LazyImageDataset,
    available_datasets,
    check_dataset_options,
    lazy_dataset,
    lazy_idx_pair,
    load_csv_windows,
    load_dataset,
    load_idx_pair,
    load_npz,
)
from fedmq.data.partition import parse_partition, partition
from fedmq.data.plugin import (
    DEFAULT_LIMIT,
    RESERVED_OPTIONS,
    InputSpec,
    PluginSource,
    check_target,
)
from fedmq.data.sampling import sample_indices, sample_size
from fedmq.errors import DataError

__all__ = [
    "DataSource",
    "LocalData",
    "LocalDataConfig",
    "PluginData",
    "load_local_data",
    "load_source",
    "open_source",
    "parse_source",
]

log = logging.getLogger(__name__)

_ROUND_STREAM = 0x6D71  # separates round-batch streams from any other use of the seed
_HELDOUT_STREAM = 0x6576  # the held-out split's permutation (split_heldout)


def _text(value: str) -> str:
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _names(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(","))
    if not all(names):
        raise ValueError(value)
    return names


def _delimiter(value: str) -> str:
    value = {"tab": "\t", "comma": ",", "semicolon": ";", "space": " "}.get(value, value)
    if len(value) != 1:
        raise ValueError(value)
    return value


def _auto(value: str) -> Any:
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


_FILE_OPTIONS: dict[str, dict[str, Callable[[str], Any]]] = {
    "npz": {"x": _text, "y": _text, "num_classes": _positive_int, "layout": _text},
    "csv": {
        "window": _positive_int, "stride": _positive_int, "label": _text,
        "features": _names, "delimiter": _delimiter, "classes": _names,
        "num_classes": _positive_int,
    },
    "idx": {"layout": _text, "num_classes": _positive_int},
}
_REQUIRED = {"csv": ("window", "label")}


@dataclass(frozen=True)
class DataSource:
    """A parsed source string: ``kind`` is ``dataset``, ``npz``, ``csv``, ``idx`` or
    ``plugin`` (its options: ``num_classes`` and ``limit`` as ints, the rest strings)."""

    kind: str
    location: str
    options: Mapping[str, Any] = field(default_factory=dict)


def parse_source(source: str) -> DataSource:
    """Parse and check a source string (see the module docstring); opens no files."""
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"data source must be a non-empty string, got {source!r}")
    head, _, query = source.strip().partition("?")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise DataError(f"data source {source!r}: malformed options {query!r}") from None
    raw: dict[str, str] = {}
    for key, value in pairs:
        if key in raw:
            raise DataError(f"data source {source!r}: option {key!r} given twice")
        raw[key] = value
    kind, sep, location = head.partition(":")
    if not sep:
        if head not in available_datasets():
            raise DataError(
                f"unknown data source {head!r}: use a dataset name "
                f"({', '.join(available_datasets())}) or npz:/csv:/idx: with a path"
            )
        loader_options = {k: _auto(v) for k, v in raw.items()}
        check_dataset_options(head, **loader_options)
        return DataSource("dataset", head, loader_options)
    if kind not in (*_FILE_OPTIONS, "plugin"):
        raise DataError(
            f"data source {source!r}: unknown kind {kind!r}; use npz, csv, idx or plugin"
        )
    if not location:
        raise DataError(f"data source {source!r}: missing path after '{kind}:'")
    if kind == "plugin":
        return _plugin_source(source, location, raw)
    schema = _FILE_OPTIONS[kind]
    options: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in schema:
            raise DataError(
                f"data source {source!r}: unknown option {key!r} for {kind}; "
                f"known: {', '.join(schema)}"
            )
        try:
            options[key] = schema[key](value)
        except ValueError:
            raise DataError(f"data source {source!r}: bad value {key}={value!r}") from None
    missing = [k for k in _REQUIRED.get(kind, ()) if k not in options]
    if missing:
        raise DataError(f"data source {source!r}: missing option(s) {', '.join(missing)}")
    if kind == "idx" and len(location.split(",")) != 2:
        raise DataError(f"data source {source!r}: idx needs IMAGES,LABELS (two paths)")
    return DataSource(kind, location, options)


def _plugin_source(source: str, target: str, raw: Mapping[str, str]) -> DataSource:
    check_target(target)
    options: dict[str, Any] = dict(raw)
    for key in RESERVED_OPTIONS:
        if key in raw:
            try:
                options[key] = _positive_int(raw[key])
            except ValueError:
                raise DataError(f"data source {source!r}: bad value {key}={raw[key]!r}") from None
    if "num_classes" not in options:
        raise DataError(
            f"data source {source!r}: a plugin source needs num_classes=N (the number of "
            "classes of its labels, the model's)"
        )
    return DataSource("plugin", target, options)


def _no_plugin(src: DataSource) -> None:
    if src.kind == "plugin":
        raise DataError(
            f"plugin:{src.location} is read round by round on the device "
            "(LocalData.from_config), not loaded as a dataset"
        )


def load_source(source: str | DataSource, split: str = "train") -> Dataset:
    """Load a source; ``split`` (train/test) selects the half of a named dataset."""
    src = source if isinstance(source, DataSource) else parse_source(source)
    _no_plugin(src)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    opts = dict(src.options)
    if src.kind == "dataset":
        train, test = load_dataset(src.location, **opts)
        return train if split == "train" else test
    if split != "train":
        raise DataError(f"split={split!r} applies to named datasets, not {src.kind} files")
    if src.kind == "npz":
        return load_npz(
            src.location,
            x_key=opts.get("x", "x"),
            y_key=opts.get("y", "y"),
            num_classes=opts.get("num_classes"),
            layout=opts.get("layout", ""),
        )
    if src.kind == "csv":
        return load_csv_windows(
            src.location,
            window=opts["window"],
            stride=opts.get("stride", opts["window"]),
            label_column=opts["label"],
            feature_columns=opts.get("features"),
            delimiter=opts.get("delimiter", ","),
            classes=opts.get("classes"),
            num_classes=opts.get("num_classes"),
        )
    images_path, labels_path = (p.strip() for p in src.location.split(","))
    return load_idx_pair(
        images_path,
        labels_path,
        layout=opts.get("layout", "images"),
        num_classes=opts.get("num_classes"),
    )


@dataclass(frozen=True)
class LocalDataConfig:
    """Where a device's data comes from and how each round samples and augments it.

    ``partition`` (a spec such as ``dirichlet:0.5``) needs ``num_clients`` and
    ``client_index``; all devices of an experiment must share ``seed`` and
    ``num_clients``. ``seed`` also seeds per-round sampling/augmentation.
    ``split`` picks train or test of a named dataset (file sources are train only).
    """

    source: str
    partition: str | None = None
    num_clients: int | None = None
    client_index: int | None = None
    seed: int = 0
    sample_fraction: float | None = None
    max_examples: int | None = None
    class_balanced: bool = False
    augment: str | None = None
    split: str = "train"

    def __post_init__(self) -> None:
        src = parse_source(self.source)
        if src.kind == "plugin":
            unsupported = [
                name for name, on in (
                    ("partition", self.partition is not None),
                    ("class_balanced", self.class_balanced is True),
                    ("augment", bool(self.augment)),
                ) if on
            ]
            if unsupported:
                raise DataError(
                    f"{', '.join(unsupported)} cannot be used with a plugin source: the "
                    "plugin decides what each round trains on"
                )
        if self.split not in ("train", "test"):
            raise DataError(f"split must be 'train' or 'test', got {self.split!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("num_clients", "client_index"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise DataError(f"{name} must be a non-negative integer, got {value!r}")
        if self.partition is not None:
            parse_partition(self.partition)
            if self.num_clients is None or self.client_index is None:
                raise DataError("a partitioned source needs num_clients and client_index")
            if self.num_clients < 1 or not self.client_index < self.num_clients:
                raise DataError(
                    f"client_index {self.client_index} must be in [0, {self.num_clients})"
                )
        elif self.num_clients is not None:
            raise DataError("num_clients is only used with partition; set partition too")
        sample_size(1, self.sample_fraction, self.max_examples)  # validates both
        if not isinstance(self.class_balanced, bool):
            raise DataError(f"class_balanced must be a bool, got {self.class_balanced!r}")
        AugmentConfig.parse(self.augment)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LocalDataConfig:
        """Build from a config-file table; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"unknown data option(s) {', '.join(unknown)}; known: {sorted(known)}")
        if "source" not in values:
            raise DataError("data config needs a source")
        return cls(**dict(values))


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def open_source(source: str | DataSource, split: str = "train") -> Dataset | LazyImageDataset:
    """Like :func:`load_source`, but image sources that can be read lazily (Fashion-MNIST,
    ``idx:`` files) come back as a :class:`LazyImageDataset`: labels only, examples
    converted to float32 when a slice is taken."""
    src = source if isinstance(source, DataSource) else parse_source(source)
    _no_plugin(src)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if src.kind == "dataset":
        lazy = lazy_dataset(src.location, split, **src.options)
        if lazy is not None:
            return lazy
    elif src.kind == "idx" and split == "train":
        images_path, labels_path = (p.strip() for p in src.location.split(","))
        return lazy_idx_pair(
            images_path,
            labels_path,
            layout=src.options.get("layout", "images"),
            num_classes=src.options.get("num_classes"),
        )
    return load_source(src, split)


def load_local_data(cfg: LocalDataConfig, dataset: Dataset | None = None) -> Dataset:
    """This device's dataset: the source (or the given, already loaded ``dataset``),
    reduced to partition slice ``client_index`` when ``cfg.partition`` is set.

    Image sources are opened lazily (:func:`open_source`): the partition is computed on the
    labels and only this device's slice is read and converted to float32, so a device
    never holds the whole split (Fashion-MNIST train: 188 MB as float32).
    """
    ds: Dataset | LazyImageDataset = (
        dataset if dataset is not None else open_source(cfg.source, cfg.split)
    )
    if cfg.partition is None:
        return ds if isinstance(ds, Dataset) else ds.load()
    assert cfg.num_clients is not None and cfg.client_index is not None  # __post_init__
    parts = partition(ds.y, cfg.num_clients, cfg.partition, cfg.seed)
    mine = ds.subset(
        parts[cfg.client_index],
        name=f"{ds.name}[{cfg.partition} {cfg.client_index}/{cfg.num_clients}]",
    )
    log.info(
        "local data %s: %d examples, class counts %s",
        mine.name, len(mine), mine.class_counts().tolist(),
    )
    return mine


class LocalData:
    """A device's dataset plus its per-round sampling and augmentation policy."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        seed: int = 0,
        client_index: int | None = None,
        sample_fraction: float | None = None,
        max_examples: int | None = None,
        class_balanced: bool = False,
        augment: AugmentConfig | Mapping[str, Any] | str | None = None,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        if len(dataset) == 0:
            raise DataError(f"dataset {dataset.name!r} is empty")
        if not _is_int(seed) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        if client_index is not None and (not _is_int(client_index) or client_index < 0):
            raise DataError(f"client_index must be a non-negative integer, got {client_index!r}")
        sample_size(len(dataset), sample_fraction, max_examples)
        self._dataset = dataset
        self._seed = int(seed)
        self._client = -1 if client_index is None else int(client_index)
        self._fraction = sample_fraction
        self._max = max_examples
        self._balanced = bool(class_balanced)
        self._augment_cfg = AugmentConfig.parse(augment)
        self._image_shape = image_shape
        self._augment = make_augmenter(self._augment_cfg, dataset.layout, image_shape)

    @classmethod
    def from_config(cls, cfg: LocalDataConfig, dataset: Dataset | None = None) -> LocalData:
        """Load (or take ``dataset`` and partition it) as :func:`load_local_data` does; a
        ``plugin:`` source gives a :class:`PluginData` (the plugin imported now)."""
        src = parse_source(cfg.source)
        if src.kind == "plugin" and dataset is None:
            return PluginData.from_config(cfg)
        return cls(
            load_local_data(cfg, dataset),
            seed=cfg.seed,
            client_index=cfg.client_index,
            sample_fraction=cfg.sample_fraction,
            max_examples=cfg.max_examples,
            class_balanced=cfg.class_balanced,
            augment=cfg.augment,
        )

    @property
    def dataset(self) -> Dataset:
        return self._dataset

    @property
    def num_classes(self) -> int:
        return self._dataset.num_classes

    @property
    def examples_per_round(self) -> int:
        """How many examples each :meth:`round_batch` returns."""
        return sample_size(len(self._dataset), self._fraction, self._max)

    def __len__(self) -> int:
        return len(self._dataset)

    def round_rng(self, round_id: int) -> np.random.Generator:
        """The generator for ``round_id``, a pure function of (seed, client, round)."""
        if not _is_int(round_id) or round_id < 0:
            raise DataError(f"round_id must be a non-negative integer, got {round_id!r}")
        entropy = [self._seed, self._client + 1, int(round_id), _ROUND_STREAM]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def round_batch(self, round_id: int) -> tuple[np.ndarray, np.ndarray]:
        """This round's training arrays (x float32, y int32), shuffled, sampled and
        augmented; new arrays, reproducible for the same round."""
        rng = self.round_rng(round_id)
        idx = sample_indices(
            self._dataset.y, rng, self._fraction, self._max, class_balanced=self._balanced
        )
        x = self._dataset.x[idx]
        y = self._dataset.y[idx]
        x = self._augment(x, rng)
        return np.ascontiguousarray(x, dtype=np.float32), y


    def split_heldout(self, fraction: float) -> tuple[LocalData, Dataset]:
        """(this data without a held-out split, the held-out split): ``fraction`` of the
        examples (at least 1, at most all but 1), chosen by a permutation of (seed, client)
        so a restarted device holds out the same examples. The held-out examples are never
        trained on and never leave the device (federated evaluation)."""
        n = len(self._dataset)
        if not (0 < fraction < 1):
            raise DataError(f"the held-out fraction must be in (0, 1), got {fraction}")
        if n < 2:
            raise DataError(f"dataset {self._dataset.name!r} has {n} example: none to hold out")
        k = min(n - 1, max(1, round(n * fraction)))
        rng = np.random.default_rng(
            np.random.SeedSequence([self._seed, self._client + 1, _HELDOUT_STREAM])
        )
        order = rng.permutation(n)
        held, kept = np.sort(order[:k]), np.sort(order[k:])
        ds = self._dataset
        train = LocalData(
            Dataset(ds.x[kept], ds.y[kept], ds.num_classes, ds.name, ds.layout),
            seed=self._seed, client_index=None if self._client < 0 else self._client,
            sample_fraction=self._fraction, max_examples=self._max,
            class_balanced=self._balanced, augment=self._augment_cfg,
            image_shape=self._image_shape,
        )
        return train, Dataset(ds.x[held], ds.y[held], ds.num_classes, f"{ds.name}:heldout",
                              ds.layout)


class PluginData(LocalData):
    """A device's data that a plugin (:mod:`fedmq.data.plugin`) hands over each round.

    :meth:`bind` gives it the device id and the model's input (the edge core does that when
    it starts); :meth:`round_batch` then calls the plugin, checks what it returned and
    shuffles (and samples, with ``sample_fraction``/``max_examples``) like
    :class:`LocalData`. Bad data or a plugin exception raise
    :class:`~fedmq.data.plugin.PluginDataError`: skip the round. ``len()`` is the number of
    examples of the last round fetched (0 before the first).
    """

    def __init__(
        self,
        source: PluginSource,
        num_classes: int,
        *,
        seed: int = 0,
        sample_fraction: float | None = None,
        max_examples: int | None = None,
    ) -> None:
        if not _is_int(num_classes) or num_classes < 2:
            raise DataError(f"data plugin {source.target}: num_classes must be >= 2")
        if not _is_int(seed) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        sample_size(1, sample_fraction, max_examples)
        self._source = source
        self._num_classes = int(num_classes)
        self._seed = int(seed)
        self._client = -1
        self._fraction = sample_fraction
        self._max = max_examples
        self._balanced = False
        self._device: str | None = None
        self._spec: InputSpec | None = None
        self._last = 0

    @classmethod
    def from_config(cls, cfg: LocalDataConfig, dataset: Dataset | None = None) -> PluginData:
        """Import the plugin of ``cfg.source`` (a DataError names what failed)."""
        src = parse_source(cfg.source)
        if src.kind != "plugin" or dataset is not None:
            raise DataError(f"{cfg.source!r} is not a plugin source")
        opts = dict(src.options)
        num_classes = opts.pop("num_classes")
        limit = opts.pop("limit", DEFAULT_LIMIT)
        source = PluginSource(src.location, opts, limit=limit)
        log.info(
            "local data: plugin %s (%d classes, up to %d examples a round)",
            src.location, num_classes, limit,
        )
        return cls(
            source, num_classes, seed=cfg.seed, sample_fraction=cfg.sample_fraction,
            max_examples=cfg.max_examples,
        )

    @property
    def name(self) -> str:
        return f"plugin:{self._source.target}"

    def bind(self, device_id: str, spec: InputSpec) -> None:
        """The device and the model's input; the model's classes must be the declared ones."""
        if spec.num_classes != self._num_classes:
            raise DataError(
                f"data plugin {self._source.target}: num_classes={self._num_classes}, "
                f"the model has {spec.num_classes}"
            )
        self._device = device_id
        self._spec = spec

    @property
    def dataset(self) -> Dataset:
        raise DataError(f"{self.name} hands over its examples round by round (round_batch)")

    def split_heldout(self, fraction: float) -> tuple[LocalData, Dataset]:
        raise DataError(
            f"{self.name} hands over its examples round by round: no held-out split "
            "(set eval_fraction = 0)"
        )

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def examples_per_round(self) -> int:
        return sample_size(self._last, self._fraction, self._max) if self._last else 0

    def __len__(self) -> int:
        return self._last

    def round_batch(self, round_id: int) -> tuple[np.ndarray, np.ndarray]:
        """This round's checked examples from the plugin (x float32, y int32), shuffled
        and sampled with the generator of (seed, round); PluginDataError when bad."""
        if self._device is None or self._spec is None:
            raise DataError(f"{self.name}: bind(device_id, spec) before the first round")
        x, y = self._source.fetch(self._device, round_id, self._spec)
        self._last = len(x)
        idx = sample_indices(y, self.round_rng(round_id), self._fraction, self._max)
        return x[idx], y[idx]
