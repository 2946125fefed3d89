"""Lazy image sources: a device partitions on the labels and converts only its own slice to
float32, with exactly the results of the eager path (load everything, then subset)."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from fedmq.data.datasets import (
    FASHION_MNIST_ROOT,
    Dataset,
    LazyImageDataset,
    lazy_fashion_mnist,
    load_fashion_mnist,
    load_idx_pair,
    read_idx,
    read_idx_rows,
)
from fedmq.data.local import LocalDataConfig, load_local_data, open_source
from fedmq.errors import DataError

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i2"): 0x0B, np.dtype(">f4"): 0x0D}


def _idx_bytes(arr: np.ndarray) -> bytes:
    dtype = arr.dtype.newbyteorder(">") if arr.dtype.itemsize > 1 else arr.dtype
    head = struct.pack(">BBBB", 0, 0, _CODES[dtype], arr.ndim)
    head += struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dtype).tobytes()


def _write(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    data = _idx_bytes(arr)
    path.write_bytes(gzip.compress(data, compresslevel=1) if compress else data)
    return path


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[images < 100] = 0
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    return images, labels


def _assert_same(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name
    assert a.layout == b.layout and a.num_classes == b.num_classes
    assert a.x.dtype == b.x.dtype == np.float32
    assert a.x.flags.c_contiguous and b.x.flags.c_contiguous
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.y.dtype == b.y.dtype == np.int32


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, ">i2", ">f4"])
def test_read_idx_rows_equals_read_idx(tmp_path: Path, compress: bool, dtype: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 200, size=(37, 3, 5)).astype(dtype)
    path = _write(tmp_path / "a.idx", arr, compress)
    full = read_idx(path)
    idx = np.array([36, 0, 5, 5, 17, 2, 35, 1], dtype=np.int64)  # unsorted, repeated
    for chunk in (15, 64, 1 << 20):  # 1 row per chunk, several, all at once
        got = read_idx_rows(path, idx, chunk_bytes=chunk)
        assert got.dtype == full.dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, full[idx])
    assert read_idx_rows(path, np.array([], np.int64)).shape == (0, 3, 5)


def test_read_idx_rows_rejects(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((4, 2, 2), np.uint8))
    path = tmp_path / "x.idx"
    path.write_bytes(good[:-1])
    with pytest.raises(DataError, match="payload is 15 bytes"):
        read_idx_rows(path, [0])
    path.write_bytes(good + b"\0")
    with pytest.raises(DataError, match="payload is more than 16"):
        read_idx_rows(path, [0])
    path.write_bytes(good)
    with pytest.raises(DataError, match="out of range"):
        read_idx_rows(path, [4])
    with pytest.raises(DataError, match="1-D integer"):
        read_idx_rows(path, [[0]])
    path.write_bytes(b"\x01" + good[1:])
    with pytest.raises(DataError, match="magic"):
        read_idx_rows(path, [0])
    with pytest.raises(DataError, match="no such file"):
        read_idx_rows(tmp_path / "absent", [0])


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST-shaped root: 600 train, 150 test images."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, (n, seed) in {"train": (600, 1), "t10k": (150, 2)}.items():
        images, labels = _images(n, seed)
        _write(root / f"{split}-images-idx3-ubyte.gz", images)
        _write(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.mark.parametrize("partition", ["dirichlet:0.5", "iid", "classes:2", "quantity:1.5"])
@pytest.mark.parametrize(("name", "layout"), [("fashion-mnist", "images"),
                                              ("fashion-mnist", "flat"),
                                              ("fashion-mnist-seq", "sequences")])
def test_partitioned_slices_equal_the_eager_path(
    fake_fashion: Path, partition: str, name: str, layout: str
) -> None:
    opts = f"root={fake_fashion}" + (f"&layout={layout}" if name == "fashion-mnist" else "")
    source = f"{name}?{opts}"
    for split, eager in zip(("train", "test"), load_fashion_mnist(fake_fashion, layout),
                            strict=True):
        for client in (0, 4):
            cfg = LocalDataConfig(source, partition=partition, num_clients=5,
                                  client_index=client, seed=3, split=split)
            _assert_same(load_local_data(cfg), load_local_data(cfg, dataset=eager))


def test_unpartitioned_and_idx_sources_equal_the_eager_path(tmp_path: Path) -> None:
    images, labels = _images(90, 5)
    img = _write(tmp_path / "i.gz", images)
    lbl = _write(tmp_path / "l", labels, compress=False)
    for layout in ("images", "sequences", "flat"):
        src = f"idx:{img},{lbl}?layout={layout}"
        eager = load_idx_pair(img, lbl, layout=layout)
        assert isinstance(open_source(src), LazyImageDataset)
        _assert_same(load_local_data(LocalDataConfig(src)), eager)
        cfg = LocalDataConfig(src, partition="dirichlet:0.3", num_clients=3, client_index=1)
        _assert_same(load_local_data(cfg), load_local_data(cfg, dataset=eager))
    assert isinstance(open_source("digits"), Dataset)  # no lazy loader: eager as before


def test_lazy_subset_validation(fake_fashion: Path) -> None:
    lazy = lazy_fashion_mnist(fake_fashion, split="test")
    assert len(lazy) == 150 and lazy.num_classes == 10
    assert lazy.class_counts().sum() == 150
    eager = load_fashion_mnist(fake_fashion)[1]
    mask = np.zeros(150, bool)
    mask[::7] = True
    _assert_same(lazy.subset(mask), eager.subset(mask))
    _assert_same(lazy.subset([-1, 0]), eager.subset([-1, 0]))
    with pytest.raises(DataError, match="out of range"):
        lazy.subset([150])
    with pytest.raises(DataError, match="wrong length"):
        lazy.subset(np.zeros(3, bool))


def _peak_of_slice(cfg: LocalDataConfig) -> tuple[int, Dataset]:
    tracemalloc.start()
    try:
        ds = load_local_data(cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, ds


def test_only_the_slice_is_materialised(tmp_path: Path) -> None:
    """8,000 images: the float32 split would be 25 MB; one client's 1/10 slice is ~2.5 MB and
    the peak stays near it (slice + its uint8 rows + a 1 MB read buffer, twice: gzip copies)."""
    images, labels = _images(8000, 7)
    img = _write(tmp_path / "i.gz", images)
    lbl = _write(tmp_path / "l.gz", labels)
    del images
    cfg = LocalDataConfig(f"idx:{img},{lbl}", partition="dirichlet:0.5", num_clients=10,
                          client_index=2)
    peak, ds = _peak_of_slice(cfg)
    full_f32 = 8000 * 28 * 28 * 4
    assert ds.x.nbytes < full_f32 / 4
    assert peak < 1.25 * ds.x.nbytes + (3 << 20), (peak, ds.x.nbytes)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT, "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST (dataset-fashion-mnist) not installed",
)
def test_fashion_mnist_device_slice_peak_memory() -> None:
    """Real Fashion-MNIST train (60,000 x 784 float32 = 188 MB): one device's Dirichlet(0.5)
    1/10 slice must not cost more than the slice itself plus small buffers."""
    cfg = LocalDataConfig("fashion-mnist", partition="dirichlet:0.5", num_clients=10,
                          client_index=3, seed=0)
    peak, ds = _peak_of_slice(cfg)
    assert ds.name == "fashion-mnist-train[dirichlet:0.5 3/10]"
    assert 1000 < len(ds) < 20000
    assert peak < 1.25 * ds.x.nbytes + (8 << 20), (peak, ds.x.nbytes)
