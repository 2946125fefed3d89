"""Per-round sampling: counts, no repeats, class balance, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.data.sampling import balanced_quotas, sample_indices, sample_size
from fedmq.errors import DataError

# a skewed device: 500 of class 0, 50 of class 1, 5 of class 2
SKEWED = np.concatenate([np.zeros(500), np.ones(50), np.full(5, 2)]).astype(np.int32)


def test_defaults_return_a_permutation() -> None:
    idx = sample_indices(SKEWED, np.random.default_rng(0))
    assert len(idx) == len(SKEWED)
    np.testing.assert_array_equal(np.sort(idx), np.arange(len(SKEWED)))
    assert not np.array_equal(idx, np.arange(len(SKEWED)))


def test_fraction_and_max_examples() -> None:
    rng = np.random.default_rng(1)
    assert len(sample_indices(SKEWED, rng, fraction=0.1)) == 56  # ceil(55.5)
    assert len(sample_indices(SKEWED, rng, max_examples=30)) == 30
    assert len(sample_indices(SKEWED, rng, fraction=0.5, max_examples=30)) == 30
    assert len(sample_indices(SKEWED, rng, fraction=0.01, max_examples=300)) == 6
    assert len(sample_indices(SKEWED, rng, max_examples=10_000)) == len(SKEWED)
    idx = sample_indices(SKEWED, rng, fraction=0.3)
    assert len(np.unique(idx)) == len(idx)
    assert sample_size(3, fraction=0.001) == 1


def test_class_balanced_draws_equal_per_class_when_possible() -> None:
    rng = np.random.default_rng(2)
    idx = sample_indices(SKEWED, rng, max_examples=60, class_balanced=True)
    counts = np.bincount(SKEWED[idx], minlength=3)
    # class 2 only has 5: it gives all of them, the others share the remaining 55
    assert counts[2] == 5
    assert sorted(counts[:2].tolist()) == [27, 28]
    plain = np.bincount(SKEWED[sample_indices(SKEWED, rng, max_examples=60)], minlength=3)
    assert plain[0] > 40  # without balancing the majority class dominates
    even = sample_indices(SKEWED, rng, max_examples=12, class_balanced=True)
    np.testing.assert_array_equal(np.bincount(SKEWED[even], minlength=3), [4, 4, 4])
    assert len(np.unique(even)) == 12


def test_deterministic_for_same_rng_state() -> None:
    for balanced in (False, True):
        a = sample_indices(SKEWED, np.random.default_rng(9), fraction=0.2, class_balanced=balanced)
        b = sample_indices(SKEWED, np.random.default_rng(9), fraction=0.2, class_balanced=balanced)
        c = sample_indices(SKEWED, np.random.default_rng(10), fraction=0.2,
                           class_balanced=balanced)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda c: sum(c) > 0),
    data=st.data(),
)
def test_balanced_quotas_properties(counts: list[int], data: st.DataObject) -> None:
    total = data.draw(st.integers(1, sum(counts)))
    arr = np.array(counts)
    q = balanced_quotas(arr, total, np.random.default_rng(0))
    assert q.sum() == total
    assert (q <= arr).all() and (q >= 0).all()
    # water-filling: no class gets more than one draw above any class that still had
    # examples to spare
    open_q = q[q < arr]
    if len(open_q):
        assert q.max() <= open_q.min() + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"max_examples": 0}, "max_examples"),
    ],
)
def test_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(DataError, match=message):
        sample_indices(SKEWED, np.random.default_rng(0), **kwargs)  # type: ignore[arg-type]


def test_rejects_empty() -> None:
    with pytest.raises(DataError, match="empty"):
        sample_indices(np.array([], np.int32), np.random.default_rng(0))
