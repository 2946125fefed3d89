"""Datasets held in memory as numpy arrays, and offline loaders for them.

Everything here is pure numpy; scikit-learn is imported lazily and only by
:func:`load_digits`. Nothing is ever downloaded: Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` package, digits from the copy bundled with scikit-learn.
Every failure is a :class:`fedmq.errors.DataError` whose message says what is wrong.
"""

from __future__ import annotations

import csv
import gzip
import inspect
import io
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.errors import DataError

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "LAYOUTS",
    "Dataset",
    "LazyImageDataset",
    "available_datasets",
    "check_dataset_options",
    "load_csv_windows",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_idx_pair",
    "load_npz",
    "lazy_dataset",
    "lazy_fashion_mnist",
    "lazy_idx_pair",
    "read_idx",
    "read_idx_rows",
    "reshape_layout",
    "stratified_split",
]

log = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs its IDX files.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: Array layouts of ``Dataset.x``: ``images`` (N, H, W, C); ``sequences`` (N, T, F) image
#: rows as time steps (Fashion-MNIST for the LSTM); ``flat`` (N, D); ``series`` (N, T, F)
#: windows of sensor time series (not bounded to [0, 1], no image semantics).
LAYOUTS = ("images", "sequences", "flat", "series")


def _subset_indices(indices: Any, n: int, name: str) -> np.ndarray:
    """Validated 1-D intp indices from an integer array or a boolean mask over ``n`` rows."""
    idx = np.asarray(indices)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise DataError(f"dataset {name!r}: boolean mask has wrong length")
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise DataError(f"dataset {name!r}: subset needs a 1-D integer index array")
    if idx.size and (int(idx.min()) < -n or int(idx.max()) >= n):
        raise DataError(f"dataset {name!r}: subset index out of range [0, {n})")
    return idx.astype(np.intp, copy=False)


@dataclass(frozen=True)
class Dataset:
    """Examples ``x`` (float32, first axis = example) and labels ``y`` (int32, 0..C-1).

    ``layout`` is one of :data:`LAYOUTS`; left empty it is inferred from ``x.ndim``
    (4: images, 3: sequences, 2: flat).
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    name: str = ""
    layout: str = field(default="")

    def __post_init__(self) -> None:
        if not isinstance(self.x, np.ndarray) or not isinstance(self.y, np.ndarray):
            raise DataError(f"dataset {self.name!r}: x and y must be numpy arrays")
        if self.x.dtype != np.float32:
            raise DataError(f"dataset {self.name!r}: x must be float32, got {self.x.dtype}")
        if self.y.dtype != np.int32:
            raise DataError(f"dataset {self.name!r}: y must be int32, got {self.y.dtype}")
        if self.x.ndim < 2:
            raise DataError(
                f"dataset {self.name!r}: x must have an example axis and at least one "
                f"feature axis, got shape {self.x.shape}"
            )
        if self.y.ndim != 1:
            raise DataError(f"dataset {self.name!r}: y must be 1-D, got shape {self.y.shape}")
        if len(self.x) != len(self.y):
            raise DataError(
                f"dataset {self.name!r}: {len(self.x)} examples but {len(self.y)} labels"
            )
        if not isinstance(self.num_classes, int | np.integer) or self.num_classes < 1:
            raise DataError(f"dataset {self.name!r}: num_classes must be a positive integer")
        object.__setattr__(self, "num_classes", int(self.num_classes))
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(
                f"dataset {self.name!r}: labels must lie in [0, {self.num_classes}), "
                f"got [{int(self.y.min())}, {int(self.y.max())}]"
            )
        layout = self.layout or {4: "images", 3: "sequences", 2: "flat"}.get(self.x.ndim, "")
        if layout not in LAYOUTS:
            raise DataError(
                f"dataset {self.name!r}: layout must be one of {', '.join(LAYOUTS)}, "
                f"got {self.layout!r} for x of shape {self.x.shape}"
            )
        expected_ndim = {"images": 4, "sequences": 3, "flat": 2, "series": 3}[layout]
        if self.x.ndim != expected_ndim:
            raise DataError(
                f"dataset {self.name!r}: layout {layout!r} needs {expected_ndim}-D x, "
                f"got shape {self.x.shape}"
            )
        object.__setattr__(self, "layout", layout)

    @classmethod
    def from_arrays(
        cls,
        x: Any,
        y: Any,
        num_classes: int | None = None,
        name: str = "",
        layout: str = "",
    ) -> Dataset:
        """Build a dataset, casting ``x`` to float32 and integer-valued ``y`` to int32.

        ``num_classes`` defaults to ``max(y) + 1``.
        """
        xa = np.asarray(x)
        ya = np.asarray(y)
        if xa.dtype.kind not in "biuf":
            raise DataError(f"dataset {name!r}: x must be numeric, got dtype {xa.dtype}")
        if ya.dtype.kind == "f":
            if not np.all(np.isfinite(ya)) or not np.all(ya == np.round(ya)):
                raise DataError(f"dataset {name!r}: labels must be whole numbers")
        elif ya.dtype.kind not in "biu":
            raise DataError(f"dataset {name!r}: labels must be integers, got dtype {ya.dtype}")
        if ya.size and (ya.min() < 0 or ya.max() > np.iinfo(np.int32).max):
            raise DataError(f"dataset {name!r}: labels must be non-negative int32 values")
        if num_classes is None:
            num_classes = int(ya.max()) + 1 if ya.size else 1
        return cls(
            x=np.ascontiguousarray(xa, dtype=np.float32),
            y=np.ascontiguousarray(ya, dtype=np.int32),
            num_classes=num_classes,
            name=name,
            layout=layout,
        )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def example_shape(self) -> tuple[int, ...]:
        """Shape of one example (``x.shape[1:]``)."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: Any, name: str | None = None) -> Dataset:
        """The examples at ``indices`` (copied), keeping ``num_classes`` and layout."""
        idx = _subset_indices(indices, len(self), self.name)
        return Dataset(
            x=self.x[idx],
            y=self.y[idx],
            num_classes=self.num_classes,
            name=self.name if name is None else name,
            layout=self.layout,
        )

    def class_counts(self) -> np.ndarray:
        """Number of examples per class, shape (num_classes,)."""
        return np.bincount(self.y, minlength=self.num_classes)


# --------------------------------------------------------------------------- IDX

# IDX type codes (http://yann.lecun.com/exdb/mnist/): all multi-byte values big-endian.
_IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the file starts with the gzip magic."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    return gz.read()
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain) into a native-endian numpy array.

    Header: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
    0x0D float, 0x0E double), the number of dimensions, then one big-endian uint32 per
    dimension. The payload must hold exactly ``prod(dims)`` items.
    """
    p = Path(path)
    raw = _read_bytes(p)
    dtype, dims, header_len = _stream_header(io.BytesIO(raw), p)
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        raise DataError(
            f"{p}: IDX payload is {actual} bytes but dims {dims} of {dtype.name} need {expected}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_ROW_CHUNK_BYTES = 1 << 20  # rows are streamed through a buffer of about this size


@contextmanager
def _open_stream(path: Path) -> Iterator[io.BufferedIOBase]:
    """The file as a byte stream, gunzipped on the fly when it starts with the gzip magic."""
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=fh) as gz:
                    yield gz
            else:
                yield fh
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc


def _read_exact(stream: io.BufferedIOBase, buf: memoryview) -> int:
    """Fill ``buf`` from ``stream``; returns the number of bytes read (short only at EOF)."""
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _stream_header(
    stream: io.BufferedIOBase, p: Path
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    """(item dtype, dims, header length) of an IDX stream positioned at its start."""
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{p}: too short for an IDX header ({len(head)} bytes)")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{p}: bad IDX magic number {head[:4].hex()} (must start with 0000)")
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise DataError(f"{p}: IDX header declares zero dimensions")
    raw_dims = stream.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{p}: truncated IDX header ({ndim} dimensions declared)")
    dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4", count=ndim))
    return _IDX_DTYPES[code], dims, 4 + 4 * ndim


def read_idx_rows(
    path: str | os.PathLike[str], indices: Any, *, chunk_bytes: int = _ROW_CHUNK_BYTES
) -> np.ndarray:
    """Rows ``indices`` (first axis, in the given order) of an IDX file, native-endian.

    The same values as ``read_idx(path)[indices]``, but the file is streamed through a small
    buffer: memory is the selected rows plus ``chunk_bytes``, never the whole array (a
    device keeps its 1/10 of Fashion-MNIST without holding the other 9/10).
    """
    p = Path(path)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
        raise DataError(f"{p}: row indices must be a 1-D integer array")
    idx = idx.astype(np.intp, copy=False)
    with _open_stream(p) as stream:
        dtype, dims, header_len = _stream_header(stream, p)
        n_rows, row_shape = dims[0], dims[1:]
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
            raise DataError(f"{p}: row index out of range [0, {n_rows})")
        row_bytes = math.prod(row_shape) * dtype.itemsize
        out = np.empty((len(idx), *row_shape), dtype=dtype.newbyteorder("="))
        order = np.argsort(idx, kind="stable")
        wanted = idx[order]
        chunk_rows = max(1, chunk_bytes // max(row_bytes, 1))
        buf = bytearray(chunk_rows * row_bytes)
        view = memoryview(buf)
        pos, payload = 0, 0
        for start in range(0, n_rows, chunk_rows):
            rows = min(chunk_rows, n_rows - start)
            got = _read_exact(stream, view[: rows * row_bytes])
            payload += got
            if got < rows * row_bytes:
                break
            end = int(np.searchsorted(wanted, start + rows, side="left"))
            if end > pos:
                chunk = np.frombuffer(buf, dtype=dtype, count=rows * math.prod(row_shape))
                chunk = chunk.reshape((rows, *row_shape))
                out[order[pos:end]] = chunk[wanted[pos:end] - start]
                pos = end
        payload += len(stream.read(1))
    expected = n_rows * row_bytes
    if payload != expected:
        size = "more than" if payload > expected else f"{payload} bytes,"
        raise DataError(
            f"{p}: IDX payload is {size} {expected} bytes needed for dims {dims} of {dtype.name}"
        )
    log.debug("%s: read %d of %d rows (header %d bytes)", p, len(idx), n_rows, header_len)
    return out


def reshape_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """View (N, H, W) or (N, H, W, 1) images in a layout: images, sequences or flat."""
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise DataError(f"expected (N, H, W) images, got shape {x.shape}")
    if layout == "images":
        return x[..., np.newaxis]
    if layout == "sequences":
        return x
    if layout == "flat":
        return x.reshape(len(x), -1)
    raise DataError(f"unknown image layout {layout!r}; use images, sequences or flat")


def _images_to_dataset(
    images: np.ndarray, labels: np.ndarray, num_classes: int | None, name: str, layout: str,
    source: str,
) -> Dataset:
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D, got shape {labels.shape}")
    if images.ndim not in (3, 4):
        raise DataError(f"{source}: images must be (N, H, W[, C]), got shape {images.shape}")
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    if images.dtype == np.uint8:
        x = images.astype(np.float32)
        x /= np.float32(255.0)
    else:
        x = images.astype(np.float32)
    if images.ndim == 4 and layout != "images":
        if images.shape[-1] != 1:
            raise DataError(f"{source}: layout {layout!r} needs single-channel images")
        x = x[..., 0]
    if x.ndim == 3:
        x = reshape_layout(x, layout)
    return Dataset.from_arrays(x, labels, num_classes=num_classes, name=name, layout=layout)


def load_idx_pair(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    layout: str = "images",
    num_classes: int | None = None,
) -> Dataset:
    """A dataset from an IDX image file and an IDX label file (MNIST style).

    uint8 pixels are scaled to [0, 1]; other types are cast to float32 unscaled.
    ``layout`` is images, sequences or flat (see :func:`reshape_layout`).
    """
    if layout not in ("images", "sequences", "flat"):
        raise DataError(f"unknown image layout {layout!r}; use images, sequences or flat")
    return _images_to_dataset(
        read_idx(images_path),
        read_idx(labels_path),
        num_classes,
        Path(images_path).name,
        layout,
        f"{images_path}, {labels_path}",
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT, layout: str = "images"
) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST (train 60000, test 10000, 10 classes), pixels scaled to [0, 1].

    ``layout``: ``images`` (N, 28, 28, 1), ``sequences`` (N, 28, 28) with rows as time
    steps, or ``flat`` (N, 784).
    """
    if layout not in ("images", "sequences", "flat"):
        raise DataError(f"unknown Fashion-MNIST layout {layout!r}; use images, sequences or flat")
    base = Path(root)
    missing = [f for pair in _FASHION_FILES.values() for f in pair if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {base} (missing {', '.join(missing)}); "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    out = []
    for split, (img_file, lbl_file) in _FASHION_FILES.items():
        images = read_idx(base / img_file)
        labels = read_idx(base / lbl_file)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(f"{base / img_file}: expected uint8 (N, 28, 28), got {images.shape}")
        ds = _images_to_dataset(
            images, labels, 10, f"fashion-mnist-{split}", layout, str(base / lbl_file)
        )
        log.debug("loaded %s: %d examples, x %s", ds.name, len(ds), ds.x.shape)
        out.append(ds)
    return out[0], out[1]


@dataclass(frozen=True, eq=False)
class LazyImageDataset:
    """An IDX image set whose labels are in memory and whose examples are read from disk
    and converted to float32 only for the indices asked for.

    ``subset(indices)`` equals ``load_idx_pair(...).subset(indices)`` (same values, same
    order) without ever holding the whole split: partition on :attr:`y`, then take the
    slice. ``num_classes`` is fixed from all labels, as the eager loaders do.
    """

    images_path: Path
    y: np.ndarray
    num_classes: int
    name: str
    layout: str = "images"

    def __post_init__(self) -> None:
        if self.layout not in ("images", "sequences", "flat"):
            raise DataError(f"unknown image layout {self.layout!r}; use images, sequences or flat")

    def __len__(self) -> int:
        return len(self.y)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.num_classes)

    def subset(self, indices: Any, name: str | None = None) -> Dataset:
        """The examples at ``indices`` as a :class:`Dataset` (float32, scaled like
        :func:`load_idx_pair`)."""
        idx = _subset_indices(indices, len(self), self.name) % max(len(self), 1)
        rows = read_idx_rows(self.images_path, idx)
        return _images_to_dataset(
            rows,
            self.y[idx],
            self.num_classes,
            self.name if name is None else name,
            self.layout,
            str(self.images_path),
        )

    def load(self) -> Dataset:
        """Every example (the same as the eager loader)."""
        return self.subset(np.arange(len(self)))


def _lazy_images(
    images_path: Path, labels_path: Path, layout: str, num_classes: int | None, name: str
) -> LazyImageDataset:
    labels = read_idx(labels_path)
    source = f"{images_path}, {labels_path}"
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must be 1-D, got shape {labels.shape}")
    with _open_stream(images_path) as stream:
        _, dims, _ = _stream_header(stream, images_path)
    if len(dims) not in (3, 4):
        raise DataError(f"{source}: images must be (N, H, W[, C]), got shape {dims}")
    if dims[0] != len(labels):
        raise DataError(f"{source}: {dims[0]} images but {len(labels)} labels")
    if len(dims) == 4 and layout != "images" and dims[-1] != 1:
        raise DataError(f"{source}: layout {layout!r} needs single-channel images")
    # the label checks and num_classes default of Dataset.from_arrays, on all labels
    y = _labels_int32(labels, name)
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 1
    if y.size and int(y.max()) >= num_classes:
        raise DataError(
            f"dataset {name!r}: labels must lie in [0, {num_classes}), "
            f"got [{int(y.min())}, {int(y.max())}]"
        )
    return LazyImageDataset(images_path, y, int(num_classes), name, layout)


def lazy_idx_pair(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    layout: str = "images",
    num_classes: int | None = None,
) -> LazyImageDataset:
    """:func:`load_idx_pair` that reads only the labels now (see :class:`LazyImageDataset`)."""
    if layout not in ("images", "sequences", "flat"):
        raise DataError(f"unknown image layout {layout!r}; use images, sequences or flat")
    return _lazy_images(
        Path(images_path), Path(labels_path), layout, num_classes, Path(images_path).name
    )


def lazy_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT,
    layout: str = "images",
    split: str = "train",
) -> LazyImageDataset:
    """One split of :func:`load_fashion_mnist`, lazily (only the labels are read now)."""
    if layout not in ("images", "sequences", "flat"):
        raise DataError(f"unknown Fashion-MNIST layout {layout!r}; use images, sequences or flat")
    if split not in _FASHION_FILES:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root)
    missing = [f for pair in _FASHION_FILES.values() for f in pair if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {base} (missing {', '.join(missing)}); "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    img_file, lbl_file = _FASHION_FILES[split]
    with _open_stream(base / img_file) as stream:
        dtype, dims, _ = _stream_header(stream, base / img_file)
    if len(dims) != 3 or dims[1:] != (28, 28) or dtype != np.uint8:
        raise DataError(f"{base / img_file}: expected uint8 (N, 28, 28), got {dims}")
    return _lazy_images(base / img_file, base / lbl_file, layout, 10, f"fashion-mnist-{split}")


def _labels_int32(labels: np.ndarray, name: str) -> np.ndarray:
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise DataError(f"dataset {name!r}: labels must be whole numbers")
    elif labels.dtype.kind not in "biu":
        raise DataError(f"dataset {name!r}: labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
        raise DataError(f"dataset {name!r}: labels must be non-negative int32 values")
    return np.ascontiguousarray(labels, dtype=np.int32)


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, test) index split, both sorted ascending.

    Each class contributes ``round(n_c * test_fraction)`` examples to the test side
    (at least one and at most ``n_c - 1`` when the class has two or more examples).
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    test_parts = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n_test = round(len(idx) * test_fraction)
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_parts.append(rng.permutation(idx)[:n_test])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.intp)
    mask = np.ones(len(y), dtype=bool)
    mask[test] = False
    return np.flatnonzero(mask), test


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits file scikit-learn ships, read directly: importing scikit-learn would add
    about 90 MB to a device process's memory for a 500 KB table."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset needs scikit-learn (pip install 'fedmq[data]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    if not path.is_file():
        raise DataError(f"scikit-learn's digits file is missing: {path}")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{path}: expected 65 columns, got shape {table.shape}")
    x = table[:, :64] / np.float32(16.0)
    return np.ascontiguousarray(x), table[:, 64].astype(np.int64)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's bundled 8x8 digits (1797 examples, 10 classes) as flat (N, 64).

    Pixels are scaled by 1/16 into [0, 1]; the split is stratified and deterministic
    for a given ``seed``.
    """
    x, y = _read_digits()
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    full = Dataset.from_arrays(x, y, num_classes=10, name="digits", layout="flat")
    return full.subset(train_idx, "digits-train"), full.subset(test_idx, "digits-test")


def load_npz(
    path: str | os.PathLike[str],
    x_key: str = "x",
    y_key: str = "y",
    num_classes: int | None = None,
    layout: str = "",
) -> Dataset:
    """A dataset from an ``.npz`` archive (no pickles). ``x`` is cast to float32 as is;
    ``num_classes`` defaults to ``max(y) + 1``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as archive:
            keys = list(archive.keys())
            for key in (x_key, y_key):
                if key not in keys:
                    raise DataError(f"{p}: no array {key!r} (has {', '.join(keys) or 'none'})")
            x = archive[x_key]
            y = archive[y_key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zlib.error) as exc:
        raise DataError(f"{p}: not a readable .npz archive ({exc})") from exc
    return Dataset.from_arrays(x, y, num_classes=num_classes, name=p.stem, layout=layout)


def _column_index(header: list[str], column: str | int, path: Path) -> int:
    if isinstance(column, int):
        if not -len(header) <= column < len(header):
            raise DataError(f"{path}: column index {column} out of range ({len(header)} columns)")
        return column % len(header)
    if column not in header:
        raise DataError(f"{path}: no column {column!r} in header {header}")
    return header.index(column)


def load_csv_windows(
    path: str | os.PathLike[str],
    window: int,
    stride: int,
    label_column: str | int,
    feature_columns: Sequence[str | int] | None = None,
    delimiter: str = ",",
    classes: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Sliding windows over a sensor time-series CSV: x (N, window, features), layout series.

    The first row must be a header. Windows start at rows 0, stride, 2*stride, ... and
    only complete windows are kept. **Each window's label is the label of its last
    row** (the most recent reading, as a device classifying a live stream would see it).

    ``label_column`` and ``feature_columns`` are header names or 0-based indices;
    features default to every column except the label. Labels are integers, or, when
    ``classes`` is given, names mapped to their position in ``classes`` (give the same
    list on every device so that ids agree). Values are read as floats, unscaled.
    """
    p = Path(path)
    if window < 1 or stride < 1:
        raise DataError(f"window and stride must be >= 1, got window={window} stride={stride}")
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter=delimiter))
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{p}: cannot read CSV ({exc})") from exc
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{p}: empty CSV (a header row is required)")
    header = [h.strip() for h in rows[0]]
    if all(_is_number(h) for h in header):
        raise DataError(f"{p}: first row {header} looks like data; a header row is required")
    label_idx = _column_index(header, label_column, p)
    if feature_columns is None:
        feat_idx = [i for i in range(len(header)) if i != label_idx]
    else:
        feat_idx = [_column_index(header, c, p) for c in feature_columns]
    if not feat_idx:
        raise DataError(f"{p}: no feature columns")
    if label_idx in feat_idx:
        raise DataError(f"{p}: the label column cannot also be a feature")
    class_ids = {name: i for i, name in enumerate(classes)} if classes is not None else None
    body = rows[1:]
    feats = np.empty((len(body), len(feat_idx)), dtype=np.float32)
    labels = np.empty(len(body), dtype=np.int64)
    for r, row in enumerate(body):
        line = r + 2
        if len(row) != len(header):
            raise DataError(f"{p}:{line}: {len(row)} fields, header has {len(header)}")
        try:
            feats[r] = [float(row[i]) for i in feat_idx]
        except ValueError:
            raise DataError(f"{p}:{line}: non-numeric feature value") from None
        raw_label = row[label_idx].strip()
        if class_ids is not None:
            if raw_label not in class_ids:
                raise DataError(f"{p}:{line}: label {raw_label!r} not in classes")
            labels[r] = class_ids[raw_label]
        else:
            try:
                labels[r] = int(raw_label)
            except ValueError:
                raise DataError(
                    f"{p}:{line}: label {raw_label!r} is not an integer (pass classes=[...] "
                    "to map names to ids)"
                ) from None
    if not np.all(np.isfinite(feats)):
        raise DataError(f"{p}: non-finite feature values")
    if len(body) < window:
        raise DataError(f"{p}: {len(body)} data rows, fewer than one window of {window}")
    starts = np.arange(0, len(body) - window + 1, stride)
    # (rows - window + 1, features, window) -> pick starts -> (N, window, features)
    views = np.lib.stride_tricks.sliding_window_view(feats, window, axis=0)
    x = np.ascontiguousarray(views[starts].transpose(0, 2, 1))
    y = labels[starts + window - 1]
    if num_classes is None and classes is not None:
        num_classes = len(classes)
    log.debug("%s: %d rows -> %d windows of %d", p, len(body), len(x), window)
    return Dataset.from_arrays(x, y, num_classes=num_classes, name=p.stem, layout="series")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------- registry


def _fashion_seq(root: str | os.PathLike[str] = FASHION_MNIST_ROOT) -> tuple[Dataset, Dataset]:
    return load_fashion_mnist(root=root, layout="sequences")


_REGISTRY: dict[str, Callable[..., tuple[Dataset, Dataset]]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "fashion-mnist-seq": _fashion_seq,
}


def _lazy_fashion(
    split: str, root: str | os.PathLike[str] = FASHION_MNIST_ROOT, layout: str = "images"
) -> LazyImageDataset:
    return lazy_fashion_mnist(root=root, layout=layout, split=split)


def _lazy_fashion_seq(
    split: str, root: str | os.PathLike[str] = FASHION_MNIST_ROOT
) -> LazyImageDataset:
    return lazy_fashion_mnist(root=root, layout="sequences", split=split)


# Registered datasets that can also be opened lazily (same options as the eager loader).
_LAZY: dict[str, Callable[..., LazyImageDataset]] = {
    "fashion-mnist": _lazy_fashion,
    "fashion-mnist-seq": _lazy_fashion_seq,
}


def lazy_dataset(name: str, split: str = "train", **kwargs: Any) -> LazyImageDataset | None:
    """One split of a named dataset as a :class:`LazyImageDataset`, or None when that
    dataset has no lazy loader (load it with :func:`load_dataset`)."""
    check_dataset_options(name, **kwargs)
    loader = _LAZY.get(name)
    return None if loader is None else loader(split, **kwargs)


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def load_dataset(name: str, **kwargs: Any) -> tuple[Dataset, Dataset]:
    """(train, test) of a named dataset; ``kwargs`` go to its loader.

    ``digits`` (test_fraction, seed), ``fashion-mnist`` (root, layout) and
    ``fashion-mnist-seq`` (root; layout is sequences).
    """
    check_dataset_options(name, **kwargs)
    return _REGISTRY[name](**kwargs)


def check_dataset_options(name: str, **kwargs: Any) -> None:
    """Raise DataError unless ``name`` is registered and takes these keyword options
    (checks names only; loads nothing)."""
    loader = _REGISTRY.get(name)
    if loader is None:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(available_datasets())}")
    try:
        inspect.signature(loader).bind(**kwargs)
    except TypeError as exc:
        raise DataError(f"dataset {name!r}: bad options {sorted(kwargs)} ({exc})") from exc
