"""Datasets, client partitioning, per-round sampling and augmentation (pure numpy).

Nothing is downloaded: Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``
package and digits from scikit-learn's bundled copy. Errors are
:class:`fedmq.errors.DataError`.
"""

from __future__ import annotations

from fedmq.data.augment import (
    AugmentConfig,
    Augmenter,
    augment_images,
    augment_series,
    make_augmenter,
)
from fedmq.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    LAYOUTS,
    Dataset,
    available_datasets,
    check_dataset_options,
    load_csv_windows,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_pair,
    load_npz,
    read_idx,
    reshape_layout,
    stratified_split,
)
from fedmq.data.local import (
    DataSource,
    LocalData,
    LocalDataConfig,
    load_local_data,
    load_source,
    parse_source,
)
from fedmq.data.partition import (
    SCHEMES,
    PartitionSpec,
    PartitionStats,
    describe,
    dirichlet,
    iid,
    k_classes,
    parse_partition,
    partition,
    quantity_skew,
    rebalance,
)
from fedmq.data.sampling import balanced_quotas, sample_indices, sample_size

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "LAYOUTS",
    "SCHEMES",
    "AugmentConfig",
    "Augmenter",
    "DataSource",
    "Dataset",
    "LocalData",
    "LocalDataConfig",
    "PartitionSpec",
    "PartitionStats",
    "augment_images",
    "augment_series",
    "available_datasets",
    "balanced_quotas",
    "check_dataset_options",
    "describe",
    "dirichlet",
    "iid",
    "k_classes",
    "load_csv_windows",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_pair",
    "load_local_data",
    "load_npz",
    "load_source",
    "make_augmenter",
    "parse_partition",
    "parse_source",
    "partition",
    "quantity_skew",
    "read_idx",
    "rebalance",
    "reshape_layout",
    "sample_indices",
    "sample_size",
    "stratified_split",
]
