"""Dataset container, IDX reader, Fashion-MNIST/digits/npz/CSV loaders, registry."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmq.data.datasets import (
    FASHION_MNIST_ROOT,
    Dataset,
    load_csv_windows,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx_pair,
    load_npz,
    read_idx,
    stratified_split,
)
from fedmq.errors import DataError


def _idx_bytes(arr: np.ndarray, code: int) -> bytes:
    be = arr.astype(arr.dtype.newbyteorder(">"))
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + be.tobytes()


# ------------------------------------------------------------------ Dataset


def test_dataset_validates_dtype_and_length() -> None:
    x = np.zeros((4, 3), np.float32)
    y = np.array([0, 1, 2, 1], np.int32)
    ds = Dataset(x, y, 3, "t")
    assert len(ds) == 4 and ds.layout == "flat"
    with pytest.raises(DataError, match="float32"):
        Dataset(x.astype(np.float64), y, 3)
    with pytest.raises(DataError, match="int32"):
        Dataset(x, y.astype(np.int64), 3)
    with pytest.raises(DataError, match="4 examples but 3 labels"):
        Dataset(x, y[:3], 3)
    with pytest.raises(DataError, match=r"labels must lie in \[0, 2\)"):
        Dataset(x, y, 2)


def test_subset_copies_and_keeps_metadata() -> None:
    ds = Dataset.from_arrays(np.arange(12).reshape(6, 2), [0, 1, 2, 0, 1, 2], name="d")
    assert ds.num_classes == 3 and ds.x.dtype == np.float32 and ds.y.dtype == np.int32
    sub = ds.subset([5, 0])
    np.testing.assert_array_equal(sub.x, [[10, 11], [0, 1]])
    np.testing.assert_array_equal(sub.y, [2, 0])
    assert sub.num_classes == 3 and sub.name == "d"
    sub.x[0, 0] = -1
    assert ds.x[5, 0] == 10
    with pytest.raises(DataError, match="out of range"):
        ds.subset([6])


def test_from_arrays_rejects_fractional_labels() -> None:
    with pytest.raises(DataError, match="whole numbers"):
        Dataset.from_arrays(np.zeros((2, 2)), np.array([0.0, 1.5]))


# ---------------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("dtype", "code"), [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C), (np.float32, 0x0D)]
)
def test_read_idx_roundtrip(tmp_path: Path, compress: bool, dtype: type, code: int) -> None:
    arr: np.ndarray = (np.arange(2 * 3 * 5) % 120).astype(dtype).reshape(2, 3, 5)
    data = _idx_bytes(arr, code)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 5)
    assert out.dtype == np.dtype(dtype)
    assert out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01" + b[1:], "magic"),
        (lambda b: b[:2] + b"\x07" + b[3:], "type code 0x07"),
        (lambda b: b[:3] + b"\x00" + b[4:], "zero dimensions"),
        (lambda b: b[:6], "truncated IDX header"),
        (lambda b: b[:-1], "payload is 29 bytes"),
        (lambda b: b + b"\x00", "payload is 31 bytes"),
        (lambda b: b[:3] + b"\x05" + b[4:], r"dims \(2, 3, 5, 0, 0\)"),
        (lambda b: b[:3] + b"\x0c" + b[4:], "truncated IDX header"),
        (lambda b: b[:2], "too short"),
    ],
)
def test_read_idx_rejects_corrupt_files(
    tmp_path: Path, mutate: Callable[[bytes], bytes], message: str
) -> None:
    good = _idx_bytes(np.zeros((2, 3, 5), np.uint8), 0x08)
    path = tmp_path / "bad.idx"
    path.write_bytes(mutate(good))
    with pytest.raises(DataError, match=message):
        read_idx(path)


def test_read_idx_corrupt_gzip_and_missing(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(_idx_bytes(np.zeros((4, 4), np.uint8), 0x08))[:-12])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "absent.gz")


def test_load_idx_pair_scales_and_layouts(tmp_path: Path) -> None:
    images = np.full((3, 4, 4), 255, np.uint8)
    images[1] = 0
    (tmp_path / "i.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    (tmp_path / "l").write_bytes(_idx_bytes(np.array([0, 2, 1], np.uint8), 0x08))
    ds = load_idx_pair(tmp_path / "i.gz", tmp_path / "l", layout="flat")
    assert ds.x.shape == (3, 16) and ds.num_classes == 3
    assert ds.x[0].min() == 1.0 and ds.x[1].max() == 0.0
    assert load_idx_pair(tmp_path / "i.gz", tmp_path / "l").x.shape == (3, 4, 4, 1)
    (tmp_path / "l2").write_bytes(_idx_bytes(np.array([0, 2], np.uint8), 0x08))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_idx_pair(tmp_path / "i.gz", tmp_path / "l2")


# ------------------------------------------------------------ Fashion-MNIST

needs_fashion = pytest.mark.skipif(
    not Path(FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed"
)


@needs_fashion
def test_fashion_mnist_images() -> None:
    train, test = load_fashion_mnist()
    assert (len(train), len(test)) == (60000, 10000)
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.x.dtype == np.float32 and train.num_classes == 10
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert 0.2 < float(train.x.mean()) < 0.4  # real images, not zeros
    np.testing.assert_array_equal(train.class_counts(), np.full(10, 6000))
    np.testing.assert_array_equal(test.class_counts(), np.full(10, 1000))


@needs_fashion
def test_fashion_mnist_sequences_registry() -> None:
    train, test = load_dataset("fashion-mnist-seq")
    assert train.x.shape == (60000, 28, 28) and test.x.shape == (10000, 28, 28)
    assert train.layout == "sequences"


def test_fashion_mnist_missing_directory_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)
    with pytest.raises(DataError, match="layout"):
        load_fashion_mnist(root=tmp_path, layout="pixels")


# ------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_deterministic() -> None:
    train, test = load_digits(test_fraction=0.25, seed=0)
    assert len(train) + len(test) == 1797
    assert train.x.shape[1:] == (64,) and train.layout == "flat"
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    full = train.class_counts() + test.class_counts()
    np.testing.assert_allclose(test.class_counts() / full, 0.25, atol=0.01)
    again_train, again_test = load_digits(test_fraction=0.25, seed=0)
    np.testing.assert_array_equal(train.x, again_train.x)
    np.testing.assert_array_equal(test.y, again_test.y)
    _, other = load_digits(test_fraction=0.25, seed=1)
    assert not np.array_equal(test.x, other.x)


def test_stratified_split_disjoint_and_covering() -> None:
    labels = np.array([0] * 10 + [1] * 4 + [2] * 2 + [3])
    train, test = stratified_split(labels, 0.25, seed=3)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(17))
    assert len(np.intersect1d(train, test)) == 0
    # round(2.5)=2 of class 0, 1 of class 1, 1 of class 2 (>= 1 and < n_c), 0 of class 3
    np.testing.assert_array_equal(np.bincount(labels[test], minlength=4), [2, 1, 1, 0])
    with pytest.raises(DataError, match="test_fraction"):
        stratified_split(labels, 1.0, seed=0)


def test_registry_rejects_unknown_names_and_options() -> None:
    with pytest.raises(DataError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(DataError, match="bad options"):
        load_dataset("digits", layout="images")


# ---------------------------------------------------------------------- npz


def test_load_npz(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, xs=np.ones((5, 2, 3), np.float64), ys=np.array([0, 1, 1, 0, 3]))
    ds = load_npz(path, x_key="xs", y_key="ys")
    assert ds.x.shape == (5, 2, 3) and ds.x.dtype == np.float32 and ds.num_classes == 4
    with pytest.raises(DataError, match="no array 'x'"):
        load_npz(path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(tmp_path / "junk.npz")


# ---------------------------------------------------------------------- CSV


def _write_csv(path: Path, n: int = 10) -> None:
    lines = ["t,ax,ay,label"]
    lines += [f"{i},{i * 1.0},{-i * 0.5},{0 if i < 6 else 1}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def test_csv_windows_shapes_and_last_row_label(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    _write_csv(path)
    ds = load_csv_windows(path, window=4, stride=2, label_column="label",
                          feature_columns=["ax", "ay"])
    # starts 0, 2, 4, 6 -> 4 complete windows over 10 rows
    assert ds.x.shape == (4, 4, 2) and ds.layout == "series"
    np.testing.assert_array_equal(ds.x[1, :, 0], [2, 3, 4, 5])
    np.testing.assert_array_equal(ds.x[1, :, 1], [-1, -1.5, -2, -2.5])
    # window 0 ends at row 3 (label 0); window 1 at 5 (0); window 2 at 7 (1); 3 at 9 (1)
    np.testing.assert_array_equal(ds.y, [0, 0, 1, 1])
    all_features = load_csv_windows(path, window=10, stride=1, label_column=3)
    assert all_features.x.shape == (1, 10, 3)


def test_csv_named_classes_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("a;b;act\n1;2;run\n3;4;walk\n5;6;run\n")
    ds = load_csv_windows(path, 2, 1, "act", delimiter=";", classes=["walk", "run", "idle"])
    np.testing.assert_array_equal(ds.y, [0, 1])
    assert ds.num_classes == 3
    with pytest.raises(DataError, match="not an integer"):
        load_csv_windows(path, 2, 1, "act", delimiter=";")
    with pytest.raises(DataError, match="no column 'label'"):
        load_csv_windows(path, 2, 1, "label", delimiter=";")
    headerless = tmp_path / "h.csv"
    headerless.write_text("1,2,0\n3,4,1\n")
    with pytest.raises(DataError, match="header row is required"):
        load_csv_windows(headerless, 1, 1, 2)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,label\n1,0\nx,1\n")
    with pytest.raises(DataError, match=r"bad.csv:3: non-numeric"):
        load_csv_windows(bad, 1, 1, "label")
    with pytest.raises(DataError, match="fewer than one window"):
        load_csv_windows(path, 5, 1, "act", delimiter=";", classes=["walk", "run"])


def test_digits_read_without_importing_sklearn_match_sklearn() -> None:
    """Devices read the shipped digits table directly (no ~90 MB scikit-learn import)."""
    import subprocess
    import sys

    code = (
        "import sys; from fedmq.data.datasets import load_digits; load_digits(); "
        "print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    sk = pytest.importorskip("sklearn.datasets")
    from fedmq.data.datasets import _read_digits

    x, y = _read_digits()
    bunch = sk.load_digits()
    np.testing.assert_array_equal(x, (bunch.data / 16).astype(np.float32))
    np.testing.assert_array_equal(y, bunch.target)
