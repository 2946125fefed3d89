"""Partitioners: invariants (hypothesis), determinism, skew, spec parsing, describe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.data.partition import (
    PartitionSpec,
    describe,
    dirichlet,
    iid,
    k_classes,
    parse_partition,
    partition,
    quantity_skew,
    rebalance,
)
from fedmq.errors import DataError

LABELS = np.repeat(np.arange(10), 100)  # 1000 examples, 10 balanced classes
SPECS = ["iid", "dirichlet:0.3", "dirichlet:5", "classes:2", "quantity:0.5", "quantity:power=1.2"]


def _assert_valid(parts: list[np.ndarray], n: int, num_clients: int, min_size: int = 1) -> None:
    assert len(parts) == num_clients
    assert all(p.dtype == np.int64 for p in parts)
    assert min(len(p) for p in parts) >= min_size
    joined = np.concatenate(parts)
    assert len(joined) == n, "clients must not share indices and must cover all of them"
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


@pytest.mark.parametrize("spec", SPECS)
def test_partition_disjoint_covering_deterministic(spec: str) -> None:
    parts = partition(LABELS, 8, spec, seed=7)
    _assert_valid(parts, len(LABELS), 8)
    again = partition(LABELS, 8, spec, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(LABELS, 8, spec, seed=8)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@st.composite
def _problem(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(1, 120))
    labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    num_clients = draw(st.integers(1, min(n, 9)))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, num_clients, seed


@settings(max_examples=40, deadline=None)
@given(problem=_problem(), alpha=st.sampled_from([0.05, 0.5, 10.0]))
def test_dirichlet_invariants(problem: tuple[np.ndarray, int, int], alpha: float) -> None:
    labels, k, seed = problem
    _assert_valid(dirichlet(labels, k, alpha, seed, max_retries=5), len(labels), k)


@settings(max_examples=40, deadline=None)
@given(problem=_problem(), data=st.data())
def test_k_classes_invariants(problem: tuple[np.ndarray, int, int], data: st.DataObject) -> None:
    labels, k, seed = problem
    c = len(np.unique(labels))
    per_client = data.draw(st.integers(1, c))
    if k * per_client < c:
        with pytest.raises(DataError, match="cannot cover"):
            k_classes(labels, k, per_client, seed)
        return
    parts = k_classes(labels, k, per_client, seed)
    _assert_valid(parts, len(labels), k)


@settings(max_examples=40, deadline=None)
@given(problem=_problem(), power=st.sampled_from([None, 0.0, 2.0]))
def test_iid_and_quantity_invariants(
    problem: tuple[np.ndarray, int, int], power: float | None
) -> None:
    labels, k, seed = problem
    _assert_valid(iid(labels, k, seed), len(labels), k)
    _assert_valid(quantity_skew(labels, k, seed, power=power), len(labels), k)


def test_iid_sizes_equal() -> None:
    sizes = [len(p) for p in iid(np.zeros(103, np.int64), 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    skewed = describe(dirichlet(LABELS, 10, 0.1, seed=3), LABELS, 10)
    mild = describe(dirichlet(LABELS, 10, 100.0, seed=3), LABELS, 10)
    uniform = np.log2(10)
    assert mild.mean_label_entropy > 0.95 * uniform
    assert skewed.mean_label_entropy < 0.6 * uniform
    assert skewed.mean_label_entropy + 1.0 < mild.mean_label_entropy


def test_dirichlet_min_size_respected_via_retry_or_rebalance() -> None:
    parts = dirichlet(LABELS, 20, 0.01, seed=0, min_size=30)
    _assert_valid(parts, len(LABELS), 20, min_size=30)
    parts = dirichlet(LABELS, 20, 0.01, seed=0, min_size=30, max_retries=1)
    _assert_valid(parts, len(LABELS), 20, min_size=30)
    with pytest.raises(DataError, match="at least 60"):
        dirichlet(LABELS, 20, 0.5, seed=0, min_size=60)


def test_k_classes_gives_exactly_k_classes() -> None:
    stats = describe(k_classes(LABELS, 10, 3, seed=1), LABELS, 10)
    np.testing.assert_array_equal(stats.classes_per_client, np.full(10, 3))
    assert (stats.histograms.sum(axis=0) == 100).all()
    with pytest.raises(DataError, match="cannot cover"):
        k_classes(LABELS, 4, 2, seed=0)


def test_quantity_skew_skews_sizes_not_labels() -> None:
    skewed = describe(quantity_skew(LABELS, 10, seed=2, alpha=0.3), LABELS, 10)
    flat = describe(quantity_skew(LABELS, 10, seed=2, alpha=1000.0), LABELS, 10)
    assert skewed.sizes.std() > 5 * flat.sizes.std()
    power = quantity_skew(LABELS, 10, seed=2, power=2.0)
    assert max(len(p) for p in power) > 4 * sorted(len(p) for p in power)[5]
    with pytest.raises(DataError, match="not both"):
        quantity_skew(LABELS, 10, seed=2, alpha=1.0, power=1.0)


def test_rebalance_tops_up_short_clients() -> None:
    parts = [np.arange(0, 10), np.array([], np.int64), np.array([10])]
    out = rebalance(parts, 3, np.random.default_rng(0))
    assert [len(p) for p in out] == [4, 3, 4] or min(len(p) for p in out) >= 3
    np.testing.assert_array_equal(np.sort(np.concatenate(out)), np.arange(11))


def test_parse_partition_specs() -> None:
    assert parse_partition("iid") == PartitionSpec("iid", {})
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", {"alpha": 0.5})
    assert parse_partition("classes:2") == PartitionSpec("classes", {"k": 2})
    assert parse_partition(" quantity:0.8 ") == PartitionSpec("quantity", {"alpha": 0.8})
    spec = parse_partition("dirichlet:0.3,min_size=10")
    assert spec.params == {"alpha": 0.3, "min_size": 10}
    assert str(spec) == "dirichlet:alpha=0.3,min_size=10"
    assert parse_partition(str(spec)) == spec
    assert parse_partition("quantity:power=1.5").params == {"power": 1.5}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("shards:2", "unknown partition scheme"),
        ("dirichlet", "missing alpha"),
        ("dirichlet:abc", "not a number"),
        ("classes:2.5", "not a number"),
        ("iid:3", "expected key=value"),
        ("dirichlet:0.5,beta=1", "unknown parameter"),
        ("dirichlet:0.5,alpha=1", "repeated"),
    ],
)
def test_parse_partition_rejects(spec: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_partition(spec)


def test_partition_dispatch_params_override_spec() -> None:
    a = partition(LABELS, 5, "dirichlet", seed=1, alpha=0.5)
    b = partition(LABELS, 5, "dirichlet:0.5", seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(DataError, match="unknown parameter"):
        partition(LABELS, 5, "iid", seed=1, alpha=0.5)
    with pytest.raises(DataError, match="num_clients"):
        partition(LABELS, 0, "iid", seed=1)


def test_describe_reports_sizes_histograms_and_entropy() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    stats = describe([np.array([0, 1]), np.array([2, 3, 4, 5])], labels, num_classes=3)
    np.testing.assert_array_equal(stats.sizes, [2, 4])
    np.testing.assert_array_equal(stats.histograms, [[2, 0, 0], [0, 1, 3]])
    assert stats.label_entropy[0] == 0.0
    assert stats.label_entropy[1] == pytest.approx(0.8113, abs=1e-4)
    record = stats.to_dict()
    assert record["sizes"] == [2, 4] and record["histograms"][1] == [0, 1, 3]
    assert "client   1: n=     4" in stats.format()
