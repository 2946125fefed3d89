"""Split one labelled dataset across simulated clients (IID and the usual non-IID schemes).

Every partitioner takes the label vector and returns ``list[np.ndarray]``: one sorted
int64 index array per client. The arrays are disjoint, together cover every index
(``k_classes`` raises rather than drop data, see there), depend only on the arguments
(``seed`` feeds one ``numpy.random.Generator``), and every client gets at least
``min_size`` examples (default 1).

Non-empty guarantee: ``dirichlet`` redraws up to ``max_retries`` times until every
client has ``min_size`` examples (the redraws are part of the seeded stream, so the
result is still deterministic); if that fails, and for the other schemes whenever a
client ends up short, :func:`rebalance` moves randomly chosen examples from the currently
largest client to the short one. This touches few examples and is logged.

Spec strings (config files, CLI): ``iid``, ``dirichlet:ALPHA``, ``classes:K``,
``quantity:ALPHA``; a spec may add ``key=value`` options after commas, e.g.
``dirichlet:0.3,min_size=10`` or ``quantity:power=1.5``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmq.errors import DataError

__all__ = [
    "SCHEMES",
    "PartitionSpec",
    "PartitionStats",
    "describe",
    "dirichlet",
    "iid",
    "k_classes",
    "parse_partition",
    "partition",
    "quantity_skew",
    "rebalance",
]

log = logging.getLogger(__name__)


def _labels(labels: Any) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise DataError(f"labels must be 1-D, got shape {y.shape}")
    if y.size and y.dtype.kind not in "biu":
        raise DataError(f"labels must be integers, got dtype {y.dtype}")
    return y


def _check_counts(n: int, num_clients: int, min_size: int) -> None:
    if not isinstance(num_clients, int | np.integer) or num_clients < 1:
        raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not isinstance(min_size, int | np.integer) or min_size < 1:
        raise DataError(f"min_size must be a positive integer, got {min_size!r}")
    if n < num_clients * min_size:
        raise DataError(
            f"cannot give {num_clients} clients at least {min_size} example(s) each "
            f"from {n} examples"
        )


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def rebalance(
    parts: Sequence[np.ndarray], min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Top up clients below ``min_size`` with random examples from the largest client.

    Deterministic for a given ``rng`` state. Needs ``sum(sizes) >= len(parts) * min_size``.
    """
    out = [np.asarray(p, dtype=np.int64) for p in parts]
    total = sum(len(p) for p in out)
    if total < len(out) * min_size:
        raise DataError(f"{total} examples cannot give {len(out)} clients {min_size} each")
    moved = 0
    while True:
        sizes = np.array([len(p) for p in out])
        short = int(np.argmin(sizes))
        need = min_size - int(sizes[short])
        if need <= 0:
            break
        donor = int(np.argmax(sizes))
        take = min(need, int(sizes[donor]) - min_size)
        pick = rng.choice(int(sizes[donor]), size=take, replace=False)
        keep = np.ones(int(sizes[donor]), dtype=bool)
        keep[pick] = False
        out[short] = np.concatenate([out[short], out[donor][pick]])
        out[donor] = out[donor][keep]
        moved += take
    if moved:
        log.info("rebalanced partition: moved %d example(s) to reach min_size=%d", moved, min_size)
    return out


def iid(labels: Any, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle and deal into ``num_clients`` near-equal shards (sizes differ by <= 1)."""
    y = _labels(labels)
    _check_counts(len(y), num_clients, 1)
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(len(y)), num_clients))


def dirichlet(
    labels: Any,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label skew: each class is split across clients by proportions ~ Dir(alpha).

    Small ``alpha`` (0.1) gives each client few dominant classes; large ``alpha`` (100)
    approaches IID. As in the NIID-Bench reference code, a client that already holds its
    fair share ``n / num_clients`` gets no further examples, which bounds quantity skew.
    See the module docstring for the ``min_size`` retry and rebalance.
    """
    y = _labels(labels)
    n = len(y)
    _check_counts(n, num_clients, min_size)
    if not alpha > 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    fair = n / num_clients
    buckets: list[list[np.ndarray]] = []
    sizes = np.zeros(num_clients, dtype=np.int64)
    for attempt in range(max(1, max_retries)):
        buckets = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            p = np.where(sizes < fair, p, 0.0)
            total = p.sum()
            p = p / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for i, piece in enumerate(np.split(idx, cuts)):
                buckets[i].append(piece)
                sizes[i] += len(piece)
        if sizes.min() >= min_size:
            if attempt:
                log.debug("dirichlet(alpha=%s): needed %d redraw(s)", alpha, attempt)
            break
    parts = [np.concatenate(b) if b else np.empty(0, np.int64) for b in buckets]
    if sizes.min() < min_size:
        log.info(
            "dirichlet(alpha=%s): %d draws left a client below min_size=%d; rebalancing",
            alpha, max(1, max_retries), min_size,
        )
        parts = rebalance(parts, min_size, rng)
    return _finish(parts)


def k_classes(
    labels: Any, num_clients: int, k: int, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Pathological label skew: each client holds examples of exactly ``k`` classes.

    Classes are shuffled and dealt in a ring (client i gets classes i*k .. i*k+k-1 mod C)
    so each class has as many holders as possible, differing by at most one; each
    class's examples are split evenly among its holders. Needs ``num_clients * k >= C``
    (C = classes present) so that no data is dropped; otherwise raises DataError.
    A client left short (a class with fewer examples than holders) is rebalanced.
    """
    y = _labels(labels)
    _check_counts(len(y), num_clients, min_size)
    classes = np.unique(y)
    c = len(classes)
    if not isinstance(k, int | np.integer) or not 1 <= k <= c:
        raise DataError(f"classes per client k must be in [1, {c}], got {k!r}")
    if num_clients * k < c:
        raise DataError(
            f"{num_clients} clients x {k} classes cannot cover all {c} classes; "
            "raise k or num_clients"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(cl): [] for cl in classes}
    for i in range(num_clients):
        for j in range(k):
            holders[int(order[(i * k + j) % c])].append(i)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cl in classes:
        idx = rng.permutation(np.flatnonzero(y == cl))
        owners = holders[int(cl)]
        for owner, piece in zip(owners, np.array_split(idx, len(owners)), strict=True):
            buckets[owner].append(piece)
    parts = [np.concatenate(b) for b in buckets]
    if min(len(p) for p in parts) < min_size:
        parts = rebalance(parts, min_size, rng)
    return _finish(parts)


def quantity_skew(
    labels: Any,
    num_clients: int,
    seed: int,
    alpha: float | None = None,
    power: float | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Quantity skew: IID labels, unequal client sizes.

    Size shares are drawn from Dir(``alpha``) (default 1.0; smaller = more skewed) or, with
    ``power``, follow a shuffled power law ``share_i ~ (i+1) ** -power``. Every client
    first gets ``min_size`` examples; the rest is dealt by share (largest remainders
    break ties).
    """
    y = _labels(labels)
    n = len(y)
    _check_counts(n, num_clients, min_size)
    if alpha is not None and power is not None:
        raise DataError("quantity_skew takes alpha or power, not both")
    rng = np.random.default_rng(seed)
    if power is not None:
        if not power >= 0:
            raise DataError(f"quantity_skew power must be >= 0, got {power}")
        shares = rng.permutation(np.arange(1, num_clients + 1, dtype=np.float64) ** -power)
    else:
        a = 1.0 if alpha is None else float(alpha)
        if not a > 0:
            raise DataError(f"quantity_skew alpha must be > 0, got {alpha}")
        shares = rng.dirichlet(np.full(num_clients, a))
    shares = shares / shares.sum()
    extra = n - num_clients * min_size
    exact = shares * extra
    sizes = np.floor(exact).astype(np.int64)
    remainder = extra - int(sizes.sum())
    if remainder:
        sizes[np.argsort(-(exact - sizes), kind="stable")[:remainder]] += 1
    sizes += min_size
    return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


# -------------------------------------------------------------------- dispatch

_SCHEMES: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "classes": k_classes,
    "quantity": quantity_skew,
}
_ALIASES = {"k_classes": "classes", "quantity_skew": "quantity", "label_dirichlet": "dirichlet"}
_POSITIONAL = {"dirichlet": "alpha", "classes": "k", "quantity": "alpha"}
_INT_PARAMS = {"k", "min_size", "max_retries"}

#: Scheme names accepted by :func:`partition` and :func:`parse_partition`.
SCHEMES = tuple(_SCHEMES)


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: scheme name and its keyword parameters."""

    scheme: str
    params: Mapping[str, float | int] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.params:
            return self.scheme
        return self.scheme + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())


def _number(key: str, text: str, spec: str) -> float | int:
    try:
        if key in _INT_PARAMS:
            return int(text)
        return float(text)
    except ValueError:
        raise DataError(f"partition spec {spec!r}: {key}={text!r} is not a number") from None


def parse_partition(spec: str, *, complete: bool = True) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:0.5``, ``classes:2``, ``quantity:power=1.5``, ...

    The first item after ``:`` may be a bare number, the scheme's main parameter
    (dirichlet: alpha, classes: k, quantity: alpha); further items are ``key=value``.
    With ``complete=False`` required parameters may be missing (given later as keywords).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty partition spec {spec!r}")
    name, _, rest = spec.strip().partition(":")
    scheme = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if scheme not in _SCHEMES:
        raise DataError(f"unknown partition scheme {name!r}; use one of {', '.join(SCHEMES)}")
    params: dict[str, float | int] = {}
    items = [item.strip() for item in rest.split(",")] if rest.strip() else []
    for pos, item in enumerate(items):
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
        elif pos == 0 and scheme in _POSITIONAL:
            key, value = _POSITIONAL[scheme], item
        else:
            raise DataError(f"partition spec {spec!r}: expected key=value, got {item!r}")
        if not key or key in params:
            raise DataError(f"partition spec {spec!r}: empty or repeated key {key!r}")
        params[key] = _number(key, value.strip(), spec)
    _bind(scheme, params, complete)
    return PartitionSpec(scheme, params)


def _bind(scheme: str, params: Mapping[str, Any], complete: bool = True) -> None:
    sig = inspect.signature(_SCHEMES[scheme])
    allowed = [p for p in sig.parameters if p not in ("labels", "num_clients", "seed")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise DataError(
            f"partition scheme {scheme!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"takes {', '.join(allowed) or 'none'}"
        )
    missing = complete and [
        p for p in allowed
        if sig.parameters[p].default is inspect.Parameter.empty and p not in params
    ]
    if missing:
        raise DataError(f"partition scheme {scheme!r}: missing {', '.join(missing)}")


def partition(
    labels: Any, num_clients: int, scheme: str | PartitionSpec, seed: int, **params: Any
) -> list[np.ndarray]:
    """Partition by scheme name or spec string; ``params`` add to / override the spec's."""
    spec = (
        scheme if isinstance(scheme, PartitionSpec) else parse_partition(scheme, complete=False)
    )
    merged = {**spec.params, **params}
    _bind(spec.scheme, merged)
    parts = _SCHEMES[spec.scheme](labels, num_clients, seed=seed, **merged)
    log.debug(
        "partition %s over %d clients (seed %d): sizes %s",
        spec, num_clients, seed, [len(p) for p in parts],
    )
    return parts


# -------------------------------------------------------------------- describe


@dataclass(frozen=True, eq=False)
class PartitionStats:
    """Per-client sizes (k,) and label histograms (k, C) of a partition."""

    sizes: np.ndarray
    histograms: np.ndarray

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def label_entropy(self) -> np.ndarray:
        """Shannon entropy (bits) of each client's label distribution; 0 = one class."""
        h = self.histograms.astype(np.float64)
        totals = h.sum(axis=1, keepdims=True)
        p = np.divide(h, totals, out=np.zeros_like(h), where=totals > 0)
        logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
        return np.asarray(-(p * logs).sum(axis=1))

    @property
    def mean_label_entropy(self) -> float:
        return float(self.label_entropy.mean()) if self.num_clients else 0.0

    @property
    def classes_per_client(self) -> np.ndarray:
        return np.asarray((self.histograms > 0).sum(axis=1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for structured logs and run records."""
        return {
            "sizes": [int(s) for s in self.sizes],
            "histograms": [[int(v) for v in row] for row in self.histograms],
            "mean_label_entropy": round(self.mean_label_entropy, 4),
        }

    def format(self) -> str:
        """A small text table: one line per client."""
        if len(self.sizes):
            lo, mid, hi = self.sizes.min(), np.median(self.sizes), self.sizes.max()
        else:
            lo = mid = hi = 0
        lines = [
            f"{self.num_clients} clients, sizes min/median/max "
            f"{int(lo)}/{float(mid):g}/{int(hi)}, mean label entropy "
            f"{self.mean_label_entropy:.3f} bits"
        ]
        for i, (size, hist) in enumerate(zip(self.sizes, self.histograms, strict=True)):
            lines.append(f"  client {i:>3}: n={int(size):>6}  labels={hist.tolist()}")
        return "\n".join(lines)


def describe(
    parts: Sequence[np.ndarray], labels: Any, num_classes: int | None = None
) -> PartitionStats:
    """Sizes and label histograms of ``parts`` (for logging and tests)."""
    y = _labels(labels)
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    hist = np.zeros((len(parts), c), dtype=np.int64)
    for i, p in enumerate(parts):
        idx = np.asarray(p, dtype=np.int64)
        if idx.size:
            hist[i] = np.bincount(y[idx], minlength=c)[:c]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    return PartitionStats(sizes=sizes, histograms=hist)
