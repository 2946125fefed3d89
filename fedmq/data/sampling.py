"""Per-round local sampling: which of a device's examples it trains on this round."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from fedmq.errors import DataError

__all__ = ["balanced_quotas", "sample_indices", "sample_size"]

log = logging.getLogger(__name__)


def sample_size(n: int, fraction: float | None = None, max_examples: int | None = None) -> int:
    """How many of ``n`` examples a round uses: ``ceil(fraction * n)`` (at least 1),
    capped by ``max_examples``; all ``n`` when neither is given."""
    if fraction is not None and not (0.0 < fraction <= 1.0):
        raise DataError(f"sample fraction must be in (0, 1], got {fraction}")
    if max_examples is not None and (
        not isinstance(max_examples, int | np.integer) or max_examples < 1
    ):
        raise DataError(f"max_examples must be a positive integer, got {max_examples!r}")
    m = n
    if fraction is not None:
        m = max(1, math.ceil(fraction * n - 1e-9))
    if max_examples is not None:
        m = min(m, int(max_examples))
    return min(m, n)


def balanced_quotas(counts: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` draws over classes as equally as their ``counts`` allow.

    Water-filling: every class gets the same quota unless it has fewer examples, in
    which case it gives all it has and the rest is shared by the others. The few draws
    left over by integer division go to randomly chosen classes with room to spare.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if total > int(counts.sum()):
        raise DataError(f"cannot draw {total} from {int(counts.sum())} examples")
    quotas = np.zeros_like(counts)
    remaining = total
    open_ = counts > 0
    while remaining > 0:
        room = counts - quotas
        open_ &= room > 0
        k = int(open_.sum())
        share = remaining // k
        if share == 0:
            extra = rng.choice(np.flatnonzero(open_), size=remaining, replace=False)
            quotas[extra] += 1
            break
        give = np.where(open_, np.minimum(room, share), 0)
        quotas += give
        remaining -= int(give.sum())
    return quotas


def sample_indices(
    labels: Any,
    rng: np.random.Generator,
    fraction: float | None = None,
    max_examples: int | None = None,
    class_balanced: bool = False,
) -> np.ndarray:
    """Positions (into ``labels``) of this round's examples, in random order, no repeats.

    The count is :func:`sample_size`; with neither ``fraction`` nor ``max_examples`` the
    result is a permutation of all examples. With ``class_balanced`` the draws are spread
    as equally as possible over the classes present (:func:`balanced_quotas`), so a
    skewed device still trains on its rare classes; it only changes *which* examples
    are dropped, so it has no effect when every example is used.
    Deterministic for a given ``rng`` state.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {y.shape}")
    n = len(y)
    if n == 0:
        raise DataError("cannot sample from an empty dataset")
    m = sample_size(n, fraction, max_examples)
    if not class_balanced or m == n:
        return rng.permutation(n)[:m].astype(np.int64)
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    quotas = balanced_quotas(counts, m, rng)
    picked = [
        rng.choice(np.flatnonzero(inverse == c), size=int(q), replace=False)
        for c, q in enumerate(quotas)
        if q
    ]
    out = rng.permutation(np.concatenate(picked)).astype(np.int64)
    log.debug("class-balanced sample of %d from %d: quotas %s", m, n, quotas.tolist())
    return out
